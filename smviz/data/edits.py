"""The canonical knowledge-editing record, `EditRecord`: what CounterFact (ROME/MEMIT) and zsRE (MEND/ROME)
cases become. `prompt` holds `{}` where the subject goes, as ROME's `requested_rewrite.prompt` does
("The mother tongue of {} is"); `rewrite_prompt` is the prompt with the subject in. Paraphrase prompts
are written out in full (subject included); each neighborhood prompt comes with the answer it must keep.

The canonical JSONL line is `EditRecord.to_dict()`; `EditRecord.from_dict` reads it back, every field
checked (InputError saying what is expected)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smviz.errors import InputError

SOURCES = ("counterfact", "zsre")
"""The editing benchmarks an EditRecord can come from."""

FIELDS = ("id", "subject", "prompt", "target_new", "target_true", "paraphrase_prompts", "neighborhood", "source")


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


@dataclass(frozen=True)
class EditRecord:
    id: str
    subject: str
    prompt: str  # the rewrite prompt with "{}" for the subject, e.g. "The mother tongue of {} is"
    target_new: str  # what the edit should make the model say
    target_true: str  # what the model says before (the true answer)
    paraphrase_prompts: tuple[str, ...]  # the same question put otherwise, subject written in
    neighborhood: tuple[tuple[str, str], ...]  # (prompt about something else, the answer it must keep)
    source: str  # one of SOURCES

    def __post_init__(self) -> None:
        problems = []
        for name in ("id", "subject", "target_new", "target_true"):
            if not _text(getattr(self, name)):
                problems.append(f"{name} must be a non-empty string")
        if not isinstance(self.prompt, str):
            problems.append("prompt must be a string")
        elif self.prompt.count("{}") != 1:
            problems.append(f"prompt {self.prompt!r} must contain '{{}}' exactly once, where the subject goes "
                            f"(it has {self.prompt.count('{}')})")
        if not isinstance(self.paraphrase_prompts, tuple) or not all(_text(p) for p in self.paraphrase_prompts):
            problems.append("paraphrase_prompts must be a tuple of non-empty strings")
        if not isinstance(self.neighborhood, tuple) or not all(
                isinstance(n, tuple) and len(n) == 2 and _text(n[0]) and _text(n[1]) for n in self.neighborhood):
            problems.append("neighborhood must be a tuple of (prompt, answer) pairs of non-empty strings")
        if self.source not in SOURCES:
            problems.append(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if problems:
            raise InputError("; ".join(problems))

    @property
    def rewrite_prompt(self) -> str:
        """The prompt with the subject in place of `{}` (ROME's `prompt.format(subject)`)."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "prompt": self.prompt, "target_new": self.target_new,
                "target_true": self.target_true, "paraphrase_prompts": list(self.paraphrase_prompts),
                "neighborhood": [{"prompt": p, "answer": a} for p, a in self.neighborhood], "source": self.source}

    @classmethod
    def from_dict(cls, d: Any) -> EditRecord:
        """An EditRecord from its canonical JSON object (`to_dict`); InputError saying what is wrong."""
        if not isinstance(d, dict):
            raise InputError(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in FIELDS if k not in d]
        if missing:
            raise InputError(f"missing fields {missing}")
        if not isinstance(d["paraphrase_prompts"], list):
            raise InputError(f"paraphrase_prompts must be a list, got {type(d['paraphrase_prompts']).__name__}")
        if not isinstance(d["neighborhood"], list) or not all(
                isinstance(n, dict) and set(n) == {"prompt", "answer"} for n in d["neighborhood"]):
            raise InputError("neighborhood must be a list of objects {prompt, answer}")
        return cls(d["id"], d["subject"], d["prompt"], d["target_new"], d["target_true"], tuple(d["paraphrase_prompts"]),
                   tuple((n["prompt"], n["answer"]) for n in d["neighborhood"]), d["source"])


def edit_records(records: Any, make: Callable[[Any, int], EditRecord]) -> list[EditRecord]:
    """`make(object, i)` for every object of `records` (a `smviz.data.formats.Records`), with an InputError
    naming the file and the line (or record index) of a bad one, and of an id seen before."""
    out, seen = [], {}
    for i, obj in enumerate(records.objects):
        try:
            record = make(obj, i)
        except InputError as e:
            raise InputError(f"{records.location(i)}: {e}") from None
        if record.id in seen:
            raise InputError(f"{records.location(i)}: duplicate id {record.id!r} "
                             f"(first at {records.location(seen[record.id])})")
        seen[record.id] = i
        out.append(record)
    return out


def fields_of(obj: Any, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """`obj` when it is a JSON object holding every key of `keys`; InputError naming `what` it should be."""
    if not isinstance(obj, dict):
        raise InputError(f"{what} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(f"{what} lacks {missing} (it has {sorted(obj)})")
    return obj


def strings(value: Any, what: str) -> tuple[str, ...]:
    """`value` as a tuple when it is a list of non-empty strings; InputError otherwise."""
    if not isinstance(value, list) or not all(_text(v) for v in value):
        raise InputError(f"{what} must be a list of non-empty strings")
    return tuple(value)


def case_id(value: Any, what: str = "case_id") -> str:
    """A case id (a JSON number or string) as the record's string id."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
        raise InputError(f"{what} must be a number or a non-empty string, got {value!r}")
    return str(value)
