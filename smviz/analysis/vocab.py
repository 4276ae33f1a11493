"""Vocabulary projection of a memory slot: which tokens its value row promotes and suppresses when
pushed through the rest of the output path on its own (a logit lens on one component).

    gate    = mean over the slot's recorded contexts x of silu(W1 x)      (Memory+ swilu gate)
    logits  = unembed(final_norm(W2_weight (v ⊙ gate)))

The approximation, stated: (1) the gate is the mean gate over the tokens that read the slot, not
the gate of any one token (without a trace, a gate of ones — `df.attrs["gate"] == "ones"`; a model
without swilu has no gate, "none"); (2) the slot's read weight is taken as 1 and W2's bias, shared by
all slots, is left out; (3) the final norm is applied to the memory output alone — the residual
stream the output is added to is ignored, as is every later block. RMSNorm is scale invariant, so
(3) keeps the direction of W2(v ⊙ gate), rescaled by the norm's gain.

Contexts are recomputed, not stored: the trace's tokens table has each recorded document's token
ids, so the documents holding the slot's readers are run through the model again (whole document,
in position order; a document longer than the model's context is cut to the window that ends at
the reading token) and the memory layer's input x is captured with a forward pre-hook.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from smviz.errors import ConfigError, TraceError
from smviz.model import MemoryModel, architecture_of, module_at
from smviz.trace import Trace

log = logging.getLogger(__name__)

COLUMNS = ["direction", "rank", "token_id", "token", "logit"]


def output_path(model: MemoryModel) -> tuple[nn.Module, nn.Module]:
    """(final norm, unembedding) of the model's LM, from its Architecture entry."""
    unembed = model.lm.get_output_embeddings()
    if unembed is None:
        raise ConfigError(f"the {model.config.model_type!r} model has no output embeddings to project onto")
    path = architecture_of(model.config).final_norm
    try:
        return module_at(model.lm, path), unembed
    except AttributeError:
        raise ConfigError(f"the {model.config.model_type!r} model has no final norm at {path!r}; set Architecture.final_norm "
                          "when registering it (smviz.model.register_architecture)") from None


@torch.no_grad()
def slot_gate(model: MemoryModel, slot: int, layer: int | None = None, *, trace: Trace,
              max_contexts: int = 256, batch_tokens: int = 8192) -> tuple[torch.Tensor, int]:
    """The mean swilu gate silu(W1 x) (v_dim,) over the (at most `max_contexts` highest-weight)
    recorded tokens that read `slot`, recomputed by running their documents through `model` in batches of
    at most `batch_tokens` padded tokens; returns it and the number of contexts averaged. A slot the trace
    never saw read raises."""
    layer = model.resolve_layer(layer)
    memory = model.memory_layers[layer]
    if memory.w1 is None:
        raise ConfigError("the memory has no swilu gate (swilu=False)")
    if trace.meta.get("memory") != model.memory_config.to_dict():
        raise TraceError("this trace was recorded with a different memory config; record a trace with this model")
    if trace.model_hash is not None and trace.model_hash != model.model_hash:
        log.warning("trace recorded with model %s, projecting with %s: contexts recomputed with the latter",
                    trace.model_hash, model.model_hash)
    index = trace.slot_index()
    ctx = index.contexts(slot, n=max_contexts, window=0, layer=layer)
    if ctx.empty:
        raise TraceError(f"slot {slot} of layer {layer} is never read in this trace; pass another trace or trace=None")
    tok = index.token_columns()
    token_ids = trace.tokens.column("token_id").to_numpy()
    limit = int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 0) or 1 << 30)

    windows: list[tuple[np.ndarray, list[int]]] = []  # (token ids of a window, positions whose gate is wanted)
    for doc, group in ctx.groupby("doc", sort=True):
        lo, hi = int(tok["doc_start"][doc]), int(tok["doc_start"][doc + 1])
        order = np.argsort(tok["position"][lo:hi], kind="stable")  # document order
        ids = token_ids[lo:hi][order]
        if (ids < 0).any():
            raise TraceError("the trace was recorded from embeddings (token_id -1): its contexts cannot be rerun")
        place = np.argsort(order)[group["row"].to_numpy() - lo].tolist()  # each reader's place in document order
        if len(ids) <= limit:
            windows.append((ids, place))
        else:
            windows += [(ids[max(0, p - limit + 1): p + 1], [min(p, limit - 1)]) for p in place]

    captured: list[torch.Tensor] = []
    handle = memory.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    gates = []
    try:
        for chunk in _length_batches(windows, batch_tokens):
            # right-padded: under the causal mask a real token never attends to the padding after it, so
            # its memory input is the one its document alone gives (one forward per batch, not per document)
            ids = torch.zeros((len(chunk), max(len(w) for w, _ in chunk)), dtype=torch.long)
            for row, (w, _) in enumerate(chunk):
                ids[row, : len(w)] = torch.from_numpy(w.astype(np.int64))
            captured.clear()
            model(input_ids=ids.to(model.device))
            rows = [row for row, (_, wanted) in enumerate(chunk) for _ in wanted]
            cols = [p for _, wanted in chunk for p in wanted]
            gates.append(F.silu(memory.w1(captured[-1][rows, cols])))
    finally:
        handle.remove()
    gate = torch.cat(gates).double().mean(0)
    return gate, len(ctx)


def _length_batches(windows: list[tuple[np.ndarray, list[int]]], batch_tokens: int) -> list[list[tuple[np.ndarray, list[int]]]]:
    """`windows` in batches of similar length (sorted by it, so little padding), each at most `batch_tokens`
    tokens once padded to its longest window (a window longer than that is a batch of its own)."""
    batches: list[list[tuple[np.ndarray, list[int]]]] = []
    for w in sorted(windows, key=lambda w: len(w[0])):
        if batches and (len(batches[-1]) + 1) * len(w[0]) <= batch_tokens:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


@torch.no_grad()
def promoted_tokens(
    model: MemoryModel,
    slot: int,
    layer: int | None = None,
    *,
    trace: Trace | None = None,
    k: int = 10,
    max_contexts: int = 256,
) -> pd.DataFrame:
    """The k tokens a slot's value row promotes most and the k it suppresses most (see the module
    docstring for the projection and its approximation).

    Columns: direction ('promoted' | 'suppressed'), rank (0 = strongest), token_id, token (decoded;
    '' without a tokenizer), logit (float64, the projected logit). `df.attrs`: layer, slot, gate
    ('contexts' | 'ones' | 'none'), n_contexts (tokens the gate was averaged over)."""
    layer = model.resolve_layer(layer)
    memory = model.memory_layers[layer]
    n = model.memory_config.n_slots
    if not (isinstance(slot, (int, np.integer)) and 0 <= slot < n):
        raise ConfigError(f"slot {slot!r} is out of range: the memory has {n:,} slots (0..{n - 1})")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    v = memory.value_table.weight[int(slot)].double()
    if memory.w1 is None:
        gate, kind, n_ctx = torch.ones_like(v), "none", 0
    elif trace is None:
        gate, kind, n_ctx = torch.ones_like(v), "ones", 0
    else:
        gate, n_ctx = slot_gate(model, int(slot), layer, trace=trace, max_contexts=max_contexts)
        kind = "contexts"
    logits = project(model, memory, v * gate.to(v.device))
    k = min(k, len(logits))
    top, low = logits.topk(k), logits.topk(k, largest=False)
    tokenizer = model.tokenizer
    records: list[dict[str, Any]] = []
    for direction, (vals, ids) in (("promoted", top), ("suppressed", low)):
        for rank, (val, tid) in enumerate(zip(vals.tolist(), ids.tolist())):
            token = tokenizer.decode([tid]) if tokenizer is not None else ""
            records.append({"direction": direction, "rank": rank, "token_id": tid, "token": token, "logit": val})
    df = pd.DataFrame(records, columns=COLUMNS)
    df.attrs.update(layer=layer, slot=int(slot), gate=kind, n_contexts=n_ctx)
    return df


def project(model: MemoryModel, memory: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """logits (vocab,) float64 of one memory-output vector y (v_dim,): unembed(final_norm(W2_weight y))."""
    norm, unembed = output_path(model)
    dtype = memory.w2.weight.dtype
    out = F.linear(y.to(dtype), memory.w2.weight)  # W2 without its bias
    return unembed(norm(out[None, None]))[0, 0].double()
