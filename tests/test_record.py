"""Recording: the recorded reads equal a brute-force recomputation from the layer's own query and
keys, padding is never recorded, hooks never outlive the block, long documents are windowed with
every token recorded once (and as a direct forward of its window would read it), bad input writes
nothing, an interrupted recording resumes to the same trace, and two torchrun processes write the
single process's trace file for file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smviz.cli import main
from smviz.data.corpus import load_articles
from smviz.data.facts import qa_text
from smviz.data.tokenizer import train_tokenizer
from smviz.data.world import WorldConfig, generate_world
from smviz.data.facts import write_facts
from smviz.errors import ConfigError, InputError, ModelFileError, TraceError, WriteError
from smviz.model import MemoryModel
from smviz.record import (
    DEFAULT_MAX_DOC_CHARS,
    AccessRecorder,
    Document,
    chunk_spans,
    read_documents,
    record_texts,
)
from smviz.trace import Trace


@pytest.fixture(scope="module")
def articles():
    return load_articles()[:40]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, articles):
    """A micro model with a small tokenizer, saved and loaded back (so it has a model hash)."""
    tokenizer = train_tokenizer([a.text for a in articles], vocab_size=400)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    path = tmp_path_factory.mktemp("model") / "m"
    model.save_pretrained(path)
    return path


@pytest.fixture
def model(saved_model, device):
    return MemoryModel.from_pretrained(saved_model, device=device)


def brute_force_reads(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots and softmax weights of token states x (M, dim), scoring all N slots one by one:
    score(i1 * n_keys + i2) = q_half1 · keys1[i1] + q_half2 · keys2[i2]."""
    c = layer.config
    q = layer.query_norm(layer.query(x)).view(-1, c.heads, 2, c.k_dim // 2)
    i1 = torch.arange(c.n_slots, device=x.device) // c.n_keys
    i2 = torch.arange(c.n_slots, device=x.device) % c.n_keys
    scores = torch.stack(
        [q[:, h, 0] @ layer.keys[h, 0, i1].T + q[:, h, 1] @ layer.keys[h, 1, i2].T for h in range(c.heads)], 1
    )  # (M, H, N)
    top, slots = scores.topk(c.knn, dim=-1)
    return slots, torch.softmax(top.float(), dim=-1)


def test_recorded_reads_equal_brute_force_and_skip_padding(model, device):
    layer = model.memory_layers[1]
    captured = []
    pre = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
    ids = torch.randint(1, 400, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    with torch.no_grad(), AccessRecorder(model) as rec:
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    pre.remove()
    (batch,) = rec.batches
    real = mask.bool()
    assert len(batch.seq) == int(real.sum())
    seq, col = real.nonzero(as_tuple=True)
    assert np.array_equal(batch.seq, seq.numpy()) and np.array_equal(batch.position, col.numpy())
    assert np.array_equal(batch.token_id, ids[real].numpy())
    with torch.no_grad():
        slots, weights = (t.cpu() for t in brute_force_reads(layer, captured[0][real.to(device)]))
    assert batch.slots.dtype == np.int32 and batch.weights.dtype == np.float16
    assert np.array_equal(batch.slots[:, 0], slots.numpy())
    np.testing.assert_allclose(batch.weights[:, 0].astype(np.float32), weights.numpy(), rtol=1e-3, atol=1e-3)


def test_trace_from_recorder_holds_real_tokens_only(model, device):
    ids = torch.randint(1, 400, (2, 7), device=device)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], device=device)
    with torch.no_grad(), AccessRecorder(model) as rec:
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:1, :5])  # no mask: every token real
    trace = rec.trace()
    tokens = trace.to_pandas("tokens")
    assert len(tokens) == 7 + 3 + 5 and trace.n_docs == 3
    assert tokens["doc_id"].tolist()[:10] == ["0:0"] * 7 + ["0:1"] * 3
    assert trace.n_accesses == len(tokens) * model.memory_config.heads * model.memory_config.knn
    assert tokens["text"].tolist()[:7] == [model.tokenizer.decode([int(i)]) for i in ids[0]]


def test_recording_inside_a_training_step(model, device):
    model.train()
    ids = torch.randint(1, 400, (2, 8), device=device)
    with AccessRecorder(model) as rec:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert model.memory_layers[1].query.weight.grad is not None
    model.eval()
    with torch.no_grad(), AccessRecorder(model) as again:
        model(input_ids=ids)
    assert np.array_equal(rec.batches[0].slots, again.batches[0].slots)


def test_hooks_are_removed_when_the_block_raises(model, device):
    layer = model.memory_layers[1]
    pre_hooks = len(model.lm._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with AccessRecorder(model):
            model(input_ids=torch.randint(1, 400, (1, 4), device=device))
            raise RuntimeError("boom")
    assert not layer._access_hooks
    assert len(model.lm._forward_pre_hooks) == pre_hooks and not model.lm._forward_hooks


def test_generate_records_each_call_with_cache_positions(model, device):
    ids = torch.randint(1, 400, (2, 5), device=device)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
    with torch.no_grad(), AccessRecorder(model) as rec:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(rec.batches) == 3  # prompt + 2 cached steps (the third new token needs no forward)
    assert len(rec.batches[0].seq) == 9
    assert rec.batches[1].position.tolist() == [5, 5] and rec.batches[2].position.tolist() == [6, 6]


def test_unknown_layer_is_refused(model):
    with pytest.raises(ConfigError, match=r"the model has no memory layer 0; its memory layers are \[1\]"):
        AccessRecorder(model, layers=[0])
    with pytest.raises(ConfigError, match="layers is empty"):
        AccessRecorder(model, layers=[])


def test_chunk_spans_record_every_token_once():
    for n, context, stride in [(0, 4, 2), (3, 4, 2), (10, 4, 2), (10, 4, 4), (11, 5, 1), (7, 7, 3)]:
        spans = chunk_spans(n, context, stride)
        recorded = [p for start, end, first in spans for p in range(first, end)]
        assert recorded == list(range(n))
        for start, end, first in spans:
            assert end - start <= context and (first == 0 or first - start >= context - stride)
    with pytest.raises(ConfigError, match="stride"):
        chunk_spans(5, 4, 5)


def test_record_texts_windows_match_direct_forwards(model, articles, tmp_path):
    docs = [Document("a", articles[0].text), Document("empty", ""), Document("b", articles[1].text[:200])]
    trace = record_texts(model, docs, tmp_path / "t", context=16, stride=8, batch_size=3, shard_tokens=50, progress=False)
    tokens = trace.to_pandas("tokens")
    assert trace.n_docs == 3 and len(trace.meta["shards"]) >= 2
    for d, doc in enumerate(docs):
        rows = tokens[tokens.doc == d]
        enc = model.tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        assert rows["position"].tolist() == list(range(len(enc["input_ids"])))
        assert rows["token_id"].tolist() == enc["input_ids"]
        assert "".join(rows["text"]) == doc.text  # the texts rebuild the document
        assert list(zip(rows["start"], rows["end"])) == [tuple(o) for o in enc["offset_mapping"]]
    # token 20 of doc "a" is recorded from the window that starts at 8: its reads equal a direct forward
    ids = model.tokenizer(docs[0].text, add_special_tokens=False)["input_ids"]
    start, end, first = next(s for s in chunk_spans(len(ids), 16, 8) if s[2] <= 20 < s[1])
    with torch.no_grad(), AccessRecorder(model) as rec:
        model(input_ids=torch.tensor([ids[start:end]], device=model.lm.device))
    direct = rec.batches[0].slots[20 - start, 0]
    acc = trace.to_pandas()
    got = acc[(acc.doc == 0) & (acc.position == 20)].sort_values(["head", "rank"])["slot"].to_numpy()
    assert np.array_equal(got, direct.reshape(-1))


def test_interrupted_recording_resumes_to_the_same_trace(model, articles, tmp_path):
    docs = [Document(str(i), a.text[:300]) for i, a in enumerate(articles[:12])]
    kw = dict(context=32, batch_size=4, shard_tokens=100, progress=False)
    whole = record_texts(model, docs, tmp_path / "whole", **kw)
    assert record_texts(model, docs, tmp_path / "cut", stop_after_shards=2, **kw) is None
    with pytest.raises(TraceError, match="interrupted"):
        Trace.load(tmp_path / "cut")
    resumed = record_texts(model, docs, tmp_path / "cut", **kw)
    assert resumed.tokens.equals(whole.tokens) and resumed.accesses.equals(whole.accesses)
    assert resumed.meta["shards"] == whole.meta["shards"]
    assert not (tmp_path / ".cut.partial").exists()
    # a partial recording made with other settings is discarded, not continued
    record_texts(model, docs, tmp_path / "other", stop_after_shards=1, **kw)
    redone = record_texts(model, docs, tmp_path / "other", **(kw | {"context": 16}))
    assert redone.meta["recording"]["context"] == 16 and redone.n_tokens == whole.n_tokens


def test_existing_trace_is_not_replaced_without_force(model, tmp_path):
    docs = [Document("x", "Hello there.")]
    record_texts(model, docs, tmp_path / "t", progress=False)
    with pytest.raises(TraceError, match="already exists"):
        record_texts(model, docs, tmp_path / "t", progress=False)
    assert record_texts(model, docs, tmp_path / "t", force=True, progress=False).n_docs == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"\n  \n", "empty"),
        (b'{"text": "caf\xe9"}\n', "not UTF-8"),
        (b'{"text": "ok"}\n{"text": \n', "in.jsonl:2: not valid JSON"),
        (b'{"body": "no text"}\n', "'text'"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "appears twice"),
        (b'["a list"]\n', "JSON object"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(saved_model, tmp_path, capsys, content, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_documents(path)
    out = tmp_path / "traces" / "t"
    assert main(["record", "--model", str(saved_model), "--input", str(path), "--out", str(out), "--device", "cpu"]) == 2
    assert message.split(":")[-1].strip() in capsys.readouterr().err
    assert not (tmp_path / "traces").exists()


def test_facts_file_gives_statements_and_questions(tmp_path):
    facts = generate_world(WorldConfig(n_known=2, n_bio_only=1, n_new=1)).known[:2]
    path = tmp_path / "facts.jsonl"
    write_facts(path, facts)
    docs, source = read_documents(path)
    assert source["kind"] == "facts" and len(source["sha256"]) == 64
    f = facts[0]
    assert [d.text for d in docs if d.id.startswith(f"{f.id}:s")] == list(f.statements)
    assert docs[len(f.statements)] == Document(f"{f.id}:q0", qa_text(f.questions[0].text, f.answer).rstrip("\n"))


def test_cli_record_writes_a_trace(saved_model, articles, tmp_path, capsys):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": f"art{i}", "text": a.text[:400]}) + "\n" for i, a in enumerate(articles[:3])))
    out = tmp_path / "traces" / "t"
    assert main(["record", "--model", str(saved_model), "--input", str(path), "--out", str(out), "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    trace = Trace.load(out)
    assert info["tokens"] == trace.n_tokens > 0 and info["documents"] == 3
    assert trace.meta["source"]["kind"] == "texts" and trace.meta["source"]["name"] == "texts.jsonl"
    assert trace.model_hash == MemoryModel.from_pretrained(saved_model).model_hash
    assert trace.to_pandas("tokens")["doc_id"].iloc[0] == "art0"


def listing(directory) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def test_a_huge_document_is_refused_by_name_before_anything_is_written(model, tmp_path):
    """Case 12 of issue 14: a document of one 5 MB line is refused at once (default limit), and any
    document over a configured `max_doc_chars` likewise, naming it; nothing is written."""
    before = listing(tmp_path)
    huge = [Document("short", "Hello."), Document("one-line", "word " * 1_000_000)]  # 5 MB, no newline
    assert len(huge[1].text) > DEFAULT_MAX_DOC_CHARS
    with pytest.raises(InputError, match=r"^notes.jsonl: document 'one-line' has 5,000,000 characters, more than "
                                         r"max_doc_chars=1,000,000; split it"):
        record_texts(model, huge, tmp_path / "t", source={"name": "notes.jsonl"}, progress=False)
    docs = [Document("a", "Short text."), Document("b", "A text of forty characters, or nearly...")]
    with pytest.raises(InputError, match=r"document 'b' has 40 characters, more than max_doc_chars=20") as err:
        record_texts(model, docs, tmp_path / "t", max_doc_chars=20, progress=False)
    assert "\n" not in str(err.value)
    assert listing(tmp_path) == before
    assert record_texts(model, docs, tmp_path / "t", max_doc_chars=40, progress=False).n_docs == 2


def test_progress_advances_with_every_batch_of_windows(model, articles, tmp_path):
    text = " ".join(a.text for a in articles[:3])  # one long document: many windows
    n_windows = len(chunk_spans(len(model.tokenizer(text, add_special_tokens=False)["input_ids"]), 16, 8))
    assert n_windows >= 20
    seen: list[float] = []
    trace = record_texts(model, [Document("long", text)], tmp_path / "t", context=16, stride=8, batch_size=4,
                         progress=False, on_progress=seen.append)
    assert trace.n_docs == 1
    assert seen[-1] == 1.0 and all(b >= a for a, b in zip(seen, seen[1:]))
    inside = [x for x in seen if 0 < x < 1]
    assert len(inside) == -(-n_windows // 4) - 1  # one report per batch of 4 windows, the last one reaching 1
    assert inside[0] == pytest.approx(4 / n_windows)


def test_recording_text_without_a_tokenizer_says_so(model, tmp_path):
    bare = MemoryModel.from_preset("micro", seed=0)
    with pytest.raises(ModelFileError, match="the model has no tokenizer, and recording text needs one"):
        record_texts(bare, [Document("a", "text")], tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


def test_recording_under_a_file_is_a_write_error_and_changes_nothing(model, tmp_path):
    blocker = tmp_path / "traces"
    blocker.write_text("not a folder")
    before = listing(tmp_path)
    with pytest.raises(WriteError, match="cannot write") as err:
        record_texts(model, [Document("a", "Some text.")], blocker / "t", progress=False)
    assert "\n" not in str(err.value)
    assert listing(tmp_path) == before and blocker.read_text() == "not a folder"


DRIVER = """
import sys
from smviz.distributed import distributed_from_env
from smviz.model import MemoryModel
from smviz.record import read_documents, record_texts

model_dir, texts, out, stop = sys.argv[1:5]
documents, source = read_documents(texts)
with distributed_from_env("cpu") as (rank, world_size, device):
    model = MemoryModel.from_pretrained(model_dir, device=device)
    got = record_texts(model, documents, out, source=source, context=32, batch_size=4, shard_tokens=100, progress=False,
                       stop_after_shards=int(stop), rank=rank, world_size=world_size, summary=3)
    assert got is None, "the recording was to stop early"
"""


def test_two_torchrun_processes_record_the_single_process_trace_file_for_file(saved_model, articles, tmp_path):
    """Issue 19: ranks record disjoint shards and one trace results, identical byte for byte (every
    Parquet file, the slot summaries and meta.json) to one process's; an interrupted two-process recording resumes each
    rank's own shards without recording the finished ones again."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"a{i}", "text": a.text[:300]}) + "\n" for i, a in enumerate(articles[:12])))
    args = ["record", "--model", str(saved_model), "--input", str(texts), "--context", "32", "--batch-size", "4",
            "--shard-tokens", "100", "--summary", "3", "--device", "cpu", "--json"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

    def run(cmd):
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run([sys.executable, "-m", "smviz", *args, "--out", str(tmp_path / "one")])
    (tmp_path / "driver.py").write_text(DRIVER)
    run([*torchrun, str(tmp_path / "driver.py"), str(saved_model), str(texts), str(tmp_path / "two"), "1"])
    partial = tmp_path / ".two.partial"
    progress = sorted(p.name for p in (partial / "progress").iterdir())
    assert progress == ["part-00000.json", "part-00001.json"]  # one shard each: rank 0 took shard 0, rank 1 shard 1
    stamps = {p.name: p.stat().st_mtime_ns for p in (partial / "accesses").iterdir()}
    out = run([*torchrun, "-m", "smviz", *args, "--out", str(tmp_path / "two")])
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert len([f for f in files if f.startswith("accesses/")]) >= 4 and "meta.json" in files
    assert "summary/contexts.parquet" in files  # the slot summaries, merged from both ranks' shards
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    assert {n: (two / "accesses" / n).stat().st_mtime_ns for n in stamps} == stamps  # resumed, not recorded again
    assert not partial.exists() and json.loads(out)["tokens"] == Trace.load(two).n_tokens  # printed once, by rank 0
