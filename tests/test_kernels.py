"""smviz.kernels against the plain path of smviz/memory.py and against brute force: the pruned pair search
returns the exact top-k (same scores bit for bit; the same slots wherever the k-th score is not tied),
the sort-by-row bag backward gives PyTorch's gradients, and a whole layer's forward and backward equal
the reference path's bit for bit in float32 and within rounding in bfloat16 (sparse `train_rows`
included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smviz import kernels
from smviz.kernels.search import reachable_pairs
from smviz.memory import MemoryConfig, ProductKeyMemory

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def brute_force_top(sub_scores: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's score s1[i1] + s2[i2] over the whole n_keys × n_keys grid, then top-k of all N."""
    m, h, _, n_keys = sub_scores.shape
    every = sub_scores[:, :, 0, :, None] + sub_scores[:, :, 1, None, :]  # (M, H, n_keys, n_keys)
    scores, slots = every.reshape(m, h, n_keys * n_keys).topk(knn, dim=-1)
    return slots, scores


def assert_same_top_k(slots_a, scores_a, slots_b, scores_b) -> None:
    """Equal scores bit for bit; equal slot sets except among reads whose score equals the k-th score."""
    assert torch.equal(scores_a, scores_b)
    kth = scores_a[..., -1:]
    strict_a = torch.where(scores_a > kth, slots_a, -1).sort(-1).values
    strict_b = torch.where(scores_b > kth, slots_b, -1).sort(-1).values
    assert torch.equal(strict_a, strict_b)


def test_reachable_pairs_are_the_ranks_with_product_at_most_k():
    for knn in (1, 2, 5, 32):
        r1, r2 = reachable_pairs(knn, torch.device("cpu"))
        expected = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
        assert list(zip(r1.tolist(), r2.tolist())) == expected
    assert len(reachable_pairs(32, torch.device("cpu"))[0]) == 119  # of 1,024


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_keys,knn", [(16, 1), (16, 5), (32, 32), (64, 8)])
def test_best_pairs_equal_the_full_grid_and_brute_force(device, dtype, n_keys, knn):
    gen = torch.Generator().manual_seed(n_keys * 100 + knn)
    sub = torch.randn(257, 3, 2, n_keys, generator=gen).to(device=device, dtype=dtype)
    s, i = sub.topk(knn, dim=-1)
    slots, scores = kernels.best_pairs(s, i, n_keys)
    full = s[:, :, 0, :, None] + s[:, :, 1, None, :]
    ref_scores, flat = full.flatten(-2).topk(knn, dim=-1)
    ref_slots = i[:, :, 0].gather(-1, flat // knn) * n_keys + i[:, :, 1].gather(-1, flat % knn)
    assert_same_top_k(slots, scores, ref_slots, ref_scores)
    assert_same_top_k(slots, scores, *brute_force_top(sub, knn))
    if dtype == torch.bfloat16:  # bf16 ties are common: the tie clause above must have had work to do
        assert (ref_scores[..., :-1] == ref_scores[..., -1:]).any() or knn == 1


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_bag_gradients_equal_embedding_bag_and_gradcheck(device):
    gen = torch.Generator().manual_seed(0)
    n, d, m, j = 50, 7, 33, 12
    table = torch.randn(n, d, generator=gen).to(device)
    idx = torch.randint(0, 40, (m, j), generator=gen).to(device)  # rows 40..49 unread: their gradient is zero
    w = torch.rand(m, j, generator=gen).to(device)
    g = torch.randn(m, d, generator=gen).to(device)
    grads = []
    for bag in (kernels.weighted_bag, lambda i, t, ww: F.embedding_bag(i, t, per_sample_weights=ww, mode="sum")):
        t_, w_ = table.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = bag(idx, t_, w_)
        out.backward(g)
        grads.append((out.detach(), t_.grad, w_.grad))
    (out_a, gt_a, gw_a), (out_b, gt_b, gw_b) = grads
    assert torch.equal(out_a, out_b)
    torch.testing.assert_close(gt_a, gt_b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw_a, gw_b, rtol=1e-6, atol=1e-6)
    assert gt_a[40:].abs().max() == 0 and gt_a[:40].abs().sum(1).min() > 0
    t64 = table.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, ww: kernels.weighted_bag(idx, t, ww), (t64, w64))
    # only the weights need a gradient (the sparse path's detached table): the table gets none
    w_only = w.clone().requires_grad_(True)
    kernels.weighted_bag(idx, table, w_only).backward(g)
    torch.testing.assert_close(w_only.grad, gw_b, rtol=1e-6, atol=1e-6)


def layer_pass(layer: ProductKeyMemory, x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None):
    """Output, chosen slots and every gradient of one forward+backward (rows: sparse train_rows)."""
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    slots = []
    handle = layer.add_access_hook(lambda _layer, idx, _w, _mask: slots.append(idx.detach()))
    if rows is None:
        y = layer(xg)
        y.backward(g)
        delta = None
    else:
        with layer.value_table.train_rows(rows) as trainable:
            y = layer(xg)
            y.backward(g)
        delta = trainable.delta.grad
    handle.remove()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), slots[0], xg.grad, grads, delta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_layer_fast_path_equals_the_reference_path(device, dtype, sparse):
    torch.manual_seed(0)
    config = MemoryConfig(n_keys=32, heads=2, knn=8, k_dim=16, query_norm="layernorm")
    layer = ProductKeyMemory(config, 24, device=device, dtype=dtype)
    x = torch.randn(3, 20, 24, device=device, dtype=dtype)
    g = torch.randn(3, 20, 24, device=device, dtype=dtype)
    rows = torch.arange(0, config.n_slots, 3, device=device) if sparse else None
    fast = layer_pass(layer, x, g, rows)
    with kernels.reference():
        assert not kernels.fast_search() and not kernels.fast_bag(torch.device(device))
        ref = layer_pass(layer, x, g, rows)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    if dtype == torch.float32:  # no ties in float32 here: the very same reads
        assert torch.equal(fast[1], ref[1])
    else:  # bf16: equal scores are common and come in any order, and a tie at the k-th place can swap a
        # read for an equal one: the search is exact up to ties, and outputs are compared where every head
        # read the same set
        with torch.no_grad():
            slots, scores, _ = layer.lookup(x.reshape(-1, 24))
            with kernels.reference():
                ref_slots, ref_scores, _ = layer.lookup(x.reshape(-1, 24))
        assert_same_top_k(slots, scores, ref_slots, ref_scores)
        same = (fast[1].sort(-1).values == ref[1].sort(-1).values).all(-1).all(-1).reshape(-1)
        assert same.sum() >= 10
    keep = slice(None) if dtype == torch.float32 else same
    torch.testing.assert_close(fast[0].reshape(-1, 24)[keep], ref[0].reshape(-1, 24)[keep], **tol)
    if dtype == torch.float32:  # bit for bit: training on the fast path is the reference's training
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[2], ref[2])
        assert fast[3].keys() == ref[3].keys() and fast[3]
        for name in ref[3]:
            assert torch.equal(fast[3][name], ref[3][name]), name
        if sparse:
            assert torch.equal(fast[4], ref[4])
            assert "value_table.weight" not in fast[3] and "values.weight" not in fast[3]


@pytest.mark.parametrize("value, fast", [("reference", False), ("fast", True), ("bogus", None)])
def test_environment_variable_switches_the_fast_path_for_the_process(value, fast):
    import os
    import subprocess
    import sys

    code = "from smviz import kernels; print(kernels.fast_search(), kernels.fast_bag(__import__('torch').device('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, kernels.ENV: value})
    if fast is None:
        assert done.returncode != 0 and "SMVIZ_KERNELS must be 'fast' or 'reference'" in done.stderr
    else:
        assert done.returncode == 0 and done.stdout.split() == [str(fast), str(fast)]
