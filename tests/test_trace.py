"""Traces on disk and the slot index: exact round trips, `contexts` and `slots_for` against brute-force
scans of the accesses table, refusal of damaged files and of other models, and the index cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from smviz.data.corpus import load_articles
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import ConfigError, TraceError
from smviz.model import MemoryModel
from smviz.record import AccessRecorder, Document, record_texts
from smviz.trace import SlotIndex, Trace
from smviz.usage import usage_metrics


@pytest.fixture(scope="module")
def setting(tmp_path_factory, device):
    """A saved micro model with a tokenizer and a multi-shard trace of 30 short articles."""
    root = tmp_path_factory.mktemp("trace")
    articles = load_articles()[:30]
    tokenizer = train_tokenizer([a.text for a in articles], vocab_size=400)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    model.save_pretrained(root / "m")
    model = MemoryModel.from_pretrained(root / "m", device=device)
    docs = [Document(f"art{i}", a.text[:500]) for i, a in enumerate(articles)]
    trace = record_texts(model, docs, root / "t", context=48, batch_size=8, shard_tokens=1000, progress=False)
    return root, model, docs, trace


def brute_contexts(trace: Trace, slot: int, n: int) -> pd.DataFrame:
    acc = trace.to_pandas()
    hits = acc[acc.slot == slot]
    per_token = hits.groupby("token").agg(weight=("weight", lambda w: w.astype(np.float64).sum()), reads=("weight", "size"))
    return per_token.reset_index().sort_values(["weight", "token"], ascending=[False, True]).head(n)


def test_on_disk_trace_round_trips_exactly(setting, tmp_path):
    _, model, _, _ = setting
    ids = torch.randint(1, 400, (3, 10), device=model.lm.device)
    mask = torch.ones(3, 10, dtype=torch.long, device=model.lm.device)
    mask[1, 6:] = 0
    with torch.no_grad(), AccessRecorder(model) as rec:
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:2, :4])
    memory = rec.trace()
    loaded = memory.save(tmp_path / "t")
    again = Trace.load(tmp_path / "t")
    for t in (loaded, again):
        assert t.tokens.equals(memory.tokens) and t.accesses.equals(memory.accesses)
        assert t.n_docs == memory.n_docs == 5 and t.n_tokens == 10 + 6 + 10 + 4 + 4 and t.layers == [1]
        assert t.model_hash == model.model_hash and t.meta["memory"] == model.memory_config.to_dict()
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert set(meta["columns"]["accesses"]) == {"token", "layer", "head", "rank", "slot", "weight"}
    assert meta["counts"] == {"docs": 5, "tokens": 34, "accesses": 34 * 8}


def test_shards_continue_rows_and_usage_counts_every_read(setting):
    _, _, docs, trace = setting
    assert len(trace.meta["shards"]) >= 3
    rows = np.concatenate([t.column("row").to_numpy() for t, _ in trace.iter_shards()])
    assert np.array_equal(rows, np.arange(trace.n_tokens))
    acc = trace.to_pandas()
    assert acc["token"].is_monotonic_increasing and len(acc) == trace.n_accesses
    counts = np.bincount(acc["slot"], minlength=trace.n_slots)
    assert np.array_equal(trace.slot_counts(), counts)
    assert trace.usage() == usage_metrics(torch.from_numpy(counts))
    tokens = trace.to_pandas("tokens")
    assert acc["doc_id"].iloc[0] == "art0" and (acc["text"] == tokens["text"].to_numpy()[acc["token"]]).all()


def test_contexts_agree_with_a_brute_force_scan(setting):
    _, _, _, trace = setting
    index = trace.slot_index()
    tokens = trace.to_pandas("tokens")
    acc = trace.to_pandas()
    busiest = acc["slot"].value_counts().index[:3].tolist()
    rare = acc["slot"].value_counts().index[-2:].tolist()
    for slot in busiest + rare:
        got = index.contexts(slot, n=7, window=3)
        expected = brute_contexts(trace, slot, 7)
        assert got["row"].tolist() == expected["token"].tolist()
        np.testing.assert_allclose(got["weight"], expected["weight"], rtol=1e-12)
        assert got["reads"].tolist() == expected["reads"].tolist()
        assert index.count(slot) == int((acc.slot == slot).sum())
        for r in got.itertuples():
            doc_rows = tokens[tokens.doc == r.doc]
            pos = doc_rows["position"].to_numpy()
            shown = doc_rows[(pos >= r.position - 3) & (pos <= r.position + 3)]["text"].tolist()
            assert r.window == shown and r.window[r.focus] == r.token
            assert r.left + r.token + r.right == "".join(shown)
            assert r.doc_id == f"art{r.doc}"
    unused = sorted(set(range(trace.n_slots)) - set(acc["slot"]))
    if unused:
        assert index.contexts(unused[0]).empty


def test_slots_for_agrees_with_a_brute_force_filter(setting):
    _, _, _, trace = setting
    index = trace.slot_index()
    acc = trace.to_pandas()
    expected = acc[(acc.doc == 4) & (acc.position >= 2) & (acc.position < 5)]
    for doc in (4, "art4"):
        got = index.slots_for(doc, 2, 5)
        assert got["slot"].tolist() == expected["slot"].tolist()
        assert got["weight"].tolist() == expected["weight"].tolist()
        assert got["position"].tolist() == expected["position"].tolist()
        assert got["token"].tolist() == expected["text"].tolist()


def test_index_cache_is_reused_and_rebuilt_when_damaged(setting, caplog):
    root, _, _, _ = setting
    built = Trace.load(root / "t").slot_index()
    assert (root / "t" / "index" / "index.json").is_file()
    cached = SlotIndex.for_trace(Trace.load(root / "t"))
    assert isinstance(cached.rows, np.memmap)
    for name in ("offsets", "rows", "weights", "heads"):
        assert np.array_equal(getattr(cached, name), getattr(built, name))
    damaged = root / "t" / "index" / "rows.npy"
    damaged.unlink()  # a new file: writing into the mapped one in place would pull the pages from under `cached`
    damaged.write_bytes(b"garbage")
    rebuilt = SlotIndex.for_trace(Trace.load(root / "t"))
    assert "rebuilding" in caplog.text
    assert np.array_equal(rebuilt.rows, built.rows)


def test_queries_out_of_range_are_refused(setting):
    _, _, _, trace = setting
    index = trace.slot_index()
    for bad in (-1, trace.n_slots, 2**40, "7"):
        with pytest.raises(TraceError, match="out of range"):
            index.contexts(bad)
    with pytest.raises(ConfigError, match=r"this trace has no memory layer 0; its memory layers are \[1\]"):
        index.contexts(3, layer=0)
    with pytest.raises(ConfigError, match="no memory layer 0"):
        trace.slot_counts(0)
    with pytest.raises(TraceError, match="out of range"):
        index.slots_for(trace.n_docs, 0, 1)
    with pytest.raises(TraceError, match="no document"):
        index.slots_for("nope", 0, 1)
    with pytest.raises(TraceError, match="holds none"):
        index.slots_for(0, 10_000, 10_001)
    with pytest.raises(TraceError, match="empty span"):
        index.slots_for(0, 3, 3)


def copy_trace(setting, tmp_path):
    root = setting[0]
    shutil.copytree(root / "t", tmp_path / "t", ignore=shutil.ignore_patterns("index"))
    return tmp_path / "t"


def test_truncated_shard_is_refused(setting, tmp_path):
    path = copy_trace(setting, tmp_path)
    shard = path / "accesses" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TraceError, match="truncated"):
        Trace.load(path)


def test_corrupted_shard_is_refused(setting, tmp_path):
    path = copy_trace(setting, tmp_path)
    shard = path / "tokens" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="corrupted"):
        Trace.load(path)
    # without the hash check the damage still surfaces as a TraceError (or reads back different data)
    shard.write_bytes(b"\0" * len(data))
    with pytest.raises(TraceError, match="cannot be read"):
        Trace.load(path, verify=False).tokens


def test_missing_pieces_are_refused(setting, tmp_path):
    path = copy_trace(setting, tmp_path)
    (path / "accesses" / "part-00000.parquet").unlink()
    with pytest.raises(TraceError, match="missing"):
        Trace.load(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(TraceError, match="meta.json"):
        Trace.load(path)
    with pytest.raises(TraceError, match="no trace"):
        Trace.load(tmp_path / "absent")


def test_check_model_refuses_other_models(setting, tmp_path):
    root, model, _, trace = setting
    trace.check_model(model)
    other = MemoryModel.from_preset("micro", seed=1, vocab_size=len(model.tokenizer))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(TraceError, match="recorded with model"):
        trace.check_model(MemoryModel.from_pretrained(tmp_path / "other"))
    with pytest.raises(TraceError, match="recorded with model"):
        trace.check_model(MemoryModel.from_preset("micro", seed=0, vocab_size=len(model.tokenizer)))  # unsaved: no hash
    wider = MemoryModel.from_preset("micro", seed=0, vocab_size=len(model.tokenizer), knn=8)
    with pytest.raises(TraceError, match=r"different memory config \(differs in \['knn'\]\)"):
        trace.check_model(wider)


def test_the_duckdb_index_answers_exactly_as_the_in_memory_one(setting, monkeypatch):
    """Issue 19: the out-of-core index (DuckDB over Parquet) gives the in-memory SlotIndex's answers to
    every query, on the same multi-shard trace; Trace.slot_index takes it when the in-memory index
    would not fit the budget (SMVIZ_INDEX_MEMORY), and builds it once."""
    from smviz.trace.duck import BY_SLOT, DuckSlotIndex

    root, _, docs, trace = setting
    memory = SlotIndex.build(trace)
    monkeypatch.setenv("SMVIZ_INDEX_MEMORY", "0")
    monkeypatch.setattr("smviz.trace.duck.ROW_GROUP", 2048)  # small groups: popular slots span several
    monkeypatch.setattr("smviz.trace.duck.SCAN_ROWS", 1000)  # and readers split across the counting batches
    monkeypatch.setattr("smviz.trace.duck.HEAVY", 300)  # the most read slots keep their top readers,
    monkeypatch.setattr("smviz.trace.duck.TOP_KEEP", 5)  # and contexts of more than 5 reads them all
    fresh = Trace.load(root / "t")
    duck = fresh.slot_index()
    assert isinstance(duck, DuckSlotIndex) and len(trace.meta["shards"]) >= 3
    layer = trace.layers[0]
    assert np.array_equal(duck.slot_counts(), memory.slot_counts())
    assert np.array_equal(duck.reading_tokens(), memory.reading_tokens())
    counts = memory.slot_counts()
    assert duck.by_slot.metadata.num_row_groups >= 4 and duck._groups[-1] == trace.n_accesses
    offsets = np.asarray(duck.offsets)
    crossing = np.flatnonzero(np.searchsorted(duck._groups, offsets[1:], "left")
                              - np.searchsorted(duck._groups, offsets[:-1], "right") > 0)  # reads in two row groups
    assert len(crossing) >= 3
    rng = np.random.default_rng(0)
    slots = np.concatenate([np.argsort(-counts, kind="stable")[:20], rng.choice(trace.n_slots, 30, replace=False),
                            crossing, np.flatnonzero(counts == 0)[:3]])  # unread slots, where the micro memory has any
    for slot in map(int, slots):
        assert duck.count(slot, layer) == memory.count(slot, layer)
        for query in ("slot_weights", "slot_rows", "slot_heads", "slot_ranks"):
            a, b = getattr(duck, query)(slot, layer), getattr(memory, query)(slot, layer)
            assert a.dtype == b.dtype and np.array_equal(a, b), (query, slot)
        for x, y in zip(duck.readers(slot), memory.readers(slot)):
            assert np.array_equal(x, y)
    heavy = np.flatnonzero(counts > 300)
    assert len(heavy) >= 3 and np.array_equal(np.flatnonzero(np.diff(duck._top_offsets)), heavy)
    for slot in map(int, np.concatenate([slots[:5], heavy[:5]])):
        for n in (3, 5, 7):
            pd.testing.assert_frame_equal(duck.contexts(slot, n=n, window=3), memory.contexts(slot, n=n, window=3))
    for doc, (start, end) in ((0, (0, 5)), ("art3", (2, 40)), (len(docs) - 1, (0, 10_000))):
        pd.testing.assert_frame_equal(duck.slots_for(doc, start, end), memory.slots_for(doc, start, end))
    rows = rng.choice(trace.n_tokens, 25, replace=False)
    pd.testing.assert_frame_equal(duck.reads_of_rows(rows), memory.reads_of_rows(rows))
    pd.testing.assert_frame_equal(duck.reads_of_rows([]), memory.reads_of_rows([]))
    with pytest.raises(TraceError, match="out of range"):
        duck.slot_weights(trace.n_slots)
    built = (root / "t" / "index" / "duck" / BY_SLOT).stat().st_mtime_ns
    assert isinstance(Trace.load(root / "t").slot_index(), DuckSlotIndex)
    assert (root / "t" / "index" / "duck" / BY_SLOT).stat().st_mtime_ns == built  # reused, not built again
    monkeypatch.setenv("SMVIZ_INDEX_MEMORY", "a lot")
    with pytest.raises(ConfigError, match="SMVIZ_INDEX_MEMORY"):
        Trace.load(root / "t").slot_index()


def test_run_sums_and_the_top_n_equal_a_brute_force_sort_ties_included():
    """`sum_runs` and `most_weight` (the partition before the sort) against pandas and a full lexsort, on
    weights with many ties, so the n-th place is often tied."""
    from smviz.trace.index import most_weight, sum_runs

    rng = np.random.default_rng(3)
    rows = np.sort(rng.integers(0, 400, 3000)).astype(np.int32)
    weights = (rng.integers(0, 6, 3000) / 8).astype(np.float16)
    got_rows, got_weight, got_reads = sum_runs(rows, weights)
    brute = pd.DataFrame({"r": rows, "w": weights.astype(np.float64)}).groupby("r")["w"].agg(["sum", "size"])
    assert np.array_equal(got_rows, brute.index) and np.array_equal(got_weight, brute["sum"]) and np.array_equal(got_reads, brute["size"])
    for n in (1, 7, 50, len(got_rows), len(got_rows) + 5):
        order = np.lexsort((got_rows, -got_weight))[:n]
        for a, b in zip(most_weight(got_rows, got_weight, got_reads, n), (got_rows[order], got_weight[order], got_reads[order])):
            assert np.array_equal(a, b), n
    assert all(len(x) == 0 for x in sum_runs(rows[:0], weights[:0]) + most_weight(rows[:0].astype(np.int64), np.zeros(0), np.zeros(0, np.int64), 3))
