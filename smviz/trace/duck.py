"""`DuckSlotIndex`: the slot index of a trace larger than memory — the same queries and answers as
`SlotIndex`, with bounded memory. DuckDB (embedded) sorts the reads out of core; a slot's reads are then
a range of rows that the CSR offsets locate exactly, read as a few Parquet row groups.

Built once into the trace's `index/duck/` folder: `by_slot.parquet`, the accesses sorted by (layer,
slot, token, head) in row groups of about ROW_GROUP rows (DuckDB's sort, spilling to a temporary folder
beside it within `memory_limit`); then one streamed pass over that file writes `offsets.npy` (the CSR
offsets of the reads per (layer, slot)), `reading.npy` (distinct reading tokens per (layer, slot)) and
`groups.npy` (the first row of each row group); `top_*.npy`, the TOP_KEEP readers of most weight of
every slot read more than HEAVY times, in rank order (CSR by `top_offsets.npy`); `info.json`, the stamp
of the shards it was built from.

A slot's reads are rows offsets[k]..offsets[k+1] of by_slot.parquet: `groups.npy` names the row groups
that hold them, and only those are read (pyarrow) — a query costs the slot's reads, not the trace's
size, and no footer statistics are scanned. `contexts` of a slot read millions of times comes from its
stored top readers instead. A token range is read by DuckDB from the trace's own shards, which are
sorted by token (row-group statistics prune the rest; their metadata is cached).

`SlotIndex.for_trace` is chosen by `Trace.slot_index` while the in-memory index fits the budget
(`index_memory_budget`: SMVIZ_INDEX_MEMORY bytes, default a quarter of this machine's RAM); above it,
this one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from smviz.errors import ConfigError
from smviz.io import atomic_dir, write_json_atomic
from smviz.trace.format import INDEX_DIR, digest, read_json
from smviz.trace.index import SlotIndex, most_weight, sum_runs

log = logging.getLogger(__name__)

DUCK_DIR = "duck"
DUCK_FORMAT = "smviz-duck-index/2"
BY_SLOT = "by_slot.parquet"
ROW_GROUP = 16_384
"""Rows per row group of by_slot.parquet (DuckDB's writer rounds it): a slot with few reads costs one or
two groups, whatever the size of the trace."""
SCAN_ROWS = 1 << 20
"""Rows per batch of the pass over by_slot.parquet that counts the reads."""
HEAVY = 4 * ROW_GROUP
"""A slot read more often than this keeps its TOP_KEEP top readers in the index: `contexts` of it need
not read (and sum over heads) every one of its reads."""
TOP_KEEP = 100
TOP_ARRAYS = ("top_rows", "top_weight", "top_reads")
BUILD_BYTES_PER_READ = 36
"""What the in-memory index costs per read while it is built (int64 keys and argsort order, the
four columns twice): the number the budget is compared with."""
ENV_BUDGET = "SMVIZ_INDEX_MEMORY"


def index_memory_budget() -> int:
    """Bytes the in-memory slot index may take: SMVIZ_INDEX_MEMORY, else a quarter of physical RAM."""
    raw = os.environ.get(ENV_BUDGET)
    if raw is not None:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{ENV_BUDGET} must be a number of bytes, got {raw!r}") from None
        if value < 0:
            raise ConfigError(f"{ENV_BUDGET} must be >= 0 bytes, got {value}")
        return value
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def fits_in_memory(n_accesses: int, budget: int | None = None) -> bool:
    return n_accesses * BUILD_BYTES_PER_READ <= (index_memory_budget() if budget is None else budget)


def _sql_path(path: Any) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _shards(trace: Any) -> str:
    """The trace's access shards as a DuckDB list of file names."""
    return ", ".join(_sql_path(trace.path / "accesses" / s["name"]) for s in trace.meta["shards"])


class DuckSlotIndex(SlotIndex):
    """`SlotIndex` over an on-disk trace through DuckDB; build or load it with `for_trace`."""

    def __init__(self, trace: Any, directory: Any, *, memory_limit: str = "1GB", threads: int | None = None) -> None:
        import duckdb

        # the CSR offsets alone (8 bytes per slot): count and slot_counts need nothing else
        super().__init__(trace, np.load(directory / "offsets.npy", mmap_mode="r"), None, None, None, None)
        self.directory = directory
        self.by_slot = pq.ParquetFile(directory / BY_SLOT)
        self._groups = np.load(directory / "groups.npy")
        self._reading = np.load(directory / "reading.npy", mmap_mode="r")
        self._top_offsets = np.load(directory / "top_offsets.npy", mmap_mode="r")
        self._top = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in TOP_ARRAYS}
        self.con = duckdb.connect(config={"memory_limit": memory_limit, **({"threads": threads} if threads else {})})
        self.con.execute(f"CREATE VIEW accesses AS SELECT * FROM read_parquet([{_shards(trace)}])")
        self.con.execute("SET parquet_metadata_cache = true")  # the shards' footers are read once, not per query

    @classmethod
    def for_trace(cls, trace: Any, *, memory_limit: str = "1GB") -> DuckSlotIndex:
        """Load the DuckDB index of an on-disk trace, or build it (once) into index/duck/."""
        if trace.path is None or not trace.meta["shards"]:
            raise ConfigError("the DuckDB slot index is for traces on disk (with shards); an in-memory trace uses SlotIndex")
        directory = trace.path / INDEX_DIR / DUCK_DIR
        stamp = digest(json.dumps(trace.meta["shards"], sort_keys=True).encode())
        info = read_json(directory / "info.json")
        if not (isinstance(info, dict) and info.get("format") == DUCK_FORMAT and info.get("trace") == stamp
                and (directory / BY_SLOT).is_file()):
            cls._build(trace, directory, stamp, memory_limit)
        return cls(trace, directory, memory_limit=memory_limit)

    @staticmethod
    def _build(trace: Any, directory: Any, stamp: str, memory_limit: str) -> None:
        import duckdb

        with atomic_dir(directory) as tmp:
            con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(tmp / "spill")})
            con.execute(f"COPY (SELECT layer, slot, token, head, rank, weight::FLOAT AS weight FROM read_parquet([{_shards(trace)}]) "
                        f"ORDER BY layer, slot, token, head) TO {_sql_path(tmp / BY_SLOT)} "
                        f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP})")
            con.close()
            shutil.rmtree(tmp / "spill", ignore_errors=True)
            arrays = _count_reads(tmp / BY_SLOT, trace.layers, trace.n_slots)
            arrays |= _top_of_heavy_slots(tmp / BY_SLOT, arrays["offsets"], arrays["groups"])
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            write_json_atomic(tmp / "info.json", {"format": DUCK_FORMAT, "trace": stamp})
        log.info("built the DuckDB slot index of %s", trace.path)

    # ---- what differs from the in-memory index: where the reads come from

    def reading_tokens(self, layer: int | None = None) -> np.ndarray:
        n = self.trace.n_slots
        first = self.trace.layers.index(self.trace.resolve_layer(layer)) * n
        return np.asarray(self._reading[first : first + n], dtype=np.int64)

    def readers(self, slot: int, layer: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = self._read_slot(slot, layer, ["token", "weight"])
        return sum_runs(got["token"], got["weight"])

    def _slot_reads(self, slot: int, layer: int | None) -> dict[str, np.ndarray]:
        got = self._read_slot(slot, layer, ["token", "weight", "head", "rank"])
        return {"rows": got["token"], "weights": got["weight"], "heads": got["head"], "ranks": got["rank"]}

    def _top_readers(self, slot: int, n: int, layer: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self._key(slot, layer)
        a, b = int(self._top_offsets[k]), int(self._top_offsets[k + 1])
        if b > a and n <= TOP_KEEP:  # a heavy slot: its top readers are stored, in rank order
            return tuple(np.asarray(self._top[name][a : a + n], dtype=np.float64 if name == "top_weight" else np.int64)
                         for name in TOP_ARRAYS)
        return most_weight(*self.readers(slot, layer), n)

    def _read_slot(self, slot: int, layer: int | None, columns: list[str]) -> dict[str, np.ndarray]:
        span = self._span(slot, layer)
        return _read_rows(self.by_slot, self._groups, span.start, span.stop, columns)

    def _accesses_between(self, r0: int, r1: int) -> pd.DataFrame:
        return self._frame(self.con.execute("SELECT token, layer, head, rank, slot, weight FROM accesses WHERE token >= ? "
                                            "AND token < ? ORDER BY token, layer, head, rank", [int(r0), int(r1)]))

    def _accesses_of_rows(self, rows: np.ndarray) -> pd.DataFrame:
        if not len(rows):
            return self._accesses_between(0, 0)
        self.con.register("wanted", pd.DataFrame({"token": rows.astype(np.int32)}))
        try:
            return self._frame(self.con.execute(
                "SELECT token, layer, head, rank, slot, weight FROM accesses WHERE token >= ? AND token <= ? "
                "AND token IN (SELECT token FROM wanted) ORDER BY token, layer, head, rank", [int(rows[0]), int(rows[-1])]))
        finally:
            self.con.unregister("wanted")

    @staticmethod
    def _frame(result: Any) -> pd.DataFrame:
        df = result.df()
        dtypes = {"token": np.int32, "layer": np.int16, "head": np.int16, "rank": np.int16, "slot": np.int32, "weight": np.float32}
        return df.astype(dtypes)


def _count_reads(path: Any, layers: list[int], n_slots: int) -> dict[str, np.ndarray]:
    """One streamed pass over by_slot.parquet (sorted by layer, slot, token): the CSR `offsets` of the
    reads per (layer, slot), the distinct `reading` tokens per (layer, slot), and `groups` (the first
    row of each row group, then the number of rows)."""
    file = pq.ParquetFile(path)
    lut = np.zeros(max(layers) + 1, np.int64)
    lut[np.asarray(layers)] = np.arange(len(layers))
    counts, reading = np.zeros(len(layers) * n_slots, np.int64), np.zeros(len(layers) * n_slots, np.int64)
    last = (-1, -1)  # the (key, token) that ended the batch before: a reader split across two batches counts once
    for batch in file.iter_batches(batch_size=SCAN_ROWS, columns=["layer", "slot", "token"]):
        key = lut[batch.column("layer").to_numpy()] * n_slots + batch.column("slot").to_numpy()
        token = batch.column("token").to_numpy()
        counts += np.bincount(key, minlength=len(counts))
        new = np.concatenate([[(key[0], token[0]) != last], (key[1:] != key[:-1]) | (token[1:] != token[:-1])])
        reading += np.bincount(key[new], minlength=len(reading))
        last = (int(key[-1]), int(token[-1]))
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]  # groups, not slots
    return {"offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), "reading": reading,
            "groups": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)}


def _read_rows(file: pq.ParquetFile, groups: np.ndarray, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of rows start..stop-1 of `file`, reading only the row groups that hold them (`groups`: the
    first row of each group, then the number of rows)."""
    first = max(int(np.searchsorted(groups, start, side="right")) - 1, 0)
    end = int(np.searchsorted(groups, stop, side="left")) if stop > start else first
    table = file.read_row_groups(range(first, end), columns=columns).slice(start - int(groups[first]), stop - start)
    return {name: table.column(name).to_numpy() for name in columns}


def _top_of_heavy_slots(path: Any, offsets: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """The TOP_KEEP readers of most weight (rows, summed weights, reads; rank order) of each (layer, slot)
    read more than HEAVY times, as CSR arrays. One pass over those slots' reads; the loop is over
    slots of more than HEAVY reads each, so it costs nothing beside the reads it sums."""
    file = pq.ParquetFile(path)
    counts = np.diff(offsets)
    kept = np.zeros(len(counts), np.int64)
    parts: list[tuple[np.ndarray, ...]] = []
    for k in np.flatnonzero(counts > HEAVY).tolist():
        got = _read_rows(file, groups, int(offsets[k]), int(offsets[k + 1]), ["token", "weight"])
        parts.append(most_weight(*sum_runs(got["token"], got["weight"]), TOP_KEEP))
        kept[k] = len(parts[-1][0])
    columns = [np.concatenate([part[i] for part in parts]) if parts else np.zeros(0, dtype) for i, dtype in
               enumerate((np.int64, np.float64, np.int64))]
    return {"top_offsets": np.concatenate([[0], np.cumsum(kept)]).astype(np.int64), **dict(zip(TOP_ARRAYS, columns))}
