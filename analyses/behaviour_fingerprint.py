"""Fingerprint of what the micro demo writes: run `smviz demo --preset micro` into a fresh workspace and
print, per file, a content hash (JSON files canonicalised: keys sorted, NaN read as null, the workspace's
own path as <WS>, throughput timings dropped — so a change of spelling, place or speed is not a change
of behaviour). Two commits that print the same fingerprint behave the same.

    python analyses/behaviour_fingerprint.py [--workspace DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

# Files whose bytes carry wall-clock times or machine paths rather than behaviour.
SKIP_SUFFIXES = (".tmp",)
SKIP_NAMES = {"demo.log"}
TIMING_KEYS = {"tokens_per_s"}
ROOT = ""  # the workspace path, replaced by <WS> in strings


def _canonical(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str) and ROOT:
        return obj.replace(ROOT, "<WS>")
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def _digest(path: Path) -> str:
    if path.suffix == ".json":
        obj = _canonical(json.loads(path.read_text()))
        data = json.dumps(obj, sort_keys=True).encode()
    elif path.suffix == ".jsonl":
        rows = [_canonical(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        data = json.dumps(rows, sort_keys=True).encode()
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        data = json.dumps(_canonical(pq.read_table(path).to_pylist()), sort_keys=True, default=str).encode()
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(path)
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode())
            h.update(tensors[key].tobytes())
        data = h.digest()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(root: Path) -> dict[str, str]:
    global ROOT
    ROOT = str(root)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.name in SKIP_NAMES or path.suffix in SKIP_SUFFIXES or path.suffix in (".html", ".md"):
            continue
        out[rel] = _digest(path)
    return out


def run_demo(root: Path) -> None:
    """The micro demo into `root`, through the CLI of the smviz this interpreter imports."""
    subprocess.run([sys.executable, "-m", "smviz", "demo", "--preset", "micro", "--workspace", str(root), "--no-app",
                    "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, help="run into this folder (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="write the fingerprint JSON here too")
    parser.add_argument("--existing", action="store_true", help="fingerprint --workspace as it is, without running the demo")
    args = parser.parse_args()
    root = (args.workspace or Path(tempfile.mkdtemp(prefix="smviz-fingerprint-"))).resolve()
    if not args.existing:
        run_demo(root)
    text = json.dumps(fingerprint(root), indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
