"""The learning/forgetting evaluation protocol of finetuning runs: what every evaluation asks (`EvalSets`),
one evaluation (`evaluate_point`) and a run's start/end/change of every metric (`summarize`).

Learning is measured on the held-out question templates of the stream's facts seen so far, or on a QA
file (`learn`, the only way for document and QA streams); an editing stream adds the editing metrics
(`smviz.evaluate.editing`) of all its records. Forgetting is measured on known facts' held-out questions
(`known`), on any number of named QA probes (`probes`) and by the NLL of held-out text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from smviz.data.formats.canonical import record_kind
from smviz.data.formats.qa import QAItem
from smviz.data.prompts import edit_prompt_format
from smviz.data.schema import Fact
from smviz.errors import ConfigError
from smviz.evaluate.editing import EDIT_METRICS, EDIT_PROTOCOL, edit_scores, mean_edit_metrics
from smviz.evaluate.nll import heldout_nll
from smviz.evaluate.qa import answer_qa_items, answer_questions
from smviz.evaluate.scoring import SCORING_PROTOCOL, qa_metrics
from smviz.model import MemoryModel


@dataclass
class EvalSets:
    """What every evaluation asks. `stream`: the stream's items; `known`: known facts (forgetting, the
    NaturalQuestions analogue; may be empty); `heldout_rows`: held-out text rows (forgetting, the
    GSM8K-NLL analogue; None: not measured); `learn`: a QA set that measures learning in place of the
    stream facts' own held-out questions; `probes`: named QA sets that measure forgetting; `prompt_format`:
    how questions are put to the model (`smviz.data.prompts`)."""

    stream: Sequence[Any]
    known: Sequence[Fact]
    heldout_rows: torch.Tensor | None
    learn: Sequence[QAItem] | None = None
    probes: dict[str, Sequence[QAItem]] = field(default_factory=dict)
    prompt_format: str = "qa"
    sources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = record_kind(self.stream[0]) if self.stream else "facts"
        if self.learn is None and self.kind in ("qa", "documents"):
            raise ConfigError(f"a {self.kind} stream has no held-out questions of its own; give a QA file that "
                              "measures what it teaches (--learn-eval QA_FILE)")
        if not (self.known or self.probes or self.heldout_rows is not None):
            raise ConfigError("nothing measures forgetting: give known facts (--known), a QA probe "
                              "(--forget-eval NAME=QA_FILE) or held-out text (--heldout)")

    @property
    def edit_format(self) -> str:
        """The prompt format editing prompts are put in (`smviz.data.prompts.edit_prompt_format`)."""
        return edit_prompt_format(self.prompt_format)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.learn is not None:
            out["learning"] = f"{len(self.learn)} questions of the learning QA set"
        elif self.kind == "facts":
            out["learning"] = f"held-out question templates of the stream's facts seen so far ({len(self.stream)} facts in the stream)"
        if self.kind == "edits":
            out["editing"] = f"{EDIT_PROTOCOL} Over all {len(self.stream)} records of the stream; prompts as {self.edit_format}."
        if self.known:
            out["known"] = f"held-out question templates of {len(self.known)} known facts"
        for name, items in sorted(self.probes.items()):
            out[f"forget/{name}"] = f"{len(items)} questions of QA probe {name!r}"
        if self.heldout_rows is not None:
            rows = self.heldout_rows
            out["heldout_nll"] = f"mean NLL per token of {len(rows)} held-out corpus rows of {rows.shape[1]} tokens"
        out["scoring"] = SCORING_PROTOCOL
        if self.prompt_format != "qa":
            out["prompt_format"] = self.prompt_format
        out["sources"] = self.sources
        return out


PROBE_METRICS = ("em", "f1", "contained")


def _probe_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    m = qa_metrics(rows)
    return {k: m[k] for k in (*PROBE_METRICS, "n")}


def evaluate_point(model: MemoryModel, sets: EvalSets, seen: int) -> dict[str, Any]:
    """One evaluation after `seen` stream items: learning EM/F1 (on the learning QA set, else on the
    first `seen` stream facts), EM/F1 on all stream facts, known-fact EM/F1, each probe's EM/F1/contained, the
    editing metrics of an editing stream, held-out NLL. A metric that is not measured is None."""
    return score_point(model, sets, seen)[0]


def score_point(model: MemoryModel, sets: EvalSets, seen: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """`evaluate_point`'s metrics and the per-question scores behind them: {set: {"id", "em", "f1"}}
    for the sets "stream", "learn", "known" and "forget/NAME" that were asked, in their fixed order
    (a question's id: FACT_ID/TEMPLATE, or the QA item's id). Intervals over questions and paired
    tests between runs need them (the same ids in every run of one protocol)."""
    fmt = sets.prompt_format
    out: dict[str, Any] = {"facts_seen": seen, "learn_em": None, "learn_f1": None, "stream_em": None, "stream_f1": None}
    questions: dict[str, Any] = {}
    if sets.kind == "facts":
        stream_rows = answer_questions(model, sets.stream, prompt_format=fmt)
        questions["stream"] = _question_scores(stream_rows)
        stream = qa_metrics(stream_rows)
        out["stream_em"], out["stream_f1"] = stream["em"], stream["f1"]
        if sets.learn is None and seen:
            seen_ids = {f.id for f in sets.stream[:seen]}
            learned = qa_metrics([r for r in stream_rows if r["fact_id"] in seen_ids])
            out["learn_em"], out["learn_f1"] = learned["em"], learned["f1"]
    if sets.learn is not None:
        learn_rows = answer_qa_items(model, sets.learn, prompt_format=fmt)
        questions["learn"] = _question_scores(learn_rows)
        learned = qa_metrics(learn_rows)
        out["learn_em"], out["learn_f1"] = learned["em"], learned["f1"]
    known = None
    if sets.known:
        known_rows = answer_questions(model, sets.known, prompt_format=fmt)
        questions["known"] = _question_scores(known_rows)
        known = qa_metrics(known_rows)
    out["known_em"] = known["em"] if known else None
    out["known_f1"] = known["f1"] if known else None
    if sets.probes:
        out["forget"] = {}
        for name, items in sorted(sets.probes.items()):
            rows = answer_qa_items(model, items, prompt_format=fmt)
            questions[f"forget/{name}"] = _question_scores(rows)
            out["forget"][name] = _probe_metrics(rows)
    if sets.kind == "edits":
        means = mean_edit_metrics(edit_scores(model, sets.stream, prompt_format=sets.edit_format))
        out["editing"] = {k: means[k] for k in (*EDIT_METRICS, "n")}
    out["heldout_nll"] = None if sets.heldout_rows is None else heldout_nll(model, sets.heldout_rows)["nll"]
    return out, questions


def _question_scores(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    ids = [r["fact_id"] if r["template"] is None else f"{r['fact_id']}/{r['template']}" for r in rows]
    return {"id": ids, "em": [float(r["em"]) for r in rows], "f1": [float(r["f1"]) for r in rows]}


def _rel_drop(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else (a - b) / a


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def summarize(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """Start, end and change of each metric. Learning on the stream's facts starts from the whole stream
    before training (nothing is seen yet) and ends on the facts seen; on a learning QA set it starts and
    ends on that set. Forgetting drops are relative to the start."""
    learn_start = "learn" if start.get("learn_em") is not None else "stream"
    out: dict[str, Any] = {}
    for m in ("em", "f1"):
        s, e = start[f"{learn_start}_{m}"], end[f"learn_{m}"]
        out[f"learning_{m}"] = {"start": s, "end": e, "gain": _diff(s, e)}
    for m in ("known_em", "known_f1"):
        out[m] = {"start": start[m], "end": end[m], "relative_drop": _rel_drop(start[m], end[m])}
    s, e = start["heldout_nll"], end["heldout_nll"]
    out["heldout_nll"] = {"start": s, "end": e, "change": _diff(s, e), "relative_change": None if s is None or e is None else (e - s) / s}
    if "forget" in start:
        out["forget"] = {
            name: {m: {"start": probe[m], "end": end["forget"][name][m], "relative_drop": _rel_drop(probe[m], end["forget"][name][m])}
                   for m in PROBE_METRICS if m in probe}
            for name, probe in start["forget"].items()}
    if "editing" in start:
        out["editing"] = {m: {"start": start["editing"][m], "end": end["editing"][m], "change": _diff(start["editing"][m], end["editing"][m])}
                          for m in EDIT_METRICS}
    return out
