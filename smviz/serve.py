"""Serving the Streamlit app (`app/` beside the package) for a workspace: the command line it runs,
and `serve_app`, which prints the address and runs it until interrupted. Bound to 127.0.0.1 unless a
host is given explicitly, with usage statistics off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from smviz.errors import SmvizError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def app_command(workspace: str, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The command line that serves the Streamlit app (app/Home.py beside the smviz package)."""
    home = Path(__file__).resolve().parents[1] / "app" / "Home.py"
    if not home.is_file():
        raise SmvizError(f"the Streamlit app is missing ({home} does not exist); run smviz from a checkout of the repository")
    return [sys.executable, "-m", "streamlit", "run", str(home), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def serve_app(workspace: str | os.PathLike, *, port: int = 8501, host: str = "127.0.0.1", announce: bool = True) -> int:
    """Serve the app for `workspace` until interrupted; returns the server's exit status. A host other
    than the local ones prints a warning: the workspace becomes readable from the network."""
    workspace = Path(workspace).resolve()
    if not workspace.is_dir():
        raise SmvizError(f"workspace {workspace} does not exist; build one with `smviz demo --workspace {workspace}`")
    command = app_command(str(workspace), port, host)
    if host not in LOCAL_HOSTS:
        print(f"warning: the app is exposed on the network at {host}:{port}; anyone who can reach it can read "
              f"the workspace {workspace}", file=sys.stderr)
    if announce:
        print(f"smviz app: http://{'localhost' if host in LOCAL_HOSTS else host}:{port}")
    return subprocess.call(command, env={**os.environ, "SMVIZ_WORKSPACE": str(workspace)})
