"""The stages that build a workspace, each a function that skips its work when its output is already
there: data (fact world + corpus splits), tokenizer, pretrained model, evaluation. The CLI and the
demo call these; they hold the glue, the modules they call hold the logic.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smviz.data.corpus import Article, load_articles, read_corpus, split_articles, write_corpus
from smviz.data.facts import Fact
from smviz.data.tokenizer import pack_documents, train_tokenizer
from smviz.data.world import World, WorldConfig, generate_world, read_world, write_world
from smviz.errors import SmvizError
from smviz.io import replace_dir
from smviz.evaluate import answer_questions, evaluate_model, qa_metrics
from smviz.model import MemoryModel
from smviz.train.data import PretrainStream, pack_whole_documents, world_documents
from smviz.train.pretrain import PretrainConfig, pretrain
from smviz.workspace import Workspace

log = logging.getLogger(__name__)

CORPUS_HELDOUT_SHARE = 0.15  # ~200k held-out tokens: enough for the usage criterion's 200k-token window
CORPUS_FILES = {"train": "corpus-train.jsonl", "heldout": "corpus-heldout.jsonl"}
TOKENIZER_VOCAB = 4096
TOKENIZER_WORLD_COPIES = 16


# --------------------------------------------------------------------------- data


def build_data(data_dir: str | os.PathLike, world_config: WorldConfig, *, force: bool = False) -> bool:
    """Write the fact world and the corpus splits into `data_dir`; False if it already held them.
    A directory holding a different world is refused (nothing written) unless `force`."""
    data_dir = Path(data_dir)
    wrote = write_world(data_dir, generate_world(world_config), force=force)
    if wrote or not all((data_dir / name).is_file() for name in CORPUS_FILES.values()):
        train, heldout = split_articles(load_articles(), heldout_share=CORPUS_HELDOUT_SHARE, seed=world_config.seed)
        write_corpus(data_dir / CORPUS_FILES["train"], train)
        write_corpus(data_dir / CORPUS_FILES["heldout"], heldout)
        wrote = True
    return wrote


@dataclass
class WorkspaceData:
    world: World
    corpus_train: list[Article]
    corpus_heldout: list[Article]

    def training_world_texts(self, copies: int, seed: int) -> list[str]:
        """The world as pretraining sees it: biographies of known and bio-only people, Q/A of known people."""
        return world_documents(self.world.known + self.world.bio_only, self.world.known, copies=copies, seed=seed)

    def facts(self) -> dict[str, list[Fact]]:
        return {"known": self.world.known, "bio_only": self.world.bio_only, "new": self.world.new}


def load_data(data_dir: str | os.PathLike) -> WorkspaceData:
    data_dir = Path(data_dir)
    if not (data_dir / "world.json").is_file():
        raise SmvizError(f"{data_dir} holds no fact world; run `smviz world --out {data_dir}` first")
    return WorkspaceData(
        read_world(data_dir),
        read_corpus(data_dir / CORPUS_FILES["train"]),
        read_corpus(data_dir / CORPUS_FILES["heldout"]),
    )


# --------------------------------------------------------------------------- tokenizer


def ensure_tokenizer(ws: Workspace, data: WorkspaceData, vocab_size: int = TOKENIZER_VOCAB):
    """The workspace tokenizer, trained once on the corpus train part and the world's training texts."""
    import transformers

    path = ws.tokenizer
    if (path / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(path)
    # the world at the weight pretraining gives it (16 biographies per person): names and answers
    # become few tokens, which is what makes exact recall learnable for a tiny model
    texts = [a.text for a in data.corpus_train] + data.training_world_texts(copies=TOKENIZER_WORLD_COPIES, seed=0)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)
    return tokenizer


# --------------------------------------------------------------------------- pretraining


def make_stream(data: WorkspaceData, tokenizer, config: PretrainConfig) -> PretrainStream:
    corpus_rows = pack_documents(tokenizer, [a.text for a in data.corpus_train], config.seq_len)
    docs = data.training_world_texts(copies=config.world_copies, seed=config.seed)
    token_lists = tokenizer(docs, add_special_tokens=False)["input_ids"]
    world_ids, world_labels = pack_whole_documents(token_lists, config.seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return PretrainStream(corpus_rows, world_ids, world_labels, config.batch_size, config.fact_share, config.seed)


def periodic_evaluator(data: WorkspaceData, config: PretrainConfig):
    """Exact match on a fixed sample of facts, held-out templates (and training templates for known
    facts, where memorisation shows first), with known-fact held-out EM also with the memory off."""
    n = config.eval_facts
    sample = {name: facts[:: max(1, len(facts) // n)][:n] for name, facts in data.facts().items()}

    def evaluate(model: MemoryModel) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, facts in sample.items():
            out[f"{name}_em"] = qa_metrics(answer_questions(model, facts))["em"]
        out["known_train_em"] = qa_metrics(answer_questions(model, sample["known"], heldout=False))["em"]
        with model.memory_off():
            out["known_em_memory_off"] = qa_metrics(answer_questions(model, sample["known"]))["em"]
        return out

    return evaluate


def run_pretraining(
    ws: Workspace, name: str, config: PretrainConfig, *, device: torch.device, stop_after: int | None = None, progress: bool = True
) -> MemoryModel:
    """Pretrain model `name` in the workspace (resuming its run if one exists) and save it."""
    data = load_data(ws.data)
    tokenizer = ensure_tokenizer(ws, data)
    stream = make_stream(data, tokenizer, config)
    usage_rows = heldout_rows(data, tokenizer, config.seq_len)[: config.usage_rows]
    model = pretrain(
        ws.pretrain_run(name), config, tokenizer=tokenizer, stream=stream,
        evaluate=periodic_evaluator(data, config), usage_rows=usage_rows, device=device,
        stop_after=stop_after, progress=progress,
    )
    if stop_after is None or _finished(ws.pretrain_run(name), config):
        model.save_pretrained(ws.model(name))
    return model


def _finished(run_dir: Path, config: PretrainConfig) -> bool:
    trainer = run_dir / "checkpoint" / "trainer.json"
    return trainer.is_file() and json.loads(trainer.read_text())["step"] >= config.steps


def heldout_rows(data: WorkspaceData, tokenizer, seq_len: int) -> torch.Tensor:
    return pack_documents(tokenizer, [a.text for a in data.corpus_heldout], seq_len)


# --------------------------------------------------------------------------- evaluation


def evaluate_workspace_model(ws: Workspace, model: MemoryModel, *, usage_tokens: int = 200_000, seq_len: int = 128) -> dict[str, Any]:
    """The full evaluation protocol of a pretrained model on the workspace's world and held-out corpus."""
    data = load_data(ws.data)
    rows = heldout_rows(data, model.tokenizer, seq_len)
    usage_rows = rows[: max(1, usage_tokens // seq_len)]
    if len(usage_rows) * seq_len < usage_tokens - seq_len:
        log.warning("held-out corpus has only %d tokens; usage counted over all of them", len(usage_rows) * seq_len)
    return evaluate_model(model, facts=data.facts(), heldout_rows=rows, usage_rows=usage_rows)


# --------------------------------------------------------------------------- finetuning


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
    import hashlib

    from smviz.data.facts import read_facts
    from smviz.stats import STATS_FILE, SlotStats
    from smviz.train.finetune import EvalSets, finetune
    from smviz.train.stream import BACKGROUNDS, FactStream, stream_stats

    config = config.resolved()
    if background not in BACKGROUNDS:
        raise SmvizError(f"unknown background {background!r}; choose one of {', '.join(BACKGROUNDS)}")
    if first_fact < 0:
        raise SmvizError(f"first_fact must be >= 0, got {first_fact}")
    for name, value in (("max_facts", max_facts), ("known_facts", known_facts), ("heldout_rows", heldout_rows), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise SmvizError(f"{name} must be >= 1, got {value}")
    all_facts = read_facts(facts)
    stream_facts = all_facts[first_fact:][:max_facts]
    if not all_facts:
        raise SmvizError(f"{facts} holds no facts; the stream needs at least one")
    if not stream_facts:
        raise SmvizError(f"{facts} holds {len(all_facts)} facts, none from number {first_fact} on; the stream needs at least one")
    known_list = read_facts(known)[:known_facts]
    if not known_list:
        raise SmvizError(f"{known} holds no facts; forgetting is measured on known facts")
    articles = read_corpus(heldout)
    model = MemoryModel.from_pretrained(model_dir, device=device)
    if model.tokenizer is None:
        raise SmvizError(f"{model_dir} holds no tokenizer")
    rows = pack_documents(model.tokenizer, [a.text for a in articles], seq_len)[:heldout_rows]
    if len(rows) == 0:
        raise SmvizError(f"{heldout} holds too little text for one row of {seq_len} tokens")

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
