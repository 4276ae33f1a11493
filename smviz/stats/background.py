"""Background statistics of a workspace model (`background_stats`, what `smviz stats` runs):
resumable, and split over processes under torchrun (`distributed_from_env`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from smviz.workspace import Workspace

log = logging.getLogger(__name__)

from smviz.stats.counting import StatsCollector, model_inputs
from smviz.stats.slot_stats import (
    PARTIAL_FORMAT,
    STATS_FILE,
    SlotStats,
    SlotStatsError,
    check_unit,
)
from smviz.io import write_bytes_atomic

BACKGROUND_STEP_OFFSET = 10**6
"""Background batch i is `PretrainStream.batch(BACKGROUND_STEP_OFFSET + i)`: random batches of the
pretraining mixture, reproducible, and (for any run shorter than a million steps) not the exact batches
the model trained on."""
DEFAULT_BACKGROUND_BATCHES = 1000  # the paper: 1000 random batches of pretraining data


# --------------------------------------------------------------------------- the background of a workspace model


def partial_path(out: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """Where rank `rank` of `world_size` keeps the partial state of the run that writes `out`."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix('.safetensors')}.partial-r{rank}of{world_size}.safetensors")


def background_stats(
    ws: Workspace | str | os.PathLike | None,
    model_dir: str | os.PathLike,
    *,
    unit: str = "batch",
    n_batches: int = DEFAULT_BACKGROUND_BATCHES,
    batch_size: int | None = None,
    seq_len: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint_every: int = 100,
    out: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
    stop_after: int | None = None,
) -> SlotStats | None:
    """Background statistics of the model in `model_dir`, written to `out` (default beside its weights).

    The background ("held-out-free training corpus") is the model's own pretraining mixture: corpus
    train split + world texts of known and bio-only people (never held-out corpus, never new facts), as
    `pipeline.make_stream` builds it with the PretrainConfig of `ws.pretrain_run(<model dir name>)`
    (defaults when the run is absent); batch i is `stream.batch(BACKGROUND_STEP_OFFSET + i)`, batch size
    and sequence length default to that config's. `ws` None: the workspace holding `model_dir` when it
    is WS/models/NAME, else ./workspace.

    Resumable: every `checkpoint_every` batches the partial state goes to `partial_path(out, rank,
    world_size)`; a rerun with the same settings continues from it, other settings start over; the partial
    file is deleted once `out` is written. With `world_size` > 1 (an initialised torch.distributed group)
    rank r runs batches i ≡ r (mod world_size), the sums are all-reduced and rank 0 writes `out`: the
    result is identical to one process. `stop_after` (tests) stops after that many batches of this call,
    leaves the partial file and returns None.
    """
    from tqdm.auto import tqdm

    from smviz.model import MemoryModel
    from smviz.pipeline import load_data, make_stream

    check_unit(unit)
    for name, value in (("n_batches", n_batches), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("checkpoint_every", checkpoint_every), ("stop_after", stop_after)):
        if value is not None and value < 1:
            raise SlotStatsError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise SlotStatsError(f"rank {rank} is not in 0..{world_size - 1}")
    if world_size > 1:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise SlotStatsError("world_size > 1 needs an initialised torch.distributed process group (run under torchrun)")
        if stop_after is not None:
            raise SlotStatsError("stop_after is for single-process runs")
    model_dir = Path(model_dir)
    ws = _workspace_for(ws, model_dir)
    out = Path(out) if out is not None else model_dir / STATS_FILE
    device = torch.device(device)

    model = MemoryModel.from_pretrained(model_dir, device=device)
    if model.tokenizer is None:
        raise SlotStatsError(f"{model_dir} holds no tokenizer; background batches need the model's tokenizer")
    config, run = _pretrain_config(ws, model_dir.name)
    config = replace(config, batch_size=batch_size or config.batch_size, seq_len=seq_len or config.seq_len)
    data = load_data(ws.data)
    stream = make_stream(data, model.tokenizer, config)
    protocol = {
        "source": "pretraining-mixture", "pretrain_run": run, "world": data.world.config.to_dict(),
        "corpus_rows": len(stream.corpus_rows), "world_rows": len(stream.world_ids),
        "batch_size": config.batch_size, "seq_len": config.seq_len, "fact_share": config.fact_share,
        "world_copies": config.world_copies, "seed": config.seed, "step_offset": BACKGROUND_STEP_OFFSET,
        "unit": unit, "n_batches": n_batches,
    }
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
                model(**model_inputs(stream.batch(BACKGROUND_STEP_OFFSET + i), device))
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


def _workspace_for(ws: Workspace | str | os.PathLike | None, model_dir: Path) -> Workspace:
    from smviz.workspace import Workspace

    if ws is not None:
        return ws if isinstance(ws, Workspace) else Workspace(ws)
    parent = model_dir.resolve().parent
    root = parent.parent if parent.name == "models" else Path("workspace")
    log.info("workspace: %s", root)
    return Workspace(root)


def _pretrain_config(ws: Workspace, name: str) -> tuple[Any, str | None]:
    """The PretrainConfig of run `name` and the run name, or the defaults and None."""
    from smviz.train.pretrain import PretrainConfig

    path = ws.pretrain_run(name) / "config.json"
    if not path.is_file():
        log.info("no pretraining run at %s: background batches use the PretrainConfig defaults", path.parent)
        return PretrainConfig(), None
    try:
        config = PretrainConfig.from_dict(json.loads(path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SlotStatsError(f"{path} is unreadable ({e!r}); it should be the config of a `smviz pretrain` run") from None
    log.info("background batches: the pretraining mixture of %s", path)
    return config, name


def _fingerprint(stats: SlotStats, rank: int, world_size: int) -> str:
    key = {"model_hash": stats.model_hash, "layers": list(stats.layers), "n_slots": stats.n_slots, "unit": stats.unit,
           "protocol": stats.protocol, "rank": rank, "world_size": world_size}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _resume(partial: Path, fingerprint: str, fresh: SlotStats) -> tuple[SlotStats, int]:
    """The partial state to continue from and its next batch index, or (fresh, 0)."""
    if not partial.exists():
        return fresh, 0
    try:
        stats, metadata = SlotStats._read(partial, PARTIAL_FORMAT)
        next_batch = int(metadata["next_batch"])
    except (SlotStatsError, KeyError, ValueError) as e:
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


@contextmanager
def distributed_from_env(device: str = "auto") -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world_size, device) of this process. Under torchrun (WORLD_SIZE > 1) initialises
    torch.distributed — nccl on cuda:LOCAL_RANK when the device resolves to CUDA, else gloo on CPU —
    and destroys the process group on exit; otherwise (0, 1, resolve_device(device))."""
    from smviz.device import resolve_device

    resolved = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield 0, 1, resolved
        return
    dist = torch.distributed
    rank = int(os.environ["RANK"])
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    log.info("rank %d of %d on %s (%s)", rank, world_size, resolved, backend)
    try:
        yield rank, world_size, resolved
    finally:
        dist.destroy_process_group()

