"""analyses/headline_controls.py: its per-question matched-learning interpolation against the curve's
(`at_learning`), the Pareto front by hand, and the --quick study end to end on the micro preset — one
control of each kind (selection seeds apart from report seeds, the baselines' variants, the control
backgrounds, statements only, the selection rules, equal steps, zero-score ties) — resumed to the
same numbers, and bad input refused before anything is written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from smviz.analysis.continual import at_learning, forgetting_curve

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "analyses" / "headline_controls.py"


def _script():
    spec = importlib.util.spec_from_file_location("headline_controls", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _seed_run(study, seed, stream_em, known):
    known = np.asarray(known, dtype=float)
    metrics = pd.DataFrame({"step": np.arange(len(stream_em)) * 10, "stream_em": stream_em, "known_em": known.mean(1),
                            "known_f1": known.mean(1), "heldout_nll": np.linspace(3.0, 3.5, len(stream_em))})
    return study.SeedRun(seed, forgetting_curve(metrics), known, [f"q{i}" for i in range(known.shape[1])], None)


def test_per_question_matched_learning_agrees_with_the_curve():
    study = _script()
    start = [1, 1, 1, 0]
    runs = [_seed_run(study, 0, [0.0, 0.1, 0.3], [start, [1, 1, 0, 0], [1, 0, 0, 0]]),
            _seed_run(study, 1, [0.0, 0.25, 0.4], [start, [1, 0, 1, 1], [0, 0, 1, 0]])]
    point = study.at_level(runs, 0.2)
    # seed 0 crosses 0.2 halfway between evaluations 1 and 2, seed 1 at 0.8 of the way to evaluation 1
    np.testing.assert_allclose(point["end"], [[1, 0.5, 0, 0], [1, 0.2, 1, 0.8]])
    for r, end in zip(runs, point["end"]):
        ref = at_learning(r.curve, 0.2, columns=("known_em", "known_drop", "nll_change"))
        assert end.mean() == pytest.approx(ref["known_em"])
        assert (0.75 - end.mean()) / 0.75 == pytest.approx(ref["known_drop"])
    got = study.forgetting_at(runs, 0.2, seed=0)
    assert got["known_drop"]["estimate"] == pytest.approx(np.mean([(0.75 - e.mean()) / 0.75 for e in point["end"]]))
    assert got["step"] == pytest.approx((15 + 8) / 2) and got["seeds"] == 2 and got["questions"] == 4
    assert study.at_level(runs, 0.35) is None  # seed 0 never gets there
    # the area: the mean drop over levels 0.02 … 0.2, each at its first reach
    levels = np.linspace(0, 0.2, 11)[1:]
    per_seed = [np.mean([at_learning(r.curve, lv)["known_drop"] for lv in levels]) for r in runs]
    assert study.area_under(runs, 0.2, seed=0, points=10)["estimate"] == pytest.approx(np.mean(per_seed))
    with pytest.raises(Exception, match="same model"):
        study.start_scores([runs[0], _seed_run(study, 2, [0.0, 0.1], [[0, 1, 1, 0], [0, 1, 1, 0]])])


def test_pareto_front_by_hand():
    study = _script()
    points = [{"key": "a", "learn": 0.3, "drop": 0.2}, {"key": "b", "learn": 0.2, "drop": 0.1},
              {"key": "c", "learn": 0.2, "drop": 0.3}, {"key": "d", "learn": 0.3, "drop": 0.2},
              {"key": "e", "learn": 0.1, "drop": None}]
    assert study.pareto_front(points) == ["a", "b", "d"]  # c is beaten by a and b; equal points both stay


QUICK = ["--quick", "--facts", "2", "--steps-per-fact", "2", "--batch-size", "4", "--eval-every", "2", "--top-t", "16",
         "--known-facts", "4", "--heldout-rows", "2"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A micro workspace whose model was pretrained in it (briefly), so that its dense twin has a recipe."""
    import torch

    from smviz.data.world import WorldConfig
    from smviz.train.recipes import recipe
    from smviz.workspace import Workspace
    from smviz.workspace.stages import background_stats, build_data, run_pretraining

    ws = Workspace(tmp_path_factory.mktemp("controls") / "ws")
    build_data(ws.data, WorldConfig(n_known=4, n_bio_only=1, n_new=6))
    run_pretraining(ws, "micro", recipe("micro", steps=10, checkpoint_every=10, log_every=5, usage_rows=2), device=torch.device("cpu"),
                    progress=False)
    background_stats(ws, ws.model("micro"), n_batches=10, batch_size=8, seq_len=64, progress=False)
    return ws


def _study(ws, out, runs, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--workspace", str(ws.root), "--model", str(ws.model("micro")),
                           "--out", str(out), "--runs", str(runs), *QUICK, *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)


def test_quick_study_runs_every_control_and_resumes_to_the_same_numbers(ws, tmp_path):
    done = _study(ws, tmp_path / "out", tmp_path / "runs", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "runs in 2 processes" in done.stdout  # selection and report runs in the pool
    doc = json.loads((tmp_path / "out" / "headline_controls.json").read_text())
    assert doc["format"] == "smviz-headline-controls/1" and doc["model"]["hash"]
    st, results, runs = doc["study"], doc["results"], tmp_path / "runs"
    assert doc["plan"]["selection_seeds"] == [2] and doc["plan"]["report_seeds"] == [0, 1]

    def identity(key, seed):
        return json.loads((runs / key / f"seed-{seed}" / "config.json").read_text())

    # selection seeds learn other facts than the report seeds
    sparse = st["chosen"]["sparse"]
    selected = set(identity(sparse, 2)["stream"]["ids"])
    reported = {i for s in (0, 1) for i in identity(sparse, s)["stream"]["ids"]}
    assert len(selected) == 2 and len(reported) == 4 and not selected & reported
    # every family's grid ran on the selection seed; the baselines' variants are what they say
    assert {f: s["settings"] for f, s in st["selection"].items()} == {
        "sparse": 1, "full": 1, "full-values": 1, "full-frozen-memory": 1, "lora": 1, "lora-memory": 1,
        "dense-full": 1, "dense-lora": 1}
    # C5′: the dense twin, pretrained with the model's recipe but no memory, is what its families finetuned
    from smviz.model import MemoryModel
    from smviz.train.recipes import active_parameters

    twin = MemoryModel.from_pretrained(ws.model("micro-dense"))
    assert not twin.memory_layers and twin.model_hash == st["dense_twin"]["hash"]
    memory_model = MemoryModel.from_pretrained(ws.model("micro"))
    per_width = 3 * twin.lm.config.hidden_size * twin.lm.config.num_hidden_layers
    assert abs(st["dense_twin"]["parameters"] - active_parameters(memory_model)) <= per_width / 2
    for family in ("dense-full", "dense-lora"):
        assert identity(st["chosen"][family], 0)["base_model_hash"] == twin.model_hash
    assert identity(st["chosen"]["full"], 0)["base_model_hash"] == memory_model.model_hash
    assert {"dense-full", "dense-lora"} <= set(st["equal_steps"]) & set(st["main_end"])
    full_values = identity(st["chosen"]["full-values"], 0)["config"]
    assert full_values["method"] == "full" and full_values["value_lr_mult"] == doc["model"]["memory"]["value_lr_mult"]
    assert identity(st["chosen"]["full-frozen-memory"], 0)["config"]["freeze_memory"] is True
    assert set(identity(st["chosen"]["lora-memory"], 0)["config"]["lora_targets"]) >= {"query", "w1", "w2"}
    for family in st["chosen"]:
        assert set(results[st["chosen"][family]]["seeds"]) == {"0", "1", "2"}
    # C1: the control backgrounds are what the sparse runs ranked against
    for mixture in ("corpus", "no-known"):
        assert st["backgrounds"][mixture]["protocol"]["mixture"] == mixture
        for row in st["c1_backgrounds"][mixture]:
            assert identity(row["key"], 1)["stats"]["protocol"]["mixture"] == mixture
    # C7: statements only; the selection rules
    for row in st["c7_statements"].values():
        assert identity(row["key"], 0)["config"]["composition"] == "statements"
    assert {identity(row["key"], 0)["config"]["method"] for row in st["rules_end"].values()} == {
        "kl", "grad-norm", "random-t", "sparse-tf-ties"}
    # C2: one row per evaluation of the report runs
    assert [r["step"] for r in st["equal_steps"]["sparse"]] == results[sparse]["seeds"]["0"]["curve"]["step"] == [0, 2, 4]
    # C10: recounted from the sparse runs' steps.parquet
    shares = []
    for bg in st["c1_backgrounds"].values():
        for row in bg:
            for seed in (0, 1):
                table = pq.read_table(runs / row["key"] / f"seed-{seed}" / "steps.parquet").to_pandas()
                shares += [float(np.mean(np.asarray(s) == 0)) for s in table["score"]]
    assert st["c10_zero_score_share"]["mean"] == pytest.approx(np.mean(shares)) and st["c10_zero_score_share"]["steps"] == len(shares)
    md = (tmp_path / "out" / "headline_controls.md").read_text()
    for heading in ("## Settings chosen on the selection seeds", "## Forgetting at equal steps (C2)", "## C1: the background",
                    "## C7: statements only", "## C10: TF-IDF picks scored 0", "## C5′: the dense twin"):
        assert heading in md
    for name in ("headline_controls_steps.png", "headline_controls_pareto.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumed in one process: every run the pool wrote read back from its directory, the same document
    again = _study(ws, tmp_path / "out2", runs)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "seed 0:" in again.stdout  # the runs were read back (finished runs return their summary)
    doc2 = json.loads((tmp_path / "out2" / "headline_controls.json").read_text())
    doc2["command"] = doc["command"]
    assert doc2 == doc


def test_study_refuses_bad_input_before_writing(ws, tmp_path):
    done = _study(ws, tmp_path / "out", tmp_path / "runs", "--facts", "1000")
    assert done.returncode == 2 and "new facts" in done.stderr
    done = _study(ws, tmp_path / "out", tmp_path / "runs", "--top-t", "100000")
    assert done.returncode == 2 and "exceeds" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
