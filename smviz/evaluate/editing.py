"""Knowledge-editing metrics per `smviz.data.edits.EditRecord`: `score_continuations` (the mean NLL and the
greedy match of a target after a prompt, in right-padded batches), `edit_scores` (the six metrics of
`EDIT_METRICS` per record) and `mean_edit_metrics` (their means, with `EDIT_PROTOCOL`).

Definitions (NLL = mean negative log-likelihood in nats per target token, the target teacher-forced after
the prompt; greedy match = the argmax of the logits equals the target token at every target position, i.e.
greedy decoding writes exactly the target):
- efficacy_prob: 1 if NLL(target_new | rewrite prompt) < NLL(target_true | rewrite prompt), else 0;
  efficacy_em: 1 if target_new is a greedy match on the rewrite prompt, else 0.
- generalization_prob / generalization_em: the same on each paraphrase prompt, averaged over the record's
  paraphrases (None without paraphrases).
- locality_prob: the mean over the neighborhood (prompt, answer) pairs of 1[NLL(answer | prompt) <
  NLL(target_new | prompt)]; locality_em: the mean of the answer's greedy match (None without neighborhood).

Where they come from: ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023) score CounterFact by comparing
probabilities, ROME's `test_batch_prediction` averaging the target tokens' NLL: efficacy (rewrite prompts,
new beats true), paraphrase (the same on paraphrases) and neighborhood (true beats new on neighborhood
prompts, whose answer is target_true) scores. EasyEdit (Wang et al. 2023) reports reliability,
generalization and locality as token accuracy of the teacher-forced answer; the `_em` metrics are its exact
form (every token right). For zsRE the neighborhood pairs are its loc question and loc_ans, compared the same
way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from smviz.data.edits import EditRecord
from smviz.data.prompts import get_prompt_format
from smviz.data.tokenizer import right_pad
from smviz.errors import ConfigError
from smviz.evaluate.mode import eval_mode

if TYPE_CHECKING:
    from smviz.model import MemoryModel

EDIT_METRICS = (
    "efficacy_prob", "efficacy_em", "generalization_prob", "generalization_em", "locality_prob", "locality_em",
)

EDIT_PROTOCOL = (
    "Each prompt is encoded by the prompt format and its answer teacher-forced after it; NLL is the mean "
    "negative log-likelihood (nats) per answer token, and an answer is a greedy match when the argmax of the "
    "logits is the answer token at every answer position. efficacy_prob: 1 if NLL(target_new) < "
    "NLL(target_true) on the rewrite prompt (ROME/MEMIT efficacy score), efficacy_em: 1 if target_new is a "
    "greedy match there (EasyEdit reliability, exact); generalization_prob/_em: the same on each paraphrase "
    "prompt, averaged over the record's paraphrases (ROME paraphrase score, EasyEdit generalization); "
    "locality_prob: the fraction of neighborhood prompts where NLL(kept answer) < NLL(target_new) (ROME "
    "neighborhood score), locality_em: the fraction where the kept answer is a greedy match (EasyEdit "
    "locality, exact). Metrics a record cannot have (no paraphrases, no neighborhood) are None and left out "
    "of the means, which are over records."
)


def score_continuations(
    model: MemoryModel,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 32,
) -> list[tuple[float, bool]]:
    """(mean NLL in nats per target token, greedy match) of every (prompt_ids, target_ids) pair, in order:
    the target teacher-forced after the prompt; greedy match when the argmax of the logits is the target
    token at every target position. Pairs of similar lengths share a right-padded batch of `batch_size`
    rows, one forward each."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for i, (prompt_ids, target_ids) in enumerate(pairs):
        if not len(prompt_ids) or not len(target_ids):
            raise ConfigError(f"pair {i} has an empty {'prompt' if not len(prompt_ids) else 'target'}: "
                              "both the prompt and the target need at least one token")
    sequences = [list(p) + list(t) for p, t in pairs]
    # 1 where a token belongs to the target: shifted by one, where the logits predict a target token
    is_target = [[0] * len(p) + [1] * len(t) for p, t in pairs]
    order = sorted(range(len(pairs)), key=lambda i: (len(sequences[i]), i))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    device = model.device
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = right_pad([sequences[i] for i in chunk], 0)  # padding is masked out and never scored
            targets, _ = right_pad([is_target[i] for i in chunk], 0)
            ids, mask = ids.to(device), mask.to(device)
            predicts = targets[:, 1:].bool().to(device)  # (rows, width - 1)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][predicts].float()  # (tokens, V)
            labels = ids[:, 1:][predicts]
            token_nll = -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
            missed = (logits.argmax(dim=-1) != labels).long()
            row = predicts.nonzero()[:, 0]  # the batch row of every scored token
            n_rows = len(chunk)
            nll_sum = torch.zeros(n_rows, device=device).index_add_(0, row, token_nll)
            n_missed = torch.zeros(n_rows, dtype=torch.long, device=device).index_add_(0, row, missed)
            counts = predicts.sum(dim=1)
            for i, nll, miss in zip(chunk, (nll_sum / counts).tolist(), n_missed.tolist()):
                results[i] = (nll, miss == 0)
    return results


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def edit_scores(
    model: MemoryModel,
    records: Sequence[EditRecord],
    *,
    prompt_format: str = "completion",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """One row per record, in order: its id, the six `EDIT_METRICS` (see `EDIT_PROTOCOL`; None for a metric
    the record cannot have) and the rewrite prompt's "nll_new" and "nll_true". Every prompt and answer is
    encoded by `prompt_format` (`smviz.data.prompts`) and all are scored in one `score_continuations` call."""
    tokenizer = model.require_tokenizer("scoring edits")
    fmt = get_prompt_format(prompt_format)
    fmt.check(tokenizer)
    pairs: list[tuple[list[int], list[int]]] = []

    def add(prompt: str, answer: str) -> int:
        pairs.append(fmt.encode_pair(tokenizer, prompt, answer))
        return len(pairs) - 1

    # per record: (new, true) on the rewrite prompt and each paraphrase; (kept answer, new) per neighbor
    plans = []
    for r in records:
        rewrite = (add(r.rewrite_prompt, r.target_new), add(r.rewrite_prompt, r.target_true))
        paraphrases = [(add(p, r.target_new), add(p, r.target_true)) for p in r.paraphrase_prompts]
        neighbors = [(add(p, answer), add(p, r.target_new)) for p, answer in r.neighborhood]
        plans.append((r, rewrite, paraphrases, neighbors))
    scores = score_continuations(model, pairs, batch_size=batch_size)

    def beats(first: int, second: int) -> float:
        return float(scores[first][0] < scores[second][0])

    def greedy(i: int) -> float:
        return float(scores[i][1])

    rows = []
    for r, (new, true), paraphrases, neighbors in plans:
        rows.append({
            "id": r.id,
            "efficacy_prob": beats(new, true),
            "efficacy_em": greedy(new),
            "generalization_prob": _mean([beats(n, t) for n, t in paraphrases]),
            "generalization_em": _mean([greedy(n) for n, _ in paraphrases]),
            "locality_prob": _mean([beats(kept, n) for kept, n in neighbors]),
            "locality_em": _mean([greedy(kept) for kept, _ in neighbors]),
            "nll_new": scores[new][0],
            "nll_true": scores[true][0],
        })
    return rows


def mean_edit_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The protocol, the number of rows, and each of `EDIT_METRICS` averaged over the rows where it is not
    None (None when it is None everywhere)."""
    out: dict[str, Any] = {"protocol": EDIT_PROTOCOL, "n": len(rows)}
    for name in EDIT_METRICS:
        out[name] = _mean([row[name] for row in rows if row[name] is not None])
    return out
