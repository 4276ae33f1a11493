"""Held-out text and memory use: `heldout_nll` (summed token losses / predicted tokens) and
`memory_usage` (`UsageMonitor` read counts per memory block) over rows of token ids."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from smviz.errors import ConfigError
from smviz.evaluate.mode import eval_mode
from smviz.io import strict_json
from smviz.usage import UsageMonitor

if TYPE_CHECKING:
    from smviz.model import MemoryModel


def check_rows(token_rows: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Refuse token rows that are not a 2-D LongTensor, or a mask of another shape (ConfigError)."""
    if not isinstance(token_rows, torch.Tensor) or token_rows.dim() != 2 or token_rows.dtype != torch.long:
        raise ConfigError("token rows must be a 2-D torch.LongTensor of shape (rows, seq_len)")
    if attention_mask is not None and attention_mask.shape != token_rows.shape:
        raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)} differs from the rows' {tuple(token_rows.shape)}")


def heldout_nll(
    model: MemoryModel,
    token_rows: torch.LongTensor,
    batch_size: int = 16,
    *,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Mean negative log-likelihood (nats) per predicted token of `token_rows` (n, seq_len): every
    token after the first of each row is predicted from the ones before it; the sum of all token
    losses is divided by the number of predicted tokens (not a mean of batch means). With an
    `attention_mask`, a token counts only if it and its predecessor are real (mask 1)."""
    check_rows(token_rows, attention_mask)
    n, seq_len = token_rows.shape
    device = model.device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, n, batch_size):
            ids = token_rows[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            if mask is not None:
                keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).reshape(-1)
                losses = losses[keep]
            total += losses.double().sum().item()
            count += losses.numel()
    nll = total / count if count else None
    return {
        "protocol": f"mean NLL (nats) per predicted token over {n} rows of {seq_len} tokens",
        "nll": nll,
        "ppl": math.exp(nll) if nll is not None else None,
        "tokens": count,
        "rows": n,
        "seq_len": seq_len,
    }


def memory_usage(
    model: MemoryModel,
    token_rows: torch.LongTensor,
    batch_size: int = 16,
    *,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Slot-read metrics (`usage_metrics`) per memory block over `token_rows`, counted with
    `UsageMonitor` (every token × head × top-k read once; positions with mask 0 skipped). Blocks
    are keyed by their index as a string; NaN (no reads) is reported as None."""
    check_rows(token_rows, attention_mask)
    n, seq_len = token_rows.shape
    device = model.device
    with eval_mode(model), UsageMonitor(model) as monitor:
        for start in range(0, n, batch_size):
            ids = token_rows[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            model(input_ids=ids, attention_mask=mask)
        metrics = monitor.metrics()
    tokens = n * seq_len if attention_mask is None else int(attention_mask.bool().sum().item())
    return {
        "protocol": f"reads counted over {tokens} tokens, padding excluded",
        "tokens": tokens,
        "rows": n,
        "seq_len": seq_len,
        "blocks": {str(i): strict_json(m) for i, m in metrics.items()},  # strict JSON: no NaN
    }
