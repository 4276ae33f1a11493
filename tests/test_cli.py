"""The `smviz` command line: help, build/info round trip, refusals that write nothing, the micro demo."""

from __future__ import annotations

import json
import math

import pytest

from smviz.cli import main
from smviz.model import MemoryModel


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("build", "info", "world", "pretrain", "eval", "record", "stats", "finetune", "demo", "data"):
        assert command in out


def test_build_then_info(tmp_path, capsys):
    out_dir = tmp_path / "m"
    assert main(["build", "--preset", "micro", "--out", str(out_dir), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert main(["info", str(out_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_hash"] == built["model_hash"] == MemoryModel.from_pretrained(out_dir).model_hash
    assert info["memory"]["n_keys"] == 16 and info["memory"]["layers"] == [1]
    assert info["parameters"]["total"] == built["parameters"]["total"]


def test_unknown_preset_is_refused_and_writes_nothing(tmp_path, capsys):
    assert main(["build", "--preset", "enormous", "--out", str(tmp_path / "m")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_info_on_altered_model_is_refused(tmp_path, capsys):
    out_dir = tmp_path / "m"
    main(["build", "--preset", "micro", "--out", str(out_dir)])
    (out_dir / "memory.json").write_text((out_dir / "memory.json").read_text().replace('"knn": 4', '"knn": 5'))
    capsys.readouterr()
    assert main(["info", str(out_dir)]) == 2
    assert "altered" in capsys.readouterr().err


def test_micro_demo_runs_and_resumes(tmp_path, capsys):
    ws = tmp_path / "ws"
    args = ["demo", "--preset", "micro", "--steps", "20", "--workspace", str(ws), "--device", "cpu", "--no-app"]
    assert main(args) == 0
    report = json.loads((ws / "reports" / "pretrain-micro.json").read_text())
    model = MemoryModel.from_pretrained(ws / "models" / "micro")
    assert report["model_hash"] == model.model_hash
    assert set(report["memory_on"]["qa"]) == {"known", "bio_only", "new"}
    metrics = [json.loads(x) for x in (ws / "pretrain" / "micro" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert metrics[-1]["step"] == 20 and losses[-1] < math.log(len(model.tokenizer))  # below chance
    capsys.readouterr()
    # statistics, the trace of the new facts and the three streams are there and name the model
    from smviz.stats import SlotStats
    from smviz.trace import Trace

    assert SlotStats.load_for_model(ws / "models" / "micro", model).n_docs == 50
    assert Trace.load(ws / "traces" / "new-facts").model_hash == model.model_hash
    for method in ("sparse", "full", "lora"):
        summary = json.loads((ws / "runs" / method / "summary.json").read_text())
        assert summary["method"] == method and summary["base_model_hash"] == model.model_hash
    diff = json.loads((ws / "reports" / "diff-sparse.json").read_text())
    assert diff["kind"] == "diff" and diff["model_hashes"]["before"] == model.model_hash
    assert diff["memory"]["violations"] == 0
    assert json.loads((ws / "reports" / "runs.json").read_text())["kind"] == "run"
    # a second run finds every stage done
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 10 and "smviz app --workspace" in out
    # the evaluation against the project's thresholds, one verdict per criterion
    line = next(x for x in out.splitlines() if x.startswith("thresholds"))
    assert line.count("PASS") + line.count("FAIL") == 3 and "known EM" in line and "bio-only EM" in line
    assert json.loads((ws / "reports" / "pretrain-micro.json").read_text())["model_hash"] == model.model_hash
    assert not (ws / "pretrain" / "micro" / "eval.json").exists()  # the evaluation is kept in one place


def test_world_writes_and_refuses_another_world(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["world", "--out", str(out), "--known", "3", "--bio-only", "2", "--new", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["corpus-heldout.jsonl", "corpus-train.jsonl", "facts-bio.jsonl", "facts-known.jsonl",
                     "facts-new.jsonl", "world.json"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["world", "--out", str(out), "--known", "4"]) == 2
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["world", "--out", str(out), "--known", "3", "--bio-only", "2", "--new", "2"]) == 0
    assert "already present" in capsys.readouterr().out
    assert main(["world", "--out", str(out), "--known", "4", "--force"]) == 0
    assert json.loads((out / "world.json").read_text())["config"]["n_known"] == 4
