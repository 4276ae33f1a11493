"""Shared test setup: offline Hugging Face, at most 2 torch threads, the micro model fixture, and the
device that device-aware tests run on (CPU; `SMVIZ_TEST_DEVICE=cuda` runs them on a GPU)."""

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


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where device-aware tests put models and inputs: $SMVIZ_TEST_DEVICE, default cpu."""
    return torch.device(os.environ.get("SMVIZ_TEST_DEVICE", "cpu"))
