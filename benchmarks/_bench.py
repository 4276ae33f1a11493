"""What every benchmark script shares: the CPU's name for the result's machine record, and writing the
result JSON atomically as strict JSON (NaN / inf become null)."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

from smviz.io import write_json_atomic


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_result(path: str | Path, payload: dict) -> None:
    write_json_atomic(path, json_safe(payload))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
