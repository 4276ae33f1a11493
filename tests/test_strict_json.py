"""Strict JSON everywhere: smviz writes null for NaN and infinities, never the `NaN` / `Infinity`
tokens that Python's json accepts but JSON (RFC 8259), `jq`, browsers and strict readers refuse.
Checked four ways: smviz.io's writers (and the model format's and the slot statistics' header) on
non-finite values; every committed JSON file (results, the notebook) under analyses/ and
benchmarks/results/; every .json / .jsonl file of a micro workspace built end to end (model,
statistics, trace, three finetuning runs, a diff report and a run report); and what the commands print
with --json."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from smviz.io import append_jsonl, json_text, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def _refuse(token: str):
    raise ValueError(f"non-strict JSON token {token}")


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (the only non-JSON tokens Python accepts)."""
    return json.loads(text, parse_constant=_refuse)


def _check_file(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    strict_loads(line)
                except ValueError as e:
                    raise AssertionError(f"{path} line {n}: {e}") from None
    else:
        try:
            strict_loads(text)
        except ValueError as e:
            raise AssertionError(f"{path}: {e}") from None


def test_strict_parser_refuses_what_python_writes_by_default():
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            strict_loads(json.dumps({"x": value}))


def test_non_finite_numbers_are_written_as_null(tmp_path):
    obj = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "ok": 1.5, "int": 3, "text": "NaN",
           "nested": [{"a": [math.nan, 2.0, (math.inf, "x")]}, None, True], "empty": {}}
    expected = {"nan": None, "inf": None, "-inf": None, "ok": 1.5, "int": 3, "text": "NaN",
                "nested": [{"a": [None, 2.0, [None, "x"]]}, None, True], "empty": {}}
    for indent in (2, None):
        assert strict_loads(json_text(obj, indent=indent)) == expected
    assert list(strict_loads(json_text({"b": 1, "a": math.nan}, sort_keys=True))) == ["a", "b"]
    write_json_atomic(tmp_path / "x.json", obj)
    assert strict_loads((tmp_path / "x.json").read_text()) == expected
    append_jsonl(tmp_path / "x.jsonl", [obj, {"y": -math.inf}])
    append_jsonl(tmp_path / "x.jsonl", [{"z": math.nan}])
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert [strict_loads(line) for line in lines] == [expected, {"y": None}, {"z": None}]


COMMITTED = sorted(p for folder in (ROOT / "analyses", ROOT / "benchmarks" / "results")
                   for suffix in ("*.json", "*.jsonl", "*.ipynb") for p in folder.rglob(suffix))


def test_committed_results_exist():
    names = {p.relative_to(ROOT).as_posix() for p in COMMITTED}
    assert "analyses/results/continual_facts.json" in names and "benchmarks/results/bench_memory.json" in names


@pytest.mark.parametrize("path", COMMITTED, ids=[p.relative_to(ROOT).as_posix() for p in COMMITTED])
def test_committed_json_is_strict(path):
    _check_file(path)


def test_model_files_and_statistics_headers_are_strict_and_keep_their_bytes(tmp_path):
    from smviz.model import MemoryModel
    from smviz.model.format import MEMORY_FILE, MODEL_FORMAT
    from smviz.stats.slot_stats import SlotStats

    # the model format's JSON keeps the bytes it has always had (they are hashed): keys sorted, indent 2
    model = MemoryModel.from_preset("micro", seed=0)
    model.save_pretrained(tmp_path / "m")
    memory = {"format": MODEL_FORMAT, "memory": model.memory_config.to_dict()}
    assert (tmp_path / "m" / MEMORY_FILE).read_text() == json.dumps(memory, indent=2, sort_keys=True) + "\n"

    protocol = {"source": "café", "seq_len": 64, "loss": math.nan, "parts": [{"lr": math.inf}, 0.5]}
    stats = SlotStats((1,), 4, "batch", torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64),
                      model_hash="abc", protocol=protocol)
    stats.save(tmp_path / "s.safetensors")
    loaded, metadata = SlotStats.read_file(tmp_path / "s.safetensors", "smviz-slot-stats/1")
    expected = {"source": "café", "seq_len": 64, "loss": None, "parts": [{"lr": None}, 0.5]}
    assert strict_loads(metadata["protocol"]) == expected == loaded.protocol == stats.state_dict()["protocol"]
    assert metadata["protocol"] == json.dumps(expected, sort_keys=True)  # sorted, \\u escapes: the bytes of before
    assert metadata["layers"] == "[1]" and metadata["model_hash"] == '"abc"'


@pytest.fixture(scope="module")
def micro_ws(tmp_path_factory):
    from micro_workspace import build_micro_workspace

    return build_micro_workspace(tmp_path_factory.mktemp("strict") / "ws", stats_batches=4, runs=("sparse", "full", "lora"))


def test_every_json_of_a_micro_workspace_is_strict(micro_ws, capsys):
    from smviz.cli import main

    ws = micro_ws
    reports = ws.root / "reports"
    reports.mkdir()
    assert main(["report", "diff", "--before", str(ws.model("micro")), "--after", str(ws.run("sparse") / "model"),
                 "--facts", str(ws.data / "facts-new.jsonl"), "--known", str(ws.data / "facts-known.jsonl"),
                 "--out", str(reports / "diff.html")]) == 0
    capsys.readouterr()
    assert main(["report", "run", *(str(ws.run(m)) for m in ("sparse", "full", "lora")),
                 "--out", str(reports / "runs.html"), "--json"]) == 0
    printed = capsys.readouterr().out
    paths = {"report": str(reports / "runs.html"), "json": str(reports / "runs.json")}
    assert printed == json.dumps(paths) + "\n"  # one compact line, as it always was
    files = sorted(p for p in ws.root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    names = {p.relative_to(ws.root).as_posix() for p in files}
    # the writers this covers: world, model, trace, runs (config, metrics, summary), reports
    for name in ("data/facts-new.jsonl", "runs/sparse/metrics.jsonl", "runs/sparse/summary.json",
                 "runs/lora/config.json", "reports/diff.json", "reports/runs.json"):
        assert name in names, sorted(names)
    assert any(n.startswith("models/micro/") for n in names) and any(n.startswith("traces/new/") for n in names)
    bad = []
    for path in files:
        try:
            _check_file(path)
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "\n".join(bad)


def test_finetune_json_prints_a_summary_strictly(micro_ws, tmp_path, capsys):
    """`smviz finetune --json` on a finished run prints its summary.json; a metric that is not a number
    (here a NaN token written by some other writer) is printed as null, the rest as it is on disk."""
    from smviz.cli import main

    ws = micro_ws
    run = tmp_path / "sparse"  # outside the workspace, whose every file the test above checks
    shutil.copytree(ws.run("sparse"), run)
    summary = json.loads((run / "summary.json").read_text())
    summary["metrics"]["heldout_nll"]["change"] = math.nan
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    assert "NaN" in (run / "summary.json").read_text()
    capsys.readouterr()
    assert main(["finetune", "--model", str(ws.model("micro")), "--out", str(run), "--workspace", str(ws.root),
                 "--method", "sparse", "--top-t", "16", "--batch-size", "4", "--steps-per-fact", "2", "--eval-every", "2",
                 "--max-facts", "3", "--known-facts", "4", "--heldout-rows", "2", "--device", "cpu", "--json"]) == 0
    printed = strict_loads(capsys.readouterr().out)
    summary["metrics"]["heldout_nll"]["change"] = None
    assert printed == summary and printed["model_hash"] == json.loads((ws.run("sparse") / "summary.json").read_text())["model_hash"]
