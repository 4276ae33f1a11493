"""`Trace` — which memory slots every recorded token read, on disk or in memory (the directory's files
are `smviz.trace.format`'s, written by `smviz.trace.writer.TraceWriter`). Loading checks every shard's
size and (by default) sha256 and reads Parquet through a memory map on first use; `iter_shards()`
streams one shard at a time; a directory an interrupted recording left is named as such.

A token's `text` is the document's characters from the previous recorded token's end to this
token's end, so joining the texts of a document's tokens gives back the document; `start`/`end` are
the tokenizer's (whitespace-trimmed) offsets of the token itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from smviz.errors import TraceError
from smviz.model.layers import resolve_layer
from smviz.trace.format import (
    META_FILE,
    SCHEMAS,
    TABLES,
    TRACE_FORMAT,
    file_digest,
    float_weights,
    part_name,
    partial_dir,
    read_json,
)
from smviz.trace.duck import DuckSlotIndex, fits_in_memory
from smviz.trace.index import SlotIndex
from smviz.trace.summary import FILES as SUMMARY_FILES, SUMMARY_DIR, SummarySlotIndex
from smviz.trace.writer import TraceWriter
from smviz.usage import usage_metrics

if TYPE_CHECKING:
    from smviz.model import MemoryModel


# --------------------------------------------------------------------------- reading


class Trace:
    """A recorded trace: the tokens table and the accesses table (pyarrow), plus `meta`.

    Load one with `Trace.load(path)`; `AccessRecorder.trace()` gives one in memory (`path` None),
    which `save(path)` writes. Tables are read on first use; `to_pandas()` joins token columns onto
    the accesses for notebooks."""

    def __init__(self, meta: dict[str, Any], *, path: Path | None = None, shards: list[tuple[pa.Table, pa.Table]] | None = None) -> None:
        self.meta = meta
        self.path = path
        self._shards = shards  # in-memory shards; None: read from `path`
        self._tables: dict[str, pa.Table] = {}
        self._index: SlotIndex | None = None
        self._summary: SummarySlotIndex | None = None

    # ---- construction

    @classmethod
    def from_tables(cls, meta: dict[str, Any], tokens: pa.Table, accesses: pa.Table) -> Trace:
        """An in-memory trace; `meta` as `model_meta` gives, plus a 'source' entry."""
        tokens, accesses = tokens.cast(SCHEMAS["tokens"]), accesses.cast(SCHEMAS["accesses"])
        n_docs = int(pc.max(tokens.column("doc")).as_py()) + 1 if tokens.num_rows else 0
        meta = dict(meta) | {
            "format": TRACE_FORMAT,
            "counts": {"docs": n_docs, "tokens": tokens.num_rows, "accesses": accesses.num_rows},
        }
        return cls(meta, shards=[(tokens, accesses)])

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> Trace:
        """Open a trace directory; every shard must be present with its recorded size, and with
        `verify` (default) its recorded sha256 — a truncated or altered file is refused."""
        path = Path(path)
        if not path.is_dir():
            hint = (
                "; a recording into it was interrupted — rerun the same `smviz record` command to resume it"
                if partial_dir(path).exists() else ""
            )
            raise TraceError(f"no trace at {path}{hint}")
        meta = read_json(path / META_FILE)
        if not isinstance(meta, dict):
            raise TraceError(f"{path} is not a complete trace: {META_FILE} is missing or unreadable")
        if meta.get("format") != TRACE_FORMAT:
            raise TraceError(f"{path}/{META_FILE} has format {meta.get('format')!r}, expected {TRACE_FORMAT!r}")
        _check_meta(path, meta)
        try:
            for i, shard in enumerate(meta["shards"]):
                if shard["name"] != part_name(i):
                    raise TraceError(f"{path}/{META_FILE} lists shard {shard['name']!r} where {part_name(i)!r} belongs")
                for table in TABLES:
                    f = path / table / shard["name"]
                    expected = shard["files"][table]
                    if not f.is_file():
                        raise TraceError(f"{f} is missing; the trace is incomplete — record it again")
                    if f.stat().st_size != expected["bytes"]:
                        raise TraceError(f"{f} is truncated or altered ({f.stat().st_size} bytes, {expected['bytes']} recorded); record the trace again")
                    if verify and file_digest(f) != expected["sha256"]:
                        raise TraceError(f"{f} is corrupted (sha256 differs from {META_FILE}); record the trace again")
            for name, expected in (meta.get("summary") or {"files": {}})["files"].items():
                f = path / SUMMARY_DIR / SUMMARY_FILES[name]
                if not f.is_file() or f.stat().st_size != expected["bytes"] or (verify and file_digest(f) != expected["sha256"]):
                    raise TraceError(f"{f} is missing, truncated or altered; record the trace again")
        except (KeyError, TypeError) as e:
            raise TraceError(f"{path}/{META_FILE} is malformed ({e!r})") from None
        return cls(meta, path=path)

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Trace:
        """Write this trace to `path` (atomically) and return the on-disk trace."""
        base = {k: v for k, v in self.meta.items() if k not in ("format", "counts", "shards", "columns")}
        writer = TraceWriter(path, base, force=force, resume=False)
        for tokens, accesses in self.iter_shards():
            writer.write(tokens, accesses)
        return Trace.load(writer.finish(self.n_docs), verify=False)

    # ---- what it holds

    @property
    def model_hash(self) -> str | None:
        return self.meta.get("model_hash")

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def n_slots(self) -> int:
        return int(self.meta["n_slots"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["counts"]["docs"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["counts"]["tokens"])

    @property
    def n_accesses(self) -> int:
        return int(self.meta["counts"]["accesses"])

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "in memory"
        return (f"Trace({where}: {self.n_docs:,} docs, {self.n_tokens:,} tokens, {self.n_accesses:,} accesses, "
                f"layers {self.layers}, model {self.model_hash})")

    def iter_shards(self) -> Iterator[tuple[pa.Table, pa.Table]]:
        """(tokens, accesses) one shard at a time — bounded memory over any trace size."""
        if self._shards is not None:
            yield from self._shards
            return
        self._check_reads()
        for shard in self.meta["shards"]:
            yield self._read("tokens", shard["name"]), self._read("accesses", shard["name"])

    @property
    def summary_only(self) -> bool:
        """Recorded with --summary-only: per-slot summaries and the tokens, not every read."""
        return bool((self.meta.get("summary") or {}).get("only"))

    def slot_summary(self) -> SummarySlotIndex:
        """The per-slot summaries of a trace recorded with --summary or --summary-only."""
        if self.path is None or not self.meta.get("summary"):
            raise TraceError("this trace has no slot summaries; record it with --summary N")
        if self._summary is None:
            self._summary = SummarySlotIndex(self)
        return self._summary

    def iter_table(self, table: str) -> Iterator[pa.Table]:
        """One table ("tokens" or "accesses") shard by shard, without reading the other."""
        if table not in TABLES:
            raise TraceError(f"table must be 'tokens' or 'accesses', got {table!r}")
        if table == "accesses":
            self._check_reads()
        if self._shards is not None:
            yield from (shard[TABLES.index(table)] for shard in self._shards)
            return
        for shard in self.meta["shards"]:
            yield self._read(table, shard["name"])

    @property
    def tokens(self) -> pa.Table:
        return self._table("tokens")

    @property
    def accesses(self) -> pa.Table:
        return self._table("accesses")

    def to_pandas(self, table: str = "accesses") -> pd.DataFrame:
        """`"tokens"`: the tokens table. `"accesses"`: the accesses with their token's `doc`,
        `doc_id`, `position` and `text` joined on (columns as in ACCESS_COLUMNS / TOKEN_COLUMNS;
        weights as float32)."""
        if table == "tokens":
            return self.tokens.to_pandas()
        if table != "accesses":
            raise TraceError(f"table must be 'tokens' or 'accesses', got {table!r}")
        df = float_weights(self.accesses.to_pandas())
        rows = df["token"].to_numpy()
        for col in ("doc", "doc_id", "position", "text"):
            df[col] = self.tokens.column(col).take(pa.array(rows)).to_pandas() if len(rows) else pd.Series([], dtype=object)
        return df

    def slot_counts(self, layer: int | None = None) -> np.ndarray:
        """Reads per slot (int64, length n_slots) of one memory layer, streamed over the shards."""
        layer = self.resolve_layer(layer)
        if self.summary_only:
            return self.slot_summary().slot_counts(layer)
        counts = np.zeros(self.n_slots, dtype=np.int64)
        for accesses in self.iter_table("accesses"):
            mask = pc.equal(accesses.column("layer"), layer)
            counts += np.bincount(accesses.column("slot").filter(mask).to_numpy(), minlength=self.n_slots)
        return counts

    def usage(self, layer: int | None = None) -> dict[str, float] | dict[int, dict[str, float]]:
        """Memory-usage summary (`smviz.usage.usage_metrics`) of one layer, or of every recorded layer."""
        if layer is None and len(self.layers) > 1:
            return {l: usage_metrics(torch.from_numpy(self.slot_counts(l))) for l in self.layers}
        return usage_metrics(torch.from_numpy(self.slot_counts(layer)))

    def check_model(self, model: MemoryModel) -> None:
        """Refuse a model other than the one this trace was recorded with (memory config or hash)."""
        memory = model.memory_config.to_dict()
        if memory != self.meta["memory"]:
            diff = sorted(k for k in set(memory) | set(self.meta["memory"]) if memory.get(k) != self.meta["memory"].get(k))
            raise TraceError(f"this trace was recorded with a different memory config (differs in {diff}); "
                             "record a trace with this model")
        if self.model_hash != model.model_hash:
            raise TraceError(f"this trace was recorded with model {self.model_hash}, not {model.model_hash}; "
                             "record a trace with this model (an unsaved model has no hash: save or load it first)")

    def slot_index(self) -> SlotIndex:
        """The inverted index slot → token rows; cached in `index/` of an on-disk trace. An on-disk
        trace whose in-memory index would not fit `smviz.trace.duck.index_memory_budget()` gets the
        DuckDB one (same answers, bounded memory)."""
        if self._index is None:
            if self.summary_only:
                self._index = self.slot_summary()
            elif self.path is not None and self.meta["shards"] and not fits_in_memory(self.n_accesses):
                self._index = DuckSlotIndex.for_trace(self)
            else:
                self._index = SlotIndex.for_trace(self)
        return self._index

    def resolve_layer(self, layer: int | None) -> int:
        """The recorded memory layer `layer` names (None: the only one); ConfigError otherwise."""
        return resolve_layer(layer, self.layers, what="this trace")

    # ---- internals

    def _check_reads(self) -> None:
        if self.summary_only:
            raise TraceError("this trace was recorded with --summary-only: it keeps per-slot summaries "
                             "(trace.slot_summary()), not every read; record it again without --summary-only")

    def _table(self, name: str) -> pa.Table:
        if name not in self._tables:
            schema = SCHEMAS[name]
            parts = list(self.iter_table(name))
            self._tables[name] = pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()
        return self._tables[name]

    def _read(self, table: str, name: str) -> pa.Table:
        f = self.path / table / name
        try:
            t = pq.read_table(f, memory_map=True)
        except (pa.ArrowException, OSError) as e:
            raise TraceError(f"{f} cannot be read ({e}); record the trace again") from None
        if not t.schema.equals(SCHEMAS[table], check_metadata=False):
            raise TraceError(f"{f} has columns {t.schema.names} of other types than a trace's {table} table")
        return t


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """The fields of meta.json every reader relies on, type-checked (TraceError naming the field)."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    layers, counts = meta.get("layers"), meta.get("counts")
    problems = []
    if not (isinstance(layers, list) and layers and all(is_int(l) and l >= 0 for l in layers)):
        problems.append(f"'layers' must be a non-empty list of block indices, got {layers!r}")
    if not (is_int(meta.get("n_slots")) and meta["n_slots"] >= 1):
        problems.append(f"'n_slots' must be a positive integer, got {meta.get('n_slots')!r}")
    if not (isinstance(counts, dict) and all(is_int(counts.get(k)) and counts[k] >= 0 for k in ("docs", "tokens", "accesses"))):
        problems.append(f"'counts' must hold integers docs, tokens and accesses, got {counts!r}")
    if not isinstance(meta.get("shards"), list):
        problems.append("'shards' must be a list")
    if not isinstance(meta.get("memory"), dict):
        problems.append("'memory' must be an object (the memory config)")
    if problems:
        raise TraceError(f"{path}/{META_FILE} is malformed: {problems[0]}; record the trace again")
