"""smviz's product-key memory layer beside the most used public implementation, lucidrains'
`product-key-memory` (PyPI, pinned in the `bench` extra: `pip install -e '.[bench]'`; `make bench`
installs it), at one shape, forward and forward+backward.

    python benchmarks/bench_pkm_peer.py            # 10 interleaved rounds (about 30 s on 2 CPU cores)
    python benchmarks/bench_pkm_peer.py --quick    # 3 rounds, shorter rounds

The shape, the same for both: N = 2^16 slots (256 sub-keys per half), 4 heads x top-32, model dim 256,
value rows of 256, a batch of 16 x 128 tokens, float32, on the CPU with the same torch threads.
What is matched exactly: the sub-key search (per head two sets of 256 sub-keys, top-32 of each,
top-32 of the 32 x 32 sums), the key size (smviz `k_dim` 256 = both halves; the peer's `dim_head`
128 = one half, the peer's default), the query projection (256 -> 4 x 256), a LayerNorm on the query
before the search, softmax over each head's 32 scores and one weighted `embedding_bag` sum of the 128
value rows a token reads. Where the two APIs differ and cannot be made equal: smviz's query LayerNorm
is over the whole query (4 x 256 features) and its query projection has a bias, the peer normalises
each 128-feature half per head and has no bias; smviz ends with its output projection W2 (256 x 256;
the Memory+ swilu gate W1 is off here, `swilu=False`, to stay closest), the peer returns the value
sum with no projection — so smviz does one 256 x 256 matmul per token more. The peer runs as
published (`PKM(dim=256, heads=4, num_keys=256, topk=32, dim_head=128)`, its defaults otherwise:
layernorm on, dropouts 0, no differentiable top-k).

"fwd" rows: module in eval mode, under torch.no_grad() (inference). "fwd+bwd" rows: module in train
mode, the graph built from an input that requires grad, a fixed random output gradient
backpropagated, parameter and input grads reset to None each step. Each module's mode is set before
its timed steps, outside the clock. The four cases are timed in interleaved rounds (benchmarks/_bench.py:
each round runs every case in a new random order, cheap cases repeat inside a round until it spans
--target-s), after warm-up steps; numbers are medians over rounds. Ratio = peer time / smviz time
(above 1: smviz is faster), as the ratio of medians and the median of the per-round ratios. The JSON
(default benchmarks/results/bench_pkm_peer.json; --quick: bench_pkm_peer_quick.json) holds every
time, the settings, both parameter counts, the peer's version and the machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import os
import time
from pathlib import Path

import torch
from _bench import Case, log, machine_record, measure, paired_ratio, print_totals, write_result  # noqa: E402 (run as a script from benchmarks/)
from torch import nn

from smviz.memory import MemoryConfig, ProductKeyMemory

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "bench_pkm_peer.json"
QUICK_OUT = ROOT / "results" / "bench_pkm_peer_quick.json"
PEER = "product-key-memory"

DIM = 256  # model dim = value row size
N_KEYS = 256  # sub-keys per half: N = 2^16 slots
HEADS, KNN = 4, 32
HALF_KEY = 128  # key size per half: smviz k_dim = 2 x 128, the peer's dim_head = 128
BATCH, SEQ = 16, 128
IMPLS = ("smviz", "peer")
PASSES = ("fwd", "fwd+bwd")


def smviz_layer() -> ProductKeyMemory:
    config = MemoryConfig(n_keys=N_KEYS, heads=HEADS, knn=KNN, k_dim=2 * HALF_KEY, v_dim=DIM, swilu=False,
                          query_norm="layernorm")
    return ProductKeyMemory(config, DIM)


def peer_layer() -> nn.Module:
    try:
        from product_key_memory import PKM
    except ImportError:
        raise SystemExit(f"{PEER} is not installed: pip install -e '.[bench]' (or `make bench`)") from None
    return PKM(DIM, heads=HEADS, num_keys=N_KEYS, topk=KNN, dim_head=HALF_KEY, use_layernorm=True)


def fwd_step(layer: nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            layer(x)
    return step


def fwd_bwd_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)
    return step


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check(layers: dict[str, nn.Module], x: torch.Tensor) -> dict:
    """Both layers map (B, T, 256) to (B, T, 256), finite, and read N = 2^16 slots."""
    out = {}
    for name, layer in layers.items():
        layer.eval()
        with torch.no_grad():
            y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all(), (name, y.shape)
        out[name] = {"output_shape": list(y.shape), "params": n_params(layer)}
    assert layers["smviz"].config.n_slots == layers["peer"].num_memories == N_KEYS**2
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, median taken (default 10; --quick: 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per case")
    p.add_argument("--target-s", type=float, default=None, help="minimum timed span of a case per round (default 0.5; --quick: 0.2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both (default os.cpu_count())")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT.parent)}; --quick: {QUICK_OUT.relative_to(ROOT.parent)})")
    p.add_argument("--quick", action="store_true", help="3 short rounds")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (3 if a.quick else 10)
    a.target_s = a.target_s if a.target_s is not None else (0.2 if a.quick else 0.5)
    a.out = a.out or (QUICK_OUT if a.quick else DEFAULT_OUT)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    layers = {"smviz": smviz_layer(), "peer": peer_layer()}
    x = torch.randn(BATCH, SEQ, DIM)
    x_grad = x.clone().requires_grad_(True)
    grad_out = torch.randn(BATCH, SEQ, DIM)
    checks = check(layers, x)
    log(f"{PEER} {importlib.metadata.version(PEER)} vs smviz: threads={torch.get_num_threads()}, "
        f"batch {BATCH} x {SEQ}, params smviz {checks['smviz']['params']:,}, peer {checks['peer']['params']:,}")

    cases: dict[tuple[str, str], Case] = {}
    for impl, layer in layers.items():
        cases[(impl, "fwd")] = Case(f"{impl} fwd", fwd_step(layer, x), setup=lambda m=layer: m.train(False),
                                    key=f"{impl}_fwd")
        cases[(impl, "fwd+bwd")] = Case(f"{impl} fwd+bwd", fwd_bwd_step(layer, x_grad, grad_out),
                                        setup=lambda m=layer: m.train(True), key=f"{impl}_fwd_bwd")
    measure(list(cases.values()), warmup=args.warmup, rounds=args.rounds, target_s=args.target_s, label="pkm peer")

    tokens = BATCH * SEQ
    rows = [{"impl": impl, "pass": pss, "median_ms": c.median * 1e3, "tokens_per_s": tokens / c.median,
             "rounds": len(c.times), "steps_per_round": c.inner, "times_ms": [t * 1e3 for t in c.times]}
            for (impl, pss), c in cases.items()]
    ratios = {pss: paired_ratio(cases[("peer", pss)], cases[("smviz", pss)]) for pss in PASSES}

    print(f"{'layer':<22} {'pass':>8} {'rounds':>6} {'median ms':>10} {'tokens/s':>10}")
    print("-" * 60)
    for r in rows:
        name = "smviz" if r["impl"] == "smviz" else PEER
        print(f"{name:<22} {r['pass']:>8} {r['rounds']:>6} {r['median_ms']:>10.2f} {r['tokens_per_s']:>10.0f}")
    for pss, r in ratios.items():
        print(f"{pss:<8} {PEER} time / smviz time: {r['ratio']:.2f}x (median of round ratios "
              f"{r['median_of_round_ratios']:.2f}x; above 1: smviz is faster)")
    total = time.perf_counter() - t_start
    peak = print_totals(total, load_start)

    payload = {
        "benchmark": f"smviz product-key memory layer vs {PEER}",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_record(load_start=load_start, torch_threads=torch.get_num_threads(),
                                  peer_version=importlib.metadata.version(PEER)),
        "settings": {
            "n_slots": N_KEYS**2, "n_keys": N_KEYS, "heads": HEADS, "knn": KNN, "dim": DIM, "v_dim": DIM,
            "key_dim_per_half": HALF_KEY, "batch": BATCH, "seq": SEQ, "dtype": "float32",
            "smviz": "ProductKeyMemory(MemoryConfig(n_keys=256, heads=4, knn=32, k_dim=256, v_dim=256, swilu=False, "
                     "query_norm='layernorm'), 256)",
            "peer": "product_key_memory.PKM(256, heads=4, num_keys=256, topk=32, dim_head=128, use_layernorm=True)",
            "fwd": "eval mode, torch.no_grad()", "fwd+bwd": "train mode, input requires grad, random output gradient",
            "rounds": args.rounds, "warmup": args.warmup, "target_s": args.target_s, "quick": args.quick,
        },
        "layers": checks,
        "rows": rows,
        "peer_over_smviz_time": ratios,
        "peak_rss_mb": peak,
        "total_runtime_s": total,
    }
    write_result(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
