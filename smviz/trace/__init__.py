"""Traces: which memory slots every recorded token read. `Trace` (`trace`) and `TraceWriter` (`writer`), the
inverted index `SlotIndex` (`index`) and the on-disk format of a trace directory — its file names,
column schemas and table builders (`format`). Everything public is importable from here."""

from smviz.trace.format import (
    ACCESS_COLUMNS,
    ACCESSES_SCHEMA,
    INDEX_DIR,
    INDEX_FORMAT,
    META_FILE,
    SCHEMAS,
    TABLES,
    TOKEN_COLUMNS,
    TOKENS_SCHEMA,
    TRACE_FORMAT,
    accesses_table,
    entity_cache_file,
    model_meta,
    partial_dir,
    tokens_table,
)
from smviz.trace.index import SlotIndex
from smviz.trace.trace import Trace
from smviz.trace.writer import TraceWriter

__all__ = [
    "ACCESSES_SCHEMA", "ACCESS_COLUMNS", "INDEX_DIR", "INDEX_FORMAT", "META_FILE", "SCHEMAS", "SlotIndex", "TABLES",
    "TOKENS_SCHEMA", "TOKEN_COLUMNS", "TRACE_FORMAT", "Trace", "TraceWriter", "accesses_table", "entity_cache_file", "model_meta",
    "partial_dir", "tokens_table",
]
