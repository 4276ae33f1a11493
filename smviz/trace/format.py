"""The on-disk format of a trace directory, and the one place that names the files inside one:

    meta.json                     format, model hash, memory config, recorded layers, source, counts,
                                  column descriptions, and the shard list with sizes and sha256
    tokens/part-NNNNN.parquet     one row per recorded token          (TOKEN_COLUMNS)
    accesses/part-NNNNN.parquet   one row per (token, layer, head, rank) read, sorted by token
                                  then layer, head, rank            (ACCESS_COLUMNS)
    index/                        the SlotIndex cache, built on first use: index.json and one
                                  numpy array per INDEX_ARRAYS entry (memory-mapped)
    entities/KEY.parquet          the entity spans of the trace's documents, one file per NER
                                  pipeline (`smviz.analysis.entities`), built on first use

While recording, shards fill a hidden sibling `.NAME.partial/` (with progress/part-NNNNN.json, one
record per finished shard: the resume point) that becomes `NAME` when meta.json is written. Also here: the column schemas and the builders
of a shard's two tables.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

if TYPE_CHECKING:
    from smviz.model import MemoryModel

TRACE_FORMAT = "smviz-trace/1"
INDEX_FORMAT = "smviz-slot-index/2"
"""/2 added the `ranks` array; a cache of another format is rebuilt (`SlotIndex.for_trace`)."""

META_FILE = "meta.json"
PROGRESS_DIR = "progress"
TABLES = ("tokens", "accesses")
"""The two tables; each is a folder of that name holding one Parquet file per shard."""
INDEX_DIR = "index"
INDEX_INFO = "index.json"
INDEX_ARRAYS = ("offsets", "rows", "weights", "heads", "ranks")
"""The SlotIndex arrays, each cached as INDEX_DIR/<name>.npy."""
ENTITY_CACHE_DIR = "entities"

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
SCHEMAS = {"tokens": TOKENS_SCHEMA, "accesses": ACCESSES_SCHEMA}


# --------------------------------------------------------------------------- names


def part_name(shard: int) -> str:
    """The file name of shard number `shard` inside each table folder."""
    return f"part-{shard:05d}.parquet"


def partial_dir(path: str | os.PathLike) -> Path:
    """The hidden sibling a recording into `path` fills until it is finished."""
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def index_array_file(name: str) -> str:
    return f"{name}.npy"


def entity_cache_file(trace_dir: str | os.PathLike, key: str) -> Path:
    """Where the entity spans found by the NER pipeline identified by `key` are cached in a trace."""
    return Path(trace_dir) / ENTITY_CACHE_DIR / f"{key}.parquet"


# --------------------------------------------------------------------------- contents


def model_meta(model: MemoryModel, layers: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """What a trace records about the model it came from (see `Trace.check_model`)."""
    return {
        "model_hash": model.model_hash,
        "memory": model.memory_config.to_dict(),
        "layers": sorted(layers),
        "n_slots": model.memory_config.n_slots,
    }


def column_descriptions() -> dict[str, dict[str, str]]:
    """meta.json's "columns" entry: what each column of each table holds."""
    return {
        "tokens": {k: d for k, (_, d) in TOKEN_COLUMNS.items()},
        "accesses": {k: d for k, (_, d) in ACCESS_COLUMNS.items()},
    }


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


# --------------------------------------------------------------------------- small readers


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def float_weights(df: pd.DataFrame) -> pd.DataFrame:
    """DataFrames carry weights as float32 (the stored float16 values exactly): pandas handles
    float16 poorly."""
    df["weight"] = df["weight"].astype(np.float32)
    return df
