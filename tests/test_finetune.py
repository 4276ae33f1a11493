"""Finetuning: row selection against hand numbers and brute force (TF-IDF, tf-only, memory-all,
random-t), padding never counted (against an independent AccessRecorder count), a sparse SGD / AdamW
step changes exactly the selected value rows and nothing else (by -lr·grad against a separate dense
backward; AdamW against per-row torch AdamW, and dense torch AdamW measurably moving unselected rows),
LoRA trains only adapters, the run directory is complete and a resumed run equals an uninterrupted
one bit for bit, and bad CLI input exits 2 writing nothing.

The model is the micro preset with memory layers at blocks 0 and 1 (so everything "per layer" is
exercised with two layers) and background statistics from a few corpus batches."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch

from smviz.cli import main
from smviz.data.corpus import write_corpus
from smviz.data.tokenizer import pack_documents, train_tokenizer
from smviz.data.world import WorldConfig
from smviz.errors import ConfigError, RunError, SmvizError
from smviz.model import MemoryModel
from smviz.workspace.layout import CORPUS_FILES
from smviz.workspace.stages import build_data, load_data
from smviz.record import AccessRecorder
from smviz.stats import STATS_FILE, SlotStats, collect_stats, top_slots
from smviz.train import EvalSets, FinetuneConfig, FinetuneRunDir, RowSelector, Stream, Trainer, finetune, get_method
from smviz.train.lora import DEFAULT_TARGETS, MEMORY_TARGETS, adapted_weights
from smviz.train.rundir import STEP_SCHEMA
from smviz.workspace import Workspace

CPU = torch.device("cpu")
BLOCKS = (0, 1)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A micro workspace: a 3-person stream world (15 new facts), a small held-out corpus, a 400-token
    tokenizer, model 'm' (memory at blocks 0 and 1) with background statistics and the same model
    without them ('nostats')."""
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    build_data(ws.data, WorldConfig(n_known=4, n_bio_only=1, n_new=3))
    data = load_data(ws.data)
    write_corpus(ws.data / CORPUS_FILES["heldout"], data.corpus_heldout[:20])  # small: cheap NLL rows
    texts = [a.text for a in data.corpus_train[:40]] + data.training_world_texts(copies=1, seed=0)
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer), layers=BLOCKS)
    model.tokenizer = tokenizer
    model.save_pretrained(ws.model("m"))
    model.save_pretrained(ws.model("nostats"))
    model = MemoryModel.from_pretrained(ws.model("m"))
    rows = pack_documents(tokenizer, [a.text for a in data.corpus_train[40:120]], 32)[:64]
    stats = collect_stats(model, [{"input_ids": rows[i : i + 4]} for i in range(0, len(rows), 4)])
    stats.save_to_model_dir(ws.model("m"))
    return ws


@pytest.fixture(scope="module")
def world(ws):
    return load_data(ws.data).world


def load(ws, device: torch.device = CPU) -> tuple[MemoryModel, SlotStats]:
    model = MemoryModel.from_pretrained(ws.model("m"), device=device)
    return model, SlotStats.load_for_model(ws.model("m"), model)


def value_keys(model: MemoryModel) -> dict[str, int]:
    """state_dict name of each memory layer's value table → its block."""
    return {name: block for name, p in model.named_parameters() for block, layer in model.memory_layers.items()
            if p is layer.value_table.weight}


def to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(trainer: Trainer, batch: dict[str, torch.Tensor], step: int):
    """`Trainer.step` → (loss, selections per layer, gradient norms per layer or None when not reported)."""
    out = trainer.step(batch, step)
    return out[0], out[1], (out[2] if len(out) > 2 else None)


def snapshot(model: MemoryModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    return set(torch.nonzero((a != b).any(dim=1)).flatten().tolist())


def recorded_counts(model: MemoryModel, batch: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """Reads per slot of each memory layer over the batch's real tokens, counted by an AccessRecorder on
    an independent copy of the model."""
    ref = copy.deepcopy(model)
    with torch.no_grad(), AccessRecorder(ref) as rec:
        ref(**batch)
    trace = rec.trace()
    assert trace.n_tokens == int(batch["attention_mask"].sum())
    return {block: trace.slot_counts(block) for block in model.memory_layers}


def all_position_counts(model: MemoryModel, batch: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """Reads per slot counting padding positions too (what a selector must NOT see)."""
    out: dict[int, np.ndarray] = {}

    def hook(block):
        def fn(layer, indices, weights, mask):
            out[block] = np.bincount(indices.detach().reshape(-1).cpu().numpy(), minlength=layer.config.n_slots)
        return fn

    ref = copy.deepcopy(model)
    handles = [layer.add_access_hook(hook(b)) for b, layer in ref.memory_layers.items()]
    with torch.no_grad():
        ref(**batch)
    for h in handles:
        h.remove()
    return out


def dense_value_grads(model: MemoryModel, batch: dict[str, torch.Tensor]) -> tuple[float, dict[int, torch.Tensor]]:
    """Loss and dLoss/dV of every value table from an ordinary forward/backward of a copy of the model
    in which only the value tables require grad (the whole (N, v_dim) gradient)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    tables = {b: layer.value_table.weight for b, layer in ref.memory_layers.items()}
    for w in tables.values():
        w.requires_grad_(True)
    loss = ref(**batch).loss
    loss.backward()
    return loss.item(), {b: w.grad.detach().clone() for b, w in tables.items()}


def eval_sets(ws, tokenizer, facts) -> EvalSets:
    data = load_data(ws.data)
    rows = pack_documents(tokenizer, [a.text for a in data.corpus_heldout], 32)[:2]
    return EvalSets(facts, data.world.known[:4], rows, sources={"test": "micro workspace"})


def run(ws, run_dir: Path, config: FinetuneConfig, n_facts: int = 5, stop_after: int | None = None, device: torch.device = CPU):
    """One finetune call as a fresh process would make it: the model loaded from disk."""
    model, stats = load(ws, device)
    facts = load_data(ws.data).world.new[:n_facts]
    stream = Stream(facts, model.tokenizer, config.batch_size, config.steps_per_fact, config.composition, config.seed)
    return finetune(model, stream, config=config, run_dir=run_dir, eval_sets=eval_sets(ws, model.tokenizer, facts),
                    stats=stats if config.sparse else None, progress=False, stop_after=stop_after)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- selection rules


def test_sparse_selection_is_tfidf_by_hand():
    df = [3, 1, 0, 0, 1, 4]
    background = SlotStats((1,), 6, "batch", torch.tensor([df]) * 5, torch.tensor([df]), n_docs=4)
    counts = torch.tensor([4, 2, 0, 3, 2, 0])
    # Σc = 11, idf = ln(5 / (df + 1)):
    #   slot 0: 4/11 · ln(5/4) = 0.0811431   slot 1: 2/11 · ln(5/2) = 0.1665983
    #   slot 3: 3/11 · ln(5/1) = 0.4389376   slot 4: 2/11 · ln(5/2) = 0.1665983 (tie with slot 1: lower id first)
    #   slot 2 (df 0, the highest idf) and slot 5 were not read
    hand = {0: 4 / 11 * math.log(5 / 4), 1: 2 / 11 * math.log(5 / 2), 3: 3 / 11 * math.log(5), 4: 2 / 11 * math.log(5 / 2)}
    assert [round(hand[i], 7) for i in (0, 1, 3, 4)] == [0.0811431, 0.1665983, 0.4389376, 0.1665983]
    sel = RowSelector("sparse", 3, 6, background, CPU).select(1, counts, step=0)
    assert sel.rows.tolist() == [3, 1, 4]
    assert sel.score.tolist() == pytest.approx([hand[3], hand[1], hand[4]], rel=1e-12)
    assert sel.tf.tolist() == pytest.approx([3 / 11, 2 / 11, 2 / 11], rel=1e-15)
    assert sel.df.tolist() == [0, 1, 1] and sel.accessed == 4
    ids, scores = top_slots(counts, background, 1, 3)
    assert torch.equal(sel.rows, ids) and torch.equal(sel.score, scores)
    every = RowSelector("sparse", 6, 6, background, CPU).select(1, counts, step=0)
    assert every.rows.tolist() == [3, 1, 4, 0]  # t larger than the reads: all read slots, ranked
    assert torch.equal(every.rows, top_slots(counts, background, 1, 6)[0])
    # the reranking matters: by count alone slot 0 would come first
    assert RowSelector("tf-only", 3, 6, background, CPU).select(1, counts, step=0).rows.tolist() == [0, 3, 1]


def test_selector_refuses_bad_settings():
    background = SlotStats((1,), 6, "batch", torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long), n_docs=2)
    with pytest.raises(ConfigError, match="unknown method 'tfidf'"):
        RowSelector("tfidf", 3, 6, background, CPU)
    for t in (0, 7):
        with pytest.raises(ConfigError, match="top_t must lie in"):
            RowSelector("sparse", t, 6, background, CPU)
    with pytest.raises(ConfigError, match="background slot statistics"):
        RowSelector("sparse", 3, 6, None, CPU)
    RowSelector("memory-all", 10**6, 6, None, CPU)  # memory-all takes every read slot, whatever t is


def test_count_based_selections_against_brute_force():
    rng = np.random.default_rng(0)
    n = 64
    background = SlotStats((2,), n, "batch", torch.ones(1, n, dtype=torch.long),
                           torch.from_numpy(rng.integers(1, 9, (1, n))), n_docs=8)
    for trial in range(12):
        c = rng.integers(0, 5, n) * (rng.random(n) < 0.5)  # many ties
        counts = torch.from_numpy(c)
        read = [i for i in range(n) if c[i] > 0]
        total = int(c.sum())
        by_count = sorted(read, key=lambda i: (-c[i], i))  # count descending, ties to the lower id
        t = int(rng.integers(1, len(read) + 4))

        tf_only = RowSelector("tf-only", t, n, None, CPU).select(2, counts, step=trial)
        assert tf_only.rows.tolist() == by_count[:t], trial
        assert tf_only.tf.tolist() == pytest.approx([c[i] / total for i in by_count[:t]], rel=1e-15)
        assert torch.equal(tf_only.score, tf_only.tf) and tf_only.df.tolist() == [-1] * len(tf_only.rows)
        assert tf_only.accessed == len(read)
        with_df = RowSelector("tf-only", t, n, background, CPU).select(2, counts, step=trial)
        assert torch.equal(with_df.rows, tf_only.rows)  # background df is reported, not used
        assert with_df.df.tolist() == background.df[0, by_count[:t]].tolist()

        every = RowSelector("memory-all", 1, n, None, CPU).select(2, counts, step=trial)
        assert every.rows.tolist() == by_count and every.accessed == len(read)

        rnd = RowSelector("random-t", t, n, None, CPU, seed=5).select(2, counts, step=trial)
        rows = rnd.rows.tolist()
        assert len(rows) == min(t, len(read)) == len(set(rows)) and set(rows) <= set(read)
        assert rnd.tf.tolist() == pytest.approx([c[i] / total for i in rows], rel=1e-15)


def test_random_t_is_uniform_over_read_slots_and_seeded_by_seed_and_step():
    n, t = 40, 5
    counts = torch.zeros(n, dtype=torch.long)
    read = list(range(0, n, 2))
    counts[read] = 1
    counts[0] = 1000  # random-t ignores how often a slot was read

    def pick(seed, step):
        return RowSelector("random-t", t, n, None, CPU, seed=seed).select(1, counts, step).rows.tolist()

    assert pick(3, 17) == pick(3, 17)  # a new selector, the same (seed, step): the same rows
    assert len({tuple(pick(0, s)) for s in range(30)}) >= 28
    assert any(pick(0, s) != pick(1, s) for s in range(5))
    chosen = np.zeros(n, dtype=int)
    for step in range(400):
        chosen[pick(0, step)] += 1
    assert chosen[1::2].sum() == 0 and chosen.sum() == 400 * t
    # each of the 20 read slots is expected 100 times; a biased rule (e.g. the top counts) lands far outside
    assert chosen[read].min() >= 60 and chosen[read].max() <= 140, chosen[read]


# --------------------------------------------------------------------------- one step


@pytest.mark.parametrize("method", ["sparse", "tf-only", "memory-all"])
def test_selection_inside_the_step_counts_real_tokens_only(ws, world, method, device):
    model, stats = load(ws, device)
    batch = to(Stream(world.new, model.tokenizer, batch_size=6, composition="statements+qa").batch(1), device)
    assert (batch["attention_mask"] == 0).sum() >= 10  # plenty of padding
    real = recorded_counts(model, batch)
    padded = all_position_counts(model, batch)
    t = 12
    trainer = Trainer(model, FinetuneConfig(method=method, top_t=t).resolved(), stats, device)
    _, selections, _ = train_step(trainer, batch, 0)
    assert set(selections) == set(BLOCKS)
    for block, sel in selections.items():
        c = real[block]
        assert not np.array_equal(c, padded[block])  # counting padding would change the counts
        read = [i for i in range(len(c)) if c[i] > 0]
        by_count = sorted(read, key=lambda i: (-c[i], i))
        assert sel.accessed == len(read)
        assert sel.tf.tolist() == pytest.approx([c[i] / c.sum() for i in sel.rows.tolist()], rel=1e-12)
        if method == "sparse":
            ids, scores = top_slots(torch.from_numpy(c), stats, block, t)
            assert sel.rows.tolist() == ids.tolist()
            assert sel.score.tolist() == pytest.approx(scores.tolist(), rel=1e-12)
            assert sel.df.tolist() == stats.df[stats.layer_index(block), ids].tolist()
        elif method == "tf-only":
            assert sel.rows.tolist() == by_count[:t]
        else:
            assert sel.rows.tolist() == by_count


def test_sparse_sgd_step_changes_exactly_the_selected_rows_by_minus_lr_grad(ws, world, device):
    model, stats = load(ws, device)
    batch = to(Stream(world.new, model.tokenizer, batch_size=4).batch(2), device)
    ref_loss, grads = dense_value_grads(model, batch)
    before = snapshot(model)
    lr, t = 0.5, 12
    trainer = Trainer(model, FinetuneConfig(method="sparse", top_t=t, lr=lr).resolved(), stats, device)
    loss, selections, grad_norms = train_step(trainer, batch, 0)
    assert loss == ref_loss  # selecting inside the forward pass does not change it
    after = model.state_dict()
    values = value_keys(model)
    assert after.keys() == before.keys() and len(values) == 2
    for key in before:
        if key not in values:
            assert torch.equal(after[key], before[key]), key
    for key, block in values.items():
        rows = selections[block].rows
        assert len(rows) == t
        assert changed_rows(before[key], after[key]) == set(rows.tolist())
        g = grads[block]
        assert len(torch.nonzero(g.abs().sum(1))) > t  # a dense step would have moved more rows
        torch.testing.assert_close(after[key][rows], before[key][rows] - lr * g[rows], rtol=1e-5, atol=1e-7)
        if grad_norms is not None:  # the reported norm is that of the selected rows' gradient
            assert grad_norms[block] == pytest.approx(torch.linalg.vector_norm(g[rows]).item(), rel=1e-5)
        assert (after[key][rows] - before[key][rows]).abs().max() > 1e-4  # the check above is not vacuous


def test_grad_norm_trains_the_read_rows_of_largest_dense_gradient(ws, world, device):
    model, _ = load(ws, device)
    batch = to(Stream(world.new, model.tokenizer, batch_size=4).batch(3), device)
    _, grads = dense_value_grads(model, batch)
    counts = recorded_counts(model, batch)
    before = snapshot(model)
    lr, t = 0.5, 7
    trainer = Trainer(model, FinetuneConfig(method="grad-norm", top_t=t, lr=lr).resolved(), None, device)
    _, selections, grad_norms = train_step(trainer, batch, 0)
    after = model.state_dict()
    for key, block in value_keys(model).items():
        g = grads[block]
        read = np.nonzero(counts[block])[0]
        norms = torch.linalg.vector_norm(g.double(), dim=1).cpu()
        # brute force: every read slot's dense gradient norm, the t largest (ties to the lower id)
        expected = sorted(read.tolist(), key=lambda i: (-norms[i].item(), i))[:t]
        assert len(read) > t and norms[expected[-1]] > norms[sorted(set(read.tolist()) - set(expected))].max()
        sel = selections[block]
        assert sel.rows.tolist() == expected and sel.accessed == len(read)
        assert sel.score.cpu().tolist() == pytest.approx(norms[expected].tolist(), rel=1e-5)
        assert changed_rows(before[key], after[key]) == set(expected)
        rows = sel.rows
        torch.testing.assert_close(after[key][rows], before[key][rows] - lr * g[rows], rtol=1e-5, atol=1e-7)
        assert grad_norms[block] == pytest.approx(torch.linalg.vector_norm(g[rows]).item(), rel=1e-5)


def test_sparse_adamw_leaves_unselected_rows_alone_where_dense_adamw_moves_them(ws, world, device):
    model, stats = load(ws, device)
    stream = Stream(world.new, model.tokenizer, batch_size=4)
    lr, wd, t = 1e-2, 0.1, 10
    config = FinetuneConfig(method="sparse", optimizer="adamw", top_t=t, lr=lr, weight_decay=wd).resolved()
    trainer = Trainer(model, config, stats, device)
    values = value_keys(model)
    start = snapshot(model)
    # references fed the same per-step gradients (zero outside the step's selection):
    # torch AdamW per row, stepped only when the row is selected ("lazy"), and torch AdamW on the whole table
    per_row: dict[tuple[int, int], tuple[torch.nn.Parameter, torch.optim.AdamW]] = {}
    dense = {}
    for name, decay in (("decay", wd), ("momentum only", 0.0)):
        for key, block in values.items():
            p = torch.nn.Parameter(start[key].clone())
            dense[name, block] = (p, torch.optim.AdamW([p], lr=lr, weight_decay=decay))
    moved_unselected = {"decay": 0, "momentum only": 0}
    chosen_before: dict[int, set[int]] = {b: set() for b in BLOCKS}
    for step in range(3):
        assert stream.item_index(step) == step  # a different fact each step
        batch = to(stream.batch(step), device)
        _, grads = dense_value_grads(model, batch)
        before = snapshot(model)
        _, selections, _ = train_step(trainer, batch, step)
        after = model.state_dict()
        for key in before:
            if key not in values:
                assert torch.equal(after[key], before[key]), key
        for key, block in values.items():
            rows = selections[block].rows.tolist()
            assert len(rows) == t and changed_rows(before[key], after[key]) == set(rows)
            for r in rows:
                if (block, r) not in per_row:
                    p = torch.nn.Parameter(before[key][r : r + 1].clone())
                    per_row[block, r] = (p, torch.optim.AdamW([p], lr=lr, weight_decay=wd))
                p, opt = per_row[block, r]
                p.grad = grads[block][r : r + 1].clone()
                opt.step()
            expected = torch.cat([per_row[block, r][0].detach() for r in rows])
            torch.testing.assert_close(after[key][rows], expected, rtol=1e-5, atol=1e-7)
            masked = torch.zeros_like(grads[block])
            masked[rows] = grads[block][rows]
            for name in moved_unselected:
                p, opt = dense[name, block]
                old = p.detach().clone()
                p.grad = masked.clone()
                opt.step()
                moved_unselected[name] += len(changed_rows(old, p.detach()) - set(rows))
            if step:
                # rows trained before but not now: dense AdamW's momentum still moves them
                assert chosen_before[block] - set(rows)
            chosen_before[block] |= set(rows)
    # the paper's warning, measured: dense AdamW moves rows outside the step's selection, by weight
    # decay (every row) and by momentum alone; the sparse AdamW moves none (asserted step by step above)
    assert moved_unselected["decay"] > 0 and moved_unselected["momentum only"] > 0
    final = model.state_dict()
    for key, block in values.items():
        assert changed_rows(start[key], final[key]) == chosen_before[block]


def test_lora_trains_only_adapter_weights(ws, world, device):
    model, _ = load(ws, device)
    base = snapshot(model)
    targets = {n.rsplit(".", 1)[-1] for n, m in model.lm.named_modules() if isinstance(m, torch.nn.Linear)} & set(DEFAULT_TARGETS)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}  # both FFNs are memory layers
    rank, alpha = 4, 8.0
    config = FinetuneConfig(method="lora", lr=1e-2, lora_rank=rank, lora_alpha=alpha).resolved()
    trainer = Trainer(model, config, None, device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainer.trainable) == trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == targets
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    stream = Stream(world.new, model.tokenizer, batch_size=4)
    for step in range(2):
        train_step(trainer, to(stream.batch(step), device), step)
    state = model.state_dict()
    base_names = set()
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.replace(".base_layer", "")
        base_names.add(name)
        assert torch.equal(value, base[name]), key
    assert base_names == set(base)  # every base tensor was compared
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert not torch.equal(p.detach(), adapters_before[n]), n
    # the final model folds the adapters in: W + alpha/r · B A, every other tensor as it was
    merged = trainer.final_model().state_dict()
    assert set(merged) == set(base)
    adapted = set()
    for key in base:
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            a = state[f"{module}.lora_A.default.weight"]
            b = state[f"{module}.lora_B.default.weight"]
            torch.testing.assert_close(merged[key], base[key] + alpha / rank * b @ a, rtol=1e-5, atol=1e-6)
            assert not torch.equal(merged[key], base[key])
            adapted.add(key)
        else:
            assert torch.equal(merged[key], base[key]), key
    assert len(adapted) == 2 * len(targets)


def test_full_finetuning_with_the_memory_frozen_or_its_values_at_their_own_rate(ws, world):
    model, _ = load(ws)
    batch = Stream(world.new, model.tokenizer, batch_size=4).batch(1)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    values = set(value_keys(model))
    memory = {n for n, _ in model.named_parameters() if any(n.startswith(prefix) for prefix in memory_prefixes(model))}
    assert values < memory and memory < set(grads)
    lr, mult = 0.1, 10.0
    for config in (FinetuneConfig(method="full", optimizer="sgd", lr=lr, value_lr_mult=mult),
                   FinetuneConfig(method="full", optimizer="sgd", lr=lr, freeze_memory=True)):
        m = copy.deepcopy(model)
        before = snapshot(m)
        train_step(Trainer(m, config.resolved(), None, CPU), batch, 0)
        after = dict(m.named_parameters())
        for name, g in grads.items():
            if config.freeze_memory and name in memory:
                assert torch.equal(after[name].detach(), before[name]), name
                continue
            step = lr * (mult if name in values else 1.0)
            torch.testing.assert_close(after[name].detach(), before[name] - step * g, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="settings of full finetuning, not of 'sparse'"):
        FinetuneConfig(method="sparse", value_lr_mult=10.0)
    with pytest.raises(ConfigError, match="settings of full finetuning, not of 'lora'"):
        FinetuneConfig(method="lora", freeze_memory=True)
    with pytest.raises(ConfigError, match="cannot be set with freeze_memory"):
        FinetuneConfig(method="full", value_lr_mult=10.0, freeze_memory=True)


def memory_prefixes(model: MemoryModel) -> list[str]:
    return [name + "." for name, module in model.named_modules() if module in set(model.memory_layers.values())]


def test_lora_adapts_the_memory_projections_when_asked(ws, world):
    model, _ = load(ws)
    base = snapshot(model)
    config = FinetuneConfig(method="lora", lr=1e-2, lora_rank=4, lora_targets=DEFAULT_TARGETS + MEMORY_TARGETS).resolved()
    trainer = Trainer(model, config, None, CPU)
    adapted = {n.split(".lora_")[0] for n in trainer.trainable}
    memory = memory_prefixes(model)
    in_memory = {a for a in adapted if any((a + ".").startswith(p) for p in memory)}
    assert {a.rsplit(".", 1)[-1] for a in in_memory} == set(MEMORY_TARGETS) and len(in_memory) == 3 * len(BLOCKS)
    stream = Stream(world.new, model.tokenizer, batch_size=4)
    for step in range(2):
        train_step(trainer, stream.batch(step), step)
    merged = trainer.final_model().state_dict()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {f"{a}.weight" for a in adapted}
    assert changed == {f"lm.{w}" for w in adapted_weights(trainer.final_model(), config.lora_targets)}  # what the audit allows


# --------------------------------------------------------------------------- the run directory


def test_sparse_run_directory_is_complete(ws, world, tmp_path, device):
    t = 8
    config = FinetuneConfig(method="sparse", top_t=t, batch_size=4, steps_per_fact=1, eval_every=2).resolved()
    run_dir = tmp_path / "run"
    summary = run(ws, run_dir, config, device=device)
    facts = world.new[:5]
    base, stats = load(ws)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "deltas", "metrics.jsonl", "model", "questions.jsonl",
                                                         "steps.parquet", "stream.jsonl", "summary.json"]

    identity = json.loads((run_dir / "config.json").read_text())
    assert identity["format"] == "smviz-finetune/1" and identity["config"] == config.to_dict()
    assert (identity["config"]["optimizer"], identity["config"]["lr"], identity["config"]["weight_decay"]) == ("sgd", get_method("sparse").default_lr["sgd"], 0.0)
    assert identity["base_model_hash"] == base.model_hash == identity["stats"]["model_hash"]
    assert identity["stream"]["ids"] == [f.id for f in facts] and identity["stream"]["kind"] == "facts"
    from smviz.data.facts import Fact
    assert [Fact.from_dict(d) for d in FinetuneRunDir(run_dir).stream()] == facts  # stream.jsonl: the items, canonical

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [0, 2, 4, 5] and [m["facts_seen"] for m in metrics] == [0, 2, 4, 5]
    assert metrics[0]["learn_em"] is None and all(m["heldout_nll"] > 0 for m in metrics)
    # questions.jsonl: every question's score behind the means, the last ones those of the saved model asked afresh
    from smviz.analysis import Run
    from smviz.evaluate import answer_questions

    questions = Run(run_dir).questions
    assert sorted(questions["step"].unique()) == [0, 2, 4, 5] and set(questions["set"]) == {"stream", "known"}
    for m in metrics:
        at = questions[questions["step"] == m["step"]]
        for name in ("stream", "known"):
            assert at[at["set"] == name]["em"].mean() == pytest.approx(m[f"{name}_em"], abs=1e-12)
            assert at[at["set"] == name]["f1"].mean() == pytest.approx(m[f"{name}_f1"], abs=1e-12)
    final_rows = answer_questions(MemoryModel.from_pretrained(run_dir / "model", device=device), world.known[:4])
    last = questions[(questions["step"] == 5) & (questions["set"] == "known")]
    assert last["id"].tolist() == [f"{r['fact_id']}/{r['template']}" for r in final_rows]
    assert last["em"].tolist() == [float(r["em"]) for r in final_rows]

    table = pq.read_table(run_dir / "steps.parquet")
    assert table.schema.names == STEP_SCHEMA.names
    rows = table.to_pylist()
    assert [(r["step"], r["layer"]) for r in rows] == list(product(range(1, 6), BLOCKS))
    for r in rows:
        assert r["fact_id"] == facts[r["step"] - 1].id and r["fact_index"] == r["step"] - 1
        assert len(r["selected"]) == len(r["tf"]) == len(r["df"]) == len(r["score"]) == t <= r["accessed"]
        assert r["score"] == sorted(r["score"], reverse=True) and r["loss"] > 0
        if "grad_norm" in r:
            assert r["grad_norm"] > 0
    # step 1 selected the top-t by TF-IDF of what the base model read for batch 0 (real tokens only)
    stream = Stream(facts, base.tokenizer, batch_size=4, composition=config.composition)
    counts = recorded_counts(load(ws, device)[0], to(stream.batch(0), device))  # on the run's device
    for r in rows[:2]:
        c = counts[r["layer"]]
        assert r["accessed"] == int((c > 0).sum())
        ids, scores = top_slots(torch.from_numpy(c), stats, r["layer"], t)
        assert r["selected"] == ids.tolist()
        assert r["score"] == pytest.approx(scores.tolist(), rel=1e-6)
        assert r["df"] == stats.df[stats.layer_index(r["layer"]), ids].tolist()

    deltas = sorted(p.name for p in (run_dir / "deltas").iterdir())
    assert deltas == [f"step-{s:06d}.safetensors" for s in range(1, 6)]
    final = MemoryModel.from_pretrained(run_dir / "model")
    assert final.model_hash == summary["model_hash"] != base.model_hash
    # the base model plus deltas 1..5 is the saved model, every tensor bit for bit
    rebuilt = snapshot(base)
    keys = value_keys(base)
    for s in range(1, 6):
        delta = safetensors.torch.load_file(run_dir / "deltas" / f"step-{s:06d}.safetensors")
        assert set(delta) == {f"{k}.{b}" for k in ("rows", "values") for b in BLOCKS}
        for key, block in keys.items():
            step_rows = next(r for r in rows if r["step"] == s and r["layer"] == block)
            assert delta[f"rows.{block}"].tolist() == sorted(step_rows["selected"])
            rebuilt[key][delta[f"rows.{block}"]] = delta[f"values.{block}"]
    final_state = final.state_dict()
    assert final_state.keys() == rebuilt.keys()
    for key in rebuilt:
        assert torch.equal(final_state[key], rebuilt[key]), key
    assert any(not torch.equal(final_state[k], base.state_dict()[k]) for k in keys)

    assert json.loads((run_dir / "summary.json").read_text()) == summary
    m = summary["metrics"]
    assert m["learning_em"]["start"] == metrics[0]["stream_em"] and m["learning_em"]["end"] == metrics[-1]["learn_em"]
    assert m["known_em"] == {"start": metrics[0]["known_em"], "end": metrics[-1]["known_em"],
                             "relative_drop": m["known_em"]["relative_drop"]}
    assert (m["heldout_nll"]["start"], m["heldout_nll"]["end"]) == (metrics[0]["heldout_nll"], metrics[-1]["heldout_nll"])
    assert m["heldout_nll"]["change"] == pytest.approx(metrics[-1]["heldout_nll"] - metrics[0]["heldout_nll"])
    assert (summary["steps"], summary["facts"], summary["base_model_hash"]) == (5, 5, base.model_hash)
    assert summary["trainable_per_step"] == t * 64 * len(BLOCKS) and summary["optimizer_state_elements"] == 0
    # a finished run is not run again
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run(ws, run_dir, config, device=device) == summary
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def assert_same_run(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert read_metrics(a) == read_metrics(b)
    assert pq.read_table(a / "steps.parquet").to_pylist() == pq.read_table(b / "steps.parquet").to_pylist()
    for name in ("config.json", "summary.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    for rel in files_a:
        if rel.suffix == ".safetensors":
            x, y = safetensors.torch.load_file(a / rel), safetensors.torch.load_file(b / rel)
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]), (rel, k)
    assert MemoryModel.from_pretrained(a / "model").model_hash == MemoryModel.from_pretrained(b / "model").model_hash


@pytest.mark.parametrize("config", [
    FinetuneConfig(method="sparse", top_t=8, batch_size=4, steps_per_fact=1, eval_every=2),
    FinetuneConfig(method="sparse", optimizer="adamw", top_t=8, batch_size=4, steps_per_fact=1, eval_every=2),
    FinetuneConfig(method="full", batch_size=4, steps_per_fact=1, eval_every=2),
    FinetuneConfig(method="lora", lora_rank=2, batch_size=4, steps_per_fact=1, eval_every=2),
], ids=["sparse-sgd", "sparse-adamw", "full-adamw", "lora"])
def test_resumed_run_equals_uninterrupted_run(ws, tmp_path, config, device):
    whole = run(ws, tmp_path / "whole", config, device=device)
    assert whole is not None
    out = tmp_path / "resumed"
    # interrupted before the first resume point (step 2): starts over
    assert run(ws, out, config, stop_after=1, device=device) is None
    assert not (out / "summary.json").exists() and [m["step"] for m in read_metrics(out)] == [0]
    # interrupted after step 3, resume point step 2: step 3 runs again
    assert run(ws, out, config, stop_after=3, device=device) is None
    assert [m["step"] for m in read_metrics(out)] == [0, 2]
    assert (out / "state" / "trainer.json").is_file()
    if config.sparse:
        assert (out / "deltas" / "step-000003.safetensors").is_file()
    resumed = run(ws, out, config, device=device)
    assert resumed == whole
    assert not (out / "state").exists()
    assert_same_run(tmp_path / "whole", out)
    if not config.sparse:
        assert not (out / "deltas").exists()
        assert all(r["selected"] == [] and r["accessed"] > 0 for r in pq.read_table(out / "steps.parquet").to_pylist())


def test_other_run_in_the_run_directory_is_refused(ws, tmp_path):
    config = FinetuneConfig(method="tf-only", top_t=8, batch_size=4, steps_per_fact=1, eval_every=2)
    out = tmp_path / "run"
    assert run(ws, out, config, n_facts=2) is not None
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SmvizError, match="holds another run"):
        run(ws, out, FinetuneConfig(method="tf-only", top_t=9, batch_size=4, steps_per_fact=1, eval_every=2), n_facts=2)
    with pytest.raises(SmvizError, match="holds another run"):
        run(ws, out, config, n_facts=3)  # another stream
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SmvizError, match="not a finetuning run"):
        run(ws, other, config, n_facts=2)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- the command line


def cli_args(ws, out: Path, *extra: str, model: str = "m") -> list[str]:
    return ["finetune", "--model", str(ws.model(model)), "--out", str(out), "--workspace", str(ws.root),
            "--known-facts", "4", "--heldout-rows", "2", "--max-facts", "3", "--batch-size", "4", "--top-t", "8",
            "--eval-every", "2", "--steps-per-fact", "1", "--device", "cpu", *extra]


def test_cli_runs_and_refuses_another_config_in_its_run_dir(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(ws, out, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sparse" and summary["steps"] == 3 and summary["facts"] == 3
    assert MemoryModel.from_pretrained(out / "model").model_hash == summary["model_hash"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(cli_args(ws, out, "--lr", "1.0")) == 2
    err = capsys.readouterr().err
    assert "smviz finetune: error:" in err and "holds another run" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(cli_args(ws, out)) == 0  # the same run again: its summary, nothing rewritten
    assert "sparse: 3 facts, 3 steps" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_bad_input_exits_2_and_writes_nothing(ws, tmp_path, capsys):
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "malformed.jsonl").write_text('{"id": "x", "subject": \n')
    (bad / "empty.jsonl").write_text("")
    (bad / "latin1.jsonl").write_bytes('{"id": "Jos\xe9"}\n'.encode("latin-1"))
    cases = [
        (["--facts", str(bad / "malformed.jsonl")], "malformed.jsonl, line 1"),
        (["--facts", str(bad / "empty.jsonl")], "holds no records"),
        (["--facts", str(bad / "latin1.jsonl")], "is not UTF-8"),
        (["--known", str(bad / "empty.jsonl")], "holds no facts"),
        (["--top-t", "0"], "top_t must be >= 1"),
        (["--top-t", "257"], "larger than the memory (256 slots)"),
        (["--method", "dense"], "choose one of sparse, tf-only, memory-all, random-t, kl, grad-norm, sparse-tf-ties, full, lora"),
        (["--background", str(bad / "nowhere.safetensors")], "unknown background"),
        (["--value-lr-mult", "10"], "settings of full finetuning, not of 'sparse'"),
        (["--lr", "0"], "lr must be a finite number"),
        (["--lr", "-0.5"], "lr must be a finite number"),
        (["--lr", "inf"], "lr must be a finite number"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--optimizer", "sgd", "--set", "weight_decay=0.1"], "weight decay is an AdamW setting"),
    ]
    model_files = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()}
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code = main(cli_args(ws, out, *extra))
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert not out.exists(), extra
    # sparse needs the model's background statistics, and says how to make them
    out = tmp_path / "nostats"
    assert main(cli_args(ws, out, model="nostats")) == 2
    err = capsys.readouterr().err
    assert "background statistics" in err and "smviz stats" in err and not out.exists()
    assert not (ws.model("nostats") / STATS_FILE).exists()
    assert {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()} == model_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_cli_stream_slice_and_stream_background(ws, tmp_path, capsys):
    from smviz.data.facts import read_facts

    out = tmp_path / "slice"
    assert main(cli_args(ws, out, "--first-fact", "1", "--background", "stream", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    identity = json.loads((out / "config.json").read_text())
    assert identity["stream"]["ids"] == [f.id for f in read_facts(ws.data / "facts-new.jsonl")[1:4]]
    assert identity["stats"]["protocol"]["source"] == "stream" and identity["stats"]["protocol"]["n_batches"] == summary["steps"]
    bad = tmp_path / "bad"
    assert main(cli_args(ws, bad, "--first-fact", "999")) == 2
    assert "none from number 999 on" in capsys.readouterr().err and not bad.exists()


def test_cli_background_from_a_statistics_file(ws, tmp_path, capsys):
    model = MemoryModel.from_pretrained(ws.model("m"))
    data = load_data(ws.data)
    rows = pack_documents(model.tokenizer, [a.text for a in data.corpus_train[120:200]], 32)[:16]
    control = collect_stats(model, [{"input_ids": rows[i : i + 4]} for i in range(0, len(rows), 4)],
                            protocol={"source": "a control background"})
    path = control.save(tmp_path / "control.safetensors")
    assert not torch.equal(control.df, SlotStats.load_for_model(ws.model("m"), model).df)
    out = tmp_path / "controlled"
    assert main(cli_args(ws, out, "--background", str(path))) == 0
    capsys.readouterr()
    identity = json.loads((out / "config.json").read_text())
    assert identity["stats"]["protocol"] == {"source": "a control background", "n_batches": 4, "unit": "batch"}
    steps = pq.read_table(out / "steps.parquet").to_pandas()
    for _, row in steps.iterrows():  # every selected row's df is the control's
        layer = control.layer_index(int(row["layer"]))
        assert row["df"].tolist() == control.df[layer][torch.as_tensor(row["selected"]).long()].tolist()


def test_row_adamw_state_grows_without_changing_results():
    """3 steps of 800 new rows each outgrow the first 1,024-row buffers twice: the weights must equal
    an optimizer whose buffers never grew, and a state_dict round trip must continue identically."""
    from smviz.train.row_optim import RowAdamW

    g = torch.Generator().manual_seed(0)
    n, v_dim = 5000, 8
    steps = [(torch.randperm(n, generator=g)[:800], torch.randn(800, v_dim, generator=g)) for _ in range(4)]
    w_grown = torch.randn(n, v_dim, generator=g)
    w_reserved = w_grown.clone()
    grown = RowAdamW(n, v_dim, 0.01, weight_decay=0.1)
    reserved = RowAdamW(n, v_dim, 0.01, weight_decay=0.1)
    reserved._reserve(n)
    for rows, grad in steps[:3]:
        grown.step(w_grown, rows, grad)
        reserved.step(w_reserved, rows, grad)
    assert torch.equal(w_grown, w_reserved) and grown.used == reserved.used == len(torch.cat([s[0] for s in steps[:3]]).unique())
    restored = RowAdamW(n, v_dim, 0.01, weight_decay=0.1)
    restored.load_state_dict(grown.state_dict())
    w_restored = w_grown.clone()
    rows, grad = steps[3]
    grown.step(w_grown, rows, grad)
    restored.step(w_restored, rows, grad)
    assert torch.equal(w_grown, w_restored)
    assert grown.state_elements() == n + grown.used * (2 * v_dim + 2)


# --------------------------------------------------------------------------- kl, divergence, LoRA on GPT-2


def test_cli_method_kl_runs_and_selects_by_kl(ws, world, tmp_path, capsys):
    out = tmp_path / "kl"
    assert main(cli_args(ws, out, "--method", "kl", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "kl" and summary["steps"] == 3 and summary["trainable_per_step"] == 8 * 64 * len(BLOCKS)
    assert MemoryModel.from_pretrained(out / "model").model_hash == summary["model_hash"]
    assert sorted(p.name for p in (out / "deltas").iterdir()) == [f"step-{s:06d}.safetensors" for s in (1, 2, 3)]
    # step 1 chose the top 8 read slots by p·log(p/q), computed here from an independent count
    model, stats = load(ws)
    config = FinetuneConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
    stream = Stream(world.new[:3], model.tokenizer, config.batch_size, config.steps_per_fact, config.composition, config.seed)
    counts = recorded_counts(model, stream.batch(0))
    rows = [r for r in pq.read_table(out / "steps.parquet").to_pylist() if r["step"] == 1]
    assert len(rows) == len(BLOCKS)
    for r in rows:
        c, bg = counts[r["layer"]], stats.counts[stats.layer_index(r["layer"])].numpy()
        total, bg_total, n = c.sum(), bg.sum(), len(c)
        score = {i: c[i] / total * math.log((c[i] / total) / ((bg[i] + 1) / (bg_total + n))) for i in range(n) if c[i] > 0}
        expected = sorted(score, key=lambda i: (-score[i], i))[:8]
        assert r["selected"] == expected
        assert r["score"] == pytest.approx([score[i] for i in expected], rel=1e-5)


def test_a_diverging_run_stops_without_finishing_and_its_json_stays_strict(ws, tmp_path):
    config = FinetuneConfig(method="full", optimizer="sgd", lr=1e30, batch_size=4, steps_per_fact=1, eval_every=1)
    out = tmp_path / "diverged"
    with pytest.raises(RunError, match=r"step \d+: the training loss is (nan|inf).*not finite.*lower the learning rate"):
        run(ws, out, config)
    assert out.is_dir() and not (out / "summary.json").exists() and not (out / "model").exists()

    def refuse(constant):
        raise AssertionError(f"{constant} in a JSON file")

    files = [p for p in out.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert {p.name for p in files} >= {"config.json", "metrics.jsonl"}
    for p in files:
        for line in p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]:
            json.loads(line, parse_constant=refuse)
    with pytest.raises(RunError, match="not finite"):  # the same command again: the same clear stop, still unfinished
        run(ws, out, config)
    assert not (out / "summary.json").exists()


def test_lora_adapts_gpt2_conv1d_layers_and_the_audit_agrees(ws, world, tmp_path, device):
    from transformers.pytorch_utils import Conv1D

    from smviz.analysis import diff_models

    tokenizer = load(ws)[0].tokenizer
    gpt2 = MemoryModel.from_preset("micro-gpt2", seed=0, vocab_size=len(tokenizer))
    gpt2.tokenizer = tokenizer
    gpt2.save_pretrained(tmp_path / "gpt2")
    model = MemoryModel.from_pretrained(tmp_path / "gpt2", device=device)
    conv = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}  # GPT-2's projections: not nn.Linear
    assert {n.rsplit(".", 1)[-1] for n in conv} == {"c_attn", "c_proj", "c_fc"}
    base = snapshot(model)
    rank_, alpha = 4, 8.0
    config = FinetuneConfig(method="lora", lr=1e-2, lora_rank=rank_, lora_alpha=alpha).resolved()
    trainer = Trainer(model, config, None, device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0] for n in trainable} == conv  # every c_attn, c_proj, c_fc (memory blocks: no MLP)
    stream = Stream(world.new, model.tokenizer, batch_size=4)
    for step in range(2):
        train_step(trainer, to(stream.batch(step), device), step)
    state = model.state_dict()
    merged = trainer.final_model()
    after = merged.state_dict()
    assert set(after) == set(base)
    for key in base:
        module = key.rsplit(".", 1)[0]
        if module in conv and key.endswith(".weight"):
            a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
            # Conv1D keeps W as (in, out): the update is (B A)ᵀ
            torch.testing.assert_close(after[key], base[key] + alpha / rank_ * (b @ a).T, rtol=1e-5, atol=1e-6)
            assert not torch.equal(after[key], base[key])
        else:
            assert torch.equal(after[key], base[key]), key
    # the frozen-parameter audit allows exactly those weights and finds no violation
    before = MemoryModel.from_pretrained(tmp_path / "gpt2", device=device)
    audit = diff_models(before, merged, method="lora", lora_targets=config.lora_targets).audit
    changed = set(audit[audit["changed"] > 0]["parameter"])
    assert changed == {f"{m.removeprefix('lm.')}.weight" for m in conv} and not audit["violation"].any()
    assert audit[audit["parameter"].isin(changed)]["allowed"].all()
    assert set(diff_models(before, merged).violations["parameter"]) == changed  # allowed nothing: each is a violation


@pytest.mark.parametrize("method, flags", [("sparse", []), ("full", ["--optimizer", "adamw", "--lr", "1e-3"]),
                                           ("lora", ["--optimizer", "adamw", "--lr", "1e-2"])])
def test_two_torchrun_processes_train_what_one_process_trains(ws, tmp_path, method, flags):
    """Issue 19: under torchrun (gloo, 2 processes) each rank steps on half of every batch, read counts
    and gradients are summed, and the run equals one process's on the whole batch: the same rows
    selected at every step (sparse), the same evaluations, the same trained weights up to the order of
    float sums (the loss is a sum of two halves, not one mean)."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"run{procs}"
        launch = [sys.executable, "-m", "smviz"] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "smviz"]
        done = subprocess.run([*launch, *cli_args(ws, out, "--method", method, *flags, "--json")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == json.loads((out / "summary.json").read_text())  # printed once, by rank 0
        runs[procs] = out
    one, two = (FinetuneRunDir(runs[p]) for p in (1, 2))
    m1, m2 = one.metrics(), two.metrics()
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [0, 2, 3]
    assert m1[0] == m2[0]  # before training: the same model, evaluated once (rank 0)
    s1, s2 = (pq.read_table(r / "steps.parquet").to_pandas() for r in runs.values())
    assert s1["selected"].map(list).tolist() == s2["selected"].map(list).tolist()
    assert s1["accessed"].tolist() == s2["accessed"].tolist()  # the counts of the whole batch, on both ranks
    assert np.allclose(s1["loss"], s2["loss"], rtol=1e-5)
    if method == "sparse":
        assert all(len(s) == 8 for s in s1["selected"])
    w1 = MemoryModel.from_pretrained(runs[1] / "model").state_dict()
    w2 = MemoryModel.from_pretrained(runs[2] / "model").state_dict()
    base = MemoryModel.from_pretrained(ws.model("m")).state_dict()
    moved = [k for k in w1 if not torch.equal(w1[k], base[k])]
    assert moved and all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5) for k in w1)  # not bitwise: sums differ in order
    assert max((w1[k] - w2[k]).abs().max().item() for k in moved) < 1e-4 * max(w1[k].abs().max().item() for k in moved)
