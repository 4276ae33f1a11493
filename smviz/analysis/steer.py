"""Live probing and steering by memory slots: which slots any text reads, token by token (`read_text`,
`text_top_slots`), and the forward pass with chosen slots dropped, forced or rescaled (`steered`),
with what that does to greedy generation and answer log-probabilities (`steer_generate`) and to the
next-token log-probability of a slot's top contexts (`ablation_effects`).

Steering edits the reads in an access hook (after the lookup, before the values are read; no weight
changes), per head and token, in this order:
- zero:  the slots' read weights set to 0 (`smviz.analysis.ablate.drop_reads`); with `renormalise`,
         the head's remaining weights rescaled to sum to 1 — "dropped from the top-k";
- force: each forced slot put into every head's top-k: a head that does not read it gives up its
         weakest read (lowest weight, the last rank among equals; forced reads are never given up);
         each forced slot gets weight `force_weight`, and the head's other reads are rescaled,
         keeping their proportions, to share 1 − m·force_weight (m forced slots), so every head
         still sums to 1 (also after zero without renormalise: force always renormalises);
- scale: the read weight of each slot multiplied by its factor wherever read (0 = zero without
         renormalising, 1 = no change, 2 = its value row counted twice), forced reads included.
Reads recorded inside a steered block (`AccessRecorder`, `read_text`) are the steered ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from smviz.analysis.ablate import Slots, ablated, continuation_logprob, drop_reads, resolve_slots
from smviz.data.facts import qa_prompt
from smviz.data.tokenizer import right_pad
from smviz.errors import AnalysisError, ConfigError
from smviz.evaluate import eval_mode
from smviz.model import MemoryModel
from smviz.record import DEFAULT_CONTEXT, AccessRecorder, chunk_spans
from smviz.trace.index import SlotIndex

READ_COLUMNS = ["position", "token", "token_id", "layer", "head", "rank", "slot", "weight"]
TOP_COLUMNS = ["position", "token", "layer", "slot", "weight", "reads", "rank"]
EFFECT_COLUMNS = ["row", "token", "next_token", "logprob_before", "logprob_after", "delta"]


def context_limit(model: MemoryModel) -> int:
    """The most tokens the model reads at once (its position limit; DEFAULT_CONTEXT when unknown)."""
    c = model.config
    return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or DEFAULT_CONTEXT)


def _check_whole(name: str, value: Any, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def _decode_each(tokenizer: Any, ids: np.ndarray) -> list[str]:
    """Each token id decoded on its own ('' without a tokenizer or for an id < 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    if tokenizer is None or not len(ids):
        return [""] * len(ids)
    unique, inverse = np.unique(ids, return_inverse=True)
    texts = np.array(["" if i < 0 else tokenizer.decode([int(i)]) for i in unique], dtype=object)
    return texts[inverse].tolist()


# --------------------------------------------------------------------------- reading text


def read_text(model: MemoryModel, text: str, *, layer: int | None = None, top: int | None = None,
              add_special_tokens: bool = False) -> pd.DataFrame:
    """Run the model live on `text`: every memory read, one row per (position, layer, head, rank) with
    position, token (decoded alone), token_id, layer, head, rank, slot, weight (float; recorded as
    float16, as in a trace). Encoded as `smviz record` encodes documents (no special tokens;
    `add_special_tokens=True` for a model that needs a BOS). `layer`: one memory layer (default all).
    `top`: per token and layer, only the reads of the `top` slots with the most weight summed over heads
    (`text_top_slots`). AnalysisError for an empty text or one longer than the model's context."""
    tok = model.require_tokenizer("reading text")
    model.require_memory("reading memory slots")
    _check_whole("top", top, none_ok=True)
    ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"] if text else []
    if not ids:
        raise AnalysisError("the text is empty: give at least one token of text to read")
    limit = context_limit(model)
    if len(ids) > limit:
        raise AnalysisError(f"the text is {len(ids):,} tokens long, more than the {limit:,} the model reads at once; "
                            "shorten it, or record it with `smviz record`, which reads long documents in windows")
    with eval_mode(model), AccessRecorder(model, None if layer is None else [layer]) as rec:
        model(input_ids=torch.tensor([ids], device=model.device))
    if not rec.batches:
        raise AnalysisError("the memory layers did not run (are they switched off?); nothing was read")
    (b,) = rec.batches
    (n, n_layers, heads, knn), per_token = b.slots.shape, b.slots[0].size
    df = pd.DataFrame({
        "position": np.repeat(b.position.astype(np.int64), per_token),
        "token": np.repeat(np.array(_decode_each(tok, b.token_id), dtype=object), per_token),
        "token_id": np.repeat(b.token_id.astype(np.int64), per_token),
        "layer": np.tile(np.repeat(np.asarray(b.layers, dtype=np.int64), heads * knn), n),
        "head": np.tile(np.repeat(np.arange(heads), knn), n * n_layers),
        "rank": np.tile(np.arange(knn), n * n_layers * heads),
        "slot": b.slots.reshape(-1).astype(np.int64),
        "weight": b.weights.reshape(-1).astype(np.float64),
    }, columns=READ_COLUMNS)
    if top is not None:
        keep = text_top_slots(df, top)[["position", "layer", "slot"]]
        df = df.merge(keep, on=["position", "layer", "slot"], how="inner").sort_values(
            ["position", "layer", "head", "rank"], kind="stable").reset_index(drop=True)
    df.attrs.update(text=text, n_tokens=len(ids), layers=list(b.layers))
    return df


def text_top_slots(df: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """Per position and layer of a `read_text` frame, its slots by weight summed over heads (the token ×
    slot view), the `top` heaviest (None: all). Columns: position, token, layer, slot, weight (summed),
    reads (how many heads read it), rank (0 = most weight; ties go to the lower slot id)."""
    _check_whole("top", top, none_ok=True)
    if missing := sorted({"position", "token", "layer", "slot", "weight"} - set(df.columns)):
        raise AnalysisError(f"text_top_slots needs a read_text frame; this one lacks {missing}")
    g = df.groupby(["position", "layer", "slot"], sort=True).agg(
        token=("token", "first"), weight=("weight", "sum"), reads=("weight", "size")).reset_index()
    g = g.sort_values(["position", "layer", "weight", "slot"], ascending=[True, True, False, True], kind="stable")
    g["rank"] = g.groupby(["position", "layer"]).cumcount()
    if top is not None:
        g = g[g["rank"] < top]
    return g[TOP_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------- steering


@dataclass(frozen=True)
class LayerSteering:
    """What `steered` does to one memory layer's reads (slot ids sorted, int64, on the host)."""

    zero: torch.Tensor
    force: torch.Tensor
    scale_slots: torch.Tensor
    scale_factors: torch.Tensor  # float64, aligned with scale_slots
    force_weight: float
    renormalise: bool


def _resolve_scale(model: MemoryModel, scale: Mapping | None, layer: int | None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{block: (slots sorted, their factors)} from {slot: factor} of `layer`."""
    if not scale:
        return {}
    if not isinstance(scale, Mapping):
        raise ConfigError("scale must be a dict {slot: factor}")
    keys = list(scale)
    (block, slots), = resolve_slots(model, keys, layer).items()
    values = torch.tensor([float(v) if isinstance(v, (int, float, np.number)) else np.nan for v in scale.values()],
                          dtype=torch.float64)
    if len(slots) != len(keys) or not torch.isfinite(values).all():
        raise ConfigError("scale must give each slot one finite factor, as in {slot: 2.0}")
    return {block: (slots, values[torch.as_tensor(np.asarray(keys, dtype=np.int64)).argsort()])}


def steering_plan(model: MemoryModel, *, zero: Slots = (), force: Slots = (), scale: Mapping | None = None,
                  force_weight: float = 0.5, layer: int | None = None,
                  renormalise: bool = False) -> dict[int, LayerSteering]:
    """Validate a steering request and resolve it to {memory block: LayerSteering} (see `steered`):
    slot ids in range, force_weight in (0, 1], at most knn forced slots whose weights sum to at most 1,
    no slot both zeroed and forced or scaled. ConfigError naming what is wrong."""
    model.require_memory("steering by memory slots")
    if isinstance(force_weight, bool) or not isinstance(force_weight, (int, float, np.floating)) or not 0 < force_weight <= 1:
        raise ConfigError(f"force_weight must be a number in (0, 1], got {force_weight!r}")
    zeros, forces = resolve_slots(model, zero, layer), resolve_slots(model, force, layer)
    scales = _resolve_scale(model, scale, layer)
    none = torch.zeros(0, dtype=torch.long)
    plan = {}
    for block in sorted(set(zeros) | set(forces) | set(scales)):
        z, f = zeros.get(block, none), forces.get(block, none)
        s, factors = scales.get(block, (none, torch.zeros(0, dtype=torch.float64)))
        knn = model.memory_config.knn
        if len(f) > knn:
            raise ConfigError(f"{len(f)} forced slots do not fit in a head's top-{knn}; force at most {knn}")
        if len(f) * force_weight > 1 + 1e-9:
            raise ConfigError(f"{len(f)} forced slots with force_weight={force_weight} weigh more than 1 per head; "
                              f"lower force_weight to at most {1 / len(f):.4g}")
        both = z[torch.isin(z, torch.cat([f, s]))]
        if len(both):
            raise ConfigError(f"slot {int(both[0])} is both zeroed and forced or scaled; choose one")
        plan[block] = LayerSteering(z, f, s, factors, float(force_weight), bool(renormalise))
    return plan


def force_reads(indices: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, force_weight: float) -> None:
    """In place: every head reads each of `slots` (1-D, unique, at most K, on the reads' device) with
    weight `force_weight`; an absent one replaces the head's weakest read that is not forced, and the
    other reads are rescaled to share 1 − len(slots)·force_weight (see the module docstring).
    indices, weights: (..., K)."""
    k = indices.shape[-1]
    idx, w = indices.reshape(-1, k), weights.reshape(-1, k)
    present = idx[:, :, None] == slots  # (R, K, m)
    absent = ~present.any(1)  # (R, m): forced slots the head does not read
    # the head's reads from weakest to strongest, the later rank first among equals, forced reads last
    key = torch.where(present.any(-1), torch.inf, w.float()).flip(-1)
    order = (k - 1) - key.argsort(dim=-1, stable=True)
    target = order.gather(1, (absent.cumsum(-1) - 1).clamp_min(0))  # the j-th absent slot takes the j-th weakest
    rows, which = absent.nonzero(as_tuple=True)
    idx = idx.clone()
    idx[rows, target[rows, which]] = slots[which]
    forced = torch.isin(idx, slots)
    others = torch.where(forced, 0, w)
    total = others.sum(-1, keepdim=True)
    share = torch.where(total > 0, others / total.clamp_min(torch.finfo(w.dtype).tiny), 0) * max(0.0, 1 - len(slots) * force_weight)
    indices.copy_(idx.view_as(indices))
    weights.copy_(torch.where(forced, force_weight, share).view_as(weights))


def scale_reads(indices: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, factors: torch.Tensor) -> None:
    """In place: the weight of every read of slots[j] multiplied by factors[j] (slots sorted, on the
    reads' device; factors in the weights' dtype)."""
    pos = torch.searchsorted(slots, indices).clamp_(max=len(slots) - 1)
    hit = slots[pos] == indices
    weights.mul_(torch.where(hit, factors[pos], torch.ones_like(weights)))


@contextmanager
def steered(model: MemoryModel, *, zero: Slots = (), force: Slots = (), scale: Mapping | None = None,
            force_weight: float = 0.5, layer: int | None = None,
            renormalise: bool = False) -> Iterator[dict[int, LayerSteering]]:
    """Inside the block, every forward pass reads the memory steered (module docstring): `zero` slots
    dropped (renormalised with `renormalise`), `force` slots forced into every head's top-k of every
    token with weight `force_weight`, `scale` = {slot: factor} read weights multiplied. Slots are of
    `layer` (default the only memory layer); zero and force may also be {layer: slots}. No
    weight changes; hooks are removed on exit, also when the body raises; forward passes must run
    under torch.no_grad() (ConfigError otherwise). Nothing given: nothing changes. Yields the plan."""
    plan = steering_plan(model, zero=zero, force=force, scale=scale, force_weight=force_weight, layer=layer,
                         renormalise=renormalise)
    with ExitStack() as stack:
        for block, step in plan.items():
            if not (len(step.zero) or len(step.force) or len(step.scale_slots)):
                continue
            memory = model.memory_layers[block]
            device = memory.keys.device
            z, f, s, factors = (t.to(device) for t in (step.zero, step.force, step.scale_slots, step.scale_factors))

            def hook(_layer, indices, weights, _mask, z=z, f=f, s=s, factors=factors, step=step):
                if weights.requires_grad:
                    raise ConfigError("steering edits the read weights in place: run the model under torch.no_grad()")
                if len(z):
                    drop_reads(indices, weights, z, renormalise=step.renormalise)
                if len(f):
                    force_reads(indices, weights, f, step.force_weight)
                if len(s):
                    scale_reads(indices, weights, s, factors.to(weights.dtype))

            stack.callback(memory.add_access_hook(hook).remove)
        yield plan


def _greedy(model: MemoryModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `ids` (at most max_new_tokens tokens, up to the first eos, exclusive)."""
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    x = torch.tensor([ids], device=model.device)
    with eval_mode(model):
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos if pad is None else pad)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos is not None and eos in new else new


def steer_generate(model: MemoryModel, prompt: str, *, zero: Slots = (), force: Slots = (),
                   scale: Mapping | None = None, answer: str | None = None, max_new_tokens: int = 20,
                   question: bool = False, **kw: Any) -> dict[str, Any]:
    """Greedy generation from `prompt` (no special tokens added; `question=True`: `prompt` is a question,
    put to the model as `qa_prompt(prompt)`) without and with steering (`steered`: zero, force, scale
    and **kw = force_weight, layer, renormalise).

    Returns prompt (the text the model saw), text_before / text_after (the continuations, decoded
    without special tokens, up to eos), tokens_before / tokens_after (their ids), changed (whether
    they differ), answer, and — when `answer` is given — logprob_before / logprob_after / delta_logprob
    of ' ' + answer after the prompt (`continuation_logprob`; with question=True, `answer_logprob`),
    else None; layers (the memory blocks steered)."""
    tok = model.require_tokenizer("generating text")
    steer = dict(zero=zero, force=force, scale=scale, **kw)
    plan = steering_plan(model, **steer)
    _check_whole("max_new_tokens", max_new_tokens)
    text = qa_prompt(prompt) if question else prompt
    ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
    if not ids:
        raise AnalysisError("the prompt is empty: give at least one token to generate from")
    limit = context_limit(model)
    if len(ids) + max_new_tokens > limit:
        raise AnalysisError(f"the prompt ({len(ids):,} tokens) plus max_new_tokens={max_new_tokens} is more than the "
                            f"{limit:,} tokens the model reads at once; shorten the prompt or generate fewer tokens")
    if answer is not None and not answer.strip():
        raise AnalysisError("the answer is empty: give the answer text to score, or answer=None")

    def run() -> tuple[list[int], float | None]:
        with eval_mode(model):
            return _greedy(model, ids, int(max_new_tokens)), None if answer is None else continuation_logprob(model, text, answer)

    before, lp0 = run()
    with steered(model, **steer):
        after, lp1 = run()
    return {
        "prompt": text, "text_before": tok.decode(before, skip_special_tokens=True),
        "text_after": tok.decode(after, skip_special_tokens=True), "tokens_before": before, "tokens_after": after,
        "changed": before != after, "answer": answer, "logprob_before": lp0, "logprob_after": lp1,
        "delta_logprob": None if answer is None else lp1 - lp0, "layers": sorted(plan),
    }


# --------------------------------------------------------------------------- effects on a slot's contexts


def slot_contexts(index: SlotIndex, slot: int, n: int = 20, *, layer: int | None = None) -> pd.DataFrame:
    """The slot's `n` top contexts (`SlotIndex.contexts`) as model input: row (the reading token's
    trace row), token_ids (the document's ids from the start of the window the token was read in —
    `chunk_spans` of the trace's recording settings; a trace recorded without them, e.g. by an
    `AccessRecorder`, read each document whole — up to and including the next token when the document
    has one) and position (the reading token's place in token_ids)."""
    top = index.contexts(slot, n=n, window=0, layer=layer)
    tok = index.token_columns()
    token_id = index.trace.tokens.column("token_id").to_numpy()
    recording = index.trace.meta.get("recording") or {}
    records = []
    for row, d in zip(top["row"].to_numpy(), top["doc"].to_numpy()):  # n contexts, not slots
        lo, hi = int(tok["doc_start"][d]), int(tok["doc_start"][d + 1])
        p = int(row) - lo
        context = int(recording.get("context") or hi - lo)
        stride = int(recording.get("stride") or context)
        start = next(s for s, e, first in chunk_spans(hi - lo, context, stride) if first <= p < e)
        ids = token_id[lo + start: min(lo + p + 2, hi)]
        records.append({"row": int(row), "token_ids": ids.astype(np.int64).tolist(), "position": p - start})
    return pd.DataFrame.from_records(records, columns=["row", "token_ids", "position"])


def _context_rows(model: MemoryModel, contexts: Any) -> pd.DataFrame:
    df = contexts if isinstance(contexts, pd.DataFrame) else pd.DataFrame.from_records(
        [c if isinstance(c, Mapping) else {"token_ids": c[0], "position": c[1]} for c in contexts])
    if not {"token_ids", "position"} <= set(df.columns):
        raise AnalysisError("contexts need token_ids and position: give a SlotIndex, (token_ids, position) pairs "
                            "or a DataFrame with those columns")
    if not len(df):
        raise AnalysisError("there are no contexts to measure")
    df = df if "row" in df.columns else df.assign(row=np.arange(len(df)))
    vocab, limit = int(model.config.vocab_size), context_limit(model)
    for i, (ids, p) in enumerate(zip(df["token_ids"], df["position"])):  # one check per context
        ids = np.asarray(ids)
        if not (isinstance(p, (int, np.integer)) and 0 <= p < len(ids)):
            raise AnalysisError(f"context {i}: position {p!r} is not a place in its {len(ids)} token ids")
        if ids.min() < 0 or ids.max() >= vocab:
            raise AnalysisError(f"context {i}: token ids must lie in [0, {vocab}) (a trace recorded from embeddings "
                                "has no token ids to rerun)")
        if p + 1 > limit:
            raise AnalysisError(f"context {i}: position {p} is beyond the {limit} tokens the model reads at once")
    return df


def _next_logprobs(model: MemoryModel, seqs: list[list[int]], targets: list[int], batch_size: int) -> np.ndarray:
    """log p(target | seq) at each sequence's last token, float64, in right-padded batches."""
    out, dev = [], model.device
    with eval_mode(model):
        for b in range(0, len(seqs), batch_size):
            ids, mask = (t.to(dev) for t in right_pad(seqs[b : b + batch_size], 0))
            logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ids), device=dev), mask.sum(1) - 1]
            logp = torch.log_softmax(logits.double(), -1)
            out.append(logp.gather(1, torch.tensor(targets[b : b + batch_size], device=dev)[:, None])[:, 0].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def ablation_effects(model: MemoryModel, contexts: SlotIndex | pd.DataFrame | Sequence, slot: int, *,
                     n: int = 20, layer: int | None = None, renormalise: bool = True,
                     batch_size: int = 32) -> pd.DataFrame:
    """How much each context's next token loses when `slot` (of `layer`) is dropped from the top-k at
    every position (`ablated`; renormalised by default, as the paper drops slots).

    `contexts`: a SlotIndex (the slot's `n` top contexts, rebuilt by `slot_contexts`; the trace must
    be of this model), (token_ids, position) pairs, or a DataFrame with token_ids, position and
    optionally row; the target is token_ids[position + 1]. One row per context: row, token (the
    reading token, decoded), next_token (missing, and NaN log-probs, when there is none), logprob_before,
    logprob_after (log p(next token), nats), delta (after − before)."""
    _check_whole("batch_size", batch_size)
    (block, _), = resolve_slots(model, [slot], layer).items()
    if isinstance(contexts, SlotIndex):
        contexts.trace.check_model(model)
        contexts = slot_contexts(contexts, slot, n, layer=block)
        if not len(contexts):  # the trace holds no read of the slot
            return pd.DataFrame(columns=EFFECT_COLUMNS)
    df = _context_rows(model, contexts)
    ids = [np.asarray(t, dtype=np.int64) for t in df["token_ids"]]
    pos = df["position"].to_numpy(dtype=np.int64)
    nxt = np.array([t[p + 1] if p + 1 < len(t) else -1 for t, p in zip(ids, pos)], dtype=np.int64)
    has = nxt >= 0
    seqs = [t[: p + 1].tolist() for t, p, h in zip(ids, pos, has) if h]
    before = _next_logprobs(model, seqs, nxt[has].tolist(), batch_size)
    with ablated(model, {block: [slot]}, renormalise=renormalise):
        after = _next_logprobs(model, seqs, nxt[has].tolist(), batch_size)
    lp0, lp1 = np.full(len(df), np.nan), np.full(len(df), np.nan)
    lp0[has], lp1[has] = before, after
    out = pd.DataFrame({"row": df["row"].to_numpy(), "token": _decode_each(model.tokenizer, [t[p] for t, p in zip(ids, pos)]),
                        "next_token": [x if h else None for x, h in zip(_decode_each(model.tokenizer, nxt), has)],
                        "logprob_before": lp0, "logprob_after": lp1, "delta": lp1 - lp0}, columns=EFFECT_COLUMNS)
    out.attrs.update(slot=int(slot), layer=block, renormalise=renormalise)
    return out
