"""The `zsre` format: zsRE as MEND and ROME ship it (zsre_mend_eval.json), one JSON list (or the same
records as JSONL) of `{subject, src, answers, alt, rephrase, loc, loc_ans}` (`case_id` optional: the
record's number). As EasyEdit reads it: the edit makes `src` answer `alt` (target_new) instead of
`answers[0]` (target_true); `rephrase` is the paraphrase; `loc` ("nq question: ...") must keep `loc_ans`.
The canonical prompt is `src` with the subject's first occurrence replaced by `{}`.
(ROME's own loader edits towards `answers[0]` instead; smviz follows EasyEdit.)"""

from __future__ import annotations

from typing import Any

from smviz.data.edits import EditRecord, case_id, edit_records, fields_of
from smviz.data.formats.registry import DataFormat, Records, first_object
from smviz.errors import InputError

KEYS = ("subject", "src", "answers", "alt", "rephrase", "loc", "loc_ans")


def _edit(obj: Any, i: int) -> EditRecord:
    case = fields_of(obj, KEYS, "a zsRE record")
    subject, src, answers = case["subject"], case["src"], case["answers"]
    if not isinstance(answers, list) or not answers:
        raise InputError("answers is empty; it must list the true answer first")
    for name, what in (("alt", "the new answer"), ("rephrase", "the paraphrased question"), ("loc", "the unrelated question"),
                       ("loc_ans", "its answer")):
        if not isinstance(case[name], str) or not case[name].strip():
            raise InputError(f"{name} must be a non-empty string ({what}), got {case[name]!r}")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise InputError(f"answers must be non-empty strings, got {answers!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise InputError("subject must be a non-empty string")
    if not isinstance(src, str) or subject not in src:
        raise InputError(f"subject {subject!r} does not occur in its prompt (src {src!r})")
    return EditRecord(case_id(case.get("case_id", i)), subject, src.replace(subject, "{}", 1), case["alt"], answers[0],
                      (case["rephrase"],), ((case["loc"], case["loc_ans"]),), "zsre")


def sniff(records: Records) -> bool:
    first = first_object(records)
    return first is not None and {"src", "alt", "loc"} <= set(first)


def read(records: Records) -> list[EditRecord]:
    return edit_records(records, _edit)


FORMAT = DataFormat(
    "zsre", "edits",
    "zsRE (MEND/ROME): a JSON list of {subject, src (the question), answers, alt (the new answer), rephrase, "
    "loc, loc_ans}", sniff, read)
