"""Counting a long series of background batches into `SlotStats` (`count_batches`): resumable from a
partial file, and split over processes under torchrun (`smviz.distributed`) with an exact
all-reduce. Which batches a workspace model counts is the stats stage's business
(`smviz.workspace.stages`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smviz.distributed import is_distributed
from smviz.io import write_bytes_atomic
from smviz.stats.counting import StatsCollector, model_inputs
from smviz.errors import StatsError
from smviz.stats.slot_stats import PARTIAL_FORMAT, SlotStats, check_unit

if TYPE_CHECKING:
    from smviz.model import MemoryModel

log = logging.getLogger(__name__)


def partial_path(out: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """Where rank `rank` of `world_size` keeps the partial state of the run that writes `out`."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix('.safetensors')}.partial-r{rank}of{world_size}.safetensors")


def check_run_settings(
    n_batches: int, *, unit: str = "batch", checkpoint_every: int = 100, stop_after: int | None = None,
    rank: int = 0, world_size: int = 1,
) -> None:
    """StatsError unless these are settings `count_batches` can run with (checked before any work)."""
    check_unit(unit)
    for name, value in (("n_batches", n_batches), ("checkpoint_every", checkpoint_every), ("stop_after", stop_after)):
        if value is not None and value < 1:
            raise StatsError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise StatsError(f"rank {rank} is not in 0..{world_size - 1}")
    if world_size > 1:
        if not is_distributed():
            raise StatsError("world_size > 1 needs an initialised torch.distributed process group (run under torchrun)")
        if stop_after is not None:
            raise StatsError("stop_after is for single-process runs")


def count_batches(
    model: MemoryModel,
    batch: Callable[[int], Mapping[str, torch.Tensor]],
    n_batches: int,
    *,
    out: str | os.PathLike,
    unit: str = "batch",
    protocol: Mapping[str, Any] | None = None,
    progress: bool = True,
    checkpoint_every: int = 100,
    rank: int = 0,
    world_size: int = 1,
    stop_after: int | None = None,
) -> SlotStats | None:
    """Statistics of `model` over batches `batch(0)`, ..., `batch(n_batches - 1)` (dicts with input_ids
    and optionally attention_mask), written to `out` with `protocol`.

    Resumable: every `checkpoint_every` batches the partial state goes to `partial_path(out, rank,
    world_size)`; a rerun with the same model and protocol continues from it, other settings start over;
    the partial file is deleted once `out` is written. With `world_size` > 1 (an initialised
    torch.distributed group) rank r runs batches i ≡ r (mod world_size), the sums are all-reduced and rank
    0 writes `out`: the result is identical to one process. `stop_after` (tests) stops after that many
    batches of this call, leaves the partial file and returns None.
    """
    from tqdm.auto import tqdm

    check_run_settings(n_batches, unit=unit, checkpoint_every=checkpoint_every, stop_after=stop_after, rank=rank,
                       world_size=world_size)
    out = Path(out)
    device = model.device
    stats = SlotStats.empty(model, unit=unit, protocol=protocol)
    partial = partial_path(out, rank, world_size)
    fingerprint = _fingerprint(stats, rank, world_size)
    stats, start = _resume(partial, fingerprint, stats)
    mine = [i for i in range(rank, n_batches, world_size) if i >= start]
    total = len(range(rank, n_batches, world_size))

    done = 0
    bar = tqdm(total=total, initial=total - len(mine), desc=f"slot stats ({unit})", unit="batch",
               disable=not progress or rank != 0)
    try:
        with torch.no_grad(), StatsCollector(model, stats) as collector:
            for i in mine:
                model(**model_inputs(batch(i), device))
                done += 1
                bar.update()
                last = stop_after is not None and done >= stop_after
                if done % checkpoint_every == 0 or last:
                    collector.flush()
                    write_bytes_atomic(partial, stats.to_bytes(PARTIAL_FORMAT, {"next_batch": str(i + 1), "fingerprint": fingerprint}))
                if last:
                    break
    finally:
        bar.close()
    if done < len(mine):
        log.info("stopped after %d batches; partial state in %s", done, partial)
        return None

    if world_size > 1:
        _all_reduce(stats, device)
    if rank == 0:
        stats.save(out)
        log.info("wrote %s (%d documents, %d tokens)", out, stats.n_docs, stats.n_tokens)
    if world_size > 1:
        torch.distributed.barrier()
    partial.unlink(missing_ok=True)
    return stats


def _fingerprint(stats: SlotStats, rank: int, world_size: int) -> str:
    key = {"model_hash": stats.model_hash, "layers": list(stats.layers), "n_slots": stats.n_slots, "unit": stats.unit,
           "protocol": stats.protocol, "rank": rank, "world_size": world_size}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _resume(partial: Path, fingerprint: str, fresh: SlotStats) -> tuple[SlotStats, int]:
    """The partial state to continue from and its next batch index, or (fresh, 0)."""
    if not partial.exists():
        return fresh, 0
    try:
        stats, metadata = SlotStats.read_file(partial, PARTIAL_FORMAT)
        next_batch = int(metadata["next_batch"])
    except (StatsError, KeyError, ValueError) as e:
        log.warning("ignoring unreadable partial state %s (%s); starting over", partial, e)
        return fresh, 0
    if metadata.get("fingerprint") != fingerprint:
        log.warning("partial state %s was computed with other settings; starting over", partial)
        return fresh, 0
    log.info("resuming from %s at batch %d", partial, next_batch)
    return stats, next_batch


def _all_reduce(stats: SlotStats, device: torch.device) -> None:
    """Sum counts, df, n_docs and n_tokens over the process group (one int64 all-reduce, exact)."""
    dist = torch.distributed
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([stats.counts.flatten(), stats.df.flatten(), torch.tensor([stats.n_docs, stats.n_tokens])]).to(comm)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    size = stats.counts.numel()
    stats.counts = flat[:size].view_as(stats.counts).clone()
    stats.df = flat[size : 2 * size].view_as(stats.df).clone()
    stats.n_docs, stats.n_tokens = (int(v) for v in flat[2 * size :])
