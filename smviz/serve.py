"""Serving the Streamlit app (`app/` beside the package) for a workspace: the command line it runs,
and `serve_app`, which prints the address and runs the server as a child process until it exits,
passing SIGTERM and SIGINT on to it (so stopping `smviz app` stops the server too). Bound to
127.0.0.1 unless a host is given explicitly, with usage statistics off; the toolbar is minimal, no
Deploy button (--client.toolbarMode minimal, as app/.streamlit/config.toml and .streamlit/config.toml say)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from smviz.errors import SmvizError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def app_command(port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The command line that serves the Streamlit app (app/Home.py beside the smviz package)."""
    home = Path(__file__).resolve().parents[1] / "app" / "Home.py"
    if not home.is_file():
        raise SmvizError(f"the Streamlit app is missing ({home} does not exist); run smviz from a checkout of the repository")
    return [sys.executable, "-m", "streamlit", "run", str(home), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal"]  # no Deploy button (also app/.streamlit/config.toml)


def serve_app(workspace: str | os.PathLike, *, port: int = 8501, host: str = "127.0.0.1", announce: bool = True) -> int:
    """Serve the app for `workspace` until interrupted; returns the server's exit status. A host other
    than the local ones prints a warning: the workspace becomes readable from the network."""
    workspace = Path(workspace).resolve()
    if not workspace.is_dir():
        raise SmvizError(f"workspace {workspace} does not exist; build one with `smviz demo --workspace {workspace}`")
    command = app_command(port, host)
    if host not in LOCAL_HOSTS:
        print(f"warning: the app is exposed on the network at {host}:{port}; anyone who can reach it can read "
              f"the workspace {workspace}", file=sys.stderr)
    if announce:
        print(f"smviz app: http://{'localhost' if host in LOCAL_HOSTS else host}:{port}")
    return run_forwarding_signals(command, env={**os.environ, "SMVIZ_WORKSPACE": str(workspace)})


def run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run `command` as a child and wait for it; SIGTERM or SIGINT received meanwhile is sent on to the
    child (and waited for), so the child never outlives this process. Returns the child's exit status.
    Signal handlers can be set only in the main thread; elsewhere the child is simply waited for."""
    if threading.current_thread() is not threading.main_thread():
        return subprocess.call(command, env=env)
    child: subprocess.Popen | None = None
    pending: list[int] = []  # a signal that arrived before the child was started

    def forward(signum: int, frame: object) -> None:
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        child = subprocess.Popen(command, env=env)
        for signum in pending:
            child.send_signal(signum)
        return child.wait()
    finally:
        if child is not None and child.poll() is None:  # an exception in wait(): do not leave the child behind
            child.terminate()
            child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_until_serving(url: str, proc: subprocess.Popen, timeout_s: float) -> str | None:
    """Poll the app at `url` (its /_stcore/health endpoint) until it answers; None once it does, else why
    not: the process `proc` that serves it exited, or `timeout_s` passed. For scripts and tests that
    start the app and then drive it."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            return f"exited with {proc.returncode} before serving"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            return f"did not answer on {url} within {timeout_s:.0f}s"
        time.sleep(0.25)
