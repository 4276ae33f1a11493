"""The architecture registry: where each Hugging Face model family keeps its transformer blocks, the
FFN of a block and its final norm, keyed by the HF `config.model_type`. Teaching smviz a new family
is one `register_architecture` call; a name can be registered once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from torch import nn

from smviz.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps its parts, as attribute paths from the `*ForCausalLM` module."""

    blocks: str
    """Dotted path to the `nn.ModuleList` of transformer blocks, e.g. 'model.layers'."""
    ffn: str
    """Attribute of one block that holds its feed-forward module, called as `ffn(hidden_states)`."""
    hidden_size: str = "hidden_size"
    """Attribute of the HF config that holds the model width."""
    final_norm: str = "model.norm"
    """Dotted path to the norm applied before the unembedding (used by vocabulary projection)."""


ARCHITECTURES: dict[str, Architecture] = {}
"""HF model_type → Architecture; fill it through `register_architecture`."""


def register_architecture(model_type: str, architecture: Architecture) -> None:
    """Teach smviz a new model family, keyed by its HF `config.model_type`; a name already registered
    is refused (ConfigError), so two modules cannot silently disagree about one family."""
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"an architecture needs a non-empty model_type name, got {model_type!r}")
    if not isinstance(architecture, Architecture):
        raise ConfigError(f"register_architecture takes an Architecture, got {type(architecture).__name__}")
    if model_type in ARCHITECTURES:
        raise ConfigError(f"architecture {model_type!r} is already registered ({ARCHITECTURES[model_type]})")
    ARCHITECTURES[model_type] = architecture


def architecture_of(config: transformers.PretrainedConfig) -> Architecture:
    """The registered Architecture of a HF config's model_type; ConfigError saying how to register one."""
    try:
        return ARCHITECTURES[config.model_type]
    except KeyError:
        raise ConfigError(
            f"unsupported architecture {config.model_type!r} (supported: {sorted(ARCHITECTURES)}). "
            "Register it with smviz.model.register_architecture("
            f"{config.model_type!r}, Architecture(blocks='<path to the block list>', ffn='<FFN attribute>', "
            "hidden_size='<config width attribute>'))"
        ) from None


def module_at(module: nn.Module, path: str) -> Any:
    """The submodule (or attribute) at a dotted attribute path, e.g. 'model.norm'."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


register_architecture("llama", Architecture("model.layers", "mlp"))  # Llama 1-3, SmolLM, TinyLlama, ...
register_architecture("mistral", Architecture("model.layers", "mlp"))
register_architecture("qwen2", Architecture("model.layers", "mlp"))
register_architecture("gpt2", Architecture("transformer.h", "mlp", hidden_size="n_embd", final_norm="transformer.ln_f"))
