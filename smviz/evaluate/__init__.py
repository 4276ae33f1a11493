"""Evaluation of a memory model: what it knows (closed-book QA on facts: `qa`, scored by `scoring`),
how well it models held-out text and how it uses its memory (`nll`), and the whole evaluation with
the memory on and off plus its text report (`report`), and the learning/forgetting protocol of
finetuning runs (`protocol`). Every dict returned carries a "protocol"
entry that says how its numbers were measured. Everything public is importable from here."""

from smviz.evaluate.mode import eval_mode
from smviz.evaluate.nll import heldout_nll, memory_usage
from smviz.evaluate.protocol import EvalSets, evaluate_point, summarize
from smviz.evaluate.qa import HELDOUT_QUESTIONS, TRAINING_QUESTIONS, answer_questions
from smviz.evaluate.report import evaluate_model, format_report
from smviz.evaluate.scoring import SCORING_PROTOCOL, exact_match, normalize_answer, qa_metrics, token_f1

__all__ = [
    "EvalSets", "HELDOUT_QUESTIONS", "SCORING_PROTOCOL", "TRAINING_QUESTIONS", "answer_questions", "eval_mode", "evaluate_model",
    "exact_match", "format_report", "heldout_nll", "memory_usage", "normalize_answer", "qa_metrics", "summarize", "token_f1", "evaluate_point",
]
