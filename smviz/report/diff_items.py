"""What a diff report compares, by kind of --facts file: new facts (`FactItems`: learning EM/F1, answers
per question) or knowledge-editing records (`EditItems`: the six editing metrics, the greedy continuation
of each rewrite prompt). Each kind gives its summary rows and per-item table (`compare`), the texts whose
reads under the before model define an item's trained slots (`documents`), and the access-shift probe
(`access_shift`). Questions and prompts are put to the models in the prompt format of the finetuning run
that made the after model (`question_format`), as the run itself asked them. `read_diff_items` reads
either kind, detected by content (smviz.data.formats)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from smviz.analysis import Run, fact_shift, question_access_shift
from smviz.analysis.shift import prompt_access_shift
from smviz.data.edits import EditRecord
from smviz.data.facts import STATEMENT, Entity, Fact, fact_doc_id, parse_fact_doc_id, read_facts
from smviz.data.formats import KIND_NOUNS, data_formats, load_records
from smviz.data.prompts import edit_prompt_format, get_prompt_format
from smviz.errors import InputError
from smviz.evaluate import EDIT_METRICS, EDIT_PROTOCOL, answer_questions, edit_scores, generate_answers, mean_edit_metrics, qa_metrics
from smviz.model import MemoryModel
from smviz.record import Document
from smviz.report.common import number, records, rel_drop

CONTINUATION_TOKENS = 8
"""Greedy tokens decoded after each rewrite prompt for the per-record table."""
SUBJECT_LABEL = "SUBJECT"
"""The label of a record's subject when entities come from the rule-based fallback (no spaCy pipeline)."""


def metric_row(name: str, before: float | None, after: float | None, *, drop: bool = False) -> dict[str, Any]:
    """One summary row: before, after, change (after − before) and, with `drop`, relative_drop (else None)."""
    return {"metric": name, "before": number(before), "after": number(after),
            "change": None if after is None or before is None else number(after - before),
            "relative_drop": number(rel_drop(before, after)) if drop else None}


def question_format(run: Run | None) -> str:
    """The prompt format `run` asked its questions in: its evaluation protocol (config.json) names it when
    it is not qa (`EvalSets.describe`); qa without a run."""
    return (run.identity.get("evaluation") or {}).get("prompt_format", "qa") if run is not None else "qa"


def asked_in(prompt_format: str) -> str:
    """A protocol's note of the prompt format questions are asked in: nothing for qa, the default."""
    return "" if prompt_format == "qa" else f", asked in prompt format {prompt_format}"


@dataclass(frozen=True)
class Comparison:
    """A kind's numbers: summary rows and what they measured, per-item rows (without the slot columns the
    report adds), how those were measured, and more of the per-item section (e.g. the facts' questions)."""

    metrics: list[dict[str, Any]]
    protocol: str
    rows: list[dict[str, Any]]
    table_protocol: str
    extra: dict[str, Any]


@dataclass(frozen=True)
class FactItems:
    path: Path
    items: list[Fact]
    prompt_format: str = "qa"  # how the questions are put to the model (the run's, when known)
    kind = "facts"
    noun = "facts"
    texts_desc = "the fact's statements"
    texts = "the facts' statements"

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.items]

    def for_run(self, run: Run | None, prompt_format: str | None = None) -> FactItems:
        """The facts asked in `prompt_format`, else in the format `run` asked its questions in."""
        return replace(self, prompt_format=prompt_format or question_format(run))

    def documents(self, tokenizer: Any) -> list[Document]:
        return [Document(fact_doc_id(f.id, STATEMENT, i), s) for f in self.items for i, s in enumerate(f.statements)]

    def item_of(self, doc_ids: pd.Series) -> pd.Series:
        return doc_ids.map({d: parse_fact_doc_id(d).fact_id for d in doc_ids.unique()})

    def entities(self) -> list[Entity]:
        return [e for f in self.items for e in f.entities]

    def compare(self, before: MemoryModel, after: MemoryModel) -> Comparison:
        pf = self.prompt_format
        learn_b, learn_a = (qa_metrics(answer_questions(m, self.items, prompt_format=pf)) for m in (before, after))
        metrics = [metric_row(f"learning_{m}", learn_b[m], learn_a[m]) for m in ("em", "f1")]
        shift = fact_shift(before, after, self.items, prompt_format=pf)
        rows = []
        for f in self.items:
            q = shift[shift["fact_id"] == f.id]
            rows.append({
                "fact_id": f.id, "subject": f.subject, "relation": f.relation, "gold": f.answer, "statement": f.statements[0],
                "questions": int(len(q)),
                "answer_before": q["answer_before"].iloc[0] if len(q) else None,
                "answer_after": q["answer_after"].iloc[0] if len(q) else None,
                "f1_before": number(q["f1_before"].mean()) if len(q) else None,
                "f1_after": number(q["f1_after"].mean()) if len(q) else None,
            })
        return Comparison(
            metrics, f"Learning: held-out question templates of the {len(self.items)} facts of {self.path.name}{asked_in(pf)}",
            rows, f"Answers and F1 from smviz.analysis.fact_shift (held-out templates{asked_in(pf)}; answer_* is the first "
            "question's, f1_* the mean over the fact's questions).", {"questions": records(shift)})

    def access_shift(self, before: MemoryModel, after: MemoryModel) -> pd.DataFrame:
        return question_access_shift(before, after, self.items, prompt_format=self.prompt_format)


@dataclass(frozen=True)
class EditItems:
    path: Path
    items: list[EditRecord]
    prompt_format: str = "completion"  # how the records' prompts are put to the model (the run's, when known)
    kind = "edits"
    noun = "records"
    texts = "the records' rewrite texts"

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.items]

    @property
    def texts_desc(self) -> str:
        return (f"the record's rewrite text (the rewrite prompt followed by target_new, as {self.prompt_format} "
                "training text: what finetuning on the record trains on)")

    def for_run(self, run: Run | None, prompt_format: str | None = None) -> EditItems:
        """The records put to the models as editing prompts of question format `prompt_format`
        (`edit_prompt_format`), else in the prompt format `run` trained them in (if it trained on edits)."""
        if prompt_format is not None:
            return replace(self, prompt_format=edit_prompt_format(prompt_format))
        stream = (run.identity.get("stream") or {}) if run is not None else {}
        return replace(self, prompt_format=stream.get("prompt_format", self.prompt_format)) if stream.get("kind") == "edits" else self

    def documents(self, tokenizer: Any) -> list[Document]:
        fmt = get_prompt_format(self.prompt_format)
        return [Document(r.id, fmt.training_text(tokenizer, r.rewrite_prompt, r.target_new)) for r in self.items]

    def item_of(self, doc_ids: pd.Series) -> pd.Series:
        return doc_ids  # one document per record, named by its id

    def entities(self) -> list[Entity]:
        return [Entity(r.subject, SUBJECT_LABEL) for r in self.items]

    def compare(self, before: MemoryModel, after: MemoryModel) -> Comparison:
        pf = self.prompt_format
        scores = [edit_scores(m, self.items, prompt_format=pf) for m in (before, after)]
        means = [mean_edit_metrics(s) for s in scores]
        metrics = [metric_row(m, means[0][m], means[1][m]) for m in EDIT_METRICS]
        fmt, tokenizer = get_prompt_format(pf), before.require_tokenizer("continuing rewrite prompts")
        prompts = [fmt.encode_prompt(tokenizer, r.rewrite_prompt) for r in self.items]
        continuations = [generate_answers(m, prompts, max_new_tokens=CONTINUATION_TOKENS) for m in (before, after)]
        rows = []
        for i, r in enumerate(self.items):
            row = {"id": r.id, "subject": r.subject, "rewrite_prompt": r.rewrite_prompt, "target_true": r.target_true,
                   "target_new": r.target_new, "continuation_before": continuations[0][i], "continuation_after": continuations[1][i]}
            for m in (*EDIT_METRICS, "nll_new", "nll_true"):
                row[f"{m}_before"], row[f"{m}_after"] = number(scores[0][i][m]), number(scores[1][i][m])
            rows.append(row)
        return Comparison(
            metrics, (f"Editing: the {len(self.items)} records of {self.path.name}, prompts in prompt format {pf}, "
                      f"smviz.evaluate.edit_scores averaged by mean_edit_metrics ({EDIT_PROTOCOL.rstrip('.')})"), rows,
            (f"continuation_*: the greedy continuation of the rewrite prompt (prompt format {pf}; at most "
             f"{CONTINUATION_TOKENS} tokens, cut at the first newline; smviz.evaluate.generate_answers); the metrics "
             "*_before / *_after and nll_new / nll_true (mean NLL of target_new / target_true after the rewrite prompt): "
             "smviz.evaluate.edit_scores of the record under each model, as in the summary."), {})

    def access_shift(self, before: MemoryModel, after: MemoryModel) -> pd.DataFrame:
        fmt, tokenizer = get_prompt_format(self.prompt_format), before.require_tokenizer("probing prompts")
        probe = [fmt.prompt(tokenizer, p) for r in self.items for p in (r.rewrite_prompt, *r.paraphrase_prompts)]
        paraphrases = len(probe) - len(self.items)
        return prompt_access_shift(before, after, probe, what=(
            f"the {len(self.items)} records' rewrite prompts and their {paraphrases} paraphrase prompts as "
            f"{self.prompt_format} prompt text"))


def read_diff_items(path: str | os.PathLike) -> FactItems | EditItems:
    """The new facts or the editing records of a --facts file, its kind detected from the content; any
    other kind of data (Q/A items, documents) is refused, naming what the file holds."""
    path = Path(path)
    found = load_records(path)
    if not found.objects:
        raise InputError(f"{path} holds no records; a diff report needs at least one new fact or editing record")
    fmt = next((f for f in data_formats() if f.sniff(found)), None)
    if fmt is None or fmt.kind == "facts":  # the facts reader names a bad line, also when no format is recognised
        return FactItems(path, read_facts(path))
    if fmt.kind == "edits":
        return EditItems(path, fmt.read(found))
    raise InputError(f"{path} holds {KIND_NOUNS[fmt.kind]} (format {fmt.name}); a diff report compares facts or "
                     "editing records")
