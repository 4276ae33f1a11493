"""The distillation loss of a retrofit (`RetrofitConfig.distill`): the world's rows trained on their text,
every other row (corpus, replay) on the base model's whole next-token distribution, so that the memory
learns the world and leaves the base's predictions elsewhere alone."""

from __future__ import annotations

import torch

from smviz.errors import ConfigError
from smviz.model import MemoryModel
from smviz.train.data import IGNORE_INDEX


def distillation_loss(model: MemoryModel, batch: dict[str, torch.Tensor], logits: torch.Tensor, n_world: int,
                      weight: float) -> torch.Tensor:
    """The training loss of a distilling retrofit: next-token cross-entropy on the first `n_world` rows
    (the world's documents) and `weight` × KL(base ‖ model) on the rest (corpus and replay rows), where
    the base's distribution comes from a memory-off forward pass without gradient (the base itself, as the
    base is frozen and the memory parallel). Both are summed over the labelled next-token positions and
    divided by their count, so `weight` 1 swaps each row's text for the base's distribution at the same
    per-token weight as the cross-entropy it replaces."""
    labels = batch["labels"][:, 1:]
    student = logits[:, :-1].float().log_softmax(-1)
    labelled = labels != IGNORE_INDEX
    ce = -student[:n_world].gather(-1, labels[:n_world].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    total = (ce * labelled[:n_world]).sum()
    if n_world < len(labels):
        with torch.no_grad(), model.memory_off():
            teacher = model(input_ids=batch["input_ids"][n_world:], attention_mask=batch["attention_mask"][n_world:]
                            ).logits[:, :-1].float().log_softmax(-1)
        kl = (teacher.exp() * (teacher - student[n_world:])).sum(-1)
        total = total + weight * (kl * labelled[n_world:]).sum()
    return total / labelled.sum().clamp_min(1)


def check_distill(weight: float, dense_lr_mult: float, fact_share: float) -> None:
    """ConfigError for a distillation weight a retrofit cannot use."""
    if weight < 0:
        raise ConfigError(f"distill must be >= 0, got {weight}")
    if weight and dense_lr_mult:
        # memory off is the base only while the base is frozen: an unfrozen base would distil from itself
        raise ConfigError("distill needs the base frozen (dense_lr_mult 0): with the base training, the memory-off "
                          "model is no longer the base to distil from")
    if weight and fact_share >= 1:
        raise ConfigError("distill acts on corpus and replay rows, but fact_share 1 leaves a batch none")
