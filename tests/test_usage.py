"""Tests of smviz.usage: hand-computed metrics and brute-force counts from an independent access hook."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from smviz.usage import UsageMonitor, usage_metrics

# --------------------------------------------------------------------------- independent references


def gini_mad(x) -> float:
    """Gini by the mean-absolute-difference formula Σ_i Σ_j |x_i − x_j| / (2 n² mean)."""
    x = [float(v) for v in x]
    n = len(x)
    mean = sum(x) / n
    return sum(abs(a - b) for a in x for b in x) / (2 * n * n * mean)


def slots_for_mass(x, percent: int) -> int:
    """Fewest slots holding ≥ percent % of the reads, in exact integer arithmetic (x integer counts)."""
    total = sum(x)
    acc = 0
    for k, v in enumerate(sorted(x, reverse=True), start=1):
        acc += v
        if 100 * acc >= percent * total:
            return k
    raise AssertionError("unreachable")


def entropy_nats(x) -> float:
    total = sum(x)
    return -sum(v / total * math.log(v / total) for v in x if v > 0)


METRIC_KEYS = {"slots", "accesses", "dead", "used_share", "entropy", "kl_uniform", "gini", "slots_50", "slots_90", "slots_99"}


# --------------------------------------------------------------------------- usage_metrics on hand-built counts


def test_metrics_all_on_one_slot():
    m = usage_metrics(torch.tensor([4, 0, 0, 0]))
    assert set(m) == METRIC_KEYS
    assert m["slots"] == 4 and m["accesses"] == 4
    assert m["dead"] == 3
    assert m["used_share"] == pytest.approx(0.25)
    assert m["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert m["kl_uniform"] == pytest.approx(math.log(4))
    assert m["gini"] == pytest.approx(0.75)  # hand: Σ|xi−xj| = 2·3·4 = 24; 24 / (2·16·1) = 0.75
    assert gini_mad([4, 0, 0, 0]) == pytest.approx(0.75)
    assert (m["slots_50"], m["slots_90"], m["slots_99"]) == (1, 1, 1)


def test_metrics_uniform():
    m = usage_metrics(torch.tensor([1, 1, 1, 1]))
    assert m["accesses"] == 4
    assert m["dead"] == 0
    assert m["used_share"] == pytest.approx(1.0)
    assert m["entropy"] == pytest.approx(math.log(4))
    assert m["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert m["gini"] == pytest.approx(0.0, abs=1e-12)
    # 50 % exactly reached by 2 slots (0.25 + 0.25); 90 % and 99 % need all 4 (0.75 < 0.9)
    assert (m["slots_50"], m["slots_90"], m["slots_99"]) == (2, 4, 4)


def test_metrics_uneven():
    counts = [6, 3, 1, 0]
    m = usage_metrics(torch.tensor(counts))
    # by hand: p = (0.6, 0.3, 0.1, 0)
    h = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert h == pytest.approx(0.897945, abs=1e-6)
    assert m["entropy"] == pytest.approx(h)
    assert m["kl_uniform"] == pytest.approx(math.log(4) - h)
    assert m["used_share"] == pytest.approx(0.75)
    assert m["dead"] == 1
    assert m["accesses"] == 10
    # Σ_i Σ_j |xi − xj| = 2·(3+5+6+2+3+1) = 40; 2 n² mean = 2·16·2.5 = 80 → 0.5
    assert gini_mad(counts) == pytest.approx(0.5)
    assert m["gini"] == pytest.approx(0.5)
    # 0.6 ≥ 0.5 → 1; 0.6+0.3 = 0.9 ≥ 0.9 (exact boundary, float sum is 0.8999…) → 2; 0.9 < 0.99 ≤ 1.0 → 3
    assert (m["slots_50"], m["slots_90"], m["slots_99"]) == (1, 2, 3)


def test_metrics_order_dtype_and_shape_do_not_matter():
    ref = usage_metrics(torch.tensor([6, 3, 1, 0]))
    for counts in (
        torch.tensor([0, 1, 6, 3]),
        torch.tensor([6.0, 3.0, 1.0, 0.0], dtype=torch.float32),
        torch.tensor([[1, 0], [3, 6]], dtype=torch.int32),
        torch.tensor([0.0, 3.0, 1.0, 6.0], dtype=torch.float64),
    ):
        m = usage_metrics(counts)
        assert m.keys() == ref.keys()
        for k in ref:
            assert m[k] == pytest.approx(ref[k]), k


def test_metrics_no_reads_are_nan():
    m = usage_metrics(torch.zeros(5, dtype=torch.long))
    assert m["accesses"] == 0 and m["slots"] == 5
    assert m["dead"] == 5  # every slot is dead: a count, not NaN
    for k in ("used_share", "entropy", "kl_uniform", "gini", "slots_50", "slots_90", "slots_99"):
        assert math.isnan(m[k]), k


def test_metrics_random_counts_against_references():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = int(rng.integers(2, 60))
        counts = rng.integers(0, 20, size=n)
        counts[rng.integers(0, n)] += 1  # at least one read
        m = usage_metrics(torch.from_numpy(counts))
        ints = [int(v) for v in counts]
        assert m["accesses"] == sum(ints)
        assert m["used_share"] == pytest.approx(sum(v > 0 for v in ints) / n)
        assert m["dead"] == sum(v == 0 for v in ints)
        assert m["entropy"] == pytest.approx(entropy_nats(ints))
        assert m["kl_uniform"] == pytest.approx(math.log(n) - entropy_nats(ints))
        assert m["gini"] == pytest.approx(gini_mad(ints))
        for q in (50, 90, 99):
            assert m[f"slots_{q}"] == slots_for_mass(ints, q), (trial, q)


def test_metrics_fractional_weighted_counts():
    """Weighted counts are floats; the hand numbers still hold (p = (0.5, 0.25, 0.25))."""
    m = usage_metrics(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert m["accesses"] == pytest.approx(1.0)
    assert m["dead"] == 0
    assert m["entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert m["gini"] == pytest.approx(gini_mad([0.5, 0.25, 0.25]))  # = 1/6
    assert m["gini"] == pytest.approx(1 / 6)
    assert (m["slots_50"], m["slots_90"], m["slots_99"]) == (1, 3, 3)


# --------------------------------------------------------------------------- UsageMonitor on the micro model


@pytest.fixture(scope="module")
def micro():
    from smviz.model import MemoryModel

    model = MemoryModel.from_preset("micro", seed=0)
    model.eval()
    return model


@pytest.fixture(scope="module")
def micro_two_layers():
    from smviz.model import MemoryModel

    model = MemoryModel.from_preset("micro", seed=1, layers=(0, 1))
    model.eval()
    return model


def make_batch(seed: int, B: int = 3, T: int = 8, pads=(0, 3, 5)):
    """Random ids with right padding: row b has its last pads[b] positions masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            mask[b, T - p :] = 0
    return ids, mask


class Tap:
    """An access hook of our own: keeps (indices, weights) of every forward, detached, as numpy."""

    def __init__(self) -> None:
        self.reads: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, layer, indices, weights, mask) -> None:
        self.reads.append((indices.detach().cpu().numpy().copy(), weights.detach().cpu().double().numpy().copy()))


def brute_counts(reads, masks, n_slots: int, *, weighted: bool = False, skip_padding: bool = True) -> np.ndarray:
    """Per-slot counts by explicit loops over (batch, token) with a Counter / dict of weights."""
    acc: Counter = Counter()
    for (idx, w), mask in zip(reads, masks):
        B, T = idx.shape[:2]
        for b in range(B):
            for t in range(T):
                if skip_padding and mask[b, t] == 0:
                    continue
                for slot, weight in zip(idx[b, t].ravel().tolist(), w[b, t].ravel().tolist()):
                    acc[slot] += weight if weighted else 1
    out = np.zeros(n_slots)
    for slot, v in acc.items():
        out[slot] = v
    return out


def test_monitor_counts_match_brute_force_and_skip_padding(micro):
    layer = micro.memory_layers[1]
    c = layer.config
    tap = Tap()
    handle = layer.add_access_hook(tap)
    batches = [make_batch(1), make_batch(2, pads=(4, 0, 1))]
    try:
        with torch.no_grad(), UsageMonitor(micro) as usage:
            for ids, mask in batches:
                micro(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    masks = [m.numpy() for _, m in batches]
    assert len(tap.reads) == 2
    expected = brute_counts(tap.reads, masks, c.n_slots)
    assert set(usage.counts) == {1}
    got = usage.counts[1]
    assert got.shape == (c.n_slots,)
    assert np.array_equal(got.cpu().numpy(), expected)
    # hand total: real tokens × heads × knn
    real_tokens = int(sum(m.sum() for m in masks))
    assert real_tokens == (8 + 5 + 3) + (4 + 8 + 7)
    assert got.sum().item() == real_tokens * c.heads * c.knn
    # non-vacuous: counting padding too would give a different vector
    with_padding = brute_counts(tap.reads, masks, c.n_slots, skip_padding=False)
    assert not np.array_equal(with_padding, expected)
    assert usage.batches == 2
    m = usage.metrics()
    assert set(m) == {1}
    ref = usage_metrics(torch.from_numpy(expected)) | {"batches": 2}
    assert m[1].keys() == ref.keys()
    for k in ref:
        assert m[1][k] == pytest.approx(ref[k]), k


def test_monitor_without_mask_counts_every_position(micro):
    layer = micro.memory_layers[1]
    tap = Tap()
    handle = layer.add_access_hook(tap)
    ids, _ = make_batch(3)
    try:
        with torch.no_grad(), UsageMonitor(micro) as usage:
            micro(input_ids=ids)
    finally:
        handle.remove()
    expected = brute_counts(tap.reads, [np.ones(ids.shape)], layer.config.n_slots)
    assert np.array_equal(usage.counts[1].numpy(), expected)
    assert usage.counts[1].sum().item() == ids.numel() * layer.config.heads * layer.config.knn


def test_monitor_weighted_sums_softmax_weights(micro):
    layer = micro.memory_layers[1]
    c = layer.config
    tap = Tap()
    handle = layer.add_access_hook(tap)
    batches = [make_batch(4), make_batch(5, pads=(2, 2, 0))]
    try:
        with torch.no_grad(), UsageMonitor(micro, weighted=True) as usage:
            for ids, mask in batches:
                micro(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    masks = [m.numpy() for _, m in batches]
    expected = brute_counts(tap.reads, masks, c.n_slots, weighted=True)
    got = usage.counts[1].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    # weights sum to 1 per (token, head): the total is real tokens × heads
    real_tokens = int(sum(m.sum() for m in masks))
    assert got.sum() == pytest.approx(real_tokens * c.heads, rel=1e-5)
    # and the weighted counts are not just the plain counts
    assert not np.allclose(got, brute_counts(tap.reads, masks, c.n_slots))


def test_monitor_reset_batches_and_exit(micro):
    ids, mask = make_batch(6)
    with torch.no_grad(), UsageMonitor(micro) as usage:
        for _ in range(3):
            micro(input_ids=ids, attention_mask=mask)
        assert usage.batches == 3
        first = usage.counts[1].clone()
        assert first.sum() > 0
        usage.reset()
        assert usage.batches == 0
        assert torch.equal(usage.counts[1], torch.zeros_like(usage.counts[1]))
        assert usage.metrics()[1]["batches"] == 0
        assert usage.metrics()[1]["accesses"] == 0
        micro(input_ids=ids, attention_mask=mask)
        assert usage.batches == 1
        # the same batch read the same slots (eval mode, deterministic): one third of the 3-batch window
        assert torch.equal(usage.counts[1] * 3, first)
    after_exit = usage.counts[1].clone()
    with torch.no_grad():
        micro(input_ids=ids, attention_mask=mask)
    assert torch.equal(usage.counts[1], after_exit)
    assert usage.batches == 1


def test_monitor_hooks_removed_on_exception(micro):
    ids, mask = make_batch(7)
    with pytest.raises(KeyError):
        with torch.no_grad(), UsageMonitor(micro) as usage:
            micro(input_ids=ids, attention_mask=mask)
            raise KeyError("boom")
    before = usage.counts[1].clone()
    with torch.no_grad():
        micro(input_ids=ids, attention_mask=mask)
    assert torch.equal(usage.counts[1], before)


def test_monitor_two_layers_counts_each_and_batches_per_forward(micro_two_layers):
    model = micro_two_layers
    layers = model.memory_layers
    assert sorted(layers) == [0, 1]
    taps = {i: Tap() for i in layers}
    handles = [layers[i].add_access_hook(taps[i]) for i in layers]
    batches = [make_batch(8), make_batch(9, pads=(1, 6, 0))]
    try:
        with torch.no_grad(), UsageMonitor(model) as usage:
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    masks = [m.numpy() for _, m in batches]
    assert usage.batches == 2  # forward passes, not hook calls
    for i, layer in layers.items():
        expected = brute_counts(taps[i].reads, masks, layer.config.n_slots)
        assert np.array_equal(usage.counts[i].numpy(), expected), i
    assert not torch.equal(usage.counts[0], usage.counts[1])
    assert set(usage.metrics()) == {0, 1}


def test_monitor_training_mode_counts_too():
    from smviz.model import MemoryModel

    model = MemoryModel.from_preset("micro", seed=2)
    model.train()
    layer = model.memory_layers[1]
    tap = Tap()
    handle = layer.add_access_hook(tap)
    ids, mask = make_batch(10)
    try:
        with UsageMonitor(model) as usage:
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            out.loss.backward()
    finally:
        handle.remove()
    expected = brute_counts(tap.reads, [mask.numpy()], layer.config.n_slots)
    assert np.array_equal(usage.counts[1].numpy(), expected)


def test_monitor_skips_padding_with_positional_attention_mask(micro):
    layer = micro.memory_layers[1]
    ids, mask = make_batch(11)
    with torch.no_grad(), UsageMonitor(micro) as usage:
        micro(ids, mask)
    real_tokens = int(mask.sum())
    assert usage.counts[1].sum().item() == real_tokens * layer.config.heads * layer.config.knn
