"""Background slot statistics and TF-IDF ranking: `SlotStats` (per-slot access counts and document
frequency of every memory layer over a background corpus, mergeable, stored beside the model's
weights), the counting that fills it (`batch_counts`, `StatsCollector`, `collect_stats`,
`count_batches` — resumable, and distributed under torchrun), THE ranking (`rank`: score descending,
ties to the lower slot id) and the paper's score of a batch's slots against the statistics (`idf`,
`tfidf`, `top_slots`). Damaged or mismatched statistics raise `smviz.errors.StatsError`; a layer the
statistics lack, `ConfigError` (as `smviz.model.resolve_layer` says it everywhere).

File format (`slot_stats.safetensors`, tag `smviz-slot-stats/1`): tensors `counts` and `df`, (L, N)
int64, row l = memory block `layers[l]`; metadata strings `format`, `layers` (JSON list), `n_slots`,
`unit`, `n_docs`, `n_tokens`, `model_hash` (JSON string or null), `protocol` (JSON object).
Interrupted runs leave `<out stem>.partial-r{rank}of{world}.safetensors` (tag
`smviz-slot-stats-partial/1`, plus `next_batch` and `fingerprint`), which `SlotStats.load` refuses.
"""

from smviz.stats.background import check_run_settings, count_batches, partial_path
from smviz.stats.counting import (
    StatsCollector,
    batch_counts,
    collect_stats,
    document_counts,
    forward_documents,
)
from smviz.stats.slot_stats import (
    FORMAT,
    PARTIAL_FORMAT,
    STATS_FILE,
    UNITS,
    SlotStats,
    format_usage,
    idf,
    merge_protocols,
)
from smviz.stats.tfidf import rank, tfidf, top_slots

__all__ = [
    "FORMAT", "PARTIAL_FORMAT", "STATS_FILE", "UNITS",
    "SlotStats", "StatsCollector", "batch_counts", "check_run_settings", "collect_stats", "count_batches",
    "document_counts", "idf", "format_usage", "forward_documents", "merge_protocols",
    "partial_path", "rank", "tfidf", "top_slots",
]
