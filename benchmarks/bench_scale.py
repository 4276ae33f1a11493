"""Scale-out (issue 19): a synthetic trace far larger than memory queried through DuckDB, recording with two
processes against one, and a sparse finetuning step under torchrun DDP against one process.

    python benchmarks/bench_scale.py                      # 10^9 reads (~35 GB of disk while the index builds)
    python benchmarks/bench_scale.py --reads 100000000    # a smaller trace
    python benchmarks/bench_scale.py --quick              # everything small: a smoke run (the suite runs it)

1. Trace: `--reads` synthetic reads (one memory layer, 2^16 slots, 4 heads x top-32, slot popularity a power
   law like a real memory's), written shard by shard with `TraceWriter` (a valid trace: tokens table too),
   so nothing of its size is ever in memory. The DuckDB index (`smviz.trace.duck`) is built in a child
   process, then `contexts` is timed for 60 slots (20 popular, 40 uniform) in another child, after 3
   warm-up queries; each child reports its peak RSS. Goal: contexts p95 < 200 ms, peak RSS < 2 GB.
2. Recording: `smviz record` of built-in corpus articles through a micro model, one process (2 threads)
   against `torchrun --nproc-per-node 2` (1 thread each), wall time of the command; the trace is the
   same file for file (checked).
3. DDP: the mean time of a sparse SGD step (after warm-up) on the micro model, one process (2 threads,
   the whole batch) against two (1 thread, half the batch each, counts and row gradients all-reduced).

Writes benchmarks/results/bench_scale.json (--out). Ratios are within one run; the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import log, machine_record, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_SLOTS, HEADS, KNN, LAYER = 2**16, 4, 32, 3
READS_PER_TOKEN = HEADS * KNN


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_env(threads: int) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_child(cmd: list[str], threads: int, *, torchrun: bool = False) -> tuple[float, str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else [sys.executable]
    t0 = time.perf_counter()
    done = subprocess.run([*launch, *cmd], env=child_env(threads), capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0, done.stdout


# --------------------------------------------------------------------------- 1. a synthetic trace


def write_synthetic(path: Path, n_reads: int, shard_tokens: int, seed: int = 0) -> dict:
    from smviz.memory import MemoryConfig
    from smviz.trace import TraceWriter, accesses_table, tokens_table

    n_tokens = n_reads // READS_PER_TOKEN
    rng = np.random.default_rng(seed)
    popularity = 1.0 / (np.arange(N_SLOTS) + 20.0) ** 0.9  # a few slots read often, a long tail
    cdf = np.cumsum(popularity[rng.permutation(N_SLOTS)])
    cdf /= cdf[-1]
    memory = MemoryConfig(n_keys=int(N_SLOTS**0.5), heads=HEADS, knn=KNN).to_dict()
    meta = {"model_hash": "synthetic", "memory": memory, "layers": [LAYER], "n_slots": N_SLOTS,
            "source": {"kind": "synthetic", "reads": n_reads, "seed": seed}}
    writer = TraceWriter(path, meta, force=True, resume=False)
    t0 = time.perf_counter()
    for shard, row0 in enumerate(range(0, n_tokens, shard_tokens)):
        n = min(shard_tokens, n_tokens - row0)
        rows = np.arange(row0, row0 + n)
        doc = rows // 128  # documents of 128 tokens
        token_id = rng.integers(0, 49152, n)
        text = np.char.add(" w", (token_id % 1000).astype(str)).tolist()
        tokens = tokens_table(row0, doc, np.char.add("d", doc.astype(str)), rows % 128, token_id, text,
                              np.full(n, -1), np.full(n, -1))
        slots = np.searchsorted(cdf, rng.random((n, 1, HEADS, KNN))).astype(np.int32)
        weights = rng.dirichlet(np.ones(KNN), (n, 1, HEADS)).astype(np.float16)
        writer.write(tokens, accesses_table(row0, [LAYER], slots, weights), shard=shard)
        if shard % 10 == 0:
            log(f"  shard {shard}: {row0 + n:,} of {n_tokens:,} tokens")
    writer.finish(int(doc[-1]) + 1 if n_tokens else 0)
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"reads": n_tokens * READS_PER_TOKEN, "tokens": n_tokens, "write_s": round(time.perf_counter() - t0, 1),
            "trace_bytes": disk}


def child_build(path: str) -> None:
    from smviz.trace import Trace
    from smviz.trace.duck import DuckSlotIndex

    t0 = time.perf_counter()
    DuckSlotIndex.for_trace(Trace.load(path, verify=False))
    print(json.dumps({"build_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())}))


def child_query(path: str) -> None:
    from smviz.trace import Trace

    os.environ["SMVIZ_INDEX_MEMORY"] = "0"  # the DuckDB index, whatever this machine's RAM
    t0 = time.perf_counter()
    index = Trace.load(path, verify=False).slot_index()
    open_s = time.perf_counter() - t0
    counts = index.slot_counts()
    rng = np.random.default_rng(1)
    read = np.flatnonzero(counts)
    slots = [int(s) for s in np.argsort(-counts)[:20]] + [int(s) for s in rng.choice(read, 40, replace=False)]
    for s in slots[:3]:
        index.contexts(s, n=20)
    times = []
    for s in slots:
        t = time.perf_counter()
        df = index.contexts(s, n=20)
        times.append(time.perf_counter() - t)
        assert len(df) == 20 or len(df) == index.reading_tokens()[s]
    t = time.perf_counter()
    index.slots_for(0, 0, 128)
    slots_for_s = time.perf_counter() - t

    def ms(values: list[float], q: float) -> float:
        return round(1000 * float(np.quantile(values, q)), 1)

    print(json.dumps({"open_s": round(open_s, 3), "contexts_p50_ms": ms(times, 0.5), "contexts_p95_ms": ms(times, 0.95),
                      "contexts_max_ms": ms(times, 1.0), "popular_p95_ms": ms(times[:20], 0.95),
                      "uniform_p95_ms": ms(times[20:], 0.95), "reads_of_most_read_slot": int(counts.max()),
                      "slots_for_ms": round(1000 * slots_for_s, 1), "queries": len(times), "peak_rss_mb": round(peak_rss_mb())}))


# --------------------------------------------------------------------------- 2 and 3. the model work


def micro_model(workdir: Path, n_docs: int) -> tuple[Path, Path]:
    """A micro model with a tokenizer, saved, and a JSONL of `n_docs` corpus articles."""
    from smviz.data.corpus import load_articles
    from smviz.data.tokenizer import train_tokenizer
    from smviz.model import MemoryModel

    articles = load_articles()[:n_docs]
    tokenizer = train_tokenizer([a.text for a in articles[:200]], vocab_size=2000)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    model.save_pretrained(workdir / "model")
    texts = workdir / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"a{i}", "text": a.text}) + "\n" for i, a in enumerate(articles)))
    return workdir / "model", texts


def bench_record(workdir: Path, model: Path, texts: Path) -> dict:
    args = ["-m", "smviz", "record", "--model", str(model), "--input", str(texts), "--shard-tokens", "8192",
            "--device", "cpu", "--json"]
    one_s, _ = run_child([*args, "--out", str(workdir / "rec1")], threads=2)
    two_s, _ = run_child([*args, "--out", str(workdir / "rec2")], threads=1, torchrun=True)
    same = all((workdir / "rec1" / f.relative_to(workdir / "rec2")).read_bytes() == f.read_bytes()
               for f in (workdir / "rec2").rglob("*") if f.is_file())
    tokens = json.loads((workdir / "rec1" / "meta.json").read_text())["counts"]["tokens"]
    return {"tokens": tokens, "one_process_s": round(one_s, 2), "two_processes_s": round(two_s, 2),
            "speedup": round(one_s / two_s, 3), "same_trace_file_for_file": same,
            "note": "wall time of the command, process start and model load included (1 process: 2 threads; 2: 1 each)"}


def child_ddp_step(model_dir: str, steps: str) -> None:
    import torch

    from smviz.distributed import distributed_from_env
    from smviz.model import MemoryModel
    from smviz.train import FinetuneConfig, Trainer

    with distributed_from_env("cpu") as (rank, world_size, device):
        model = MemoryModel.from_pretrained(model_dir, device=device)
        model.eval()
        config = FinetuneConfig(method="memory-all", lr=1.0).resolved()  # every read row: no statistics needed
        trainer = Trainer(model, config, None, device, world_size=world_size)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (16, 128), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        local = {k: v[rank::world_size] for k, v in batch.items()}
        times = []
        for step in range(int(steps)):
            t = time.perf_counter()
            trainer.step(local, step)
            times.append(time.perf_counter() - t)
        if rank == 0:
            print(json.dumps({"step_s": statistics.mean(times[2:]), "steps": len(times) - 2}))


def bench_ddp(model: Path, steps: int) -> dict:
    script = [str(Path(__file__).resolve()), "--child", "ddp-step", str(model), str(steps)]
    one = json.loads(run_child(script, threads=2)[1])
    two = json.loads(run_child(script, threads=1, torchrun=True)[1])
    return {"batch": "16 x 128 tokens, memory-all rows (every read row: no background statistics)",
            "one_process_step_s": round(one["step_s"], 4), "two_processes_step_s": round(two["step_s"], 4),
            "speedup": round(one["step_s"] / two["step_s"], 3), "timed_steps": one["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=10**9)
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smviz-bench-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic trace")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_scale.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"build": child_build, "query": child_query, "ddp-step": child_ddp_step}[args.child[0]](*args.child[1:])
        return
    reads = 2_000_000 if args.quick else args.reads
    load_start = os.getloadavg()
    args.workdir.mkdir(parents=True, exist_ok=True)
    trace_path = args.workdir / "synthetic"
    log(f"1. a synthetic trace of {reads:,} reads -> {trace_path}")
    free = shutil.disk_usage(args.workdir).free
    trace = write_synthetic(trace_path, reads, shard_tokens=4096 if args.quick else 65_536)
    build = json.loads(run_child([str(Path(__file__).resolve()), "--child", "build", str(trace_path)], threads=2)[1])
    index_bytes = sum(f.stat().st_size for f in (trace_path / "index").rglob("*") if f.is_file())
    query = json.loads(run_child([str(Path(__file__).resolve()), "--child", "query", str(trace_path)], threads=2)[1])
    log(f"   contexts p95 {query['contexts_p95_ms']} ms, peak RSS {query['peak_rss_mb']} MB (build {build['build_s']} s)")
    if not args.keep:
        shutil.rmtree(trace_path)
    log("2. recording, 1 process vs 2")
    model, texts = micro_model(args.workdir, 40 if args.quick else 400)
    record = bench_record(args.workdir, model, texts)
    log(f"   {record}")
    log("3. a sparse step, 1 process vs 2 (DDP)")
    ddp = bench_ddp(model, 4 if args.quick else 12)
    log(f"   {ddp}")
    for name in ("rec1", "rec2", "model", "texts.jsonl"):
        p = args.workdir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    write_result(args.out, {
        "benchmark": "bench_scale", "quick": args.quick,
        "machine": machine_record("cpu", load_start=load_start, disk_free_bytes_at_start=free),
        "trace": {**trace, "index_bytes": index_bytes, "build": build, "query": query,
                  "goals": {"contexts_p95_ms": 200, "peak_rss_mb": 2048}},
        "record": record, "ddp_sparse_step": ddp,
    })
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
