"""Shared test setup: offline Hugging Face, at most 2 torch threads, and the micro model fixture."""

from __future__ import annotations

import os

# Must happen before any test module imports transformers / huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread (the brief allows up to 2): the test models are tiny, and on a busy 2-core machine
# two OpenMP threads made each micro-model forward ~500x slower (0.5 s instead of 1 ms) from contention.
torch.set_num_threads(1)


@pytest.fixture
def micro_model():
    """A fresh micro preset model (2 Llama blocks, d=64, 256-slot memory on block 1), seed 0."""
    from smviz.model import MemoryModel

    return MemoryModel.from_preset("micro", seed=0)
