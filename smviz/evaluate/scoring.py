"""SQuAD-style answer scoring: `normalize_answer`, `exact_match`, `token_f1`, `answer_contained` (for
chat models, which answer in sentences), and `qa_metrics`, the mean EM/F1/contained of scored answers
overall and per relation. Every result names its protocol."""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

SCORING_PROTOCOL = (
    "SQuAD normalisation (lowercase, punctuation and articles a/an/the removed, whitespace collapsed); "
    "exact match, token-overlap F1, and contained (the gold's normalised tokens appear contiguously in the "
    "answer's), mean over questions"
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, remove punctuation, drop the articles a/an/the, collapse
    whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when prediction and gold are equal after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the (multiset) overlap of normalised tokens; both empty → 1.0, exactly one empty → 0.0."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_contained(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold is a contiguous run of the normalised prediction's tokens, else 0.0.

    A chat model answers "The capital of France is Paris.", which EM scores 0 and F1 0.33 against
    "Paris"; containment scores it 1. Tokens are matched whole, so "Parisian" does not contain "Paris"."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    if not ref:
        return float(not pred)
    n = len(ref)
    return float(any(pred[i : i + n] == ref for i in range(len(pred) - n + 1)))


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def qa_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean EM, F1 and contained over `answer_questions` rows, with the count, and EM/F1/count per
    relation (None for an empty set; contained is None unless every row carries it)."""
    by_relation: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_relation[r["relation"]].append(r)
    return {
        "protocol": SCORING_PROTOCOL,
        "em": _mean([r["em"] for r in rows]),
        "f1": _mean([r["f1"] for r in rows]),
        "contained": _mean([r["contained"] for r in rows]) if all("contained" in r for r in rows) else None,
        "n": len(rows),
        "per_relation": {
            rel: {"em": _mean([r["em"] for r in rs]), "f1": _mean([r["f1"] for r in rs]), "n": len(rs)}
            for rel, rs in sorted(by_relation.items())
        },
    }
