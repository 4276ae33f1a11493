"""Memory models: `MemoryModel` (a Hugging Face causal LM with product-key memory layers attached),
the architecture registry (`registry`), the built-in presets (`presets`), layer resolution (`layers`),
the on-disk model format with its hash (`format`) and the import of pretrained models as base model
directories (`importing`, `load_base_model`). Everything public is importable from here,
imported on first use (`smviz.lazy`)."""

from smviz.lazy import lazy_exports

EXPORTS = {
    ".format": ["CONFIG_FILE", "MANIFEST", "MEMORY_FILE", "MODEL_FORMAT", "REQUIRED_FILES", "SOURCE_FIELDS",
                "TOKENIZER_CONFIG", "WEIGHTS_FILE", "has_tokenizer", "hash_files", "is_base_model_dir",
                "model_dir_hash", "read_memory_config", "read_source", "verify_model_dir"],
    ".importing": ["BUILTIN_MODELS", "BuiltinModel", "import_model"],
    ".layers": ["resolve_layer"],
    ".memory_model": ["MemoryFFN", "MemoryModel", "load_base_model"],
    ".presets": ["PRESETS", "Preset", "preset"],
    ".registry": ["ARCHITECTURES", "Architecture", "architecture_of", "module_at", "register_architecture"],
}
__all__ = lazy_exports(__name__, EXPORTS)
