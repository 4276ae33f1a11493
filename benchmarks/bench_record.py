"""Speed of recording memory accesses, of reading the recordings back, and of background slot statistics.

    python benchmarks/bench_record.py                 # full run (about 3 minutes on 2 CPU cores)
    python benchmarks/bench_record.py --quick         # about a minute: small sizes, a 1M-access trace
    python benchmarks/bench_record.py --workdir /tmp/rec --keep   # keep the workspace and traces

Everything runs on the `tiny` preset (`MemoryModel.from_preset("tiny", seed=0)`, randomly
initialised, eval mode, under torch.no_grad(); 4 memory heads x top-32 on one layer = 128 reads per
token, 65,536 slots) on the CPU. A small workspace is built in the work directory first: the fact
world and corpus splits (`workspace.stages.build_data`, WorldConfig(n_known=20, n_bio_only=10, n_new=10)) and
the workspace tokenizer (`workspace.stages.ensure_tokenizer`, byte-level BPE, 4,096 entries = the preset's
vocabulary); recorded text is the background corpus (`data.corpus.load_articles()`, Wikipedia lead
summaries, in title order).

Section 1, recording overhead, as ratios measured in one run:
- in memory: `with AccessRecorder(model): model(...)` (keep=True, a new recorder per call, hooks
  registered and removed each time) vs the plain forward, on a batch of --batch x --seq random
  token ids with a right-padded attention mask (row i loses i x seq/16 positions, 22% padding at
  8 x 128). Goal: ratio <= 1.05.
- on disk: `record_texts(...)` of about --ratio-tokens tokens of corpus text into a fresh trace
  (tokenising with offsets, hooks, the device-to-host copy, building the tables, Parquet+zstd shard
  writes with sha256, meta.json, loading the finished trace) vs plain forwards of exactly the
  windows record_texts runs (same grouping into shards, windows of context 128 / stride 64, batches
  of 16, padding and mask; pre-tokenised, tensors built beforehand), so the ratio is the whole cost
  of recording over the model's own work. No goal (reported).
Both pairs are timed in interleaved rounds (each round runs both cases, in a new random order), so
a slow-down from other processes on the machine hits both alike; each number is the median over
rounds, and the ratio is the ratio of the medians (the median of the per-round ratios is reported
too). Cheap cases repeat inside a round until it spans --target-s.

Section 2, the trace and its index, on a trace recorded from real text: enough corpus articles for
>= --trace-accesses accesses (default 10 million = ~80k tokens; --quick: 1 million) are recorded
with `record_texts` into the work directory, timed end to end (tokens/s and accesses/s), with the
time spent in model forwards and in `TraceWriter.write` measured on the side (forward hooks on the
LM — they stop just before the recorder's end-of-call host copy, which counts as "other" — and a
timing wrapper around TraceWriter.write; both removed afterwards). Then:
- `Trace.load(verify=True)` (sha256 of every shard);
- `TraceWriter.write` throughput: the trace's shards, read into memory first, are written again
  shard by shard into a new trace (Parquet+zstd, sha256, progress.json), accesses/s and MB/s;
- `SlotIndex.build(trace)` cold: on a freshly loaded Trace, Parquet reads included (the OS page
  cache is warm), median of --build-repeats builds; then `trace.slot_index()` on a fresh Trace (build
  + writing the index/ cache) and on another fresh Trace (opening the memory-mapped cache);
- `contexts(slot, n=20, window=8)` latency per query on the built index and on the memory-mapped
  cached index: --queries random slots among those with reads (uniform over slots, seed 0); the first
  query of an index (which also loads the token columns) is reported apart; median, p95 and max over
  the queries; plus the most-read slot (median of 3). Goal: p95 < 50 ms (the median is reported too);
- `slots_for(doc, start, start + 8)` latency: --queries random spans of 8 positions in random
  documents; the first call (which loads the whole accesses table) is reported apart.

Section 3, background slot statistics (`smviz.stats`) with 1 and 2 processes. A tiny model with the
workspace tokenizer is saved to WS/models/tiny; its background batches are its pretraining mixture
(`PretrainConfig` defaults: 16 rows x 128 tokens, world rows right-padded). Every process runs with
one thread (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false, torch threads 1), so
2 processes on 2 cores against 1 process is a fair comparison.
- library: `collect_stats(model, batches)` over --lib-batches of those batches vs plain forwards
  over the same batches (interleaved rounds, medians): batches/s, tokens/s (real tokens) and the
  counting overhead ratio;
- CLI: `python -m smviz stats --batches N` (1 process) vs `python -m torch.distributed.run
  --standalone --nproc-per-node P -m smviz stats --batches N` (P processes, gloo), the same N
  batches, wall-clock of the whole command (interpreter start, imports, model load, tokenising the
  mixture, all-reduce, writing the file). A second pair of runs with --batches P (one batch per
  process) measures that fixed start-up cost; the marginal rate (N - P) / (t_N - t_P) is the
  counting throughput without it. The 1- and P-process outputs must be identical (checked).
  --standalone makes torchrun pick a free port, so a run beside other torchrun jobs does not collide.

The JSON (default benchmarks/results/bench_record.json, --quick: bench_record_quick.json) holds
every number, the goals and whether they pass, the settings, the machine, the torch version, the
CPU count and the load average at start and end (other processes on a 2-core machine make
multi-threaded timings jumpy: a descheduled OpenMP thread stalls the other; the interleaved rounds
keep the ratios fair, `--threads 1` makes sections 1-2 steadier still); it is written atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from _bench import Case, log, machine_record, measure, paired_ratio, print_totals, write_result  # noqa: E402 (run as a script from benchmarks/)

from smviz.data.corpus import load_articles
from smviz.data.tokenizer import right_pad
from smviz.data.world import WorldConfig
from smviz.model import MemoryModel
from smviz.workspace.stages import build_data, ensure_tokenizer, load_data
from smviz.record import (
    DEFAULT_CONTEXT,
    AccessRecorder,
    Document,
    chunk_spans,
    record_texts,
)
from smviz.trace import SlotIndex, Trace, TraceWriter
from smviz.workspace import Workspace

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_OUT = ROOT / "results" / "bench_record.json"
QUICK_OUT = ROOT / "results" / "bench_record_quick.json"

PRESET = "tiny"
WORLD = {"n_known": 20, "n_bio_only": 10, "n_new": 10}
RECORD_BATCH = 16  # record_texts' default batch size
SHARD_TOKENS = 32_768  # record_texts' default shard size
GOALS = {
    "recorder_in_memory_ratio": ("<=", 1.05, "forward with AccessRecorder / plain forward"),
    "contexts_p95_ms": ("<", 50.0, "SlotIndex.contexts(slot, n=20, window=8), p95 over random slots with reads"),
}

# --------------------------------------------------------------------------- timing

def quantiles_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "n": len(ms), "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
        "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
    }


@contextmanager
def timed_calls() -> Iterator[dict]:
    """Seconds spent in `TraceWriter.write` (all writers) while the block runs."""
    acc = {"write_s": 0.0, "writes": 0}
    original = TraceWriter.write

    def write(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            acc["write_s"] += time.perf_counter() - t
            acc["writes"] += 1

    TraceWriter.write = write
    try:
        yield acc
    finally:
        TraceWriter.write = original


@contextmanager
def timed_forwards(model: MemoryModel) -> Iterator[dict]:
    """Seconds spent inside the LM's forward calls while the block runs (recorder hooks included)."""
    acc = {"forward_s": 0.0, "forwards": 0}
    start: list[float] = []

    def pre(*_):
        start.append(time.perf_counter())

    def post(*_):
        acc["forward_s"] += time.perf_counter() - start.pop()
        acc["forwards"] += 1

    handles = [model.lm.register_forward_pre_hook(pre), model.lm.register_forward_hook(post)]
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- inputs


def padded_batch(batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and a right-padded mask: row i loses i * seq // 16 positions."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        keep = max(1, seq - i * (seq // 16))
        mask[i, keep:] = 0
        ids[i, keep:] = 0
    return ids, mask


def corpus_documents(tokenizer, articles, n_tokens: int, start: int = 0) -> tuple[list[Document], list[list[int]]]:
    """Articles from `start` on, in order, until they hold >= n_tokens tokens; with their token ids."""
    docs: list[Document] = []
    ids: list[list[int]] = []
    total, i = 0, start
    while total < n_tokens:
        if i >= len(articles):
            raise SystemExit(f"the corpus holds fewer than {n_tokens:,} tokens from article {start}")
        chunk = articles[i : i + 256]
        enc = tokenizer([a.text for a in chunk], add_special_tokens=False)["input_ids"]
        for a, e in zip(chunk, enc):
            if total >= n_tokens:
                break
            docs.append(Document(a.id, a.text))
            ids.append(e)
            total += len(e)
        i += len(chunk)
    return docs, ids


def record_windows(token_ids: list[list[int]], context: int, stride: int, batch_size: int, shard_tokens: int,
                   pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (input_ids, attention_mask) batches `record_texts` runs on these documents: documents
    grouped into shards of about shard_tokens tokens (at least one document each), each group's
    windows (chunk_spans) in batches of batch_size, right-padded to the batch's longest window."""
    batches = []
    first = 0
    while first < len(token_ids):
        total, i = 0, first
        while i < len(token_ids) and (i == first or total < shard_tokens):
            total += len(token_ids[i])
            i += 1
        group = token_ids[first:i]
        windows = [(d, s, e) for d, t in enumerate(group) for s, e, _ in chunk_spans(len(t), context, stride)]
        for b in range(0, len(windows), batch_size):
            batches.append(right_pad([group[d][s:e] for d, s, e in windows[b : b + batch_size]], pad))
        first = i
    return batches


# --------------------------------------------------------------------------- sections


def section_recording(model: MemoryModel, tokenizer, articles, args) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    out: dict = {}
    vocab = model.config.vocab_size

    # ---- 1a. in memory
    ids, mask = padded_batch(args.batch, args.seq, vocab)
    real = int(mask.sum())

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def recorded() -> None:
        with torch.no_grad(), AccessRecorder(model) as rec:
            model(input_ids=ids, attention_mask=mask)
        assert len(rec.batches) == 1

    with torch.no_grad(), AccessRecorder(model) as rec:  # sanity: every real token, no padding
        model(input_ids=ids, attention_mask=mask)
    got = rec.batches[0]
    assert len(got.seq) == real and got.slots.shape[1:] == (1, 4, 32), (len(got.seq), got.slots.shape)
    del rec, got

    c_plain = Case("forward, plain", plain)
    c_rec = Case("forward with AccessRecorder (in memory)", recorded)
    measure([c_plain, c_rec], warmup=args.warmup, rounds=args.rounds, target_s=args.target_s, label="recorder")
    r = paired_ratio(c_rec, c_plain)
    out["in_memory"] = {
        "batch": args.batch, "seq": args.seq, "real_tokens": real, "padding_share": 1 - real / (args.batch * args.seq),
        "plain": case_info(c_plain, real), "recorder": case_info(c_rec, real), **r,
        "ratio_def": "forward with AccessRecorder (keep=True) / plain forward",
    }
    rows.append(row("1 record", c_plain.what, c_plain.median, real / c_plain.median, "tok/s", c_plain))
    rows.append(row("1 record", c_rec.what, c_rec.median, real / c_rec.median, "tok/s", c_rec, ratio=r["ratio"],
                    goal="recorder_in_memory_ratio"))

    # ---- 1b. on disk: record_texts vs the plain forwards of its windows
    docs, token_ids = corpus_documents(tokenizer, articles, args.ratio_tokens)
    n_tok = sum(map(len, token_ids))
    context = min(DEFAULT_CONTEXT, model.config.max_position_embeddings)
    stride = max(1, context // 2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = record_windows(token_ids, context, stride, RECORD_BATCH, SHARD_TOKENS, pad)
    processed = int(sum(m.sum() for _, m in windows))
    target = args.workdir / "trace-ratio"

    def forwards() -> None:
        with torch.no_grad():
            for i, m in windows:
                model(input_ids=i, attention_mask=m)

    def clear() -> None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(target.parent / f".{target.name}.partial", ignore_errors=True)

    result: dict = {}

    def record() -> None:
        result["trace"] = record_texts(model, docs, target, tokenizer=tokenizer, progress=False)

    clear()
    record()
    assert result["trace"].n_tokens == n_tok, (result["trace"].n_tokens, n_tok)
    n_shards = len(result["trace"].meta["shards"])
    result.clear()
    c_fw = Case("forwards on record_texts' windows, plain", forwards, heavy=True)
    c_rt = Case("record_texts -> trace on disk", record, setup=clear, heavy=True)
    measure([c_fw, c_rt], warmup=1, rounds=args.disk_rounds, target_s=args.target_s, label="record_texts")
    clear()
    r = paired_ratio(c_rt, c_fw)
    out["on_disk"] = {
        "documents": len(docs), "tokens": n_tok, "accesses": n_tok * 128, "windows_tokens": processed,
        "forward_calls": len(windows), "shards": n_shards, "context": context, "stride": stride,
        "batch_size": RECORD_BATCH, "shard_tokens": SHARD_TOKENS,
        "plain_forwards": case_info(c_fw, n_tok), "record_texts": case_info(c_rt, n_tok), **r,
        "ratio_def": "record_texts (tokenise, record, Parquet shards, meta) / plain forwards of the same windows",
    }
    rows.append(row("1 record", c_fw.what, c_fw.median, n_tok / c_fw.median, "tok/s", c_fw))
    rows.append(row("1 record", c_rt.what, c_rt.median, n_tok / c_rt.median, "tok/s", c_rt, ratio=r["ratio"]))
    return rows, out


def section_trace(model: MemoryModel, tokenizer, articles, args) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    out: dict = {}
    per_token = 128  # tiny: 1 memory layer x 4 heads x top-32
    docs, token_ids = corpus_documents(tokenizer, articles, math.ceil(args.trace_accesses / per_token))
    n_tok = sum(map(len, token_ids))
    path = args.workdir / "trace-big"
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / f".{path.name}.partial", ignore_errors=True)
    log(f"recording {len(docs)} articles, {n_tok:,} tokens ({n_tok * per_token:,} accesses) into {path} ...")
    gc.collect()
    with timed_calls() as w, timed_forwards(model) as f:
        t = time.perf_counter()
        record_texts(model, docs, path, tokenizer=tokenizer, progress=False)
        rec_s = time.perf_counter() - t
    t = time.perf_counter()
    trace = Trace.load(path, verify=True)
    load_s = time.perf_counter() - t
    assert trace.n_tokens == n_tok and trace.n_accesses == n_tok * per_token
    n_acc = trace.n_accesses
    disk = sum(f.stat().st_size for f in path.rglob("*.parquet"))
    log(f"  recorded in {rec_s:.1f}s ({n_tok / rec_s:,.0f} tok/s); forwards {f['forward_s']:.1f}s, writes {w['write_s']:.1f}s")
    out["trace"] = {
        "documents": len(docs), "tokens": n_tok, "accesses": n_acc, "shards": len(trace.meta["shards"]),
        "parquet_mb": disk / 2**20, "bytes_per_access": disk / n_acc,
        "record_s": rec_s, "record_tokens_per_s": n_tok / rec_s, "record_accesses_per_s": n_acc / rec_s,
        "forward_s": f["forward_s"], "forward_calls": f["forwards"], "trace_writer_write_s": w["write_s"],
        "other_s": rec_s - f["forward_s"] - w["write_s"],
        "other_def": "tokenising, windows, device-to-host copies, building tables, finish/load",
        "load_verify_s": load_s,
    }
    rows.append(row("2 trace", f"record_texts end to end ({n_acc / 1e6:.1f}M accesses)", rec_s, n_tok / rec_s, "tok/s"))
    rows.append(row("2 trace", "  of which model forwards", f["forward_s"], n_tok / f["forward_s"], "tok/s"))
    rows.append(row("2 trace", "  of which TraceWriter.write", w["write_s"], n_acc / w["write_s"], "acc/s"))
    rows.append(row("2 trace", "Trace.load(verify=True)", load_s, disk / 2**20 / load_s, "MB/s"))

    # ---- TraceWriter.write throughput on the trace's own shards
    shards = [(tk.combine_chunks(), ac.combine_chunks()) for tk, ac in trace.iter_shards()]
    base = {k: v for k, v in trace.meta.items() if k not in ("format", "counts", "shards", "columns")}
    again = args.workdir / "trace-rewrite"
    shutil.rmtree(again, ignore_errors=True)
    writer = TraceWriter(again, base, force=True, resume=False)
    times = []
    gc.collect()
    for tk, ac in shards:
        t = time.perf_counter()
        writer.write(tk, ac)
        times.append(time.perf_counter() - t)
    writer.finish(trace.n_docs)
    written = sum(f.stat().st_size for f in again.rglob("*.parquet"))
    shutil.rmtree(again, ignore_errors=True)
    del shards
    write_s = sum(times)
    per_shard = [shard["accesses"] / t for shard, t in zip(trace.meta["shards"], times)]
    out["trace_writer_write"] = {
        "shards": len(times), "accesses": n_acc, "seconds": write_s, "accesses_per_s": n_acc / write_s,
        "tokens_per_s": n_tok / write_s, "mb_per_s": written / 2**20 / write_s,
        "median_shard_accesses_per_s": statistics.median(per_shard), "shard_seconds": times,
    }
    rows.append(row("2 trace", f"TraceWriter.write ({len(times)} shards)", write_s, n_acc / write_s, "acc/s"))

    # ---- SlotIndex: cold build, cache, cached open
    builds = []
    for _ in range(args.build_repeats):
        fresh = Trace.load(path, verify=False)
        gc.collect()
        t = time.perf_counter()
        built = SlotIndex.build(fresh)
        builds.append(time.perf_counter() - t)
        del built, fresh
    t = time.perf_counter()
    Trace.load(path, verify=False).slot_index()  # build + write index/
    cache_s = time.perf_counter() - t
    gc.collect()
    cached_trace = Trace.load(path, verify=False)
    t = time.perf_counter()
    cached = cached_trace.slot_index()
    open_s = time.perf_counter() - t
    assert isinstance(cached.rows, np.memmap)
    built_trace = Trace.load(path, verify=False)
    built = SlotIndex.build(built_trace)
    out["slot_index"] = {
        "build_cold_s": statistics.median(builds), "build_times_s": builds,
        "build_accesses_per_s": n_acc / statistics.median(builds),
        "slot_index_first_use_s": cache_s, "cached_open_s": open_s,
        "index_mb": sum(f.stat().st_size for f in (path / "index").glob("*.npy")) / 2**20,
    }
    rows.append(row("2 trace", "SlotIndex.build (cold)", statistics.median(builds), n_acc / statistics.median(builds),
                    "acc/s", rounds=len(builds)))
    rows.append(row("2 trace", "trace.slot_index() first use (build+cache)", cache_s, None, None))
    rows.append(row("2 trace", "trace.slot_index() cached open (mmap)", open_s, None, None))

    # ---- contexts
    n_slots = trace.n_slots
    counts = np.diff(np.asarray(built.offsets[: n_slots + 1]))
    with_reads = np.flatnonzero(counts > 0)
    rng = np.random.default_rng(0)
    slots = rng.choice(with_reads, size=min(args.queries, len(with_reads)), replace=False)
    hottest = int(np.argmax(counts))
    out["slots"] = {
        "with_reads": len(with_reads), "n_slots": n_slots, "reads_of_queried_median": float(np.median(counts[slots])),
        "reads_of_queried_max": int(counts[slots].max()), "hottest_slot": hottest, "hottest_reads": int(counts[hottest]),
    }
    for name, index in (("built", built), ("cached", cached)):
        t = time.perf_counter()
        first = index.contexts(int(slots[0]), n=20, window=8)
        first_s = time.perf_counter() - t
        assert len(first) == min(20, len(np.unique(index.rows[index.offsets[slots[0]] : index.offsets[slots[0] + 1]])))
        lat = []
        for s in slots:
            t = time.perf_counter()
            index.contexts(int(s), n=20, window=8)
            lat.append(time.perf_counter() - t)
        hot = []
        for _ in range(3):
            t = time.perf_counter()
            index.contexts(hottest, n=20, window=8)
            hot.append(time.perf_counter() - t)
        q = quantiles_ms(lat)
        out[f"contexts_{name}"] = q | {"first_query_ms": first_s * 1e3, "hottest_slot_ms": statistics.median(hot) * 1e3}
        label = "built index" if name == "built" else "cached mmap index"
        rows.append(row("2 trace", f"contexts, {label}: first query", first_s, None, None))
        rows.append(row("2 trace", f"contexts, {label}: median", q["median_ms"] / 1e3, 1e3 / q["median_ms"], "q/s",
                        rounds=q["n"]))
        rows.append(row("2 trace", f"contexts, {label}: p95", q["p95_ms"] / 1e3, None, None, rounds=q["n"],
                        goal="contexts_p95_ms", goal_value=q["p95_ms"]))
        rows.append(row("2 trace", f"contexts, {label}: most-read slot", statistics.median(hot), None, None, rounds=3))

    # ---- slots_for
    doc_col = trace.tokens.column("doc").to_numpy()
    doc_start = np.searchsorted(doc_col, np.arange(trace.n_docs + 1))
    lengths = np.diff(doc_start)
    nonempty = np.flatnonzero(lengths > 0)
    picks = rng.choice(nonempty, size=args.queries)
    spans = [(int(d), int(rng.integers(0, lengths[d]))) for d in picks]
    t = time.perf_counter()
    first_df = cached.slots_for(spans[0][0], spans[0][1], spans[0][1] + 8)
    first_s = time.perf_counter() - t
    assert len(first_df) == min(8, lengths[spans[0][0]] - spans[0][1]) * per_token
    lat = []
    for d, s in spans:
        t = time.perf_counter()
        cached.slots_for(d, s, s + 8)
        lat.append(time.perf_counter() - t)
    q = quantiles_ms(lat)
    out["slots_for"] = q | {"first_call_ms": first_s * 1e3, "span": 8}
    rows.append(row("2 trace", "slots_for(doc, start, start+8): first call", first_s, None, None))
    rows.append(row("2 trace", "slots_for: median", q["median_ms"] / 1e3, 1e3 / q["median_ms"], "q/s", rounds=q["n"]))
    rows.append(row("2 trace", "slots_for: p95", q["p95_ms"] / 1e3, None, None, rounds=q["n"]))
    del built, cached, trace, cached_trace, built_trace
    gc.collect()
    return rows, out


def section_stats(tokenizer, data, ws: Workspace, args) -> tuple[list[dict], dict]:
    from smviz.stats import SlotStats, collect_stats
    from smviz.workspace.stages import BACKGROUND_STEP_OFFSET, make_stream
    from smviz.train.pretrain import PretrainConfig

    rows: list[dict] = []
    out: dict = {}
    model_dir = ws.model(PRESET)
    if not (model_dir / "manifest.json").is_file():
        m = MemoryModel.from_preset(PRESET, seed=0)
        m.tokenizer = tokenizer
        m.save_pretrained(model_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # ---- library, one process, one thread
        model = MemoryModel.from_pretrained(model_dir).eval()
        config = PretrainConfig()  # what `smviz stats` uses when the model has no pretraining run
        stream = make_stream(data, model.tokenizer, config)
        batches = [stream.batch(BACKGROUND_STEP_OFFSET + i) for i in range(args.lib_batches)]
        inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
        real = int(sum(b["attention_mask"].sum() for b in batches))

        def plain() -> None:
            with torch.no_grad():
                for b in inputs:
                    model(**b)

        result = {}

        def collect() -> None:
            result["stats"] = collect_stats(model, batches)

        c_plain = Case(f"forwards on {len(batches)} background batches, plain", plain, heavy=True)
        c_coll = Case("collect_stats on the same batches", collect, heavy=True)
        measure([c_plain, c_coll], warmup=1, rounds=args.lib_rounds, target_s=args.target_s, label="collect_stats")
        assert result["stats"].n_tokens == real
        r = paired_ratio(c_coll, c_plain)
        out["library"] = {
            "batches": len(batches), "batch_size": config.batch_size, "seq_len": config.seq_len, "real_tokens": real,
            "plain": case_info(c_plain, real), "collect_stats": case_info(c_coll, real),
            "collect_batches_per_s": len(batches) / c_coll.median, "collect_tokens_per_s": real / c_coll.median, **r,
            "ratio_def": "collect_stats / plain forwards of the same batches (1 thread)",
        }
        rows.append(row("3 stats", c_plain.what + " (1 thr)", c_plain.median, real / c_plain.median, "tok/s", c_plain))
        rows.append(row("3 stats", c_coll.what + " (1 thr)", c_coll.median, real / c_coll.median, "tok/s", c_coll,
                        ratio=r["ratio"]))
        rows.append(row("3 stats", "  collect_stats batches/s", c_coll.median, len(batches) / c_coll.median, "batch/s"))
        result.clear()
    finally:
        torch.set_num_threads(threads_before)

    # ---- CLI: 1 process vs torchrun with P processes
    procs = args.procs
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    outdir = args.workdir / "stats-out"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    common = ["stats", "--model", str(model_dir), "--workspace", str(ws.root), "--device", "cpu", "--json"]

    def command(n_proc: int, n_batches: int, dest: Path) -> list[str]:
        tail = ["-m", "smviz", *common, "--batches", str(n_batches), "--out", str(dest)]
        if n_proc == 1:
            return [sys.executable, *tail]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_proc}", *tail]

    runs: dict[tuple[int, int], list[float]] = {}
    files: dict[tuple[int, int], Path] = {}
    plan = []
    for r in range(args.cli_rounds):
        pair = [(1, args.cli_batches), (procs, args.cli_batches), (procs, procs), (1, procs)]
        plan += pair if r % 2 == 0 else pair[::-1]
    for k, (n_proc, n_batches) in enumerate(plan):
        dest = outdir / f"stats-{n_proc}p-{n_batches}b-{k}.safetensors"
        cmd = command(n_proc, n_batches, dest)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=str(args.workdir), capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        log(f"  [smviz stats] {n_proc} process(es), {n_batches} batches: {wall:.1f}s")
        runs.setdefault((n_proc, n_batches), []).append(wall)
        files[(n_proc, n_batches)] = dest
    one, many = SlotStats.load(files[(1, args.cli_batches)]), SlotStats.load(files[(procs, args.cli_batches)])
    identical = bool(torch.equal(one.counts, many.counts) and torch.equal(one.df, many.df)
                     and (one.n_docs, one.n_tokens) == (many.n_docs, many.n_tokens))
    tokens = one.n_tokens
    med = {k: statistics.median(v) for k, v in runs.items()}
    t1, tp = med[(1, args.cli_batches)], med[(procs, args.cli_batches)]
    s1, sp = med[(1, procs)], med[(procs, procs)]
    extra = args.cli_batches - procs
    marg1 = extra / (t1 - s1) if t1 > s1 else float("nan")
    margp = extra / (tp - sp) if tp > sp else float("nan")
    out["cli"] = {
        "batches": args.cli_batches, "processes": procs, "real_tokens": tokens, "rounds": args.cli_rounds,
        "threads_per_process": 1, "env": {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")},
        "command_1": " ".join(command(1, args.cli_batches, Path("OUT"))),
        "command_p": " ".join(command(procs, args.cli_batches, Path("OUT"))),
        "wall_1_s": t1, "wall_p_s": tp, "wall_ratio_1_over_p": t1 / tp,
        "startup_batches": procs, "startup_wall_1_s": s1, "startup_wall_p_s": sp,
        "marginal_batches_per_s_1": marg1, "marginal_batches_per_s_p": margp,
        "marginal_tokens_per_s_1": marg1 * tokens / args.cli_batches, "marginal_tokens_per_s_p": margp * tokens / args.cli_batches,
        "marginal_speedup_p_over_1": margp / marg1,
        "marginal_def": "(N - P) / (wall(N batches) - wall(P batches)): throughput without the fixed start-up",
        "outputs_identical": identical, "runs_s": {f"{p}p-{b}b": v for (p, b), v in runs.items()},
    }
    n = args.cli_batches
    rows.append(row("3 stats", f"smviz stats, 1 process, {n} batches (wall)", t1, n / t1, "batch/s"))
    rows.append(row("3 stats", f"torchrun {procs} processes, {n} batches (wall)", tp, n / tp, "batch/s", ratio=t1 / tp))
    rows.append(row("3 stats", f"smviz stats, 1 process, {procs} batches (start-up)", s1, None, None))
    rows.append(row("3 stats", f"torchrun {procs} processes, {procs} batches (start-up)", sp, None, None))
    rows.append(row("3 stats", "marginal rate, 1 process", None, marg1, "batch/s"))
    rows.append(row("3 stats", f"marginal rate, {procs} processes", None, margp, "batch/s", ratio=margp / marg1))
    shutil.rmtree(outdir, ignore_errors=True)
    return rows, out


# --------------------------------------------------------------------------- reporting


def case_info(c: Case, tokens: int) -> dict:
    return {"median_s": c.median, "tokens_per_s": tokens / c.median, "rounds": len(c.times),
            "steps_per_round": c.inner, "times_s": c.times}


def row(section: str, what: str, seconds: float | None, rate: float | None, unit: str | None, case: Case | None = None,
        *, ratio: float | None = None, rounds: int | None = None, goal: str | None = None,
        goal_value: float | None = None) -> dict:
    r = {"section": section, "what": what, "seconds": seconds, "rate": rate, "rate_unit": unit, "ratio": ratio,
         "rounds": len(case.times) if case else rounds}
    if goal:
        op, target, _ = GOALS[goal]
        value = ratio if goal_value is None else goal_value
        r |= {"goal": f"{op} {target:g}", "pass": bool(value <= target if op == "<=" else value < target)}
    return r


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_rate(v: float | None, unit: str | None) -> str:
    if v is None or unit is None or math.isnan(v):
        return ""
    return f"{v / 1e6:.2f}M {unit}" if v >= 1e6 else f"{v / 1e3:.1f}k {unit}" if v >= 1e4 else f"{v:.1f} {unit}"


def print_table(rows: list[dict]) -> None:
    print(f"{'section':<9} {'what':<58} {'rounds':>6} {'time':>11} {'throughput':>16} {'ratio':>7} {'goal':>7} {'pass':>5}")
    print("-" * 126)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        passed = "" if "pass" not in r else ("yes" if r["pass"] else "NO")
        print(f"{r['section']:<9} {r['what']:<58} {r['rounds'] or '':>6} {fmt_seconds(r['seconds']):>11} "
              f"{fmt_rate(r['rate'], r['rate_unit']):>16} {ratio:>7} {r.get('goal', ''):>7} {passed:>5}")
    print("time: median over rounds (section 1, SlotIndex.build, library stats) or one measurement; latency rows:")
    print("  median / p95 over the queries. ratio: section 1 and collect_stats = time with recording (counting) / plain")
    print("  forwards on the same input; torchrun rows = 1-process time / P-process time (speed-up, > 1 = faster).")
    print("'model forwards' in the recording breakdown stop before the recorder's end-of-call host copy (counted")
    print("  in 'other'); 'marginal rate' excludes the fixed start-up measured by the runs with P batches.")








# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute: small sizes, a 1M-access trace")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for sections 1 and 2 (default os.cpu_count()); section 3 always uses 1 per process")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward in the in-memory recorder pair")
    p.add_argument("--seq", type=int, default=128, help="sequence length in the in-memory recorder pair")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the in-memory pair (default 15; --quick: 9)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per cheap case")
    p.add_argument("--target-s", type=float, default=None, help="minimum span of a cheap case per round (default 0.5; --quick: 0.2)")
    p.add_argument("--ratio-tokens", type=int, default=None,
                   help="corpus tokens in the record_texts vs forwards pair (default 8192; --quick: 2048)")
    p.add_argument("--disk-rounds", type=int, default=None, help="rounds of the record_texts pair (default 11; --quick: 3)")
    p.add_argument("--trace-accesses", type=int, default=None,
                   help="accesses in the recorded trace (default 10,000,000; --quick: 1,000,000)")
    p.add_argument("--build-repeats", type=int, default=None, help="cold SlotIndex builds, median (default 3; --quick: 2)")
    p.add_argument("--queries", type=int, default=None, help="contexts / slots_for queries (default 200; --quick: 50)")
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun stats run")
    p.add_argument("--lib-batches", type=int, default=None, help="background batches in the collect_stats pair (default 8; --quick: 4)")
    p.add_argument("--lib-rounds", type=int, default=None, help="rounds of the collect_stats pair (default 7; --quick: 2)")
    p.add_argument("--cli-batches", type=int, default=None, help="background batches per `smviz stats` run (default 64; --quick: 8)")
    p.add_argument("--cli-rounds", type=int, default=1, help="rounds of the four `smviz stats` runs, median")
    p.add_argument("--no-stats", action="store_true", help="skip section 3 (slot statistics)")
    p.add_argument("--workdir", type=Path, default=None, help="work directory (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the workspace and traces in the work directory")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)}; --quick: {QUICK_OUT.relative_to(REPO)})")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (9 if q else 15)
    a.target_s = a.target_s or (0.2 if q else 0.5)
    a.ratio_tokens = a.ratio_tokens or (2048 if q else 8192)
    a.disk_rounds = a.disk_rounds or (3 if q else 11)
    a.trace_accesses = a.trace_accesses or (1_000_000 if q else 10_000_000)
    a.build_repeats = a.build_repeats or (2 if q else 3)
    a.queries = a.queries or (50 if q else 200)
    a.lib_batches = a.lib_batches or (4 if q else 8)
    a.lib_rounds = a.lib_rounds or (2 if q else 7)
    a.cli_batches = a.cli_batches or (8 if q else 64)
    a.out = a.out or (QUICK_OUT if q else DEFAULT_OUT)
    if a.cli_batches <= a.procs:
        p.error("--cli-batches must exceed --procs (the start-up runs use --procs batches)")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    own_workdir = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="bench_record.")) if own_workdir else args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"smviz record benchmark: threads={torch.get_num_threads()}, workdir={args.workdir}, quick={args.quick}")
    rows: list[dict] = []
    results: dict = {}
    ws = Workspace(args.workdir / "ws")
    try:
        t = time.perf_counter()
        build_data(ws.data, WorldConfig(**WORLD))
        data = load_data(ws.data)
        tokenizer = ensure_tokenizer(ws, data)
        articles = load_articles()
        model = MemoryModel.from_preset(PRESET, seed=0).eval()
        assert len(tokenizer) <= model.config.vocab_size
        results["setup_s"] = time.perf_counter() - t
        log(f"workspace ready in {results['setup_s']:.1f}s (tokenizer {len(tokenizer)} entries, {len(articles)} articles)")

        t = time.perf_counter()
        r, results["recording"] = section_recording(model, tokenizer, articles, args)
        rows += r
        log(f"section 1 done in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        r, results["trace"] = section_trace(model, tokenizer, articles, args)
        rows += r
        log(f"section 2 done in {time.perf_counter() - t:.1f}s")
        if not args.no_stats:
            t = time.perf_counter()
            r, results["stats"] = section_stats(tokenizer, data, ws, args)
            rows += r
            log(f"section 3 done in {time.perf_counter() - t:.1f}s")
    finally:
        if args.keep:
            log(f"kept {args.workdir}")
        elif own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
        else:
            for name in ("ws", "trace-big", ".trace-big.partial", "trace-ratio", ".trace-ratio.partial",
                         "trace-rewrite", ".trace-rewrite.partial", "stats-out"):
                shutil.rmtree(args.workdir / name, ignore_errors=True)

    total = time.perf_counter() - t_start
    rec, tr = results["recording"], results["trace"]
    goals = {
        "recorder_in_memory_ratio": rec["in_memory"]["ratio"],
        "contexts_p95_ms": tr["contexts_cached"]["p95_ms"],
    }
    goal_report = {}
    for name, value in goals.items():
        op, target, what = GOALS[name]
        goal_report[name] = {"value": value, "goal": f"{op} {target:g}", "what": what,
                             "pass": bool(value <= target if op == "<=" else value < target)}
    goal_report["contexts_p95_ms"]["built_index_p95_ms"] = tr["contexts_built"]["p95_ms"]
    goal_report["contexts_p95_ms"]["built_index_pass"] = tr["contexts_built"]["p95_ms"] < GOALS["contexts_p95_ms"][1]
    goal_report["contexts_p95_ms"]["median_ms"] = tr["contexts_cached"]["median_ms"]

    print()
    print_table(rows)
    print()
    print(f"recorder overhead in memory: {rec['in_memory']['ratio']:.3f}x plain forward "
          f"(median of round ratios {rec['in_memory']['median_of_round_ratios']:.3f}; goal <= 1.05: "
          f"{'pass' if goal_report['recorder_in_memory_ratio']['pass'] else 'FAIL'})")
    print(f"record_texts to disk: {rec['on_disk']['ratio']:.2f}x the plain forwards of its windows "
          f"({rec['on_disk']['tokens']:,} tokens, {rec['on_disk']['shards']} shard(s))")
    t = tr["trace"]
    print(f"trace: {t['accesses']:,} accesses ({t['tokens']:,} tokens, {t['shards']} shards, {t['parquet_mb']:.0f} MB) "
          f"recorded in {t['record_s']:.1f}s = {t['record_tokens_per_s']:,.0f} tok/s; forwards {t['forward_s']:.1f}s, "
          f"TraceWriter.write {t['trace_writer_write_s']:.1f}s, other {t['other_s']:.1f}s"
          + ("  [--quick: smaller than the 10M-access default]" if t["accesses"] < 10_000_000 else ""))
    print(f"SlotIndex: build {tr['slot_index']['build_cold_s']:.2f}s cold; contexts median "
          f"{tr['contexts_cached']['median_ms']:.1f} ms, p95 {tr['contexts_cached']['p95_ms']:.1f} ms (goal p95 < 50 ms: "
          f"{'pass' if goal_report['contexts_p95_ms']['pass'] else 'FAIL'}); slots_for median {tr['slots_for']['median_ms']:.1f} ms")
    if "stats" in results:
        s = results["stats"]
        print(f"slot stats: collect_stats {s['library']['collect_batches_per_s']:.2f} batch/s "
              f"({s['library']['collect_tokens_per_s']:,.0f} tok/s, {s['library']['ratio']:.3f}x plain forwards), 1 thread")
        c = s["cli"]
        m = c["marginal_speedup_p_over_1"]
        speedup = f"{m:.2f}x" if math.isfinite(m) else "n/a (runs too short to tell start-up from work: raise --cli-batches)"
        print(f"  smviz stats {c['batches']} batches: 1 process {c['wall_1_s']:.1f}s, torchrun {c['processes']} processes "
              f"{c['wall_p_s']:.1f}s -> {c['wall_ratio_1_over_p']:.2f}x wall-clock; without start-up "
              f"({c['startup_wall_1_s']:.1f}s / {c['startup_wall_p_s']:.1f}s) {speedup}; "
              f"outputs identical: {c['outputs_identical']}")
        print(f"  every stats process: 1 thread (OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false), {os.cpu_count()} CPUs")
    peak = print_totals(total, load_start)

    payload = {
        "benchmark": "smviz recording, traces, slot index and slot statistics",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_record(load_start=load_start, torch_threads=args.threads or os.cpu_count(), torch_threads_stats=1),
        "settings": {
            "preset": PRESET, "seed": 0, "quick": args.quick, "batch": args.batch, "seq": args.seq,
            "rounds": args.rounds, "warmup": args.warmup, "target_s": args.target_s,
            "ratio_tokens": args.ratio_tokens, "disk_rounds": args.disk_rounds,
            "trace_accesses_min": args.trace_accesses, "build_repeats": args.build_repeats, "queries": args.queries,
            "procs": args.procs, "lib_batches": args.lib_batches, "lib_rounds": args.lib_rounds,
            "cli_batches": args.cli_batches, "cli_rounds": args.cli_rounds, "stats": not args.no_stats,
            "world": WORLD, "record_batch_size": RECORD_BATCH, "shard_tokens": SHARD_TOKENS,
            "forward": "eval mode, under torch.no_grad(), float32, CPU",
        },
        "goals": goal_report,
        "rows": rows,
        "results": results,
        "memory": {"peak_rss_mb": peak},
        "total_runtime_s": total,
    }
    write_result(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
