"""Self-contained HTML / Markdown + JSON reports: `build_diff_report` (two checkpoints on new and known
facts), `build_run_report` (one or more finetuning runs), rendered by `render_html` / `render_md` from one
JSON-able dict that is also written as report.json."""

from smviz.report._util import REPORT_FORMAT, ReportError, output_paths, write_report
from smviz.report.diff import build_diff_report
from smviz.report.render import render_html, render_md
from smviz.report.run import build_run_report

__all__ = ["REPORT_FORMAT", "ReportError", "build_diff_report", "build_run_report", "output_paths", "render_html",
           "render_md", "write_report"]
