"""Optimizer state without pickling, shared by pretraining and finetuning: a torch optimizer's state as
safetensors tensors plus a JSON layout, and back (the run directory stores both: `smviz.train.rundir`)."""

from __future__ import annotations

from typing import Any

import torch


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as safetensors tensors plus a JSON layout (no pickling anywhere)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"{index}.{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def load_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor], layout: dict[str, Any],
                   device: torch.device) -> None:
    """Restore what `flatten_optimizer` returned (tensors on the CPU, as read from disk)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        index, key = name.split(".", 1)
        # AdamW keeps `step` on the CPU unless capturable; moments live with their parameters
        state.setdefault(int(index), {})[key] = tensor if key == "step" else tensor.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})
