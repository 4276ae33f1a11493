"""What slots encode: TF-IDF views, entities (spaCy NER), overlap across steps and facts, core sets,
checkpoint diffs, vocabulary projection and slot ablation. Every function returns a pandas DataFrame
with documented columns — the notebook API that the app and the reports reuse
(`analyses/walkthrough.ipynb` walks through all of it)."""

from smviz.analysis.ablate import ablate_slots, ablated, ablation_test, accessed_slots, answer_logprob
from smviz.analysis.diff import DiffError, ModelDiff, access_shift, allowed_rows, diff_models, diff_run_model, diff_run_steps, fact_shift
from smviz.analysis.entities import align_tokens, entity_spans, load_pipeline
from smviz.analysis.entity_stats import (
    alignment_of_selection,
    bh_q_values,
    enrichment_p_values,
    selection_entity_alignment,
    slot_entity_profile,
)
from smviz.analysis.min_t import min_t, min_t_sweep
from smviz.analysis.overlap import (
    ModelMismatchError,
    OverlapError,
    background_overlap,
    background_top,
    churn,
    core_coverage,
    core_set,
    core_sets,
    cross_run,
    intersection_matrix,
    jaccard_matrix,
    overlap_matrix,
    selected_sets,
    slot_reuse,
)
from smviz.analysis.runs import Run, RunError
from smviz.analysis.slots import co_accessed, selection_history, value_norm_history
from smviz.analysis.tfidf import TfidfError, batch_slot_counts, step_slot_counts, step_table, tfidf_table, trace_rows, trace_slot_counts
from smviz.analysis.vocab import promoted_tokens

__all__ = [
    "DiffError", "ModelDiff", "ModelMismatchError", "OverlapError", "Run", "RunError", "TfidfError",
    "ablate_slots", "ablated", "co_accessed", "selection_history", "value_norm_history", "ablation_test", "access_shift", "accessed_slots", "align_tokens", "alignment_of_selection",
    "allowed_rows", "answer_logprob", "background_overlap", "background_top", "batch_slot_counts", "bh_q_values", "churn",
    "core_coverage", "core_set", "core_sets", "cross_run", "diff_models", "diff_run_model", "diff_run_steps",
    "enrichment_p_values", "entity_spans", "fact_shift", "intersection_matrix", "jaccard_matrix", "load_pipeline",
    "min_t", "min_t_sweep", "overlap_matrix", "promoted_tokens", "selected_sets", "selection_entity_alignment",
    "slot_entity_profile", "slot_reuse", "step_slot_counts", "step_table", "tfidf_table", "trace_rows", "trace_slot_counts",
]
