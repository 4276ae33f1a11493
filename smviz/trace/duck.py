"""`DuckSlotIndex`: the slot index of a trace larger than memory, answered by DuckDB (embedded) over
Parquet instead of numpy arrays — the same queries and answers as `SlotIndex`, with bounded memory.

Built once into the trace's `index/duck/` folder: `by_slot.parquet`, the accesses sorted by (layer,
slot, token, head) with small row groups, so a slot's reads are a narrow range that row-group
statistics find without reading the rest; `offsets.npy` (the CSR offsets of the reads per (layer,
slot)) and `reading.npy` (distinct reading tokens per (layer, slot)); `info.json`, the stamp of the shards it was built from. A token
range is read from the trace's own shards, which are sorted by token (their statistics prune the
same way). DuckDB sorts out of core within `memory_limit`, spilling to a temporary folder beside it.

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

from smviz.errors import ConfigError
from smviz.io import atomic_dir, write_json_atomic
from smviz.trace.format import INDEX_DIR, digest, read_json
from smviz.trace.index import SlotIndex

log = logging.getLogger(__name__)

DUCK_DIR = "duck"
DUCK_FORMAT = "smviz-duck-index/1"
BY_SLOT = "by_slot.parquet"
ROW_GROUP = 16_384
"""Rows per row group of by_slot.parquet: a slot's reads span one or two groups, so one query reads
about this many rows, whatever the size of the trace."""
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
        self.con = duckdb.connect(config={"memory_limit": memory_limit, **({"threads": threads} if threads else {})})
        self.con.execute(f"CREATE VIEW by_slot AS SELECT * FROM read_parquet({_sql_path(directory / BY_SLOT)})")
        self.con.execute(f"CREATE VIEW accesses AS SELECT * FROM read_parquet([{_shards(trace)}])")
        self._reading = np.load(directory / "reading.npy", mmap_mode="r")

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

        n, layers = trace.n_slots, trace.layers
        with atomic_dir(directory) as tmp:
            con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(tmp / "spill")})
            source = f"read_parquet([{_shards(trace)}])"
            con.execute(f"COPY (SELECT layer, slot, token, head, rank, weight::FLOAT AS weight FROM {source} "
                        f"ORDER BY layer, slot, token, head) TO {_sql_path(tmp / BY_SLOT)} "
                        f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP})")
            per_slot = con.execute(f"SELECT layer, slot, count(*) AS reads, count(DISTINCT token) AS reading FROM {source} "
                                   "GROUP BY layer, slot").fetchnumpy()
            con.close()
            position = {layer: i for i, layer in enumerate(layers)}
            key = np.array([position[int(l)] for l in per_slot["layer"]], dtype=np.int64) * n + per_slot["slot"]
            counts, reading = np.zeros(len(layers) * n, np.int64), np.zeros(len(layers) * n, np.int64)
            counts[key], reading[key] = per_slot["reads"], per_slot["reading"]
            np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), allow_pickle=False)
            np.save(tmp / "reading.npy", reading, allow_pickle=False)
            shutil.rmtree(tmp / "spill", ignore_errors=True)
            write_json_atomic(tmp / "info.json", {"format": DUCK_FORMAT, "trace": stamp})
        log.info("built the DuckDB slot index of %s", trace.path)

    # ---- what differs from the in-memory index: where the reads come from

    def reading_tokens(self, layer: int | None = None) -> np.ndarray:
        n = self.trace.n_slots
        first = self.trace.layers.index(self.trace.resolve_layer(layer)) * n
        return np.asarray(self._reading[first : first + n], dtype=np.int64)

    def _slot_reads(self, slot: int, layer: int | None) -> dict[str, np.ndarray]:
        self._key(slot, layer)  # validates slot and layer
        got = self.con.execute("SELECT token, weight, head, rank FROM by_slot WHERE layer = ? AND slot = ? ORDER BY token, head",
                               [self.trace.resolve_layer(layer), int(slot)]).fetchnumpy()
        return {"rows": got["token"], "weights": got["weight"], "heads": got["head"], "ranks": got["rank"]}

    def _top_readers(self, slot: int, n: int, layer: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # summed in SQL: a popular slot's millions of reads never leave DuckDB (float64 sums of at most
        # `heads` float16 weights are exact, so the order of summation cannot change them)
        self._key(slot, layer)
        got = self.con.execute("SELECT token, sum(weight::DOUBLE) AS weight, count(*) AS reads FROM by_slot WHERE layer = ? "
                               "AND slot = ? GROUP BY token ORDER BY weight DESC, token LIMIT ?",
                               [self.trace.resolve_layer(layer), int(slot), int(n)]).fetchnumpy()
        return (np.asarray(got["token"], dtype=np.int64), np.asarray(got["weight"], dtype=np.float64),
                np.asarray(got["reads"], dtype=np.int64))

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
