"""The numbers of `smviz report diff`: two checkpoints of one model compared on a set of new facts
(learning), known facts and optional held-out text (forgetting), their value rows (what changed, the
frozen-parameter audit), per fact (answers, slots trained, entity share), access shift on the facts'
questions, overlap of the facts' slot sets and the top changed slots with contexts — one JSON-able dict.
Every number comes from `smviz.analysis` / `smviz.evaluate`; nothing is re-implemented here."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smviz.analysis import (
    Run, align_tokens, check_comparable, check_run_model, diff_models, entity_spans, fact_shift, jaccard_matrix, load_pipeline,
    question_access_shift, run_diff, slot_entity_profile,
)
from smviz.data.facts import STATEMENT, fact_doc_id, parse_fact_doc_id, read_facts
from smviz.errors import InputError, ModelFileError, SmvizError
from smviz.evaluate import SCORING_PROTOCOL, answer_questions, heldout_nll, qa_metrics
from smviz.model import MemoryModel
from smviz.record import Document, record_texts
from smviz.report.common import REPORT_FORMAT, number, records, rel_drop
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
    known_path: str | os.PathLike, *, heldout_path: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None, top_slots: int = 5, contexts: int = 3,
) -> dict[str, Any]:
    """Compute every number of a diff report (see the module docstring). Reads and checks all inputs
    before any heavy work; writes nothing except a temporary trace that is removed."""
    facts = read_facts(facts_path)
    if not facts:
        raise InputError(f"{facts_path} holds no facts; a diff report needs at least one new fact")
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
    hashes = {"before": before.model_hash, "after": after.model_hash}
    tag = f"models {hashes['before']} → {hashes['after']}"

    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "kind": "diff", "model_hashes": hashes,
        "inputs": {"before": str(before_dir), "after": str(after_dir), "facts": Path(facts_path).name,
                   "known": Path(known_path).name, "heldout": None if heldout_path is None else Path(heldout_path).name,
                   "run": None if run is None else str(run.path), "method": None if run is None else run.method},
    }

    # ---- summary: learning and forgetting before / after
    rows_b = answer_questions(before, facts)
    rows_a = answer_questions(after, facts)
    learn_b, learn_a = qa_metrics(rows_b), qa_metrics(rows_a)
    known_b, known_a = qa_metrics(answer_questions(before, known)), qa_metrics(answer_questions(after, known))
    metrics = []
    for name, b, a in (("learning_em", learn_b["em"], learn_a["em"]), ("learning_f1", learn_b["f1"], learn_a["f1"]),
                       ("known_em", known_b["em"], known_a["em"]), ("known_f1", known_b["f1"], known_a["f1"])):
        row = {"metric": name, "before": number(b), "after": number(a),
               "change": None if a is None or b is None else number(a - b)}
        row["relative_drop"] = number(rel_drop(b, a)) if name.startswith("known") else None
        metrics.append(row)
    nll_protocol = "not computed (no --heldout given)"
    if articles is not None:
        from smviz.data.tokenizer import pack_documents
        token_rows = pack_documents(before.tokenizer, [a.text for a in articles], HELDOUT_SEQ_LEN)[:HELDOUT_ROWS]
        if len(token_rows) == 0:
            raise InputError(f"{heldout_path} holds too little text for one row of {HELDOUT_SEQ_LEN} tokens")
        nb, na = heldout_nll(before, token_rows), heldout_nll(after, token_rows)
        metrics.append({"metric": "heldout_nll", "before": number(nb["nll"]), "after": number(na["nll"]),
                        "change": number(na["nll"] - nb["nll"]), "relative_drop": number(rel_drop(nb["nll"], na["nll"]))})
        nll_protocol = nb["protocol"]
    report["summary"] = {
        "protocol": (f"{tag}. Learning: held-out question templates of the {len(facts)} facts of {Path(facts_path).name}; "
                     f"known: held-out templates of the {len(known)} facts of {Path(known_path).name}; scoring: {SCORING_PROTOCOL}; "
                     f"held-out NLL: {nll_protocol}. relative_drop = (before − after) / before "
                     "(for NLL a negative drop means the NLL rose)."),
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

    # ---- per-fact reads: a temporary trace of the facts' statements and questions under `before`
    changed = {int(layer): set(g["slot"].astype(int)) for layer, g in slots.groupby("layer")}
    docs = [Document(fact_doc_id(f.id, STATEMENT, i), s) for f in facts for i, s in enumerate(f.statements)]
    with tempfile.TemporaryDirectory(prefix="smviz-report-") as tmp:
        trace = record_texts(before, docs, Path(tmp) / "trace", source={"name": Path(facts_path).name, "kind": "facts"},
                             progress=False)
        acc = trace.to_pandas("accesses")
        doc_ids = acc["doc_id"].astype(str)
        acc = acc.assign(fact_id=doc_ids.map({d: parse_fact_doc_id(d).fact_id for d in doc_ids.unique()}))
        trained: dict[str, dict[int, set[int]]] = {}
        for f in facts:
            per = {}
            sub = acc[acc["fact_id"] == f.id]
            for layer in trace.layers:
                read = set(sub[sub["layer"] == layer]["slot"].astype(int))
                per[layer] = read & changed.get(layer, set())
            trained[f.id] = per
        entity_note, profiles = _entity_profiles(trace, facts, trained, slots, top_slots)
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

    shift = fact_shift(before, after, facts)
    per_fact = []
    for f in facts:
        rows = shift[shift["fact_id"] == f.id]
        t = trained[f.id]
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
        per_fact.append({
            "fact_id": f.id, "subject": f.subject, "relation": f.relation, "gold": f.answer, "statement": f.statements[0],
            "questions": int(len(rows)),
            "answer_before": rows["answer_before"].iloc[0] if len(rows) else None,
            "answer_after": rows["answer_after"].iloc[0] if len(rows) else None,
            "f1_before": number(rows["f1_before"].mean()) if len(rows) else None,
            "f1_after": number(rows["f1_after"].mean()) if len(rows) else None,
            "slots_trained": len(slots_t), "slots": [f"{layer}:{s}" for layer, s in slots_t],
            "entity_share": number(share),
        })
    report["facts"] = {
        "protocol": (f"{tag}. Answers and F1 from smviz.analysis.fact_shift (held-out templates; answer_* is the first "
                     "question's, f1_* the mean over the fact's questions). slots_trained: value rows that changed "
                     "between the models AND that the fact's statements read under the before model (union over heads, "
                     "top-k). entity_share: share of those slots' access mass (over all facts' statements) on entity "
                     f"tokens, from slot_entity_profile; {entity_note or 'spaCy NER via load_pipeline()'}."),
        "table": per_fact,
        "questions": records(shift),
    }

    # ---- access shift on the facts' questions
    ash = question_access_shift(before, after, facts)
    probe_size = ash.attrs["probe_size"]
    report["access_shift"] = {
        "protocol": (f"{tag}. Probe: the facts' held-out questions as qa_prompt text ({probe_size} prompts); per token and "
                     "memory layer the Jaccard of the slot sets read before vs after (smviz.analysis.access_shift)."),
        "probe_size": probe_size,
        "per_layer": [{"layer": int(layer), "tokens": int(len(g)), "mean_jaccard": number(g["jaccard"].mean()),
                       "unchanged_share": number((g["jaccard"] == 1).mean())} for layer, g in ash.groupby("layer")],
        "jaccard": [number(x) for x in ash["jaccard"]],
    }

    # ---- overlap of the facts' slot sets
    n_slots = before.memory_config.n_slots  # (layer, slot) encoded as one id: layer * N + slot
    sets = {f.id: np.array(sorted(layer * n_slots + s for layer, ss in trained[f.id].items() for s in ss), dtype=np.int64)
            for f in facts}
    jm = jaccard_matrix(sets)
    report["overlap"] = {
        "protocol": f"{tag}. Jaccard (smviz.analysis.jaccard_matrix) of the facts' slots_trained sets.",
        "facts": [str(c) for c in jm.columns],
        "matrix": [[number(x) for x in row] for row in jm.to_numpy(dtype=np.float64)],
    }
    report["top_slots"] = {
        "protocol": (f"{tag}. The {top_slots} value rows with the largest ‖ΔV‖₂; contexts: the tokens of the facts' "
                     "statements that read the slot with the most weight under the before model (SlotIndex.contexts); "
                     f"entity profile: slot_entity_profile on that trace ({entity_note or 'spaCy NER'})."),
        "slots": top_records,
    }
    return report


def _entity_profiles(trace, facts, trained, slots: pd.DataFrame, top_slots: int) -> tuple[str | None, dict[int, pd.DataFrame]]:
    """slot_entity_profile per layer for every slot a fact trained and the top changed slots; a note when not computed."""
    try:
        entities = [e for f in facts for e in f.entities]
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
