"""benchmarks/bench_real_model.py runs end to end on its micro model (`--micro-smoke`): every section
reports a ratio of two timed cases, the retrofit step trains exactly the memory's parameters and the
full step all of them, and the recorded model hashes are those of the model directories it built."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_micro_smoke(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_real_model.py"), "--micro-smoke", "--quick", "--threads", "1",
           "--rounds", "2", "--warmup", "1", "--target-s", "0.01", "--out", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    res, models = result["results"], result["models"]

    params = models["parameters"]  # MemoryModel.parameter_counts(), by module membership
    retrofit = res["retrofit"]
    assert retrofit["retrofit_trainable_parameters"] == params["memory_values"] + params["memory_other"]
    assert retrofit["full_trainable_parameters"] == params["total"] > retrofit["retrofit_trainable_parameters"]
    assert not any(g.startswith("dense") for g in retrofit["retrofit_optimizer_groups"])
    assert {"dense", "dense_no_decay"} <= set(retrofit["full_optimizer_groups"])
    assert retrofit["memory_config_matches_model"] is True

    assert res["batches"]["corpus"] == {"shape": [4, 32], "real_tokens": 128}
    assert res["batches"]["stream"]["shape"][0] == 16
    pairs = [retrofit, res["recorder"], *res["finetune"]["batches"].values()]
    for pair in pairs:
        num, den = pair["cases"].values()
        assert len(num["times_ms"]) == len(den["times_ms"]) == 2
        assert math.isclose(pair["ratio"], num["median_ms"] / den["median_ms"], rel_tol=1e-9)
    for name, goal in result["goals"].items():
        assert goal["pass"] == (goal["value"] <= float(goal["goal"].split()[1])), name
    assert res["finetune"]["stats"].startswith("synthetic")  # the micro model has no slot_stats.safetensors
    assert models["model_hash"] and models["base_hash"] and models["model_hash"] != models["base_hash"]
