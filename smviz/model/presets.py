"""The built-in models: a Hugging Face config (as keyword arguments) plus the memory attached to it,
by name (`micro` for tests, `micro-gpt2`, `tiny` for the demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smviz.errors import ConfigError
from smviz.memory import MemoryConfig


@dataclass(frozen=True)
class Preset:
    """A built-in model: an HF config (as keyword arguments) plus the memory attached to it."""

    model_type: str
    hf: dict[str, Any]
    memory: MemoryConfig
    description: str = ""


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "llama",
        dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            tie_word_embeddings=True,
        ),
        MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=32, layers=(1,)),
        "tests and CI: 2 Llama blocks, d=64, 256 slots; builds and runs in milliseconds",
    ),
    "micro-gpt2": Preset(
        "gpt2",
        dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0),
        MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=32, layers=(1,)),
        "the micro shape on GPT-2 blocks",
    ),
    # The demo's default model: the paper's memory shape (4 heads, top-32, one memory replacing the
    # FFN of a middle block) scaled down for 2 CPU cores. The other blocks' FFNs are narrow (64, not
    # 4·d) so that the facts land in the memory rather than in dense weights: analyses/memory_usage.md.
    "tiny": Preset(
        "llama",
        dict(
            vocab_size=4096, hidden_size=256, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
        MemoryConfig(n_keys=256, heads=4, knn=32, k_dim=128, v_dim=256, layers=(2,)),
        "4 Llama blocks, d=256, FFN 64; 65,536-slot memory (4 heads x top-32) replacing the FFN of block 2",
    ),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
