"""Slot ablation: remove chosen memory slots from the forward pass (no weight is edited) and measure
what a fact loses — the log-probability of its answer and the F1 of the greedy answer — against
random slot sets of the same size drawn from the slots the fact's questions read. The causal test
of "these slots store this fact".

Mechanism: an access hook (which runs after the lookup, before the values are read) sets the softmax
weights of the ablated slots to 0 in place, so their value rows add nothing to the bag; the other
slots keep their weights (no renormalisation: exactly the ablated rows' terms are removed). The
weights tensor is the one the bag reads, so no change to the layer is needed; in-place edits of a
tensor autograd saved would break backward, so ablation runs without gradients. With
`renormalise=True` the slots are instead *dropped from the top-k*: each head's remaining weights are
rescaled to sum to 1 (`drop_reads`, which `smviz.analysis.steer` reuses).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch

from smviz.data.facts import Fact, qa_prompt
from smviz.errors import ConfigError
from smviz.evaluate import answer_questions
from smviz.model import MemoryModel
from smviz.record import AccessRecorder

ABLATION_COLUMNS = ["fact_id", "question", "gold", "logprob_before", "logprob_after", "delta_logprob",
                    "answer_before", "answer_after", "f1_before", "f1_after", "delta_f1"]
TEST_COLUMNS = ["set", "draw", "n_slots", "logprob", "delta_logprob", "f1", "delta_f1", "rank", "percentile"]

Slots = Sequence[int] | np.ndarray | torch.Tensor | Mapping[int, Sequence[int] | np.ndarray | torch.Tensor]


def resolve_slots(model: MemoryModel, slots: Slots, layer: int | None = None) -> dict[int, torch.Tensor]:
    """{memory block: sorted unique slot ids} from a slot list (of `layer`, default the only memory
    layer) or a dict {block: slots}; refuses unknown blocks and slot ids out of range."""
    if isinstance(slots, Mapping):
        if layer is not None:
            raise ConfigError("give either slots as {layer: slots} or layer=..., not both")
        chosen = {model.resolve_layer(block): ids for block, ids in slots.items()}
    else:
        chosen = {model.resolve_layer(layer): slots}
    n = model.memory_config.n_slots
    out = {}
    for block, ids in chosen.items():
        t = torch.as_tensor(np.asarray(ids), dtype=torch.long).flatten()
        if len(t) and (t.min() < 0 or t.max() >= n):
            bad = int(t[(t < 0) | (t >= n)][0])
            raise ConfigError(f"slot {bad} is out of range: the memory has {n:,} slots (0..{n - 1})")
        out[int(block)] = t.unique()
    return out


def drop_reads(indices: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, *, renormalise: bool = False) -> None:
    """In place: the read weights of `slots` (1-D ids, on the reads' device) set to 0 wherever read;
    with `renormalise`, each head's remaining weights are then rescaled to sum to 1 (a head whose
    every read was dropped keeps all-zero weights: it adds nothing). indices, weights: (..., K)."""
    if weights.requires_grad:
        raise ConfigError("slot ablation and steering edit the read weights in place: run the model under torch.no_grad()")
    weights.masked_fill_(torch.isin(indices, slots), 0)
    if renormalise:
        total = weights.sum(-1, keepdim=True)
        weights.copy_(torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), weights))


@contextmanager
def ablated(model: MemoryModel, slots: Slots, *, layer: int | None = None,
            renormalise: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, the given slots contribute nothing to the forward pass (their read weights are
    zeroed after the lookup; with `renormalise`, each head's other weights are rescaled to sum to 1, as
    if the slots were dropped from the top-k); weights are untouched and the hooks are removed on
    exit. Forward passes must run without gradients (`torch.no_grad()`). An empty set changes
    nothing. Yields the resolved {block: slots}."""
    resolved = resolve_slots(model, slots, layer)
    with ExitStack() as stack:
        for block, ids in resolved.items():
            if not len(ids):
                continue
            memory = model.memory_layers[block]
            ids_dev = ids.to(memory.keys.device)

            def zero(_layer, indices, weights, _mask, ids_dev=ids_dev):
                drop_reads(indices, weights, ids_dev, renormalise=renormalise)

            stack.callback(memory.add_access_hook(zero).remove)
        yield resolved


def _questions(facts: Fact | Sequence[Fact], heldout: bool) -> tuple[list[Fact], list[tuple[Fact, Any]]]:
    facts = [facts] if isinstance(facts, Fact) else list(facts)
    if not facts:
        raise ConfigError("no facts given: pass at least one Fact")
    pairs = [(f, q) for f in facts for q in (f.heldout_questions if heldout else f.training_questions)]
    if not pairs:
        raise ConfigError(f"the facts have no {'held-out' if heldout else 'training'} questions")
    return facts, pairs


def _encode(model: MemoryModel, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + ' ' + answer, and where the answer tokens start."""
    tok = model.require_tokenizer("scoring answer log-probabilities")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(f"{prompt} {answer}", add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
        start += 1
    return full, max(start, 1)


@torch.no_grad()
def continuation_logprob(model: MemoryModel, prompt: str, answer: str) -> float:
    """Σ log p(answer token | prompt, earlier answer tokens) for `answer` after `prompt` and one
    space, in nats; float64 accumulation. The answer's tokens are those where the encodings of
    prompt and prompt + ' ' + answer part (no special tokens added)."""
    ids, start = _encode(model, prompt, answer)
    x = torch.tensor([ids], device=model.device)
    logits = model(input_ids=x).logits[0].double()
    logp = torch.log_softmax(logits[start - 1 : len(ids) - 1], dim=-1)
    return float(logp.gather(1, x[0, start:, None]).sum())


def answer_logprob(model: MemoryModel, question: str, answer: str) -> float:
    """Σ log p(answer token | prompt, earlier answer tokens) for the answer after `qa_prompt(question)`
    and one space (the training format), in nats; float64 accumulation (`continuation_logprob`)."""
    return continuation_logprob(model, qa_prompt(question), answer)


def _measure(model: MemoryModel, facts: list[Fact], pairs, heldout: bool, max_new_tokens: int) -> tuple[list[float], list[dict]]:
    logps = [answer_logprob(model, q.text, f.answer) for f, q in pairs]
    rows = answer_questions(model, facts, heldout=heldout, max_new_tokens=max_new_tokens)
    return logps, rows


def ablate_slots(
    model: MemoryModel,
    slots: Slots,
    facts: Fact | Sequence[Fact],
    *,
    layer: int | None = None,
    heldout: bool = True,
    max_new_tokens: int = 12,
) -> pd.DataFrame:
    """Answer each question of `facts` (held-out templates; training ones with heldout=False) with and
    without `slots` (see `ablated`). One row per question. Columns: fact_id, question, gold,
    logprob_before / logprob_after (`answer_logprob`, nats), delta_logprob (after − before; exactly
    0 for an empty set), answer_before / answer_after (greedy, `answer_questions`), f1_before,
    f1_after, delta_f1. No weight changes."""
    facts, pairs = _questions(facts, heldout)
    resolve_slots(model, slots, layer)  # bad input fails before any work
    lp0, r0 = _measure(model, facts, pairs, heldout, max_new_tokens)
    with ablated(model, slots, layer=layer):
        lp1, r1 = _measure(model, facts, pairs, heldout, max_new_tokens)
    rows = [{
        "fact_id": f.id, "question": q.text, "gold": f.answer, "logprob_before": a, "logprob_after": b,
        "delta_logprob": b - a, "answer_before": x["prediction"], "answer_after": y["prediction"],
        "f1_before": x["f1"], "f1_after": y["f1"], "delta_f1": y["f1"] - x["f1"],
    } for (f, q), a, b, x, y in zip(pairs, lp0, lp1, r0, r1)]
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)


@torch.no_grad()
def accessed_slots(model: MemoryModel, facts: Fact | Sequence[Fact], *, layer: int | None = None,
                   heldout: bool = True) -> np.ndarray:
    """The slots of one memory layer (default: the only one) read by any token of the facts'
    questions with their answers (`qa_prompt(question) + ' ' + answer`, every head's top-k): the pool
    random control sets are drawn from. Sorted unique int64."""
    layer = next(iter(resolve_slots(model, [], layer)))
    _, pairs = _questions(facts, heldout)
    seen = []
    with AccessRecorder(model, [layer]) as rec:
        for f, q in pairs:
            ids, _ = _encode(model, qa_prompt(q.text), f.answer)
            model(input_ids=torch.tensor([ids], device=model.device))
    for b in rec.batches:
        seen.append(b.slots.reshape(-1).astype(np.int64))
    return np.unique(np.concatenate(seen))


def ablation_test(
    model: MemoryModel,
    fact: Fact | Sequence[Fact],
    slots: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    layer: int | None = None,
    draws: int = 20,
    seed: int = 0,
    pool: Sequence[int] | np.ndarray | None = None,
    heldout: bool = True,
    max_new_tokens: int = 12,
) -> pd.DataFrame:
    """Ablate `slots` (of `layer`) and `draws` random sets of the same size drawn (without replacement,
    seeded) from `pool` minus `slots` — default pool: `accessed_slots(model, fact)` — and compare what
    the fact loses. Means over the fact's questions.

    One row per set: set ('real' | 'random'), draw (-1 for the real set), n_slots, logprob (mean
    answer log-prob under ablation), delta_logprob (vs no ablation), f1, delta_f1, rank (1 = the
    largest drop in log-prob among all sets, ties share the best rank) and, on the real row,
    percentile = share of random sets whose drop is smaller than the real set's (1.0: the real set
    hurts more than every random set; NaN on random rows). `df.attrs` holds baseline_logprob,
    baseline_f1, pool_size, layer."""
    facts, pairs = _questions(fact, heldout)
    resolved = resolve_slots(model, slots, layer)
    (block, real), = resolved.items()
    if not len(real):
        raise ConfigError("the slot set is empty: name at least one slot to ablate")
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    pool_ids = accessed_slots(model, facts, layer=block, heldout=heldout) if pool is None else \
        resolve_slots(model, pool, block)[block].numpy()
    candidates = np.setdiff1d(pool_ids, real.numpy())
    if len(candidates) < len(real):
        raise ConfigError(f"the pool holds {len(candidates)} slots besides the {len(real)} ablated ones; random sets of "
                          f"size {len(real)} need at least that many (pass a larger pool)")
    rng = np.random.default_rng(seed)
    sets = [("real", -1, real.numpy())] + [
        ("random", d, np.sort(rng.choice(candidates, size=len(real), replace=False))) for d in range(draws)]

    def mean_scores() -> tuple[float, float]:
        lp, rows = _measure(model, facts, pairs, heldout, max_new_tokens)
        return float(np.mean(lp)), float(np.mean([r["f1"] for r in rows]))

    base_lp, base_f1 = mean_scores()
    records = []
    for kind, draw, ids in sets:
        with ablated(model, {block: ids}):
            lp, f1 = mean_scores()
        records.append({"set": kind, "draw": draw, "n_slots": len(ids), "logprob": lp, "delta_logprob": lp - base_lp,
                        "f1": f1, "delta_f1": f1 - base_f1})
    df = pd.DataFrame(records)
    df["rank"] = df["delta_logprob"].rank(method="min").astype(int)
    random_drops = df.loc[df["set"] == "random", "delta_logprob"].to_numpy()
    df["percentile"] = np.nan
    df.loc[0, "percentile"] = float(np.mean(random_drops > df.loc[0, "delta_logprob"]))
    df.attrs.update(baseline_logprob=base_lp, baseline_f1=base_f1, pool_size=len(pool_ids), layer=block)
    return df[TEST_COLUMNS]
