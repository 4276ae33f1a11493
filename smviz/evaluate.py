"""Evaluation of a memory model: what it knows (closed-book QA on facts), how well it models held-out
text (NLL per token), how it uses its memory (slot reads), and how much of each depends on the memory
(the same numbers again with the memory layers switched off).

This module owns:
- SQuAD-style answer scoring: `normalize_answer`, `exact_match`, `token_f1`;
- the QA protocol: `answer_questions` puts `qa_prompt(question)` (and nothing else) to the model,
  decodes greedily in left-padded batches and keeps the text up to the first newline;
  `qa_metrics` aggregates the scored rows;
- held-out NLL (`heldout_nll`: summed token losses / predicted tokens) and memory usage
  (`memory_usage`: `UsageMonitor` read counts per memory block);
- `evaluate_model`, which runs all of these with the memory on and off and returns one
  JSON-serialisable dict, and `format_report`, which renders it as a compact table.

Every dict returned here carries a "protocol" entry that says how its numbers were measured.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from smviz.data.facts import Fact, qa_prompt
from smviz.errors import SmvizError
from smviz.usage import UsageMonitor

if TYPE_CHECKING:
    from smviz.model import MemoryModel

SCORING_PROTOCOL = (
    "SQuAD normalisation (lowercase, punctuation and articles a/an/the removed, whitespace collapsed); "
    "exact match and token-overlap F1, mean over questions"
)
HELDOUT_QUESTIONS = "heldout templates"
TRAINING_QUESTIONS = "training templates"


# --------------------------------------------------------------------------- answer scoring (SQuAD)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, remove punctuation, drop the articles a/an/the, collapse
    whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when prediction and gold are equal after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the (multiset) overlap of normalised tokens; both empty → 1.0, exactly one empty → 0.0."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- closed-book QA


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


def _require_tokenizer(model: MemoryModel):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SmvizError(
            "the model has no tokenizer, so questions cannot be encoded: assign one to model.tokenizer "
            "(or save the model with its tokenizer and load it again)"
        )
    return tokenizer


def _newline_tokens(tokenizer, size: int, device: torch.device) -> torch.Tensor:
    """(size,) bool: token ids whose decoded text contains a newline."""
    n = min(len(tokenizer), size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    flagged = torch.zeros(size, dtype=torch.bool)
    flagged[: len(texts)] = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)
    return flagged.to(device)


class _eval_mode:
    """Model in eval mode and gradients off inside the block; the training flag is restored after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)


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
    tokenizer = _require_tokenizer(model)
    if batch_size < 1 or max_new_tokens < 1:
        raise SmvizError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SmvizError("the model's tokenizer has neither a pad nor an eos token; batched generation needs one to pad with")
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
        with _eval_mode(model):
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


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def qa_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean EM and F1 over `answer_questions` rows, with the count, and EM/F1/count per relation
    (None for an empty set)."""
    by_relation: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_relation[r["relation"]].append(r)
    return {
        "protocol": SCORING_PROTOCOL,
        "em": _mean([r["em"] for r in rows]),
        "f1": _mean([r["f1"] for r in rows]),
        "n": len(rows),
        "per_relation": {
            rel: {"em": _mean([r["em"] for r in rs]), "f1": _mean([r["f1"] for r in rs]), "n": len(rs)}
            for rel, rs in sorted(by_relation.items())
        },
    }


# --------------------------------------------------------------------------- held-out NLL and usage


def _check_rows(token_rows: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if not isinstance(token_rows, torch.Tensor) or token_rows.dim() != 2 or token_rows.dtype != torch.long:
        raise SmvizError("token rows must be a 2-D torch.LongTensor of shape (rows, seq_len)")
    if attention_mask is not None and attention_mask.shape != token_rows.shape:
        raise SmvizError(f"attention_mask shape {tuple(attention_mask.shape)} differs from the rows' {tuple(token_rows.shape)}")


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
    _check_rows(token_rows, attention_mask)
    n, seq_len = token_rows.shape
    device = model.device
    total, count = 0.0, 0
    with _eval_mode(model):
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


def _json_number(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN
    return x


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
    _check_rows(token_rows, attention_mask)
    n, seq_len = token_rows.shape
    device = model.device
    with _eval_mode(model), UsageMonitor(model) as monitor:
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
        "blocks": {str(i): {k: _json_number(v) for k, v in m.items()} for i, m in metrics.items()},
    }


# --------------------------------------------------------------------------- the whole evaluation


def _qa_block(
    model: MemoryModel,
    facts: dict[str, list[Fact]],
    *,
    batch_size: int,
    max_new_tokens: int,
    include_rows: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {"qa": {}, "qa_training_templates": {}}
    rows_out: dict[str, Any] = {}
    for population, population_facts in facts.items():
        rows = answer_questions(model, population_facts, heldout=True, batch_size=batch_size, max_new_tokens=max_new_tokens)
        out["qa"][population] = qa_metrics(rows) | {"question_set": HELDOUT_QUESTIONS}
        if include_rows:
            rows_out[population] = rows
        if population == "known":
            train_rows = answer_questions(
                model, population_facts, heldout=False, batch_size=batch_size, max_new_tokens=max_new_tokens
            )
            out["qa_training_templates"][population] = qa_metrics(train_rows) | {"question_set": TRAINING_QUESTIONS}
            if include_rows:
                rows_out[f"{population} ({TRAINING_QUESTIONS})"] = train_rows
    if include_rows:
        out["rows"] = rows_out
    return out


def _relative(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def evaluate_model(
    model: MemoryModel,
    *,
    facts: dict[str, list[Fact]],
    heldout_rows: torch.LongTensor | None,
    usage_rows: torch.LongTensor | None,
    with_memory_off: bool = True,
    batch_size: int = 32,
    max_new_tokens: int = 12,
    nll_batch_size: int = 16,
    include_rows: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on fact populations (e.g. {"known": ..., "bio_only": ..., "new": ...}),
    held-out text and memory usage, with the memory on and (when `with_memory_off`) off.

    Returns {"model_hash", "protocol", "memory_on", "memory_off", "derived"}:
    - memory_on / memory_off: "qa" (population → `qa_metrics` on held-out-template questions),
      "qa_training_templates" (the same for "known" on its training templates), "nll" (`heldout_nll`
      or None without rows); memory_on also "usage" (`memory_usage` or None); with `include_rows`,
      "rows" holds the per-question rows. memory_off is None when not measured.
    - derived: "known_em_drop" = (EM_on − EM_off) / EM_on on known held-out questions (None when
      EM_on is 0 or not measured), "known_training_em_drop" likewise on training templates,
      "nll_rise" = (NLL_off − NLL_on) / NLL_on.
    Everything is plain JSON (dicts, lists, strings, ints, floats, None).
    """
    qa_kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, include_rows=include_rows)
    memory_on = _qa_block(model, facts, **qa_kwargs)
    memory_on["nll"] = heldout_nll(model, heldout_rows, nll_batch_size) if heldout_rows is not None else None
    memory_on["usage"] = memory_usage(model, usage_rows, nll_batch_size) if usage_rows is not None else None

    memory_off = None
    if with_memory_off:
        with model.memory_off():
            memory_off = _qa_block(model, facts, **qa_kwargs)
            memory_off["nll"] = heldout_nll(model, heldout_rows, nll_batch_size) if heldout_rows is not None else None

    def em(block: dict[str, Any] | None, key: str) -> float | None:
        if block is None or "known" not in block[key]:
            return None
        return block[key]["known"]["em"]

    def drop(key: str) -> float | None:
        on, off = em(memory_on, key), em(memory_off, key)
        return None if off is None else _relative(None if on is None else on - off, on)

    nll_on = memory_on["nll"]["nll"] if memory_on["nll"] else None
    nll_off = memory_off["nll"]["nll"] if memory_off and memory_off["nll"] else None
    derived = {
        "known_em_drop": drop("qa"),
        "known_training_em_drop": drop("qa_training_templates"),
        "nll_rise": None if nll_off is None or nll_on is None else _relative(nll_off - nll_on, nll_on),
        "protocol": "known_em_drop = (EM_on - EM_off) / EM_on (held-out templates); "
        "known_training_em_drop likewise on training templates; nll_rise = (NLL_off - NLL_on) / NLL_on; "
        "None when the base is 0 or not measured",
    }

    protocol = {
        "question_set": HELDOUT_QUESTIONS + (" (plus training templates for 'known')" if "known" in facts else ""),
        "prompt": "qa_prompt(question): 'Question: {question}\\nAnswer:'",
        "decoding": f"greedy, max_new_tokens={max_new_tokens}, stop at newline",
        "scoring": "SQuAD normalisation",
        "nll": (
            f"mean per token over {heldout_rows.shape[0]} rows of {heldout_rows.shape[1]}"
            if heldout_rows is not None
            else None
        ),
        "usage": memory_on["usage"]["protocol"] if memory_on["usage"] else None,
        "memory_off": "memory layers output zeros (model.memory_off()); no weight changed" if with_memory_off else None,
    }
    return {
        "model_hash": model.model_hash,
        "protocol": protocol,
        "memory_on": memory_on,
        "memory_off": memory_off,
        "derived": derived,
    }


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def format_report(result: dict[str, Any]) -> str:
    """A compact plain-text table of the main numbers of an `evaluate_model` result."""
    on, off = result["memory_on"], result.get("memory_off")
    p = result["protocol"]
    lines = [
        f"model {result.get('model_hash') or '(unsaved)'}",
        f"questions: {p['question_set']}; decoding: {p['decoding']}; scoring: {p['scoring']}",
        "",
        f"{'population':<24}{'n':>6}{'EM on':>9}{'EM off':>9}{'F1 on':>9}{'F1 off':>9}",
    ]

    def qa_line(label: str, key: str, population: str) -> str:
        m = on[key][population]
        o = off[key][population] if off else None
        return (
            f"{label:<24}{m['n']:>6}{_fmt(m['em']):>9}{_fmt(o['em'] if o else None):>9}"
            f"{_fmt(m['f1']):>9}{_fmt(o['f1'] if o else None):>9}"
        )

    for population in on["qa"]:
        lines.append(qa_line(population, "qa", population))
        if population in on["qa_training_templates"]:
            lines.append(qa_line(f"{population} (train tmpl)", "qa_training_templates", population))

    d = result["derived"]
    if on["nll"]:
        nll_off = off["nll"]["nll"] if off and off["nll"] else None
        lines += [
            "",
            f"held-out NLL/token: {_fmt(on['nll']['nll'])} on, {_fmt(nll_off)} off "
            f"(rise {_pct(d['nll_rise'])}; {on['nll']['tokens']} tokens)",
        ]
    if off:
        lines.append(
            f"known EM drop with memory off: {_pct(d['known_em_drop'])} held-out, "
            f"{_pct(d['known_training_em_drop'])} training templates"
        )
    if on["usage"]:
        lines += ["", f"memory usage ({on['usage']['protocol']}):"]
        for block, m in on["usage"]["blocks"].items():
            lines.append(
                f"  block {block}: used {_fmt(m['used_share'])} of {int(m['slots'])} slots, "
                f"KL(uniform) {_fmt(m['kl_uniform'])}, gini {_fmt(m['gini'])}, "
                f"90% of reads on {m['slots_90'] if m['slots_90'] is not None else '-'} slots"
            )
    return "\n".join(lines)
