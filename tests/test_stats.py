"""Tests of smviz.stats: counting against brute-force Python counts from an independent access hook,
document frequency in both units, exact and associative merging, the file format (round trip, refusals
of damaged files and other models), TF-IDF and top-t against hand numbers, hook cleanup, the resumable
background run, and two torchrun processes giving exactly the single-process result."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from smviz.cli import main
from smviz.errors import ConfigError, StatsError
from smviz.model import MemoryModel
from smviz.stats import (
    STATS_FILE,
    SlotStats,
    StatsCollector,
    batch_counts,
    collect_stats,
    document_counts,
    forward_documents,
    merge_protocols,
    partial_path,
    tfidf,
    top_slots,
)
from smviz.usage import usage_metrics
from smviz.workspace.stages import BACKGROUND_STEP_OFFSET, background_stats

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- independent references


def brute_counts(idx: np.ndarray, mask: np.ndarray, n: int) -> list[int]:
    """Reads per slot by explicit loops over (sequence, token, head, rank), skipping padding."""
    out = [0] * n
    B, T = mask.shape
    flat = idx.reshape(B, T, -1)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                for slot in flat[b, t].tolist():
                    out[slot] += 1
    return out


def brute_df(batches: list[tuple[np.ndarray, np.ndarray]], n: int, unit: str) -> tuple[list[int], int, int]:
    """(df per slot, documents, real tokens) from Python sets: one set of read slots per document."""
    documents: list[set[int]] = []
    tokens = 0
    for idx, mask in batches:
        B, T = mask.shape
        flat = idx.reshape(B, T, -1)
        per_row = [{s for t in range(T) if mask[b, t] for s in flat[b, t].tolist()} for b in range(B)]
        real = [int(mask[b].sum()) for b in range(B)]
        tokens += sum(real)
        if unit == "batch":
            if sum(real):
                documents.append(set().union(*per_row))
        else:
            documents += [s for s, r in zip(per_row, real) if r]
    df = [sum(slot in d for d in documents) for slot in range(n)]
    return df, len(documents), tokens


class Tap:
    """Our own access hook: every forward's indices and padding mask, as numpy."""

    def __init__(self) -> None:
        self.reads: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, layer, indices, weights, mask) -> None:
        B, T = indices.shape[:2]
        m = np.ones((B, T), dtype=bool) if mask is None else mask.cpu().numpy().astype(bool)
        self.reads.append((indices.detach().cpu().numpy().copy(), m))


def make_batch(seed: int, B: int = 3, T: int = 8, pads=(0, 3, 5)) -> dict[str, torch.Tensor]:
    """Random ids with right padding: row b has its last pads[b] positions masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            mask[b, T - p :] = 0
    return {"input_ids": ids, "attention_mask": mask}


BATCHES = [
    make_batch(1),
    make_batch(2, pads=(8, 0, 1)),  # a whole row of padding: not a sequence document
    make_batch(3, pads=(8, 8, 8)),  # no real token at all: not a document in either unit
    make_batch(4, B=2, T=5, pads=(0, 2)),
]


@pytest.fixture(scope="module")
def micro2():
    """Micro model with memory layers at blocks 0 and 1."""
    model = MemoryModel.from_preset("micro", seed=1, layers=(0, 1))
    return model.eval()


# --------------------------------------------------------------------------- counting one forward


def test_batch_counts_against_brute_force_and_padding_never_counted():
    g = torch.Generator().manual_seed(0)
    n = 11
    idx = torch.randint(0, n - 1, (3, 5, 2, 3), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    idx[~mask] = n - 1  # the last slot is read only at padding positions
    got = batch_counts(idx, mask, n)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert got.tolist() == brute_counts(idx.numpy(), mask.numpy(), n)
    assert got[n - 1] == 0 and got.sum() == 7 * 2 * 3
    # (M, H, K) with a (B, T) mask: the same counts; no mask: every position counts
    assert torch.equal(batch_counts(idx.view(15, 2, 3), mask, n), got)
    assert batch_counts(idx, None, n).tolist() == brute_counts(idx.numpy(), np.ones((3, 5), bool), n)
    assert batch_counts(idx[:0], None, n).tolist() == [0] * n
    with pytest.raises(StatsError, match="out of range"):
        batch_counts(idx, None, n - 1)
    with pytest.raises(StatsError, match="does not cover"):
        batch_counts(idx, mask[:, :4], n)


def test_document_counts_by_hand():
    # N = 5; two sequences of two tokens, one head, top-2; the last token of row 1 is padding
    idx = torch.tensor([[[[0, 1]], [[1, 2]]], [[[2, 3]], [[4, 4]]]])
    mask = torch.tensor([[True, True], [True, False]])
    assert batch_counts(idx, mask, 5).tolist() == [1, 2, 2, 1, 0]
    assert document_counts(idx, mask, 5, "batch").tolist() == [1, 1, 1, 1, 0]
    assert document_counts(idx, mask, 5, "sequence").tolist() == [1, 1, 2, 1, 0]
    assert forward_documents(idx, mask, "batch").tolist() == [1, 3]
    assert forward_documents(idx, mask, "sequence").tolist() == [2, 3]
    assert forward_documents(idx, torch.zeros(2, 2, dtype=torch.bool), "batch").tolist() == [0, 0]
    assert forward_documents(idx, None, "sequence").tolist() == [2, 4]
    with pytest.raises(StatsError, match="unknown document unit"):
        document_counts(idx, mask, 5, "token")


def test_document_counts_against_brute_force():
    g = torch.Generator().manual_seed(1)
    n = 13
    for B, T in ((4, 6), (1, 9), (5, 1)):
        idx = torch.randint(0, n, (B, T, 2, 3), generator=g)
        mask = torch.rand(B, T, generator=g) > 0.4
        for unit in ("batch", "sequence"):
            df, docs, tokens = brute_df([(idx.numpy(), mask.numpy())], n, unit)
            assert document_counts(idx, mask, n, unit).tolist() == df, (B, T, unit)
            assert forward_documents(idx, mask, unit).tolist() == [docs, tokens]


def test_collect_stats_matches_an_independent_recount(micro2):
    taps = {i: Tap() for i in micro2.memory_layers}
    handles = [micro2.memory_layers[i].add_access_hook(taps[i]) for i in taps]
    try:
        stats = {unit: collect_stats(micro2, BATCHES, unit=unit) for unit in ("batch", "sequence")}
    finally:
        for h in handles:
            h.remove()
    n = micro2.memory_config.n_slots
    for unit, s in stats.items():
        assert s.layers == (0, 1) and s.n_slots == n and s.unit == unit
        assert s.protocol == {"source": "custom", "unit": unit, "n_batches": len(BATCHES)}
        for row, block in enumerate(s.layers):
            reads = taps[block].reads[:4] if unit == "batch" else taps[block].reads[4:]
            expected_counts = [sum(c) for c in zip(*(brute_counts(i, m, n) for i, m in reads))]
            df, docs, tokens = brute_df(reads, n, unit)
            assert s.counts[row].tolist() == expected_counts
            assert s.df[row].tolist() == df
            assert (s.n_docs, s.n_tokens) == (docs, tokens)
    assert stats["batch"].n_docs == 3  # the all-padding batch is no document
    assert stats["sequence"].n_docs == 3 + 2 + 0 + 2
    assert stats["batch"].n_tokens == sum(int(b["attention_mask"].sum()) for b in BATCHES)
    assert torch.equal(stats["batch"].counts, stats["sequence"].counts)
    assert not torch.equal(stats["batch"].df, stats["sequence"].df)  # the units differ on these batches
    assert not torch.equal(stats["batch"].counts[0], stats["batch"].counts[1])


def test_collector_hooks_removed_on_exception_and_stats_untouched(micro2):
    stats = SlotStats.empty(micro2)
    with pytest.raises(KeyError):
        with torch.no_grad(), StatsCollector(micro2, stats):
            micro2(**make_batch(5))
            raise KeyError("boom")
    assert all(not layer._access_hooks for layer in micro2.memory_layers.values())
    assert stats == SlotStats.empty(micro2)
    # and a normal exit folds the counts in, also with gradients enabled
    with StatsCollector(micro2, stats) as collector:
        micro2(**make_batch(5))
        collector.flush()
        flushed = stats.counts.clone()
        micro2(**make_batch(5))
    assert all(not layer._access_hooks for layer in micro2.memory_layers.values())
    assert torch.equal(stats.counts, 2 * flushed) and stats.n_docs == 2


def test_collector_refuses_layers_the_model_lacks(micro_model, micro2):
    stats = SlotStats.empty(micro2)  # blocks 0 and 1; micro_model has memory at block 1 only
    with pytest.raises(ConfigError, match=r"^the model has no memory layer 0; its memory layers are \[1\]$"):
        with StatsCollector(micro_model, stats):
            pass
    assert not micro_model.memory_layers[1]._access_hooks


# --------------------------------------------------------------------------- merging


def test_add_equals_concatenated_corpus(micro2):
    for unit in ("batch", "sequence"):
        a = collect_stats(micro2, BATCHES[:2], unit=unit)
        b = collect_stats(micro2, BATCHES[2:], unit=unit)
        whole = collect_stats(micro2, BATCHES, unit=unit)
        assert a + b == whole  # tensors, scalars and protocol
        assert torch.equal((a + b).df, whole.df) and (a + b).n_docs == whole.n_docs
        assert sum([a, b]) == whole
        assert a != whole


def test_merge_is_associative_including_protocol(micro2):
    a = collect_stats(micro2, BATCHES[:1], protocol={"source": "x"})
    b = collect_stats(micro2, BATCHES[1:3], protocol={"source": "y"})
    c = collect_stats(micro2, BATCHES[3:], protocol={"source": "x"})
    left, right = (a + b) + c, a + (b + c)
    assert left == right
    assert left.protocol == {
        "parts": [{"source": "x", "unit": "batch", "n_batches": 2}, {"source": "y", "unit": "batch", "n_batches": 2}],
        "n_batches": 4,
    }
    assert torch.equal(left.counts, collect_stats(micro2, BATCHES).counts)


def test_merge_protocols_associative_over_all_triples():
    pool = [{"s": "x", "n_batches": 1}, {"s": "x", "n_batches": 5}, {"s": "y", "n_batches": 2}, {"s": "z"},
            {"parts": [{"s": "y", "n_batches": 1}, {"s": "w"}], "n_batches": 1}, {}]
    for p, q, r in itertools.product(pool, repeat=3):
        assert merge_protocols(merge_protocols(p, q), r) == merge_protocols(p, merge_protocols(q, r)), (p, q, r)
    assert merge_protocols({"s": "x", "n_batches": 1}, {"s": "x", "n_batches": 5}) == {"s": "x", "n_batches": 6}
    assert merge_protocols({"s": "z"}, {"s": "z"}) == {"s": "z"}


def test_mismatched_stats_refuse_to_merge(micro2, micro_model):
    a = collect_stats(micro2, BATCHES[:1])
    with pytest.raises(StatsError, match="different unit"):
        a + collect_stats(micro2, BATCHES[:1], unit="sequence")
    with pytest.raises(StatsError, match="different model_hash"):
        a + replace(a, model_hash="0123456789abcdef")
    with pytest.raises(StatsError, match="different layers"):
        a + collect_stats(micro_model, BATCHES[:1])
    small = MemoryModel.from_preset("micro", seed=0, n_keys=8, layers=(0, 1))
    with pytest.raises(StatsError, match="different n_slots"):
        a + collect_stats(small, BATCHES[:1])


# --------------------------------------------------------------------------- state and files


def test_validation_and_accessors(micro2):
    s = collect_stats(micro2, BATCHES)
    with pytest.raises(StatsError, match="unknown document unit"):
        replace(s, unit="token")
    with pytest.raises(StatsError, match="int64 tensor of shape"):
        replace(s, counts=s.counts.double())
    with pytest.raises(ConfigError, match=r"^the background has no memory layer 5; its memory layers are \[0, 1\]$"):
        s.idf(5)
    idf = s.idf(1)
    assert idf.dtype == torch.float64
    assert idf.tolist() == pytest.approx([math.log(4 / (d + 1)) for d in s.df[1].tolist()])  # n_docs = 3
    assert s.usage(1) == usage_metrics(s.counts[1])
    assert set(s.usage()) == {0, 1} and s.usage()[0]["dead"] == int((s.counts[0] == 0).sum())


def test_state_dict_round_trip(micro2):
    s = collect_stats(micro2, BATCHES, unit="sequence", protocol={"source": "t", "seed": 3})
    state = s.state_dict()
    t = SlotStats.empty(micro2)
    t.load_state_dict(state)
    assert t == s
    state["counts"][0, 0] += 1  # the loaded stats hold their own tensors
    assert t == s
    with pytest.raises(StatsError, match="format"):
        t.load_state_dict({"counts": s.counts})


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Two saved micro models (different weights, hence different hashes), reloaded."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (0, 1):
        MemoryModel.from_preset("micro", seed=seed).save_pretrained(root / f"m{seed}")
        out.append((root / f"m{seed}", MemoryModel.from_pretrained(root / f"m{seed}")))
    return out


def test_save_load_round_trip_and_other_model_refused(tmp_path, saved_models):
    (_, model), (_, other) = saved_models
    s = collect_stats(model, BATCHES, unit="sequence", protocol={"source": "t"})
    assert s.model_hash == model.model_hash
    path = s.save(tmp_path / "s.safetensors")
    loaded = SlotStats.load(path, model=model)
    assert loaded == s and loaded.counts.dtype == torch.int64
    expected = f"computed with model {model.model_hash} but this model is model {other.model_hash}"
    with pytest.raises(StatsError, match=expected):
        SlotStats.load(path, model=other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temp file left behind


def test_damaged_files_raise_clear_errors(tmp_path, saved_models):
    _, model = saved_models[0]
    good = collect_stats(model, BATCHES).save(tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated": good[: len(good) - 40],
        "header-cut": good[:20],
        "empty": b"",
        "garbage": b"this is not a safetensors file, just some text",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StatsError, match="damaged|not a safetensors"):
            SlotStats.load(tmp_path / name)
    import safetensors.torch

    t = {"counts": torch.zeros(1, 256, dtype=torch.int64), "df": torch.zeros(1, 256, dtype=torch.int64)}
    safetensors.torch.save_file(t, tmp_path / "foreign", metadata={"format": "pt"})
    with pytest.raises(StatsError, match="not an smviz slot-statistics file"):
        SlotStats.load(tmp_path / "foreign")
    tampered = collect_stats(model, BATCHES)
    tampered.df[0, 0] = tampered.n_docs + 1
    tampered.save(tmp_path / "tampered")
    with pytest.raises(StatsError, match="inconsistent"):
        SlotStats.load(tmp_path / "tampered")
    with pytest.raises(StatsError, match="does not exist"):
        SlotStats.load(tmp_path / "absent")


def test_stored_in_model_dir_keeps_the_model_hash(saved_models):
    (directory, model), (other_dir, other) = saved_models
    s = collect_stats(model, BATCHES)
    path = s.save_to_model_dir(directory)
    assert path == directory / STATS_FILE
    reloaded = MemoryModel.from_pretrained(directory)  # verification ignores the extra file
    assert reloaded.model_hash == model.model_hash
    assert SlotStats.load_for_model(directory) == s
    assert SlotStats.load_for_model(directory, reloaded) == s
    with pytest.raises(StatsError, match="computed with model"):
        SlotStats.load_for_model(directory, other)
    # stats of one model are refused by another's directory, which stays as it was
    before = sorted(p.name for p in other_dir.iterdir())
    with pytest.raises(StatsError, match="computed with model"):
        s.save_to_model_dir(other_dir)
    assert sorted(p.name for p in other_dir.iterdir()) == before
    with pytest.raises(StatsError, match="smviz stats --model"):
        SlotStats.load_for_model(other_dir)


def test_identical_statistics_give_identical_files(tmp_path, saved_models):
    """The header is written in sorted order: the same statistics, however their protocol's keys were
    inserted, give the same bytes (safetensors alone writes metadata in a hash map's varying order)."""
    import hashlib

    _, model = saved_models[0]
    s = collect_stats(model, BATCHES, protocol={"source": "t", "seed": 3, "batch_size": 4})
    t = replace(s, protocol=dict(reversed(list(s.protocol.items()))))  # the same keys, inserted the other way round
    assert s == t and list(t.protocol) != list(s.protocol)
    files = [s.save(tmp_path / "a.safetensors"), t.save(tmp_path / "b.safetensors")]
    data = {s.to_bytes() for _ in range(10)} | {t.to_bytes() for _ in range(10)} | {f.read_bytes() for f in files}
    assert len(data) == 1
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 1
    assert SlotStats.load(files[1]) == s  # still a safetensors file smviz (and safetensors) reads


# --------------------------------------------------------------------------- TF-IDF


def test_tfidf_by_hand():
    counts = torch.tensor([3, 1, 0, 0])
    df = torch.tensor([0, 2, 1, 4])
    # c/Σc = (0.75, 0.25, 0, 0); log(5/1) = 1.6094379, log(5/3) = 0.5108256
    got = tfidf(counts, df, 4)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([1.2070784, 0.1277064, 0.0, 0.0], abs=1e-7)
    assert tfidf(counts, df, 4, dtype=torch.float32).dtype == torch.float32
    assert tfidf(torch.zeros(4, dtype=torch.long), df, 4).tolist() == [0.0] * 4


def _stats_with(df: list[int], n_docs: int) -> SlotStats:
    n = len(df)
    d = torch.tensor([df], dtype=torch.int64)
    return SlotStats((1,), n, "batch", (d > 0).long(), d, n_docs=n_docs)


def test_top_slots_by_hand_with_ties():
    stats = _stats_with([1, 1, 2, 0, 3, 2], n_docs=3)
    counts = torch.tensor([2, 2, 1, 0, 2, 1])
    # total 8; slot 0 = slot 1 = 0.25·ln 2 = 0.1732868; slot 2 = slot 5 = 0.125·ln(4/3) = 0.0359603;
    # slot 4 = 0.25·ln 1 = 0; slot 3 was not read (its high idf must not matter)
    ids, scores = top_slots(counts, stats, 1, 3)
    assert ids.tolist() == [0, 1, 2]
    assert scores.tolist() == pytest.approx([0.1732868, 0.1732868, 0.0359603], abs=1e-7)
    ids, scores = top_slots(counts, stats, 1, 10)
    assert ids.tolist() == [0, 1, 2, 5, 4]  # every read slot, ties by lower id
    assert top_slots(counts, stats, 1, 0)[0].tolist() == []
    with pytest.raises(StatsError):
        top_slots(counts, stats, 1, -1)
    with pytest.raises(ConfigError, match=r"^the background has no memory layer 0; its memory layers are \[1\]$"):
        top_slots(counts, stats, 0, 3)


def test_top_slots_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 40))
        n_docs = int(rng.integers(1, 30))
        df = rng.integers(0, n_docs + 1, size=n).tolist()
        counts = rng.integers(0, 4, size=n) * (rng.random(n) < 0.6)
        stats = _stats_with(df, n_docs)
        total = int(counts.sum())
        scores = {i: int(c) / total * math.log((n_docs + 1) / (df[i] + 1)) for i, c in enumerate(counts) if c > 0}
        ranked = sorted(scores, key=lambda i: (-round(scores[i], 12), i))
        t = int(rng.integers(0, n + 3))
        ids, got = top_slots(torch.from_numpy(counts), stats, 1, t)
        assert ids.tolist() == ranked[:t], trial
        assert got.tolist() == pytest.approx([scores[i] for i in ranked[:t]], rel=1e-12)


# --------------------------------------------------------------------------- the background run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A micro workspace: small world and corpus, a 512-token tokenizer, model 'm' and its pretraining
    config (seq_len 128 — world rows then hold padding — and batch size 4)."""
    from smviz.data.corpus import write_corpus
    from smviz.data.tokenizer import train_tokenizer
    from smviz.data.world import WorldConfig
    from smviz.io import write_json_atomic
    from smviz.workspace.layout import CORPUS_FILES
    from smviz.workspace.stages import build_data, load_data
    from smviz.train.pretrain import PretrainConfig, build_model
    from smviz.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("ws"))
    build_data(ws.data, WorldConfig(n_known=6, n_bio_only=3, n_new=2))
    write_corpus(ws.data / CORPUS_FILES["train"], load_data(ws.data).corpus_train[:150])  # small: fast streams
    data = load_data(ws.data)
    tokenizer = train_tokenizer([a.text for a in data.corpus_train] + data.training_world_texts(copies=4, seed=0), vocab_size=512)
    tokenizer.save_pretrained(ws.tokenizer)
    config = PretrainConfig(preset="micro", seq_len=128, batch_size=4)
    write_json_atomic(ws.pretrain_run("m") / "config.json", {"format": "smviz-pretrain/1", "config": config.to_dict()})
    build_model(config, tokenizer).save_pretrained(ws.model("m"))
    return ws


def _run(ws, out, **kw):
    return background_stats(ws, ws.model("m"), device="cpu", progress=False, out=out, **kw)


def test_background_uses_the_pretraining_mixture(workspace, tmp_path):
    from smviz.workspace.stages import load_data, make_stream
    from smviz.train.pretrain import PretrainConfig

    ws = workspace
    stats = background_stats(None, ws.model("m"), n_batches=5, device="cpu", progress=False)  # ws inferred
    assert (ws.model("m") / STATS_FILE).is_file()
    model = MemoryModel.from_pretrained(ws.model("m"))
    assert SlotStats.load_for_model(ws.model("m"), model) == stats
    p = stats.protocol
    assert (p["batch_size"], p["seq_len"], p["pretrain_run"], p["n_batches"]) == (4, 128, "m", 5)
    assert p["step_offset"] == BACKGROUND_STEP_OFFSET and "world_size" not in p
    # the same batches, built independently and counted by collect_stats
    config = PretrainConfig(preset="micro", seq_len=128, batch_size=4)
    stream = make_stream(load_data(ws.data), model.tokenizer, config)
    batches = [stream.batch(BACKGROUND_STEP_OFFSET + i) for i in range(5)]
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)  # padding present
    ref = collect_stats(model, batches)
    assert torch.equal(stats.counts, ref.counts) and torch.equal(stats.df, ref.df)
    assert (stats.n_docs, stats.n_tokens) == (5, sum(int(b["attention_mask"].sum()) for b in batches))
    # batch size and sequence length can be overridden
    other = _run(ws, tmp_path / "o.safetensors", n_batches=2, batch_size=3, seq_len=8)
    assert (other.protocol["batch_size"], other.protocol["seq_len"]) == (3, 8)
    assert other.n_tokens <= 2 * 3 * 8


def test_control_mixtures_count_corpus_rows_only_or_no_known_persons_text(workspace, tmp_path):
    from smviz.data.tokenizer import pack_documents
    from smviz.train.pretrain import PretrainConfig
    from smviz.workspace.stages import load_data, make_stream
    from smviz.workspace.stages.stats import MIXTURES

    ws = workspace
    model = MemoryModel.from_pretrained(ws.model("m"))
    data = load_data(ws.data)
    corpus = _run(ws, tmp_path / "corpus.safetensors", n_batches=4, mixture="corpus")
    assert corpus.protocol["mixture"] == "corpus" and corpus.protocol["fact_share"] == 0.0
    # brute force: the same step-seeded draws of packed corpus rows, counted by collect_stats
    rows = pack_documents(model.tokenizer, [a.text for a in data.corpus_train], 128)
    batches = []
    for i in range(4):
        g = torch.Generator().manual_seed(BACKGROUND_STEP_OFFSET + i)  # seed 0: PretrainStream's generator
        ids = rows[torch.randint(len(rows), (4,), generator=g)]
        batches.append({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    ref = collect_stats(model, batches)
    assert torch.equal(corpus.counts, ref.counts) and torch.equal(corpus.df, ref.df)
    # no-known: the known people's names are in no batch; the bio-only people's are
    no_known = _run(ws, tmp_path / "nk.safetensors", n_batches=3, mixture="no-known")
    assert no_known.protocol["mixture"] == "no-known" and set(MIXTURES) == {"pretraining", "corpus", "no-known"}
    config = PretrainConfig(preset="micro", seq_len=128, batch_size=4)
    world = dataclasses.replace(data.world, known=[])
    stream = make_stream(dataclasses.replace(data, world=world), model.tokenizer, config)
    text = model.tokenizer.decode(stream.world_ids.flatten())
    assert not any(f.subject in text for f in data.world.known) and all(f.subject in text for f in data.world.bio_only)
    ref = collect_stats(model, [stream.batch(BACKGROUND_STEP_OFFSET + i) for i in range(3)])
    assert torch.equal(no_known.counts, ref.counts)
    with pytest.raises(ConfigError, match="unknown background mixture 'dclm'"):
        _run(ws, tmp_path / "x.safetensors", n_batches=1, mixture="dclm")
    assert not (tmp_path / "x.safetensors").exists()
    # the command line: smviz stats --mixture corpus --out FILE
    out = tmp_path / "cli-corpus.safetensors"
    assert main(["stats", "--model", str(ws.model("m")), "--workspace", str(ws.root), "--batches", "4", "--mixture",
                 "corpus", "--out", str(out), "--device", "cpu"]) == 0
    assert SlotStats.load(out, model) == corpus


def test_interrupted_run_resumes_to_the_uninterrupted_result(workspace, tmp_path, caplog):
    ws = workspace
    whole = _run(ws, tmp_path / "a.safetensors", n_batches=7, checkpoint_every=2)
    assert not partial_path(tmp_path / "a.safetensors").exists()
    out = tmp_path / "b.safetensors"
    assert _run(ws, out, n_batches=7, checkpoint_every=2, stop_after=3) is None
    assert not out.exists()
    partial = partial_path(out)
    assert partial.name == "b.partial-r0of1.safetensors" and partial.is_file()
    with pytest.raises(StatsError, match="partial state of an interrupted run"):
        SlotStats.load(partial)
    with caplog.at_level(logging.INFO, logger="smviz.stats"):
        resumed = _run(ws, out, n_batches=7, checkpoint_every=2)
    assert "at batch 3" in caplog.text
    assert resumed == whole and SlotStats.load(out) == whole
    assert not partial.exists()


def test_partial_of_other_settings_restarts(workspace, tmp_path, caplog):
    ws = workspace
    out = tmp_path / "c.safetensors"
    assert _run(ws, out, n_batches=4, unit="sequence", stop_after=2) is None
    with caplog.at_level(logging.INFO, logger="smviz.stats"):
        stats = _run(ws, out, n_batches=4)
    assert "other settings; starting over" in caplog.text
    assert stats == _run(ws, tmp_path / "d.safetensors", n_batches=4)
    assert stats.unit == "batch" and not partial_path(out).exists()


def test_cli_bad_input_exits_2_and_writes_nothing(workspace, tmp_path, capsys):
    ws = workspace
    before = sorted(p.name for p in ws.model("m").iterdir())
    out = tmp_path / "s.safetensors"
    assert main(["stats", "--model", str(tmp_path / "missing"), "--workspace", str(ws.root), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["stats", "--model", str(ws.model("m")), "--batches", "0", "--out", str(out), "--device", "cpu"]) == 2
    assert "n_batches must be >= 1" in capsys.readouterr().err
    assert main(["stats", "--model", str(ws.model("m")), "--workspace", str(tmp_path / "nows"), "--out", str(out),
                 "--device", "cpu"]) == 2
    assert "holds no fact world" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["stats", "--model", str(ws.model("m")), "--unit", "token"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in ws.model("m").iterdir()) == before


def test_two_torchrun_processes_equal_one_process_exactly(workspace, tmp_path):
    ws = workspace
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["stats", "--model", str(ws.model("m")), "--unit", "sequence", "--batches", "7", "--batch-size", "3",
            "--device", "cpu", "--json"]
    single = subprocess.run([sys.executable, "-m", "smviz", *args, "--out", str(tmp_path / "one.safetensors")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    info = json.loads(single.stdout)
    assert info["unit"] == "sequence" and set(info["usage"]) == {"1"} and "dead" in info["usage"]["1"]
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "smviz", *args,
         "--out", str(tmp_path / "two.safetensors")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert dist.returncode == 0, dist.stderr
    one, two = SlotStats.load(tmp_path / "one.safetensors"), SlotStats.load(tmp_path / "two.safetensors")
    assert torch.equal(one.counts, two.counts) and torch.equal(one.df, two.df)
    assert (one.n_docs, one.n_tokens) == (two.n_docs, two.n_tokens)
    assert one == two  # protocol and model hash too
    assert one.n_docs > 0 and json.loads(dist.stdout)["n_docs"] == one.n_docs  # only rank 0 printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]  # partials removed
