"""The whole evaluation of a memory model: `evaluate_model` runs QA on fact populations, held-out NLL
and memory usage with the memory on and off and returns one JSON-serialisable dict (its "protocol"
entry says how each number was measured); `format_report` renders it as a compact table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from smviz.data.facts import Fact
from smviz.evaluate.nll import heldout_nll, memory_usage
from smviz.evaluate.qa import HELDOUT_QUESTIONS, TRAINING_QUESTIONS, answer_questions
from smviz.evaluate.scoring import qa_metrics

if TYPE_CHECKING:
    from smviz.model import MemoryModel


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
    model.require_tokenizer("evaluation")  # before any work: questions and answers need it
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
