"""Speed of the product-key memory layer: product-key search vs brute force, and memory vs dense FFN.

    python benchmarks/bench_memory.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_memory.py --quick         # seconds-long smoke run, small sizes
    python benchmarks/bench_memory.py --device cuda --sizes 16,20,22

Section 1, at each N = 2^e slots (n_keys = 2^(e/2)): `ProductKeyMemory.lookup` and the full layer,
against brute force over all N combined keys. Brute force scores every slot — per head, the N sums
s1[:, :, :, None] + s2[:, :, None, :] over the full n_keys × n_keys grid of half scores, which is
exactly the full-key dot product q · [K1[i1], K2[i2]] and far cheaper than a (M, k_dim) @ (k_dim, N)
matmul — then takes the exact top-k over N. Tokens are processed in chunks so the (chunk, H, N) score
table stays within --chunk-mb (one preallocated buffer, reused). Forward+backward for brute force:
the search itself runs without autograd (like topk, it has no gradient except at the chosen slots),
then the chosen scores are gathered differentiably from the half scores, s1[i1] + s2[i2], which is
the value and the gradient autograd would give through topk over the full table, without an N-wide
gradient tensor. Two exact top-k methods over the materialised scores are timed: plain torch.topk
over N (slow on CPU: its per-row selection dominates, so by default only the forward search uses
it, see --plain-topk) and a block-max-pruned top-k (max of each block of B slots, top-k blocks,
top-k of their k·B scores; exact for any score table), the stronger baseline used for every row.
A "scores only" row times writing all the scores with no top-k at all: the floor of any brute
force that materialises them, however fast its top-k. The brute-force full layer is the same
search followed by the layer's own softmax, value bag, swilu and output projection.

Section 2, the fast path (`smviz.kernels`) in one interleaved group at the `tiny` preset's shape
(N = 2^16): the dense Llama SwiGLU MLP the layer replaces at the same width (transformers' LlamaMLP:
down(silu(gate(x)) * up(x)), 256 → 1024 → 256); the memory layer, fast and reference (the plain
PyTorch path, `kernels.reference()`); the search alone (`lookup` and the softmax, fast and reference);
the value bag alone (`ValueTable.bag` of heads × knn random rows per token, gradient to the table and
the weights, fast and reference); and, when the `bench` extra is installed, at the peer benchmark's
shape (bench_pkm_peer.py: k_dim 256, swilu off, 16 x 128 tokens) smviz fast and reference beside
lucidrains' `product-key-memory`. Then a second group: one step of the tiny preset's pretraining
(forward, loss, backward, clip, AdamW at the recipe's rates) on random tokens of the recipe's batch
shape, fast and reference — the tokens/s the demo's pretraining gets.

"fwd" rows run under torch.no_grad() (inference); "fwd+bwd" rows build the graph (input included)
and backpropagate a fixed random output gradient, parameter grads reset to None each step.
Cases of one group are timed in interleaved rounds (A B C D, C A D B, ...) so a slow-down from other
processes hits all of them alike; each number is the median over rounds of the per-step time.
The product-key timings include torch's own CPU topk over n_keys and K² candidates.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import machine_record, write_result  # noqa: E402 (run as a script from benchmarks/)
from torch import nn

from smviz import kernels
from smviz.memory import MemoryConfig, ProductKeyMemory

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "bench_memory.json"
QUICK_OUT = ROOT / "results" / "bench_memory_quick.json"

DIM = 256  # model width (tiny preset)
FFN_HIDDEN = 1024  # tiny preset's intermediate_size


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    what: str
    n_exp: int | None
    pass_: str  # "fwd" or "fwd+bwd"
    fn: Callable[[], None]
    warm: Callable[[], None] | None = None  # cheaper warm-up (heavy cases); None: run fn
    heavy: bool = False  # one step per timing, no inner loop calibration
    inner: int = 1
    times: list[float] = field(default_factory=list)  # seconds per step, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(cases: list[Case], *, device, warmup: int, repeats: int, min_repeats: int, budget_s: float,
            target_s: float, label: str) -> None:
    """Warm up every case, calibrate an inner loop for cheap ones, then time interleaved rounds (each
    in a new random order) until `repeats` rounds are done, or at least `min_repeats` are and the
    group has used `budget_s`."""
    for c in cases:
        for _ in range(warmup):
            (c.warm or c.fn)()
        _sync(device)
        if not c.heavy:
            t = time.perf_counter()
            c.fn()
            _sync(device)
            dt = time.perf_counter() - t
            c.inner = max(1, min(1000, math.ceil(target_s / max(dt, 1e-6))))
    t0 = time.perf_counter()
    rng = random.Random(0)
    for r in range(repeats):
        order = list(cases)
        rng.shuffle(order)  # no case always follows the same one (e.g. a step that frees 1 GB)
        for c in order:
            _sync(device)
            t = time.perf_counter()
            for _ in range(c.inner):
                c.fn()
            _sync(device)
            c.times.append((time.perf_counter() - t) / c.inner)
        elapsed = time.perf_counter() - t0
        print(f"  [{label}] round {r + 1}/{repeats} done ({elapsed:.1f}s)", file=sys.stderr, flush=True)
        if r + 1 >= min_repeats and elapsed > budget_s and r + 1 < repeats:
            print(f"  [{label}] group budget {budget_s:.0f}s used: stopping after {r + 1} rounds",
                  file=sys.stderr, flush=True)
            break


# --------------------------------------------------------------------------- brute force


class BruteForce:
    """Exact top-k over all N = n_keys² slots of a `ProductKeyMemory`, by scoring every slot.

    method "topk":   torch.topk over the N scores of each (token, head).
    method "pruned": the same result from a cheaper exact top-k over the same materialised scores:
                     max of each block of B consecutive slots, top-k blocks by max, torch.topk over
                     their k·B scores. Every top-k slot lies in a top-k block (a slot outside them is
                     beaten by k block maxima), so it is exact for any score table; it only replaces
                     torch.topk's slow per-row selection by one max-reduction pass (5x faster on CPU)."""

    METHODS = ("pruned", "topk")

    def __init__(self, layer: ProductKeyMemory, chunk_mb: float, device, dtype=torch.float32,
                 method: str = "pruned") -> None:
        c = layer.config
        assert not c.qk_norm, "brute force mirrors lookup() without qk_norm"
        assert method in self.METHODS
        self.layer, self.c, self.method = layer, c, method
        per_token = c.heads * c.n_slots * torch.finfo(dtype).bits // 8
        self.chunk = max(1, int(chunk_mb * 2**20) // per_token)
        # block size: a divisor of N, at most 256 slots, with at least knn blocks
        self.block = max(b for b in range(1, min(256, c.n_slots // c.knn) + 1) if c.n_slots % b == 0)
        self._buf: torch.Tensor | None = None
        self._device, self._dtype = device, dtype

    def with_method(self, method: str) -> BruteForce:
        """A view of this brute force using another top-k method (shares the score buffer)."""
        other = object.__new__(BruteForce)
        other.__dict__.update(self.__dict__)
        other.method = method
        other._owner = self
        return other

    def buffer(self, m: int) -> torch.Tensor:
        """A (m, H, n_keys, n_keys) view of one score table, allocated (and touched) once, then reused."""
        owner = self.__dict__.get("_owner", self)
        c = self.c
        if owner._buf is None or owner._buf.shape[0] < m:
            owner._buf = None
            owner._buf = torch.zeros(m, c.heads, c.n_keys, c.n_keys, device=owner._device, dtype=owner._dtype)
        return owner._buf[:m]

    def sub_scores(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, H, 2, n_keys) half scores, computed as in `ProductKeyMemory.lookup`."""
        layer, c = self.layer, self.c
        q = layer.query_norm(layer.query(x2)).view(-1, c.heads, 2, c.k_dim // 2)
        return torch.einsum("mhsd,hsnd->mhsn", q, layer.keys)

    def score_all(self, x2: torch.Tensor) -> None:
        """Only materialise the M×H×N combined scores (no top-k): a floor for any brute force that
        writes out every slot's score, whatever top-k it then uses."""
        sd = self.sub_scores(x2).detach()
        for start in range(0, len(sd), self.chunk):
            stop = min(len(sd), start + self.chunk)
            torch.add(sd[start:stop, :, 0, :, None], sd[start:stop, :, 1, None, :], out=self.buffer(stop - start))

    def _topk(self, full: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Top-k of each (token, head) row of full (m, H, N) into vals/idx (m, H, K)."""
        m, h, big_n = full.shape
        k = self.c.knn
        if self.method == "topk":
            torch.topk(full, k, dim=-1, out=(vals, idx))
            return
        b = self.block
        blocks = full.view(m, h, big_n // b, b)
        top_blocks = blocks.amax(-1).topk(k, dim=-1).indices  # (m, H, K): the top-k slots lie in these
        cand = blocks.gather(2, top_blocks[..., None].expand(-1, -1, -1, b))  # (m, H, K, B)
        v, j = cand.view(m, h, k * b).topk(k, dim=-1)
        vals.copy_(v)
        idx.copy_(top_blocks.gather(-1, j // b) * b + j % b)

    def search(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids (M, H, K) and their scores (M, H, K); scores carry gradient when grad is enabled."""
        c = self.c
        sub = self.sub_scores(x2)
        sd = sub.detach()
        m_all = sd.shape[0]
        vals = torch.empty(m_all, c.heads, c.knn, device=sd.device, dtype=sd.dtype)
        idx = torch.empty(m_all, c.heads, c.knn, device=sd.device, dtype=torch.long)
        with torch.no_grad():
            for start in range(0, m_all, self.chunk):
                stop = min(m_all, start + self.chunk)
                full = self.buffer(stop - start)  # (m, H, n, n): every combined score
                torch.add(sd[start:stop, :, 0, :, None], sd[start:stop, :, 1, None, :], out=full)
                self._topk(full.view(stop - start, c.heads, c.n_slots), vals[start:stop], idx[start:stop])
        if not sub.requires_grad:
            return idx, vals
        # Differentiable scores of the chosen slots: s1[i1] + s2[i2] (same values as `vals`).
        scores = sub[:, :, 0].gather(-1, idx // c.n_keys) + sub[:, :, 1].gather(-1, idx % c.n_keys)
        return idx, scores

    def layer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full memory layer with brute-force search: same softmax, value bag, swilu, W2."""
        layer = self.layer
        lead = x.shape[:-1]
        x2 = x.reshape(-1, layer.dim)
        idx, scores = self.search(x2)
        w = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(x.dtype)
        y = layer.value_table.bag(idx.view(len(x2), -1), w.view(len(x2), -1))
        if layer.w1 is not None:
            y = y * F.silu(layer.w1(x2))
        return layer.w2(y).view(*lead, layer.dim)


# --------------------------------------------------------------------------- models


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)), no biases (fallback if transformers lacks LlamaMLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def dense_ffn(dim: int, hidden: int) -> tuple[nn.Module, str]:
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        cfg = LlamaConfig(hidden_size=dim, intermediate_size=hidden, hidden_act="silu")
        return LlamaMLP(cfg), "transformers LlamaMLP"
    except Exception:  # noqa: BLE001 - any import/API drift: use the equivalent module
        return SwiGLU(dim, hidden), "SwiGLU (equivalent to LlamaMLP)"


def memory_layer(n_exp: int, k_dim: int, device) -> ProductKeyMemory:
    if n_exp % 2:
        raise SystemExit(f"--sizes: N = 2^{n_exp} is not a square (n_keys² = N); use even exponents")
    cfg = MemoryConfig(n_keys=2 ** (n_exp // 2), heads=4, knn=32, k_dim=k_dim, v_dim=DIM, query_norm="layernorm")
    return ProductKeyMemory(cfg, DIM, device=device)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- steps


def fwd_step(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            f(x)

    return step


def fwd_bwd_step(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: nn.Module,
                 grad_out: torch.Tensor) -> Callable[[], None]:
    xg = x.detach().clone().requires_grad_(True)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        xg.grad = None
        f(xg).backward(grad_out)

    return step


def pk_search_probs(layer: ProductKeyMemory) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        _, scores, _ = layer.lookup(x.reshape(-1, layer.dim))
        return torch.softmax(scores, dim=-1)

    return f


def bf_search_probs(bf: BruteForce) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        _, scores = bf.search(x.reshape(-1, bf.layer.dim))
        return torch.softmax(scores, dim=-1)

    return f


def check_brute_force(layer: ProductKeyMemory, bf: BruteForce, x: torch.Tensor, n_tok: int = 16) -> dict:
    """Brute force must pick the same slots as product keys (the product-key search is exact), give
    the same layer output, and the same gradient through the chosen scores."""
    xs = x.reshape(-1, layer.dim)[:n_tok]
    with torch.no_grad():
        i_pk, s_pk, _ = layer.lookup(xs)
        i_bf, s_bf = bf.search(xs)
        out_err = (layer(xs) - bf.layer_forward(xs)).abs().max().item()
    grads = []
    for search in (lambda t: layer.lookup(t)[1], lambda t: bf.search(t)[1]):
        layer.zero_grad(set_to_none=True)
        search(xs).exp().sum().backward()  # order-invariant in the k chosen scores
        grads.append(layer.query.weight.grad.clone())
    layer.zero_grad(set_to_none=True)
    return {
        "method": bf.method,
        "tokens": len(xs),
        "same_slots_fraction": (i_pk.sort(-1).values == i_bf.sort(-1).values).all(-1).float().mean().item(),
        "max_score_diff": (s_pk.sort(-1).values - s_bf.sort(-1).values).abs().max().item(),
        "max_output_diff": out_err,
        "max_query_grad_diff": (grads[0] - grads[1]).abs().max().item(),
    }


# --------------------------------------------------------------------------- the fast path (section 2)


def reference_step(step: Callable[[], None]) -> Callable[[], None]:
    """`step` with every smviz.kernels fast path off: the plain PyTorch layer the fast path is tested against."""
    def run() -> None:
        with kernels.reference():
            step()

    return run


def bag_cases(layer: ProductKeyMemory, tokens: int, device) -> dict[str, Callable[[], None]]:
    """The value bag alone at the layer's shape: `tokens` reads of heads x knn rows with softmax-like
    weights, forward and forward+backward (gradient to the table and the weights), fast and reference."""
    c = layer.config
    idx = torch.randint(0, c.n_slots, (tokens, c.heads * c.knn), device=device)
    w = torch.rand(tokens, c.heads * c.knn, device=device).requires_grad_(True)
    g = torch.randn(tokens, layer.values.weight.shape[1], device=device)
    table = layer.values

    def fwd() -> None:
        with torch.no_grad():
            table.bag(idx, w)

    def fwd_bwd() -> None:
        table.weight.grad, w.grad = None, None
        table.bag(idx, w).backward(g)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def pretrain_step(device) -> tuple[Callable[[], None], int]:
    """One step of the tiny preset's pretraining (forward, loss, backward, clip, AdamW at the recipe's
    rates) on random tokens of the recipe's batch shape; returns the step and its tokens."""
    from smviz.model import MemoryModel
    from smviz.train.pretrain import make_optimizer
    from smviz.train.recipes import recipe

    config = recipe("tiny")
    model = MemoryModel.from_preset("tiny", seed=0, vocab_size=8192, **config.memory).to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    ids = torch.randint(0, 8192, (config.batch_size, config.seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, ids.numel()


def fast_path_section(args, device, timing: dict, shape: tuple[int, int, int]) -> tuple[list[dict], dict]:
    """One interleaved group at the tiny preset's shape: the dense FFN, the memory layer (fast path and
    reference), the search alone and the bag alone (fast and reference), and at the peer benchmark's
    shape smviz (fast, reference) beside lucidrains' PKM when installed; then a second group, one tiny
    pretraining step, fast and reference. Returns the rows and the ratios."""
    tokens = shape[0] * shape[1]
    layer = memory_layer(args.ffn_n, args.k_dim, device)
    ffn, ffn_kind = dense_ffn(DIM, FFN_HIDDEN)
    ffn = ffn.to(device)
    x = torch.randn(*shape, device=device)
    g_out = torch.randn(*shape, device=device)
    g_probs = torch.randn(tokens, layer.config.heads, layer.config.knn, device=device)
    bag = bag_cases(layer, tokens, device)
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    for pss in ("fwd", "fwd+bwd"):
        fb = pss == "fwd+bwd"
        steps[("ffn: dense SwiGLU", pss)] = fwd_bwd_step(ffn, x, ffn, g_out) if fb else fwd_step(ffn, x)
        steps[("layer", pss)] = fwd_bwd_step(layer, x, layer, g_out) if fb else fwd_step(layer, x)
        search = pk_search_probs(layer)
        steps[("search", pss)] = fwd_bwd_step(search, x, layer, g_probs) if fb else fwd_step(search, x)
        steps[("bag", pss)] = bag[pss]
    peer_shape = None
    try:
        from bench_pkm_peer import BATCH, SEQ, peer_layer, smviz_layer

        peer, mine = peer_layer().to(device), smviz_layer().to(device)
        peer_shape = (BATCH, SEQ, DIM)
        xp, gp = torch.randn(*peer_shape, device=device), torch.randn(*peer_shape, device=device)
        for pss in ("fwd", "fwd+bwd"):
            fb = pss == "fwd+bwd"
            steps[("peer shape: smviz", pss)] = fwd_bwd_step(mine, xp, mine, gp) if fb else fwd_step(mine, xp)
            steps[("peer shape: lucidrains PKM", pss)] = fwd_bwd_step(peer, xp, peer, gp) if fb else fwd_step(peer, xp)
    except SystemExit as exc:  # the bench extra is not installed: the rest still runs
        print(f"skipping the peer rows: {exc}", file=sys.stderr, flush=True)

    cases: dict[tuple[str, str, str], Case] = {}
    for (part, pss), step in steps.items():
        n_exp = None if part.startswith("ffn") else 16 if part.startswith("peer") else args.ffn_n
        cases[(part, "fast", pss)] = Case(f"{part}" + ("" if part.startswith(("ffn", "peer shape: l")) else ", fast"),
                                          n_exp, pss, step)
        if part.startswith(("layer", "search", "bag", "peer shape: smviz")):
            cases[(part, "reference", pss)] = Case(f"{part}, reference", n_exp, pss, reference_step(step))
    measure(list(cases.values()), label="fast path", **timing)

    pre, pre_tokens = pretrain_step(device)
    pre_cases = {"fast": Case("tiny pretraining step, fast", 16, "train", pre, heavy=True),
                 "reference": Case("tiny pretraining step, reference", 16, "train", reference_step(pre), heavy=True)}
    measure(list(pre_cases.values()), label="pretraining step", **timing)

    def ratio(num: Case, den: Case) -> float:
        return num.median / den.median

    rows, ref_over_fast, peer_over_smviz, dense_ratio = [], {}, {}, {}
    for (part, impl, pss), c in cases.items():
        r, r_def = None, None
        n_tok = tokens if not part.startswith("peer") else peer_shape[0] * peer_shape[1]
        if impl == "reference":
            r, r_def = ratio(c, cases[(part, "fast", pss)]), "reference time / fast-path time"
            ref_over_fast.setdefault(part, {})[pss] = r
        elif part == "layer":
            r, r_def = ratio(c, cases[("ffn: dense SwiGLU", "fast", pss)]), "memory-layer time / dense-FFN time"
            dense_ratio[pss] = r
        elif part == "peer shape: lucidrains PKM":
            r, r_def = ratio(c, cases[("peer shape: smviz", "fast", pss)]), "peer time / smviz fast-path time"
            peer_over_smviz[pss] = r
        rows.append(row_of(c, n_tok, r, r_def))
    r = ratio(pre_cases["reference"], pre_cases["fast"])
    ref_over_fast["tiny pretraining step"] = {"train": r}
    rows += [row_of(pre_cases["fast"], pre_tokens, None, None),
             row_of(pre_cases["reference"], pre_tokens, r, "reference time / fast-path time")]
    info = {"dense": ffn_kind, "dense_params": n_params(ffn), "memory_params": n_params(layer),
            "memory_n_slots": layer.config.n_slots, "memory_over_dense_time": dense_ratio,
            "reference_over_fast_time": ref_over_fast, "peer_over_smviz_time": peer_over_smviz,
            "pretraining_tokens_per_s": {k: pre_tokens / c.median for k, c in pre_cases.items()}}
    return rows, info


# --------------------------------------------------------------------------- report


def fmt_n(n_exp: int | None) -> str:
    return "-" if n_exp is None else f"2^{n_exp}"


def row_of(c: Case, tokens: int, ratio: float | None, ratio_def: str | None) -> dict:
    med = c.median
    return {
        "what": c.what,
        "n_slots": None if c.n_exp is None else 2**c.n_exp,
        "n": fmt_n(c.n_exp),
        "pass": c.pass_,
        "median_ms": med * 1e3,
        "tokens_per_s": tokens / med,
        "ratio": ratio,
        "ratio_def": ratio_def,
        "rounds": len(c.times),
        "steps_per_round": c.inner,
        "times_ms": [t * 1e3 for t in c.times],
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'what':<40} {'N':>5} {'pass':>8} {'rounds':>6} {'median ms':>11} {'tokens/s':>11} {'ratio':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.1f}x" if r["ratio"] >= 10 else f"{r['ratio']:.2f}x"
        print(f"{r['what']:<40} {r['n']:>5} {r['pass']:>8} {r['rounds']:>6} {r['median_ms']:>11.2f} "
              f"{r['tokens_per_s']:>11.0f} {ratio:>9}")
    print("ratio on brute-force rows: brute-force time / product-key time of the same part and pass, i.e.")
    print("  the product-key speed-up. 'pruned top-k' = exact block-max-pruned top-k over all N scores;")
    print("  'topk over N' = plain torch.topk over the N scores; 'scores only' = writing all M x H x N")
    print("  scores with no top-k at all (a floor for any brute force that materialises them).")
    print("ratios in the fast-path section: 'layer, fast' = memory-layer time / dense-FFN time; 'reference' rows =")
    print("  reference time / fast-path time; 'lucidrains PKM' = peer time / smviz fast-path time (above 1: smviz faster).")
    print("fwd = under torch.no_grad(); fwd+bwd = forward with graph + backward.")






def peak_memory(device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 2048; --quick: 256)")
    p.add_argument("--seq", type=int, default=256, help="sequence length; batch = tokens / seq")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, median taken (default 5; --quick: 3)")
    p.add_argument("--min-repeats", type=int, default=3, help="rounds always timed, even past --budget")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per group after which no new round starts once --min-repeats are done "
                        "(default 120; --quick: 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default os.cpu_count())")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per case")
    p.add_argument("--sizes", default=None,
                   help="comma-separated even exponents e, N = 2^e slots (default 16,20; --quick: 10,12)")
    p.add_argument("--k-dim", type=int, default=128, help="query/key size per head (128 or 256)")
    p.add_argument("--chunk-mb", type=float, default=1024, help="max size of the brute-force score table chunk")
    p.add_argument("--plain-topk", choices=("search", "all"), default="search",
                   help="brute force with torch.topk over N (slow on CPU): only for the forward search (default), "
                        "or for every search/layer/pass row; the pruned exact top-k is timed for all of them")
    p.add_argument("--ffn-n", type=int, default=None, help="memory size exponent for the FFN comparison (default 16)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT.parent)}; --quick: "
                        f"{QUICK_OUT.relative_to(ROOT.parent)})")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run with small sizes")
    a = p.parse_args(argv)
    q = a.quick
    a.tokens = a.tokens or (256 if q else 2048)
    a.repeats = a.repeats or (3 if q else 5)
    a.min_repeats = max(1, min(a.min_repeats, a.repeats))
    a.budget = a.budget if a.budget is not None else (5.0 if q else 120.0)
    a.sizes = [int(s) for s in (a.sizes or ("10,12" if q else "16,20")).split(",") if s.strip()]
    a.ffn_n = a.ffn_n if a.ffn_n is not None else (10 if q else 16)
    a.out = a.out or (QUICK_OUT if q else DEFAULT_OUT)
    a.target_s = 0.05 if q else 0.2  # minimum timed span per round for cheap cases
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)

    tokens = args.tokens
    seq = args.seq if tokens % args.seq == 0 else tokens
    shape = (tokens // seq, seq, DIM)
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats,
                  budget_s=args.budget, target_s=args.target_s)
    rows: list[dict] = []
    checks: dict[str, dict] = {}
    speedups: dict[str, dict[str, float]] = {}
    print(f"smviz memory benchmark: device={device}, threads={torch.get_num_threads()}, "
          f"tokens={tokens} (batch {shape[0]} x seq {shape[1]}), k_dim={args.k_dim}, sizes={args.sizes}",
          file=sys.stderr, flush=True)

    # ---- 1. product keys vs brute force
    for e in args.sizes:
        t_size = time.perf_counter()
        layer = memory_layer(e, args.k_dim, device)
        bf = BruteForce(layer, args.chunk_mb, device, method="pruned")
        bf.chunk = min(bf.chunk, tokens)
        plain = bf.with_method("topk")
        x = torch.randn(*shape, device=device)
        checks[f"2^{e}"] = {m.method: check_brute_force(layer, m, x) for m in (bf, plain)}
        print(f"N=2^{e}: n_keys={layer.config.n_keys}, brute-force chunk={bf.chunk} tokens, block={bf.block}, "
              f"check {checks[f'2^{e}']}", file=sys.stderr, flush=True)
        g_probs = torch.randn(tokens, layer.config.heads, layer.config.knn, device=device)
        g_out = torch.randn(*shape, device=device)
        x_warm = x.reshape(-1, DIM)[: min(tokens, bf.chunk)]  # one chunk: touches the buffer and every kernel
        g_probs_warm = g_probs[: len(x_warm)]
        g_out_warm = g_out.reshape(-1, DIM)[: len(x_warm)]

        def score_only(t: torch.Tensor) -> None:
            bf.score_all(t.reshape(-1, DIM))

        # key: (part, impl, pass); impl "pk" = product keys, the others brute force
        cases: dict[tuple[str, str, str], Case] = {}
        impls = {"pk": None, "pruned": bf, "topk": plain}
        names = {"pk": "product-key", "pruned": "brute-force, pruned top-k", "topk": "brute-force, topk over N"}
        for pss in ("fwd", "fwd+bwd"):
            for part in ("search", "layer"):
                for impl, m in impls.items():
                    if impl == "topk" and not (args.plain_topk == "all" or (part, pss) == ("search", "fwd")):
                        continue
                    if part == "search":
                        f = pk_search_probs(layer) if m is None else bf_search_probs(m)
                        g, g_warm = g_probs, g_probs_warm
                    else:
                        f = layer if m is None else m.layer_forward
                        g, g_warm = g_out, g_out_warm
                    if pss == "fwd":
                        step, warm = fwd_step(f, x), (None if m is None else fwd_step(f, x_warm))
                    else:
                        step = fwd_bwd_step(f, x, layer, g)
                        warm = None if m is None else fwd_bwd_step(f, x_warm, layer, g_warm)
                    cases[(part, impl, pss)] = Case(f"{part}: {names[impl]}", e, pss, step, warm=warm,
                                                    heavy=m is not None)
                if part == "search" and pss == "fwd":
                    cases[("search", "scores", pss)] = Case("search: brute-force, scores only", e, pss,
                                                            fwd_step(score_only, x), warm=fwd_step(score_only, x_warm),
                                                            heavy=True)
        measure(list(cases.values()), label=f"N=2^{e}", **timing)
        speedups[f"2^{e}"] = {}
        for (part, impl, pss), c in cases.items():
            if impl == "pk":
                rows.append(row_of(c, tokens, None, None))
                continue
            ratio = c.median / cases[(part, "pk", pss)].median
            speedups[f"2^{e}"][f"{part} {pss} vs brute-force {impl}"] = ratio
            rows.append(row_of(c, tokens, ratio, f"brute-force ({impl}) time / product-key time"))
        print(f"N=2^{e} done in {time.perf_counter() - t_size:.1f}s", file=sys.stderr, flush=True)
        layer.zero_grad(set_to_none=True)
        del layer, bf, plain, cases, x
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- 2. the layer's fast path against its reference, the dense FFN it replaces and the peer
    t_ffn = time.perf_counter()
    fast_rows, ffn_info = fast_path_section(args, device, timing, shape)
    rows += fast_rows
    ffn_ratio = ffn_info["memory_over_dense_time"]
    print(f"fast-path section done in {time.perf_counter() - t_ffn:.1f}s", file=sys.stderr, flush=True)

    total = time.perf_counter() - t_start
    print()
    print_table(rows)
    print()
    for n, sp in speedups.items():
        print(f"product-key speed-up over brute force at N={n}:")
        for part_pass in ("search fwd", "layer fwd", "search fwd+bwd", "layer fwd+bwd"):
            got = [f"{sp[key]:.1f}x vs {impl}" for impl in ("pruned", "topk", "scores")
                   if (key := f"{part_pass} vs brute-force {impl}") in sp]
            if got:
                print(f"  {part_pass:<15} " + ", ".join(got))
    print(f"memory layer (N=2^{args.ffn_n}, fast path) / dense FFN time: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ffn_ratio.items())
          + f"  (params: memory {ffn_info['memory_params']:,}, dense {ffn_info['dense_params']:,})")
    for what, ratios in ffn_info["reference_over_fast_time"].items():
        print(f"{what}: reference / fast-path time " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if ffn_info.get("peer_over_smviz_time"):
        print("lucidrains PKM / smviz time (peer shape): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ffn_info["peer_over_smviz_time"].items()))
    print(f"total runtime {total:.1f}s; {peak_memory(device)}")

    payload = {
        "benchmark": "smviz memory layer",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(device, torch_threads=torch.get_num_threads()),
        "settings": {
            "tokens": tokens, "batch": shape[0], "seq": shape[1], "dim": DIM, "heads": 4, "knn": 32,
            "k_dim": args.k_dim, "v_dim": DIM, "query_norm": "layernorm", "sizes": [f"2^{e}" for e in args.sizes],
            "repeats": args.repeats, "min_repeats": args.min_repeats, "budget_s": args.budget,
            "warmup": args.warmup, "chunk_mb": args.chunk_mb, "quick": args.quick, "dtype": "float32",
            "fwd": "under torch.no_grad()", "fwd+bwd": "graph incl. input, backward of a random output gradient",
        },
        "rows": rows,
        "speedup_pk_over_brute_force": speedups,
        "brute_force_check": checks,
        "ffn_comparison": ffn_info,  # the fast-path section: dense FFN, reference, peer, search, bag, pretraining
        "memory": peak_memory(device),
        "total_runtime_s": total,
    }
    write_result(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
