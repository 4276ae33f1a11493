"""Streamed per-slot summaries (issue 19): recorded with the trace, they equal what the full accesses
give — counts, distinct tokens and documents, weight sums and maxima by brute force over the accesses
table, top contexts equal to `SlotIndex.contexts` — and a summary-only trace answers what a summary can
and refuses the rest with a clear error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from smviz.data.corpus import load_articles
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import ConfigError, TraceError
from smviz.model import MemoryModel
from smviz.record import Document, record_texts
from smviz.trace import SlotIndex, Trace
from smviz.trace.summary import SummarySlotIndex

KEEP = 5


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    articles = load_articles()[:24]
    tokenizer = train_tokenizer([a.text for a in articles], vocab_size=400)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer), layers=(0, 1))
    model.tokenizer = tokenizer
    model.save_pretrained(root / "m")
    model = MemoryModel.from_pretrained(root / "m")
    docs = [Document(f"a{i}", a.text[:400]) for i, a in enumerate(articles)]
    kw = dict(context=32, batch_size=8, shard_tokens=300, progress=False)
    full = record_texts(model, docs, root / "full", summary=KEEP, **kw)
    only = record_texts(model, docs, root / "only", summary=KEEP, summary_only=True, **kw)
    return model, docs, full, only


def test_summaries_equal_brute_force_over_the_accesses(traces):
    _, _, full, _ = traces
    assert len(full.meta["shards"]) >= 4 and full.layers == [0, 1]
    summary, index = full.slot_summary(), SlotIndex.build(full)
    acc = full.to_pandas()
    acc["weight"] = acc["weight"].astype(np.float64)
    for layer in full.layers:
        assert np.array_equal(summary.slot_counts(layer), index.slot_counts(layer))
        assert np.array_equal(summary.reading_tokens(layer), index.reading_tokens(layer))
        mine = acc[acc.layer == layer]
        brute = mine.groupby("slot").agg(reads=("weight", "size"), weight_sum=("weight", "sum"), weight_max=("weight", "max"),
                                         docs=("doc", "nunique"), tokens=("token", "nunique"))
        for slot, row in brute.sample(40, random_state=0).iterrows():
            got = summary.slot_summary(int(slot), layer)
            assert (got["reads"], got["docs"], got["tokens"]) == (row.reads, row.docs, row.tokens)
            assert got["weight_sum"] == pytest.approx(row.weight_sum, rel=1e-12) and got["weight_max"] == row.weight_max
        read = np.flatnonzero(index.slot_counts(layer))
        for slot in map(int, read[:: max(1, len(read) // 60)]):
            pd.testing.assert_frame_equal(summary.contexts(slot, n=KEEP, window=3, layer=layer),
                                          index.contexts(slot, n=KEEP, window=3, layer=layer))
            sample = summary.sample_contexts(slot, window=2, layer=layer)
            rows, weight, _ = index.readers(slot, layer)
            assert len(sample) == min(KEEP, len(rows)) and sample["row"].is_unique
            assert set(sample["row"]) <= set(rows.tolist())
            assert np.array_equal(sample["weight"].to_numpy(), weight[np.searchsorted(rows, sample["row"].to_numpy())])
    busy = int(np.argmax(summary.reading_tokens(0)))
    with pytest.raises(TraceError, match=f"top {KEEP} contexts"):
        summary.contexts(busy, n=KEEP + 1, layer=0)


def test_the_sample_is_uniform_over_a_slots_readers(traces):
    """Over every read slot with more readers than the sample holds, each reader's chance of being kept is
    KEEP / readers: the kept share of early, middle and late readers (by row) is the same, and the
    total matches KEEP per slot (a top-weight or first-come rule would fail the split)."""
    _, _, full, _ = traces
    summary, index = full.slot_summary(), SlotIndex.build(full)
    thirds, expected = np.zeros(3), 0.0
    for slot in np.flatnonzero(index.reading_tokens(0) > 3 * KEEP):
        rows = index.readers(int(slot), 0)[0]
        kept = summary.sample_contexts(int(slot), window=0, layer=0)["row"].to_numpy()
        thirds += np.bincount(np.minimum(3 * np.searchsorted(rows, kept) // len(rows), 2), minlength=3)
        expected += KEEP / 3
    assert expected > 300
    assert np.all(np.abs(thirds - expected) < 4 * np.sqrt(expected)), (thirds, expected)


def test_a_summary_only_trace_answers_from_its_summary_and_refuses_the_rest(traces, tmp_path):
    model, docs, full, only = traces
    assert only.summary_only and isinstance(only.slot_index(), SummarySlotIndex)
    assert (only.path / "summary" / "contexts.parquet").read_bytes() == (full.path / "summary" / "contexts.parquet").read_bytes()
    assert (only.path / "summary" / "slots.parquet").read_bytes() == (full.path / "summary" / "slots.parquet").read_bytes()
    assert only.n_tokens == full.n_tokens and only.meta["summary"]["reads"] == full.n_accesses
    assert only.usage(0) == full.usage(0)
    disk = {t.path.name: sum(f.stat().st_size for f in (t.path / "accesses").iterdir()) for t in (full, only)}
    assert disk["only"] < disk["full"] / 10  # empty shards: Parquet footers only
    index = only.slot_index()
    slot = int(np.argmax(index.slot_counts(0)))
    assert index.count(slot, 0) == full.slot_index().count(slot, 0)
    pd.testing.assert_frame_equal(index.contexts(slot, n=3, layer=0), full.slot_index().contexts(slot, n=3, layer=0))
    for call, what in ((lambda: index.slot_weights(slot, 0), "reads of a slot"), (lambda: index.readers(slot, 0), "every reader"),
                       (lambda: index.slots_for(0, 0, 5), "token span"), (lambda: index.reads_of_rows([0]), "token rows"),
                       (lambda: only.accesses, "--summary-only"), (lambda: only.to_pandas(), "--summary-only")):
        with pytest.raises(TraceError, match=what):
            call()
    with pytest.raises(TraceError, match="no slot summaries"):
        record_texts(model, docs[:2], tmp_path / "plain", progress=False).slot_summary()
    with pytest.raises(ConfigError, match="summary must be >= 1"):
        record_texts(model, docs[:2], tmp_path / "bad", summary=0, progress=False)
    assert not (tmp_path / "bad").exists()
    (only.path / "summary" / "slots.parquet").write_bytes(b"damaged")
    with pytest.raises(TraceError, match="missing, truncated or altered"):
        Trace.load(only.path)
