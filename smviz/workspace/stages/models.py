"""Model directories as the command line makes and shows them: a fresh model from a preset
(`build_model_dir`, what `smviz build` runs) and what a model directory holds (`model_info`, `smviz
info`), with the path checked first so that a wrong one gets a clear error and nothing is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smviz.errors import ModelFileError, WriteError
from smviz.model import MANIFEST, MemoryModel, is_base_model_dir, load_base_model


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


def model_info(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The verified model in directory `path` and its description: hash, type, memory (None for a base
    model, which comes with its source record), parameter counts. The model is a MemoryModel, or the
    plain LM of a base model."""
    path = check_model_path(path)
    if _holds_base_model(path):
        lm, _, metadata = load_base_model(path)
        n = sum(p.numel() for p in lm.parameters())
        info = {"path": str(path), "model_hash": metadata["model_hash"], "model_type": metadata["model_type"],
                "memory": None, "source": metadata["source"], "parameters": {"dense": n, "total": n}}
        return lm, info
    model = MemoryModel.from_pretrained(path)
    info = {
        "path": str(path),
        "model_hash": model.model_hash,
        "model_type": model.config.model_type,
        "memory": model.memory_config.to_dict(),
        "parameters": model.parameter_counts(),
    }
    return model, info


def _holds_base_model(path: Path) -> bool:
    """Whether memory.json says base model; on any doubt False, and the loader's verification (every
    file's sha256) says what is wrong with the directory."""
    try:
        return is_base_model_dir(path)
    except ModelFileError:
        return False
