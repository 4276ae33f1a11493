"""The streams stage: a stream of new facts learned by a finetuning method into a run directory
(`run_finetune`, what `smviz finetune` and the demo's three streams run), every input read and
checked before anything is written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from smviz.data.corpus import read_corpus
from smviz.data.facts import read_facts
from smviz.data.tokenizer import pack_documents
from smviz.errors import ConfigError, InputError, ModelFileError, WriteError
from smviz.model import MemoryModel
from smviz.stats import STATS_FILE, SlotStats
from smviz.train import EvalSets, FinetuneConfig, finetune
from smviz.train.rundir import FinetuneRunDir
from smviz.train.stream import BACKGROUNDS, FactStream, stream_stats
from smviz.workspace.stages.base import Plan, Stage, check_length


def run_finetune(
    model_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: Any,
    *,
    facts: str | os.PathLike,
    known: str | os.PathLike,
    heldout: str | os.PathLike,
    max_facts: int | None = None,
    first_fact: int = 0,
    background: str = "pretraining",
    known_facts: int = 100,
    heldout_rows: int = 64,
    seq_len: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Finetune the model in `model_dir` on the stream in `facts` (`max_facts` facts from number
    `first_fact` on) into `run_dir`, evaluating on the first `known_facts` facts of `known` and
    `heldout_rows` rows of `seq_len` tokens of the corpus file `heldout`. Sparse methods rank against
    the model's background statistics (`background="pretraining"`: its slot_stats.safetensors) or
    against the stream's own batches (`"stream"`, the paper's Fig. 7 ablation). Every input is read
    and checked before anything is written."""
    config = config.resolved()
    if background not in BACKGROUNDS:
        raise ConfigError(f"unknown background {background!r}; choose one of {', '.join(BACKGROUNDS)}")
    if first_fact < 0:
        raise ConfigError(f"first_fact must be >= 0, got {first_fact}")
    for name, value in (("max_facts", max_facts), ("known_facts", known_facts), ("heldout_rows", heldout_rows), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise WriteError(f"cannot write the run into {run_dir}: it is a file, and a run directory is needed there")
    all_facts = read_facts(facts)
    stream_facts = all_facts[first_fact:][:max_facts]
    if not all_facts:
        raise InputError(f"{facts} holds no facts; the stream needs at least one")
    if not stream_facts:
        raise InputError(f"{facts} holds {len(all_facts)} facts, none from number {first_fact} on; the stream needs at least one")
    known_list = read_facts(known)[:known_facts]
    if not known_list:
        raise InputError(f"{known} holds no facts; forgetting is measured on known facts")
    articles = read_corpus(heldout)
    model = MemoryModel.from_pretrained(model_dir, device=device)
    if model.tokenizer is None:
        raise ModelFileError(f"{model_dir} holds no tokenizer, so it cannot read the facts (models from `smviz build` "
                             "have none); finetune a pretrained model (smviz pretrain)")
    check_length("seq_len", seq_len, model)
    rows = pack_documents(model.tokenizer, [a.text for a in articles], seq_len)[:heldout_rows]
    if len(rows) == 0:
        raise InputError(f"{heldout} holds too little text for one row of {seq_len} tokens")

    def source(path: str | os.PathLike) -> dict[str, str]:
        # name and content, not the path: the same command from another directory is the same run
        return {"name": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}

    sets = EvalSets(stream_facts, known_list, rows,
                    sources={"facts": source(facts), "known": source(known), "heldout": source(heldout)})
    stream = FactStream(stream_facts, model.tokenizer, config.batch_size, config.steps_per_fact, config.composition, config.seed)
    stats = None
    if config.sparse and background == "stream":
        stats = stream_stats(model, stream)
    elif config.sparse and (Path(model_dir) / STATS_FILE).is_file():
        stats = SlotStats.load_for_model(model_dir, model)
    return finetune(model, stream, config=config, run_dir=run_dir, eval_sets=sets, stats=stats, progress=progress,
                    stop_after=stop_after)


def stream_stage(method: str) -> Stage:
    """The demo's stream of new facts learned with `method` into WS/runs/METHOD."""

    def run(plan: Plan) -> str:
        ws, stream = plan.ws, plan.stream
        summary = run_finetune(
            plan.model_dir, ws.run(method), FinetuneConfig(method=method, **stream["config"]),
            facts=ws.facts("new"), known=ws.facts("known"), heldout=ws.corpus("heldout"),
            max_facts=stream["max_facts"], known_facts=stream["known_facts"], heldout_rows=stream["heldout_rows"],
            device=plan.device,
        )
        m = summary["metrics"]
        return (f"→ {ws.run(method)}: learned EM {m['learning_em']['end']:.3f}, known-fact EM "
                f"{m['known_em']['start']:.3f} → {m['known_em']['end']:.3f}, held-out NLL {m['heldout_nll']['change']:+.3f}")

    return Stage(
        method,
        title=lambda plan: f"learning {plan.stream['max_facts']} new facts with {method} → {plan.ws.run(method)}",
        done=lambda plan: FinetuneRunDir(plan.ws.run(method)).summary() is not None,
        run=run,
        skipped=lambda plan: f"{method} stream already finished in {plan.ws.run(method)}",
    )
