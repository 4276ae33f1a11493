"""The first stages of a workspace: its data (`build_data`: the fact world and the corpus splits in
data/; `load_data` reads them back) and its tokenizer (`ensure_tokenizer`, trained once on them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from smviz.data.corpus import Article, load_articles, read_corpus, split_articles, write_corpus
from smviz.data.facts import Fact
from smviz.data.tokenizer import train_tokenizer
from smviz.data.world import World, WorldConfig, generate_world, read_world, world_fingerprint, write_world
from smviz.errors import InputError
from smviz.io import atomic_dir
from smviz.train.data import world_documents
from smviz.workspace.layout import CORPUS_FILES, WORLD_FILE, Workspace
from smviz.workspace.stages.base import Plan, Stage

CORPUS_HELDOUT_SHARE = 0.15  # ~200k held-out tokens: enough for the usage criterion's 200k-token window
TOKENIZER_VOCAB = 4096
TOKENIZER_WORLD_COPIES = 16


# --------------------------------------------------------------------------- data


def build_data(data_dir: str | os.PathLike, world_config: WorldConfig, *, force: bool = False) -> bool:
    """Write the fact world and the corpus splits into `data_dir`; False if it already held them.
    A directory holding a different world is refused (nothing written) unless `force`."""
    data_dir = Path(data_dir)
    world = generate_world(world_config)
    if not force:
        _refuse_another_world(data_dir, world)
    wrote = write_world(data_dir, world, force=force)
    if wrote or not all((data_dir / name).is_file() for name in CORPUS_FILES.values()):
        train, heldout = split_articles(load_articles(), heldout_share=CORPUS_HELDOUT_SHARE, seed=world_config.seed)
        write_corpus(data_dir / CORPUS_FILES["train"], train)
        write_corpus(data_dir / CORPUS_FILES["heldout"], heldout)
        wrote = True
    return wrote


def _refuse_another_world(data_dir: Path, world: World) -> None:
    """InputError when `data_dir` holds a readable world other than `world` (a damaged one is
    `write_world`'s to judge: the same world recorded is rewritten)."""
    if not (data_dir / WORLD_FILE).is_file():
        return
    try:
        existing = world_fingerprint(read_world(data_dir))
    except InputError:
        return
    new = world_fingerprint(world)
    if existing != new:
        raise InputError(f"refusing to write a world into {data_dir}: it holds another world (fingerprint {existing}, "
                         f"this one is {new}); pass --force (force=True in Python) to replace it")


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
    if not (data_dir / WORLD_FILE).is_file():
        raise InputError(f"{data_dir} holds no fact world; run `smviz world --out {data_dir}` first")
    return WorkspaceData(
        read_world(data_dir),
        read_corpus(data_dir / CORPUS_FILES["train"]),
        read_corpus(data_dir / CORPUS_FILES["heldout"]),
    )


def _data_done(plan: Plan) -> bool:
    data = plan.ws.data
    if not (data / WORLD_FILE).is_file() or not all((data / name).is_file() for name in CORPUS_FILES.values()):
        return False
    try:
        return world_fingerprint(read_world(data)) == world_fingerprint(generate_world(plan.world))
    except InputError:
        return False


def _data_run(plan: Plan) -> str:
    build_data(plan.ws.data, plan.world)
    return f"→ {plan.ws.data}"


WORLD = Stage("data", title=lambda plan: "fact world and corpus", done=_data_done, run=_data_run,
              skipped=lambda plan: f"fact world and corpus already in {plan.ws.data}")


# --------------------------------------------------------------------------- tokenizer


def ensure_tokenizer(ws: Workspace, data: WorkspaceData, vocab_size: int = TOKENIZER_VOCAB):
    """The workspace tokenizer, trained once on the corpus train part and the world's training texts."""
    import transformers

    if ws.tokenizer_file.is_file():
        return transformers.AutoTokenizer.from_pretrained(ws.tokenizer)
    # the world at the weight pretraining gives it (16 biographies per person): names and answers
    # become few tokens, which is what makes exact recall learnable for a tiny model
    texts = [a.text for a in data.corpus_train] + data.training_world_texts(copies=TOKENIZER_WORLD_COPIES, seed=0)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    with atomic_dir(ws.tokenizer) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


def _tokenizer_run(plan: Plan) -> str:
    ensure_tokenizer(plan.ws, load_data(plan.ws.data))
    return f"→ {plan.ws.tokenizer}"


TOKENIZER = Stage(
    "tokenizer", title=lambda plan: f"the workspace tokenizer (byte-level BPE, {TOKENIZER_VOCAB:,} tokens)",
    done=lambda plan: plan.ws.tokenizer_file.is_file(), run=_tokenizer_run,
    skipped=lambda plan: f"tokenizer already in {plan.ws.tokenizer}",
)
