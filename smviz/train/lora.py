"""LoRA for method `lora` (PEFT): which layers of a model it adapts — `nn.Linear` layers, and GPT-2's
`Conv1D` (weights stored transposed, adapted with `fan_in_fan_out`) — attaching the adapters with a
seeded initialisation, and folding them into the weights at the end. The frozen-parameter audit
(`smviz.analysis.diff`) asks `adapted_weights` which weights LoRA may change."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers.pytorch_utils import Conv1D

from smviz.errors import ConfigError

if TYPE_CHECKING:
    from smviz.model import MemoryModel

# attention and FFN projections: Llama / Mistral / Qwen2 names, then GPT-2's
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc")
MEMORY_TARGETS = ("query", "w1", "w2")  # a memory layer's query projection and its output gate / projection
ADAPTABLE = (torch.nn.Linear, Conv1D)


def adaptable_modules(lm: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.nn.Module]:
    """{module name: module} of the layers of `lm` that LoRA adapts: nn.Linear or Conv1D layers whose
    last name part is one of `targets` (as PEFT matches a list of names)."""
    wanted = set(targets)
    return {name: m for name, m in lm.named_modules() if name.rsplit(".", 1)[-1] in wanted and isinstance(m, ADAPTABLE)}


def adapted_weights(model: MemoryModel, targets: Sequence[str]) -> set[str]:
    """State-dict names of the weights LoRA with `targets` changes (its adapters merged into them;
    adapters have no bias)."""
    return {f"{name}.weight" for name in adaptable_modules(model.lm, targets)}


def attach(model: MemoryModel, targets: Sequence[str], rank: int, alpha: float, seed: int) -> torch.nn.Module:
    """Inject LoRA adapters into `model.lm` in place (initialised from `seed`); returns the PEFT model.
    A ConfigError when none of `targets` is an adaptable layer of the model."""
    from peft import LoraConfig, get_peft_model

    modules = adaptable_modules(model.lm, targets)
    names = sorted({name.rsplit(".", 1)[-1] for name in modules})
    if not names:
        raise ConfigError(f"none of the LoRA targets {list(targets)} is a linear layer (nn.Linear or Conv1D) of this model")
    # Conv1D stores its weight as (in, out): PEFT adapts it with fan_in_fan_out (per layer, so a model
    # mixing both kinds is adapted right too)
    conv = any(isinstance(m, Conv1D) for m in modules.values())
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[t for t in targets if t in names], lora_dropout=0.0,
                      bias="none", fan_in_fan_out=conv)
    with torch.random.fork_rng(devices=[]):  # adapter initialisation is part of the run: seeded
        torch.manual_seed(seed)
        return get_peft_model(model.lm, lora)  # adapters are injected into model.lm in place


def merged(model: MemoryModel) -> MemoryModel:
    """A copy of `model` with every LoRA adapter folded into its layer's weight and removed."""
    out = copy.deepcopy(model)
    for module in out.lm.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    lm = out.lm
    for name, module in list(lm.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, child, module.base_layer)
    for p in lm.parameters():
        p.requires_grad_(True)
    return out
