"""What slots encode: TF-IDF views, entities (spaCy NER), overlap across steps and facts, core sets,
checkpoint diffs and access shifts, vocabulary projection, slot ablation, one slot's page (`slot_page`),
live reads of any text and steering by slots (`steer`). Every function returns a
pandas DataFrame with documented columns — the notebook API that the app and the reports reuse
(`analyses/walkthrough.ipynb` walks through all of it). Bad input raises `smviz.errors.AnalysisError`,
a damaged or unfinished run `RunError`."""

from smviz.analysis.ablate import ablate_slots, ablated, ablation_test, accessed_slots, answer_logprob, continuation_logprob, drop_reads
from smviz.analysis.diff import (
    ModelDiff,
    allowed_rows,
    check_comparable,
    check_run_model,
    diff_models,
    diff_run_model,
    diff_run_steps,
    run_diff,
)
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
from smviz.analysis.runs import Run, item_rows
from smviz.analysis.shift import access_shift, fact_shift, prompt_access_shift, question_access_shift
from smviz.analysis.slot_page import (
    co_read_neighbours,
    key_map,
    rank_histogram,
    slot_card,
    slot_label,
    subkey_neighbours,
    token_search,
    value_neighbours,
    weight_buckets,
)
from smviz.analysis.slots import co_accessed, selection_history, value_norm_history
from smviz.analysis.steer import ablation_effects, read_text, slot_contexts, steer_generate, steered, text_top_slots
from smviz.analysis.tfidf import batch_slot_counts, step_slot_counts, step_table, tfidf_table, trace_rows, trace_slot_counts
from smviz.analysis.vocab import promoted_tokens

__all__ = [
    "ModelDiff", "Run",
    "ablate_slots", "ablated", "co_accessed", "selection_history", "value_norm_history", "ablation_test", "access_shift", "accessed_slots", "align_tokens", "alignment_of_selection",
    "allowed_rows", "answer_logprob", "check_comparable", "check_run_model", "background_overlap", "background_top", "batch_slot_counts", "bh_q_values", "churn",
    "core_coverage", "core_set", "core_sets", "cross_run", "diff_models", "diff_run_model", "diff_run_steps",
    "enrichment_p_values", "entity_spans", "fact_shift", "intersection_matrix", "jaccard_matrix", "load_pipeline",
    "item_rows", "min_t", "min_t_sweep", "overlap_matrix", "prompt_access_shift", "promoted_tokens", "question_access_shift", "run_diff", "selected_sets", "selection_entity_alignment",
    "slot_entity_profile", "slot_reuse", "step_slot_counts", "step_table", "tfidf_table", "trace_rows", "trace_slot_counts",
    # one slot's page, live text and steering
    "ablation_effects", "co_read_neighbours", "continuation_logprob", "drop_reads", "key_map", "rank_histogram", "read_text",
    "slot_card", "slot_contexts", "slot_label", "steer_generate", "steered", "subkey_neighbours", "text_top_slots",
    "token_search", "value_neighbours", "weight_buckets",
]
