"""The reports stage: a report written to a file (`make_report`, what `smviz report` runs) and the
demo's reports — the diff report of its first stream and the run report of all of them (`REPORTS`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smviz.data.facts import read_facts, write_facts
from smviz.errors import WriteError
from smviz.report import build_diff_report, build_run_report, output_paths, render_html, render_md, write_report
from smviz.train.rundir import FinetuneRunDir
from smviz.workspace.stages.base import Plan, Stage



def make_report(kind: str, out: str | os.PathLike, fmt: str = "html", **inputs: Any) -> tuple[Path, Path]:
    """Build the `kind` report ("diff": `build_diff_report(**inputs)`, "run": `build_run_report(**inputs)`),
    render it as `fmt` (html or md) and write it to `out` with its JSON beside it; returns both paths.
    A bad `out` or `fmt` is refused before any work."""
    output_paths(out, fmt)
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise WriteError(f"cannot write {out}: directory {parent} does not exist")
    report = build_diff_report(**inputs) if kind == "diff" else build_run_report(**inputs)
    document = render_html(report) if fmt == "html" else render_md(report)
    return write_report(report, document, out, fmt)


def _reports_run(plan: Plan) -> str:
    """The diff report of the first stream (base model → its finetuned model, on the stream's facts)
    and the run report of the streams side by side, in WS/reports/."""
    ws, first = plan.ws, plan.methods[0]
    write_facts(ws.stream_facts, read_facts(ws.facts("new"))[: plan.stream["max_facts"]])
    make_report("diff", ws.diff_report(first), before_dir=plan.model_dir, after_dir=FinetuneRunDir(ws.run(first)).model_dir,
                facts_path=ws.stream_facts, known_path=ws.facts("known"), heldout_path=ws.corpus("heldout"),
                run_dir=ws.run(first))
    make_report("run", ws.runs_report, run_dirs=[ws.run(m) for m in plan.methods])
    return f"→ {ws.diff_report(first)}, {ws.runs_report} (numbers in the .json beside each)"


REPORTS = Stage(
    "reports",
    title=lambda plan: f"a diff report of the {plan.methods[0]} stream and a run report of all {len(plan.methods)}",
    done=lambda plan: plan.ws.diff_report(plan.methods[0]).is_file() and plan.ws.runs_report.is_file(),
    run=_reports_run,
    skipped=lambda plan: f"reports already in {plan.ws.reports}",
)
