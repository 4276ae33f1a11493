"""smviz: build, record, finetune and explain memory-layer language models."""

from smviz.errors import ConfigError, ModelFileError, SmvizError
from smviz.memory import MemoryConfig, ProductKeyMemory, ValueTable
from smviz.model import MemoryModel
from smviz.usage import UsageMonitor, usage_metrics

__all__ = [
    "ConfigError",
    "MemoryConfig",
    "MemoryModel",
    "ModelFileError",
    "ProductKeyMemory",
    "SmvizError",
    "UsageMonitor",
    "ValueTable",
    "usage_metrics",
]
__version__ = "0.1.0"
