"""Atomic writes: every file and directory smviz writes appears complete or not at all (a temp
sibling, then a rename), so an interrupted command leaves the last good state on disk."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write `path` through a temp file in the same folder that replaces it only if the block
    completes; on any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it a normal file's mode
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished temp directory into place; an older `dst` is swapped out and deleted only after."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old)
    else:
        src.rename(dst)
