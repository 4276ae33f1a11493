"""Traces — which memory slots every recorded token read — on disk and in memory, and `SlotIndex`,
the inverted index slot → the tokens that read it.

A trace directory (`Workspace.trace(name)`):

    meta.json                     format, model hash, memory config, recorded layers, source, counts,
                                  column descriptions, and the shard list with sizes and sha256
    tokens/part-NNNNN.parquet     one row per recorded token          (TOKEN_COLUMNS)
    accesses/part-NNNNN.parquet   one row per (token, layer, head, rank) read, sorted by token
                                  then layer, head, rank            (ACCESS_COLUMNS)
    index/                        the SlotIndex cache, built on first use (numpy arrays, memory-mapped)

Shards are written while recording goes on, so a corpus whose trace is larger than memory records
with bounded RAM; they fill a hidden `.NAME.partial` directory that becomes `NAME` only when
meta.json is written, so a trace that loads is whole, and an interrupted recording resumes from its
last finished shard (`TraceWriter`). Loading checks every shard's size and (by default) sha256 and
reads Parquet through a memory map on first use; `iter_shards()` streams one shard at a time.

A token's `text` is the document's characters from the previous recorded token's end to this
token's end, so joining the texts of a document's tokens gives back the document; `start`/`end` are
the tokenizer's (whitespace-trimmed) offsets of the token itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from smviz.errors import TraceError
from smviz.io import replace_dir, write_json_atomic
from smviz.usage import usage_metrics

if TYPE_CHECKING:
    from smviz.model import MemoryModel

log = logging.getLogger(__name__)

TRACE_FORMAT = "smviz-trace/1"
INDEX_FORMAT = "smviz-slot-index/1"

TOKEN_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "row": (pa.int32(), "token row, 0..n_tokens-1 in recording order; accesses.token refers to it"),
    "doc": (pa.int32(), "document number in the source, from 0, non-decreasing over rows"),
    "doc_id": (pa.string(), "document id given by the source ('' when recorded from raw batches)"),
    "position": (pa.int32(), "token position in its document (raw batches: column of the call's attention mask)"),
    "token_id": (pa.int32(), "vocabulary id (-1 when the model was given embeddings)"),
    "text": (pa.string(), "document characters from the previous token's end to this token's end"),
    "start": (pa.int32(), "character offset where the token begins in its document (-1: unknown)"),
    "end": (pa.int32(), "character offset where the token ends in its document (-1: unknown)"),
}
ACCESS_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "token": (pa.int32(), "row of the token that read the slot"),
    "layer": (pa.int16(), "transformer block index of the memory layer"),
    "head": (pa.int16(), "memory head"),
    "rank": (pa.int16(), "place in the head's top-k, 0 = highest score"),
    "slot": (pa.int32(), "slot id (i1 * n_keys + i2)"),
    "weight": (pa.float16(), "softmax weight of the read within its head's top-k"),
}
TOKENS_SCHEMA = pa.schema([(name, t) for name, (t, _) in TOKEN_COLUMNS.items()])
ACCESSES_SCHEMA = pa.schema([(name, t) for name, (t, _) in ACCESS_COLUMNS.items()])
TABLES = ("tokens", "accesses")


def model_meta(model: MemoryModel, layers: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """What a trace records about the model it came from (see `Trace.check_model`)."""
    return {
        "model_hash": model.model_hash,
        "memory": model.memory_config.to_dict(),
        "layers": sorted(layers),
        "n_slots": model.memory_config.n_slots,
    }


# --------------------------------------------------------------------------- building tables


def tokens_table(
    row0: int, doc: np.ndarray, doc_id: list[str] | np.ndarray, position: np.ndarray, token_id: np.ndarray,
    text: list[str], start: np.ndarray, end: np.ndarray,
) -> pa.Table:
    """A tokens table for rows row0, row0+1, ... (arrays of equal length)."""
    n = len(doc)
    return pa.table(
        [
            pa.array(np.arange(row0, row0 + n, dtype=np.int32)),
            pa.array(np.asarray(doc, dtype=np.int32)),
            pa.array(doc_id, type=pa.string()),
            pa.array(np.asarray(position, dtype=np.int32)),
            pa.array(np.asarray(token_id, dtype=np.int32)),
            pa.array(text, type=pa.string()),
            pa.array(np.asarray(start, dtype=np.int32)),
            pa.array(np.asarray(end, dtype=np.int32)),
        ],
        schema=TOKENS_SCHEMA,
    )


def accesses_table(row0: int, layers: list[int], slots: np.ndarray, weights: np.ndarray) -> pa.Table:
    """The accesses of tokens row0, row0+1, ...: `slots` int32 and `weights` float16 of shape
    (n_tokens, len(layers), heads, knn), flattened in (token, layer, head, rank) order."""
    n, n_layers, heads, knn = slots.shape
    per_token = n_layers * heads * knn
    return pa.table(
        [
            pa.array(np.repeat(np.arange(row0, row0 + n, dtype=np.int32), per_token)),
            pa.array(np.tile(np.repeat(np.asarray(layers, dtype=np.int16), heads * knn), n)),
            pa.array(np.tile(np.repeat(np.arange(heads, dtype=np.int16), knn), n * n_layers)),
            pa.array(np.tile(np.arange(knn, dtype=np.int16), n * n_layers * heads)),
            pa.array(np.ascontiguousarray(slots, dtype=np.int32).reshape(-1)),
            pa.array(np.ascontiguousarray(weights, dtype=np.float16).reshape(-1)),
        ],
        schema=ACCESSES_SCHEMA,
    )


# --------------------------------------------------------------------------- writing


class TraceWriter:
    """Writes a trace shard by shard into `.NAME.partial/` beside `path`; `finish()` writes meta.json
    and moves the directory into place. A writer opened on a partial directory left by an interrupted
    recording of the same thing (same `meta`) continues after its last finished shard; `state()`
    returns what the caller stored with that shard (e.g. the next document to record)."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *, force: bool = False, resume: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not force:
            raise TraceError(f"{self.path} already exists; pass force (--force) to replace it")
        if self.path.exists() and not (self.path / "meta.json").is_file():
            raise TraceError(f"{self.path} exists and is not a trace; refusing to replace it")
        self.meta = dict(meta)
        self.partial = self.path.parent / f".{self.path.name}.partial"
        self._fingerprint = _digest(json.dumps(self.meta, sort_keys=True).encode())
        progress = _read_json(self.partial / "progress.json")
        if resume and progress is not None and progress.get("fingerprint") == self._fingerprint:
            self._shards: list[dict[str, Any]] = progress["shards"]
            self._state: dict[str, Any] = progress["state"]
            log.info("resuming the recording in %s after %d shards", self.partial, len(self._shards))
        else:
            if self.partial.exists():
                log.info("discarding %s: it was recorded with other settings", self.partial)
            shutil.rmtree(self.partial, ignore_errors=True)
            self._shards, self._state = [], {}
        for table in TABLES:
            (self.partial / table).mkdir(parents=True, exist_ok=True)

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def next_row(self) -> int:
        return sum(s["tokens"] for s in self._shards)

    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def write(self, tokens: pa.Table, accesses: pa.Table, state: dict[str, Any] | None = None) -> None:
        """Append one shard (tokens rows must continue at `next_row`); `state` is kept for resuming."""
        rows = tokens.column("row").to_numpy()
        if len(rows) and rows[0] != self.next_row:
            raise TraceError(f"shard starts at row {rows[0]}, expected {self.next_row}")
        token_col = accesses.column("token").to_numpy()
        if len(token_col) and (np.any(np.diff(token_col) < 0) or token_col[0] < self.next_row or token_col[-1] >= self.next_row + len(rows)):
            raise TraceError("accesses must be sorted by token and refer to this shard's rows")
        name = f"part-{len(self._shards):05d}.parquet"
        entry: dict[str, Any] = {"name": name, "tokens": tokens.num_rows, "accesses": accesses.num_rows, "files": {}}
        for table_name, table in (("tokens", tokens), ("accesses", accesses)):
            target = self.partial / table_name / name
            tmp = target.with_suffix(".tmp")
            pq.write_table(table.cast(TOKENS_SCHEMA if table_name == "tokens" else ACCESSES_SCHEMA), tmp, compression="zstd")
            os.replace(tmp, target)
            entry["files"][table_name] = {"bytes": target.stat().st_size, "sha256": _file_digest(target)}
        self._shards.append(entry)
        self._state = dict(state or {})
        write_json_atomic(self.partial / "progress.json", {"fingerprint": self._fingerprint, "shards": self._shards, "state": self._state})

    def finish(self, n_docs: int, extra: dict[str, Any] | None = None) -> Trace:
        """Write meta.json, move the trace into place (replacing an older trace at `path`), load it.
        `n_docs` counts the source's documents, those that gave no token included."""
        meta = dict(self.meta) | dict(extra or {})
        meta |= {
            "format": TRACE_FORMAT,
            "counts": {
                "docs": n_docs,
                "tokens": self.next_row,
                "accesses": sum(s["accesses"] for s in self._shards),
            },
            "shards": self._shards,
            "columns": {
                "tokens": {k: d for k, (_, d) in TOKEN_COLUMNS.items()},
                "accesses": {k: d for k, (_, d) in ACCESS_COLUMNS.items()},
            },
        }
        write_json_atomic(self.partial / "meta.json", meta)
        (self.partial / "progress.json").unlink(missing_ok=True)
        replace_dir(self.partial, self.path)
        return Trace.load(self.path, verify=False)


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

    # ---- construction

    @classmethod
    def from_tables(cls, meta: dict[str, Any], tokens: pa.Table, accesses: pa.Table) -> Trace:
        """An in-memory trace; `meta` as `model_meta` gives, plus a 'source' entry."""
        tokens, accesses = tokens.cast(TOKENS_SCHEMA), accesses.cast(ACCESSES_SCHEMA)
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
            partial = path.parent / f".{path.name}.partial"
            hint = (
                "; a recording into it was interrupted — rerun the same `smviz record` command to resume it"
                if partial.exists() else ""
            )
            raise TraceError(f"no trace at {path}{hint}")
        meta = _read_json(path / "meta.json")
        if meta is None:
            raise TraceError(f"{path} is not a complete trace: meta.json is missing or unreadable")
        if meta.get("format") != TRACE_FORMAT:
            raise TraceError(f"{path}/meta.json has format {meta.get('format')!r}, expected {TRACE_FORMAT!r}")
        try:
            shards = meta["shards"]
            for shard in shards:
                for table in TABLES:
                    f = path / table / shard["name"]
                    expected = shard["files"][table]
                    if not f.is_file():
                        raise TraceError(f"{f} is missing; the trace is incomplete — record it again")
                    if f.stat().st_size != expected["bytes"]:
                        raise TraceError(f"{f} is truncated or altered ({f.stat().st_size} bytes, {expected['bytes']} recorded); record the trace again")
                    if verify and _file_digest(f) != expected["sha256"]:
                        raise TraceError(f"{f} is corrupted (sha256 differs from meta.json); record the trace again")
        except (KeyError, TypeError) as e:
            raise TraceError(f"{path}/meta.json is malformed ({e!r})") from None
        return cls(meta, path=path)

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Trace:
        """Write this trace to `path` (atomically) and return the on-disk trace."""
        base = {k: v for k, v in self.meta.items() if k not in ("format", "counts", "shards", "columns")}
        writer = TraceWriter(path, base, force=force, resume=False)
        for tokens, accesses in self.iter_shards():
            writer.write(tokens, accesses)
        return writer.finish(self.n_docs)

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
        for shard in self.meta["shards"]:
            yield self._read("tokens", shard["name"]), self._read("accesses", shard["name"])

    def iter_table(self, table: str) -> Iterator[pa.Table]:
        """One table ("tokens" or "accesses") shard by shard, without reading the other."""
        if table not in TABLES:
            raise TraceError(f"table must be 'tokens' or 'accesses', got {table!r}")
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
        df = _float_weights(self.accesses.to_pandas())
        rows = df["token"].to_numpy()
        for col in ("doc", "doc_id", "position", "text"):
            df[col] = self.tokens.column(col).take(pa.array(rows)).to_pandas() if len(rows) else pd.Series([], dtype=object)
        return df

    def slot_counts(self, layer: int | None = None) -> np.ndarray:
        """Reads per slot (int64, length n_slots) of one memory layer, streamed over the shards."""
        layer = self._layer(layer)
        counts = np.zeros(self.n_slots, dtype=np.int64)
        for accesses in self.iter_table("accesses"):
            mask = pc.equal(accesses.column("layer"), layer)
            counts += np.bincount(accesses.column("slot").filter(mask).to_numpy(), minlength=self.n_slots)
        return counts

    def usage(self, layer: int | None = None) -> dict[str, float] | dict[int, dict[str, float]]:
        """Memory-usage summary (`smviz.usage.usage_metrics`) of one layer, or of every recorded layer."""
        import torch

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
        """The inverted index slot → token rows; cached in `index/` of an on-disk trace."""
        if self._index is None:
            self._index = SlotIndex.for_trace(self)
        return self._index

    # ---- internals

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            if len(self.layers) != 1:
                raise TraceError(f"this trace holds layers {self.layers}; say which one (layer=...)")
            return self.layers[0]
        if layer not in self.layers:
            raise TraceError(f"layer {layer} was not recorded; this trace holds layers {self.layers}")
        return int(layer)

    def _table(self, name: str) -> pa.Table:
        if name not in self._tables:
            schema = TOKENS_SCHEMA if name == "tokens" else ACCESSES_SCHEMA
            parts = list(self.iter_table(name))
            self._tables[name] = pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()
        return self._tables[name]

    def _read(self, table: str, name: str) -> pa.Table:
        f = self.path / table / name
        try:
            t = pq.read_table(f, memory_map=True)
        except (pa.ArrowException, OSError) as e:
            raise TraceError(f"{f} cannot be read ({e}); record the trace again") from None
        expected = TOKENS_SCHEMA if table == "tokens" else ACCESSES_SCHEMA
        if not t.schema.equals(expected, check_metadata=False):
            raise TraceError(f"{f} has columns {t.schema.names} of other types than a trace's {table} table")
        return t


# --------------------------------------------------------------------------- the inverted index


class SlotIndex:
    """slot → the accesses that read it, as CSR over (layer, slot): the reads of slot s of layer l
    are entries offsets[k]..offsets[k+1] of `rows` (token rows), `weights` and `heads`, with
    k = (position of l in the trace's layers) * n_slots + s, in token order. Built with one numpy
    sort; an on-disk trace caches it in `index/` and memory-maps it."""

    def __init__(self, trace: Trace, offsets: np.ndarray, rows: np.ndarray, weights: np.ndarray, heads: np.ndarray) -> None:
        self.trace = trace
        self.offsets, self.rows, self.weights, self.heads = offsets, rows, weights, heads
        self._tokens: dict[str, Any] = {}
        self._access_token: np.ndarray | None = None

    @classmethod
    def build(cls, trace: Trace) -> SlotIndex:
        n = trace.n_slots
        layer_pos = {layer: i for i, layer in enumerate(trace.layers)}
        keys, rows, weights, heads = [], [], [], []
        for acc in trace.iter_table("accesses"):
            layer = acc.column("layer").to_numpy()
            pos = np.zeros(len(layer), dtype=np.int64)
            for l, i in layer_pos.items():  # a handful of layers, not slots
                pos[layer == l] = i
            keys.append(pos * n + acc.column("slot").to_numpy())
            rows.append(acc.column("token").to_numpy())
            weights.append(acc.column("weight").to_numpy())
            heads.append(acc.column("head").to_numpy())
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        order = np.argsort(keys_all, kind="stable")
        counts = np.bincount(keys_all, minlength=len(layer_pos) * n)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def take(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return (np.concatenate(parts) if parts else np.zeros(0, dtype))[order]

        return cls(trace, offsets, take(rows, np.int32), take(weights, np.float16), take(heads, np.int16))

    @classmethod
    def for_trace(cls, trace: Trace) -> SlotIndex:
        """Load the cached index of an on-disk trace, or build (and cache) it."""
        if trace.path is None:
            return cls.build(trace)
        directory = trace.path / "index"
        stamp = _digest(json.dumps(trace.meta["shards"], sort_keys=True).encode())
        info = _read_json(directory / "index.json")
        if info is not None and info.get("format") == INDEX_FORMAT and info.get("trace") == stamp:
            try:
                arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _INDEX_ARRAYS}
                if len(arrays["offsets"]) == len(trace.layers) * trace.n_slots + 1 and len(arrays["rows"]) == trace.n_accesses:
                    return cls(trace, **arrays)
            except (OSError, ValueError):
                pass
            log.warning("the slot index cache in %s is damaged; rebuilding it", directory)
        index = cls.build(trace)
        try:
            tmp = trace.path / f".index.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name in _INDEX_ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(index, name), allow_pickle=False)
            write_json_atomic(tmp / "index.json", {"format": INDEX_FORMAT, "trace": stamp})
            replace_dir(tmp, directory)
        except OSError as e:  # a read-only trace still gets its (in-memory) index
            log.warning("could not cache the slot index in %s (%s)", directory, e)
        return index

    # ---- queries

    def count(self, slot: int, layer: int | None = None) -> int:
        """How many reads of `slot` the trace holds."""
        k = self._key(slot, layer)
        return int(self.offsets[k + 1] - self.offsets[k])

    def slot_weights(self, slot: int, layer: int | None = None) -> np.ndarray:
        """The weights of every read of `slot` (float32, in token order)."""
        k = self._key(slot, layer)
        return np.asarray(self.weights[int(self.offsets[k]) : int(self.offsets[k + 1])], dtype=np.float32)

    def reads_of_rows(self, rows: np.ndarray, layer: int | None = None) -> pd.DataFrame:
        """Every read by the given token rows (any order): columns row, layer, head, rank, slot, weight.
        The accesses are sorted by token, so each row's reads are one contiguous range (no scan)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.trace.n_tokens):
            raise TraceError(f"token rows must lie in [0, {self.trace.n_tokens}), got {rows[0]}..{rows[-1]}")
        token_col = self._access_tokens()
        starts = token_col.searchsorted(rows.astype(token_col.dtype))
        ends = token_col.searchsorted((rows + 1).astype(token_col.dtype))
        lengths = ends - starts
        take = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        df = _float_weights(self.trace.accesses.take(pa.array(take)).to_pandas()).rename(columns={"token": "row"})
        return df if layer is None else df[df["layer"] == self.trace._layer(layer)].reset_index(drop=True)

    def contexts(self, slot: int, n: int = 20, window: int = 8, layer: int | None = None) -> pd.DataFrame:
        """The n tokens that read `slot` with the most weight, with `window` tokens of context each side
        (within the token's document). A token's weight is the sum of its reads of the slot over heads.

        Columns: rank (0 = most weight), row, doc, doc_id, position, token (its text), weight (float),
        reads (how many heads read the slot), left / right (context text), window (list of the token
        texts shown, the accessing token included) and focus (its place in `window`). Ties in weight
        go to the earlier row."""
        if n < 1 or window < 0:
            raise TraceError(f"n must be >= 1 and window >= 0, got n={n}, window={window}")
        k = self._key(slot, layer)
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        rows = np.asarray(self.rows[a:b])
        uniq, inverse = np.unique(rows, return_inverse=True)
        weight = np.bincount(inverse, weights=np.asarray(self.weights[a:b], dtype=np.float64), minlength=len(uniq))
        reads = np.bincount(inverse, minlength=len(uniq))
        top = np.lexsort((uniq, -weight))[:n]
        tok = self._token_columns()
        records = []
        for rank, i in enumerate(top):
            row = int(uniq[i])
            d = int(tok["doc"][row])
            lo = max(row - window, int(tok["doc_start"][d]))
            hi = min(row + window + 1, int(tok["doc_start"][d + 1]))
            texts = tok["text"].slice(lo, hi - lo).to_pylist()
            f = row - lo
            records.append({
                "rank": rank, "row": row, "doc": d, "doc_id": tok["doc_id"][row].as_py(),
                "position": int(tok["position"][row]), "token": texts[f], "weight": float(weight[i]),
                "reads": int(reads[i]), "left": "".join(texts[:f]), "right": "".join(texts[f + 1 :]),
                "window": texts, "focus": f,
            })
        columns = ["rank", "row", "doc", "doc_id", "position", "token", "weight", "reads", "left", "right", "window", "focus"]
        return pd.DataFrame.from_records(records, columns=columns)

    def slots_for(self, doc: int | str, start: int, end: int, layer: int | None = None) -> pd.DataFrame:
        """Every read by the tokens at positions start..end-1 of document `doc` (its number, or its
        doc_id). Columns: row, position, token (text), layer, head, rank, slot, weight; sorted by
        position, layer, head, rank. `layer` keeps one memory layer."""
        if layer is not None:
            self.trace._layer(layer)
        tok = self._token_columns()
        d = self._doc_number(doc)
        lo, hi = int(tok["doc_start"][d]), int(tok["doc_start"][d + 1])
        positions = tok["position"][lo:hi]
        if not start < end:
            raise TraceError(f"empty span [{start}, {end}); give start < end")
        inside = np.flatnonzero((positions >= start) & (positions < end))
        if len(inside) == 0:
            held = f"positions {int(positions.min())}..{int(positions.max())}" if len(positions) else "no tokens"
            raise TraceError(f"document {doc!r} has {held}; [{start}, {end}) holds none of them")
        r0, r1 = lo + int(inside[0]), lo + int(inside[-1]) + 1
        token_col = self._access_tokens()
        a, b = token_col.searchsorted(np.array([r0, r1], dtype=token_col.dtype))  # same dtype: no copy of the column
        df = _float_weights(self.trace.accesses.slice(int(a), int(b - a)).to_pandas()).rename(columns={"token": "row"})
        if layer is not None:
            df = df[df["layer"] == layer]
        df.insert(1, "position", tok["position"][df["row"].to_numpy()])
        df.insert(2, "token", self.trace.tokens.column("text").take(pa.array(df["row"].to_numpy())).to_pylist())
        return df.reset_index(drop=True)

    # ---- internals

    def _key(self, slot: int, layer: int | None) -> int:
        layer = self.trace._layer(layer)
        if not (isinstance(slot, (int, np.integer)) and 0 <= slot < self.trace.n_slots):
            raise TraceError(f"slot {slot!r} is out of range: the memory has {self.trace.n_slots:,} slots (0..{self.trace.n_slots - 1})")
        return self.trace.layers.index(layer) * self.trace.n_slots + int(slot)

    def _doc_number(self, doc: int | str) -> int:
        n_docs = len(self._token_columns()["doc_start"]) - 1
        if isinstance(doc, str):
            hits = pc.index(self.trace.tokens.column("doc_id"), doc).as_py()
            if hits < 0:
                raise TraceError(f"no document with doc_id {doc!r} in this trace")
            return int(self._token_columns()["doc"][hits])
        if not (isinstance(doc, (int, np.integer)) and 0 <= doc < n_docs):
            raise TraceError(f"document {doc!r} is out of range: the trace holds documents 0..{n_docs - 1}")
        return int(doc)

    def _token_columns(self) -> dict[str, Any]:
        """Token columns as numpy (cached), and doc_start[d] = first row of document d."""
        if not self._tokens:
            t = self.trace.tokens
            doc = t.column("doc").to_numpy()
            n_docs = self.trace.n_docs
            self._tokens = {
                "doc": doc,
                "position": t.column("position").to_numpy(),
                "doc_id": t.column("doc_id").combine_chunks() if t.num_rows else pa.array([], pa.string()),
                "text": t.column("text").combine_chunks() if t.num_rows else pa.array([], pa.string()),
                "doc_start": doc.searchsorted(np.arange(n_docs + 1, dtype=doc.dtype)),
            }
        return self._tokens

    def _access_tokens(self) -> np.ndarray:
        if self._access_token is None:
            self._access_token = self.trace.accesses.column("token").to_numpy()
        return self._access_token


_INDEX_ARRAYS = ("offsets", "rows", "weights", "heads")


def _float_weights(df: pd.DataFrame) -> pd.DataFrame:
    """DataFrames carry weights as float32 (the stored float16 values exactly): pandas handles
    float16 poorly."""
    df["weight"] = df["weight"].astype(np.float32)
    return df


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
