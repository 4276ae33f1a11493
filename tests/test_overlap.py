"""Overlap analyses (smviz.analysis.overlap): Jaccard / overlap-coefficient matrices against hand
values, reuse / churn / background overlap / cross-run on hand-built run directories, core sets and
core coverage on a hand-built facts trace, and bad input (empty sets, unknown facts, another model)
refused."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from smviz.analysis.min_t import min_t
from smviz.analysis.overlap import (
    background_overlap,
    background_top,
    churn,
    core_coverage,
    core_set,
    core_sets,
    cross_run,
    intersection_matrix,
    jaccard_matrix,
    overlap_matrix,
    selected_sets,
    slot_reuse,
)
from smviz.analysis.runs import Run
from smviz.errors import AnalysisError, ConfigError
from smviz.stats import SlotStats
from smviz.trace import Trace
from smviz.train import FinetuneConfig
from smviz.train.rundir import RUN_FORMAT, FinetuneRunDir

# --------------------------------------------------------------------------- matrices


def test_jaccard_and_overlap_by_hand():
    sets = {"A": [1, 2, 3], "B": np.array([5, 4, 3, 2, 2]), "C": [10]}
    j = jaccard_matrix(sets)
    o = overlap_matrix(sets)
    assert list(j.index) == ["A", "B", "C"] and list(j.columns) == ["A", "B", "C"]
    assert j.loc["A", "B"] == pytest.approx(2 / 5) and j.loc["B", "A"] == pytest.approx(2 / 5)
    assert o.loc["A", "B"] == pytest.approx(2 / 3)
    assert j.loc["A", "C"] == 0 and o.loc["B", "C"] == 0
    assert np.allclose(np.diag(j), 1) and np.allclose(np.diag(o), 1)
    assert intersection_matrix(sets).to_numpy().tolist() == [[3, 2, 0], [2, 4, 0], [0, 0, 1]]
    # a sequence: positional keys
    assert jaccard_matrix([[1, 2], [2, 3]]).loc[0, 1] == pytest.approx(1 / 3)


def test_matrices_match_python_sets():
    rng = np.random.default_rng(0)
    sets = [set(rng.choice(50, rng.integers(1, 20), replace=False).tolist()) for _ in range(8)]
    j = jaccard_matrix([sorted(s) for s in sets]).to_numpy()
    o = overlap_matrix([sorted(s) for s in sets]).to_numpy()
    for a in range(8):
        for b in range(8):
            assert j[a, b] == pytest.approx(len(sets[a] & sets[b]) / len(sets[a] | sets[b]))
            assert o[a, b] == pytest.approx(len(sets[a] & sets[b]) / min(len(sets[a]), len(sets[b])))


def test_matrices_refuse_empty():
    with pytest.raises(AnalysisError, match="empty"):
        jaccard_matrix({"a": [1], "b": []})
    with pytest.raises(AnalysisError, match="no slot sets"):
        overlap_matrix({})


# --------------------------------------------------------------------------- runs


def fake_run(path, rows, base="h"):
    """A run directory with config.json and a steps.parquet of `rows` (step, fact_id, selected; layer 1)."""
    identity = {"format": RUN_FORMAT, "config": FinetuneConfig(top_t=3).resolved().to_dict(), "base_model_hash": base,
                "stream": {"facts": list(dict.fromkeys(r["fact_id"] for r in rows))}}
    run_dir = FinetuneRunDir(path)
    run_dir.write_identity(identity)
    full = [{"fact_index": 0, "loss": 1.0, "layer": 1, "accessed": 10, "grad_norm": 0.5,
             "tf": [0.1] * len(r["selected"]), "df": [1] * len(r["selected"]), "score": [0.2] * len(r["selected"])} | r
            for r in rows]
    run_dir.write_steps(full)
    return Run(path)


STEPS = [
    {"step": 1, "fact_id": "F1", "selected": [5, 3, 1]},
    {"step": 2, "fact_id": "F1", "selected": [3, 1, 7]},
    {"step": 3, "fact_id": "F2", "selected": [7, 9, 5]},
    {"step": 4, "fact_id": "F2", "selected": [9, 11, 12]},
]


@pytest.fixture
def run(tmp_path):
    return fake_run(tmp_path / "run", STEPS)


def test_selected_sets(run):
    assert {k: v.tolist() for k, v in selected_sets(run, by="fact").items()} == {"F1": [1, 3, 5, 7], "F2": [5, 7, 9, 11, 12]}
    assert {k: v.tolist() for k, v in selected_sets(run, by="step", t=1).items()} == {1: [5], 2: [3], 3: [7], 4: [9]}
    with pytest.raises(AnalysisError, match="by must be"):
        selected_sets(run, by="nope")
    with pytest.raises(ConfigError, match=r"^run .+ has no memory layer 0; its memory layers are \[1\]$"):
        selected_sets(run, layer=0)


def test_run_resolves_layers_as_everything_does(run):
    assert run.resolve_layer(None) == run.resolve_layer(1) == 1  # the run's one memory layer
    assert {k: v.tolist() for k, v in run.selected(by="fact").items()} == {"F1": [1, 3, 5, 7], "F2": [5, 7, 9, 11, 12]}
    for bad in (0, True, 1.0):
        with pytest.raises(ConfigError, match=rf"^run {re.escape(str(run.path))} has no memory layer {bad!r}; its memory layers are \[1\]$"):
            run.selected(layer=bad)


def test_slot_reuse(run):
    out = slot_reuse(run)
    assert list(out.columns) == ["slot", "n_facts", "n_steps", "first_step", "last_step"]
    rows = {r.slot: (r.n_facts, r.n_steps, r.first_step, r.last_step) for r in out.itertuples()}
    assert rows == {5: (2, 2, 1, 3), 7: (2, 2, 2, 3), 3: (1, 2, 1, 2), 1: (1, 2, 1, 2), 9: (1, 2, 3, 4),
                    11: (1, 1, 4, 4), 12: (1, 1, 4, 4)}
    assert out["slot"].tolist()[:2] == [5, 7]  # most facts first, then by slot


def test_churn(run):
    out = churn(run)
    assert out["step"].tolist() == [1, 2, 3, 4]
    assert out["new_fact"].tolist() == [True, False, True, False]
    assert out["n_selected"].tolist() == [3, 3, 3, 3]
    assert np.isnan(out["churn"][0]) and np.isnan(out["jaccard"][0])
    # S2 \ S1 = {7}; S3 \ S2 = {9, 5}; S4 \ S3 = {11, 12}
    np.testing.assert_allclose(out["churn"][1:], [1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(out["jaccard"][1:], [2 / 4, 1 / 5, 1 / 5])
    assert out["n_new"].tolist() == [3, 1, 1, 2]  # step 3: 5 was selected at step 1, 7 at step 2
    np.testing.assert_allclose(out["new_share"], [1, 1 / 3, 1 / 3, 2 / 3])


def test_churn_with_empty_step(tmp_path):
    r = fake_run(tmp_path / "r", [{"step": 1, "fact_id": "F1", "selected": [1, 2]}, {"step": 2, "fact_id": "F1", "selected": []},
                                  {"step": 3, "fact_id": "F1", "selected": [2, 3]}])
    out = churn(r)
    assert np.isnan(out["churn"][1]) and out["jaccard"][1] == 0
    assert out["churn"][2] == 1.0 and out["n_new"].tolist() == [2, 0, 1]


def test_background_overlap(run):
    counts = torch.zeros(1, 16, dtype=torch.int64)
    counts[0, [5, 9, 2, 7]] = torch.tensor([50, 40, 40, 1])  # top 3: 5, 2, 9 (2 and 9 tie: lower id first)
    stats = SlotStats((1,), 16, "batch", counts, (counts > 0).long(), n_docs=3, model_hash="h")
    assert background_top(stats, 1, 3).tolist() == [5, 2, 9]
    out = background_overlap(run, stats, top=3)
    assert out["step"].tolist() == [1, 2, 3, 4]
    assert out["n_in_top"].tolist() == [1, 0, 2, 1]
    np.testing.assert_allclose(out["share"], [1 / 3, 0, 2 / 3, 1 / 3])
    assert out["expected"].iloc[0] == pytest.approx(3 / 16)
    by_fact = background_overlap(run, stats, top=3, by="fact")
    assert by_fact["fact_id"].tolist() == ["F1", "F2"] and by_fact["n_in_top"].tolist() == [1, 2]
    other = SlotStats((1,), 16, "batch", counts, (counts > 0).long(), n_docs=3, model_hash="other")
    with pytest.raises(AnalysisError):
        background_overlap(run, other)


def test_cross_run(tmp_path, run):
    b = fake_run(tmp_path / "b", [{"step": 1, "fact_id": "F2", "selected": [9, 7, 100]}, {"step": 2, "fact_id": "F3", "selected": [1]}])
    out = cross_run(run, b)
    assert out["fact_id"].tolist() == ["F2"]
    r = out.iloc[0]
    assert (r.n_a, r.n_b, r.intersection) == (5, 3, 2)
    assert r.jaccard == pytest.approx(2 / 6) and r.overlap == pytest.approx(2 / 3)
    c = fake_run(tmp_path / "c", [{"step": 1, "fact_id": "F9", "selected": [1]}])
    with pytest.raises(AnalysisError, match="no fact in common"):
        cross_run(run, c)
    d = fake_run(tmp_path / "d", [{"step": 1, "fact_id": "F2", "selected": [1]}], base="zzz")
    with pytest.raises(AnalysisError):
        cross_run(run, d)


def test_full_method_run_refused(tmp_path):
    r = fake_run(tmp_path / "r", [{"step": 1, "fact_id": "F1", "selected": []}])
    with pytest.raises(AnalysisError, match="selected no slots"):
        churn(r)


# --------------------------------------------------------------------------- core sets


def facts_trace(model_hash: str = "h") -> Trace:
    """F1: statements s0, s1 and one Q/A doc q0 ('Question: who?' / '\\nAnswer:' / ' Bo'); F2: s0 only.
    Layer 1, one head, 2 reads per token, 32 slots."""
    docs = [
        ("F1:s0", ["Bo", " is"], [[1, 2], [3, 4]]),
        ("F1:s1", ["It", " is", " Bo"], [[2, 9], [4, 8], [1, 5]]),
        ("F1:q0", ["Question: who?", "\nAnswer:", " Bo"], [[2, 7], [9, 6], [1, 4]]),
        ("F2:s0", ["x"], [[20, 21]]),
    ]
    tok = {"row": [], "doc": [], "doc_id": [], "position": [], "token_id": [], "text": [], "start": [], "end": []}
    acc = {"token": [], "layer": [], "head": [], "rank": [], "slot": [], "weight": []}
    row = 0
    for d, (doc_id, texts, reads) in enumerate(docs):
        off = 0
        for p, (text, slots) in enumerate(zip(texts, reads)):
            tok["row"].append(row), tok["doc"].append(d), tok["doc_id"].append(doc_id), tok["position"].append(p)
            tok["token_id"].append(p), tok["text"].append(text), tok["start"].append(off), tok["end"].append(off + len(text))
            off += len(text)
            for k, s in enumerate(slots):
                acc["token"].append(row), acc["layer"].append(1), acc["head"].append(0), acc["rank"].append(k)
                acc["slot"].append(s), acc["weight"].append(0.5)
            # a second memory layer, which must not leak in
            acc["token"].append(row), acc["layer"].append(3), acc["head"].append(0), acc["rank"].append(0)
            acc["slot"].append(31), acc["weight"].append(1.0)
            row += 1
    meta = {"model_hash": model_hash, "memory": {}, "layers": [1, 3], "n_slots": 32, "source": {"kind": "facts"}}
    return Trace.from_tables(meta, pa.table(tok), pa.table(acc))


def test_core_set_by_hand():
    trace = facts_trace()
    # P = {1,2,3,4} ∩ {1,2,4,5,8,9} = {1,2,4}; prompt reads {2,7,9,6}; answer {1,4}
    assert core_set(trace, "F1", layer=1).tolist() == [2]
    assert core_set(trace, "F1", layer=1, part="answer").tolist() == [1, 4]
    assert core_set(trace, "F1", layer=1, part="all").tolist() == [1, 2, 4]
    table = core_sets(trace, ["F1"], layer=1, part="all")
    assert core_sets(trace, layer=1)["fact_id"].tolist() == ["F1"]  # F2 has no question: left out by default
    r = table.iloc[0]
    assert (r.n_statements, r.n_questions, r.paraphrase_size, r.question_size, r.core_size) == (1 + 1, 1, 3, 6, 3)
    with pytest.raises(AnalysisError, match="no question documents"):
        core_set(trace, "F2", layer=1)
    with pytest.raises(AnalysisError, match="no documents"):
        core_set(trace, "F7", layer=1)
    with pytest.raises(ConfigError, match=r"^this trace has memory layers \[1, 3\]; say which one \(layer=\.\.\.\)$"):
        core_set(trace, "F1")
    with pytest.raises(AnalysisError, match="part"):
        core_set(trace, "F1", layer=1, part="nope")


def test_core_set_unknown_offsets():
    """With end offsets unknown (-1) the token texts' lengths decide the prompt."""
    trace = facts_trace()
    tokens = trace.tokens.set_column(7, "end", pa.array([-1] * trace.n_tokens, pa.int32()))
    t2 = Trace.from_tables(trace.meta, tokens, trace.accesses)
    assert core_set(t2, "F1", layer=1).tolist() == [2]


def test_core_coverage(tmp_path):
    trace = facts_trace()
    r = fake_run(tmp_path / "r", [{"step": 1, "fact_id": "F1", "selected": [4, 1, 30]}, {"step": 2, "fact_id": "F1", "selected": [8]}])
    out = core_coverage(r, trace, part="all")
    assert list(out.columns) == ["fact_id", "core_size", "trained_size", "covered", "coverage", "trained_in_core"]
    row = out.iloc[0]
    assert (row.fact_id, row.core_size, row.trained_size, row.covered) == ("F1", 3, 4, 2)
    assert row.coverage == pytest.approx(2 / 3) and row.trained_in_core == pytest.approx(2 / 4)
    # each step's best t=1 only: {4, 8}
    assert core_coverage(r, trace, part="all", t=1).iloc[0].covered == 1
    with pytest.raises(AnalysisError, match="not trained"):
        core_coverage(r, trace, fact_ids=["F2"])
    with pytest.raises(AnalysisError, match="record the trace"):
        core_coverage(r, facts_trace("other"))


def test_min_t_of_table():
    assert min_t(pd.DataFrame({"t": [25, 50, 100], "em": [0.0, 0.5, 1.0]})) == 50
    assert min_t(pd.DataFrame({"t": [25, 50], "em": [0.0, 0.0]})) is None


# --------------------------------------------------------------------------- end to end (micro model)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A saved micro model with a tiny tokenizer, background statistics, two facts and a 4-step sparse run."""
    from smviz.data.facts import Fact, Question, qa_text
    from smviz.data.tokenizer import train_tokenizer
    from smviz.model import MemoryModel
    from smviz.stats import collect_stats
    from smviz.train import EvalSets, Stream, finetune

    facts = [
        Fact(f"F{i}", name, "birthplace", city,
             (f"{name} was born in {city}.", f"The birthplace of {name} is {city}."),
             (Question(f"Where was {name} born?", "b/q0", False), Question(f"What is the birthplace of {name}?", "b/q1", True)))
        for i, (name, city) in enumerate([("Ada Vell", "Oslo"), ("Bo Krin", "Lima")])
    ]
    texts = [s for f in facts for s in f.statements] + [qa_text(q.text, f.answer) for f in facts for q in f.questions]
    tokenizer = train_tokenizer(texts * 3 + ["the a of in is was born"] * 3, vocab_size=300)
    root = tmp_path_factory.mktemp("micro")
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    model.save_pretrained(root / "m")
    model = MemoryModel.from_pretrained(root / "m")
    rows = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    stats = collect_stats(model, [{"input_ids": rows["input_ids"][i:i + 2], "attention_mask": rows["attention_mask"][i:i + 2]}
                                  for i in range(0, len(texts), 2)])
    config = FinetuneConfig(method="sparse", top_t=8, batch_size=4, steps_per_fact=2, eval_every=100)
    stream = Stream(facts, tokenizer, batch_size=4, steps_per_item=2, composition=config.composition)
    sets = EvalSets(stream=facts, known=facts[:1], heldout_rows=rows["input_ids"][:2, :4])
    finetune(MemoryModel.from_pretrained(root / "m"), stream, config=config, run_dir=root / "run", eval_sets=sets,
             stats=stats, progress=False)
    return {"dir": root / "m", "stats": stats, "facts": facts, "run": Run(root / "run")}


def test_step_counts_reproduce_run_selection(micro):
    from smviz.analysis.tfidf import step_slot_counts, tfidf_table
    from smviz.model import MemoryModel

    run = micro["run"]
    (layer,) = run.layers
    for step in (1, 3, 4):
        counts = step_slot_counts(run, step, MemoryModel.from_pretrained(micro["dir"]), micro["facts"])
        table = tfidf_table(counts, micro["stats"], layer, top_t=run.config["top_t"])
        stored = run.steps[run.steps["step"] == step].iloc[0]
        assert table.loc[table["selected"], "slot"].tolist() == list(stored["selected"])
        assert int(stored["accessed"]) == len(table)
        np.testing.assert_allclose(table.loc[table["selected"], "score"], stored["score"], rtol=1e-6)


def test_min_t_sweep_micro(micro):
    from smviz.analysis.min_t import min_t_sweep
    from smviz.model import MemoryModel

    base = MemoryModel.from_pretrained(micro["dir"])
    before = base.memory_layers[next(iter(base.memory_layers))].value_table.weight.clone()
    out = min_t_sweep(base, micro["stats"], micro["facts"][0], ts=(0, 2, 8), run=micro["run"], steps_per_fact=1)
    assert list(out.columns) == ["t", "em", "f1", "n_questions", "loss"] and out["t"].tolist() == [0, 2, 8]
    assert (out["n_questions"] == 1).all() and out["em"].between(0, 1).all() and out["f1"].between(0, 1).all()
    assert np.isnan(out["loss"][0]) and np.isfinite(out["loss"][1:]).all()
    assert out.attrs["min_t"] == min_t(out)
    assert torch.equal(base.memory_layers[next(iter(base.memory_layers))].value_table.weight, before)  # base untouched
    with pytest.raises(AnalysisError, match="exceed"):
        min_t_sweep(base, micro["stats"], micro["facts"][0], ts=(10_000_000,))
