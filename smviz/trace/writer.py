"""`TraceWriter`: writes a trace directory (`smviz.trace.format`) shard by shard, resumably, from one
process or from every rank of a torchrun job.

Shards are written while recording goes on, so a corpus whose trace is larger than memory records
with bounded RAM; they fill a hidden `.NAME.partial` directory that becomes `NAME` only when
meta.json is written, so a trace that loads is whole."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smviz.distributed import barrier, is_distributed
from smviz.errors import TraceError
from smviz.io import atomic_open, ensure_dir, replace_dir, write_error, write_json_atomic
from smviz.trace.format import (
    META_FILE,
    PROGRESS_DIR,
    SCHEMAS,
    TABLES,
    TRACE_FORMAT,
    column_descriptions,
    digest,
    file_digest,
    part_name,
    partial_dir,
    read_json,
)

log = logging.getLogger(__name__)


class TraceWriter:
    """Writes a trace shard by shard into `.NAME.partial/` beside `path`; `finish()` writes meta.json
    and moves the directory into place.

    Each finished shard leaves a progress record (PROGRESS_DIR/part-NNNNN.json: the shard's entry,
    its first row and the fingerprint of `meta`), so a writer opened on the partial directory of an
    interrupted recording of the same thing knows which shards are done (`done(shard)`) and the
    recording continues after them; records of other settings are discarded with their shards.
    Under torchrun every rank opens a writer on the same path (`rank`, `world_size`) and writes the
    shards it was given, in any order; `finish` waits for all of them and rank 0 assembles the trace,
    the same files as one process writing every shard."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *, force: bool = False, resume: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        if self.path.exists() and not force:
            raise TraceError(f"{self.path} already exists; pass force (--force) to replace it")
        if self.path.exists() and not (self.path / META_FILE).is_file():
            raise TraceError(f"{self.path} exists and is not a trace; refusing to replace it")
        if not 0 <= rank < world_size or (world_size > 1 and not is_distributed()):
            raise TraceError(f"rank {rank} of {world_size}: several writers need torch.distributed (run under torchrun)")
        self.meta = dict(meta)
        self.rank, self.world_size = rank, world_size
        self.partial = partial_dir(self.path)
        self._fingerprint = digest(json.dumps(self.meta, sort_keys=True).encode())
        if rank == 0:  # one process tidies up before anyone reads the progress records
            self._discard_stale(resume)
        barrier(world_size)
        self._done = self._read_progress()
        if self._done:
            log.info("resuming the recording in %s: %d shards done", self.partial, len(self._done))

    def _discard_stale(self, resume: bool) -> None:
        records = {p: read_json(p) for p in sorted((self.partial / PROGRESS_DIR).glob("*.json"))}
        if not resume or any(not isinstance(r, dict) or r.get("fingerprint") != self._fingerprint for r in records.values()):
            if self.partial.exists():
                log.info("discarding %s: it was recorded with other settings", self.partial)
            shutil.rmtree(self.partial, ignore_errors=True)
        for folder in (*TABLES, PROGRESS_DIR):
            ensure_dir(self.partial / folder)

    def _read_progress(self) -> dict[int, dict[str, Any]]:
        done = {}
        for p in (self.partial / PROGRESS_DIR).glob("*.json"):
            record = read_json(p)
            if isinstance(record, dict) and record.get("fingerprint") == self._fingerprint:
                done[int(record["shard"])] = record
        return done

    @property
    def n_shards(self) -> int:
        """Shards finished so far (by this process's writer and, under torchrun, those it found done at start)."""
        return len(self._done)

    def done(self, shard: int) -> bool:
        return shard in self._done

    def write(self, tokens: pa.Table, accesses: pa.Table, *, shard: int | None = None) -> None:
        """Write shard number `shard` (default: the next after those done here, whose rows it must
        continue); its accesses must be sorted by token and refer to its own rows."""
        rows = tokens.column("row").to_numpy()
        first_row = int(rows[0]) if len(rows) else None
        if shard is None:
            shard = len(self._done)
            before = self._done.get(shard - 1)
            expected = 0 if before is None else before["first_row"] + before["entry"]["tokens"]
            if first_row is not None and first_row != expected:
                raise TraceError(f"shard starts at row {first_row}, expected {expected}")
        token_col = accesses.column("token").to_numpy()
        if len(token_col) and (first_row is None or np.any(np.diff(token_col) < 0) or token_col[0] < first_row
                               or token_col[-1] >= first_row + len(rows)):
            raise TraceError("accesses must be sorted by token and refer to this shard's rows")
        name = part_name(shard)
        entry: dict[str, Any] = {"name": name, "tokens": tokens.num_rows, "accesses": accesses.num_rows, "files": {}}
        for table_name, table in (("tokens", tokens), ("accesses", accesses)):
            target = self.partial / table_name / name
            with atomic_open(target, "wb") as f:
                pq.write_table(table.cast(SCHEMAS[table_name]), f, compression="zstd")
            entry["files"][table_name] = {"bytes": target.stat().st_size, "sha256": file_digest(target)}
        record = {"fingerprint": self._fingerprint, "shard": shard, "first_row": first_row, "entry": entry}
        write_json_atomic(self.partial / PROGRESS_DIR / name.replace(".parquet", ".json"), record)
        self._done[shard] = record

    def finish(self, n_docs: int, extra: dict[str, Any] | None = None, *, n_shards: int | None = None,
               prepare: Callable[[Path, list[str]], dict[str, Any]] | None = None) -> Path:
        """Write meta.json, move the trace into place (replacing an older trace at `path`); its path.
        `n_docs` counts the source's documents, those that gave no token included; `n_shards` (default:
        as many as are done) must all be done, by whichever process. Under torchrun every rank calls
        it: rank 0 assembles the trace once all have arrived, and returns on every rank once it is in place.
        `prepare(partial directory, shard names)`, run by rank 0 once every shard is there, may add files
        beside them (e.g. the merged slot summaries) and returns entries for meta.json."""
        barrier(self.world_size)
        if self.rank == 0:
            self._assemble(n_docs, extra, n_shards, prepare)
        barrier(self.world_size)
        return self.path

    def _assemble(self, n_docs: int, extra: dict[str, Any] | None, n_shards: int | None,
                  prepare: Callable[[Path, list[str]], dict[str, Any]] | None) -> None:
        done = self._read_progress()
        n_shards = len(done) if n_shards is None else n_shards
        missing = [s for s in range(n_shards) if s not in done]
        if missing:
            raise TraceError(f"{self.partial}: shards {missing[:5]} were never written; run the recording again to finish it")
        shards, next_row = [], 0
        for s in range(n_shards):
            record = done[s]
            if record["entry"]["tokens"] and record["first_row"] != next_row:
                raise TraceError(f"{self.partial}: shard {s} starts at row {record['first_row']}, expected {next_row}")
            shards.append(record["entry"])
            next_row += record["entry"]["tokens"]
        names = {e["name"] for e in shards}
        for table in TABLES:  # shards of an earlier, longer recording of the same thing
            for f in (self.partial / table).glob("*.parquet"):
                if f.name not in names:
                    f.unlink()
        meta = dict(self.meta) | dict(extra or {}) | (prepare(self.partial, [e["name"] for e in shards]) if prepare else {})
        meta |= {
            "format": TRACE_FORMAT,
            "counts": {"docs": n_docs, "tokens": next_row, "accesses": sum(s["accesses"] for s in shards)},
            "shards": shards,
            "columns": column_descriptions(),
        }
        write_json_atomic(self.partial / META_FILE, meta)
        try:
            shutil.rmtree(self.partial / PROGRESS_DIR)
            replace_dir(self.partial, self.path)
        except OSError as e:
            raise write_error(self.path, e) from None
