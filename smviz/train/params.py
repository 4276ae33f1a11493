"""What each tensor of a memory model is — value rows, memory keys/query, memory output, dense, buffer
(`parameter_kinds`) — and which of them a finetuning method may change (`may_change`): what the
frozen-parameter audit (`smviz.analysis.diff`) checks a finished run against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from smviz.train.lora import DEFAULT_TARGETS, adapted_weights
from smviz.train.methods import ADAPTERS, ALL_PARAMETERS, get_method

if TYPE_CHECKING:
    from smviz.model import MemoryModel

VALUE_ROWS_KIND, KEYS_KIND, OUTPUT_KIND, DENSE_KIND, BUFFER_KIND = (
    "value rows", "memory keys/query", "memory output", "dense", "buffer")
KINDS = (VALUE_ROWS_KIND, KEYS_KIND, OUTPUT_KIND, DENSE_KIND, BUFFER_KIND)


def model_tensors(model: MemoryModel) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the LM by state-dict name, each shared or tied tensor once (its first
    name); rotary tables (`inv_freq`) are left out: they are derived, not learned."""
    out = dict(model.lm.named_parameters())
    out.update({n: b for n, b in model.lm.named_buffers() if not n.endswith("inv_freq")})
    return out


def parameter_kinds(model: MemoryModel) -> dict[str, str]:
    """{name: kind} of every tensor of `model_tensors(model)`: 'value rows' (a memory's value table),
    'memory keys/query' (product keys, query projection, its norm and gain), 'memory output' (the
    memory's W1/W2), 'dense' (every other parameter) or 'buffer'."""
    ids: dict[int, str] = {}
    for m in model.memory_layers.values():
        for p in (m.keys, *m.query.parameters(), *m.query_norm.parameters(), *m.query_norm.buffers()):
            ids[id(p)] = KEYS_KIND
        if m.query_gain is not None:
            ids[id(m.query_gain)] = KEYS_KIND
        for lin in (m.w1, m.w2):
            if lin is not None:
                for p in lin.parameters():
                    ids[id(p)] = OUTPUT_KIND
        ids[id(m.value_table.weight)] = VALUE_ROWS_KIND
    params = {id(p) for p in model.lm.parameters()}
    return {n: ids.get(id(t), DENSE_KIND if id(t) in params else BUFFER_KIND) for n, t in model_tensors(model).items()}


def may_change(method: str | None, model: MemoryModel, lora_targets: Sequence[str] | None = None) -> set[str]:
    """Names of the tensors (other than value tables, whose rows are audited one by one) that `method`
    may change: every parameter for full finetuning, the adapted weights for LoRA (`lora_targets`, by
    default the method's), none for value-row methods and for None."""
    if method is None:
        return set()
    trains = get_method(method).trains
    if trains == ALL_PARAMETERS:
        return set(model_tensors(model))
    if trains == ADAPTERS:
        return adapted_weights(model, DEFAULT_TARGETS if lora_targets is None else lora_targets)
    return set()
