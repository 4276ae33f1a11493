"""Self-contained HTML / Markdown + JSON reports: `build_diff_report` (two checkpoints on new and known
facts), `build_run_report` (one or more finetuning runs), rendered by `render_html` / `render_md` from one
JSON-able dict that is also written as report.json. Every number comes from `smviz.analysis`; runs are
read through `smviz.analysis.Run`."""

from smviz.report.common import REPORT_FORMAT, check_out_dir, output_paths, write_report
from smviz.report.diff import build_diff_report
from smviz.report.render import render_html, render_md
from smviz.report.run import build_run_report

__all__ = ["REPORT_FORMAT", "build_diff_report", "check_out_dir", "build_run_report", "output_paths", "render_html",
           "render_md", "write_report"]
