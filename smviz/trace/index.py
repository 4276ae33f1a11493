"""`SlotIndex`, the inverted index slot → the tokens that read it, and its cache in a trace's `index/`
folder: "top contexts of slot s", "what did these tokens read" and "what did this span read" answered
from one numpy sort, without scanning the accesses.

`trace` arguments are `smviz.trace.Trace` objects; the class is imported for type checking only,
because `Trace.slot_index` builds the index (an import at run time would make the two modules a circle).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from smviz.errors import TraceError, WriteError
from smviz.io import atomic_dir, write_json_atomic
from smviz.trace.format import (
    INDEX_ARRAYS,
    INDEX_DIR,
    INDEX_FORMAT,
    INDEX_INFO,
    digest,
    float_weights,
    index_array_file,
    read_json,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from smviz.trace import Trace


def sum_runs(rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct row of `rows` (ascending, a row's repeats adjacent, as a slot's reads are): (row
    int64, its weights summed float64, how many int64) — one pass, no sort."""
    starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]])) if len(rows) else np.zeros(0, np.int64)
    weight = np.add.reduceat(weights.astype(np.float64), starts) if len(rows) else np.zeros(0)
    return rows[starts].astype(np.int64), weight, np.diff(np.append(starts, len(rows))).astype(np.int64)


def most_weight(rows: np.ndarray, weight: np.ndarray, reads: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n entries of most weight, most first, ties to the earlier row; a partition first, so a
    slot with millions of readers sorts only the few that can make the top n."""
    if len(weight) > n:
        cut = np.partition(weight, len(weight) - n)[len(weight) - n]
        keep = np.flatnonzero(weight >= cut)  # the top n and everything tied with the n-th
        rows, weight, reads = rows[keep], weight[keep], reads[keep]
    top = np.lexsort((rows, -weight))[:n]
    return rows[top], weight[top], reads[top]


class SlotIndex:
    """slot → the accesses that read it, as CSR over (layer, slot): the reads of slot s of layer l
    are entries offsets[k]..offsets[k+1] of `rows` (token rows), `weights`, `heads` and `ranks`
    (place in the head's top-k, 0 = highest), with k = (position of l in the trace's layers) *
    n_slots + s, in token order. Built with one numpy sort; an on-disk trace caches it in `index/`
    and memory-maps it."""

    def __init__(self, trace: Trace, offsets: np.ndarray, rows: np.ndarray, weights: np.ndarray, heads: np.ndarray,
                 ranks: np.ndarray) -> None:
        self.trace = trace
        self.offsets, self.rows, self.weights, self.heads, self.ranks = offsets, rows, weights, heads, ranks
        self._tokens: dict[str, Any] = {}
        self._access_token: np.ndarray | None = None
        self._reading_tokens: dict[int, np.ndarray] = {}

    @classmethod
    def build(cls, trace: Trace) -> SlotIndex:
        n = trace.n_slots
        layer_pos = {layer: i for i, layer in enumerate(trace.layers)}
        keys, rows, weights, heads, ranks = [], [], [], [], []
        for acc in trace.iter_table("accesses"):
            layer = acc.column("layer").to_numpy()
            pos = np.zeros(len(layer), dtype=np.int64)
            for l, i in layer_pos.items():  # a handful of layers, not slots
                pos[layer == l] = i
            keys.append(pos * n + acc.column("slot").to_numpy())
            rows.append(acc.column("token").to_numpy())
            weights.append(acc.column("weight").to_numpy())
            heads.append(acc.column("head").to_numpy())
            ranks.append(acc.column("rank").to_numpy())
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        order = np.argsort(keys_all, kind="stable")
        counts = np.bincount(keys_all, minlength=len(layer_pos) * n)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def take(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return (np.concatenate(parts) if parts else np.zeros(0, dtype))[order]

        return cls(trace, offsets, take(rows, np.int32), take(weights, np.float16), take(heads, np.int16), take(ranks, np.int16))

    @classmethod
    def for_trace(cls, trace: Trace) -> SlotIndex:
        """Load the cached index of an on-disk trace, or build (and cache) it. A cache written for
        other shards or in another INDEX_FORMAT (an older smviz: no `ranks`) is rebuilt."""
        if trace.path is None:
            return cls.build(trace)
        directory = trace.path / INDEX_DIR
        stamp = digest(json.dumps(trace.meta["shards"], sort_keys=True).encode())
        info = read_json(directory / INDEX_INFO)
        if isinstance(info, dict) and info.get("format") == INDEX_FORMAT and info.get("trace") == stamp:
            try:
                arrays = {name: np.load(directory / index_array_file(name), mmap_mode="r", allow_pickle=False)
                          for name in INDEX_ARRAYS}
                if len(arrays["offsets"]) == len(trace.layers) * trace.n_slots + 1 and all(
                        len(arrays[name]) == trace.n_accesses for name in INDEX_ARRAYS if name != "offsets"):
                    return cls(trace, **arrays)
            except (OSError, ValueError):
                pass
            log.warning("the slot index cache in %s is damaged; rebuilding it", directory)
        elif isinstance(info, dict) and info.get("format") != INDEX_FORMAT:
            log.info("the slot index cache in %s has format %r, not %r; rebuilding it", directory, info.get("format"), INDEX_FORMAT)
        index = cls.build(trace)
        try:
            with atomic_dir(directory) as tmp:
                for name in INDEX_ARRAYS:
                    np.save(tmp / index_array_file(name), getattr(index, name), allow_pickle=False)
                write_json_atomic(tmp / INDEX_INFO, {"format": INDEX_FORMAT, "trace": stamp})
        except WriteError as e:  # a read-only trace still gets its (in-memory) index
            log.warning("could not cache the slot index in %s (%s)", directory, e)
        return index

    # ---- queries

    def count(self, slot: int, layer: int | None = None) -> int:
        """How many reads of `slot` the trace holds."""
        k = self._key(slot, layer)
        return int(self.offsets[k + 1] - self.offsets[k])

    def slot_counts(self, layer: int | None = None) -> np.ndarray:
        """Reads per slot of memory layer `layer` (int64, length n_slots), from the offsets: no scan of
        the accesses (`Trace.slot_counts` gives the same numbers from the table)."""
        n = self.trace.n_slots
        first = self.trace.layers.index(self.trace.resolve_layer(layer)) * n
        return np.diff(np.asarray(self.offsets[first : first + n + 1], dtype=np.int64))

    def slot_weights(self, slot: int, layer: int | None = None) -> np.ndarray:
        """The weights of every read of `slot` (float32, in token order)."""
        return np.asarray(self._slot_reads(slot, layer)["weights"], dtype=np.float32)

    def slot_ranks(self, slot: int, layer: int | None = None) -> np.ndarray:
        """The place in its head's top-k (int16, 0 = highest score) of every read of `slot`, in token order."""
        return np.asarray(self._slot_reads(slot, layer)["ranks"], dtype=np.int16)

    def slot_rows(self, slot: int, layer: int | None = None) -> np.ndarray:
        """The token row (int32) of every read of `slot`, in token order (a row repeats once per head)."""
        return np.asarray(self._slot_reads(slot, layer)["rows"], dtype=np.int32)

    def slot_heads(self, slot: int, layer: int | None = None) -> np.ndarray:
        """The memory head (int16) of every read of `slot`, in token order."""
        return np.asarray(self._slot_reads(slot, layer)["heads"], dtype=np.int16)

    def readers(self, slot: int, layer: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tokens that read `slot`: (rows int64 ascending, weight float64 = the sum of the token's
        reads of the slot over heads, reads int64 = how many heads read it)."""
        reads = self._slot_reads(slot, layer)
        return sum_runs(np.asarray(reads["rows"]), np.asarray(reads["weights"]))

    def reading_tokens(self, layer: int | None = None) -> np.ndarray:
        """Per slot of memory layer `layer` (int64, length n_slots): how many distinct tokens read it
        (a token reading it in several heads counts once). One pass over the layer's part of the
        index, cached."""
        layer = self.trace.resolve_layer(layer)
        if layer not in self._reading_tokens:
            n = self.trace.n_slots
            bounds = np.asarray(self.offsets[self.trace.layers.index(layer) * n :][: n + 1], dtype=np.int64)
            rows = np.asarray(self.rows[int(bounds[0]) : int(bounds[-1])])
            new = np.ones(len(rows), dtype=bool)  # a read whose row differs from the one before it in its slot
            new[1:] = rows[1:] != rows[:-1]
            sizes = np.diff(bounds)
            new[(bounds[:-1] - bounds[0])[sizes > 0]] = True
            self._reading_tokens[layer] = np.bincount(np.repeat(np.arange(n), sizes)[new], minlength=n).astype(np.int64)
        return self._reading_tokens[layer]

    def reads_of_rows(self, rows: np.ndarray, layer: int | None = None) -> pd.DataFrame:
        """Every read by the given token rows (any order): columns row, layer, head, rank, slot, weight.
        The accesses are sorted by token, so each row's reads are one contiguous range (no scan)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.trace.n_tokens):
            raise TraceError(f"token rows must lie in [0, {self.trace.n_tokens}), got {rows[0]}..{rows[-1]}")
        df = self._accesses_of_rows(rows).rename(columns={"token": "row"})
        return df if layer is None else df[df["layer"] == self.trace.resolve_layer(layer)].reset_index(drop=True)

    def contexts(self, slot: int, n: int = 20, window: int = 8, layer: int | None = None) -> pd.DataFrame:
        """The n tokens that read `slot` with the most weight, with `window` tokens of context each side
        (within the token's document). A token's weight is the sum of its reads of the slot over heads.

        Columns: rank (0 = most weight), row, doc, doc_id, position, token (its text), weight (float),
        reads (how many heads read the slot), left / right (context text), window (list of the token
        texts shown, the accessing token included), focus (its place in `window`) and next_token (the
        text of the following token of the document, '' at its end). Ties in weight go to the earlier row."""
        if n < 1 or window < 0:
            raise TraceError(f"n must be >= 1 and window >= 0, got n={n}, window={window}")
        rows, weight, reads = self._top_readers(slot, n, layer)
        df = self.context_rows(rows, window)
        df.insert(0, "rank", np.arange(len(rows)))
        df.insert(6, "weight", weight)
        df.insert(7, "reads", reads)
        return df

    def context_rows(self, rows: np.ndarray, window: int = 8) -> pd.DataFrame:
        """Context of the given token rows, in the order given: columns row, doc, doc_id, position, token,
        left, right, window, focus, next_token (as `contexts` describes them)."""
        rows = np.asarray(rows, dtype=np.int64)
        if window < 0 or (len(rows) and (rows.min() < 0 or rows.max() >= self.trace.n_tokens)):
            raise TraceError(f"window must be >= 0 and token rows in [0, {self.trace.n_tokens}), got window={window}")
        tok = self.token_columns()
        records = []
        for row in rows.tolist():  # the rows shown, not the slots
            d = int(tok["doc"][row])
            end = int(tok["doc_start"][d + 1])
            lo = max(row - window, int(tok["doc_start"][d]))
            hi = min(row + window + 1, end)
            texts = tok["text"].slice(lo, hi - lo).to_pylist()
            f = row - lo
            records.append({
                "row": row, "doc": d, "doc_id": tok["doc_id"][row].as_py(), "position": int(tok["position"][row]),
                "token": texts[f], "left": "".join(texts[:f]), "right": "".join(texts[f + 1 :]), "window": texts, "focus": f,
                "next_token": tok["text"][row + 1].as_py() if row + 1 < end else "",
            })
        columns = ["row", "doc", "doc_id", "position", "token", "left", "right", "window", "focus", "next_token"]
        return pd.DataFrame.from_records(records, columns=columns)

    def slots_for(self, doc: int | str, start: int, end: int, layer: int | None = None) -> pd.DataFrame:
        """Every read by the tokens at positions start..end-1 of document `doc` (its number, or its
        doc_id). Columns: row, position, token (text), layer, head, rank, slot, weight; sorted by
        position, layer, head, rank. `layer` keeps one memory layer."""
        if layer is not None:
            self.trace.resolve_layer(layer)
        tok = self.token_columns()
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
        df = self._accesses_between(r0, r1).rename(columns={"token": "row"})
        if layer is not None:
            df = df[df["layer"] == layer]
        df.insert(1, "position", tok["position"][df["row"].to_numpy()])
        df.insert(2, "token", self.trace.tokens.column("text").take(pa.array(df["row"].to_numpy())).to_pylist())
        return df.reset_index(drop=True)

    def token_columns(self) -> dict[str, Any]:
        """The token columns doc, position (numpy), doc_id, text (Arrow arrays), cached, and
        doc_start: doc_start[d] = first row of document d (length n_docs + 1)."""
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

    # ---- internals: where the reads come from (`smviz.trace.duck.DuckSlotIndex` answers them with SQL)

    def _slot_reads(self, slot: int, layer: int | None) -> dict[str, np.ndarray]:
        """The reads of `slot` in token order: arrays rows, weights, heads, ranks."""
        span = self._span(slot, layer)
        return {"rows": self.rows[span], "weights": self.weights[span], "heads": self.heads[span], "ranks": self.ranks[span]}

    def _top_readers(self, slot: int, n: int, layer: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`readers` of the n tokens with the most weight, most first (ties: the earlier row)."""
        return most_weight(*self.readers(slot, layer), n)

    def _accesses_between(self, r0: int, r1: int) -> pd.DataFrame:
        """The accesses of token rows r0..r1-1 (the table's columns and order, weights as float32)."""
        token_col = self._access_tokens()
        a, b = token_col.searchsorted(np.array([r0, r1], dtype=token_col.dtype))  # same dtype: no copy of the column
        return float_weights(self.trace.accesses.slice(int(a), int(b - a)).to_pandas())

    def _accesses_of_rows(self, rows: np.ndarray) -> pd.DataFrame:
        """The accesses of the given token rows (ascending, distinct), in the table's order."""
        token_col = self._access_tokens()
        starts = token_col.searchsorted(rows.astype(token_col.dtype))
        ends = token_col.searchsorted((rows + 1).astype(token_col.dtype))
        lengths = ends - starts
        take = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        return float_weights(self.trace.accesses.take(pa.array(take)).to_pandas())

    def _key(self, slot: int, layer: int | None) -> int:
        layer = self.trace.resolve_layer(layer)
        if not (isinstance(slot, (int, np.integer)) and 0 <= slot < self.trace.n_slots):
            raise TraceError(f"slot {slot!r} is out of range: the memory has {self.trace.n_slots:,} slots (0..{self.trace.n_slots - 1})")
        return self.trace.layers.index(layer) * self.trace.n_slots + int(slot)

    def _span(self, slot: int, layer: int | None) -> slice:
        k = self._key(slot, layer)
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))

    def _doc_number(self, doc: int | str) -> int:
        n_docs = len(self.token_columns()["doc_start"]) - 1
        if isinstance(doc, str):
            hits = pc.index(self.trace.tokens.column("doc_id"), doc).as_py()
            if hits < 0:
                raise TraceError(f"no document with doc_id {doc!r} in this trace")
            return int(self.token_columns()["doc"][hits])
        if not (isinstance(doc, (int, np.integer)) and 0 <= doc < n_docs):
            raise TraceError(f"document {doc!r} is out of range: the trace holds documents 0..{n_docs - 1}")
        return int(doc)

    def _access_tokens(self) -> np.ndarray:
        if self._access_token is None:
            self._access_token = self.trace.accesses.column("token").to_numpy()
        return self._access_token
