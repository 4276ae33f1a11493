"""The finetuning-method registry: each method's name (as on the command line and in run configs),
what it trains, whether it needs the model's background statistics, what the frozen-parameter audit
(`smviz.analysis.diff`) lets it change, and its default optimizer and learning rates.

Methods that train value rows are registered together with their selection rule
(`smviz.train.selection.register_rule`); the built-in methods are registered by `smviz.train.builtin`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from smviz.errors import ConfigError

# what a method trains
VALUE_ROWS = "value rows"  # the memory value rows its selection rule picks, step by step
ALL_PARAMETERS = "all parameters"  # every parameter of the model
ADAPTERS = "adapters"  # LoRA adapters on named linear layers, merged into their weights at the end
TRAINS = (VALUE_ROWS, ALL_PARAMETERS, ADAPTERS)

OPTIMIZERS = ("sgd", "adamw")

# what the frozen-parameter audit lets a method change, by what it trains
AUDIT_ALLOWS = {
    VALUE_ROWS: "the value rows it selected (any step), nothing else",
    ALL_PARAMETERS: "every parameter",
    ADAPTERS: "the weights of the linear layers named in its lora_targets (adapters merged into them)",
}


@dataclass(frozen=True)
class Method:
    """One finetuning method."""

    name: str
    """Its name on the command line and in run configs (`FinetuneConfig.method`)."""
    trains: str
    """What it trains: VALUE_ROWS, ALL_PARAMETERS or ADAPTERS."""
    help: str
    """One line for --help."""
    default_optimizer: str
    """The optimizer when none is given: 'sgd' or 'adamw'."""
    default_lr: Mapping[str, float] = field(default_factory=dict)
    """The learning rate when none is given, per optimizer."""
    rule: str | None = None
    """The selection rule that picks its value rows (VALUE_ROWS methods only)."""
    needs_stats: bool = False
    """It ranks against the model's background statistics (`SlotStats`), which must exist."""
    uses_top_t: bool = False
    """It trains `top_t` rows per step and memory layer (else every row its rule picks)."""

    def __post_init__(self) -> None:
        if self.trains not in TRAINS:
            raise ConfigError(f"method {self.name!r}: trains must be one of {list(TRAINS)}, got {self.trains!r}")
        if (self.rule is None) != (self.trains != VALUE_ROWS):
            raise ConfigError(f"method {self.name!r}: a selection rule is what a value-row method has, and only it")
        if self.default_optimizer not in OPTIMIZERS or set(self.default_lr) != set(OPTIMIZERS):
            raise ConfigError(f"method {self.name!r}: give a default optimizer and a default lr for each of {list(OPTIMIZERS)}")

    @property
    def audit_allows(self) -> str:
        """What the frozen-parameter audit lets the method change, in words."""
        return AUDIT_ALLOWS[self.trains]


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` to the registry; a ConfigError if its name is taken."""
    if method.name in _METHODS:
        raise ConfigError(f"a finetuning method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method `name`; a ConfigError naming the choices otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the order --help lists them)."""
    return tuple(_METHODS)


# Learning rates from the sweep on the tiny preset (analyses/finetuning.md); the paper's are lr 2-5
# for sparse SGD and 5e-6 (full) / up to 2e-4 (LoRA) at 1.3B.
MEMORY_LR = {"sgd": 1000.0, "adamw": 0.1}
FULL = Method("full", ALL_PARAMETERS, "full finetuning: every parameter", "adamw", {"sgd": 1e-2, "adamw": 5e-5})
LORA = Method("lora", ADAPTERS, "LoRA adapters on the attention and FFN projections (merged at the end)", "adamw",
              {"sgd": 1e-1, "adamw": 3e-4})
