"""Processes under torchrun: the one place that sets up torch.distributed (`distributed_from_env`) and the
few collectives smviz's multi-process jobs share (`barrier`, `any_rank`). Background statistics, recording
and finetuning use them; a single process (WORLD_SIZE unset or 1) never touches torch.distributed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from smviz.device import resolve_device

log = logging.getLogger(__name__)


@contextmanager
def distributed_from_env(device: str = "auto") -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world_size, device) of this process. Under torchrun (WORLD_SIZE > 1) initialises
    torch.distributed — nccl on cuda:LOCAL_RANK when the device resolves to CUDA, else gloo on CPU —
    and destroys the process group on exit; otherwise (0, 1, resolve_device(device))."""
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


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier(world_size: int) -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if world_size > 1:
        torch.distributed.barrier()


def any_rank(flag: bool, world_size: int) -> bool:
    """Whether `flag` holds on any process (one small all-reduce; the flag itself in one process)."""
    if world_size <= 1:
        return flag
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_reduce_sum(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """`tensor` summed over every process, in place (and returned); itself in one process."""
    if world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
