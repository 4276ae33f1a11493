"""Memory models: `MemoryModel` (a Hugging Face causal LM with product-key memory layers attached),
the architecture registry (`registry`), the built-in presets (`presets`), layer resolution (`layers`)
and the on-disk model format with its hash (`format`). Everything public is importable from here."""

from smviz.model.format import (
    CONFIG_FILE,
    MANIFEST,
    MEMORY_FILE,
    MODEL_FORMAT,
    REQUIRED_FILES,
    TOKENIZER_CONFIG,
    WEIGHTS_FILE,
    has_tokenizer,
    hash_files,
    model_dir_hash,
    read_memory_config,
    verify_model_dir,
)
from smviz.model.layers import resolve_layer
from smviz.model.memory_model import MemoryFFN, MemoryModel
from smviz.model.presets import PRESETS, Preset, preset
from smviz.model.registry import ARCHITECTURES, Architecture, architecture_of, module_at, register_architecture

__all__ = [
    "ARCHITECTURES", "Architecture", "CONFIG_FILE", "MANIFEST", "MEMORY_FILE", "MODEL_FORMAT", "MemoryFFN",
    "MemoryModel", "PRESETS", "Preset", "REQUIRED_FILES", "TOKENIZER_CONFIG", "WEIGHTS_FILE", "architecture_of",
    "has_tokenizer", "hash_files", "model_dir_hash", "module_at", "preset", "read_memory_config",
    "register_architecture", "resolve_layer", "verify_model_dir",
]
