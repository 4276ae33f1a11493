"""The closed-book QA protocol: `answer_questions` asks facts' questions and `answer_qa_items` asks a
QA evaluation set's items, each question put to the model in a prompt format (`smviz.data.prompts`:
`qa` by default, `completion` or `chat`) and nothing else; `generate_answers` decodes greedily in
left-padded batches, keeps the text up to the first newline, and the answers are scored
(`smviz.evaluate.scoring`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from smviz.data.facts import Fact
from smviz.data.formats.qa import QAItem
from smviz.data.prompts import get_prompt_format
from smviz.errors import ConfigError, InputError, ModelFileError
from smviz.evaluate.mode import eval_mode
from smviz.evaluate.scoring import answer_contained, exact_match, token_f1

if TYPE_CHECKING:
    from smviz.model import MemoryModel

HELDOUT_QUESTIONS = "heldout templates"
TRAINING_QUESTIONS = "training templates"


class _StopAtTokens(StoppingCriteria):
    """Per-row stop once the row has produced any of the flagged tokens (newline-bearing ones, eos)
    since generation began; `generate` ends the batch when every row has stopped."""

    def __init__(self, flagged: torch.Tensor, prompt_len: int) -> None:
        self.flagged = flagged  # (V,) bool lookup table
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :]
        inside = new.clamp(0, len(self.flagged) - 1)
        return (self.flagged[inside] & (new < len(self.flagged))).any(dim=-1)


def _newline_tokens(tokenizer, size: int, device: torch.device) -> torch.Tensor:
    """(size,) bool: token ids whose decoded text contains a newline."""
    n = min(len(tokenizer), size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    flagged = torch.zeros(size, dtype=torch.bool)
    flagged[: len(texts)] = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)
    return flagged.to(device)


def _left_padded(prompt_ids: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) as the tokenizer's left padding gives them: pads first, mask 0 there."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompt_ids], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], dtype=torch.long)
    return input_ids.to(device), attention_mask.to(device)


def generate_answers(
    model: MemoryModel, prompt_ids: Sequence[list[int]], *, batch_size: int = 32, max_new_tokens: int = 12
) -> list[str]:
    """The model's greedy answer to each encoded prompt, in order.

    Greedy decoding of at most `max_new_tokens` tokens in left-padded batches (prompts grouped by
    length); a row stops at its first newline-bearing token or eos; the answer is the continuation
    decoded without special tokens, cut at the first newline and stripped.
    """
    tokenizer = model.require_tokenizer("answering questions")
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelFileError("the model's tokenizer has neither a pad nor an eos token; batched generation needs one to pad with")
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise InputError(f"prompt {i} encodes to no tokens; the model needs at least one to answer from")
    if not prompt_ids:
        return []
    eos_id = tokenizer.eos_token_id

    device = model.device
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))  # similar lengths share a batch
    vocab = max(int(model.config.vocab_size), len(tokenizer))
    stop_ids = _newline_tokens(tokenizer, vocab, device)
    if eos_id is not None and eos_id < vocab:
        stop_ids[eos_id] = True

    answers: list[str] = [""] * len(prompt_ids)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = _left_padded([prompt_ids[i] for i in chunk], pad_id, device)
            prompt_len = input_ids.shape[1]
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                # the tokenizer's ids, not the HF config's defaults (a fresh Llama config says eos=2)
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([_StopAtTokens(stop_ids, prompt_len)]),
            )
            for i, generated in zip(chunk, out[:, prompt_len:].tolist()):
                if eos_id is not None and eos_id in generated:
                    generated = generated[: generated.index(eos_id)]
                text = tokenizer.decode(generated, skip_special_tokens=True)
                answers[i] = text.split("\n", 1)[0].strip()
    return answers


def _predict(
    model: MemoryModel, questions: list[str], *, prompt_format: str, batch_size: int, max_new_tokens: int | None
) -> list[str]:
    """The answers to `questions`, each put to the model in `prompt_format`, at most `max_new_tokens`
    tokens long (None: the format's `answer_tokens`)."""
    tokenizer = model.require_tokenizer("answering questions")
    fmt = get_prompt_format(prompt_format)
    fmt.check(tokenizer)
    prompt_ids = [fmt.encode_prompt(tokenizer, q) for q in questions]
    return generate_answers(model, prompt_ids, batch_size=batch_size,
                            max_new_tokens=fmt.answer_tokens if max_new_tokens is None else max_new_tokens)


def answer_questions(
    model: MemoryModel,
    facts: Iterable[Fact],
    *,
    heldout: bool = True,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    prompt_format: str = "qa",
) -> list[dict[str, Any]]:
    """Ask every fact's held-out questions (training-template questions with `heldout=False`) and
    score the answers.

    Protocol: the prompt is exactly the question in `prompt_format` (`smviz.data.prompts`; `qa`:
    `qa_prompt(question.text)` with the tokenizer's default special tokens), answered by
    `generate_answers` (greedy, at most `max_new_tokens` tokens, by default the format's `answer_tokens`,
    cut at the first newline).

    Returns one row per question, in fact order: fact_id, relation, template, question, gold,
    prediction, em, f1, contained.
    """
    rows: list[dict[str, Any]] = []
    for fact in facts:
        for q in fact.heldout_questions if heldout else fact.training_questions:
            rows.append(
                {"fact_id": fact.id, "relation": fact.relation, "template": q.template, "question": q.text, "gold": fact.answer}
            )
    predictions = _predict(model, [r["question"] for r in rows], prompt_format=prompt_format,
                           batch_size=batch_size, max_new_tokens=max_new_tokens)
    for r, prediction in zip(rows, predictions):
        r["prediction"] = prediction
        r["em"] = exact_match(prediction, r["gold"])
        r["f1"] = token_f1(prediction, r["gold"])
        r["contained"] = answer_contained(prediction, r["gold"])
    return rows


def answer_qa_items(
    model: MemoryModel,
    items: Iterable[QAItem],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    prompt_format: str = "qa",
) -> list[dict[str, Any]]:
    """Ask every item of a QA evaluation set its question and score the answer against all its
    answers, as `answer_questions` does (same protocol).

    Any answer counts as correct: em, f1 and contained are the maxima over the item's answers (SQuAD's
    multi-answer rule). Returns one row per item, in order: fact_id (the item's id), relation
    ("qa"), template (None), question, gold (the first answer), golds (all of them), prediction,
    em, f1, contained; `qa_metrics` takes these rows as they are.
    """
    items = list(items)
    predictions = _predict(model, [item.question for item in items], prompt_format=prompt_format,
                           batch_size=batch_size, max_new_tokens=max_new_tokens)
    return [
        {
            "fact_id": item.id, "relation": "qa", "template": None, "question": item.question,
            "gold": item.answers[0], "golds": list(item.answers), "prediction": prediction,
            "em": max(exact_match(prediction, a) for a in item.answers),
            "f1": max(token_f1(prediction, a) for a in item.answers),
            "contained": max(answer_contained(prediction, a) for a in item.answers),
        }
        for item, prediction in zip(items, predictions)
    ]
