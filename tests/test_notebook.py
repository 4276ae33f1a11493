"""The walkthrough notebook runs from top to bottom against the current library (its code cells are
executed in order in one namespace, as a kernel would)."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "analyses" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 8
    namespace: dict = {}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        exec(compile(source, f"{NOTEBOOK.name}, cell {i}", "exec"), namespace)
    assert namespace["summary"]["method"] == "sparse"
    assert not namespace["audit"]["violation"].any()
    assert len(namespace["slots"]) > 0 and namespace["trace"].n_tokens > 0
    assert set(namespace["alignment"]["fact_id"]) == set(namespace["run"].steps["fact_id"])
