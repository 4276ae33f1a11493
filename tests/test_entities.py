"""Entity alignment: spans → token rows on hand-written offsets, enrichment p-values against
scipy.stats.fisher_exact and BH q-values against a hand computation, per-slot profiles against a
brute-force pandas groupby, selection alignment on a hand-built run, the NER cache, and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from smviz.analysis.entities import (
    align_tokens,
    entity_spans,
    load_pipeline,
)
from smviz.analysis.entity_stats import (
    alignment_of_selection,
    bh_q_values,
    enrichment_p_values,
    selection_entity_alignment,
    slot_entity_profile,
)
from smviz.data.facts import Entity
from smviz.errors import AnalysisError, ConfigError
from smviz.trace import ACCESSES_SCHEMA, TOKENS_SCHEMA, Trace

N_SLOTS = 16
META = {"model_hash": "hash-a", "memory": {}, "layers": [1], "n_slots": N_SLOTS, "source": {"kind": "test"}}

# (doc_id, text, start, end) per token; texts join to the documents, offsets are whitespace-trimmed
SENTENCES = [
    ("F1:s0", [("", 0, 0),  # an empty-span token (e.g. a BOS) belongs to nothing
               ("Barack", 0, 6), (" Obama", 7, 12), (" visited", 13, 20), (" Paris,", 21, 27),  # partial overlap
               (" France", 28, 34), (" in", 35, 37), (" 20", 38, 40), ("09.", 40, 43)]),
    ("F1:s1", [("New", 0, 3), (" York-Lon", 4, 12), ("don", 12, 15), (" rain", 16, 21)]),  # overlaps two spans
    ("F2:s0", [("It", 0, 2), (" rained", 3, 9), (" in", 10, 12), (" Rome", 13, 17), (".", 17, 18)]),
]
SPANS = pd.DataFrame(
    [(0, "F1:s0", 0, 12, "PERSON", "Barack Obama"), (0, "F1:s0", 21, 26, "GPE", "Paris"),
     (0, "F1:s0", 28, 34, "GPE", "France"), (0, "F1:s0", 38, 42, "DATE", "2009"),
     (1, "F1:s1", 0, 8, "GPE", "New York"), (1, "F1:s1", 9, 15, "GPE", "London"),
     (2, "F2:s0", 13, 17, "GPE", "Rome")],
    columns=["doc", "doc_id", "start", "end", "label", "text"],
)
# by hand, one per token row, from the overlap rule
EXPECTED_LABELS = ["", "PERSON", "PERSON", "", "GPE", "GPE", "", "DATE", "DATE",
                   "GPE", "GPE", "GPE", "",
                   "", "", "", "GPE", ""]
EXPECTED_TEXTS = ["", "Barack Obama", "Barack Obama", "", "Paris", "France", "", "2009", "2009",
                  "New York", "New York", "London", "",
                  "", "", "", "Rome", ""]


def make_trace(sentences=SENTENCES, accesses: pd.DataFrame | None = None, meta=META, seed: int = 0) -> Trace:
    rows = [(d, doc_id, p, text, s, e) for d, (doc_id, toks) in enumerate(sentences) for p, (text, s, e) in enumerate(toks)]
    n = len(rows)
    tokens = pa.table({
        "row": np.arange(n, dtype=np.int32), "doc": [r[0] for r in rows], "doc_id": [r[1] for r in rows],
        "position": [r[2] for r in rows], "token_id": np.zeros(n, np.int32), "text": [r[3] for r in rows],
        "start": [r[4] for r in rows], "end": [r[5] for r in rows],
    }, schema=TOKENS_SCHEMA)
    if accesses is None:
        rng = np.random.default_rng(seed)
        k = 4
        w = rng.dirichlet(np.ones(k), size=n).astype(np.float16)
        accesses = pd.DataFrame({
            "token": np.repeat(np.arange(n), k), "layer": 1, "head": 0, "rank": np.tile(np.arange(k), n),
            "slot": np.concatenate([rng.choice(N_SLOTS, k, replace=False) for _ in range(n)]), "weight": w.reshape(-1),
        })
    return Trace.from_tables(meta, tokens, pa.Table.from_pandas(accesses, preserve_index=False).cast(ACCESSES_SCHEMA))


def test_documents_rebuild_and_alignment_follows_the_overlap_rule():
    trace = make_trace()
    tok = align_tokens(trace, SPANS)
    assert list(tok["label"].astype(str)) == EXPECTED_LABELS
    assert list(tok["text"].astype(str)) == EXPECTED_TEXTS
    assert tok["entity"].tolist()[:9] == [-1, 0, 0, -1, 1, 2, -1, 3, 3]
    assert tok["row"].tolist() == list(range(trace.n_tokens))
    # spans given in another order give the same labels; indices refer to the rows as given
    shuffled = SPANS.iloc[::-1].reset_index(drop=True)
    tok2 = align_tokens(trace, shuffled)
    assert list(tok2["label"].astype(str)) == EXPECTED_LABELS
    assert tok2["entity"].iloc[1] == len(SPANS) - 1
    with pytest.raises(ConfigError, match="overlap"):
        align_tokens(trace, pd.concat([SPANS, SPANS.iloc[[0]]]))


def test_enrichment_p_values_match_fisher_exact_on_a_hand_built_table():
    # [[entity reads of s, other reads of s], [entity reads elsewhere, other reads elsewhere]]
    tables = [((7, 3), (20, 70)), ((0, 5), (10, 85)), ((5, 0), (0, 95)), ((2, 8), (25, 65))]
    k = np.array([t[0][0] for t in tables])
    N = np.array([t[0][0] + t[0][1] for t in tables])
    for t, kk, NN in zip(tables, k, N):
        n, M = t[0][0] + t[1][0], sum(map(sum, t))
        p = enrichment_p_values(np.array([kk]), np.array([NN]), n, M)[0]
        assert p == pytest.approx(stats.fisher_exact(t, alternative="greater").pvalue, rel=1e-9)
    # by hand: P(k >= 5) with N=5 of M=100, n=5: 1 / C(100, 5)
    assert enrichment_p_values(np.array([5]), np.array([5]), 5, 100)[0] == pytest.approx(1 / math.comb(100, 5))


def test_bh_q_values_match_a_hand_computation():
    q = bh_q_values(np.array([0.01, 0.04, 0.03, 0.20, np.nan]))
    assert q[:4] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20])
    assert np.isnan(q[4])


def test_slot_profile_agrees_with_a_brute_force_groupby():
    trace = make_trace(seed=3)
    tok = align_tokens(trace, SPANS)
    prof = slot_entity_profile(trace, tok, top=2)
    acc = trace.to_pandas()
    acc["weight"] = acc["weight"].astype(np.float64)
    acc["label"] = tok["label"].astype(str).to_numpy()[acc["token"]]
    acc["string"] = tok["text"].astype(str).to_numpy()[acc["token"]]
    acc["is_ent"] = acc["label"] != ""
    g = acc.groupby("slot")
    ref = pd.DataFrame({"reads": g.size(), "mass": g["weight"].sum(),
                        "entity_reads": g["is_ent"].sum(),
                        "entity_mass": acc[acc.is_ent].groupby("slot")["weight"].sum()}).fillna(0.0)
    prof = prof.set_index("slot")
    assert list(prof.index) == sorted(acc["slot"].unique())
    np.testing.assert_array_equal(prof["reads"], ref["reads"])
    np.testing.assert_allclose(prof["mass"], ref["mass"], rtol=1e-12)
    np.testing.assert_array_equal(prof["entity_reads"], ref["entity_reads"])
    np.testing.assert_allclose(prof["entity_mass_share"], ref["entity_mass"] / ref["mass"], rtol=1e-12)
    for label in ("PERSON", "GPE", "DATE"):
        lm = acc[acc.label == label].groupby("slot")["weight"].sum().reindex(prof.index, fill_value=0.0)
        np.testing.assert_allclose(prof[f"share_{label}"], lm / ref["mass"], rtol=1e-12)
    np.testing.assert_allclose(prof[[c for c in prof if c.startswith("share_")]].sum(axis=1), prof["entity_mass_share"])
    # top strings: most mass first, ties to the alphabetically earlier string
    per = acc[acc.is_ent].groupby(["slot", "string"])["weight"].sum().reset_index()
    for s, grp in per.groupby("slot"):
        best = grp.sort_values(["weight", "string"], ascending=[False, True])["string"].tolist()
        assert prof.loc[s, "top1"] == best[0]
        assert prof.loc[s, "top2"] == (best[1] if len(best) > 1 else "")
    # enrichment: each slot's table against fisher_exact, then BH
    M, n = len(acc), int(acc.is_ent.sum())
    pvals = []
    for s, row in prof.iterrows():
        a, N = int(row.entity_reads), int(row.reads)
        table = [[a, N - a], [n - a, M - n - (N - a)]]
        pvals.append(stats.fisher_exact(table, alternative="greater").pvalue)
        lo = math.log((a + .5) * (M - n - N + a + .5) / ((N - a + .5) * (n - a + .5)))
        assert row.log_odds == pytest.approx(lo)
    np.testing.assert_allclose(prof["p_value"], pvals, rtol=1e-9)
    np.testing.assert_allclose(prof["q_value"], stats.false_discovery_control(pvals), rtol=1e-9)
    # asking for slots: unread ones included with zero reads; min_reads filters
    some = slot_entity_profile(trace, tok, slots=[0, 3])
    assert some["slot"].tolist() == [0, 3]
    assert (slot_entity_profile(trace, tok, min_reads=7)["reads"] >= 7).all()


def test_errors_are_clear(tmp_path):
    trace = make_trace()
    tok = align_tokens(trace, SPANS)
    with pytest.raises(ConfigError, match="out of range"):
        slot_entity_profile(trace, tok, slots=[N_SLOTS])
    with pytest.raises(ConfigError, match="empty"):
        alignment_of_selection(trace, tok, {}, {})
    with pytest.raises(ConfigError, match="empty"):
        alignment_of_selection(trace, tok, {"F1": []}, {"F1": "F1"})
    with pytest.raises(ConfigError, match="out of range"):
        alignment_of_selection(trace, tok, {"F1": [-1]}, {"F1": "F1"})
    with pytest.raises(ConfigError, match="this trace"):
        slot_entity_profile(trace, tok.iloc[:3])
    with pytest.raises(ConfigError, match="pip install en-core-web-nope"):
        load_pipeline("en_core_web_nope")
    with pytest.raises(ConfigError, match=r"this trace has no memory layer 3; its memory layers are \[1\]"):
        slot_entity_profile(trace, tok, layer=3)
    run = make_run(tmp_path / "run", base_hash="hash-b")
    with pytest.raises(AnalysisError, match="hash-b"):
        selection_entity_alignment(trace, tok, run)


def make_run(path, base_hash="hash-a"):
    from smviz.analysis.runs import Run
    from smviz.train.rundir import RUN_FORMAT, STEP_SCHEMA

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"format": RUN_FORMAT, "base_model_hash": base_hash,
                                                  "config": {"method": "sparse"}}))
    steps = [  # step, fact, selection
        (1, "F1", [2, 5]), (2, "F1", [5, 9]), (3, "F2", [1, 2, 3]),
    ]
    rows = [{"step": s, "fact_id": f, "fact_index": int(f[1]) - 1, "loss": 1.0, "layer": 1, "accessed": 4,
             "grad_norm": 0.0, "selected": sel, "tf": [1.0] * len(sel), "df": [1] * len(sel), "score": [1.0] * len(sel)}
            for s, f, sel in steps]
    pq.write_table(pa.Table.from_pylist(rows, schema=STEP_SCHEMA), path / "steps.parquet")
    return Run(path)


def test_selection_alignment_on_a_hand_built_run(tmp_path):
    # every token reads one slot with weight 1 (two heads on some tokens), chosen by hand
    slots = {  # token row -> slots read
        1: [2], 2: [2], 3: [5], 4: [9, 5], 5: [9], 7: [3], 0: [7], 6: [7], 8: [3],  # F1:s0
        9: [5], 10: [5], 11: [11], 12: [11],  # F1:s1
        13: [1], 14: [1], 15: [2], 16: [3], 17: [4],  # F2:s0
    }
    acc = pd.DataFrame([(t, 1, h, 0, s, 1.0) for t, ss in sorted(slots.items()) for h, s in enumerate(ss)],
                       columns=["token", "layer", "head", "rank", "slot", "weight"])
    trace = make_trace(accesses=acc)
    tok = align_tokens(trace, SPANS)
    run = make_run(tmp_path / "run")
    out = selection_entity_alignment(trace, tok, run, by="fact", draws=500, seed=1).set_index("key")
    # F1 pool: slot 2 (rows 1,2: PERSON) aligned; 5 (rows 3 no, 4 GPE, 9, 10 GPE): 3/4 ent -> aligned;
    # 9 (rows 4, 5 GPE) aligned; 3 (rows 7, 8 DATE) aligned; 7 (rows 0, 6) not; 11 (rows 11 GPE, 12 no): 1/2 -> aligned
    f1 = out.loc["F1"]
    assert (f1.pool, f1.n_selected, f1.n_read, f1.n_aligned, f1.n_pool, f1.pool_aligned) == ("fact", 3, 3, 3, 6, 5)
    assert f1.share == 1.0
    assert f1.p_value == pytest.approx(math.comb(5, 3) / math.comb(6, 3))
    assert f1.baseline_mean == pytest.approx(5 / 6, abs=0.03)
    # F2 pool: 1 (rows 13, 14) no; 2 (row 15) no; 3 (row 16 GPE) yes; 4 no -> selection {1,2,3}: 1 of 3
    f2 = out.loc["F2"]
    assert (f2.n_read, f2.n_aligned, f2.n_pool, f2.pool_aligned) == (3, 1, 4, 1)
    assert f2.share == pytest.approx(1 / 3) and f2.p_value == pytest.approx(0.75)
    assert f2.difference == pytest.approx(f2.share - f2.baseline_mean)
    again = selection_entity_alignment(trace, tok, run, by="fact", draws=500, seed=1)
    pd.testing.assert_frame_equal(out.reset_index(), again)
    steps = selection_entity_alignment(trace, tok, run, by="step", seed=1).set_index("key")
    assert steps.loc[1, "n_aligned"] == 2 and steps.loc[3, "fact_id"] == "F2"
    # a fact the trace does not hold: the whole trace is the pool
    other = alignment_of_selection(trace, tok, {"X": [2, 7]}, {"X": "F9"}, draws=10)
    assert other.loc[0, "pool"] == "trace" and other.loc[0, "n_pool"] == 8  # slots 1, 2, 3, 4, 5, 7, 9, 11


def test_fallback_ruler_and_the_ner_cache(tmp_path, monkeypatch):
    entities = [Entity("Barack Obama", "PERSON"), Entity("Paris", "GPE"), Entity("Rome", "GPE")]
    with pytest.warns(UserWarning, match="not installed"):
        nlp = load_pipeline("en_core_web_nope", fallback=True, fallback_entities=entities)
    # with no pipeline installed at all, the default (name None) falls back too
    import spacy

    import smviz.analysis.entities as entities_module

    monkeypatch.setattr(entities_module, "DEFAULT_PIPELINE", "en_core_web_nope")
    monkeypatch.setitem(entities_module.KNOWN_PIPELINES, "en_core_web_nope", "en-core-web-nope")
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: [])
    with pytest.warns(UserWarning, match="no spaCy pipeline is installed"):
        ruler_only = load_pipeline(fallback_entities=entities)
    assert ruler_only.pipe_names == ["entity_ruler"]
    trace = make_trace()
    spans = entity_spans(trace, nlp)
    assert spans[["doc_id", "start", "end", "label", "text"]].values.tolist() == [
        ["F1:s0", 0, 12, "PERSON", "Barack Obama"], ["F1:s0", 21, 26, "GPE", "Paris"], ["F2:s0", 13, 17, "GPE", "Rome"]]
    calls = []
    real_pipe = nlp.pipe
    monkeypatch.setattr(nlp, "pipe", lambda *a, **k: calls.append(1) or real_pipe(*a, **k))
    pd.testing.assert_frame_equal(entity_spans(trace, nlp), spans)
    assert calls == []  # in-memory cache
    disk = trace.save(tmp_path / "t")
    entity_spans(disk, nlp)
    assert calls == [1] and len(list((tmp_path / "t" / "entities").glob("*.parquet"))) == 1
    reloaded = Trace.load(tmp_path / "t")
    pd.testing.assert_frame_equal(entity_spans(reloaded, nlp), spans)
    assert calls == [1]  # read from the file
    changed = make_trace(SENTENCES[:2]).save(tmp_path / "t", force=True)
    assert len(entity_spans(Trace.load(changed.path), nlp)) == 2 and calls == [1, 1]


def test_the_installed_spacy_pipeline_finds_entities():
    nlp = load_pipeline()
    assert "ner" in nlp.pipe_names and not {"parser", "lemmatizer", "tagger"} & set(nlp.pipe_names)
    spans = entity_spans(make_trace(), nlp)
    found = set(zip(spans["text"], spans["label"]))
    assert ("Barack Obama", "PERSON") in found and ("Rome", "GPE") in found
    tok = align_tokens(make_trace(), spans)
    assert tok["label"].astype(str).iloc[1] == "PERSON" and tok["label"].astype(str).iloc[16] == "GPE"
