"""Choosing which value rows a batch trains: the selection-rule registry and `RowSelector`, which
applies a rule per memory layer inside the forward pass.

Selection runs from an access hook: the hook sees the batch's reads after the product-key lookup and
before the values are read, counts them (padding excluded, every head, every one of the top-k:
`smviz.stats.batch_counts`), scores and ranks the read slots on the device, and hands the chosen
rows to `ValueTable.choose_rows`. One forward pass therefore both selects and computes the (t, v_dim)
gradient; no N×v_dim mask, gradient or optimizer state exists.

A rule sees only the slots the batch read (`Reads`), so a slot never read is never selected; rules
that rank use `smviz.stats.rank` (score descending, ties to the lower slot id). Registering a rule also
registers the finetuning method that trains with it (`SelectionRule.method`, default: the rule's name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from smviz.errors import ConfigError
from smviz.stats import SlotStats, idf, rank
from smviz.train.methods import MEMORY_LR, VALUE_ROWS, Method, get_method, register_method


@dataclass
class Selection:
    """What one layer selected in one step (tensors on the model's device)."""

    rows: torch.Tensor  # (t,) int64 slot ids, best first
    tf: torch.Tensor  # (t,) float: c(i) / Σc
    df: torch.Tensor  # (t,) int64 background document frequency (-1 without background statistics)
    score: torch.Tensor  # (t,) float: the rule's score
    accessed: int  # distinct slots the batch read

    def by_gradient(self, grad: torch.Tensor, top_t: int) -> tuple[Selection, torch.Tensor]:
        """For a `ranks_gradient` rule's selection (every read row, ascending, as `grad`'s rows are):
        the `top_t` rows of largest gradient norm (score: the norm; ties to the lower slot id) and
        their positions in `grad`."""
        norms = torch.linalg.vector_norm(grad.double(), dim=1)
        keep = rank(norms, top_t)
        return Selection(self.rows[keep], self.tf[keep], self.df[keep], norms[keep], self.accessed), keep


@dataclass(frozen=True)
class LayerBackground:
    """One memory layer's background statistics, on the device (they never change during a run)."""

    counts: torch.Tensor  # (N,) int64 reads per slot
    total: int  # Σ counts
    df: torch.Tensor  # (N,) int64 document frequency
    idf: torch.Tensor  # (N,) float64 `smviz.stats.idf`
    n_docs: int


@dataclass(frozen=True)
class Reads:
    """What a rule chooses from: the slots one memory layer read in one batch."""

    slots: torch.Tensor  # (r,) int64 slot ids read, ascending
    counts: torch.Tensor  # (r,) int64 reads of each
    tf: torch.Tensor  # (r,) float64 counts / Σ counts: the batch's read shares
    n_slots: int  # N, the memory's slots
    top_t: int
    step: int
    seed: int
    background: LayerBackground | None


@dataclass(frozen=True)
class SelectionRule:
    """A rule: `choose(reads)` → (score of every read slot, positions into `reads.slots` of the rows to
    train, best first)."""

    name: str
    choose: Callable[[Reads], tuple[torch.Tensor, torch.Tensor]]
    help: str
    method: str | None = None
    """The finetuning method that trains with this rule (None: the rule's own name)."""
    needs_stats: bool = False
    """It reads `reads.background`, which must exist."""
    uses_top_t: bool = True
    """It picks at most `top_t` rows (else as many as it likes, e.g. every read slot)."""
    ranks_gradient: bool = False
    """It ranks by the value gradient: `choose` returns every read slot in ascending order (their
    gradients are computed), and the trainer keeps the `top_t` rows of largest gradient norm
    (`Selection.by_gradient`)."""

    @property
    def method_name(self) -> str:
        return self.method or self.name


_RULES: dict[str, SelectionRule] = {}


def register_rule(rule: SelectionRule) -> SelectionRule:
    """Add `rule` to the registry, with the method that trains with it (plain SGD by default, at the
    memory learning rates); a ConfigError if the rule's or the method's name is taken."""
    if rule.name in _RULES:
        raise ConfigError(f"a selection rule named {rule.name!r} is already registered")
    register_method(Method(rule.method_name, VALUE_ROWS, rule.help, "sgd", MEMORY_LR, rule=rule.name,
                           needs_stats=rule.needs_stats, uses_top_t=rule.uses_top_t))
    _RULES[rule.name] = rule
    return rule


def get_rule(name: str) -> SelectionRule:
    try:
        return _RULES[name]
    except KeyError:
        raise ConfigError(f"unknown selection rule {name!r}; choose one of {', '.join(_RULES)}") from None


def rule_names() -> tuple[str, ...]:
    return tuple(_RULES)


class RowSelector:
    """Picks a batch's rows per memory layer with the selection rule of finetuning method `method`."""

    def __init__(self, method: str, top_t: int, n_slots: int, stats: SlotStats | None, device: torch.device, seed: int = 0) -> None:
        spec = get_method(method)
        if spec.rule is None:
            raise ConfigError(f"method {method!r} trains {spec.trains}, not value rows chosen by a selection rule")
        self.rule = get_rule(spec.rule)
        if self.rule.uses_top_t and not 1 <= top_t <= n_slots:
            raise ConfigError(f"top_t must lie in [1, {n_slots}] (the memory's slots), got {top_t}")
        if self.rule.needs_stats and stats is None:
            raise ConfigError(f"{self.rule.name} selection needs the model's background slot statistics")
        self.method, self.top_t, self.n_slots, self.seed = method, top_t, n_slots, seed
        self.stats = stats
        self.background: dict[int, LayerBackground] = {}  # per memory block
        for layer in () if stats is None else stats.layers:
            row = stats.layer_index(layer)
            df = stats.df[row].to(device)
            self.background[layer] = LayerBackground(stats.counts[row].to(device), int(stats.counts[row].sum()), df,
                                                      idf(df, stats.n_docs), stats.n_docs)

    def select(self, layer: int, counts: torch.Tensor, step: int) -> Selection:
        """The rows layer `layer` trains, from the batch's per-slot counts (length N, on the device)."""
        read = torch.nonzero(counts).flatten()  # ascending ids
        c = counts[read]
        tf = c.double() / c.sum().clamp(min=1)
        background = self.background.get(layer)
        df = background.df[read] if background is not None else torch.full_like(read, -1)
        reads = Reads(read, c, tf, self.n_slots, self.top_t, step, self.seed, background)
        score, order = self.rule.choose(reads)
        return Selection(read[order], tf[order], df[order], score[order], accessed=len(read))
