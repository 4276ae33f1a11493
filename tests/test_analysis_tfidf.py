"""TF-IDF views (smviz.analysis.tfidf): a hand-computed table (math.log; its ranking is the one
`smviz.stats.rank`, tested in test_ranking.py), a second background, counts from a hand-built trace and from a micro-model forward (against a numpy count of the hooked reads), what a
run step stored, and bad input refused."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from smviz.analysis.runs import Run
from smviz.errors import AnalysisError, ConfigError
from smviz.analysis.tfidf import (
    TABLE_COLUMNS,
    batch_slot_counts,
    step_table,
    tfidf_table,
    trace_slot_counts,
)
from smviz.stats import SlotStats
from smviz.trace import Trace
from smviz.train import FinetuneConfig
from smviz.train.rundir import RUN_FORMAT, FinetuneRunDir


def make_stats(df: list[int] | np.ndarray, n_docs: int, layer: int = 1) -> SlotStats:
    df_t = torch.as_tensor(np.asarray(df), dtype=torch.int64)[None]
    return SlotStats((layer,), df_t.shape[1], "batch", df_t * 3, df_t.clone(), n_docs=n_docs, n_tokens=100)


# --------------------------------------------------------------------------- the table


def test_hand_computed_table():
    df = [0, 3, 2, 0, 5, 2, 0, 1]
    counts = [0, 2, 1, 0, 4, 1, 0, 2]
    stats = make_stats(df, n_docs=5)
    out = tfidf_table(np.array(counts), stats, 1, top_t=3)
    assert list(out.columns) == list(TABLE_COLUMNS)
    total = sum(counts)
    expected = []
    for s, c in enumerate(counts):
        if c:
            tf = c / total
            i = math.log((5 + 1) / (df[s] + 1))
            expected.append((s, c, tf, df[s], i, tf * i))
    expected.sort(key=lambda r: (-r[5], r[0]))  # score descending, ties to the lower id
    assert out["slot"].tolist() == [r[0] for r in expected]
    assert out["count"].tolist() == [r[1] for r in expected]
    np.testing.assert_allclose(out["tf"], [r[2] for r in expected], rtol=1e-15)
    assert out["df"].tolist() == [r[3] for r in expected]
    np.testing.assert_allclose(out["idf"], [r[4] for r in expected], rtol=1e-14)
    np.testing.assert_allclose(out["score"], [r[5] for r in expected], rtol=1e-14)
    assert out["rank"].tolist() == [1, 2, 3, 4, 5]
    assert out["selected"].tolist() == [True, True, True, False, False]
    # slots 2 and 5 tie exactly (count 1, df 2): the lower id ranks first
    assert out["slot"].tolist().index(2) < out["slot"].tolist().index(5)
    assert out.loc[out.slot == 2, "score"].item() == out.loc[out.slot == 5, "score"].item()
    # explicit selection and no selection
    assert tfidf_table(counts, stats, 1, selected=[4, 5])["selected"].tolist() == [s in (4, 5) for s in out["slot"]]
    assert not tfidf_table(counts, stats, 1)["selected"].any()


def test_other_background():
    rng = np.random.default_rng(5)
    n = 64
    stats, other = make_stats(rng.integers(0, 5, n), 9), make_stats(rng.integers(0, 5, n), 4)
    counts = rng.integers(0, 4, n)
    out = tfidf_table(counts, stats, 1, other=other)
    alone = tfidf_table(counts, other, 1).set_index("slot")
    mine = out.set_index("slot")
    assert (mine["rank_other"] == alone.loc[mine.index, "rank"]).all()
    assert np.array_equal(mine["score_other"].to_numpy(), alone.loc[mine.index, "score"].to_numpy())
    assert (mine["df_other"] == alone.loc[mine.index, "df"]).all()
    assert np.array_equal(mine["idf_other"].to_numpy(), alone.loc[mine.index, "idf"].to_numpy())


def test_bad_input():
    stats = make_stats([1, 0, 2, 0], 3)
    with pytest.raises(AnalysisError, match="length 4"):
        tfidf_table([1, 2, 3], stats, 1)
    with pytest.raises(AnalysisError, match="no reads"):
        tfidf_table([0, 0, 0, 0], stats, 1)
    with pytest.raises(AnalysisError, match="not both"):
        tfidf_table([1, 0, 0, 0], stats, 1, top_t=1, selected=[0])
    with pytest.raises(ConfigError, match=r"^the background has no memory layer 3; its memory layers are \[1\]$"):
        tfidf_table([1, 0, 0, 0], stats, 3)
    with pytest.raises(AnalysisError, match="integers"):
        tfidf_table(np.array([1.0, 0, 0, 0]), stats, 1)
    with pytest.raises(AnalysisError, match=">= 0"):
        tfidf_table([1, -1, 0, 0], stats, 1)
    with pytest.raises(AnalysisError, match="slots"):
        tfidf_table([1, 0, 0, 0], stats, 1, other=make_stats([1, 0, 2], 3))


# --------------------------------------------------------------------------- counts


def hand_trace() -> Trace:
    """Docs a (2 tokens) and b (1 token); layer 1, 2 heads × 2 reads; 16 slots."""
    tokens = pa.table({
        "row": [0, 1, 2], "doc": [0, 0, 1], "doc_id": ["a", "a", "b"], "position": [0, 1, 0], "token_id": [5, 6, 7],
        "text": ["x", "y", "z"], "start": [0, 1, 0], "end": [1, 2, 1],
    })
    slots = [[1, 2, 3, 1], [2, 2, 4, 5], [9, 1, 15, 0]]  # per token: head0 rank0, rank1, head1 rank0, rank1
    acc = {"token": [], "layer": [], "head": [], "rank": [], "slot": [], "weight": []}
    for tok, ss in enumerate(slots):
        for j, s in enumerate(ss):
            acc["token"].append(tok), acc["layer"].append(1), acc["head"].append(j // 2), acc["rank"].append(j % 2)
            acc["slot"].append(s), acc["weight"].append(0.5)
    meta = {"model_hash": "h", "memory": {}, "layers": [1], "n_slots": 16, "source": {"kind": "test"}}
    return Trace.from_tables(meta, tokens, pa.table(acc))


def test_trace_slot_counts():
    trace = hand_trace()
    a = trace_slot_counts(trace, doc_ids=["a"])
    expected = np.zeros(16, np.int64)
    for s in [1, 2, 3, 1, 2, 2, 4, 5]:
        expected[s] += 1
    assert np.array_equal(a, expected)
    assert np.array_equal(trace_slot_counts(trace, rows=[0, 1]), expected)
    everything = trace_slot_counts(trace)
    assert everything.sum() == 12 and everything[1] == 3 and everything[15] == 1
    with pytest.raises(AnalysisError, match="not in this trace"):
        trace_slot_counts(trace, doc_ids=["nope"])
    with pytest.raises(ConfigError, match=r"^this trace has no memory layer 0; its memory layers are \[1\]$"):
        trace_slot_counts(trace, layer=0)
    with pytest.raises(AnalysisError, match="rows"):
        trace_slot_counts(trace, rows=[7])


def test_batch_slot_counts_excludes_padding(micro_model):
    model = micro_model
    (block,) = list(model.memory_layers)
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    seen = {}

    def hook(_layer, indices, weights, m):
        seen["indices"] = indices.detach().clone()

    handle = model.memory_layers[block].add_access_hook(hook)
    with torch.no_grad():
        model.eval()
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    ind = seen["indices"].numpy()  # (B, T, H, K)
    ref = np.bincount(ind[mask.numpy().astype(bool)].reshape(-1), minlength=model.memory_config.n_slots)
    got = batch_slot_counts(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert np.array_equal(got, ref)
    assert got.sum() == int(mask.sum()) * ind.shape[2] * ind.shape[3]
    with pytest.raises(ConfigError, match=rf"^the model has no memory layer {block + 5}; its memory layers are \[{block}\]$"):
        batch_slot_counts(model, {"input_ids": ids}, layer=block + 5)


# --------------------------------------------------------------------------- run steps


def fake_run(path, rows, base="h"):
    identity = {"format": RUN_FORMAT, "config": FinetuneConfig(top_t=3).resolved().to_dict(), "base_model_hash": base,
                "stream": {"facts": sorted({r["fact_id"] for r in rows})}}
    run_dir = FinetuneRunDir(path)
    run_dir.write_identity(identity)
    full = [{"fact_index": 0, "loss": 1.0, "layer": 1, "accessed": 10, "grad_norm": 0.5,
             "tf": [0.1] * len(r["selected"]), "df": [1] * len(r["selected"]), "score": [0.2] * len(r["selected"])} | r
            for r in rows]
    run_dir.write_steps(full)
    return Run(path)


def test_step_table(tmp_path):
    run = fake_run(tmp_path / "r", [{"step": 1, "fact_id": "f1", "selected": [5, 3, 1]},
                                    {"step": 2, "fact_id": "f1", "selected": []}])
    out = step_table(run, 1)
    assert out["slot"].tolist() == [5, 3, 1] and out["rank"].tolist() == [1, 2, 3]
    assert out["selected"].all() and (out["fact_id"] == "f1").all()
    with pytest.raises(AnalysisError, match="no step 9"):
        step_table(run, 9)
    with pytest.raises(AnalysisError, match="selected no slots"):
        step_table(run, 2)
