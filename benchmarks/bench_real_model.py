"""Speed of the memory workflow on a real imported model retrofitted with a memory (issue 16's speed
section; made for SmolLM2-135M, runs on any base), as ratios measured within one run.

    python benchmarks/bench_real_model.py --model WS/models/r3                # base from the retrofit run
    python benchmarks/bench_real_model.py --model WS/models/r3 --base WS/models/smollm2 --quick
    python benchmarks/bench_real_model.py --micro-smoke --quick               # a micro model built in a temp dir

Models: --model is a memory model directory (`MemoryModel.from_pretrained`); --base is the base model
directory it was retrofitted from (`smviz import`, memory.json "memory": null), by default the `base`
of the retrofit's run config (WS/pretrain/NAME/config.json when --model is WS/models/NAME).
--micro-smoke builds both in a temp dir first: a micro Llama (the `micro` preset's shape, random
weights, a 512-entry BPE tokenizer trained on 200 corpus articles) imported with `import_model`,
retrofitted with `build_model(RetrofitConfig(base, memory = micro shape, n_keys 32 = 1,024 slots))`
and saved, its run config written with `PretrainRunDir.claim` (so --base is found as above).

Batch (all sections): --batch x --seq tokens of corpus text tokenised with the model's own tokenizer
(`pack_documents(tokenizer, load_articles() texts in title order, seq)`, end-of-text after each
article, no padding; attention_mask all ones, labels = input_ids). Section 3 also uses a stream batch:
`Stream(world.new, tokenizer, batch_size=16).batch(0)` of `generate_world(WorldConfig(n_known=4,
n_bio_only=1, n_new=3))` — 16 right-padded statement paraphrases of one fact, finetune()'s setting.

Section 1, retrofit step / full-finetune step: two models, each `build_model(RetrofitConfig, None)` (the
base loaded and verified, the memory attached, as `smviz retrofit` starts; the RetrofitConfig is the
run's own when found, else the defaults with the model's memory config), in train mode. The retrofit
step is the pretraining loop's step with the base frozen (`dense_lr_mult` 0): the optimizer as
`smviz.train.pretrain` builds it (`model.param_groups(lr, weight_decay)`, the dense groups left out and
their parameters requires_grad False, AdamW betas (0.9, 0.95)); one step = `model(**batch).loss`,
backward, `clip_grad_norm_(model.parameters(), grad_clip)`, `optimizer.step()`, `zero_grad`. The
full-finetune step is the same step with every parameter trainable (all groups, as a retrofit with
`dense_lr_mult` 1 trains). The lr schedule, usage monitor, logging and checkpoints are not timed.
Checked before timing: after a retrofit step no base parameter requires or holds a gradient.

Section 2, recorder overhead: `with torch.no_grad(), AccessRecorder(model): model(...)` (a new
recorder per call, hooks registered and removed each time) vs the plain no-grad forward of the --model
(eval mode), on the corpus batch. Checked: the recorder got every token. Goal: ratio <= 1.05.

Section 3, sparse / full finetuning step: `Trainer.step(batch, 0)` on trainers built as finetune()
builds them (`Trainer(copy of the --model, FinetuneConfig(method, optimizer).resolved(), stats,
device)`, eval mode, default lr, top_t 500): sparse + SGD vs full + AdamW, each on its own deep copy,
on the stream batch and on the corpus batch. Background statistics: the model directory's
slot_stats.safetensors when present, else synthetic valid ones (bench_finetune's `synthetic_stats`).
Goal: sparse / full <= 0.3 on the stream batch (the corpus batch is reported with its pass/fail too).

Timing: in every section the cases are timed in interleaved rounds (`_bench.measure`: warm-up steps,
then each round runs every case once in a new random order; a case faster than --target-s repeats
inside a round); times are medians over rounds, ratios are ratios of the medians (`paired_ratio`,
with the median of the per-round ratios). The same batch is stepped on again and again (the weights
drift; the work per step does not). On CUDA every timed region is synchronised. Threads: --threads
(default os.cpu_count(); --micro-smoke: 1); beside other work, --threads 1 keeps CPU timings steady (a
descheduled OpenMP thread stalls the others). The JSON (default
benchmarks/results/bench_real_model.json, --quick: bench_real_model_quick.json; --micro-smoke writes
only with --out) holds every time and ratio, the goals and whether they hold, both model hashes, the
device, the batch shapes, the settings, the machine and this protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from _bench import Case, log, machine_record, measure, paired_ratio, print_totals, write_result  # noqa: E402 (run as a script from benchmarks/)
from bench_finetune import METHODS, WORLD, case_info, git_info, make_trainer, synthetic_stats

from smviz.data.corpus import load_articles
from smviz.data.tokenizer import pack_documents, train_tokenizer
from smviz.data.world import WorldConfig, generate_world
from smviz.device import resolve_device
from smviz.model import MemoryModel, import_model, is_base_model_dir, model_dir_hash, preset
from smviz.record import AccessRecorder
from smviz.stats import STATS_FILE, SlotStats
from smviz.train import PretrainRunDir, RetrofitConfig, Stream
from smviz.train.pretrain import build_model, make_optimizer
from smviz.workspace import Workspace

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_OUT = ROOT / "results" / "bench_real_model.json"
QUICK_OUT = ROOT / "results" / "bench_real_model_quick.json"

GOALS = {
    "recorder_ratio": ("<=", 1.05, "forward with AccessRecorder / plain forward, eval, no_grad, corpus batch"),
    "sparse_over_full": ("<=", 0.3, "Trainer.step sparse + SGD / full + AdamW, stream batch"),
}
SPARSE, FULL = "sparse-sgd", "full-adamw"  # bench_finetune.METHODS keys
MICRO_ARTICLES = 200
MICRO_VOCAB = 512
MICRO_MEMORY = {"n_keys": 32, "heads": 2, "knn": 4, "k_dim": 32, "layers": [1]}
MICRO_SIZES = {"batch": 4, "seq": 32}


# --------------------------------------------------------------------------- models and batches


def micro_models(root: Path) -> Path:
    """A micro base directory (imported) and a retrofitted memory model directory in the workspace at
    `root`, with the retrofit's run config (see the module docstring); returns the memory model dir."""
    tokenizer = train_tokenizer([a.text for a in load_articles()[:MICRO_ARTICLES]], vocab_size=MICRO_VOCAB)
    eos = tokenizer.eos_token_id
    hf = dict(preset("micro").hf, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    lm.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    ws = Workspace(root / "ws")
    import_model(root / "hf", ws.model("base"))
    config = RetrofitConfig(base=str(ws.model("base")), memory=MICRO_MEMORY)
    model = build_model(config, None)
    model.save_pretrained(ws.model("micro-retrofit"))
    config = dataclasses.replace(config, memory=model.memory_config.to_dict())  # as run_retrofit records it
    PretrainRunDir(ws.pretrain_run("micro-retrofit")).claim(config.to_dict())
    return ws.model("micro-retrofit")


def retrofit_config(model: MemoryModel, model_dir: Path, base: Path | None) -> RetrofitConfig:
    """The retrofit's own config (its run directory's, --base replacing its base), else the defaults
    with the model's memory config and --base; SystemExit when no base is known."""
    ws = Workspace.of_model(model_dir)
    saved = PretrainRunDir(ws.pretrain_run(model_dir.name)).config() if ws is not None else None
    if saved is not None and saved.get("base"):
        config = RetrofitConfig.from_dict(saved)
        config = dataclasses.replace(config, base=str(base)) if base is not None else config
    elif base is not None:
        config = RetrofitConfig(base=str(base), memory=model.memory_config.to_dict())
    else:
        raise SystemExit(f"--base is needed: no retrofit run config with a base was found for {model_dir}")
    if not (Path(config.base).is_dir() and is_base_model_dir(config.base)):
        raise SystemExit(f"{config.base} is not a base model directory (smviz import); give it with --base")
    return config


def corpus_batch(tokenizer, rows: int, seq: int) -> dict[str, torch.Tensor]:
    """rows x seq packed corpus tokens (see the module docstring)."""
    articles = load_articles()
    n = max(16, rows * seq // 32)
    while True:
        packed = pack_documents(tokenizer, [a.text for a in articles[:n]], seq)
        if len(packed) >= rows or n >= len(articles):
            break
        n *= 2
    if len(packed) < rows:
        raise SystemExit(f"the corpus gives {len(packed)} rows of {seq} tokens, fewer than --batch {rows}")
    x = packed[:rows]
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def ratio_info(num: Case, den: Case, tokens: int, goal: str | None = None) -> dict:
    r = paired_ratio(num, den)
    info = {"ratio": r["ratio"], "median_of_round_ratios": r["median_of_round_ratios"], "round_ratios": r["round_ratios"],
            "ratio_def": f"{num.what} / {den.what}",
            "cases": {c.key: case_info(c) | {"what": c.what, "tokens_per_s": tokens / c.median} for c in (num, den)}}
    if goal is not None:
        op, target, what = GOALS[goal]
        info["goal"] = {"name": goal, "goal": f"{op} {target:g}", "what": what, "pass": bool(r["ratio"] <= target)}
    return info


# --------------------------------------------------------------------------- sections


def section_retrofit(config: RetrofitConfig, reference: MemoryModel, batch: dict, args, device: torch.device) -> dict:
    """Retrofit step (base frozen) vs full-finetune step (every parameter), section 1."""
    cases, out = {}, {}
    memory_ids: set[int] = set()
    for key, frozen in (("retrofit", True), ("full", False)):
        model = build_model(config, None).to(device)
        optimizer = make_optimizer(model, config if frozen else dataclasses.replace(config, dense_lr_mult=1.0))
        model.train()

        def step(model=model, optimizer=optimizer) -> None:
            model(**batch).loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if frozen:
            memory_ids = {id(p) for m in model.memory_layers.values() for p in m.parameters()}
            model(**batch).loss.backward()  # a step's gradients, checked before they are cleared
            base_grads = [p for p in model.parameters() if id(p) not in memory_ids and (p.requires_grad or p.grad is not None)]
            assert not base_grads, f"{len(base_grads)} base parameters take a gradient in the retrofit step"
            optimizer.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[f"{key}_trainable_parameters"] = trainable
        out[f"{key}_optimizer_groups"] = [g["name"] for g in optimizer.param_groups]
        what = "retrofit step (base frozen, memory AdamW)" if frozen else "full-finetune step (every parameter, AdamW)"
        cases[key] = Case(what, step, key=key)
    out["memory_config_matches_model"] = model.memory_config == reference.memory_config
    out["parameters"] = model.parameter_counts()
    measure(list(cases.values()), device=device, warmup=args.warmup, rounds=args.rounds, target_s=args.target_s,
            label="1 retrofit/full")
    tokens = int(batch["attention_mask"].sum())
    out |= ratio_info(cases["retrofit"], cases["full"], tokens)
    out["settings"] = {k: getattr(config, k) for k in ("lr", "weight_decay", "grad_clip", "seed")}
    del cases, model, optimizer
    gc.collect()
    return out


def section_recorder(model: MemoryModel, batch: dict, args, device: torch.device) -> dict:
    """`with AccessRecorder(model)` forward vs the plain forward, eval, no_grad (section 2)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = int(mask.sum())

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def recorded() -> None:
        with torch.no_grad(), AccessRecorder(model) as rec:
            model(input_ids=ids, attention_mask=mask)
        assert len(rec.batches) == 1

    with torch.no_grad(), AccessRecorder(model) as rec:  # sanity: the recorder saw every token
        model(input_ids=ids, attention_mask=mask)
    assert len(rec.batches[0].seq) == real, (len(rec.batches[0].seq), real)
    del rec
    c_plain = Case("forward, plain", plain, key="plain")
    c_rec = Case("forward with AccessRecorder", recorded, key="recorder")
    measure([c_plain, c_rec], device=device, warmup=args.warmup, rounds=args.rounds, target_s=args.target_s, label="2 recorder")
    return ratio_info(c_rec, c_plain, real, goal="recorder_ratio")


def section_finetune(model: MemoryModel, model_dir: Path, batches: dict[str, dict], args, device: torch.device) -> dict:
    """Trainer.step, sparse + SGD vs full + AdamW, per batch (section 3)."""
    if (model_dir / STATS_FILE).is_file():
        stats, source = SlotStats.load_for_model(model_dir, model), str(model_dir / STATS_FILE)
    else:
        stats, source = synthetic_stats(model), "synthetic (bench_finetune.synthetic_stats)"
    trainers = {k: make_trainer(model, k, stats, device) for k in (SPARSE, FULL)}
    out: dict = {"stats": source, "batches": {}}
    for name, batch in batches.items():
        cases = {k: Case(f"Trainer.step: {METHODS[k][2]}", lambda tr=tr, b=batch: tr.step(b, 0), key=k)
                 for k, tr in trainers.items()}
        measure(list(cases.values()), device=device, warmup=args.warmup, rounds=args.rounds, target_s=args.target_s,
                label=f"3 finetune, {name} batch")
        real = int(batch["attention_mask"].sum())
        out["batches"][name] = {"shape": list(batch["input_ids"].shape), "real_tokens": real,
                                **ratio_info(cases[SPARSE], cases[FULL], real, goal="sparse_over_full")}
    out["rows_per_sparse_step"] = trainers[SPARSE].config.top_t
    del trainers
    gc.collect()
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="memory model directory (a retrofit, WS/models/NAME)")
    p.add_argument("--base", type=Path, default=None, help="its base model directory (default: the retrofit run's base)")
    p.add_argument("--micro-smoke", action="store_true", help="build a micro base and retrofit in a temp dir and run on them")
    p.add_argument("--quick", action="store_true", help="fewer rounds and warm-up steps")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:i] or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default os.cpu_count(); --micro-smoke: 1)")
    p.add_argument("--batch", type=int, default=None, help="rows of the corpus batch (default 8; --micro-smoke: 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row of the corpus batch (default 64; --micro-smoke: 32)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per section (default 7; --quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 2; --quick: 1)")
    p.add_argument("--target-s", type=float, default=None, help="minimum span of a case per round (default 0.25; --quick: 0.1)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)}; --quick: {QUICK_OUT.relative_to(REPO)}; "
                        "--micro-smoke: none unless given)")
    a = p.parse_args(argv)
    if (a.model is None) == (not a.micro_smoke):
        p.error("give --model DIR or --micro-smoke (one of them)")
    q, sizes = a.quick, (MICRO_SIZES if a.micro_smoke else {"batch": 8, "seq": 64})
    a.batch, a.seq = a.batch or sizes["batch"], a.seq or sizes["seq"]
    a.threads = a.threads or (1 if a.micro_smoke else os.cpu_count() or 1)
    a.rounds = a.rounds or (3 if q else 7)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.target_s = a.target_s or (0.1 if q else 0.25)
    if a.out is None and not a.micro_smoke:
        a.out = QUICK_OUT if q else DEFAULT_OUT
    return a


def run(args, device: torch.device) -> dict:
    """Load the models, build the batches, run the three sections; the results by section."""
    t = time.perf_counter()
    model = MemoryModel.from_pretrained(args.model, device=device).eval()
    tokenizer = model.require_tokenizer("the benchmark's batches")
    config = retrofit_config(model, args.model, args.base)
    corpus = {k: v.to(device) for k, v in corpus_batch(tokenizer, args.batch, args.seq).items()}
    stream = Stream(generate_world(WorldConfig(**WORLD)).new, tokenizer, batch_size=16).batch(0)
    stream = {k: v.to(device) for k, v in stream.items()}
    models = {"model": str(args.model), "model_hash": model.model_hash, "base": config.base,
              "base_hash": model_dir_hash(config.base), "memory_config": model.memory_config.to_dict(),
              "parameters": model.parameter_counts(), "retrofit_config": config.to_dict()}
    out: dict = {"models": models, "setup_s": time.perf_counter() - t,
                 "batches": {"corpus": {"shape": list(corpus["input_ids"].shape), "real_tokens": int(corpus["attention_mask"].sum())},
                             "stream": {"shape": list(stream["input_ids"].shape), "real_tokens": int(stream["attention_mask"].sum())}}}
    log(f"model {model.model_hash[:12]} (base {models['base_hash'][:12]}), corpus batch {out['batches']['corpus']['shape']}, "
        f"stream batch {out['batches']['stream']['shape']}; ready in {out['setup_s']:.1f}s")
    for key, fn in (("retrofit", lambda: section_retrofit(config, model, corpus, args, device)),
                    ("recorder", lambda: section_recorder(model, corpus, args, device)),
                    ("finetune", lambda: section_finetune(model, args.model, {"stream": stream, "corpus": corpus}, args, device))):
        t = time.perf_counter()
        out[key] = fn()
        out[key]["section_s"] = time.perf_counter() - t
        log(f"section {key} done in {out[key]['section_s']:.1f}s")
    return out


def report(res: dict) -> dict:
    """Print the ratios; returns the goals with their values and verdicts."""
    def line(label: str, r: dict) -> str:
        (num, den) = r["cases"].values()
        goal = r.get("goal")
        verdict = f"; goal {goal['goal']}: {'pass' if goal['pass'] else 'FAIL'}" if goal else ""
        return (f"{label}: {r['ratio']:.3f}x ({num['median_ms']:.1f} ms / {den['median_ms']:.1f} ms; median of round "
                f"ratios {r['median_of_round_ratios']:.3f}{verdict})")

    rf = res["retrofit"]
    print(line("1 retrofit step / full-finetune step", rf)
          + f"  trainable {rf['retrofit_trainable_parameters']:,} / {rf['full_trainable_parameters']:,} parameters")
    print(line("2 recorder forward / plain forward", res["recorder"]))
    for name, r in res["finetune"]["batches"].items():
        print(line(f"3 sparse SGD step / full AdamW step, {name} batch {'x'.join(map(str, r['shape']))}", r))
    print(f"  background statistics: {res['finetune']['stats']}")
    goals = {"recorder_ratio": res["recorder"]["goal"] | {"value": res["recorder"]["ratio"]},
             "sparse_over_full": res["finetune"]["batches"]["stream"]["goal"] | {
                 "value": res["finetune"]["batches"]["stream"]["ratio"],
                 "corpus_batch_value": res["finetune"]["batches"]["corpus"]["ratio"],
                 "corpus_batch_pass": res["finetune"]["batches"]["corpus"]["goal"]["pass"]}}
    for name, g in goals.items():
        print(f"goal {name}: {g['value']:.3f} ({g['goal']}): {'pass' if g['pass'] else 'FAIL'}")
    return goals


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log(f"smviz real-model benchmark: device={device}, threads={torch.get_num_threads()}, quick={args.quick}")
    workdir = Path(tempfile.mkdtemp(prefix="bench_real_model.")) if args.micro_smoke else None
    try:
        if workdir is not None:
            transformers.utils.logging.disable_progress_bar()  # the micro models' save/load bars
            t = time.perf_counter()
            args.model = micro_models(workdir)
            log(f"micro base and retrofit built in {workdir} in {time.perf_counter() - t:.1f}s")
        results = run(args, device)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    goals = report(results)
    peak = print_totals(time.perf_counter() - t_start, load_start)
    payload = {
        "benchmark": "smviz on a real retrofitted model: retrofit vs full step, recorder overhead, sparse vs full finetuning",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_record(device, load_start=load_start, torch_threads=torch.get_num_threads()),
        "git": git_info(),
        "models": results.pop("models"),
        "settings": {"quick": args.quick, "micro_smoke": args.micro_smoke, "batch": args.batch, "seq": args.seq,
                     "rounds": args.rounds, "warmup": args.warmup, "target_s": args.target_s, "world": WORLD,
                     "stream_batch": "Stream(world.new, tokenizer, batch_size=16).batch(0)", "dtype": "float32"},
        "protocol": __doc__,
        "goals": goals,
        "results": results,
        "memory": {"peak_rss_mb": peak} | ({"cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
                                           if device.type == "cuda" else {}),
        "total_runtime_s": time.perf_counter() - t_start,
    }
    if args.out is not None:
        write_result(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
