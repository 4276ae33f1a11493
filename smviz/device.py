"""Device choice and seeding: the one place that turns `--device auto|cpu|cuda[:i]` into a torch device."""

from __future__ import annotations

import random

import numpy as np
import torch

from smviz.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:index]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
