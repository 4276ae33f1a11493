"""The product-key memory layer: `MemoryConfig` (every knob, documented and validated) and
`ProductKeyMemory` (the layer, readable top to bottom), plus `ValueTable`, the (N, v_dim) value rows.

One memory layer maps token states x (B, T, dim) to outputs of the same shape:

    q            = norm(W_q x)                      one query per head, split in two halves q1, q2
    s1, i1       = top-k(q1 · K1ᵀ)                  K1, K2: the head's two sets of n_keys sub-keys
    s2, i2       = top-k(q2 · K2ᵀ)
    scores, idx  = top-k over the k×k sums s1[a] + s2[b];   slot id = i1[a] · n_keys + i2[b]
    w            = softmax(scores)                  per head, over its k slots
    y            = Σ_heads Σ_k w · V[idx]           one `F.embedding_bag` (mode "sum") over H·k rows
    out          = W2 (y ⊙ silu(W1 x))              Memory+ "swilu" gating (or W2 y without it)

so N = n_keys² slots are searched at the cost of 2·n_keys scores per head (Lample et al. 2019;
Berges et al. 2024; Lin et al. 2025). Slot ids follow Meta's code (i1 · n_keys + i2).

Accesses are emitted to hooks added with `add_access_hook` — indices (B, T, H, K) int64, weights
(B, T, H, K) and the padding mask — in training and in eval; with no hook attached nothing extra is
computed. The mask comes from `token_mask`, which `MemoryModel` sets from each call's attention mask.
Gradient can be confined to chosen value rows with `ValueTable.train_rows` (no N×v_dim tensor).

The two hot spots, the top-k over the k×k sums and the bag's backward, have exact faster forms in
`smviz.kernels`, taken automatically; the code here is the reference they are tested against.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from smviz import kernels
from smviz.config import from_dict
from smviz.errors import ConfigError

MODES = ("replace", "parallel")
QUERY_NORMS = ("none", "layernorm", "batchnorm")

AccessHook = Callable[["ProductKeyMemory", torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]
"""`fn(layer, indices, weights, mask)`: indices (B, T, H, K) int64 slot ids and weights (B, T, H, K)
softmax weights, on the layer's device and attached to the graph (detach before keeping them);
mask (B, T) bool marks real tokens (False = padding), or None when every position is real."""


@dataclass
class MemoryConfig:
    """Shape and training knobs of the memory layers of one model (one config for all its layers)."""

    n_keys: int = field(default=256, metadata={"help": "sub-keys per half; the memory has N = n_keys² slots"})
    heads: int = field(default=4, metadata={"help": "query heads; each reads its own top-k slots, outputs are summed"})
    knn: int = field(default=32, metadata={"help": "slots read per head and token (top-k); at most n_keys"})
    k_dim: int = field(default=128, metadata={"help": "query/key size per head, both halves together (even)"})
    v_dim: int | None = field(
        default=None, metadata={"help": "value row size; None = the model's hidden size"}
    )
    layers: tuple[int, ...] = field(
        default=(), metadata={"help": "indices of the transformer blocks whose FFN gets a memory layer"}
    )
    mode: str = field(
        default="replace",
        metadata={
            "help": "'replace': the memory layer is the block's FFN (the paper); 'parallel': its output is "
            "added to the FFN's, output projection zero-initialised so a pretrained model is unchanged"
        },
    )
    swilu: bool = field(default=True, metadata={"help": "Memory+ output W2(y ⊙ silu(W1 x)); off: W2 y"})
    query_norm: str = field(
        default="layernorm",
        metadata={
            "help": "normalisation of the query before the key search: 'none', 'layernorm' or 'batchnorm' "
            "(PKM's fix for usage collapse: it spreads queries across the batch; uses running statistics in eval)"
        },
    )
    qk_norm: bool = field(
        default=False,
        metadata={
            "help": "RMS-normalise query halves (learned gain) and sub-keys, scores scaled by 1/sqrt(k_dim/2) "
            "(Memory Layers at Scale's stabiliser for small models)"
        },
    )
    share_values: bool = field(
        default=False, metadata={"help": "all memory layers of the model read one value table (Memory+)"}
    )
    key_lr_mult: float = field(
        default=1.0, metadata={"help": "learning-rate multiplier of keys and query projection; 0 freezes the keys"}
    )
    value_lr_mult: float = field(
        default=1.0,
        metadata={"help": "learning-rate multiplier of the value table (Meta trains values at 10x the base lr)"},
    )
    balance_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of the usage-balancing auxiliary loss (Switch-style, per sub-key set: "
            "n_keys · Σ f·P with f the share of top-k reads and P the mean sub-key softmax); 0 disables it"
        },
    )

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        checks = [
            (self.n_keys >= 2, f"n_keys must be >= 2, got {self.n_keys}"),
            (self.heads >= 1, f"heads must be >= 1, got {self.heads}"),
            (1 <= self.knn <= self.n_keys, f"knn must be between 1 and n_keys={self.n_keys}, got {self.knn}"),
            (self.k_dim >= 2 and self.k_dim % 2 == 0, f"k_dim must be a positive even number, got {self.k_dim}"),
            (self.v_dim is None or self.v_dim >= 1, f"v_dim must be >= 1 or None, got {self.v_dim}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.query_norm in QUERY_NORMS, f"query_norm must be one of {QUERY_NORMS}, got {self.query_norm!r}"),
            (all(i >= 0 for i in self.layers), f"layer indices must be >= 0, got {self.layers}"),
            (len(set(self.layers)) == len(self.layers), f"layer indices must be distinct, got {self.layers}"),
            (self.key_lr_mult >= 0 and self.value_lr_mult >= 0, "learning-rate multipliers must be >= 0"),
            (self.balance_weight >= 0, f"balance_weight must be >= 0, got {self.balance_weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"MemoryConfig: {message}")

    @property
    def n_slots(self) -> int:
        """N, the number of key/value slots of one memory layer."""
        return self.n_keys**2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryConfig:
        """Build from a dict as read from disk: every value checked against its field's type (ConfigError
        naming the field), keys written by a newer smviz ignored with a warning, missing ones default.
        An integer given for a float field stays an integer (10, not 10.0), so that saving the config
        again writes the bytes it was read from (memory.json is part of the model hash)."""
        config = from_dict(cls, d)
        floats = [name for name, tp in typing.get_type_hints(cls).items() if tp is float]
        ints = {name: d[name] for name in floats if type(d.get(name)) is int}
        return dataclasses.replace(config, **ints) if ints else config


@dataclass
class TrainableRows:
    """The value rows that take gradient inside a `ValueTable.train_rows` block."""

    rows: torch.Tensor
    """(t,) int64 slot ids, sorted and unique."""
    delta: torch.Tensor
    """(t, v_dim) zeros with requires_grad; after backward, `delta.grad[j]` = dLoss/dV[rows[j]]."""


def _bag(indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[b, j] · table[indices[b, j]]: one `F.embedding_bag` sum, or the same with a faster
    backward where `smviz.kernels` has one for the device."""
    if kernels.fast_bag(table.device):
        return kernels.weighted_bag(indices, table, weights)
    return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")


class ValueTable(nn.Module):
    """The (N, v_dim) value rows of a memory, read as weighted bags of rows.

    `train_rows(rows)` confines gradient to the given rows for the duration of a `with` block:
    the forward pass is unchanged (bit for bit), and the gradient for those rows lands in a
    (t, v_dim) tensor instead of the (N, v_dim) table — a row-indexed form of the paper's
    straight-through mask V_eff = m⊙V + sg(V) − sg(m⊙V). The caller applies the update::

        with table.train_rows(rows) as trainable:
            model(**batch).loss.backward()
        with torch.no_grad():   # SGD on those rows only; every other row stays bit-identical
            table.weight.index_add_(0, trainable.rows, -lr * trainable.delta.grad)

    `train_rows()` without rows lets the forward pass choose them: `choose_rows(rows)` called from an
    access hook (which runs after the lookup, before the values are read) decides which rows the
    rest of the pass trains — how sparse finetuning picks the top-t of a batch's own reads in one pass.
    """

    def __init__(self, n_slots: int, v_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_slots, v_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=v_dim**-0.5)
        self._trainable: TrainableRows | None = None

    @property
    def n_slots(self) -> int:
        return self.weight.shape[0]

    def bag(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_j weights[b, j] · V[indices[b, j]] for each row b: (M, J) ids and weights → (M, v_dim)."""
        if self._trainable is None:
            return _bag(indices, self.weight, weights)
        out = _bag(indices, self.weight.detach(), weights)
        rows, delta = self._trainable.rows, self._trainable.delta
        if len(rows) == 0:
            return out
        # Reads of trainable rows also go through delta (all zeros): the forward value is unchanged
        # and the gradient of those reads lands in delta. pos = place of each read in the sorted rows.
        pos = torch.searchsorted(rows, indices).clamp_(max=len(rows) - 1)
        hit = rows[pos] == indices
        return out + _bag(pos, delta, weights * hit)

    @contextmanager
    def train_rows(self, rows: torch.Tensor | None = None) -> Iterator[TrainableRows]:
        """Within the block, gradient reaches only `rows` (any order, duplicates allowed) and no other
        value row; `table.weight` itself receives none. `rows` None: none until `choose_rows`."""
        if self._trainable is not None:
            raise RuntimeError("train_rows blocks cannot be nested")
        self._trainable = self._make_trainable([] if rows is None else rows)
        try:
            yield self._trainable
        finally:
            self._trainable = None

    def choose_rows(self, rows: torch.Tensor) -> None:
        """Inside `train_rows()`, make `rows` the trainable rows (the yielded object is updated in place)."""
        if self._trainable is None:
            raise RuntimeError("choose_rows needs an enclosing `with table.train_rows():` block")
        chosen = self._make_trainable(rows)
        self._trainable.rows, self._trainable.delta = chosen.rows, chosen.delta

    def _make_trainable(self, rows: torch.Tensor | Sequence[int]) -> TrainableRows:
        rows = torch.as_tensor(rows, device=self.weight.device).long().unique(sorted=True)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_slots):
            raise ConfigError(f"row ids must lie in [0, {self.n_slots}), got {rows[0].item()}..{rows[-1].item()}")
        delta = torch.zeros(len(rows), self.weight.shape[1], device=self.weight.device, dtype=self.weight.dtype)
        return TrainableRows(rows, delta.requires_grad_(True))


class ProductKeyMemory(nn.Module):
    """One product-key memory layer, (B, T, dim) → (B, T, dim). See the module docstring."""

    def __init__(
        self,
        config: MemoryConfig,
        dim: int,
        *,
        shared_values: ValueTable | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        c = config
        self.v_dim = c.v_dim or dim
        half = c.k_dim // 2
        factory = {"device": device, "dtype": dtype}

        self.query = nn.Linear(dim, c.heads * c.k_dim, **factory)
        if c.query_norm == "layernorm":
            self.query_norm: nn.Module = nn.LayerNorm(c.heads * c.k_dim, **factory)
        elif c.query_norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(c.heads * c.k_dim, **factory)
        else:
            self.query_norm = nn.Identity()
        # Each head has its own two sub-key sets: keys[h, s] is half s of head h, (n_keys, k_dim/2).
        self.keys = nn.Parameter(torch.empty(c.heads, 2, c.n_keys, half, **factory))
        self.query_gain = nn.Parameter(torch.ones(half, **factory)) if c.qk_norm else None

        if shared_values is None:
            self.values = ValueTable(c.n_slots, self.v_dim, **factory)
        else:
            if shared_values.weight.shape != (c.n_slots, self.v_dim):
                raise ConfigError("a shared value table must have shape (n_keys², v_dim)")
            # A plain reference: the table is owned (registered, saved) by another layer of this model.
            self.__dict__["_shared_values"] = shared_values

        self.w1 = nn.Linear(dim, self.v_dim, **factory) if c.swilu else None
        self.w2 = nn.Linear(self.v_dim, dim, **factory)

        self.enabled = True  # False: the layer outputs zeros (its term removed), see MemoryModel.memory_off
        self.aux_loss: torch.Tensor | None = None  # usage-balancing loss of the last training forward
        self.token_mask: torch.Tensor | None = None  # (B, T') attention mask of the current call, or None
        self._access_hooks: OrderedDict[int, AccessHook] = OrderedDict()  # weak-referenceable, for RemovableHandle
        self.reset_parameters()

    @property
    def value_table(self) -> ValueTable:
        """The value rows this layer reads (its own, or the model's shared table)."""
        return self._modules["values"] if "values" in self._modules else self.__dict__["_shared_values"]

    @property
    def owns_values(self) -> bool:
        return "values" in self._modules

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as Meta's reference code: keys U(±1/√k_dim), values N(0, v_dim^-½) (in ValueTable),
        query Xavier-uniform, W1/W2 N(0, dim^-½); W2 zero in parallel mode so the layer starts silent."""
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        bound = 1 / math.sqrt(self.config.k_dim)
        nn.init.uniform_(self.keys, -bound, bound)
        for lin in (self.w1, self.w2):
            if lin is not None:
                nn.init.normal_(lin.weight, std=self.dim**-0.5)
                nn.init.zeros_(lin.bias)
        if self.config.mode == "parallel":
            nn.init.zeros_(self.w2.weight)

    def add_access_hook(self, fn: AccessHook) -> RemovableHandle:
        """Call `fn(layer, indices, weights, mask)` (see `AccessHook`) on every forward while enabled;
        `handle.remove()` detaches it."""
        handle = RemovableHandle(self._access_hooks)
        self._access_hooks[handle.id] = fn
        return handle

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Product-key search for token states x (M, dim).

        Returns slot ids (M, H, K) int64, their scores (M, H, K) (best first) and the sub-key scores
        (M, H, 2, n_keys) from which they were chosen."""
        c = self.config
        q = self.query_norm(self.query(x)).view(-1, c.heads, 2, c.k_dim // 2)
        keys = self.keys
        if self.query_gain is not None:
            q = F.rms_norm(q, q.shape[-1:]) * self.query_gain
            keys = F.rms_norm(keys, keys.shape[-1:])
        sub_scores = torch.einsum("mhsd,hsnd->mhsn", q, keys)  # (M, H, 2, n_keys)
        if self.query_gain is not None:
            sub_scores = sub_scores * (c.k_dim // 2) ** -0.5
        s, i = sub_scores.topk(c.knn, dim=-1)  # (M, H, 2, K) per half, best first
        if kernels.fast_search():  # the same result from the pairs of ranks that can reach the top-k
            slots, scores = kernels.best_pairs(s, i, c.n_keys)
            return slots, scores, sub_scores
        pair_sums = s[:, :, 0, :, None] + s[:, :, 1, None, :]  # (M, H, K, K)
        scores, flat = pair_sums.flatten(-2).topk(c.knn, dim=-1)  # (M, H, K)
        i1 = i[:, :, 0].gather(-1, flat // c.knn)
        i2 = i[:, :, 1].gather(-1, flat % c.knn)
        return i1 * c.n_keys + i2, scores, sub_scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            self.aux_loss = None
            return torch.zeros_like(x)
        c = self.config
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.dim)
        indices, scores, sub_scores = self.lookup(x2)
        # softmax in at least float32 (bf16/fp16 scores lose the ranking's fine differences)
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(x.dtype)
        want_aux = self.training and c.balance_weight > 0
        mask = self._mask_for(lead) if (self._access_hooks or want_aux) else None
        if self._access_hooks:
            shape = (*lead, c.heads, c.knn)
            for fn in list(self._access_hooks.values()):
                fn(self, indices.view(shape), weights.view(shape), mask)
        self.aux_loss = None
        if want_aux:
            real = slice(None) if mask is None else mask.reshape(-1)
            if len(indices[real]):  # an all-padding batch has no reads to balance
                self.aux_loss = self._balance_loss(indices[real], sub_scores[real])
        y = self.value_table.bag(indices.view(len(x2), -1), weights.view(len(x2), -1))
        if self.w1 is not None:
            y = y * F.silu(self.w1(x2))
        return self.w2(y).view(*lead, self.dim)

    def _mask_for(self, lead: torch.Size) -> torch.Tensor | None:
        """The (B, T) real-token mask for input of shape `lead`; with a KV cache the attention mask
        covers past + current positions, and the current ones are its last T columns."""
        mask = self.token_mask
        if mask is None or len(lead) != 2 or mask.shape[0] != lead[0] or mask.shape[1] < lead[1]:
            return None
        return mask[:, mask.shape[1] - lead[1] :].bool()

    def _balance_loss(self, indices: torch.Tensor, sub_scores: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer-style balance loss on each head's two sub-key sets: n_keys · Σ_j f_j · P_j,
        f_j = share of this batch's top-k reads whose half-key is j (counted, no gradient), P_j = mean
        softmax over the n_keys sub-key scores (differentiable). Equals 1 when reads are uniform."""
        c = self.config
        m = indices.shape[0]
        halves = torch.stack((indices // c.n_keys, indices % c.n_keys), dim=2)  # (M, H, 2, K)
        offset = torch.arange(c.heads * 2, device=indices.device).view(1, c.heads, 2, 1) * c.n_keys
        counts = torch.bincount((halves + offset).flatten(), minlength=c.heads * 2 * c.n_keys)
        f = counts.view(c.heads, 2, c.n_keys).to(sub_scores.dtype) / (m * c.knn)
        p = torch.softmax(sub_scores, dim=-1, dtype=torch.promote_types(sub_scores.dtype, torch.float32)).mean(0)
        return c.n_keys * (f * p).sum(-1).mean()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"slots={c.n_slots}, heads={c.heads}, knn={c.knn}, k_dim={c.k_dim}, v_dim={self.v_dim}, "
            f"mode={c.mode}, swilu={c.swilu}, query_norm={c.query_norm}, qk_norm={c.qk_norm}, "
            f"shared_values={not self.owns_values}"
        )
