"""The pretraining and evaluation stages of a workspace: the model NAME pretrained from scratch on the
workspace's corpus and world (`run_pretraining`, resumable; state in WS/pretrain/NAME, the model in
WS/models/NAME; its batch stream and periodic evaluation also serve a retrofit, `retrofit`) and its
evaluation (`evaluate_workspace_model`; kept in WS/reports/pretrain-NAME.json by `evaluate_pretrained`,
the one place `smviz pretrain` and the demo keep it)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers

from smviz.config import coerce, with_overrides
from smviz.data.tokenizer import pack_documents
from smviz.errors import ConfigError, ModelFileError
from smviz.evaluate import answer_questions, evaluate_model, format_report, qa_metrics
from smviz.io import write_json_atomic
from smviz.model import MemoryModel, preset
from smviz.train.data import PretrainStream, pack_whole_documents, world_documents
from smviz.train.pretrain import PretrainConfig, RetrofitConfig, pretrain
from smviz.train.rundir import PretrainRunDir
from smviz.workspace.layout import Workspace
from smviz.workspace.stages.base import Plan, Stage, check_length
from smviz.workspace.stages.data import WorkspaceData, ensure_tokenizer, load_data

log = logging.getLogger(__name__)

EVAL_SEQ_LEN = 128
EVAL_USAGE_TOKENS = 200_000


# --------------------------------------------------------------------------- pretraining


def typed_pretrain_config(config: PretrainConfig) -> PretrainConfig:
    """`config` with its `memory` and `model` overrides checked before anything is written: string
    values (from the command line) parsed to the type of the field they replace, MemoryConfig
    fields checked against the preset's memory and its blocks, and `seq_len` within the model's maximum
    positions. ConfigError naming the field otherwise."""
    p = preset(config.preset)
    if not isinstance(config.memory, dict) or not isinstance(config.model, dict):
        raise ConfigError("PretrainConfig.memory and .model must be objects of KEY: VALUE overrides")
    checked = with_overrides(p.memory, config.memory)  # unknown field or bad value: ConfigError naming it
    memory = {k: getattr(checked, k) if isinstance(v, str) else v for k, v in config.memory.items()}
    model = {k: _hf_value(k, v, p.hf.get(k)) for k, v in config.model.items()}
    try:
        hf = transformers.AutoConfig.for_model(p.model_type, **(p.hf | model))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"HF config overrides {model} are not valid for a {p.model_type} model: {e}") from None
    blocks = hf.num_hidden_layers
    bad = [i for i in checked.layers if not 0 <= i < blocks]
    if bad:
        raise ConfigError(f"memory layer index {bad} out of range: the model has {blocks} blocks (0..{blocks - 1})")
    limit = getattr(hf, "max_position_embeddings", None)
    if limit and config.seq_len > limit:
        raise ConfigError(f"seq_len {config.seq_len} is longer than the model's maximum of {limit} positions "
                          f"(preset {config.preset!r})")
    return replace(config, memory=memory, model=model) if (memory, model) != (config.memory, config.model) else config


def _hf_value(key: str, value: Any, preset_value: Any) -> Any:
    """An HF config override: a string parsed to the type of the preset's value, or as JSON when the
    preset does not set `key` (numbers, true/false, lists), else kept as text."""
    if not isinstance(value, str):
        return value
    if preset_value is not None:
        return coerce(type(preset_value), value, f"model.{key}")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def make_stream(data: WorkspaceData, tokenizer, config: PretrainConfig, extra_docs: Sequence[str] = ()) -> PretrainStream:
    """The run's batch stream: corpus train rows and the world's training texts (Q/A documents in the
    config's prompt format) with `extra_docs` beside them (a retrofit's replay), tokenised with `tokenizer`."""
    corpus_rows = pack_documents(tokenizer, [a.text for a in data.corpus_train], config.seq_len)
    if config.prompt_format == "qa":
        docs = data.training_world_texts(copies=config.world_copies, seed=config.seed)
    else:  # the same people as training_world_texts, Q/A pairs in the retrofit's format
        world = data.world
        docs = world_documents(world.known + world.bio_only, world.known, copies=config.world_copies, seed=config.seed,
                               prompt_format=config.prompt_format, tokenizer=tokenizer)
    replay_share = config.replay_share if isinstance(config, RetrofitConfig) else 0.0  # 0: extra_docs join the world's pool
    if not replay_share:
        docs = [*docs, *extra_docs]
    world_ids, world_labels = _pack_documents(tokenizer, docs, config.seq_len, "world")
    replay_ids, replay_labels = _pack_documents(tokenizer, extra_docs, config.seq_len, "replay") if replay_share else (None, None)
    return PretrainStream(corpus_rows, world_ids, world_labels, config.batch_size, config.fact_share, config.seed,
                          replay_ids, replay_labels, replay_share)


def _pack_documents(tokenizer, docs: Sequence[str], seq_len: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole documents packed into rows (`pack_whole_documents`), warning about any cut to `seq_len`."""
    token_lists = tokenizer(list(docs), add_special_tokens=False)["input_ids"] if docs else []
    cut = sum(len(tokens) >= seq_len for tokens in token_lists)
    if cut:
        log.warning("%d of %d %s documents are longer than seq_len %d (with their eos) and are cut: the facts "
                    "at their ends are never trained; raise seq_len", cut, len(docs), kind, seq_len)
    # a pretrained model's tokenizer may have no pad token: padding is labelled -100 and masked anyway
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack_whole_documents(token_lists, seq_len, tokenizer.eos_token_id, pad)


def periodic_evaluator(data: WorkspaceData, config: PretrainConfig):
    """Exact match on a fixed sample of facts, held-out templates (and training templates for known
    facts, where memorisation shows first), with known-fact held-out EM also with the memory off;
    questions put in the config's prompt format."""
    n = config.eval_facts
    sample = {name: facts[:: max(1, len(facts) // n)][:n] for name, facts in data.facts().items()}

    def em(model: MemoryModel, facts, heldout: bool = True) -> float:
        return qa_metrics(answer_questions(model, facts, heldout=heldout, prompt_format=config.prompt_format))["em"]

    def evaluate(model: MemoryModel) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, facts in sample.items():
            out[f"{name}_em"] = em(model, facts)
        out["known_train_em"] = em(model, sample["known"], heldout=False)
        with model.memory_off():
            out["known_em_memory_off"] = em(model, sample["known"])
        return out

    return evaluate


def run_pretraining(
    ws: Workspace, name: str, config: PretrainConfig, *, device: torch.device, stop_after: int | None = None, progress: bool = True
) -> MemoryModel:
    """Pretrain model `name` in the workspace (resuming its run if one exists) and save it."""
    config = typed_pretrain_config(config)
    data = load_data(ws.data)
    tokenizer = ensure_tokenizer(ws, data)
    stream = make_stream(data, tokenizer, config)
    usage_rows = heldout_rows(data, tokenizer, config.seq_len)[: config.usage_rows]
    model = pretrain(
        ws.pretrain_run(name), config, tokenizer=tokenizer, stream=stream,
        evaluate=periodic_evaluator(data, config), usage_rows=usage_rows, device=device,
        stop_after=stop_after, progress=progress,
    )
    if stop_after is None or run_finished(ws.pretrain_run(name), config):
        model.save_pretrained(ws.model(name))
    return model


def run_finished(run_dir: Path, config: PretrainConfig) -> bool:
    """Whether the pretraining run in `run_dir` has checkpointed its last step."""
    checkpoint = PretrainRunDir(run_dir).checkpoint()
    return checkpoint is not None and checkpoint["step"] >= config.steps


def pretrain_config_of(ws: Workspace, name: str) -> PretrainConfig | None:
    """The config of the workspace's pretraining run `name` (a RetrofitConfig when it started from a base
    model), or None when there is none."""
    config = PretrainRunDir(ws.pretrain_run(name)).config()
    if config is None:
        return None
    return (RetrofitConfig if isinstance(config, dict) and config.get("base") else PretrainConfig).from_dict(config)


def heldout_rows(data: WorkspaceData, tokenizer, seq_len: int) -> torch.Tensor:
    return pack_documents(tokenizer, [a.text for a in data.corpus_heldout], seq_len)


def _pretrain_run(plan: Plan) -> str:
    plan.loaded = run_pretraining(plan.ws, plan.name, plan.config, device=plan.device)
    return f"→ {plan.model_dir} (model {plan.loaded.model_hash})"


def _pretrain_done(plan: Plan) -> bool:
    if not plan.model_dir.exists():
        return False
    plan.model  # verified and loaded: an altered model is refused here
    return True


PRETRAIN = Stage(
    "pretrain",
    title=lambda plan: (f"pretraining {plan.config.preset!r}: {plan.config.steps} steps of {plan.config.batch_size}x"
                        f"{plan.config.seq_len} tokens on {plan.device} (progress in "
                        f"{plan.ws.pretrain_run(plan.name) / 'metrics.jsonl'}; resumes if interrupted)"),
    done=_pretrain_done,
    run=_pretrain_run,
    skipped=lambda plan: f"{plan.model_dir} already pretrained and verified",
)


# --------------------------------------------------------------------------- evaluation


def evaluate_workspace_model(
    ws: Workspace, model: MemoryModel, *, usage_tokens: int = EVAL_USAGE_TOKENS, seq_len: int = EVAL_SEQ_LEN
) -> dict[str, Any]:
    """The full evaluation protocol of a pretrained model on the workspace's world and held-out corpus."""
    if model.tokenizer is None:
        raise ModelFileError("the model has no tokenizer, so it cannot be asked questions; evaluate a pretrained "
                             "model (smviz pretrain writes WS/models/NAME with its tokenizer)")
    check_length("seq_len", seq_len, model)
    data = load_data(ws.data)
    rows = heldout_rows(data, model.tokenizer, seq_len)
    usage_rows = rows[: max(1, usage_tokens // seq_len)]
    if len(usage_rows) * seq_len < usage_tokens - seq_len:
        log.warning("held-out corpus has only %d tokens; usage counted over all of them", len(usage_rows) * seq_len)
    return evaluate_model(model, facts=data.facts(), heldout_rows=rows, usage_rows=usage_rows)


def evaluate_model_dir(ws: Workspace, model_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                       out: str | os.PathLike | None = None) -> dict[str, Any]:
    """`smviz eval`: the evaluation of the model in `model_dir`, also written to `out` when given."""
    model = MemoryModel.from_pretrained(model_dir, device=device)
    if model.tokenizer is None:
        raise ModelFileError(
            f"{model_dir} holds no tokenizer, so the model cannot read the questions (models from `smviz build` "
            f"have none); pretrain one with `smviz pretrain --workspace {ws.root} --name NAME` and evaluate "
            f"{ws.model('NAME')}"
        )
    result = evaluate_workspace_model(ws, model)
    if out is not None:
        write_json_atomic(out, result)
    return result


def stored_evaluation(ws: Workspace, name: str, model: MemoryModel) -> dict[str, Any] | None:
    """The evaluation of pretrained model `name` kept in the workspace, if it is this model's."""
    path = ws.pretrain_eval(name)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) and result.get("model_hash") == model.model_hash else None


def evaluate_pretrained(ws: Workspace, name: str, model: MemoryModel) -> dict[str, Any]:
    """The evaluation of pretrained model `name`: the stored one when it is this model's, else computed
    and kept in WS/reports/pretrain-NAME.json."""
    result = stored_evaluation(ws, name, model)
    if result is None:
        result = evaluate_workspace_model(ws, model)
        write_json_atomic(ws.pretrain_eval(name), result)
    return result


def _evaluate_run(plan: Plan) -> str:
    evaluate_pretrained(plan.ws, plan.name, plan.model)
    return f"→ {plan.ws.pretrain_eval(plan.name)}"


EVALUATE = Stage(
    "evaluate",
    title=lambda plan: "evaluating the pretrained model",
    done=lambda plan: stored_evaluation(plan.ws, plan.name, plan.model) is not None,
    run=_evaluate_run,
    skipped=lambda plan: f"evaluation of model {plan.model.model_hash} already in {plan.ws.pretrain_eval(plan.name)}",
    report=lambda plan: format_report(evaluate_pretrained(plan.ws, plan.name, plan.model)),
)
