"""The `edits` format: smviz's canonical editing records, JSONL, one `EditRecord.to_dict()` per line
(`{id, subject, prompt with {}, target_new, target_true, paraphrase_prompts, neighborhood: [{prompt,
answer}], source}`), as `smviz data convert` writes a CounterFact or zsRE file."""

from __future__ import annotations

from smviz.data.edits import FIELDS, EditRecord, edit_records
from smviz.data.formats.registry import DataFormat, Records, first_object


def sniff(records: Records) -> bool:
    first = first_object(records)
    return records.layout == "jsonl" and first is not None and set(FIELDS) <= set(first)


def read(records: Records) -> list[EditRecord]:
    return edit_records(records, lambda obj, i: EditRecord.from_dict(obj))


FORMAT = DataFormat(
    "edits", "edits",
    "smviz's canonical editing records, as `smviz data convert` writes them: one {id, subject, prompt with {}, "
    "target_new, target_true, paraphrase_prompts, neighborhood: [{prompt, answer}], source} per line", sniff, read)
