"""The numbers of `smviz report diff`: two checkpoints of one model compared on new facts (learning) or
knowledge-editing records (the editing metrics) — the --facts file, either kind (`smviz.report.diff_items`)
—, optional known facts and held-out text (forgetting), their value rows (what changed, the
frozen-parameter audit), per item (answers or continuations, slots trained, entity share), access shift on
the items' prompts, overlap of the items' slot sets and the top changed slots with contexts — one
JSON-able dict. Questions are asked in the prompt format of the run that made the after model (or the one
given; qa without either). Every number comes from `smviz.analysis` / `smviz.evaluate`; nothing is
re-implemented here."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smviz.analysis import (
    Run, align_tokens, check_comparable, check_run_model, diff_models, entity_spans, jaccard_matrix, load_pipeline, run_diff,
    slot_entity_profile,
)
from smviz.data.facts import read_facts
from smviz.data.prompts import get_prompt_format
from smviz.errors import InputError, ModelFileError, SmvizError
from smviz.evaluate import SCORING_PROTOCOL, answer_questions, heldout_nll, qa_metrics
from smviz.model import MemoryModel
from smviz.record import record_texts
from smviz.report.common import REPORT_FORMAT, number, records
from smviz.report.diff_items import asked_in, metric_row, question_format, read_diff_items
from smviz.train.methods import VALUE_ROWS, get_method

log = logging.getLogger(__name__)

HELDOUT_ROWS, HELDOUT_SEQ_LEN = 64, 128


def _load(path: str | os.PathLike, what: str) -> MemoryModel:
    if not Path(path).is_dir():
        raise InputError(f"{what} model directory {path} does not exist; pass a model directory written by smviz")
    return MemoryModel.from_pretrained(path)


def _find_run(after_dir: Path, run_dir: str | os.PathLike | None, before: MemoryModel, after: MemoryModel) -> Run | None:
    """The finetuning run that wrote `after`: `run_dir` when given (checked: its base model must be
    `before` and its final model `after`, by hash), else the run whose final model directory `after_dir`
    is, when that run started from `before` and ended with `after`."""
    if run_dir is not None:
        run = Run(run_dir)
        check_run_model(run, before, after)
        return run
    for run in _runs_owning(after_dir):
        if run.base_model_hash == before.model_hash and run.model_hash == after.model_hash:
            return run
    return None


def _runs_owning(model_dir: Path) -> list[Run]:
    parent = model_dir.resolve().parent
    try:
        run = Run(parent)
    except SmvizError:  # not a run directory
        return []
    return [run] if run.model_dir.resolve() == model_dir.resolve() else []


def build_diff_report(
    before_dir: str | os.PathLike, after_dir: str | os.PathLike, facts_path: str | os.PathLike,
    known_path: str | os.PathLike | None = None, *, heldout_path: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None, top_slots: int = 5, contexts: int = 3, prompt_format: str | None = None,
) -> dict[str, Any]:
    """Compute every number of a diff report (see the module docstring). `facts_path`: new facts or
    editing records (detected by content, `read_diff_items`); `known_path` (optional): known facts for
    forgetting; `prompt_format`: how questions are put to the models (`smviz.data.prompts`; editing
    prompts in its `edit_prompt_format`), None: as the finetuning run of --after asked them, else qa.
    Reads and checks all inputs before any heavy work; writes nothing except a temporary trace that is
    removed."""
    if prompt_format is not None:
        get_prompt_format(prompt_format)  # an unknown name is refused before anything is read
    items = read_diff_items(facts_path)
    known = None
    if known_path is not None:
        known = read_facts(known_path)
        if not known:
            raise InputError(f"{known_path} holds no facts; forgetting is measured on known facts")
    articles = None
    if heldout_path is not None:
        from smviz.data.corpus import read_corpus
        articles = read_corpus(heldout_path)
    before, after = _load(before_dir, "--before"), _load(after_dir, "--after")
    check_comparable(before, after)
    if before.tokenizer is None:
        raise ModelFileError(f"{before_dir} holds no tokenizer; a diff report asks questions")
    run = _find_run(Path(after_dir), run_dir, before, after)
    items = items.for_run(run, prompt_format)
    questions = prompt_format or question_format(run)  # the known facts' format (for facts: the items')
    for fmt in {items.prompt_format, *([questions] if known is not None else [])}:
        get_prompt_format(fmt).check(before.tokenizer)
    kind, noun = items.kind, items.noun
    hashes = {"before": before.model_hash, "after": after.model_hash}
    tag = f"models {hashes['before']} → {hashes['after']}"

    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "kind": "diff", "compared": kind, "model_hashes": hashes,
        "inputs": {"before": str(before_dir), "after": str(after_dir), "facts": items.path.name,
                   "known": None if known_path is None else Path(known_path).name,
                   "heldout": None if heldout_path is None else Path(heldout_path).name,
                   "run": None if run is None else str(run.path), "method": None if run is None else run.method},
    }

    # ---- summary: learning (or editing) and forgetting before / after
    compared = items.compare(before, after)
    metrics = list(compared.metrics)
    known_protocol = "known facts: not measured (no --known given)"
    if known is not None:
        kb, ka = (qa_metrics(answer_questions(m, known, prompt_format=questions)) for m in (before, after))
        metrics += [metric_row(f"known_{m}", kb[m], ka[m], drop=True) for m in ("em", "f1")]
        known_protocol = f"known: held-out templates of the {len(known)} facts of {Path(known_path).name}{asked_in(questions)}"
    scoring = f"; QA scoring: {SCORING_PROTOCOL}" if kind == "facts" or known is not None else ""
    nll_protocol = "not computed (no --heldout given)"
    if articles is not None:
        from smviz.data.tokenizer import pack_documents
        token_rows = pack_documents(before.tokenizer, [a.text for a in articles], HELDOUT_SEQ_LEN)[:HELDOUT_ROWS]
        if len(token_rows) == 0:
            raise InputError(f"{heldout_path} holds too little text for one row of {HELDOUT_SEQ_LEN} tokens")
        nb, na = heldout_nll(before, token_rows), heldout_nll(after, token_rows)
        metrics.append(metric_row("heldout_nll", nb["nll"], na["nll"], drop=True))
        nll_protocol = nb["protocol"]
    report["summary"] = {
        "protocol": (f"{tag}. {compared.protocol}; {known_protocol}{scoring}; held-out NLL: {nll_protocol}. "
                     "relative_drop = (before − after) / before (for NLL a negative drop means the NLL rose)."),
        "metrics": metrics,
    }

    # ---- memory changes and the frozen-parameter audit
    if run is not None:
        diff = run_diff(run, before, after)
        allowed_desc = (f"the value rows run {run.path.name} ({run.method}) selected in any step"
                        if get_method(run.method).trains == VALUE_ROWS else f"what method {run.method} of run {run.path.name} may change")
    else:
        diff = diff_models(before, after)
        allowed_desc = "nothing (no finetuning run known for --after: every change counts as a violation)"
    slots = diff.slots
    norms = slots["delta_norm"].to_numpy()
    quant = {f"q{int(q * 100)}": number(np.quantile(norms, q)) for q in (0.0, 0.25, 0.5, 0.75, 1.0)} if len(norms) else {}
    report["memory"] = {
        "protocol": (f"{tag}. Bit-for-bit comparison (smviz.analysis.diff_models) of every parameter and buffer; "
                     f"a value row is changed when any element differs; allowed: {allowed_desc}."),
        "changed_slots": int(len(slots)),
        "changed_slots_per_layer": {str(k): int(v) for k, v in slots.groupby("layer").size().items()},
        "delta_norm": records(slots[["layer", "slot", "delta_norm", "relative_change", "allowed"]]),
        "delta_norm_quantiles": quant,
        "audit": records(diff.audit),
        "violations": int(len(diff.violations)),
    }

    # ---- per-item reads: a temporary trace of the items' texts (statements, rewrite texts) under `before`
    changed = {int(layer): set(g["slot"].astype(int)) for layer, g in slots.groupby("layer")}
    with tempfile.TemporaryDirectory(prefix="smviz-report-") as tmp:
        trace = record_texts(before, items.documents(before.tokenizer), Path(tmp) / "trace",
                             source={"name": items.path.name, "kind": kind}, progress=False)
        acc = trace.to_pandas("accesses")
        acc = acc.assign(item_id=items.item_of(acc["doc_id"].astype(str)))
        trained: dict[str, dict[int, set[int]]] = {}
        for item_id in items.ids:
            sub = acc[acc["item_id"] == item_id]
            trained[item_id] = {layer: set(sub[sub["layer"] == layer]["slot"].astype(int)) & changed.get(layer, set())
                                for layer in trace.layers}
        entity_note, profiles = _entity_profiles(trace, items.entities(), trained, slots, top_slots)
        index = trace.slot_index()
        top = slots.head(0) if slots.empty else slots.sort_values("delta_norm", ascending=False, kind="stable").head(top_slots)
        top_records = []
        for _, r in top.iterrows():
            layer, slot = int(r["layer"]), int(r["slot"])
            ctx = index.contexts(slot, n=contexts, window=6, layer=layer) if layer in trace.layers else pd.DataFrame()
            prof = profiles.get(layer)
            prow = prof[prof["slot"] == slot] if prof is not None else None
            top_records.append({
                "layer": layer, "slot": slot, "delta_norm": number(r["delta_norm"]),
                "relative_change": number(r["relative_change"]), "allowed": bool(r["allowed"]),
                "contexts": records(ctx[["rank", "doc_id", "position", "token", "weight", "window", "focus"]]) if len(ctx) else [],
                "entity_profile": records(prow)[0] if prow is not None and len(prow) else None,
            })

    per_item = []
    for row, item_id in zip(compared.rows, items.ids):
        t = trained[item_id]
        slots_t = sorted((layer, s) for layer, ss in t.items() for s in ss)
        share = None
        if entity_note is None:
            mass = ent = 0.0
            for layer, ss in t.items():
                prof = profiles.get(layer)
                if prof is not None and ss:
                    p = prof[prof["slot"].isin(list(ss))]
                    mass += float(p["mass"].sum())
                    ent += float(p["entity_mass"].sum())
            share = ent / mass if mass > 0 else None
        per_item.append({**row, "slots_trained": len(slots_t), "slots": [f"{layer}:{s}" for layer, s in slots_t],
                         "entity_share": number(share)})
    report[kind] = {
        "protocol": (f"{tag}. {compared.table_protocol} slots_trained: value rows that changed between the models AND "
                     f"that {items.texts_desc} read under the before model (union over heads, top-k). entity_share: share "
                     f"of those slots' access mass (over all {items.texts}) on entity tokens, from slot_entity_profile; "
                     f"{entity_note or 'spaCy NER via load_pipeline()'}."),
        "table": per_item,
        **compared.extra,
    }

    # ---- access shift on the items' prompts (facts: held-out questions; records: rewrite + paraphrase prompts)
    ash = items.access_shift(before, after)
    report["access_shift"] = {
        "protocol": f"{tag}. {ash.attrs['protocol']}.",
        "probe_size": ash.attrs["probe_size"],
        "per_layer": [{"layer": int(layer), "tokens": int(len(g)), "mean_jaccard": number(g["jaccard"].mean()),
                       "unchanged_share": number((g["jaccard"] == 1).mean())} for layer, g in ash.groupby("layer")],
        "jaccard": [number(x) for x in ash["jaccard"]],
    }

    # ---- overlap of the items' slot sets (an empty set has no overlap: left out, and said)
    n_slots = before.memory_config.n_slots  # (layer, slot) encoded as one id: layer * N + slot
    sets = {i: np.array(sorted(layer * n_slots + s for layer, ss in trained[i].items() for s in ss), dtype=np.int64)
            for i in items.ids}
    empty = [i for i, v in sets.items() if not len(v)]
    jm = jaccard_matrix({i: v for i, v in sets.items() if len(v)}) if len(empty) < len(sets) else pd.DataFrame()
    report["overlap"] = {
        "protocol": (f"{tag}. Jaccard (smviz.analysis.jaccard_matrix) of the {noun}' slots_trained sets"
                     + (f"; left out, no slot trained ({len(empty)}): {', '.join(empty[:10])}{', …' if len(empty) > 10 else ''}."
                        if empty else ".")),
        kind: [str(c) for c in jm.columns],
        "matrix": [[number(x) for x in row] for row in jm.to_numpy(dtype=np.float64)],
    }
    report["top_slots"] = {
        "protocol": (f"{tag}. The {top_slots} value rows with the largest ‖ΔV‖₂; contexts: the tokens of {items.texts} "
                     "that read the slot with the most weight under the before model "
                     f"(SlotIndex.contexts); entity profile: slot_entity_profile on that trace ({entity_note or 'spaCy NER'})."),
        "slots": top_records,
    }
    return report


def _entity_profiles(trace, entities, trained, slots: pd.DataFrame, top_slots: int) -> tuple[str | None, dict[int, pd.DataFrame]]:
    """slot_entity_profile per layer for every slot an item trained and the top changed slots (`entities`:
    the rule-based fallback's patterns when no spaCy pipeline is installed); a note when not computed."""
    try:
        nlp = load_pipeline(fallback=True, fallback_entities=entities)
        tokens = align_tokens(trace, entity_spans(trace, nlp))
    except Exception as e:  # spaCy missing or broken: report without entity shares, and say so
        log.warning("entity share not computed: %s", e)
        return f"entity share not computed ({type(e).__name__}: {e})", {}
    out = {}
    top = slots.sort_values("delta_norm", ascending=False, kind="stable").head(top_slots)
    for layer in trace.layers:
        wanted = {s for t in trained.values() for s in t.get(layer, ())} | set(top[top["layer"] == layer]["slot"].astype(int))
        if wanted:
            out[layer] = slot_entity_profile(trace, tokens, layer=layer, slots=sorted(wanted))
    return None, out
