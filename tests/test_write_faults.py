"""Write faults end in one line, not a traceback, and leave nothing half-written looking complete: a
read-only output (`record`, `build --out`, `stats --out`) and a full disk (`record`, `finetune`,
`stats`, `report run`), each on a real file system mounted for the test (tmpfs; root only). After the
disk is given room again, the same command finishes and writes what a run on a roomy disk writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from micro_workspace import build_micro_workspace
from smviz.cli import main

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="needs root to mount a small tmpfs (read-only / full-disk faults)")


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Mount:
    """A tmpfs of `size` at `path`; `fill(free)` leaves only `free` bytes; `readonly()`, `roomy()`."""

    def __init__(self, path: Path, size: str = "8m") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")

    def fill(self, free: int) -> None:
        st = os.statvfs(self.path)
        filler = st.f_bavail * st.f_frsize - free
        with open(self.path / "filler", "wb") as f:
            f.write(b"\0" * max(0, filler))

    def roomy(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)
        subprocess.run(["mount", "-o", "remount,size=256m", str(self.path)], check=True)

    def readonly(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def mount(tmp_path):
    m = Mount(tmp_path / "mnt")
    yield m
    m.close()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_micro_workspace(tmp_path_factory.mktemp("ws"), trace=False, runs=("sparse",))


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and lines[-1].startswith(f"smviz {command}: error: "), err
    return lines[-1]


def commands(ws, out: Path) -> dict[str, list[str]]:
    model = str(ws.model("micro"))
    data = ws.data
    return {
        "record": ["record", "--model", model, "--input", str(data / "facts-new.jsonl"), "--out", str(out / "trace"),
                   "--device", "cpu"],
        "build": ["build", "--preset", "micro", "--out", str(out / "model")],
        "stats": ["stats", "--model", model, "--batches", "4", "--batch-size", "4", "--seq-len", "32",
                  "--out", str(out / "stats.safetensors"), "--device", "cpu"],
        "finetune": ["finetune", "--model", model, "--out", str(out / "run"), "--workspace", str(ws.root),
                     "--method", "sparse", "--top-t", "8", "--batch-size", "2", "--steps-per-fact", "2",
                     "--eval-every", "2", "--max-facts", "2", "--known-facts", "2", "--heldout-rows", "1",
                     "--device", "cpu"],
        "report": ["report", "run", str(ws.run("sparse")), "--out", str(out / "report" / "runs.html")],
    }


# the file whose presence says an output is complete
FINISHED = {"record": "trace/meta.json", "finetune": "run/summary.json", "stats": "stats.safetensors",
            "report": "report/runs.html"}


@pytest.mark.parametrize("command", ["record", "build", "stats"])
def test_read_only_output(ws, mount, capsys, command):
    mount.readonly()
    before = snapshot(mount.path)
    assert main(commands(ws, mount.path)[command]) == 2
    line = one_line_error(capsys, command)
    assert "read-only" in line
    assert snapshot(mount.path) == before


@pytest.mark.parametrize("command", ["record", "finetune", "stats", "report"])
def test_full_disk_then_room(ws, mount, tmp_path, capsys, command):
    roomy = tmp_path / "roomy"
    for root in (roomy, mount.path):
        (root / "report").mkdir(parents=True)  # `report` writes into an existing folder
    assert main(commands(ws, roomy)[command]) == 0
    expected = snapshot(roomy)
    capsys.readouterr()

    mount.fill(free=0 if command == "stats" else 16 * 1024)  # statistics of a micro model are a few KB
    assert main(commands(ws, mount.path)[command]) == 2
    line = one_line_error(capsys, "report run" if command == "report" else command)
    assert "no space left" in line
    # nothing half-written looks complete: the file that marks the output finished is not there
    assert not (mount.path / FINISHED[command]).exists()

    mount.roomy()
    assert main(commands(ws, mount.path)[command]) == 0
    after = {k: v for k, v in snapshot(mount.path).items() if k != "filler"}
    volatile = {"report/runs.html", "report/report.json"}  # reports name their inputs' paths
    assert {k: v for k, v in after.items() if k not in volatile} == {k: v for k, v in expected.items() if k not in volatile}
    assert set(after) == set(expected)
