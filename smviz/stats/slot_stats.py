"""`SlotStats`: per-slot access counts and document frequency of every memory layer over a background
corpus — mergeable, saved as safetensors beside the model's weights (format in `smviz.stats`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from smviz.errors import StatsError
from smviz.io import json_text, strict_json, write_bytes_atomic
from smviz.model import model_dir_hash, read_memory_config, resolve_layer
from smviz.usage import usage_metrics

if TYPE_CHECKING:
    from smviz.model import MemoryModel

FORMAT = "smviz-slot-stats/1"
PARTIAL_FORMAT = "smviz-slot-stats-partial/1"
STATS_FILE = "slot_stats.safetensors"
UNITS = ("batch", "sequence")


def check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise StatsError(f"unknown document unit {unit!r}; choose one of {list(UNITS)}")


def idf(df: torch.Tensor, n_docs: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paper's inverse document frequency log((|B| + 1) / (df(i) + 1)), |B| = n_docs: the one IDF
    formula of smviz (`SlotStats.idf`, `smviz.stats.tfidf` and selection rules call it)."""
    return torch.log((n_docs + 1) / (df.to(dtype) + 1))


# --------------------------------------------------------------------------- protocols


def merge_protocols(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The protocol of concatenated corpora, associative: parts equal except for `n_batches` become one
    part with the batches summed (so equal protocols stay as they are, with n_batches added up); distinct
    parts are kept in order of first appearance as `{"parts": [...], "n_batches": total}`."""
    groups: dict[str, dict[str, Any]] = {}
    for part in _parts(a) + _parts(b):
        key = json.dumps({k: v for k, v in part.items() if k != "n_batches"}, sort_keys=True)
        if key not in groups:
            groups[key] = dict(part)
        elif "n_batches" in part:
            groups[key]["n_batches"] = groups[key].get("n_batches", 0) + part["n_batches"]
    merged = list(groups.values())
    if len(merged) == 1:
        return merged[0]
    out: dict[str, Any] = {"parts": merged}
    if any("n_batches" in p for p in merged):
        out["n_batches"] = sum(p.get("n_batches", 0) for p in merged)
    return out


def _parts(protocol: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(p) for p in protocol["parts"]] if "parts" in protocol else [dict(protocol)]


# --------------------------------------------------------------------------- SlotStats


@dataclass(eq=False)
class SlotStats:
    """Per-slot access counts and document frequency over a background corpus, for each memory layer.

    A *document* is the unit the document frequency counts (`unit`):
    - `batch` (the paper's): df(i) = number of background batches — one model forward each — in which
      slot i was read at least once by any non-padding token of any head;
    - `sequence`: number of sequences (rows of the batches) that read slot i.
    `counts[l, i]` is every read of slot i in layer `layers[l]` (all real tokens × heads × top-k).
    `a + b` is the statistics of the two corpora concatenated (integers: exact, associative).
    """

    layers: tuple[int, ...]
    """Memory block indices, sorted; row l of `counts`/`df` belongs to block layers[l]."""
    n_slots: int
    """Slots per memory layer (N)."""
    unit: str
    """What a document is: 'batch' or 'sequence' (UNITS)."""
    counts: torch.Tensor
    """(L, N) int64 CPU: reads per slot."""
    df: torch.Tensor
    """(L, N) int64 CPU: documents that read each slot at least once."""
    n_docs: int = 0
    """|B|: documents (batches or sequences) that held at least one real token."""
    n_tokens: int = 0
    """Real (non-padding) tokens seen."""
    model_hash: str | None = None
    """Hash of the model the accesses came from (None: an unsaved model)."""
    protocol: dict[str, Any] = field(default_factory=dict)
    """How the statistics were produced (source, batch_size, seq_len, n_batches, seed, unit, ...): JSON-able."""

    def __post_init__(self) -> None:
        check_unit(self.unit)
        self.layers = tuple(int(i) for i in self.layers)
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise StatsError(f"layers must be distinct block indices in increasing order, got {list(self.layers)}")
        if int(self.n_slots) < 1:
            raise StatsError(f"n_slots must be >= 1, got {self.n_slots}")
        self.n_slots = int(self.n_slots)
        shape = (len(self.layers), self.n_slots)
        for name in ("counts", "df"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise StatsError(f"{name} must be an int64 tensor of shape {shape} (layers × slots), got {got}")
            setattr(self, name, t.cpu())
        self.n_docs, self.n_tokens = int(self.n_docs), int(self.n_tokens)
        if self.n_docs < 0 or self.n_tokens < 0:
            raise StatsError("n_docs and n_tokens must be >= 0")
        try:
            json_text(self.protocol, indent=None)
        except (TypeError, ValueError, RecursionError) as e:  # not JSON types; a protocol that contains itself
            raise StatsError(f"protocol must be JSON-able: {e}") from None

    @classmethod
    def empty(cls, model: MemoryModel, unit: str = "batch", protocol: Mapping[str, Any] | None = None) -> SlotStats:
        """Zero statistics for every memory layer of `model`."""
        layers = tuple(sorted(model.memory_layers))
        n = model.memory_config.n_slots
        zeros = torch.zeros(len(layers), n, dtype=torch.int64)
        return cls(layers, n, unit, zeros, zeros.clone(), model_hash=model.model_hash, protocol=dict(protocol or {}))

    def layer_index(self, layer: int) -> int:
        """Row of memory block `layer` in `counts` / `df` (ConfigError when the statistics lack it)."""
        return self.layers.index(resolve_layer(layer, self.layers, what="the background"))

    def idf(self, layer: int) -> torch.Tensor:
        """float64 `idf` of block `layer`'s slots."""
        return idf(self.df[self.layer_index(layer)], self.n_docs)

    def usage(self, layer: int | None = None) -> dict[str, float] | dict[int, dict[str, float]]:
        """`usage_metrics` of the counts (share used, dead slots, KL from uniform, Gini, slots_50/90/99)
        of block `layer`, or {block: metrics} for every layer when `layer` is None."""
        if layer is None:
            return {i: usage_metrics(self.counts[row]) for row, i in enumerate(self.layers)}
        return usage_metrics(self.counts[self.layer_index(layer)])

    # ---- merging

    def _check_compatible(self, other: SlotStats) -> None:
        for name in ("layers", "n_slots", "unit", "model_hash"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise StatsError(
                    f"cannot merge slot statistics with different {name} ({mine!r} vs {theirs!r}): "
                    "only statistics of the same model, memory layers and document unit add up"
                )

    def __add__(self, other: object) -> SlotStats:
        if not isinstance(other, SlotStats):
            return NotImplemented
        self._check_compatible(other)
        return SlotStats(
            self.layers, self.n_slots, self.unit, self.counts + other.counts, self.df + other.df,
            self.n_docs + other.n_docs, self.n_tokens + other.n_tokens, self.model_hash,
            merge_protocols(self.protocol, other.protocol),
        )

    def __radd__(self, other: object) -> SlotStats:
        if isinstance(other, int) and other == 0:  # sum([a, b, c])
            return self
        return NotImplemented

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotStats):
            return NotImplemented
        return (
            (self.layers, self.n_slots, self.unit, self.n_docs, self.n_tokens, self.model_hash, self.protocol)
            == (other.layers, other.n_slots, other.unit, other.n_docs, other.n_tokens, other.model_hash, other.protocol)
            and torch.equal(self.counts, other.counts)
            and torch.equal(self.df, other.df)
        )

    def __repr__(self) -> str:
        return (
            f"SlotStats(layers={list(self.layers)}, n_slots={self.n_slots}, unit={self.unit!r}, n_docs={self.n_docs}, "
            f"n_tokens={self.n_tokens}, reads={int(self.counts.sum())}, model_hash={self.model_hash!r})"
        )

    # ---- state and files

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "layers": list(self.layers), "n_slots": self.n_slots, "unit": self.unit,
            "counts": self.counts.clone(), "df": self.df.clone(), "n_docs": self.n_docs, "n_tokens": self.n_tokens,
            "model_hash": self.model_hash, "protocol": json.loads(json_text(self.protocol, indent=None)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace every field by those of `state` (as `state_dict` returns), validated."""
        if state.get("format") != FORMAT:
            raise StatsError(f"not a slot-statistics state (format {state.get('format')!r}, expected {FORMAT!r})")
        try:
            new = SlotStats(
                tuple(state["layers"]), state["n_slots"], state["unit"], state["counts"].clone(), state["df"].clone(),
                state["n_docs"], state["n_tokens"], state["model_hash"], json.loads(json_text(state["protocol"], indent=None)),
            )
        except (KeyError, AttributeError, TypeError) as e:
            raise StatsError(f"incomplete slot-statistics state: {e!r}") from None
        self.__dict__.update(new.__dict__)

    def to_bytes(self, fmt: str = FORMAT, extra: Mapping[str, str] | None = None) -> bytes:
        """The safetensors file of these statistics (format tag `fmt`, plus `extra` metadata strings).
        Identical statistics give identical bytes: the header is written with sorted keys."""
        metadata = {
            "format": fmt, "layers": json_text(list(self.layers), indent=None), "n_slots": str(self.n_slots),
            "unit": self.unit, "n_docs": str(self.n_docs), "n_tokens": str(self.n_tokens),
            "model_hash": json_text(self.model_hash, indent=None), "protocol": _protocol_text(self.protocol),
        } | dict(extra or {})
        data = safetensors.torch.save({"counts": self.counts.contiguous(), "df": self.df.contiguous()}, metadata=metadata)
        return _sorted_header(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to `path` (safetensors, atomically)."""
        path = Path(path)
        write_bytes_atomic(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: MemoryModel | None = None) -> SlotStats:
        """Read statistics written by `save`; with `model`, also check they were computed with it."""
        stats, _ = cls.read_file(Path(path), FORMAT)
        if model is not None:
            stats.check_model(model)
        return stats

    @classmethod
    def read_file(cls, path: Path, fmt: str) -> tuple[SlotStats, dict[str, str]]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StatsError(f"{path} does not exist; compute it with `smviz stats --model MODEL_DIR`") from None
        except OSError as e:
            raise StatsError(f"cannot read {path}: {e}") from None
        damaged = f"{path} is damaged or not a safetensors file; recompute it with `smviz stats`"
        metadata = _safetensors_metadata(data, damaged)
        if metadata.get("format") != fmt:
            if metadata.get("format") == PARTIAL_FORMAT:
                raise StatsError(f"{path} holds the partial state of an interrupted run; rerun `smviz stats` to finish it")
            raise StatsError(
                f"{path} is not an smviz slot-statistics file (format {metadata.get('format')!r}, expected {fmt!r})"
            )
        try:
            tensors = safetensors.torch.load(data)
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise StatsError(f"{damaged} ({e})") from None
        if set(tensors) != {"counts", "df"}:
            raise StatsError(f"{path} holds tensors {sorted(tensors)}, expected ['counts', 'df']")
        try:
            stats = cls(
                tuple(json.loads(metadata["layers"])), int(metadata["n_slots"]), metadata["unit"], tensors["counts"],
                tensors["df"], int(metadata["n_docs"]), int(metadata["n_tokens"]), json.loads(metadata["model_hash"]),
                json.loads(metadata["protocol"]),
            )
        except StatsError as e:
            raise StatsError(f"{path}: {e}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise StatsError(f"{path} has missing or malformed metadata ({e!r}); recompute it with `smviz stats`") from None
        stats._check_consistent(path)
        return stats, metadata

    def _check_consistent(self, path: Path) -> None:
        """Invariants every collected statistic satisfies; a file breaking them was tampered with."""
        ok = (
            bool((self.counts >= 0).all()) and bool((self.df >= 0).all()) and bool((self.df <= self.n_docs).all())
            and torch.equal(self.counts > 0, self.df > 0)
        )
        if not ok:
            raise StatsError(f"{path} holds inconsistent counts and document frequencies; recompute it with `smviz stats`")

    def check_model(self, model: MemoryModel) -> None:
        """StatsError unless these statistics were computed with `model` (hash, layers, slots)."""
        self._check_target(model.model_hash, tuple(sorted(model.memory_layers)), model.memory_config.n_slots, "this model")

    def _check_target(self, model_hash: str | None, layers: tuple[int, ...], n_slots: int, what: str) -> None:
        if self.model_hash != model_hash:
            raise StatsError(
                f"slot statistics were computed with model {self.model_hash} but {what} is model {model_hash}; "
                "recompute them with `smviz stats --model MODEL_DIR`"
            )
        if self.layers != layers or self.n_slots != n_slots:
            raise StatsError(
                f"slot statistics cover memory blocks {list(self.layers)} of {self.n_slots} slots but {what} has "
                f"blocks {list(layers)} of {n_slots} slots; recompute them with `smviz stats`"
            )

    def save_to_model_dir(self, model_dir: str | os.PathLike) -> Path:
        """Store the statistics beside the model's weights (`model_dir/slot_stats.safetensors`). The file is
        not in the model's manifest, so the model hash does not change; it must be the hash these were
        computed with (checked: nothing is written otherwise)."""
        model_dir = Path(model_dir)
        self._check_target(*_model_dir_facts(model_dir), f"the model in {model_dir}")
        return self.save(model_dir / STATS_FILE)

    @classmethod
    def load_for_model(cls, model_dir: str | os.PathLike, model: MemoryModel | None = None) -> SlotStats:
        """The background statistics stored in `model_dir`, checked against `model` when given, else
        against the model directory itself."""
        model_dir = Path(model_dir)
        path = model_dir / STATS_FILE
        if not path.is_file():
            raise StatsError(f"{model_dir} holds no background slot statistics; run `smviz stats --model {model_dir}`")
        stats = cls.load(path)
        if model is not None:
            stats.check_model(model)
        else:
            stats._check_target(*_model_dir_facts(model_dir), f"the model in {model_dir}")
        return stats


def _model_dir_facts(model_dir: Path) -> tuple[str, tuple[int, ...], int]:
    """(model hash, memory blocks, slots) of a verified model directory, without loading weights."""
    model_hash = model_dir_hash(model_dir)
    memory = read_memory_config(model_dir)
    return model_hash, tuple(sorted(memory.layers)), memory.n_slots


def _protocol_text(protocol: Mapping[str, Any]) -> str:
    """The header's protocol string: strict JSON with sorted keys and non-ASCII as \\u escapes (the bytes
    statistics files have always had, so equal statistics keep giving equal files)."""
    return json.dumps(strict_json(protocol), sort_keys=True, allow_nan=False)


def _sorted_header(data: bytes) -> bytes:
    """A safetensors buffer with its JSON header rewritten in sorted key order (safetensors writes the
    metadata in a hash map's order, which varies from call to call); the tensor bytes are untouched."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # tensor data starts 8-byte aligned, as safetensors pads it
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def _safetensors_metadata(data: bytes, damaged: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer (8-byte little-endian header length, JSON header)."""
    if len(data) < 8:
        raise StatsError(f"{damaged} (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise StatsError(f"{damaged} (truncated header)")
    try:
        header = json.loads(data[8 : 8 + n])
        metadata = header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise StatsError(f"{damaged} ({e})") from None
    if not isinstance(metadata, dict):
        raise StatsError(f"{damaged} (metadata is not an object)")
    return metadata



def format_usage(stats: SlotStats) -> str:
    """A short per-layer usage summary (share used, dead slots, KL from uniform, Gini, slots_50/90/99)."""
    lines = [f"{stats.unit} unit: {stats.n_docs:,} documents, {stats.n_tokens:,} tokens (model {stats.model_hash})"]
    for block, m in stats.usage().items():
        lines.append(
            f"  block {block}: used {m['used_share']:.1%} of {int(m['slots']):,} slots, dead {int(m['dead']):,}, "
            f"KL {m['kl_uniform']:.3f}, Gini {m['gini']:.3f}, slots for 50/90/99% of reads "
            f"{m['slots_50']:g}/{m['slots_90']:g}/{m['slots_99']:g}"
        )
    return "\n".join(lines)
