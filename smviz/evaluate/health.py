"""Memory health beyond slot usage (which is `memory_usage`'s): whether the values moved, how loud the
memory is next to the FFN it sits beside, whether its queries are distinct enough for the key search
to tell tokens apart, and what removing it does to held-out NLL. These are the numbers that show the
known failures of a memory retrofitted to a frozen model: queries nearly parallel (cosine ≈ 0.999 from
outlier dimensions), values that never move while the loss falls, a memory output swamping the FFN.

- `value_movement(model, initial_values)`: per block, ‖V − V₀‖_F / ‖V₀‖_F;
- `memory_activity(model, rows)`: per block, over the real tokens of `rows`: `memory_norm` and
  `ffn_norm`, the mean L2 norm per token of the memory's output and of the block's FFN output beside it
  (parallel mode; None in replace mode), `memory_ffn_ratio` = memory_norm / ffn_norm, and the mean
  cosine over all pairs of distinct tokens of the memory's queries: `query_cosine_raw` on the hidden
  states the memory reads, `query_cosine_normed` on the query the key search sees (projection and
  query norm, with the qk-norm gain if any), per head and half, averaged over the 2·heads sub-queries;
- `memory_health(model, rows)`: both, plus held-out NLL of `rows` with the memory on and off.

Pairwise cosines are computed without the N×N matrix: for unit vectors uᵢ,
Σ_{i≠j} uᵢ·uⱼ = ‖Σᵢ uᵢ‖² − Σᵢ ‖uᵢ‖².
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from smviz.errors import ConfigError
from smviz.evaluate.mode import eval_mode
from smviz.evaluate.nll import check_rows, heldout_nll
from smviz.io import strict_json
from smviz.model import MemoryFFN

if TYPE_CHECKING:
    from smviz.model import MemoryModel


def value_movement(model: MemoryModel, initial_values: dict[int, torch.Tensor]) -> dict[str, float]:
    """Block index (as a string) → ‖V − V₀‖_F / ‖V₀‖_F of its value table against `initial_values`
    (block → V₀, on any device; e.g. the values of the model the run started from)."""
    missing = sorted(set(model.values) - set(initial_values))
    if missing:
        raise ConfigError(f"initial values are missing for memory blocks {missing}")
    out = {}
    with torch.no_grad():
        for block, v in model.values.items():
            v0 = initial_values[block].to(device=v.device, dtype=torch.float64)
            out[str(block)] = (torch.linalg.norm(v.double() - v0) / torch.linalg.norm(v0)).item()
    return out


class PairwiseCosine:
    """Running mean pairwise cosine of groups of vectors: `add(x)` with x (M, G, d) adds M vectors to
    each of G groups; `mean()` is the mean over groups of the mean cosine over pairs i ≠ j in a group."""

    def __init__(self) -> None:
        self.unit_sum: torch.Tensor | None = None  # (G, d): Σ of unit vectors
        self.square_sum: torch.Tensor | None = None  # (G,): Σ of their squared norms (0 for a zero vector)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        u = F.normalize(x.detach().double(), dim=-1)
        if self.unit_sum is None:
            self.unit_sum, self.square_sum = torch.zeros_like(u[0]), torch.zeros(u.shape[1], dtype=u.dtype, device=u.device)
        self.unit_sum += u.sum(0)
        self.square_sum += (u * u).sum(-1).sum(0)
        self.count += len(u)

    def mean(self) -> float | None:
        n = self.count
        if n < 2 or self.unit_sum is None:
            return None
        pairs = (self.unit_sum * self.unit_sum).sum(-1) - self.square_sum
        return (pairs / (n * (n - 1))).mean().item()



class _BlockMeter:
    """What `memory_activity` sums for one memory block while its hooks are attached."""

    def __init__(self) -> None:
        self.memory_norm, self.ffn_norm, self.tokens, self.ffn_tokens = 0.0, 0.0, 0, 0
        self.raw, self.normed = PairwiseCosine(), PairwiseCosine()

    def result(self) -> dict[str, Any]:
        memory = self.memory_norm / self.tokens if self.tokens else None
        ffn = self.ffn_norm / self.ffn_tokens if self.ffn_tokens else None
        return {
            "tokens": self.tokens, "memory_norm": memory, "ffn_norm": ffn,
            "memory_ffn_ratio": memory / ffn if memory is not None and ffn else None,
            "query_cosine_raw": self.raw.mean(), "query_cosine_normed": self.normed.mean(),
        }


def memory_activity(
    model: MemoryModel, token_rows: torch.LongTensor, batch_size: int = 16, *, attention_mask: torch.Tensor | None = None
) -> dict[str, dict[str, Any]]:
    """Block index (as a string) → output norms and query similarity of its memory over the real tokens
    (mask 1) of `token_rows` (see the module docstring), the memory on."""
    check_rows(token_rows, attention_mask)
    ffn_of = {id(m.memory): m.ffn for m in model.lm.modules() if isinstance(m, MemoryFFN)}
    meters = {block: _BlockMeter() for block in model.memory_layers}
    real: dict[str, torch.Tensor | None] = {"mask": None}  # (B, T) bool of the batch running, None: all real

    def on_memory(meter: _BlockMeter) -> Callable:
        def hook(_module, args, output) -> None:
            x, out = _tokens(args[0], real["mask"]), _tokens(output, real["mask"])
            meter.memory_norm += out.double().norm(dim=-1).sum().item()
            meter.tokens += len(out)
            meter.raw.add(x[:, None])
        return hook

    def on_query(meter: _BlockMeter, layer) -> Callable:
        c = layer.config

        def hook(_module, _args, q) -> None:
            q = _tokens(q, real["mask"]).view(-1, c.heads * 2, c.k_dim // 2)
            if layer.query_gain is not None:  # qk_norm: RMS-normalised halves (a positive scale) times the gain
                q = q * layer.query_gain
            meter.normed.add(q)
        return hook

    def on_ffn(meter: _BlockMeter) -> Callable:
        def hook(_module, _args, output) -> None:
            out = _tokens(output, real["mask"])
            meter.ffn_norm += out.double().norm(dim=-1).sum().item()
            meter.ffn_tokens += len(out)
        return hook

    handles = []
    try:
        for block, layer in model.memory_layers.items():
            meter = meters[block]
            handles.append(layer.register_forward_hook(on_memory(meter)))
            handles.append(layer.query_norm.register_forward_hook(on_query(meter, layer)))
            ffn = ffn_of.get(id(layer))
            if ffn is not None:
                handles.append(ffn.register_forward_hook(on_ffn(meter)))
        device = model.device
        with eval_mode(model):
            for start in range(0, len(token_rows), batch_size):
                ids = token_rows[start : start + batch_size].to(device)
                mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
                real["mask"] = None if mask is None else mask.bool()
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return {str(block): strict_json(meter.result()) for block, meter in meters.items()}


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real-token rows of a hooked tensor: (B, T, d) or flattened (B·T, d) → (real tokens, d)."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask] if x.dim() == 3 else x[mask.reshape(-1)]


def memory_health(
    model: MemoryModel,
    token_rows: torch.LongTensor,
    *,
    initial_values: dict[int, torch.Tensor] | None = None,
    batch_size: int = 16,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Held-out NLL of `token_rows` with the memory on and off (`heldout_nll`; off = the memory's term
    removed, which in parallel mode is the model without its memory), and per block `memory_activity`
    plus, given `initial_values`, `value_movement`."""
    on = heldout_nll(model, token_rows, batch_size, attention_mask=attention_mask)
    with model.memory_off():
        off = heldout_nll(model, token_rows, batch_size, attention_mask=attention_mask)["nll"]
    blocks = memory_activity(model, token_rows, batch_size, attention_mask=attention_mask)
    if initial_values is not None:
        for block, moved in value_movement(model, initial_values).items():
            blocks[block]["value_movement"] = moved
    change = (on["nll"] - off) / off if on["nll"] is not None and off else None
    return strict_json({
        "protocol": f"{on['protocol']}; memory off: its term removed; norms and cosines over the same tokens",
        "tokens": on["tokens"], "nll_memory_on": on["nll"], "nll_memory_off": off, "nll_change": change,
        "blocks": blocks,
    })
