"""Per-slot summaries streamed while recording (`smviz record --summary N`): what a trace can say about each
slot without keeping every read — O(slots · N) on disk, not O(tokens · heads · k).

Per memory layer and slot: `reads`, `weight_sum`, `weight_max`, `docs` (documents with a reading token)
and `tokens` (distinct reading tokens); and two bounded sets of reading tokens, each with its weight
(summed over heads) and head count: the N of most weight (`kind` 0, ties to the earlier row: exactly the
first N rows `SlotIndex.contexts` gives) and a uniform sample of N (`kind` 1: the N smallest of a hash
of (seed, layer, slot, row), a bottom-N sketch, so it does not depend on the order or the process
that saw the token).

Each recorded shard gets its summary part (`shard_summary`, vectorised: sorts, no loop over slots),
written beside the shard in the partial directory; `merge_parts` folds the parts in shard order into
the trace's `summary/slots.parquet` and `summary/contexts.parquet` when the recording finishes — the
same files from one process or several. A token belongs to one shard and a document's tokens to one
shard, so counts, distinct tokens and documents add up exactly across parts.

`SummarySlotIndex` answers the slot index's questions a summary can answer (counts, reading tokens,
top contexts up to N, the sample) and refuses the others with a TraceError that says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from smviz.errors import TraceError
from smviz.io import atomic_open
from smviz.trace.format import file_digest
from smviz.trace.index import SlotIndex

SUMMARY_DIR = "summary"
PARTS_DIR = "summary-parts"
TOP, SAMPLE = 0, 1
SLOTS_SCHEMA = pa.schema([("layer", pa.int16()), ("slot", pa.int32()), ("reads", pa.int64()), ("weight_sum", pa.float64()),
                          ("weight_max", pa.float32()), ("docs", pa.int64()), ("tokens", pa.int64())])
CONTEXTS_SCHEMA = pa.schema([("layer", pa.int16()), ("slot", pa.int32()), ("kind", pa.int8()), ("place", pa.int32()),
                             ("row", pa.int32()), ("weight", pa.float64()), ("reads", pa.int16()), ("key", pa.float64())])
FILES = {"slots": "slots.parquet", "contexts": "contexts.parquet"}


def _hash_uniform(seed: int, key: np.ndarray, row: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per (key, row), the same wherever it is computed (splitmix64)."""
    with np.errstate(over="ignore"):
        x = (key.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (row.astype(np.uint64) + np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _places(group: np.ndarray) -> np.ndarray:
    """Each entry's place (0, 1, ...) within its run of equal values in `group` (already sorted by group)."""
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]])) if len(group) else np.zeros(0, np.int64)
    return np.arange(len(group)) - np.repeat(starts, np.diff(np.append(starts, len(group))))


def _select(key: np.ndarray, kind: np.ndarray, row: np.ndarray, rank_by: np.ndarray, n: int) -> np.ndarray:
    """Order of the entries kept: per (key, kind) the n smallest `rank_by` (ties: the earlier row)."""
    order = np.lexsort((row, rank_by, kind, key))
    group = key[order] * 2 + kind[order]
    return order[_places(group) < n]


def shard_summary(rows: np.ndarray, docs: np.ndarray, layers: list[int], slots: np.ndarray, weights: np.ndarray,
                  n_slots: int, keep: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """One shard's summary part: (slots table, contexts table). `rows`, `docs`: (n,) token rows and
    documents; `slots`, `weights`: (n, len(layers), heads, knn) as recorded."""
    n, n_layers = slots.shape[:2]
    per_token = slots.shape[2] * slots.shape[3]
    layer_pos = np.repeat(np.arange(n_layers, dtype=np.int64), per_token)
    key = (np.tile(layer_pos, n) * n_slots + slots.reshape(-1).astype(np.int64))
    tok = np.repeat(rows.astype(np.int64), n_layers * per_token)
    w = weights.reshape(-1).astype(np.float64)
    order = np.lexsort((tok, key))
    key, tok, w = key[order], tok[order], w[order]
    pair_start = np.flatnonzero(np.concatenate([[True], (key[1:] != key[:-1]) | (tok[1:] != tok[:-1])])) if len(key) else np.zeros(0, np.int64)
    p_key, p_tok = key[pair_start], tok[pair_start]
    p_w = np.add.reduceat(w, pair_start) if len(w) else np.zeros(0)
    p_reads = np.diff(np.append(pair_start, len(key)))
    key_start = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, np.int64)
    u_key = key[key_start]
    reads = np.diff(np.append(key_start, len(key)))
    weight_sum = np.add.reduceat(w, key_start) if len(w) else np.zeros(0)
    weight_max = np.maximum.reduceat(w, key_start) if len(w) else np.zeros(0)
    tokens = np.bincount(np.searchsorted(u_key, p_key), minlength=len(u_key))
    p_doc = docs[p_tok - rows[0]] if len(p_tok) else np.zeros(0, np.int64)  # a shard's rows are contiguous
    new_doc = np.concatenate([[True], (p_key[1:] != p_key[:-1]) | (p_doc[1:] != p_doc[:-1])]) if len(p_key) else np.zeros(0, bool)
    n_docs = np.bincount(np.searchsorted(u_key, p_key[new_doc]), minlength=len(u_key))
    layer_ids = np.asarray(layers, dtype=np.int16)
    slots_table = pa.table([pa.array(layer_ids[u_key // n_slots]), pa.array((u_key % n_slots).astype(np.int32)),
                            pa.array(reads.astype(np.int64)), pa.array(weight_sum), pa.array(weight_max.astype(np.float32)),
                            pa.array(n_docs.astype(np.int64)), pa.array(tokens.astype(np.int64))], schema=SLOTS_SCHEMA)
    u = _hash_uniform(seed, p_key, p_tok)
    both_key = np.concatenate([p_key, p_key])
    kind = np.repeat(np.array([TOP, SAMPLE], np.int8), len(p_key))
    rank_key = np.concatenate([-p_w, u])
    contexts = _contexts_table(both_key, kind, np.concatenate([p_tok, p_tok]), np.concatenate([p_w, p_w]),
                               np.concatenate([p_reads, p_reads]), rank_key, layers, n_slots, keep)
    return slots_table, contexts


def _contexts_table(key, kind, row, weight, reads, rank_key, layers: list[int], n_slots: int, keep: int) -> pa.Table:
    """The kept entries, per (layer, slot, kind) in rank order; `key` = layer position * n_slots + slot."""
    take = _select(key, kind, row, rank_key, keep)
    key, kind, row = key[take], kind[take], row[take]
    place = _places(key * 2 + kind)
    return pa.table([pa.array(np.asarray(layers, dtype=np.int16)[key // n_slots]), pa.array((key % n_slots).astype(np.int32)),
                     pa.array(kind.astype(np.int8)), pa.array(place.astype(np.int32)), pa.array(row.astype(np.int32)),
                     pa.array(weight[take].astype(np.float64)), pa.array(reads[take].astype(np.int16)),
                     pa.array(rank_key[take].astype(np.float64))], schema=CONTEXTS_SCHEMA)


def part_files(partial: Path, shard_name: str) -> dict[str, Path]:
    return {name: partial / PARTS_DIR / f"{name}-{shard_name}" for name in FILES}


def write_part(partial: Path, shard_name: str, tables: tuple[pa.Table, pa.Table]) -> None:
    (partial / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    for (name, path), table in zip(part_files(partial, shard_name).items(), tables):
        with atomic_open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")


def merge_parts(partial: Path, shard_names: list[str], layers: list[int], n_slots: int, keep: int) -> dict[str, Any]:
    """Fold the shards' parts (in shard order) into partial/summary/; the meta.json entry describing them."""
    size = len(layers) * n_slots
    reads, tokens, docs = (np.zeros(size, np.int64) for _ in range(3))
    weight_sum, weight_max = np.zeros(size), np.zeros(size)
    ctx = CONTEXTS_SCHEMA.empty_table()
    position = {layer: i for i, layer in enumerate(layers)}
    for name in shard_names:
        files = part_files(partial, name)
        s = pq.read_table(files["slots"])
        lp = np.array([position[int(l)] for l in s.column("layer").to_numpy()], dtype=np.int64)
        key = lp * n_slots + s.column("slot").to_numpy()
        reads[key] += s.column("reads").to_numpy()
        tokens[key] += s.column("tokens").to_numpy()
        docs[key] += s.column("docs").to_numpy()
        weight_sum[key] += s.column("weight_sum").to_numpy()
        weight_max[key] = np.maximum(weight_max[key], s.column("weight_max").to_numpy())
        both = pa.concat_tables([ctx, pq.read_table(files["contexts"])])
        bl = np.array([position[int(l)] for l in both.column("layer").to_numpy()], dtype=np.int64)
        ctx = _contexts_table(bl * n_slots + both.column("slot").to_numpy(), both.column("kind").to_numpy(),
                              both.column("row").to_numpy(), both.column("weight").to_numpy(),
                              both.column("reads").to_numpy(), both.column("key").to_numpy(), layers, n_slots, keep)
    read = np.flatnonzero(reads)
    layer_ids = np.asarray(layers, dtype=np.int16)[read // n_slots]
    slots_table = pa.table([pa.array(layer_ids), pa.array((read % n_slots).astype(np.int32)), pa.array(reads[read]),
                            pa.array(weight_sum[read]), pa.array(weight_max[read].astype(np.float32)), pa.array(docs[read]),
                            pa.array(tokens[read])], schema=SLOTS_SCHEMA)
    out = partial / SUMMARY_DIR
    out.mkdir(exist_ok=True)
    entry: dict[str, Any] = {"keep": keep, "reads": int(reads.sum()), "files": {}}
    for name, table in (("slots", slots_table), ("contexts", ctx)):
        target = out / FILES[name]
        with atomic_open(target, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        entry["files"][name] = {"bytes": target.stat().st_size, "sha256": file_digest(target)}
    return entry


class SummarySlotIndex(SlotIndex):
    """The slot index of a trace's summary (`Trace.slot_summary()`; `Trace.slot_index()` of a trace
    recorded with --summary-only): counts and distinct reading tokens per slot, `contexts` up to the
    summary's N, `sample_contexts`; queries that need every read raise a TraceError saying so."""

    def __init__(self, trace: Any) -> None:
        entry = trace.meta["summary"]
        directory = trace.path / SUMMARY_DIR
        slots, ctx = pq.read_table(directory / FILES["slots"]), pq.read_table(directory / FILES["contexts"])
        n, layers = trace.n_slots, trace.layers
        position = np.searchsorted(np.asarray(layers), slots.column("layer").to_numpy())
        key = position.astype(np.int64) * n + slots.column("slot").to_numpy()
        self.summary = {name: np.zeros(len(layers) * n, np.float64 if name.startswith("weight") else np.int64)
                        for name in ("reads", "weight_sum", "weight_max", "docs", "tokens")}
        for name, values in self.summary.items():
            values[key] = slots.column(name).to_numpy()
        super().__init__(trace, np.concatenate([[0], np.cumsum(self.summary["reads"])]), None, None, None, None)
        self.keep = int(entry["keep"])
        c_pos = np.searchsorted(np.asarray(layers), ctx.column("layer").to_numpy()).astype(np.int64)
        self._ctx_key = (c_pos * n + ctx.column("slot").to_numpy()) * 2 + ctx.column("kind").to_numpy()
        self._ctx = {name: ctx.column(name).to_numpy() for name in ("row", "weight", "reads")}

    def reading_tokens(self, layer: int | None = None) -> np.ndarray:
        n = self.trace.n_slots
        first = self.trace.layers.index(self.trace.resolve_layer(layer)) * n
        return self.summary["tokens"][first : first + n].copy()

    def slot_summary(self, slot: int, layer: int | None = None) -> dict[str, Any]:
        """reads, weight_sum, weight_max, mean weight, docs and reading tokens of `slot`."""
        k = self._key(slot, layer)
        out = {name: values[k].item() for name, values in self.summary.items()}
        out["weight_mean"] = out["weight_sum"] / out["reads"] if out["reads"] else 0.0
        return out

    def sample_contexts(self, slot: int, window: int = 8, layer: int | None = None) -> pd.DataFrame:
        """The summary's uniform sample of the tokens that read `slot` (in row order), with context."""
        rows, weight, reads = self._kept(slot, layer, SAMPLE)
        order = np.argsort(rows, kind="stable")
        df = self.context_rows(rows[order], window)
        df.insert(5, "weight", weight[order])
        df.insert(6, "reads", reads[order])
        return df

    def _kept(self, slot: int, layer: int | None, kind: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self._key(slot, layer) * 2 + kind
        a, b = np.searchsorted(self._ctx_key, [k, k + 1])
        return (self._ctx["row"][a:b].astype(np.int64), self._ctx["weight"][a:b].astype(np.float64),
                self._ctx["reads"][a:b].astype(np.int64))

    def top_readers(self, slot: int, n: int, layer: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The n reading tokens of most weight (rows, weight summed over heads, heads reading), most
        first, ties to the earlier row; n at most the summary's N unless the slot has no more readers."""
        return self._top_readers(slot, n, layer)

    def _top_readers(self, slot: int, n: int, layer: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, weight, reads = self._kept(slot, layer, TOP)
        if n > self.keep and self.summary["tokens"][self._key(slot, layer)] > self.keep:
            raise TraceError(f"this trace's summary keeps the top {self.keep} contexts of each slot; ask for at most "
                             f"{self.keep} (record with a larger --summary for more)")
        return rows[:n], weight[:n], reads[:n]

    def _refuse(self, what: str) -> None:
        raise TraceError(f"{what} needs every read, and this trace was recorded with --summary-only (per-slot summaries, "
                         "not every read); record it again without --summary-only")

    def readers(self, slot: int, layer: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._refuse("every reader of a slot")

    def _slot_reads(self, slot: int, layer: int | None) -> dict[str, np.ndarray]:
        self._refuse("the reads of a slot (weights, heads, ranks)")

    def _accesses_between(self, r0: int, r1: int) -> pd.DataFrame:
        self._refuse("the reads of a token span")

    def _accesses_of_rows(self, rows: np.ndarray) -> pd.DataFrame:
        self._refuse("the reads of token rows")
