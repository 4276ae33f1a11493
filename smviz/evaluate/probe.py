"""Forgetting probes built from what a model knows (the paper's NaturalQuestions analogue): `build_probe`
asks a model every question of a QA set and keeps those it answers correctly, so that a later drop
measures forgetting and not questions it never knew; `write_probe` writes the kept questions (canonical
`qa` JSONL, what `--forget-eval` reads) with a provenance file beside them. `REAL_KNOWLEDGE` is the
project's own set of well-known real-world facts; `answering_model` loads any model directory, base
models included, so that the probe can be built from the model before a memory is retrofitted.

A question is answered correctly when one of its answers is contained in the model's answer
(`smviz.evaluate.scoring.answer_contained`): chat models answer in sentences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smviz.data.formats.canonical import write_canonical
from smviz.data.formats.qa import QAItem
from smviz.data.prompts import get_prompt_format
from smviz.errors import ConfigError, WriteError
from smviz.evaluate.qa import answer_qa_items
from smviz.evaluate.scoring import SCORING_PROTOCOL
from smviz.io import write_json_atomic
from smviz.memory import MemoryConfig
from smviz.model import MemoryModel
from smviz.model.format import is_base_model_dir
from smviz.model.memory_model import load_base_model

FORMAT = "smviz-probe/1"
REAL_KNOWLEDGE = Path(__file__).resolve().parents[1] / "data" / "probes" / "real_knowledge.jsonl"
REAL_KNOWLEDGE_SOURCE = (
    "written by the smviz project from general knowledge (capitals, authors, elements, planets, inventors, "
    "painters, composers, continents, currencies, languages, landmarks, basic science); questions and answers "
    "with common aliases, Apache-2.0 like the project"
)
KEEP_RULE = "kept: the questions the model answers with one of their answers contained (answer_contained = 1)"

# The silent memory that lets a base model answer through MemoryModel: parallel, so its output is exact
# zeros and the logits are the base model's bit for bit (`MemoryModel.attach`), and as small as can be.
_SILENT = dict(n_keys=2, heads=1, knn=2, k_dim=8, layers=(0,), mode="parallel")


def answering_model(directory: str | os.PathLike, *, device: str | torch.device | None = None) -> MemoryModel:
    """The model of `directory` as a MemoryModel that answers questions, its `model_hash` the directory's.
    A base model (`smviz import`, no memory) gets a silent parallel memory, which leaves every logit as
    the base model computes it."""
    if not is_base_model_dir(directory):
        return MemoryModel.from_pretrained(directory, device=device)
    lm, tokenizer, metadata = load_base_model(directory, device=device)
    model = MemoryModel.attach(lm, MemoryConfig.from_dict(_SILENT), tokenizer).to(lm.device)
    model.model_hash = metadata["model_hash"]
    return model.eval()


def build_probe(model: MemoryModel, items: Sequence[QAItem], *, prompt_format: str = "chat") -> tuple[list[QAItem], dict[str, Any]]:
    """(kept items, provenance): the items `model` answers correctly, asked in `prompt_format` as
    finetuning runs ask probes (`answer_qa_items`, the format's answer length), and what was asked,
    kept and why, with every answer."""
    if not items:
        raise ConfigError("the QA set holds no questions to build a probe from")
    rows = answer_qa_items(model, items, prompt_format=prompt_format)
    kept = [item for item, row in zip(items, rows) if row["contained"] == 1.0]
    provenance = {
        "format": FORMAT,
        "model_hash": model.model_hash,
        "prompt_format": prompt_format,
        "answer_tokens": get_prompt_format(prompt_format).answer_tokens,
        "asked": len(items),
        "kept": len(kept),
        "rule": KEEP_RULE,
        "protocol": SCORING_PROTOCOL,
        "answers": [{"id": r["fact_id"], "question": r["question"], "golds": r["golds"], "prediction": r["prediction"],
                     "contained": r["contained"], "em": r["em"], "f1": r["f1"]} for r in rows],
    }
    return kept, provenance


def provenance_path(out: str | os.PathLike) -> Path:
    """Where the provenance of the probe file `out` is written: beside it, `NAME.provenance.json`."""
    out = Path(out)
    return out.with_name(out.stem + ".provenance.json")


def write_probe(out: str | os.PathLike, kept: Sequence[QAItem], provenance: dict[str, Any], *, source: dict[str, Any]) -> Path:
    """Write the kept items to `out` (canonical qa JSONL) and their provenance, with the QA set's
    `source` (name, sha256, description), beside it; each file atomically. Returns the provenance path."""
    if not kept:
        raise ConfigError(f"the model answered none of the {provenance['asked']} questions correctly: no probe to write")
    side = provenance_path(out)
    if Path(out).resolve() == side.resolve():
        raise WriteError(f"{out}: a probe file needs a name other than its provenance file's")
    write_canonical(out, "qa", kept)
    write_json_atomic(side, provenance | {"source": source})
    return side
