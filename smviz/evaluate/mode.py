"""How every evaluation runs a model: in eval mode with gradients off, its training flag restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Model in eval mode and gradients off inside the block; the training flag is restored after."""
    was_training = model.training
    with torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
