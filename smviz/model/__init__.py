"""Memory models: `MemoryModel` (a Hugging Face causal LM with product-key memory layers attached),
the architecture registry (`registry`), the built-in presets (`presets`), layer resolution (`layers`),
the on-disk model format with its hash (`format`) and the import of pretrained models as base model
directories (`importing`, `load_base_model`). Everything public is importable from here."""

from smviz.model.format import (
    CONFIG_FILE,
    MANIFEST,
    MEMORY_FILE,
    MODEL_FORMAT,
    REQUIRED_FILES,
    SOURCE_FIELDS,
    TOKENIZER_CONFIG,
    WEIGHTS_FILE,
    has_tokenizer,
    hash_files,
    is_base_model_dir,
    model_dir_hash,
    read_memory_config,
    read_source,
    verify_model_dir,
)
from smviz.model.importing import BUILTIN_MODELS, BuiltinModel, import_model
from smviz.model.layers import resolve_layer
from smviz.model.memory_model import MemoryFFN, MemoryModel, load_base_model
from smviz.model.presets import PRESETS, Preset, preset
from smviz.model.registry import ARCHITECTURES, Architecture, architecture_of, module_at, register_architecture

__all__ = [
    "ARCHITECTURES", "Architecture", "BUILTIN_MODELS", "BuiltinModel", "CONFIG_FILE", "MANIFEST", "MEMORY_FILE",
    "MODEL_FORMAT", "MemoryFFN", "MemoryModel", "PRESETS", "Preset", "REQUIRED_FILES", "SOURCE_FIELDS",
    "TOKENIZER_CONFIG", "WEIGHTS_FILE", "architecture_of", "has_tokenizer", "hash_files", "import_model",
    "is_base_model_dir", "load_base_model", "model_dir_hash", "module_at", "preset", "read_memory_config",
    "read_source", "register_architecture", "resolve_layer", "verify_model_dir",
]
