"""The `documents` format: texts to learn from or record, JSONL — `{"id", "text"}` per line ("id"
optional: default the document's number, as `smviz record` numbers them). Canonical record:
`smviz.data.schema.Document` (also `smviz.data.documents.Document`). Sniffed last among the built-in
formats: a facts record has an "id" too."""

from __future__ import annotations

from smviz.data.formats.registry import DataFormat, Records, first_object, jsonl_objects, record_id
from smviz.data.schema import Document, json_kind
from smviz.errors import InputError


def read(records: Records) -> list[Document]:
    docs: list[Document] = []
    seen: set[str] = set()
    for where, obj in jsonl_objects(records, "documents"):
        try:
            if not isinstance(obj, dict):
                raise InputError(f'expected a JSON object {{"id", "text"}}, got {json_kind(obj)}')
            text = obj.get("text")
            if not isinstance(text, str):
                raise InputError(f"'text' must be a string, got {json_kind(text)}")
            if not text.strip():
                raise InputError("the text is empty; a document needs some text")
            doc = Document(record_id(obj, str(len(docs))), text)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if doc.id in seen:
            raise InputError(f"{where}: duplicate id {doc.id!r}; ids must be unique")
        seen.add(doc.id)
        docs.append(doc)
    return docs


def sniff(records: Records) -> bool:
    first = first_object(records)
    return first is not None and "text" in first and "statements" not in first


FORMAT = DataFormat(name="documents", kind="documents", help='texts: {"id", "text"} per line',
                    sniff=sniff, read=read)
