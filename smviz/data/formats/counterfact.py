"""The `counterfact` format: CounterFact of ROME/MEMIT (Meng et al.), one JSON list (or the same records
as JSONL) of cases `{case_id, requested_rewrite: {prompt, subject, target_new: {str}, target_true: {str},
relation_id}, paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts}`.
The rewrite prompt keeps `{}` for the subject; each neighborhood prompt must keep `target_true`, as ROME
measures specificity. `attribute_prompts` and `generation_prompts` are not used."""

from __future__ import annotations

from typing import Any

from smviz.data.edits import EditRecord, case_id, edit_records, fields_of, strings
from smviz.data.formats.registry import DataFormat, Records, first_object
from smviz.errors import InputError


def _target(rewrite: dict[str, Any], name: str) -> str:
    target = fields_of(rewrite[name], ("str",), f"requested_rewrite.{name}")
    if not isinstance(target["str"], str) or not target["str"].strip():
        raise InputError(f"requested_rewrite.{name}.str is empty; it must name the answer")
    return target["str"]


def _edit(obj: Any, i: int) -> EditRecord:
    case = fields_of(obj, ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"), "a CounterFact case")
    rewrite = fields_of(case["requested_rewrite"], ("prompt", "subject", "target_new", "target_true"), "requested_rewrite")
    prompt = rewrite["prompt"]
    if isinstance(prompt, str) and "{}" not in prompt:
        raise InputError(f"requested_rewrite.prompt {prompt!r} has no '{{}}' where the subject goes")
    target_true = _target(rewrite, "target_true")
    neighborhood = strings(case["neighborhood_prompts"], "neighborhood_prompts")
    return EditRecord(case_id(case["case_id"]), rewrite["subject"], prompt, _target(rewrite, "target_new"), target_true,
                      strings(case["paraphrase_prompts"], "paraphrase_prompts"),
                      tuple((p, target_true) for p in neighborhood), "counterfact")


def sniff(records: Records) -> bool:
    first = first_object(records)
    return first is not None and "requested_rewrite" in first


def read(records: Records) -> list[EditRecord]:
    return edit_records(records, _edit)


FORMAT = DataFormat(
    "counterfact", "edits",
    "CounterFact (ROME/MEMIT): a JSON list of {case_id, requested_rewrite: {prompt with {}, subject, target_new: "
    "{str}, target_true: {str}}, paraphrase_prompts, neighborhood_prompts}", sniff, read)
