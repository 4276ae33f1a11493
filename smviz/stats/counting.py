"""Counting slot reads: per forward (`batch_counts`, `document_counts`, `forward_documents` — one
place for the arithmetic that sparse finetuning reuses) and over many forwards (`StatsCollector`,
`collect_stats`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from smviz.errors import StatsError
from smviz.stats.slot_stats import SlotStats, check_unit

if TYPE_CHECKING:
    from smviz.memory import ProductKeyMemory
    from smviz.model import MemoryModel


def _rows(indices: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Accesses as (B·T, H·K) rows, the flat real-token mask (or None) and B, the number of sequences.
    indices (B, T, H, K), or (M, H, K) = one sequence of M tokens unless `mask` is (B, T)."""
    if indices.dim() not in (3, 4):
        raise StatsError(f"indices must be (B, T, H, K) or (M, H, K), got shape {tuple(indices.shape)}")
    lead = indices.shape[:-2]
    flat = indices.reshape(lead.numel(), indices.shape[-2] * indices.shape[-1])
    if mask is None:
        return flat, None, lead[0] if len(lead) == 2 else 1
    if mask.numel() != lead.numel():
        raise StatsError(f"mask of shape {tuple(mask.shape)} does not cover indices of shape {tuple(indices.shape)}")
    n_seq = mask.shape[0] if mask.dim() == 2 else (lead[0] if len(lead) == 2 else 1)
    return flat, mask.reshape(-1).bool(), n_seq


def batch_counts(indices: torch.Tensor, mask: torch.Tensor | None, n_slots: int) -> torch.Tensor:
    """Per-slot access counts (int64, length n_slots, on indices' device) of one layer in one forward:
    every non-padding token, every head, every one of the top-k. `indices` (B, T, H, K) or (M, H, K)
    slot ids; `mask` (B, T) bool, True = real token, or None when every position is real."""
    flat, keep, _ = _rows(indices, mask)
    if keep is not None:
        flat = flat[keep]
    counts = torch.bincount(flat.reshape(-1), minlength=n_slots)
    if counts.numel() > n_slots:
        raise StatsError(f"slot id {counts.numel() - 1} is out of range for a memory of {n_slots} slots")
    return counts


def document_counts(
    indices: torch.Tensor, mask: torch.Tensor | None, n_slots: int, unit: str, *, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Per slot, how many documents of this forward read it (int64, length n_slots): 0 or 1 for the
    `batch` unit (the forward is one document), the number of sequences (rows) for `sequence`.
    `counts`, when given, must be `batch_counts(indices, mask, n_slots)` (saves a bincount)."""
    check_unit(unit)
    if unit == "batch":
        return ((batch_counts(indices, mask, n_slots) if counts is None else counts) > 0).long()
    flat, keep, n_seq = _rows(indices, mask)
    row = torch.arange(n_seq, device=flat.device).repeat_interleave(flat.shape[0] // max(n_seq, 1))
    if keep is not None:
        flat, row = flat[keep], row[keep]
    pairs = torch.unique((row[:, None] * n_slots + flat).reshape(-1))  # each (sequence, slot) once
    return torch.bincount(pairs % n_slots, minlength=n_slots)


def forward_documents(indices: torch.Tensor, mask: torch.Tensor | None, unit: str) -> torch.Tensor:
    """(documents, real tokens) of one forward as an int64 tensor on indices' device, without a host
    sync: a `batch` document is a forward with ≥ 1 real token, a `sequence` document a row with one."""
    check_unit(unit)
    flat, keep, n_seq = _rows(indices, mask)
    if keep is None:
        tokens = torch.tensor(flat.shape[0], device=flat.device)
        docs = torch.tensor(n_seq if flat.shape[0] else 0, device=flat.device)
        if unit == "batch":
            docs = (tokens > 0).long()
        return torch.stack([docs, tokens])
    tokens = keep.sum()
    docs = (tokens > 0).long() if unit == "batch" else keep.reshape(n_seq, -1).any(dim=1).sum() if n_seq else tokens * 0
    return torch.stack([docs, tokens])


# --------------------------------------------------------------------------- collecting


class StatsCollector:
    """Adds the accesses of every forward run inside it to `stats` (a context manager).

        stats = SlotStats.empty(model)
        with torch.no_grad(), StatsCollector(model, stats):
            for batch in batches:
                model(**batch)

    One access hook per memory layer in `stats.layers` counts on the model's device (one bincount per
    layer and forward); documents and real tokens are counted once per forward, from the padding mask.
    The totals are added to `stats` on exit (or `flush()`); if the block raises, `stats` is left as of
    the last flush. Hooks are always removed on exit.
    """

    def __init__(self, model: MemoryModel, stats: SlotStats) -> None:
        self.model = model
        self.stats = stats
        self._handles: list[Any] = []
        self._counts: dict[int, torch.Tensor] = {}
        self._df: dict[int, torch.Tensor] = {}
        self._docs_tokens: torch.Tensor | None = None

    def __enter__(self) -> StatsCollector:
        layers = self.model.memory_layers
        if self.stats.model_hash is not None and self.stats.model_hash != self.model.model_hash:
            raise StatsError(f"these statistics belong to model {self.stats.model_hash}, not {self.model.model_hash}")
        for i in self.stats.layers:
            self.model.resolve_layer(i)  # a ConfigError unless every block of the statistics has a memory layer
        for i in self.stats.layers:
            if layers[i].config.n_slots != self.stats.n_slots:
                raise StatsError(f"block {i} has {layers[i].config.n_slots} slots, the statistics {self.stats.n_slots}")
        try:
            for i in self.stats.layers:
                device = layers[i].keys.device
                self._counts[i] = torch.zeros(self.stats.n_slots, dtype=torch.int64, device=device)
                self._df[i] = torch.zeros_like(self._counts[i])
                if self._docs_tokens is None:
                    self._docs_tokens = torch.zeros(2, dtype=torch.int64, device=device)
                self._handles.append(layers[i].add_access_hook(self._hook(i, first=i == self.stats.layers[0])))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, block: int, first: bool):
        n, unit = self.stats.n_slots, self.stats.unit

        def count(layer: ProductKeyMemory, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None) -> None:
            indices = indices.detach()
            c = batch_counts(indices, mask, n)
            self._counts[block] += c
            self._df[block] += document_counts(indices, mask, n, unit, counts=c)
            if first:
                self._docs_tokens += forward_documents(indices, mask, unit).to(self._docs_tokens.device)

        return count

    def flush(self) -> None:
        """Add what was counted since the last flush to `stats` (copies to CPU) and start again from zero."""
        for row, i in enumerate(self.stats.layers):
            self.stats.counts[row] += self._counts[i].cpu()
            self.stats.df[row] += self._df[i].cpu()
            self._counts[i].zero_()
            self._df[i].zero_()
        if self._docs_tokens is not None:
            docs, tokens = self._docs_tokens.tolist()
            self.stats.n_docs += docs
            self.stats.n_tokens += tokens
            self._docs_tokens.zero_()


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise StatsError(f"a batch must hold 'input_ids' (and optionally 'attention_mask'), got keys {sorted(batch)}")
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return inputs


def collect_stats(
    model: MemoryModel,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    unit: str = "batch",
    protocol: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> SlotStats:
    """Statistics of `model` over `batches` (dicts with input_ids and optionally attention_mask, as
    `PretrainStream.batch` returns), each one forward under no_grad in eval mode. The protocol is
    `protocol` (default {'source': 'custom'}) with `unit` and `n_batches` (forwards run) set."""
    from tqdm.auto import tqdm

    stats = SlotStats.empty(model, unit=unit)
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad(), StatsCollector(model, stats):
            for batch in tqdm(batches, desc="slot stats", unit="batch", disable=not progress):
                model(**model_inputs(batch, model.device))
                n += 1
    finally:
        model.train(was_training)
    stats.protocol = {"source": "custom", **(protocol or {}), "unit": unit, "n_batches": n}
    return stats

