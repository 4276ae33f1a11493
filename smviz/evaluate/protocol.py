"""The learning/forgetting evaluation protocol of finetuning runs: what every evaluation asks (`EvalSets`),
one evaluation (`evaluate_point`) and a run's start/end/change of every metric (`summarize`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from smviz.data.facts import Fact
from smviz.evaluate.nll import heldout_nll
from smviz.evaluate.qa import answer_questions
from smviz.evaluate.scoring import SCORING_PROTOCOL, qa_metrics
from smviz.model import MemoryModel


@dataclass
class EvalSets:
    """What every evaluation asks: the stream's facts (learning: held-out question templates of the
    facts seen so far), known facts (forgetting, the NaturalQuestions analogue) and held-out corpus
    rows (forgetting, the GSM8K-NLL analogue)."""

    stream: Sequence[Fact]
    known: Sequence[Fact]
    heldout_rows: torch.Tensor
    sources: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "learning": f"held-out question templates of the stream's facts seen so far ({len(self.stream)} facts in the stream)",
            "known": f"held-out question templates of {len(self.known)} known facts",
            "heldout_nll": f"mean NLL per token of {len(self.heldout_rows)} held-out corpus rows of {self.heldout_rows.shape[1]} tokens",
            "scoring": SCORING_PROTOCOL,
            "sources": self.sources,
        }


def evaluate_point(model: MemoryModel, sets: EvalSets, seen: int) -> dict[str, Any]:
    """One evaluation: learning EM/F1 on the first `seen` stream facts (and on the whole stream),
    known-fact EM/F1, held-out NLL."""
    stream_rows = answer_questions(model, sets.stream)
    seen_ids = {f.id for f in sets.stream[:seen]}
    learned = qa_metrics([r for r in stream_rows if r["fact_id"] in seen_ids]) if seen else None
    stream = qa_metrics(stream_rows)
    known = qa_metrics(answer_questions(model, sets.known))
    return {
        "facts_seen": seen,
        "learn_em": learned["em"] if learned else None,
        "learn_f1": learned["f1"] if learned else None,
        "stream_em": stream["em"],
        "stream_f1": stream["f1"],
        "known_em": known["em"],
        "known_f1": known["f1"],
        "heldout_nll": heldout_nll(model, sets.heldout_rows)["nll"],
    }


def summarize(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """Start, end and change of each metric. Learning starts from the whole stream before training
    (nothing is seen yet) and ends on the facts seen; drops are relative to the start."""

    def rel_drop(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or a == 0 else (a - b) / a

    out = {
        "learning_em": {"start": start["stream_em"], "end": end["learn_em"]},
        "learning_f1": {"start": start["stream_f1"], "end": end["learn_f1"]},
        "known_em": {"start": start["known_em"], "end": end["known_em"]},
        "known_f1": {"start": start["known_f1"], "end": end["known_f1"]},
        "heldout_nll": {"start": start["heldout_nll"], "end": end["heldout_nll"]},
    }
    for key in ("learning_em", "learning_f1"):
        s, e = out[key]["start"], out[key]["end"]
        out[key]["gain"] = None if s is None or e is None else e - s
    for key in ("known_em", "known_f1"):
        out[key]["relative_drop"] = rel_drop(out[key]["start"], out[key]["end"])
    s, e = out["heldout_nll"]["start"], out["heldout_nll"]["end"]
    out["heldout_nll"]["change"] = e - s
    out["heldout_nll"]["relative_change"] = (e - s) / s
    return out
