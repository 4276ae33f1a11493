"""What the report builders share: JSON-safe records and numbers, output paths and atomic writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smviz.errors import ConfigError, WriteError
from smviz.io import write_json_atomic, write_text_atomic

REPORT_FORMAT = "smviz-report/1"
FORMATS = ("html", "md")


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as JSON-safe records (NaN and ±inf → null, numpy scalars → Python)."""
    return json.loads(df.to_json(orient="records", double_precision=15, default_handler=str))


def number(x: Any) -> Any:
    """A JSON-safe scalar: numpy → Python, NaN/inf → None."""
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def rel_drop(start: float | None, end: float | None) -> float | None:
    """(start − end) / start; None when either is missing or start is 0 (as `smviz.train.protocol.summarize`)."""
    return None if start is None or end is None or start == 0 else (start - end) / start


def output_paths(out: str | os.PathLike, fmt: str) -> tuple[Path, Path]:
    """(document path, JSON path): `--out report.html` → report.html + report.json; md → report.md + report.json."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    doc = out.with_suffix("." + fmt)
    js = out.with_suffix(".json")
    if doc == js:
        raise ConfigError(f"--out {out} would write the report and its JSON to one file; name it e.g. report.{fmt}")
    return doc, js


def check_out_dir(out: str | os.PathLike) -> None:
    """Refuse an output whose folder does not exist, before any report is computed."""
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise WriteError(f"cannot write {out}: directory {parent} does not exist")


def write_report(report: dict[str, Any], document: str, out: str | os.PathLike, fmt: str) -> tuple[Path, Path]:
    """Write the rendered document and report.json next to each other, each atomically."""
    doc, js = output_paths(out, fmt)
    write_json_atomic(js, report)
    write_text_atomic(doc, document)
    return doc, js
