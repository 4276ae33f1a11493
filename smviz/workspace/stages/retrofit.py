"""The retrofit stage of a workspace: a base model (`smviz import`) given memory layers and trained on the
workspace's corpus and world (`run_retrofit`, what `smviz retrofit` runs; resumable, the same call
resumes; state in WS/pretrain/NAME, the memory model in WS/models/NAME, which loads with
`MemoryModel.from_pretrained`). The loop is pretraining's (`smviz.train.pretrain.pretrain` with a
`RetrofitConfig`), and so are its batch stream and periodic evaluation (`make_stream`,
`periodic_evaluator`), with the Q/A texts and questions in the config's prompt format.

Everything is checked before anything is written: the workspace's data, the base model directory (a
model that already has a memory is refused), the memory config and its block indices, the sequence
length and the prompt format. The recorded config (WS/pretrain/NAME/config.json) holds the base as an
absolute path and every MemoryConfig field, so the run is fully described by it.

metrics.jsonl: as pretraining's (training lines: step, loss, lr, tokens_per_s, train_usage per block);
each evaluation line (every `eval_every` steps and at the end) holds under "eval":
- `heldout_usage`: per block, slot usage over `usage_rows` held-out corpus rows (`memory_usage`:
  used_share, entropy, kl_uniform, gini, slots_50/90/99, dead, ...);
- `known_em`, `bio_only_em`, `new_em` (held-out templates), `known_train_em` (training templates),
  `known_em_memory_off`: exact match on `eval_facts` facts per population, asked in `prompt_format`;
- `health` (`smviz.evaluate.memory_health` over the same held-out rows): `nll_memory_on`,
  `nll_memory_off` (the memory's term removed: in parallel mode with the base frozen, the base model's
  NLL exactly), `nll_change` (relative), and per block `value_movement` (‖V − V₀‖_F / ‖V₀‖_F, V₀ the
  initial values, re-created from the seed so that a resumed run measures against the same V₀),
  `memory_norm`, `ffn_norm`, `memory_ffn_ratio` (mean per-token L2 norms of the memory's and the FFN's
  outputs and their ratio), `query_cosine_raw` and `query_cosine_normed` (mean pairwise cosine of the
  memory's input hidden states and of its projected, normalised queries).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from smviz.data.prompts import get_prompt_format
from smviz.errors import RunError
from smviz.evaluate import memory_health
from smviz.model import MemoryModel, model_dir_hash
from smviz.train.pretrain import RetrofitConfig, build_model, pretrain
from smviz.train.rundir import PretrainRunDir
from smviz.workspace.layout import Workspace
from smviz.workspace.stages.base import check_length
from smviz.workspace.stages.data import WorkspaceData, load_data
from smviz.workspace.stages.pretrain import heldout_rows, make_stream, periodic_evaluator, run_finished
from smviz.workspace.stages.replay import replay_texts


def run_retrofit(
    ws: Workspace, name: str, config: RetrofitConfig, *, device: torch.device, stop_after: int | None = None,
    progress: bool = True,
) -> MemoryModel:
    """Retrofit `config.base` as model `name` of the workspace (resuming its run if one exists); the
    finished model is saved to WS/models/NAME. `stop_after` ends this call after that many steps."""
    data = load_data(ws.data)
    config = dataclasses.replace(config, base=str(Path(config.base).resolve()))
    start = build_model(config, None)  # the base verified and the memory attached: bad input fails here
    config = dataclasses.replace(config, memory=start.memory_config.to_dict())
    check_length("seq_len", config.seq_len, start)
    tokenizer = start.require_tokenizer("a retrofit")
    get_prompt_format(config.prompt_format).check(tokenizer)
    initial_values = {block: v.detach().clone() for block, v in start.values.items()}
    replay: list[str] = []
    if config.replay:  # the base's own answers, asked before training (the silent memory leaves it the base)
        run = PretrainRunDir(ws.pretrain_run(name))
        run.claim(config.to_dict())
        replay = replay_texts(run.path, start.to(device), model_dir_hash(config.base), data, n=config.replay,
                              seed=config.seed, prompt_format=config.prompt_format)
        if config.replay_share and not replay:
            raise RunError(f"the base model answered none of the {config.replay} replay questions (every answer was "
                           f"empty in prompt format {config.prompt_format}), so a replay share has nothing to draw; "
                           "retrofit without --replay-share, or in the prompt format the model answers in")
    del start

    stream = make_stream(data, tokenizer, config, replay)
    rows = heldout_rows(data, tokenizer, config.seq_len)[: config.usage_rows]
    model = pretrain(
        ws.pretrain_run(name), config, tokenizer=tokenizer, stream=stream,
        evaluate=retrofit_evaluator(data, config, rows, initial_values), usage_rows=rows, device=device,
        stop_after=stop_after, progress=progress,
    )
    if stop_after is None or run_finished(ws.pretrain_run(name), config):
        model.save_pretrained(ws.model(name))
    return model


def retrofit_evaluator(data: WorkspaceData, config: RetrofitConfig, rows: torch.Tensor,
                       initial_values: dict[int, torch.Tensor]):
    """Pretraining's periodic evaluation plus the memory's health on the held-out `rows`."""
    facts = periodic_evaluator(data, config)

    def evaluate(model: MemoryModel) -> dict[str, Any]:
        return facts(model) | {"health": memory_health(model, rows, initial_values=initial_values)}

    return evaluate


def last_run_evaluation(ws: Workspace, name: str) -> dict[str, Any] | None:
    """The last evaluation line of run `name` (its step and "eval"), or None before the first."""
    evals = [record for record in PretrainRunDir(ws.pretrain_run(name)).metrics() if "eval" in record]
    return evals[-1] if evals else None


def format_run_evaluation(record: dict[str, Any]) -> str:
    """A run's evaluation line as text: facts, NLL with the memory on and off, then per block usage,
    value movement, memory/FFN output norms and query similarity."""
    e = record["eval"]

    def num(x: float | None, spec: str = ".3f") -> str:
        return "—" if x is None else format(x, spec)

    lines = [f"step {record['step']}: known EM {num(e.get('known_em'))} (memory off {num(e.get('known_em_memory_off'))}, "
             f"training templates {num(e.get('known_train_em'))}), bio-only EM {num(e.get('bio_only_em'))}, "
             f"new EM {num(e.get('new_em'))}"]
    health = e.get("health", {})
    if health:
        lines.append(f"held-out NLL {num(health['nll_memory_on'], '.4f')} with the memory, "
                     f"{num(health['nll_memory_off'], '.4f')} without ({num(health['nll_change'], '+.2%')}), "
                     f"{health['tokens']:,} tokens")
    for block, usage in e.get("heldout_usage", {}).items():
        b = health.get("blocks", {}).get(block, {})
        lines.append(
            f"block {block}: slots read {num(usage.get('used_share'), '.1%')} (entropy {num(usage.get('entropy'), '.2f')}, "
            f"Gini {num(usage.get('gini'))}, dead {usage.get('dead'):,}); values moved {num(b.get('value_movement'), '.4f')}; "
            f"|memory|/|FFN| {num(b.get('memory_ffn_ratio'), '.4f')}; query cosine raw {num(b.get('query_cosine_raw'))}, "
            f"normed {num(b.get('query_cosine_normed'))}")
    return "\n".join(lines)
