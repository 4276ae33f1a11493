"""The background-statistics stage: which batches a workspace model's `slot_stats.safetensors`
counts (random batches of its own pretraining mixture), with what settings, written where —
`background_stats`, what `smviz stats` runs. The counting itself is `smviz.stats.count_batches`."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from smviz.errors import ConfigError
from smviz.model import MemoryModel
from smviz.errors import StatsError
from smviz.stats import STATS_FILE, SlotStats, check_run_settings, count_batches
from smviz.train.pretrain import PretrainConfig, RetrofitConfig
from smviz.workspace.layout import Workspace
from smviz.workspace.stages.base import Plan, Stage, check_length
from smviz.workspace.stages.data import load_data
from smviz.workspace.stages.pretrain import make_stream, pretrain_config_of

log = logging.getLogger(__name__)

BACKGROUND_STEP_OFFSET = 10**6
"""Background batch i is `PretrainStream.batch(BACKGROUND_STEP_OFFSET + i)`: random batches of the
pretraining mixture, reproducible, and (for any run shorter than a million steps) not the exact batches
the model trained on."""
DEFAULT_BACKGROUND_BATCHES = 1000  # the paper: 1000 random batches of pretraining data
MIXTURES = {
    "pretraining": "the pretraining mixture: corpus train split + world texts of known and bio-only people",
    "corpus": "corpus train rows only, no world text (a background that is not the fact probe's distribution)",
    "no-known": "the pretraining mixture without the known people's documents (their biographies and Q/A): "
                "corpus + bio-only biographies",
}
"""What a background can count (`background_stats(mixture=...)`): the paper ranks against its pretraining
data; the others are controls (issue 17's C1: a background holding the very documents that measure
forgetting protects the slots the probe reads)."""


def stats_workspace(ws: Workspace | str | os.PathLike | None, model_dir: str | os.PathLike) -> Workspace:
    """The workspace whose pretraining mixture is the background of `model_dir`: `ws` when given, else
    the workspace holding `model_dir` when it is WS/models/NAME, else ./workspace."""
    if ws is not None:
        return ws if isinstance(ws, Workspace) else Workspace(ws)
    found = Workspace.of_model(model_dir) or Workspace("workspace")
    log.info("workspace: %s", found.root)
    return found


def stats_path(model_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Where `background_stats` writes: `out`, else beside the model's weights."""
    return Path(out) if out is not None else Path(model_dir) / STATS_FILE


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
    mixture: str = "pretraining",
) -> SlotStats | None:
    """Background statistics of the model in `model_dir`, written to `out` (default beside its weights).

    The background ("held-out-free training corpus") is the model's own pretraining mixture: corpus
    train split + world texts of known and bio-only people (never held-out corpus, never new facts), as
    `make_stream` builds it with the PretrainConfig of `ws.pretrain_run(<model dir name>)` (defaults
    when the run is absent); batch i is `stream.batch(BACKGROUND_STEP_OFFSET + i)`, batch size and
    sequence length default to that config's (the sequence length at most the model's maximum
    positions). `mixture` (`MIXTURES`) takes the corpus rows only ("corpus") or leaves the known people's
    documents out ("no-known"), the same batch indices otherwise. `ws` None: see `stats_workspace`.
    Resumable and distributed as `count_batches` is; `stop_after` (tests) returns None with the partial
    state on disk.
    """
    if mixture not in MIXTURES:
        raise ConfigError(f"unknown background mixture {mixture!r}; choose one of {', '.join(MIXTURES)}")
    check_run_settings(n_batches, unit=unit, checkpoint_every=checkpoint_every, stop_after=stop_after, rank=rank,
                       world_size=world_size)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    model_dir = Path(model_dir)
    ws = stats_workspace(ws, model_dir)
    out = stats_path(model_dir, out)

    model = MemoryModel.from_pretrained(model_dir, device=torch.device(device))
    model.require_memory("slot statistics")
    if model.tokenizer is None:
        raise StatsError(f"{model_dir} holds no tokenizer; background batches need the model's tokenizer")
    config = pretrain_config_of(ws, model_dir.name)
    run = model_dir.name if config is not None else None
    if config is None:
        log.info("no pretraining run at %s: background batches use the PretrainConfig defaults", ws.pretrain_run(model_dir.name))
        config = PretrainConfig()
    config = replace(config, batch_size=batch_size or config.batch_size, seq_len=seq_len or config.seq_len)
    if isinstance(config, RetrofitConfig):  # a retrofit's replay (the base's own answers) is not counted
        config = replace(config, replay_share=0.0)
    check_length("seq_len", config.seq_len, model)
    data = load_data(ws.data)
    if mixture == "corpus":
        config = replace(config, fact_share=0.0)
    elif mixture == "no-known":
        data = dataclasses.replace(data, world=dataclasses.replace(data.world, known=[]))
    stream = make_stream(data, model.tokenizer, config)
    protocol = {
        "source": "pretraining-mixture", "mixture": mixture, "pretrain_run": run, "world": data.world.config.to_dict(),
        "corpus_rows": len(stream.corpus_rows), "world_rows": len(stream.world_ids),
        "batch_size": config.batch_size, "seq_len": config.seq_len, "fact_share": config.fact_share,
        "world_copies": config.world_copies, "seed": config.seed, "step_offset": BACKGROUND_STEP_OFFSET,
        "unit": unit, "n_batches": n_batches,
    }
    return count_batches(
        model, lambda i: stream.batch(BACKGROUND_STEP_OFFSET + i), n_batches, out=out, unit=unit, protocol=protocol,
        progress=progress, checkpoint_every=checkpoint_every, rank=rank, world_size=world_size, stop_after=stop_after,
    )


def _stats_done(plan: Plan) -> bool:
    if not (plan.model_dir / STATS_FILE).is_file():
        return False
    try:
        SlotStats.load_for_model(plan.model_dir, plan.model)
    except StatsError:
        return False  # computed for another model: recompute
    return True


def _stats_run(plan: Plan) -> str:
    background_stats(plan.ws, plan.model_dir, n_batches=plan.stats_batches, device=plan.device)
    return f"→ {plan.model_dir / STATS_FILE}"


STATS = Stage(
    "stats",
    title=lambda plan: f"background slot statistics over {plan.stats_batches} batches of the pretraining mixture",
    done=_stats_done,
    run=_stats_run,
    skipped=lambda plan: f"background slot statistics already in {plan.model_dir / STATS_FILE}",
)
