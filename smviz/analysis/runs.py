"""Reading a finetuning run directory for analysis: its config, metrics and per-step selections as
DataFrames, the stream's items (any kind of data: facts, QA items, documents, editing records) and the
memory at any step rebuilt from the base model and the run's deltas. Every file is read through
`smviz.train.rundir.FinetuneRunDir`, the owner of the format; errors are RunError (a `layer=` that
names no memory layer of the run: ConfigError, from `smviz.model.resolve_layer`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from smviz.data.edits import EditRecord
from smviz.errors import RunError
from smviz.model import MemoryModel, resolve_layer
from smviz.train.rundir import FinetuneRunDir


class Run:
    """A finetuning run directory, read-only. Tables load on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.dir = FinetuneRunDir(path)
        self.path = self.dir.path
        self.identity: dict[str, Any] = self.dir.read_identity()
        self.summary: dict[str, Any] | None = self.dir.summary()
        self._steps: pd.DataFrame | None = None

    def __repr__(self) -> str:
        state = "finished" if self.summary else "unfinished"
        return f"Run({self.path}: {self.method}, {state}, base model {self.base_model_hash})"

    @property
    def config(self) -> dict[str, Any]:
        return self.identity["config"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def base_model_hash(self) -> str:
        return self.identity["base_model_hash"]

    @property
    def model_hash(self) -> str | None:
        """Hash of the finetuned model (None while the run is unfinished)."""
        return None if self.summary is None else self.summary["model_hash"]

    @property
    def model_dir(self) -> Path:
        """The finished run's model directory (`<run>/model`)."""
        return self.dir.model_dir

    @property
    def has_deltas(self) -> bool:
        """The run wrote per-step deltas (value-row methods)."""
        return self.dir.has_deltas()

    @property
    def stream(self) -> str:
        """The kind of data the run was trained on: facts, qa, documents or edits (config.json's stream;
        runs written before streams had kinds trained on facts)."""
        return (self.identity.get("stream") or {}).get("kind", "facts")

    @property
    def items(self) -> list[dict[str, Any]]:
        """The stream's items in order, as canonical JSON objects (stream.jsonl; `smviz.data.formats.
        canonical`): a Fact's dict, {id, question, answers}, {id, text} or an EditRecord's dict, by
        `stream`. Empty for runs written before stream.jsonl existed."""
        return self.dir.stream()

    def item_table(self) -> pd.DataFrame:
        """One row per stream item, for reading (`item_rows`)."""
        return item_rows(self.stream, self.items)

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per evaluation (metrics.jsonl): step, facts_seen, learn_em, learn_f1, stream_em,
        stream_f1, known_em, known_f1, heldout_nll, then the nested records flattened with "/": for each
        named forgetting probe NAME (`--forget-eval NAME=QA_FILE`) forget/NAME/em, forget/NAME/f1,
        forget/NAME/contained and forget/NAME/n (its question count), and for editing streams editing/efficacy_prob,
        editing/efficacy_em, editing/generalization_prob, editing/generalization_em, editing/locality_prob,
        editing/locality_em and editing/n (records). A metric the run did not measure (no known facts,
        no held-out text, no learning set) keeps its column, NaN."""
        df = pd.json_normalize(self.dir.metrics(), sep="/")
        for column in df.columns:
            if column not in ("step", "facts_seen"):
                df[column] = pd.to_numeric(df[column])  # an all-None column → float NaN, not object
        return df

    @property
    def questions(self) -> pd.DataFrame:
        """One row per evaluation and question asked (questions.jsonl): step, set ("stream", "learn",
        "known" or "forget/NAME"), id (FACT_ID/TEMPLATE, or a QA item's id), em, f1 — the numbers behind
        metrics' means, for intervals over questions and paired tests between runs. Empty (with these
        columns) for runs written before questions.jsonl existed."""
        columns = ["step", "set", "id", "em", "f1"]
        frames = [pd.DataFrame({"step": record["step"], "set": name, "id": scores["id"], "em": scores["em"], "f1": scores["f1"]})
                  for record in self.dir.questions() for name, scores in record.items() if name != "step"]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

    @property
    def steps(self) -> pd.DataFrame:
        """One row per step and memory layer (steps.parquet): step, fact_id, fact_index, loss, layer,
        accessed, grad_norm, selected, tf, df, score (the last four are arrays, best first)."""
        if self._steps is None:
            self._steps = self.dir.steps_table().to_pandas()
        return self._steps

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.steps["layer"].unique())

    def resolve_layer(self, layer: int | None) -> int:
        """The memory layer of this run `layer` names (None: the only one); ConfigError otherwise."""
        return resolve_layer(layer, self.layers, what=f"run {self.path}")

    def selected(self, *, by: str = "step", layer: int | None = None) -> dict[Any, np.ndarray]:
        """Selected slot ids (sorted, unique) per step (`by="step"`) or per fact (`by="fact"`: the union
        over the fact's steps), for one memory layer (default: the only one)."""
        if by not in ("step", "fact"):
            raise RunError(f"by must be 'step' or 'fact', got {by!r}")
        layer = self.resolve_layer(layer)
        steps = self.steps[self.steps["layer"] == layer]
        key = "step" if by == "step" else "fact_id"
        out: dict[Any, np.ndarray] = {}
        for k, group in steps.groupby(key, sort=False):
            out[k] = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in group["selected"]]))
        if not any(len(v) for v in out.values()):
            raise RunError(f"run {self.path} selected no slots ({self.method} trains no value rows by selection)")
        return out

    def check_model(self, model: MemoryModel) -> None:
        """Refuse a model that is not this run's base model."""
        if model.model_hash != self.base_model_hash:
            raise RunError(f"run {self.path} started from model {self.base_model_hash}, not {model.model_hash}")

    def delta(self, step: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (rows, values after the step)} of a value-row run's step (1-based)."""
        return self.dir.delta(step)

    @torch.no_grad()
    def rebuild(self, model: MemoryModel, step: int) -> MemoryModel:
        """Put `model` (this run's base model, loaded fresh) into the state after `step` by applying the
        deltas 1..step in order; returns it. Step 0 leaves it as it is."""
        self.check_model(model)
        for s in range(1, step + 1):
            for layer, (rows, values) in self.delta(s).items():
                weight = model.memory_layers[layer].value_table.weight
                weight[rows.to(weight.device)] = values.to(weight.device, weight.dtype)
        model.model_hash = None  # no longer the saved base model
        return model


DOCUMENT_START = 200
"""Characters of a document's text that `item_rows` shows."""


ITEM_COLUMNS = {
    "facts": ["id", "subject", "relation", "answer", "statements", "questions"],
    "qa": ["id", "question", "answers"],
    "documents": ["id", "chars", "text"],
    "edits": ["id", "subject", "rewrite_prompt", "target_true", "target_new", "paraphrase_prompts", "neighborhood", "source"],
}
"""The columns of `item_rows` per kind of stream."""


def item_rows(kind: str, items: list[dict[str, Any]]) -> pd.DataFrame:
    """Canonical stream items (`Run.items`) of `kind` as one readable row each. Columns by kind —
    facts: id, subject, relation, answer, statements, questions (counts); qa: id, question, answers (a
    list); documents: id, chars, text (its first DOCUMENT_START characters, "…" when cut); edits: id,
    subject, rewrite_prompt (the subject in place of {}), target_true, target_new, paraphrase_prompts (a
    list), neighborhood (a list of "prompt → answer"), source. Unknown kinds: RunError."""
    if kind == "facts":
        rows = [{"id": d["id"], "subject": d["subject"], "relation": d["relation"], "answer": d["answer"],
                 "statements": len(d["statements"]), "questions": len(d["questions"])} for d in items]
    elif kind == "qa":
        rows = [{"id": d["id"], "question": d["question"], "answers": list(d["answers"])} for d in items]
    elif kind == "documents":
        rows = [{"id": d["id"], "chars": len(d["text"]), "text": d["text"][:DOCUMENT_START] + ("…" if len(d["text"]) > DOCUMENT_START else "")}
                for d in items]
    elif kind == "edits":
        rows = [{"id": d["id"], "subject": d["subject"], "rewrite_prompt": EditRecord.from_dict(d).rewrite_prompt,
                 "target_true": d["target_true"], "target_new": d["target_new"], "paraphrase_prompts": list(d["paraphrase_prompts"]),
                 "neighborhood": [f"{n['prompt']} → {n['answer']}" for n in d["neighborhood"]], "source": d["source"]} for d in items]
    else:
        raise RunError(f"unknown kind of stream {kind!r}; expected one of {', '.join(ITEM_COLUMNS)}")
    return pd.DataFrame(rows, columns=ITEM_COLUMNS[kind])
