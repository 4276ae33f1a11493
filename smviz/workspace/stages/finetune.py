"""The streams stage: a stream (facts in any facts format, documents, QA lines or editing records, read
through `smviz.data.formats`) learned by a finetuning method into a run directory (`run_finetune`, what
`smviz finetune` and the demo's three streams run), with its evaluation sets read from files; every input
is read and checked before anything is written."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from smviz.data.facts import read_facts
from smviz.data.formats import KIND_NOUNS, read_data
from smviz.data.formats.registry import read_text
from smviz.data.prompts import get_prompt_format
from smviz.data.tokenizer import pack_documents
from smviz.errors import ConfigError, InputError, ModelFileError, WriteError
from smviz.model import MemoryModel
from smviz.stats import STATS_FILE, SlotStats
from smviz.train import EvalSets, FinetuneConfig, finetune
from smviz.train.rundir import FinetuneRunDir
from smviz.train.stream import BACKGROUNDS, Stream, stream_stats
from smviz.workspace.stages.base import Plan, Stage, check_length

PROBE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def run_finetune(
    model_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: Any,
    *,
    stream: str | os.PathLike,
    stream_format: str | None = None,
    known: str | os.PathLike | None = None,
    heldout: str | os.PathLike | None = None,
    learn_eval: str | os.PathLike | None = None,
    forget_eval: dict[str, str | os.PathLike] | None = None,
    prompt_format: str = "qa",
    max_facts: int | None = None,
    first_fact: int = 0,
    background: str = "pretraining",
    known_facts: int = 100,
    heldout_rows: int = 64,
    seq_len: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any] | None:
    """Finetune the model in `model_dir` on the stream in the file `stream` (`max_facts` items from
    number `first_fact` on; its format detected unless `stream_format` names it) into `run_dir`.

    Learning is measured on the stream facts' held-out questions, or on the QA file `learn_eval` (needed
    for document and QA streams); an editing stream also reports the editing metrics. Forgetting is
    measured on the first `known_facts` facts of the facts file `known`, on each named QA file of
    `forget_eval` (name → path) and by the NLL of `heldout_rows` rows of `seq_len` tokens of `heldout`
    (a corpus or documents JSONL file, or plain text). `prompt_format` (qa, completion or chat) is how
    questions are put to the model. Sparse methods rank against the model's background statistics
    (`background="pretraining"`: its slot_stats.safetensors), against the stream's own batches
    (`"stream"`, the paper's Fig. 7 ablation) or against a statistics file of the model (a path: e.g. a
    background of corpus text only, `background_stats(mixture="corpus")`). Every input is read and checked before anything is written.
    Under torchrun every process calls it with its `rank` (`smviz.train.finetune`: one update, rank 0 writes)."""
    config = config.resolved()
    background_file = None if background in BACKGROUNDS else Path(background)
    if background_file is not None and not background_file.is_file():
        raise ConfigError(f"unknown background {background!r}; choose {' or '.join(BACKGROUNDS)}, or a statistics file "
                          "of the model (smviz stats --out FILE)")
    if first_fact < 0:
        raise ConfigError(f"first_fact must be >= 0, got {first_fact}")
    for name, value in (("max_facts", max_facts), ("known_facts", known_facts), ("heldout_rows", heldout_rows), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    get_prompt_format(prompt_format)
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise WriteError(f"cannot write the run into {run_dir}: it is a file, and a run directory is needed there")
    fmt, items = read_data(stream, stream_format)
    stream_items = items[first_fact:][:max_facts]
    if not items:
        raise InputError(f"{stream} holds no records; the stream needs at least one")
    if not stream_items:
        raise InputError(f"{stream} holds {len(items)} records, none from number {first_fact} on; the stream needs at least one")
    if fmt.kind in ("qa", "documents") and learn_eval is None:
        raise ConfigError(f"{stream} holds {KIND_NOUNS[fmt.kind]} (format {fmt.name}): as a stream they have no held-out "
                          "questions of their own; give the QA file that measures what they teach with --learn-eval QA_FILE")
    learn = None if learn_eval is None else read_qa(learn_eval, "--learn-eval")
    probes = read_probes(forget_eval or {})
    known_list = [] if known is None else read_facts(known)[:known_facts]
    if known is not None and not known_list:
        raise InputError(f"{known} holds no facts; forgetting is measured on known facts")
    heldout_texts = None if heldout is None else read_heldout_texts(heldout)
    model = MemoryModel.from_pretrained(model_dir, device=device)
    if model.tokenizer is None:
        raise ModelFileError(f"{model_dir} holds no tokenizer, so it cannot read the stream (models from `smviz build` "
                             "have none); finetune a pretrained model (smviz pretrain)")
    check_length("seq_len", seq_len, model)
    rows = None
    if heldout_texts is not None:
        rows = pack_documents(model.tokenizer, heldout_texts, seq_len)[:heldout_rows]
        if len(rows) == 0:
            raise InputError(f"{heldout} holds too little text for one row of {seq_len} tokens")

    sources = {"stream": {**source(stream), "format": fmt.name}}
    for name, path in (("known", known), ("heldout", heldout), ("learn", learn_eval)):
        if path is not None:
            sources[name] = source(path)
    sources.update({f"forget/{name}": source(path) for name, path in sorted((forget_eval or {}).items())})
    sets = EvalSets(stream_items, known_list, rows, learn=learn, probes=probes, prompt_format=prompt_format, sources=sources)
    train_stream = Stream(stream_items, model.tokenizer, config.batch_size, config.steps_per_fact, config.composition, config.seed,
                          prompt_format=prompt_format, context=seq_len)
    stats = None
    if config.sparse and background == "stream":
        stats = stream_stats(model, train_stream)
    elif config.sparse and background_file is not None:
        stats = SlotStats.load(background_file, model)  # refused unless computed with this model
    elif config.sparse and (Path(model_dir) / STATS_FILE).is_file():
        stats = SlotStats.load_for_model(model_dir, model)
    return finetune(model, train_stream, config=config, run_dir=run_dir, eval_sets=sets, stats=stats, progress=progress,
                    stop_after=stop_after, rank=rank, world_size=world_size)


def source(path: str | os.PathLike) -> dict[str, str]:
    """An input file as a run records it: its name and content hash, not its path (the same command
    from another directory is the same run)."""
    return {"name": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def read_qa(path: str | os.PathLike, flag: str) -> list[Any]:
    """The QA items of an evaluation file (format `qa`); another kind of file is refused, naming `flag`."""
    fmt, items = read_data(path)
    if fmt.kind != "qa":
        raise InputError(f"{path} holds {KIND_NOUNS[fmt.kind]} (format {fmt.name}); {flag} takes a qa file "
                         '({"question", "answer"} or {"question", "answers": [...]} per line)')
    if not items:
        raise InputError(f"{path} holds no questions")
    return items


def read_probes(forget_eval: dict[str, str | os.PathLike]) -> dict[str, list[Any]]:
    """Named forgetting probes: each name checked (letters, digits, `_.-`), each file a qa file."""
    probes = {}
    for name, path in forget_eval.items():
        if not PROBE_NAME.fullmatch(name) or name == "known":
            raise ConfigError(f"probe name {name!r}: use letters, digits, '_', '.' or '-' (and not 'known', the known facts' probe)")
        probes[name] = read_qa(path, f"--forget-eval {name}=")
    return probes


def parse_probes(assignments: list[str]) -> dict[str, str]:
    """`NAME=QA_FILE` flags as {name: path}; a repeated name or a missing '=' is refused."""
    out: dict[str, str] = {}
    for a in assignments:
        name, sep, path = a.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--forget-eval takes NAME=QA_FILE, got {a!r}")
        if name in out:
            raise ConfigError(f"--forget-eval {name} is given twice; probe names must be unique")
        out[name] = path
    return out


def read_heldout_texts(path: str | os.PathLike) -> list[str]:
    """The held-out texts of `path`: a JSONL file of {"text", ...} objects (a corpus or documents file),
    or plain text (one text)."""
    _, text = read_text(path)
    if text.lstrip().startswith("{"):
        return [d.text for d in read_data(path, "documents")[1]]
    if not text.strip():
        raise InputError(f"{path} is empty; held-out NLL needs some text")
    return [text]


def stream_stage(method: str) -> Stage:
    """The demo's stream of new facts learned with `method` into WS/runs/METHOD (questions in the plan's
    stream prompt format, forgetting probes from its `probes`: name → file in WS/data; FinetuneConfig fields
    from its `config`, then `per_method[method]`)."""

    def run(plan: Plan) -> str:
        ws, stream = plan.ws, plan.stream
        summary = run_finetune(
            plan.model_dir, ws.run(method), FinetuneConfig(method=method, **stream["config"] | stream.get("per_method", {}).get(method, {})),
            stream=ws.facts("new"), known=ws.facts("known"), heldout=ws.corpus("heldout"),
            max_facts=stream["max_facts"], known_facts=stream["known_facts"], heldout_rows=stream["heldout_rows"],
            prompt_format=stream.get("prompt_format", "qa"),
            forget_eval={name: ws.data / file for name, file in stream.get("probes", {}).items()},
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
