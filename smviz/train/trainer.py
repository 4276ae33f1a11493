"""`Trainer`: one finetuning method's training of a model, step by step — which parameters train (by what
the method trains: value rows picked by its selection rule, all parameters, or LoRA adapters), how a
step updates them, and the resume state. `finetune` drives it over a stream and writes the run
directory; `smviz.analysis.min_t` drives it on one fact.

Choices where the paper is silent (see also paper-notes §2): plain SGD has no momentum and no weight
decay; the loss is the mean token cross-entropy over the whole paraphrase (end-of-text included,
padding excluded); selection is per memory layer with t rows each. The caller runs the model in eval
mode (no dropout in the presets, normalisation statistics frozen, no usage-balancing loss), so a
value-row step changes nothing but its rows.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch

from smviz.distributed import all_reduce_sum
from smviz.errors import RunError
from smviz.model import MemoryModel
from smviz.stats import SlotStats, batch_counts
from smviz.train import lora
from smviz.train.config import FinetuneConfig
from smviz.train.data import IGNORE_INDEX
from smviz.train.methods import ADAPTERS, ALL_PARAMETERS, VALUE_ROWS
from smviz.train.row_optim import RowAdamW, RowSGD
from smviz.train.rundir import OPTIMIZER, TRAINABLE
from smviz.train.selection import RowSelector, Selection
from smviz.train.state import flatten_optimizer, load_optimizer


class StepResult(NamedTuple):
    """What one step did (unpacks as `loss, selections, grad_norms = trainer.step(...)`)."""

    loss: float
    selections: dict[int, Selection]
    """Per memory layer: the slots read and the rows selected (none for full / LoRA)."""
    grad_norms: dict[int, float]
    """Per memory layer: the gradient norm of what trained (value rows: that layer's selected rows;
    full / LoRA: all trainable parameters)."""


class Trainer:
    """Trains `model` in place with `config` (resolved: `FinetuneConfig.resolved()`); `stats` are the
    model's background statistics, which a method that ranks against them needs.

    Under torchrun (`world_size` > 1) each process steps on its part of the global batch: the read
    counts are summed over processes before selection (so all pick the same rows), the loss is each
    process's token sum over the global token count, and the gradients — the (t, v_dim) rows of a
    value-row method, every trainable parameter's of full finetuning and LoRA — are summed, so every
    process makes the single process's update on the whole batch (equal up to the order of float sums)."""

    def __init__(self, model: MemoryModel, config: FinetuneConfig, stats: SlotStats | None, device: torch.device,
                 world_size: int = 1) -> None:
        self.model, self.config, self.device, self.world_size = model, config, device, world_size
        self.trains = config.spec.trains
        self.peft_model = None
        if self.trains == VALUE_ROWS:
            for p in model.parameters():
                p.requires_grad_(False)
            self.selector = RowSelector(config.method, config.top_t, model.memory_config.n_slots, stats, device, config.seed)
            self.row_optimizers: dict[int, RowSGD | RowAdamW] = {}
            for block, layer in model.memory_layers.items():
                if config.optimizer == "sgd":
                    self.row_optimizers[block] = RowSGD(config.lr)
                else:
                    table = layer.value_table.weight
                    self.row_optimizers[block] = RowAdamW(table.shape[0], table.shape[1], config.lr,
                                                          weight_decay=config.weight_decay, device=device)
            return
        if self.trains == ADAPTERS:
            self.peft_model = lora.attach(model, config.lora_targets, config.lora_rank, config.lora_alpha, config.seed)
        if self.trains == ALL_PARAMETERS:  # every parameter, or every one outside the memory layers
            memory = {id(p) for layer in model.memory_layers.values() for p in layer.parameters()}
            for p in model.parameters():
                p.requires_grad_(not (config.freeze_memory and id(p) in memory))
        params = [p for p in model.parameters() if p.requires_grad]  # LoRA: its adapters
        # full finetuning with value_lr_mult: the value tables in a group of their own, at their own rate
        values = {id(layer.value_table.weight) for layer in model.memory_layers.values()} if config.value_lr_mult != 1.0 else set()
        groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in values], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if values:
            groups.append({"params": [p for p in params if id(p) in values], "weight_decay": config.weight_decay,
                           "lr": config.lr * config.value_lr_mult})
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=config.lr)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    @property
    def trains_rows(self) -> bool:
        return self.trains == VALUE_ROWS

    def step(self, batch: dict[str, torch.Tensor], step: int) -> StepResult:
        """One update on `batch` (on the model's device) at stream step `step` (0-based). A loss that is
        not finite stops the run before anything is updated (RunError)."""
        selections: dict[int, Selection] = {}
        n_slots = self.model.memory_config.n_slots
        rows = self.trains_rows
        with ExitStack() as stack:
            trainables = {}
            for block, layer in self.model.memory_layers.items():
                if rows:
                    trainables[block] = stack.enter_context(layer.value_table.train_rows())

                def read(layer_module, indices, weights, mask, block=block):
                    counts = all_reduce_sum(batch_counts(indices, mask, n_slots), self.world_size)
                    if rows:
                        chosen = self.selector.select(block, counts, step)
                        layer_module.value_table.choose_rows(chosen.rows)
                    else:  # full / LoRA: record what was read, select nothing
                        read_slots = torch.nonzero(counts).flatten()
                        empty = read_slots[:0]
                        chosen = Selection(empty, empty.double(), empty, empty.double(), accessed=len(read_slots))
                    selections[block] = chosen

                stack.callback(layer.add_access_hook(read).remove)
            loss, value = self._loss(batch)
            if not math.isfinite(value):
                raise RunError(f"step {step + 1}: the training loss is {value} (not finite): the run diverged; "
                               "lower the learning rate (--lr) and start it again in a new run directory")
            loss.backward()
            grad_norms: dict[int, float] = {}
            if rows:
                for block, layer in self.model.memory_layers.items():
                    t = trainables[block]
                    train = t.rows
                    grad = all_reduce_sum(t.delta.grad if t.delta.grad is not None else torch.zeros_like(t.delta), self.world_size)
                    if self.selector.rule.ranks_gradient and len(train):  # every read row has a gradient: keep top_t
                        selections[block], keep = selections[block].by_gradient(grad, self.config.top_t)
                        train, grad = train[keep], grad[keep]
                    grad_norms[block] = torch.linalg.vector_norm(grad).item() if len(train) else 0.0
                    if len(train):
                        self.row_optimizers[block].step(layer.value_table.weight, train, grad)
        if not rows:
            if self.world_size > 1:
                for p in self.trainable.values():
                    p.grad = all_reduce_sum(p.grad if p.grad is not None else torch.zeros_like(p), self.world_size)
            grads = [p.grad for p in self.trainable.values() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item() if grads else 0.0
            grad_norms = dict.fromkeys(selections, norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return StepResult(value, selections, grad_norms)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """(the loss to backpropagate, the batch's mean token loss). One process: the model's mean
        over its batch. Several: this process's token sum over the global number of target tokens."""
        out = self.model(**batch)
        if self.world_size == 1:
            return out.loss, out.loss.item()
        n_local = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        local_sum = out.loss * n_local if n_local else out.logits.sum() * 0.0  # no targets here: nothing to add
        totals = all_reduce_sum(torch.stack([local_sum.detach().double(), torch.tensor(float(n_local), dtype=torch.float64,
                                                                                       device=local_sum.device)]), self.world_size)
        n_global = float(totals[1])
        return local_sum / max(n_global, 1.0), float(totals[0]) / max(n_global, 1.0)

    # ---- deltas and resume state (the run directory stores them: smviz.train.rundir)

    def delta(self, selections: dict[int, Selection]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{block: (the step's selected rows, sorted; their values now)} — a value-row step's delta."""
        out = {}
        for block, s in selections.items():
            rows = torch.sort(s.rows).values
            out[block] = (rows, self.model.memory_layers[block].value_table.weight[rows].detach())
        return out

    @torch.no_grad()
    def apply_delta(self, delta: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a stored step's rows into the model (replaying a run up to its resume point)."""
        for block, layer in self.model.memory_layers.items():
            rows, values = delta[block]
            layer.value_table.weight[rows] = values.to(layer.value_table.weight.dtype)

    def state(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """(JSON layout, {file name: tensors}) of the optimizer (and, for full / LoRA, the trained weights)."""
        if self.trains_rows:
            tensors = {f"{block}.{k}": v for block, o in self.row_optimizers.items() for k, v in o.state_dict().items()}
            return {}, {OPTIMIZER: tensors}
        weights = {n: p.detach().cpu().contiguous() for n, p in self.trainable.items()}
        tensors, layout = flatten_optimizer(self.optimizer)
        return {"optimizer": layout}, {TRAINABLE: weights, OPTIMIZER: tensors}

    def load_state(self, layout: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what `state` returned (tensors as read from disk, on the CPU)."""
        flat = tensors[OPTIMIZER]
        if self.trains_rows:
            for block, o in self.row_optimizers.items():
                o.load_state_dict({k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == str(block)})
            return
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(tensors[TRAINABLE][n])
        load_optimizer(self.optimizer, flat, layout["optimizer"], self.device)

    def final_model(self) -> MemoryModel:
        """The model as it stands (LoRA: a merged copy — adapters folded into the weights)."""
        return self.model if self.peft_model is None else lora.merged(self.model)

    def trainable_per_step(self) -> int | None:
        """Numbers trained per step (None when it varies: a rule without a fixed t, e.g. memory-all)."""
        if self.trains_rows:
            if not self.config.spec.uses_top_t:
                return None
            v_dim = next(iter(self.model.memory_layers.values())).value_table.weight.shape[1]
            return self.config.top_t * v_dim * len(self.model.memory_layers)
        return sum(p.numel() for p in self.trainable.values())

    def optimizer_state_elements(self) -> int:
        if self.trains_rows:
            return sum(o.state_elements() if isinstance(o, RowAdamW) else 0 for o in self.row_optimizers.values())
        return sum(t.numel() for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
