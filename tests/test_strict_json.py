"""Strict JSON everywhere: smviz writes null for NaN and infinities, never the `NaN` / `Infinity`
tokens that Python's json accepts but JSON (RFC 8259), `jq`, browsers and strict readers refuse.
Checked three ways: smviz.io's writers on non-finite values; every committed JSON file (results,
the notebook) under analyses/ and benchmarks/results/; and every .json / .jsonl file of a micro
workspace built end to end (model, statistics, trace, three finetuning runs, a diff report and a
run report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

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


def test_every_json_of_a_micro_workspace_is_strict(tmp_path_factory):
    from micro_workspace import build_micro_workspace

    from smviz.cli import main

    ws = build_micro_workspace(tmp_path_factory.mktemp("strict") / "ws", stats_batches=4, runs=("sparse", "full", "lora"))
    reports = ws.root / "reports"
    reports.mkdir()
    assert main(["report", "diff", "--before", str(ws.model("micro")), "--after", str(ws.run("sparse") / "model"),
                 "--facts", str(ws.data / "facts-new.jsonl"), "--known", str(ws.data / "facts-known.jsonl"),
                 "--out", str(reports / "diff.html")]) == 0
    assert main(["report", "run", *(str(ws.run(m)) for m in ("sparse", "full", "lora")),
                 "--out", str(reports / "runs.html")]) == 0
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
