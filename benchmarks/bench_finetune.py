"""Cost of one finetuning step per method, the optimizer state each keeps, and the share of a sparse
step spent choosing its rows.

    python benchmarks/bench_finetune.py               # full run (about 3.5 minutes on 2 CPU cores)
    python benchmarks/bench_finetune.py --quick       # about a minute: fewer rounds, N = 2^16 and 2^18
    python benchmarks/bench_finetune.py --device cuda # on a GPU (synchronised around every timed region)

Model: the `tiny` preset, randomly initialised (`MemoryModel.from_preset("tiny", seed=0)`; 4 Llama
blocks, d=256, one memory layer in block 2, 4 heads x top-32 = 128 reads per token, v_dim 256), in
eval mode as `finetune()` runs it; N = 2^16 slots (n_keys=256, the preset) and N = 2^20 (n_keys=1024,
the same model otherwise; --sizes). Steps are `smviz.train.Trainer.step(batch, step)` — the
one update `finetune()` runs per stream step, for every method — on a trainer built as finetune()
builds it (`Trainer(model, FinetuneConfig(method, optimizer).resolved(), stats, device)`, default
lr, top_t=500, AdamW weight decay 0.1); each method trains its own deep copy of the model, and the
same batch is stepped on again and again (the weights drift; the work per step does not).
Methods: sparse + SGD (the default: TF-IDF top-500 rows, RowSGD), sparse + AdamW (lazy RowAdamW),
full + AdamW (torch.optim.AdamW over every parameter), LoRA + AdamW (peft, rank 8, every linear of
the Llama blocks). finetune() itself (evaluation, deltas, steps.parquet) is not timed.

Background statistics for `sparse` are synthetic but valid (no pretrained model, no corpus pass):
`SlotStats.empty(model)` with n_docs = 1000, df ~ uniform integers in [0, 1000] and counts = df x
uniform[1, 63] (so counts > 0 exactly where df > 0, counts >= df); the model's and the statistics'
model_hash are set to the same fixed string. The TF-IDF arithmetic does not depend on the values.

Batches (the same for every method):
- "stream": a realistic stream batch — `Stream(world.new, tokenizer, batch_size=16).batch(0)`,
  16 paraphrases of one fact of `generate_world(WorldConfig(n_known=4, n_bio_only=1, n_new=3))`,
  right-padded (about 16 x 15 positions, ~180 real tokens); the tokenizer is
  `train_tokenizer(world texts + load_articles()[:300], vocab 4096)`;
- "corpus": 64 rows x 64 tokens of corpus text (articles in title order, end-of-text between them,
  packed; no padding) — 4,096 real tokens, a large batch (--quick: 16 x 64).

Section 1, step time: at each N and batch, the methods' steps are timed in interleaved rounds (each
round runs every case once, in a new random order; cheap cases repeat inside a round until it spans
--target-s), after warm-up steps; numbers are medians over rounds, ratios are to the sparse SGD
step of the same group. Full and LoRA run at the preset's N (2^16) only (the issue asks for the tiny
preset; full AdamW at 2^20 holds ~4 GB and takes seconds a step: --all-methods-large adds them).

Section 2, selection share: the part of a sparse step that counts the batch's reads and picks its rows
— `batch_counts(indices, mask, N)` + `RowSelector.select(layer, counts, step)` (nonzero, TF-IDF
against the background df, stable sort, top-t), exactly what the trainer's access hook runs before
`choose_rows` — is timed on the batch's real indices, captured once with an access hook (and checked:
the selection on them equals the rows the trainer's own step selects). It is timed in the same
interleaved rounds as the steps of that N and batch; share = its median / the median sparse SGD step
(also reported against sparse AdamW). Goal: under 5 % at N = 2^16 and 2^20 (the goal rows use the
stream batch, finetune()'s setting; the corpus batch is reported with its pass/fail too). Parts are
timed alone as well: batch_counts, tfidf() over N, select() on ready counts, `choose_rows` (the
trainable-rows set-up after selection, outside the share), and a suggested selection (idf computed
once, scores of the read slots only, exact top-t by a topk threshold + stable sort of the candidates)
that is checked to return the same rows, tf, df and scores.

Section 3, optimizer state: for each method, a fresh copy of the model and trainer takes --state-steps
stream steps (distinct facts: `Stream(world.facts(), ...)` steps 0, 1, ...), then the state is
counted: `Trainer.optimizer_state_elements()` and the bytes of those tensors (element sizes); RowAdamW
also keeps a slot -> state-row map of N int64 that optimizer_state_elements() leaves out (reported as
bookkeeping). Contrast: dense AdamW moments over the value table alone (2 x N x v_dim x 4 bytes).
Full AdamW at N = 2^20 is not run; its state is computed from the parameter count.

Section 4, RowAdamW growth: `RowAdamW.step` on 500 rows new to its state when the state already holds
R rows (state loaded with `load_state_dict` before each timed step, outside the clock), and on 500 rows
it already holds — the cost of growing the moment tensors with torch.cat (a copy of the whole state
per step that brings new rows).

Threads: --threads (default 1; OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 are set before torch loads
unless already set) for steadier numbers beside other work on the machine. The JSON (default
benchmarks/results/bench_finetune.json, --quick: bench_finetune_quick.json) holds every number, the
goals and whether they pass, the settings, the machine, the torch version and the load average at
start and end; it is written atomically.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import datetime as _dt
import gc
import logging
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _bench import Case, log, machine_record, measure, paired_ratio, print_totals, write_result  # noqa: E402 (run as a script from benchmarks/)

from smviz.data.corpus import load_articles
from smviz.data.tokenizer import train_tokenizer
from smviz.data.world import WorldConfig, generate_world
from smviz.model import MemoryModel
from smviz.stats import SlotStats, batch_counts, tfidf
from smviz.train import Stream, FinetuneConfig, RowSelector, Selection, Trainer
from smviz.train.row_optim import RowAdamW

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_OUT = ROOT / "results" / "bench_finetune.json"
QUICK_OUT = ROOT / "results" / "bench_finetune_quick.json"

PRESET = "tiny"
PRESET_EXP = 16  # the tiny preset's N = 256^2
WORLD = {"n_known": 4, "n_bio_only": 1, "n_new": 3}
TOKENIZER_ARTICLES = 300
VOCAB = 4096
STATS_DOCS = 1000
MODEL_HASH = "bench-finetune-random-tiny"
METHODS = {  # key: (FinetuneConfig.method, optimizer, label)
    "sparse-sgd": ("sparse", "sgd", "sparse + SGD"),
    "sparse-adamw": ("sparse", "adamw", "sparse + AdamW"),
    "full-adamw": ("full", "adamw", "full + AdamW"),
    "lora-adamw": ("lora", "adamw", "LoRA + AdamW"),
}
BASELINE = "sparse-sgd"
GOAL_PCT = 5.0
GOALS = {f"selection_share_pct_2^{e}": ("<", GOAL_PCT, f"batch_counts + RowSelector.select / sparse SGD step at N = 2^{e}, "
                                        + "stream batch (16 paraphrases)") for e in (16, 20)}

# --------------------------------------------------------------------------- timing

def case_info(c: Case) -> dict:
    return {"median_ms": c.median * 1e3, "rounds": len(c.times), "steps_per_round": c.inner,
            "times_ms": [t * 1e3 for t in c.times]}


# --------------------------------------------------------------------------- inputs


def make_tokenizer(world) -> object:
    texts = [s for f in world.facts() for s in f.statements] + [q.text for f in world.facts() for q in f.questions]
    texts += [a.text for a in load_articles()[:TOKENIZER_ARTICLES]]
    return train_tokenizer(texts, vocab_size=VOCAB)


def corpus_batch(tokenizer, rows: int, seq: int) -> dict[str, torch.Tensor]:
    """rows x seq tokens of corpus text: articles in order, end-of-text after each, packed; no padding."""
    need = rows * seq
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    articles = load_articles()
    for start in range(0, len(articles), 64):
        enc = tokenizer([a.text for a in articles[start : start + 64]], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids += e + [eos]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"the corpus holds fewer than {need:,} tokens")
    x = torch.tensor(ids[:need]).view(rows, seq)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def synthetic_stats(model: MemoryModel, seed: int = 0) -> SlotStats:
    """Valid background statistics with random values (see the module docstring)."""
    stats = SlotStats.empty(model, protocol={"source": "synthetic (bench_finetune)"})
    g = torch.Generator().manual_seed(seed)
    stats.df = torch.randint(0, STATS_DOCS + 1, stats.df.shape, generator=g)
    stats.counts = stats.df * torch.randint(1, 64, stats.df.shape, generator=g)
    stats.n_docs = STATS_DOCS
    stats.n_tokens = int(stats.counts.sum()) // 128 + 1
    stats.model_hash = model.model_hash
    assert torch.equal(stats.counts > 0, stats.df > 0) and int(stats.df.max()) <= stats.n_docs
    stats.check_model(model)
    return stats


def base_model(n_exp: int, device: torch.device) -> MemoryModel:
    if n_exp % 2:
        raise SystemExit(f"--sizes: N = 2^{n_exp} is not a square (n_keys^2 = N); use even exponents")
    model = MemoryModel.from_preset(PRESET, seed=0, n_keys=2 ** (n_exp // 2)).to(device).eval()
    model.model_hash = f"{MODEL_HASH}-2^{n_exp}"
    return model


def make_trainer(base: MemoryModel, key: str, stats: SlotStats, device: torch.device) -> Trainer:
    method, optimizer, _ = METHODS[key]
    model = copy.deepcopy(base)
    model.model_hash = base.model_hash
    model.eval()  # as finetune() does
    config = FinetuneConfig(method=method, optimizer=optimizer).resolved()
    return Trainer(model, config, stats if config.sparse else None, device)


def capture_reads(model: MemoryModel, batch: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per memory layer, the (indices, mask) its access hooks see on `batch` (one no-grad forward)."""
    got: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    handles = []
    for block, layer in model.memory_layers.items():
        def hook(_layer, indices, _weights, mask, block=block):
            got[block] = (indices.detach().clone(), None if mask is None else mask.clone())
        handles.append(layer.add_access_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    for block, (_, mask) in got.items():
        assert mask is not None, "the access hook got no padding mask"
    return got


def selection_equal(a: Selection, b: Selection) -> bool:
    return (a.accessed == b.accessed and torch.equal(a.rows, b.rows) and torch.equal(a.tf, b.tf)
            and torch.equal(a.df, b.df) and torch.equal(a.score, b.score))


class SuggestedSelector:
    """The suggested `RowSelector.select` for method `sparse`: idf of every slot computed once (the
    background statistics do not change during a run), scores only for the slots the batch read (no
    N-long float64 passes), and the exact top-t by a threshold (the t-th largest score, torch.topk)
    then a stable sort of the candidates at or above it — same rows, same order, same tie rule (lower
    id first among equal scores), same tf / df / score values as RowSelector.select."""

    def __init__(self, selector: RowSelector) -> None:
        assert selector.method == "sparse"
        self.top_t = selector.top_t
        self.df = {layer: b.df for layer, b in selector.background.items()}
        n = selector.stats.n_docs
        self.idf = {layer: torch.log((n + 1) / (df.to(torch.float64) + 1)) for layer, df in self.df.items()}

    def select(self, layer: int, counts: torch.Tensor, step: int) -> Selection:
        read = torch.nonzero(counts).flatten()
        c = counts[read]
        total = c.sum()
        tf = c.double() / total.clamp(min=1)
        score = (c.double() / total.double()) * self.idf[layer][read]  # == tfidf(counts, df, n_docs)[read]
        if len(read) > self.top_t:
            threshold = torch.topk(score, self.top_t, sorted=False).values.min()
            cand = torch.nonzero(score >= threshold).flatten()  # ascending ids; more than t only by ties
            order = cand[torch.sort(score[cand], descending=True, stable=True).indices[: self.top_t]]
        else:
            order = torch.sort(score, descending=True, stable=True).indices
        return Selection(read[order], tf[order], self.df[layer][read][order], score[order], accessed=len(read))


# --------------------------------------------------------------------------- sections


def section_steps(n_exp: int, batches: dict[str, dict], args, device: torch.device) -> tuple[list[dict], dict]:
    """Steps of each method and the selection parts, per batch, at N = 2^n_exp (sections 1 and 2)."""
    rows: list[dict] = []
    out: dict = {}
    t_setup = time.perf_counter()
    base = base_model(n_exp, device)
    stats = synthetic_stats(base)
    keys = list(METHODS) if (n_exp == PRESET_EXP or args.all_methods_large) else ["sparse-sgd", "sparse-adamw"]
    trainers = {k: make_trainer(base, k, stats, device) for k in keys}
    out["setup_s"] = time.perf_counter() - t_setup
    log(f"N=2^{n_exp}: model + {len(trainers)} trainers ready in {out['setup_s']:.1f}s")
    for bname, batch in batches.items():
        r, out[bname] = batch_group(n_exp, bname, {k: v.to(device) for k, v in batch.items()}, base, trainers, args, device)
        rows += r
    del trainers, base
    gc.collect()
    return rows, out


def batch_group(n_exp: int, bname: str, batch: dict[str, torch.Tensor], base: MemoryModel, trainers: dict[str, Trainer],
                args, device: torch.device) -> tuple[list[dict], dict]:
    """One interleaved group: every trainer's step and the selection cases, on one batch."""
    n = f"2^{n_exp}"
    n_slots = base.memory_config.n_slots
    block = next(iter(base.memory_layers))
    selector: RowSelector = trainers[BASELINE].selector
    suggested = SuggestedSelector(selector)
    table = trainers[BASELINE].model.memory_layers[block].value_table
    real = int(batch["attention_mask"].sum())
    label = f"{bname} {'x'.join(map(str, batch['input_ids'].shape))}"
    indices, mask = capture_reads(base, batch)[block]
    counts = batch_counts(indices, mask, n_slots)
    ref = selector.select(block, counts, 0)
    # the selection timed below is the one the trainer's own step makes (same reads, same rows)
    trainers[BASELINE].step(batch, 0)
    got: dict[str, Selection] = {}
    h = trainers[BASELINE].model.memory_layers[block].add_access_hook(
        lambda _l, i, _w, m: got.update(sel=selector.select(block, batch_counts(i, m, n_slots), 0)))
    step_sel = trainers[BASELINE].step(batch, 0)[1]  # (loss, selections, ...): selections second
    h.remove()
    assert selection_equal(step_sel[block], ref), "captured reads do not reproduce the step's selection"
    assert selection_equal(got["sel"], ref)
    suggested_ok = selection_equal(suggested.select(block, counts, 0), ref)
    assert suggested_ok, "the suggested selection differs from RowSelector.select"

    def step_of(tr: Trainer) -> Callable[[], None]:
        return lambda: tr.step(batch, 0)

    def count_select() -> None:
        selector.select(block, batch_counts(indices, mask, n_slots), 0)

    def count_only() -> None:
        batch_counts(indices, mask, n_slots)

    def tfidf_only() -> None:
        tfidf(counts, selector.background[block].df, selector.stats.n_docs)

    def select_only() -> None:
        selector.select(block, counts, 0)

    def count_suggested() -> None:
        suggested.select(block, batch_counts(indices, mask, n_slots), 0)

    def choose() -> None:
        with table.train_rows():
            table.choose_rows(ref.rows)

    cases = {k: Case(f"step: {METHODS[k][2]}", step_of(tr), key=k) for k, tr in trainers.items()}
    cases["count+select"] = Case("selection: batch_counts + RowSelector.select", count_select, key="count+select")
    cases["count"] = Case("  part: batch_counts", count_only, key="count")
    cases["tfidf"] = Case("  part: tfidf() over all N slots", tfidf_only, key="tfidf")
    cases["select"] = Case("  part: RowSelector.select on ready counts", select_only, key="select")
    cases["choose_rows"] = Case(f"  after: ValueTable.choose_rows({len(ref.rows)} rows)", choose, key="choose_rows")
    cases["count+suggested"] = Case("suggested: batch_counts + idf once, topk", count_suggested, key="count+suggested")
    rounds = args.rounds if bname == "stream" else args.rounds_large
    measure(list(cases.values()), device=device, warmup=args.warmup, rounds=rounds, target_s=args.target_s,
            label=f"N={n} {label}")

    sgd = cases[BASELINE]
    res: dict = {"batch_shape": list(batch["input_ids"].shape), "real_tokens": real, "reads": real * 128,
                 "distinct_slots_read": ref.accessed, "rows_selected": len(ref.rows),
                 "suggested_selection_identical": suggested_ok, "cases": {}}
    for k, c in cases.items():
        info = case_info(c) | {"what": c.what.strip()}
        if k in trainers:
            info |= {"tokens_per_s": real / c.median, **{f"{kk}_to_sparse_sgd": v for kk, v in paired_ratio(c, sgd).items()}}
        else:
            info |= {"share_of_sparse_sgd_step_pct": 100 * c.median / sgd.median,
                     "share_of_sparse_adamw_step_pct": 100 * c.median / cases["sparse-adamw"].median}
        res["cases"][k] = info
    share = 100 * cases["count+select"].median / sgd.median
    res["selection_share_pct"] = share
    res["selection_share_of_adamw_step_pct"] = 100 * cases["count+select"].median / cases["sparse-adamw"].median
    res["selection_share_median_of_round_ratios_pct"] = 100 * paired_ratio(cases["count+select"], sgd)["median_of_round_ratios"]
    res["suggested_share_pct"] = 100 * cases["count+suggested"].median / sgd.median
    res["selection_pass"] = share < GOAL_PCT

    rows = []
    for k, c in cases.items():
        r = {"section": "1 step" if k in trainers else "2 select", "what": c.what, "n": n, "batch": label,
             "median_ms": c.median * 1e3, "rounds": len(c.times), "steps_per_round": c.inner}
        if k in trainers:
            r |= {"ratio": c.median / sgd.median, "ratio_def": "step time / sparse SGD step time"}
        else:
            r |= {"ratio": 100 * c.median / sgd.median, "ratio_def": "% of the sparse SGD step"}
            if k == "count+select":
                r |= {"goal": f"< {GOAL_PCT:g} %", "pass": bool(share < GOAL_PCT)}
        rows.append(r)
    return rows, res


def state_bytes(trainer: Trainer) -> dict:
    """Optimizer state of a trainer: elements (optimizer_state_elements), bytes, bookkeeping bytes."""
    elements = trainer.optimizer_state_elements()
    if trainer.config.sparse:
        tensors = [t for o in trainer.row_optimizers.values() for t in o.state_dict().values()]
        book = [o.slot_state for o in trainer.row_optimizers.values() if isinstance(o, RowAdamW)]
        rows = sum(o.used for o in trainer.row_optimizers.values() if isinstance(o, RowAdamW))
    else:
        tensors = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        book, rows = [], None
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    assert sum(t.numel() for t in tensors) + sum(t.numel() for t in book) == elements  # the slot map counts too
    return {"elements": elements, "bytes": nbytes, "bookkeeping_bytes": sum(t.numel() * t.element_size() for t in book),
            "state_rows": rows, "trainable_per_step": trainer.trainable_per_step()}


def section_state(sizes: list[int], world, tokenizer, args, device: torch.device) -> tuple[list[dict], dict]:
    """Optimizer state after --state-steps stream steps on distinct facts (section 3)."""
    rows: list[dict] = []
    out: dict = {}
    stream = Stream(world.facts(), tokenizer, batch_size=16)
    steps = min(args.state_steps, len(stream))
    batches = [{k: v.to(device) for k, v in stream.batch(s).items()} for s in range(steps)]
    for e in sizes:
        n = f"2^{e}"
        base = base_model(e, device)
        stats = synthetic_stats(base)
        mem = base.memory_config
        v_dim = base.memory_layers[next(iter(base.memory_layers))].value_table.weight.shape[1]
        n_params = sum(p.numel() for p in base.parameters())
        dense_values = 2 * mem.n_slots * v_dim * 4 * len(base.memory_layers)
        res: dict = {"n_slots": mem.n_slots, "v_dim": v_dim, "model_params": n_params, "steps": steps,
                     "dense_adamw_value_table_bytes": dense_values, "methods": {}}
        keys = list(METHODS) if (e == PRESET_EXP or args.all_methods_large) else ["sparse-sgd", "sparse-adamw", "lora-adamw"]
        for k in keys:
            tr = make_trainer(base, k, stats, device)
            t = time.perf_counter()
            for s, b in enumerate(batches):
                tr.step(b, s)
            info = state_bytes(tr) | {"steps_s": time.perf_counter() - t}
            res["methods"][k] = info
            del tr
            gc.collect()
        if "full-adamw" not in res["methods"]:  # computed, not run: exp_avg + exp_avg_sq (fp32) + a step per tensor
            n_tensors = sum(1 for _ in base.parameters())
            res["methods"]["full-adamw"] = {"elements": 2 * n_params + n_tensors, "bytes": 8 * n_params + 4 * n_tensors,
                                            "bookkeeping_bytes": 0, "state_rows": None, "trainable_per_step": n_params,
                                            "computed_not_run": True}
        out[n] = res
        for k, info in res["methods"].items():
            rows.append({"n": n, "method": METHODS[k][2], **info,
                         "vs_dense_value_adamw": info["bytes"] / dense_values})
        rows.append({"n": n, "method": "dense AdamW, value table only (contrast)", "elements": dense_values // 4,
                     "bytes": dense_values, "bookkeeping_bytes": 0, "state_rows": mem.n_slots,
                     "trainable_per_step": mem.n_slots * v_dim, "vs_dense_value_adamw": 1.0, "computed_not_run": True})
        del base
        gc.collect()
    return rows, out


def section_adamw_growth(args, device: torch.device) -> tuple[list[dict], dict]:
    """RowAdamW.step on 500 new rows vs the rows its state already holds (section 4)."""
    n_slots, v_dim, t = 2**PRESET_EXP, 256, 500
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n_slots, v_dim, generator=g).to(device)
    grad = torch.randn(t, v_dim, generator=g).to(device)
    cases: list[Case] = []
    held = [r for r in args.growth_rows if r + t <= n_slots]
    for r in held:
        state = {"slots": torch.arange(r), "exp_avg": torch.zeros(r, v_dim), "exp_avg_sq": torch.zeros(r, v_dim),
                 "steps": torch.ones(r, dtype=torch.long)}
        for fresh in (True, False):
            if not fresh and r < t:
                continue
            rows = torch.arange(r, r + t, device=device) if fresh else torch.arange(t, device=device)
            opt = RowAdamW(n_slots, v_dim, 1e-3, weight_decay=0.1, device=device)

            def setup(opt=opt, state=state) -> None:
                opt.load_state_dict(state)

            def step(opt=opt, rows=rows) -> None:
                opt.step(weight, rows, grad)

            what = f"RowAdamW.step, {t} {'new' if fresh else 'held'} rows, state holds {r:,} rows"
            cases.append(Case(what, step, setup=setup, heavy=True, key=f"{r}-{'new' if fresh else 'held'}"))
    measure(cases, device=device, warmup=1, rounds=args.growth_rounds, target_s=args.target_s, label="RowAdamW growth")
    out = {c.key: case_info(c) | {"what": c.what} for c in cases}
    base = cases[0].median
    rows = [{"section": "4 adamw", "what": c.what, "n": f"2^{PRESET_EXP}", "batch": "-", "median_ms": c.median * 1e3,
             "rounds": len(c.times), "steps_per_round": 1, "ratio": c.median / base,
             "ratio_def": "time / step with an empty state"} for c in cases]
    return rows, out


# --------------------------------------------------------------------------- reporting


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def print_table(rows: list[dict]) -> None:
    head = (f"{'section':<9} {'what':<56} {'N':>5} {'batch':<15} {'rounds':>6} {'median ms':>10} {'ratio':>9} "
            f"{'goal':>7} {'pass':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = "" if r.get("ratio") is None else (f"{r['ratio']:.2f}%" if r["ratio_def"].startswith("%")
                                                    else f"{r['ratio']:.2f}x")
        passed = "" if "pass" not in r else ("yes" if r["pass"] else "NO")
        print(f"{r['section']:<9} {r['what']:<56} {r['n']:>5} {r['batch']:<15} {r['rounds']:>6} {r['median_ms']:>10.3f} "
              f"{ratio:>9} {r.get('goal', ''):>7} {passed:>5}")
    print("median ms: median over interleaved rounds of the time per step (cheap cases repeat inside a round).")
    print("ratio: section 1 = step time / sparse SGD step time (same N and batch); section 2 = % of the sparse SGD")
    print("  step; section 4 = time / RowAdamW.step with an empty state. 'part' rows are pieces of the selection row;")
    print("  'after' (choose_rows) follows selection in the step and is not in the share.")


def print_state(rows: list[dict]) -> None:
    head = f"{'N':>5} {'method':<42} {'state elements':>15} {'state bytes':>12} {'+ slot map':>11} {'state rows':>10} {'vs dense':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        note = " (computed)" if r.get("computed_not_run") else ""
        print(f"{r['n']:>5} {r['method'] + note:<42} {r['elements']:>15,} {fmt_bytes(r['bytes']):>12} "
              f"{fmt_bytes(r['bookkeeping_bytes']) if r['bookkeeping_bytes'] else '':>11} "
              f"{'' if r['state_rows'] is None else format(r['state_rows'], ','):>10} {r['vs_dense_value_adamw']:>8.3f}x")
    print("state: optimizer_state_elements() and its bytes; '+ slot map': RowAdamW's N-long slot -> state-row map")
    print("  (counted in optimizer_state_elements, not in state bytes); vs dense: bytes / dense AdamW moments over the value table alone.")






def git_info() -> dict:
    """The commit and any uncommitted change to the library (the numbers belong to that code)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], check=False, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_library_files": git("status", "--porcelain", "--", "smviz").splitlines()}




# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute: fewer rounds, N = 2^16 and 2^18, a 16 x 64 corpus batch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model trains (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--sizes", default=None, help="comma-separated even exponents, N = 2^e slots (default 16,20; --quick: 16,18)")
    p.add_argument("--corpus-rows", type=int, default=None, help="rows of the corpus batch (default 64; --quick: 16)")
    p.add_argument("--corpus-seq", type=int, default=64, help="tokens per row of the corpus batch")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, stream batch (default 9; --quick: 3)")
    p.add_argument("--rounds-large", type=int, default=None, help="interleaved rounds, corpus batch (default 5; --quick: 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per case")
    p.add_argument("--target-s", type=float, default=None, help="minimum span of a cheap case per round (default 0.25; --quick: 0.1)")
    p.add_argument("--state-steps", type=int, default=None, help="stream steps before counting optimizer state (default 8; --quick: 3)")
    p.add_argument("--growth-rows", default=None,
                   help="rows held by RowAdamW before the timed step, comma-separated (default 0,8192,32768,65036; --quick: 0,16384)")
    p.add_argument("--growth-rounds", type=int, default=None, help="rounds of the RowAdamW growth cases (default 11; --quick: 3)")
    p.add_argument("--all-methods-large", action="store_true",
                   help="also run full and LoRA at N other than the preset's (full AdamW at 2^20: ~4 GB, seconds a step)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)}; --quick: {QUICK_OUT.relative_to(REPO)})")
    a = p.parse_args(argv)
    q = a.quick
    a.sizes = [int(s) for s in (a.sizes or ("16,18" if q else "16,20")).split(",") if s.strip()]
    a.corpus_rows = a.corpus_rows or (16 if q else 64)
    a.rounds = a.rounds or (3 if q else 9)
    a.rounds_large = a.rounds_large or (3 if q else 5)
    a.target_s = a.target_s or (0.1 if q else 0.25)
    a.state_steps = a.state_steps or (3 if q else 8)
    a.growth_rows = [int(s) for s in (a.growth_rows or ("0,16384" if q else "0,8192,32768,65036")).split(",") if s.strip()]
    a.growth_rounds = a.growth_rounds or (3 if q else 11)
    a.out = a.out or (QUICK_OUT if q else DEFAULT_OUT)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("peft").setLevel(logging.ERROR)
    log(f"smviz finetune benchmark: device={device}, threads={torch.get_num_threads()}, sizes={args.sizes}, quick={args.quick}")

    t = time.perf_counter()
    world = generate_world(WorldConfig(**WORLD))
    tokenizer = make_tokenizer(world)
    assert len(tokenizer) <= VOCAB
    stream_batch = Stream(world.new, tokenizer, batch_size=16).batch(0)
    batches = {"stream": stream_batch, "corpus": corpus_batch(tokenizer, args.corpus_rows, args.corpus_seq)}
    setup_s = time.perf_counter() - t
    log(f"world, tokenizer ({len(tokenizer)} entries) and batches ready in {setup_s:.1f}s")

    rows: list[dict] = []
    results: dict = {"setup_s": setup_s, "steps": {}}
    for e in args.sizes:
        t = time.perf_counter()
        r, results["steps"][f"2^{e}"] = section_steps(e, batches, args, device)
        rows += r
        log(f"N=2^{e} steps and selection done in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    state_rows, results["optimizer_state"] = section_state(args.sizes, world, tokenizer, args, device)
    log(f"optimizer state done in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    r, results["adamw_growth"] = section_adamw_growth(args, device)
    rows += r
    log(f"RowAdamW growth done in {time.perf_counter() - t:.1f}s")

    total = time.perf_counter() - t_start
    goal_report = {}
    for name, (op, target, what) in GOALS.items():
        key = name.rsplit("_", 1)[1]
        if key not in results["steps"]:
            goal_report[name] = {"value": None, "goal": f"{op} {target:g} %", "what": what, "pass": None,
                                 "note": f"N = {key} not in --sizes"}
            continue
        s = results["steps"][key]
        goal_report[name] = {"value": s["stream"]["selection_share_pct"], "goal": f"{op} {target:g} %", "what": what,
                             "pass": bool(s["stream"]["selection_share_pct"] < target),
                             "corpus_batch_value": s["corpus"]["selection_share_pct"],
                             "corpus_batch_pass": bool(s["corpus"]["selection_share_pct"] < target),
                             "with_suggested_selection": s["stream"]["suggested_share_pct"]}

    print()
    print_table(rows)
    print()
    print_state(state_rows)
    print()
    for n, s in results["steps"].items():
        for bname in batches:
            b = s[bname]
            c = b["cases"]
            steps = ", ".join(f"{METHODS[k][2]} {c[k]['median_ms']:.1f} ms ({c[k]['ratio_to_sparse_sgd']:.2f}x)"
                              for k in METHODS if k in c)
            print(f"N={n} {bname} batch {'x'.join(map(str, b['batch_shape']))} ({b['real_tokens']} real tokens, "
                  f"{b['distinct_slots_read']:,} slots read): {steps}")
            print(f"    selection {c['count+select']['median_ms']:.2f} ms = {b['selection_share_pct']:.2f} % of the "
                  f"sparse SGD step ({b['selection_share_of_adamw_step_pct']:.2f} % of sparse AdamW; goal < {GOAL_PCT:g} %: "
                  f"{'pass' if b['selection_pass'] else 'FAIL'}); suggested selection {b['suggested_share_pct']:.2f} %")
    for name, g in goal_report.items():
        verdict = "n/a" if g["pass"] is None else ("pass" if g["pass"] else "FAIL")
        value = "n/a" if g["value"] is None else f"{g['value']:.2f} %"
        print(f"goal {name}: {value} ({g['goal']}): {verdict}")
    peak = print_totals(total, load_start)

    payload = {
        "benchmark": "smviz finetuning: step time per method, optimizer state, sparse selection share",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_record(device, load_start=load_start, torch_threads=torch.get_num_threads()),
        "git": git_info(),
        "settings": {
            "preset": PRESET, "seed": 0, "quick": args.quick, "sizes": [f"2^{e}" for e in args.sizes],
            "methods": {k: {"method": m, "optimizer": o, **{f: getattr(FinetuneConfig(method=m, optimizer=o).resolved(), f)
                                                             for f in ("lr", "weight_decay", "top_t")}}
                        for k, (m, o, _) in METHODS.items()},
            "world": WORLD, "tokenizer": f"train_tokenizer(world texts + load_articles()[:{TOKENIZER_ARTICLES}], {VOCAB})",
            "stream_batch": "Stream(world.new, tokenizer, batch_size=16).batch(0)",
            "corpus_batch": [args.corpus_rows, args.corpus_seq],
            "stats": f"synthetic: n_docs={STATS_DOCS}, df ~ U[0, {STATS_DOCS}], counts = df x U[1, 63]",
            "rounds": args.rounds, "rounds_large": args.rounds_large, "warmup": args.warmup, "target_s": args.target_s,
            "state_steps": args.state_steps, "growth_rows": args.growth_rows, "growth_rounds": args.growth_rounds,
            "all_methods_large": args.all_methods_large, "threads": args.threads, "dtype": "float32",
        },
        "goals": goal_report,
        "rows": rows,
        "optimizer_state_rows": state_rows,
        "results": results,
        "memory": {"peak_rss_mb": peak} | ({"cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
                                           if device.type == "cuda" else {}),
        "total_runtime_s": total,
    }
    write_result(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
