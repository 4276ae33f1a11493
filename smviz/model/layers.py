"""Layer resolution, once for the whole library: which memory layer a `layer=` argument means, given
the memory-layer block indices of a model, a trace, a run or background statistics."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from smviz.errors import ConfigError


def resolve_layer(layer: int | None, layers: Iterable[int], *, what: str = "the model") -> int:
    """The block index `layer` names among `layers` (the memory layers of `what`, e.g. "this trace"):
    None means the only memory layer. A ConfigError, in one style everywhere, when None is ambiguous
    or `layer` is not one of them."""
    available = sorted(int(i) for i in layers)
    if layer is None:
        if len(available) != 1:
            raise ConfigError(f"{what} has memory layers {available}; say which one (layer=...)")
        return available[0]
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in available:
        raise ConfigError(f"{what} has no memory layer {layer!r}; its memory layers are {available}")
    return int(layer)
