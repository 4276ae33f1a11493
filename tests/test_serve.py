"""`smviz app` for real: the command is started in its own process (a session of its own, so the
test can clean up the whole group whatever happens), serves the app, and is stopped by a signal sent
to the smviz process alone; the Streamlit server it started must be gone too, not left serving.
A host outside the local names prints the network warning; 127.0.0.2 is such a host and still
loopback, so nothing is exposed. The workspace is an empty folder: the server answers its health
check before any page (and so any workspace file) is read."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_S = 60.0  # interpreter + streamlit start-up, on a busy 2-core machine
STOP_S = 30.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@pytest.mark.parametrize("signum, host", [(signal.SIGTERM, "127.0.0.1"), (signal.SIGINT, "127.0.0.2")],
                         ids=["sigterm-localhost", "sigint-other-host"])
def test_signal_to_smviz_app_stops_its_server(tmp_path, signum, host):
    port = _free_port(host)
    url = f"http://{host}:{port}"
    err_path = tmp_path / "stderr.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "smviz", "app", "--workspace", str(tmp_path), "--port", str(port), "--host", host]
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(url):
            assert proc.poll() is None, f"`smviz app` exited with {proc.returncode}:\n{err_path.read_text()}"
            assert time.monotonic() < deadline, f"no answer on {url} within {SERVER_START_S:.0f}s:\n{err_path.read_text()}"
            time.sleep(0.25)
        children = psutil.Process(proc.pid).children(recursive=True)
        servers = [c for c in children if "streamlit" in " ".join(c.cmdline())]
        assert servers, f"no streamlit process under `smviz app` (pid {proc.pid}): {[c.cmdline() for c in children]}"

        os.kill(proc.pid, signum)  # the smviz process only, as `kill PID` or a service manager does
        proc.wait(timeout=STOP_S)
        _, alive = psutil.wait_procs(children, timeout=STOP_S)
        assert not alive, f"still running after `smviz app` got {signal.Signals(signum).name}: {[p.cmdline() for p in alive]}"
        assert not _healthy(url)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only if something was left behind
        except ProcessLookupError:
            pass
        proc.wait(timeout=STOP_S)
    warning = "exposed on the network"
    assert (warning in err_path.read_text()) == (host == "127.0.0.2"), err_path.read_text()
