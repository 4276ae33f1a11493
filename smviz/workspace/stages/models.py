"""Model directories as the command line makes and shows them: a fresh model from a preset
(`build_model_dir`, what `smviz build` runs) and what a model directory holds (`model_info`, `smviz
info`), with the path checked first so that a wrong one gets a clear error and nothing is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smviz.errors import ModelFileError, WriteError
from smviz.model import MANIFEST, MemoryModel


def build_model_dir(preset: str, out: str | os.PathLike, *, seed: int = 0) -> MemoryModel:
    """A freshly initialised model from `preset`, saved to the model directory `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WriteError(f"cannot write the model into {out}: it is a file, and a model directory is needed there")
    model = MemoryModel.from_preset(preset, seed=seed)
    model.save_pretrained(out)
    return model


def check_model_path(path: str | os.PathLike) -> Path:
    """`path` if it is a directory; else a ModelFileError saying what it is and what is expected."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return path  # a directory, or nothing: loading says what is wrong with it
    what = f"a file ({path.stat().st_size:,} bytes)" if path.is_file() else "not a directory"
    hint = ""
    if (path.parent / MANIFEST).is_file():
        hint = f"; it belongs to the model directory {path.parent}, which is what to pass"
    raise ModelFileError(f"{path} is {what}, not a model directory: `smviz info` takes a model directory written by "
                         f"smviz (e.g. WS/models/NAME or WS/runs/NAME/model){hint}")


def model_info(path: str | os.PathLike) -> tuple[MemoryModel, dict[str, Any]]:
    """The verified model in directory `path` and its description: hash, type, memory, parameter counts."""
    model = MemoryModel.from_pretrained(check_model_path(path))
    info = {
        "path": str(path),
        "model_hash": model.model_hash,
        "model_type": model.config.model_type,
        "memory": model.memory_config.to_dict(),
        "parameters": model.parameter_counts(),
    }
    return model, info
