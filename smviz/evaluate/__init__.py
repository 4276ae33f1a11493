"""Evaluation of a memory model: what it knows (closed-book QA on facts and on QA evaluation sets, in
a prompt format: `qa`, scored by `scoring`), what an edit did (the knowledge-editing metrics of
`editing`), how well it models held-out text and how it uses its memory (`nll`), the memory's health
beyond usage (`health`: value movement, memory vs FFN output, query similarity, NLL memory on/off),
the whole evaluation with the memory on and off plus its text report (`report`), and the
learning/forgetting protocol of finetuning runs (`protocol`). Every dict returned carries a "protocol"
entry that says how its numbers were measured. Everything public is importable from here."""

from smviz.evaluate.editing import EDIT_METRICS, EDIT_PROTOCOL, edit_scores, mean_edit_metrics, score_continuations
from smviz.evaluate.health import PairwiseCosine, memory_activity, memory_health, value_movement
from smviz.evaluate.mode import eval_mode
from smviz.evaluate.nll import heldout_nll, memory_usage
from smviz.evaluate.protocol import EvalSets, evaluate_point, summarize
from smviz.evaluate.qa import HELDOUT_QUESTIONS, TRAINING_QUESTIONS, answer_qa_items, answer_questions, generate_answers
from smviz.evaluate.report import evaluate_model, format_report
from smviz.evaluate.scoring import SCORING_PROTOCOL, answer_contained, exact_match, normalize_answer, qa_metrics, token_f1

__all__ = [
    "EDIT_METRICS", "EDIT_PROTOCOL", "EvalSets", "HELDOUT_QUESTIONS", "PairwiseCosine", "SCORING_PROTOCOL",
    "TRAINING_QUESTIONS", "answer_contained", "answer_qa_items", "answer_questions", "edit_scores", "eval_mode", "evaluate_model",
    "evaluate_point", "exact_match", "format_report", "generate_answers", "heldout_nll", "mean_edit_metrics",
    "memory_activity", "memory_health", "memory_usage", "normalize_answer", "qa_metrics", "score_continuations",
    "summarize", "token_f1", "value_movement",
]
