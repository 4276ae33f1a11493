"""The data formats users bring, as a registry (`smviz.data.formats.registry`): each format, one module
here, says what kind of data it holds (`facts`, `qa`, `documents`, `edits`), how to recognise a file of
it by content, and how to read it into smviz's canonical records. `read_data(path, format=None)`
detects the format unless named.

Built-in formats, in detection order (facts before documents, since a facts record has an "id" too):
`smviz` and `simple` (facts), `counterfact`, `zsre` and `edits` (smviz's canonical editing records; edits), `qa`,
`documents`."""

from __future__ import annotations

from smviz.data.formats.registry import (
    KIND_NOUNS,
    KINDS,
    MAX_LINE_CHARS,
    DataFormat,
    Records,
    data_formats,
    detect,
    detect_kind,
    format_names,
    get_format,
    load_records,
    read_data,
    register_format,
)

from smviz.data.formats import counterfact, documents, qa, simple, smviz_edits, smviz_facts, zsre  # noqa: E402 (after the registry)

__all__ = ["KIND_NOUNS", "KINDS", "MAX_LINE_CHARS", "DataFormat", "Records", "data_formats", "detect", "detect_kind", "format_names", "get_format",
           "load_records", "read_data", "register_format"]

for _module in (smviz_facts, simple, counterfact, zsre, smviz_edits, qa, documents):
    register_format(_module.FORMAT)
