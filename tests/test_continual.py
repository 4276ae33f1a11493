"""The continual-learning comparison: matched-learning interpolation and seed aggregates against
hand-computed values, the stream slice and stream background of run_finetune, and
analyses/continual_facts.py --quick end to end on the micro preset (complete, well-formed, and the
same numbers when rerun from scratch)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smviz.analysis.continual import at_learning, forgetting_curve, mean_std
from smviz.errors import SmvizError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "analyses" / "continual_facts.py"


def _metrics(stream_em, known_em, nll):
    n = len(stream_em)
    return pd.DataFrame({"step": np.arange(n) * 10, "stream_em": stream_em, "known_em": known_em,
                         "known_f1": known_em, "heldout_nll": nll})


def test_forgetting_curve_is_relative_to_the_runs_own_start():
    curve = forgetting_curve(_metrics([0, 0.1, 0.2], [0.8, 0.6, 0.4], [4.0, 4.5, 5.0]).iloc[::-1])
    assert curve["step"].tolist() == [0, 10, 20]
    assert curve["known_drop"].tolist() == pytest.approx([0.0, 0.25, 0.5])
    assert curve["nll_change"].tolist() == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(SmvizError, match="step 0"):
        forgetting_curve(_metrics([0, 0.1], [0.8, 0.6], [4.0, 4.1]).iloc[1:])
    with pytest.raises(SmvizError, match="lack columns"):
        forgetting_curve(pd.DataFrame({"step": [0]}))


def test_at_learning_interpolates_at_the_first_crossing():
    # stream EM 0, .1, .3, .2, .5 ; known EM 1, .9, .8, .7, .6 -> drops 0, .1, .2, .3, .4
    curve = forgetting_curve(_metrics([0, 0.1, 0.3, 0.2, 0.5], [1.0, 0.9, 0.8, 0.7, 0.6], [4, 4, 4, 4, 4]))
    p = at_learning(curve, 0.2)  # between evaluations 1 and 2, halfway
    assert p["known_drop"] == pytest.approx(0.15) and p["step"] == pytest.approx(15.0)
    p = at_learning(curve, 0.4)  # the dip at 0.2 is skipped: first crossing is between 3 and 4, 2/3 of the way
    assert p["known_drop"] == pytest.approx(0.3 + 2 / 3 * 0.1) and p["step"] == pytest.approx(30 + 20 / 3)
    assert at_learning(curve, 0.3)["known_drop"] == pytest.approx(0.2)  # exactly on an evaluation
    assert at_learning(curve, 0.0) == {"level": 0.0, "step": 0.0, "known_drop": 0.0, "known_f1_drop": 0.0, "nll_change": 0.0}
    assert at_learning(curve, 0.51) is None


def test_mean_std_matches_statistics():
    values = [0.1, 0.4, None, 0.35, float("nan")]
    got = mean_std(values)
    kept = [0.1, 0.4, 0.35]
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(statistics.mean(kept))
    assert got["std"] == pytest.approx(statistics.stdev(kept))
    assert mean_std([2.0]) == {"mean": 2.0, "std": None, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("continual_facts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_matched_learning_table_over_seeds():
    """Two seeds whose curves cross 0.2 at known drops 0.15 and 0.25 (hand-computed), one that never does."""
    study = _script()

    def seed(stream_em, known_em):
        curve = forgetting_curve(_metrics(stream_em, known_em, [4.0] * len(stream_em)))
        return {"curve": curve.to_dict(orient="list")}

    entries = {"sparse": {"setting": {"key": "s"}, "seeds": [seed([0, 0.1, 0.3], [1.0, 0.9, 0.8]), seed([0, 0.4], [1.0, 0.5])]},
               "full": {"setting": {"key": "f"}, "seeds": [seed([0, 0.1], [1.0, 0.2]), seed([0, 0.2], [1.0, 0.0])]}}
    rows = {(r["method"], r["level"]): r for r in study.matched(entries, [0.2])}
    sparse, full = rows[("sparse", 0.2)], rows[("full", 0.2)]
    assert sparse["reached"] == 2 and sparse["known_drop"]["mean"] == pytest.approx(0.2)  # mean of 0.15 and 0.25
    assert sparse["known_drop"]["std"] == pytest.approx(statistics.stdev([0.15, 0.25]))
    assert full["reached"] == 1 and full["known_drop"] == {"mean": pytest.approx(1.0), "std": None, "n": 1}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from micro_workspace import build_micro_workspace

    return build_micro_workspace(tmp_path_factory.mktemp("continual") / "ws", stats_batches=10, trace=False, runs=(),
                                 n_new=4)


def _finetune(ws, run_dir, **kw):
    from smviz.train import FinetuneConfig
    from smviz.workspace.stages import run_finetune

    config = FinetuneConfig(method="sparse", top_t=8, batch_size=4, steps_per_fact=2, eval_every=2)
    return run_finetune(ws.model("micro"), run_dir, config, stream=ws.data / "facts-new.jsonl",
                        known=ws.data / "facts-known.jsonl", heldout=ws.data / "corpus-heldout.jsonl",
                        known_facts=4, heldout_rows=2, progress=False, **kw)


def test_first_fact_slices_the_stream_and_bad_values_write_nothing(ws, tmp_path):
    from smviz.data.facts import read_facts

    facts = read_facts(ws.data / "facts-new.jsonl")
    _finetune(ws, tmp_path / "slice", first_fact=2, max_facts=1)
    config = json.loads((tmp_path / "slice" / "config.json").read_text())
    assert config["stream"]["ids"] == [facts[2].id]
    for kw in ({"first_fact": 99}, {"first_fact": -1}, {"background": "nq"}):
        with pytest.raises(SmvizError):
            _finetune(ws, tmp_path / "bad", max_facts=1, **kw)
        assert not (tmp_path / "bad").exists()


def test_stream_background_counts_each_batch_as_a_document(ws, tmp_path):
    """The stream's own statistics against an independent count: the recorder's reads, batch by batch."""
    from smviz.model import MemoryModel
    from smviz.record import AccessRecorder
    from smviz.train import Stream, stream_stats
    from smviz.data.facts import read_facts
    import torch

    model = MemoryModel.from_pretrained(ws.model("micro"))
    stream = Stream(read_facts(ws.data / "facts-new.jsonl")[:2], model.tokenizer, 4, 3, "statements+qa", seed=5)
    stats = stream_stats(model, stream)
    n = model.memory_config.n_slots
    counts, df = np.zeros(n, np.int64), np.zeros(n, np.int64)
    with torch.no_grad(), AccessRecorder(model) as rec:
        for step in range(len(stream)):
            batch = stream.batch(step)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for b in rec.batches:
        slots = b.slots[:, 0].reshape(-1)
        counts += np.bincount(slots, minlength=n)
        df += np.bincount(np.unique(slots), minlength=n)
    layer = stats.layer_index(model.memory_config.layers[0])
    assert stats.unit == "batch" and stats.protocol["source"] == "stream" and stats.protocol["n_batches"] == len(stream)
    assert np.array_equal(stats.counts[layer].numpy(), counts)
    assert np.array_equal(stats.df[layer].numpy(), df)
    stats.check_model(model)

    summary = _finetune(ws, tmp_path / "bg", max_facts=2, background="stream")
    recorded = json.loads((tmp_path / "bg" / "config.json").read_text())["stats"]
    assert recorded["protocol"]["source"] == "stream" and summary["steps"] == 4


QUICK_ARGS = ["--quick", "--facts", "2", "--top-t", "16", "--t-values", "8,16", "--known-facts", "4", "--heldout-rows", "2"]


def _study(ws, out, runs, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--workspace", str(ws.root), "--model", str(ws.model("micro")),
                           "--out", str(out), "--runs", str(runs), *QUICK_ARGS, *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_quick_study_end_to_end_and_reproducible(ws, tmp_path):
    done = _study(ws, tmp_path / "out", tmp_path / "runs")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    doc = json.loads((out / "continual_facts.json").read_text())
    assert doc["format"] == "smviz-continual-facts/1" and doc["model"]["hash"]
    assert doc["command"].startswith("python analyses/continual_facts.py ") and "--quick" in doc["command"]
    results, study = doc["results"], doc["study"]
    # every setting the study names was run for every seed, and carries its curve from step 0
    ab = study["ablations"]
    named = [*study["chosen"].values(), *[k for ks in study["sweep"].values() for k in ks], *ab["optimizer"]["adamw"],
             *[k for a in ab["by_lr"] for k in (*a["t"], *a["selection"].values())],
             *[p[b] for a in ab["by_lr"] for p in a["background"] for b in ("pretraining", "stream")]]
    assert ab["by_lr"][0]["lr"] == results[study["chosen"]["sparse"]]["setting"]["lr"]
    assert set(named) == set(results)
    assert {r["setting"]["method"] for r in results.values()} == {"sparse", "full", "lora", "tf-only", "random-t", "memory-all"}
    assert any(r["setting"]["background"] == "stream" for r in results.values())
    for r in results.values():
        assert [s["seed"] for s in r["seeds"]] == [0, 1]
        for s in r["seeds"]:
            assert s["curve"]["step"][0] == 0 and s["curve"]["step"][-1] == 20 and s["trainable_per_step"] > 0
        assert r["aggregate"]["learn_em_end"]["n"] == 2
    for method, key in study["chosen"].items():
        best = max(results[k]["aggregate"]["learn_em_end"]["mean"] for k in study["sweep"][method])
        assert results[key]["aggregate"]["learn_em_end"]["mean"] == best
    assert {r["method"] for r in study["matched"]["levels"]} <= {"sparse", "full", "lora"}
    md = (out / "continual_facts.md").read_text()
    assert "## Main comparison" in md and "## Matched learning" in md and "Fig. 7" in md
    for name in ("continual_facts_curves.png", "continual_facts_pareto.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = _study(ws, tmp_path / "out2", tmp_path / "runs2")  # from scratch: fresh run directories
    assert again.returncode == 0, again.stderr[-3000:]
    doc2 = json.loads((tmp_path / "out2" / "continual_facts.json").read_text())
    doc2["command"] = doc["command"]
    assert doc2 == doc


def test_study_refuses_bad_input_before_writing(ws, tmp_path):
    done = _study(ws, tmp_path / "out", tmp_path / "runs", "--facts", "1000")  # 2 seeds x 1000 facts: more than the world has
    assert done.returncode == 2 and "new facts" in done.stderr
    done = _study(ws, tmp_path / "out", tmp_path / "runs", "--top-t", "1000")
    assert done.returncode == 2 and "exceed" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
