"""smviz: build, record, finetune and explain memory-layer language models. The names below are imported
on first use (`smviz.lazy`), so `import smviz.workspace.layout` alone does not load torch or transformers."""

from smviz.lazy import lazy_exports

EXPORTS = {
    ".errors": ["ConfigError", "ModelFileError", "SmvizError"],
    ".memory": ["MemoryConfig", "ProductKeyMemory", "ValueTable"],
    ".model": ["MemoryModel"],
    ".usage": ["UsageMonitor", "usage_metrics"],
}
__all__ = lazy_exports(__name__, EXPORTS)
__version__ = "0.1.0"
