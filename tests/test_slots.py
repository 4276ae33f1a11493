"""One slot across a trace and a run: co-accessed slots and reads of token rows against brute-force
scans of the accesses table, selection history against the stored steps, value-norm history against
the memory rebuilt from the run's deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smviz.analysis.runs import Run
from smviz.analysis.slots import co_accessed, selection_history, value_norm_history
from smviz.data.tokenizer import train_tokenizer
from smviz.data.world import WorldConfig
from smviz.errors import ConfigError, TraceError
from smviz.model import MemoryModel
from smviz.workspace.stages import background_stats, build_data, load_data, run_finetune
from smviz.record import read_documents, record_texts
from smviz.train.finetune import FinetuneConfig
from smviz.workspace import Workspace


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("slots") / "ws")
    build_data(ws.data, WorldConfig(n_known=4, n_bio_only=1, n_new=3))
    data = load_data(ws.data)
    texts = [a.text for a in data.corpus_train[:100]] + data.training_world_texts(copies=2, seed=0)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=400)
    model.tokenizer = train_tokenizer(texts, vocab_size=400)
    model.save_pretrained(ws.model("m"))
    background_stats(ws, ws.model("m"), n_batches=4, batch_size=4, seq_len=32, progress=False)
    model = MemoryModel.from_pretrained(ws.model("m"))
    docs, source = read_documents(ws.data / "facts-new.jsonl")
    trace = record_texts(model, docs, ws.trace("new"), source=source, progress=False)
    config = FinetuneConfig(method="sparse", top_t=8, batch_size=4, steps_per_fact=2, eval_every=2)
    run_finetune(ws.model("m"), ws.run("r"), config, stream=ws.data / "facts-new.jsonl", known=ws.data / "facts-known.jsonl",
                 heldout=ws.data / "corpus-heldout.jsonl", max_facts=2, known_facts=2, heldout_rows=1, progress=False)
    return ws, trace, Run(ws.run("r"))


def test_reads_of_rows_and_co_accessed_match_brute_force(setting):
    _, trace, _ = setting
    index = trace.slot_index()
    acc = trace.to_pandas()
    rows = np.array([5, 0, 17, 5, trace.n_tokens - 1])
    got = index.reads_of_rows(rows)
    expected = acc[acc["token"].isin(rows)]
    assert got["row"].tolist() == expected["token"].tolist() and got["slot"].tolist() == expected["slot"].tolist()
    assert np.array_equal(got["weight"].to_numpy(), expected["weight"].to_numpy())
    with pytest.raises(TraceError, match="token rows"):
        index.reads_of_rows([trace.n_tokens])

    slot = int(acc["slot"].value_counts().index[0])
    co = co_accessed(index, slot, readers=30, top=5)
    readers = index.contexts(slot, n=30, window=0)["row"]
    others = acc[acc["token"].isin(readers) & (acc["slot"] != slot)]
    counts = others["slot"].value_counts()
    brute = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert list(zip(co["slot"], co["co_reads"])) == brute
    np.testing.assert_allclose(co["share"], [c / len(others) for _, c in brute])


def test_selection_history_is_every_stored_selection(setting):
    _, _, run = setting
    history = selection_history(run)
    steps = run.steps
    assert len(history) == sum(len(s) for s in steps["selected"])
    first = history[history["step"] == 1]
    assert first["slot"].tolist() == [int(x) for x in steps[steps["step"] == 1]["selected"].iloc[0]]


def test_value_norm_history_follows_the_deltas(setting):
    ws, _, run = setting
    layer = run.layers[0]
    slot = int(run.steps["selected"].iloc[0][0])  # trained at step 1
    base = MemoryModel.from_pretrained(ws.model("m"))
    history = value_norm_history(run, base, slot)
    last = int(run.steps["step"].max())
    assert history["step"].tolist() == list(range(0, last + 1)) and bool(history["changed"].iloc[1])
    for step in (0, 1, last):
        rebuilt = run.rebuild(MemoryModel.from_pretrained(ws.model("m")), step)
        expected = float(rebuilt.memory_layers[layer].value_table.weight[slot].detach().float().norm())
        assert history.loc[history["step"] == step, "norm"].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="out of range"):
        value_norm_history(run, base, 10**6)
    other = MemoryModel.from_preset("micro", seed=3, vocab_size=400)
    other.model_hash = "0" * 16
    with pytest.raises(Exception, match="started from model"):
        value_norm_history(run, other, slot)
    assert torch.equal(base.memory_layers[layer].value_table.weight,
                       MemoryModel.from_pretrained(ws.model("m")).memory_layers[layer].value_table.weight)
