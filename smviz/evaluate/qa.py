"""The closed-book QA protocol: `answer_questions` puts `qa_prompt(question)` (and nothing else) to the
model, decodes greedily in left-padded batches, keeps the text up to the first newline and scores it
(`smviz.evaluate.scoring`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from smviz.data.facts import Fact, qa_prompt
from smviz.errors import ConfigError, ModelFileError
from smviz.evaluate.mode import eval_mode
from smviz.evaluate.scoring import exact_match, token_f1

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


def answer_questions(
    model: MemoryModel,
    facts: Iterable[Fact],
    *,
    heldout: bool = True,
    batch_size: int = 32,
    max_new_tokens: int = 12,
) -> list[dict[str, Any]]:
    """Ask every fact's held-out questions (training-template questions with `heldout=False`) and
    score the answers.

    Protocol: the prompt is exactly `qa_prompt(question.text)` as the model's tokenizer encodes it
    (its default special tokens); greedy decoding of at most `max_new_tokens` tokens in left-padded
    batches (prompts grouped by length); a row stops at its first newline-bearing token or eos; the
    prediction is the decoded continuation cut at the first newline and stripped.

    Returns one row per question, in fact order: fact_id, relation, template, question, gold,
    prediction, em, f1.
    """
    tokenizer = model.require_tokenizer("answering questions")
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelFileError("the model's tokenizer has neither a pad nor an eos token; batched generation needs one to pad with")
    eos_id = tokenizer.eos_token_id

    rows: list[dict[str, Any]] = []
    for fact in facts:
        for q in fact.heldout_questions if heldout else fact.training_questions:
            rows.append(
                {"fact_id": fact.id, "relation": fact.relation, "template": q.template, "question": q.text, "gold": fact.answer}
            )
    if not rows:
        return []

    device = model.device
    prompts = [qa_prompt(r["question"]) for r in rows]
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    order = sorted(range(len(rows)), key=lambda i: (len(encoded[i]), i))  # similar lengths share a batch
    vocab = max(int(model.config.vocab_size), len(tokenizer))
    stop_ids = _newline_tokens(tokenizer, vocab, device)
    if eos_id is not None and eos_id < vocab:
        stop_ids[eos_id] = True

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with eval_mode(model):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer([prompts[i] for i in chunk], padding=True, return_tensors="pt")
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
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
                    rows[i]["prediction"] = text.split("\n", 1)[0].strip()
    finally:
        tokenizer.padding_side = side
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_padding()  # padded calls leave padding on the shared backend (and in tokenizer.json)

    for r in rows:
        r["em"] = exact_match(r["prediction"], r["gold"])
        r["f1"] = token_f1(r["prediction"], r["gold"])
    return rows
