"""Atomic writes: every file and directory smviz writes appears complete or not at all (a temp
sibling, then a rename), so an interrupted command leaves the last good state on disk. A write that
fails (read-only folder, full disk, a file where a folder must be) raises WriteError naming the path.
JSON is strict: NaN and infinities are written as null."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from smviz.errors import WriteError

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOTDIR: "a file stands where a folder must be", errno.EEXIST: "a file stands where a folder must be",
            errno.EDQUOT: "disk quota exceeded"}


def write_error(path: str | os.PathLike, error: OSError) -> WriteError:
    """The one-line WriteError for an OSError met while writing `path`."""
    reason = _REASONS.get(error.errno or 0, error.strerror or str(error))
    return WriteError(f"cannot write {path}: {reason}")


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create folder `path` (and its parents); a WriteError if it cannot be, e.g. a file has its name."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"cannot write {path}: it is a file, and a folder is needed there")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    return path


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write `path` through a temp file in the same folder that replaces it only if the block
    completes; on any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it a normal file's mode
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_png_atomic(path: str | os.PathLike, fig: Any, dpi: int = 110) -> None:
    """A matplotlib figure written as PNG, atomically, without a software-version entry in its metadata
    (so that a rerun of a study writes the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, metadata={"Software": None}, format="png")
    write_bytes_atomic(path, buf.getvalue())


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, so it serialises as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_text(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of `obj` (non-finite numbers as null), the one way smviz writes JSON."""
    return json.dumps(strict_json(obj), indent=indent, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json_text(obj) + "\n")


def append_jsonl(path: str | os.PathLike, rows: list[Any]) -> None:
    """Append strict-JSON lines to `path` (an append-only log: a torn last line is the reader's to skip)."""
    try:
        with open(path, "a", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json_text(row, indent=None) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from None


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build folder `path` in a temp sibling that replaces it only if the block completes."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
