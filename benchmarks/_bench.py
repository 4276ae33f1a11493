"""What the benchmark scripts share: interleaved timing of cases (`Case`, `measure`), the result's
machine record and closing totals line, and writing the result JSON atomically as strict JSON (NaN /
inf become null)."""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smviz.io import write_json_atomic


def write_result(path: str | Path, payload: dict) -> None:
    """The result JSON, atomically and strict (smviz.io: NaN / inf become null)."""
    write_json_atomic(path, payload)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(device: Any = "cpu", *, load_start: tuple[float, ...] | None = None, **extra: Any) -> dict:
    """Where a result was measured: versions, device, CPUs, `extra` fields, and the load average at the
    start (`load_start`, from os.getloadavg()) and now."""
    import torch

    device = torch.device(device)
    record = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        **extra,
    }
    if load_start is not None:
        record["load_average_1_5_15_min_at_start"] = load_start
        record["load_average_1_5_15_min_at_end"] = os.getloadavg()
    return record


def print_totals(total_s: float, load_start: tuple[float, ...]) -> float:
    """Print the run's wall time, peak RSS and load average; returns the peak RSS in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total runtime {total_s:.1f}s; peak RSS {peak:.0f} MB; load average (1 min) {load_start[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end")
    return peak


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Case:
    what: str
    fn: Callable[[], None]
    setup: Callable[[], None] | None = None  # run before each timed step, outside the clock (heavy cases)
    heavy: bool = False  # one step per round, no inner-loop calibration
    key: str = ""  # a short name for tables and JSON
    inner: int = 1
    times: list[float] = field(default_factory=list)  # seconds per step, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _sync(device: Any) -> None:
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measure(cases: list[Case], *, warmup: int, rounds: int, target_s: float, label: str, device: Any = None) -> None:
    """Warm up every case, calibrate an inner loop for cheap ones (so a round spans `target_s`), then
    time `rounds` interleaved rounds, each in a new random order, so load from other processes hits
    every case alike. On CUDA every timing is synchronised."""
    for c in cases:
        for _ in range(warmup):
            if c.setup:
                c.setup()
            c.fn()
        _sync(device)
        if not c.heavy:
            if c.setup:
                c.setup()
            t = time.perf_counter()
            c.fn()
            _sync(device)
            dt = time.perf_counter() - t
            c.inner = max(1, min(1000, math.ceil(target_s / max(dt, 1e-6))))
    t0 = time.perf_counter()
    rng = random.Random(0)
    for r in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for c in order:
            if c.setup:
                c.setup()
            gc.collect()
            _sync(device)
            t = time.perf_counter()
            for _ in range(c.inner):
                c.fn()
            _sync(device)
            c.times.append((time.perf_counter() - t) / c.inner)
        log(f"  [{label}] round {r + 1}/{rounds} done ({time.perf_counter() - t0:.1f}s)")



def paired_ratio(num: Case, den: Case) -> dict:
    """Ratio of medians, plus the median and spread of the per-round ratios."""
    per_round = [a / b for a, b in zip(num.times, den.times)]
    return {
        "ratio": num.median / den.median,
        "median_of_round_ratios": statistics.median(per_round),
        "round_ratios": per_round,
    }
