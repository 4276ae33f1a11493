"""The micro workspace that the app, report and browser tests share (the recipe of
analyses/walkthrough.ipynb): a small fact world, the micro model with a small tokenizer, its background
slot statistics, optionally a trace of the new facts (WS/traces/new) and finetuning runs on 3 facts."""

from __future__ import annotations

from pathlib import Path

from smviz.data.tokenizer import train_tokenizer
from smviz.data.world import WorldConfig
from smviz.model import MemoryModel
from smviz.workspace.stages import background_stats, build_data, load_data, run_finetune
from smviz.record import read_documents, record_texts
from smviz.train.finetune import FinetuneConfig
from smviz.workspace import Workspace


def build_micro_workspace(root: Path, *, stats_batches: int = 20, trace: bool = True,
                          runs: tuple[str, ...] = ("sparse", "full"), n_new: int = 3) -> Workspace:
    ws = Workspace(root)
    build_data(ws.data, WorldConfig(n_known=4, n_bio_only=1, n_new=n_new))
    data = load_data(ws.data)
    texts = [a.text for a in data.corpus_train[:200]] + data.training_world_texts(copies=4, seed=0)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=512)
    model.tokenizer = train_tokenizer(texts, vocab_size=512)
    model.save_pretrained(ws.model("micro"))
    background_stats(ws, ws.model("micro"), n_batches=stats_batches, batch_size=8, seq_len=64, progress=False)
    if trace:
        record(ws, ws.data / "facts-new.jsonl", "new")
    for method in runs:
        config = FinetuneConfig(method=method, top_t=16, batch_size=4, steps_per_fact=2, eval_every=2)
        run_finetune(ws.model("micro"), ws.run(method), config, stream=ws.data / "facts-new.jsonl",
                     known=ws.data / "facts-known.jsonl", heldout=ws.data / "corpus-heldout.jsonl",
                     max_facts=3, known_facts=4, heldout_rows=2, progress=False)
    return ws


def record(ws: Workspace, path: Path, name: str) -> None:
    """Record a JSONL file of texts or facts into WS/traces/NAME with the workspace's micro model."""
    docs, source = read_documents(path)
    record_texts(MemoryModel.from_pretrained(ws.model("micro")), docs, ws.trace(name), source=source, progress=False)


EDIT_PROBES = ("capitals", "books")
"""The named forgetting probes of `add_edits_run`."""


def add_edits_run(ws: Workspace, name: str = "edits", *, subject: str = "Danielle Darrieux") -> Path:
    """An editing run in WS/runs/NAME (sparse, one step per record): 3 CounterFact-like records, the
    first about `subject` (e.g. a hostile one), forgetting measured on the named QA probes EDIT_PROBES;
    no known facts and no held-out text, so those metrics stay unmeasured. Returns the run directory."""
    from smviz.data.edits import EditRecord
    from smviz.data.formats.canonical import write_canonical

    records = [
        EditRecord("0", subject, "The mother tongue of {} is", "English", "French",
                   (f"{subject} spoke the language", f"The native language of {subject} is"),
                   (("The mother tongue of Léon Blum is", "French"), ("The native language of Montesquieu is", "French")), "counterfact"),
        EditRecord("1", "Edwin of Northumbria", "{} is affiliated with the religion of", "Christianity", "Islam",
                   ("Edwin of Northumbria follows the religion of",), (("Abdul Qadeer Khan is affiliated with the religion of", "Islam"),),
                   "counterfact"),
        EditRecord("2", "Toko Yasuda", "{}, the", "piano", "guitar", ("Toko Yasuda plays the",), (), "counterfact"),
    ]
    stream = ws.root / f"{name}-stream.jsonl"
    write_canonical(stream, "edits", records)
    probes = {}
    for probe, lines in zip(EDIT_PROBES, (['{"question": "What is the capital of France?", "answer": "Paris"}',
                                           '{"question": "What is the capital of Italy?", "answers": ["Rome", "Roma"]}'],
                                          ['{"question": "Who wrote Emma?", "answer": "Jane Austen"}'])):
        probes[probe] = ws.root / f"{name}-probe-{probe}.jsonl"
        probes[probe].write_text("\n".join(lines) + "\n")
    config = FinetuneConfig(method="sparse", top_t=16, batch_size=4, steps_per_fact=1, eval_every=1)
    run_finetune(ws.model("micro"), ws.run(name), config, stream=stream, forget_eval=probes, prompt_format="completion", progress=False)
    return ws.run(name)
