"""Tests of smviz.memory against independent references written here (brute force, hand math).

Everything runs in float64 where exact comparisons matter. The layer computes its softmax weights in
float32 (`scores.float()`), so comparisons that go through the weights use a 1e-6-ish tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter

import pytest
import torch

from smviz.errors import ConfigError
from smviz.memory import MemoryConfig, ProductKeyMemory, ValueTable

F64 = torch.float64
# Tolerance for anything that passes through the layer's float32 softmax.
WTOL = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- helpers (independent references)


def make_layer(*, dim: int = 12, seed: int = 0, perturb: bool = True, **cfg_kwargs) -> ProductKeyMemory:
    """A float64 layer; with `perturb`, every parameter that the default init leaves trivial (zero
    biases, unit norm gains, zero running stats) is randomised so that the references must use it."""
    torch.manual_seed(seed)
    cfg = MemoryConfig(**cfg_kwargs)
    layer = ProductKeyMemory(cfg, dim, dtype=F64)
    if perturb:
        with torch.no_grad():
            layer.query.bias.normal_(0, 0.3)
            norm = layer.query_norm
            if isinstance(norm, torch.nn.LayerNorm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.2)
            elif isinstance(norm, torch.nn.BatchNorm1d):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.2)
                norm.running_mean.normal_(0, 0.3)
                norm.running_var.uniform_(0.5, 2.0)
            if layer.query_gain is not None:
                layer.query_gain.uniform_(0.5, 1.5)
            if layer.w1 is not None:
                layer.w1.bias.normal_(0, 0.2)
            layer.w2.bias.normal_(0, 0.2)
    return layer


def ref_sub_scores(layer: ProductKeyMemory, x2: torch.Tensor) -> torch.Tensor:
    """(M, H, 2, n_keys) sub-key scores computed by hand from the layer's parameters."""
    c = layer.config
    half = c.k_dim // 2
    q = layer.query_norm(layer.query(x2))  # the brief: apply query and query_norm, the rest by hand
    q = q.reshape(x2.shape[0], c.heads, 2, half)
    keys = layer.keys  # (H, 2, n_keys, half)
    if c.qk_norm:
        q = q / torch.sqrt((q * q).mean(-1, keepdim=True)) * layer.query_gain
        keys = keys / torch.sqrt((keys * keys).mean(-1, keepdim=True))
    out = torch.empty(x2.shape[0], c.heads, 2, c.n_keys, dtype=x2.dtype)
    for h in range(c.heads):
        for s in range(2):
            out[:, h, s, :] = q[:, h, s, :] @ keys[h, s].T
    if c.qk_norm:
        out = out / math.sqrt(half)
    return out


def ref_full_scores(layer: ProductKeyMemory, x2: torch.Tensor) -> torch.Tensor:
    """(M, H, N) score of every slot id i1*n_keys + i2, i.e. s1[i1] + s2[i2]."""
    c = layer.config
    sub = ref_sub_scores(layer, x2)
    full = torch.empty(x2.shape[0], c.heads, c.n_slots, dtype=x2.dtype)
    for i1 in range(c.n_keys):
        for i2 in range(c.n_keys):
            full[:, :, i1 * c.n_keys + i2] = sub[:, :, 0, i1] + sub[:, :, 1, i2]
    return full


def ref_topk(layer: ProductKeyMemory, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force top-k over all N combined keys: (M, H, K) ids and scores."""
    scores, idx = ref_full_scores(layer, x2).topk(layer.config.knn, dim=-1)
    return idx, scores


def ref_forward(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The layer output recomputed from its parameters with plain indexing."""
    c = layer.config
    x2 = x.reshape(-1, layer.dim)
    idx, scores = ref_topk(layer, x2)  # (M, H, K)
    w = torch.softmax(scores, dim=-1)  # float64 softmax
    V = layer.value_table.weight
    y = (V[idx] * w[..., None]).sum(dim=(1, 2))  # (M, v_dim): sum over heads and k
    if c.swilu:
        y = y * torch.nn.functional.silu(x2 @ layer.w1.weight.T + layer.w1.bias)
    out = y @ layer.w2.weight.T + layer.w2.bias
    return out.reshape(*x.shape[:-1], layer.dim)


def ref_balance_loss(layer: ProductKeyMemory, x2: torch.Tensor, real: torch.Tensor | None = None) -> float:
    """The Switch-style balance loss written with Python loops and Counters."""
    c = layer.config
    # queries are per token (no batchnorm in the configs used here), so compute on all, then keep the real ones
    idx, _ = ref_topk(layer, x2)
    sub = ref_sub_scores(layer, x2)
    if real is not None:
        idx, sub = idx[real], sub[real]
    m = idx.shape[0]
    terms = []
    for h in range(c.heads):
        for s in range(2):
            half_ids = [(int(i) // c.n_keys) if s == 0 else (int(i) % c.n_keys) for i in idx[:, h, :].flatten()]
            assert len(half_ids) == m * c.knn
            counts = Counter(half_ids)
            f = [counts.get(j, 0) / (m * c.knn) for j in range(c.n_keys)]
            P = [0.0] * c.n_keys
            for t in range(m):
                row = [float(v) for v in sub[t, h, s]]
                mx = max(row)
                e = [math.exp(v - mx) for v in row]
                z = sum(e)
                for j in range(c.n_keys):
                    P[j] += e[j] / z / m
            terms.append(c.n_keys * sum(fj * pj for fj, pj in zip(f, P)))
    return sum(terms) / len(terms)


# --------------------------------------------------------------------------- 1. product-key top-k == brute force

SHAPES = [
    # n_keys, heads, knn, k_dim
    (8, 2, 3, 8),
    (6, 1, 6, 6),  # knn == n_keys
    (5, 3, 1, 4),  # knn == 1
    (2, 2, 2, 2),  # smallest everything, knn == n_keys
    (16, 2, 5, 16),
    (7, 4, 4, 10),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("query_norm", ["none", "layernorm", "batchnorm"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}h{}k{}d{}".format(*s))
def test_lookup_equals_brute_force_topk(shape, qk_norm, query_norm, training):
    n_keys, heads, knn, k_dim = shape
    layer = make_layer(
        n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, qk_norm=qk_norm, query_norm=query_norm, seed=sum(shape)
    )
    layer.train(training)
    x2 = torch.randn(9, layer.dim, dtype=F64)
    with torch.no_grad():
        idx, scores, sub = layer.lookup(x2)
        ref_sub = ref_sub_scores(layer, x2)
        full = ref_full_scores(layer, x2)
        ref_idx, ref_scores = ref_topk(layer, x2)

    assert idx.dtype == torch.int64
    assert idx.shape == scores.shape == (9, heads, knn)
    assert sub.shape == (9, heads, 2, n_keys)
    torch.testing.assert_close(sub, ref_sub, rtol=1e-10, atol=1e-12)
    # same slot set per (token, head)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    # same scores, best first
    torch.testing.assert_close(scores, ref_scores, rtol=1e-10, atol=1e-12)
    assert torch.all(scores[..., :-1] >= scores[..., 1:])
    # each returned score is the score of the returned slot in the full table
    torch.testing.assert_close(full.gather(-1, idx), scores, rtol=1e-10, atol=1e-12)
    assert idx.min() >= 0 and idx.max() < n_keys**2
    # distinct slots per (token, head)
    assert all(len(set(row.tolist())) == knn for row in idx.reshape(-1, knn))


def test_lookup_slot_id_convention_is_i1_times_n_keys_plus_i2():
    """Hand-built keys: with 1 head and k_dim=2 the scores are q1*k1[i1] + q2*k2[i2], so with query
    (1, 1) the best slot is (argmax k1, argmax k2) -> id argmax(k1) * n_keys + argmax(k2)."""
    layer = make_layer(n_keys=4, heads=1, knn=1, k_dim=2, query_norm="none", perturb=False, dim=2)
    with torch.no_grad():
        layer.query.weight.copy_(torch.eye(2, dtype=F64))
        layer.query.bias.zero_()
        layer.keys[0, 0, :, 0] = torch.tensor([0.1, 0.9, 0.2, 0.3], dtype=F64)  # best i1 = 1
        layer.keys[0, 1, :, 0] = torch.tensor([0.0, 0.1, 0.2, 0.7], dtype=F64)  # best i2 = 3
        idx, scores, _ = layer.lookup(torch.tensor([[1.0, 1.0]], dtype=F64))
    assert idx.item() == 1 * 4 + 3
    assert scores.item() == pytest.approx(0.9 + 0.7)


# --------------------------------------------------------------------------- 2. forward == naive recomputation


@pytest.mark.parametrize("swilu", [True, False], ids=["swilu", "plain"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["noqk", "qk"])
@pytest.mark.parametrize("v_dim", [None, 5])
def test_forward_equals_naive_recomputation(swilu, qk_norm, v_dim):
    layer = make_layer(n_keys=6, heads=3, knn=4, k_dim=8, v_dim=v_dim, swilu=swilu, qk_norm=qk_norm, seed=3)
    layer.eval()
    assert (layer.w1 is None) == (not swilu)
    x = torch.randn(2, 5, layer.dim, dtype=F64)
    with torch.no_grad():
        out = layer(x)
        ref = ref_forward(layer, x)
    assert out.shape == x.shape and out.dtype == F64
    assert ref.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(out, ref, **WTOL)


def test_forward_accepts_2d_input():
    layer = make_layer(n_keys=5, heads=2, knn=3, k_dim=6, seed=4)
    layer.eval()
    x = torch.randn(7, layer.dim, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref_forward(layer, x), **WTOL)


def test_swilu_changes_output():
    """Guards the reference: the two output formulas really differ for the same parameters."""
    a = make_layer(n_keys=5, heads=2, knn=3, k_dim=6, swilu=True, seed=5)
    b = make_layer(n_keys=5, heads=2, knn=3, k_dim=6, swilu=False, seed=5)
    x = torch.randn(2, 3, a.dim, dtype=F64)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_parallel_mode_starts_silent():
    layer = make_layer(n_keys=6, heads=2, knn=3, k_dim=8, mode="parallel", perturb=False, seed=6)
    assert torch.equal(layer.w2.weight, torch.zeros_like(layer.w2.weight))
    assert torch.equal(layer.w2.bias, torch.zeros_like(layer.w2.bias))
    x = torch.randn(2, 4, layer.dim, dtype=F64)
    out = layer(x)
    assert torch.equal(out, torch.zeros_like(x))
    # replace mode with the same seed is not silent
    other = make_layer(n_keys=6, heads=2, knn=3, k_dim=8, mode="replace", perturb=False, seed=6)
    assert other(x).abs().max() > 0


# --------------------------------------------------------------------------- 3. access hooks


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, layer, indices, weights, mask) -> None:
        self.calls.append((layer, indices.detach().clone(), weights.detach().clone(), mask))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_access_hook_emits_lookup_indices_and_weights(training):
    layer = make_layer(n_keys=7, heads=3, knn=4, k_dim=8, seed=7)
    layer.train(training)
    B, T = 2, 5
    x = torch.randn(B, T, layer.dim, dtype=F64)
    rec = Recorder()
    handle = layer.add_access_hook(rec)
    layer(x)
    assert len(rec.calls) == 1
    who, idx, w, mask = rec.calls[0]
    assert who is layer
    assert idx.shape == w.shape == (B, T, 3, 4)
    assert idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < 49
    assert mask is None  # token_mask is None
    torch.testing.assert_close(w.sum(-1), torch.ones(B, T, 3, dtype=w.dtype), rtol=0, atol=1e-6)
    assert torch.all(w >= 0)
    with torch.no_grad():
        l_idx, l_scores, _ = layer.lookup(x.reshape(-1, layer.dim))
        ref_idx, _ = ref_topk(layer, x.reshape(-1, layer.dim))
    assert torch.equal(idx, l_idx.view(B, T, 3, 4))
    assert torch.equal(idx.sort(-1).values, ref_idx.view(B, T, 3, 4).sort(-1).values)
    torch.testing.assert_close(w, torch.softmax(l_scores, -1).view(B, T, 3, 4), **WTOL)

    handle.remove()
    layer(x)
    assert len(rec.calls) == 1  # removed: no further calls


def test_several_hooks_each_called_and_removed_independently():
    layer = make_layer(n_keys=5, heads=1, knn=2, k_dim=4, seed=8)
    a, b = Recorder(), Recorder()
    ha = layer.add_access_hook(a)
    layer.add_access_hook(b)
    x = torch.randn(1, 3, layer.dim, dtype=F64)
    layer(x)
    ha.remove()
    layer(x)
    assert len(a.calls) == 1 and len(b.calls) == 2


def test_access_hook_mask_is_last_columns_of_token_mask():
    layer = make_layer(n_keys=5, heads=2, knn=2, k_dim=4, seed=9)
    layer.eval()
    B, T, past = 2, 3, 4
    token_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1, 0]], dtype=torch.long)
    assert token_mask.shape == (B, T + past)
    layer.token_mask = token_mask
    rec = Recorder()
    layer.add_access_hook(rec)
    layer(torch.randn(B, T, layer.dim, dtype=F64))
    mask = rec.calls[0][3]
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.tensor([[True, False, True], [True, True, False]]))
    # same-length mask: the whole mask
    layer.token_mask = token_mask[:, past:]
    layer(torch.randn(B, T, layer.dim, dtype=F64))
    assert torch.equal(rec.calls[1][3], torch.tensor([[True, False, True], [True, True, False]]))
    # back to None
    layer.token_mask = None
    layer(torch.randn(B, T, layer.dim, dtype=F64))
    assert rec.calls[2][3] is None


# --------------------------------------------------------------------------- 4. ValueTable.train_rows


def _train_rows_setup():
    layer = make_layer(n_keys=8, heads=2, knn=3, k_dim=8, v_dim=6, seed=10)
    layer.train()
    x = torch.randn(2, 4, layer.dim, dtype=F64)
    g = torch.randn(2, 4, layer.dim, dtype=F64)
    return layer, x, g


def test_train_rows_forward_bit_identical_and_gradient_confined():
    layer, x, g = _train_rows_setup()
    table = layer.value_table
    N = layer.config.n_slots
    rec = Recorder()
    layer.add_access_hook(rec)

    # dense reference
    out_dense = layer(x)
    (out_dense * g).sum().backward()
    dense = table.weight.grad.clone()
    other_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if n != "values.weight"}
    accessed = sorted(set(rec.calls[0][1].flatten().tolist()))
    never = sorted(set(range(N)) - set(accessed))
    assert len(accessed) >= 3 and len(never) >= 3
    # sanity of the reference: the dense gradient is nonzero exactly on the accessed rows
    nonzero_rows = sorted((dense.abs().sum(1) > 0).nonzero().flatten().tolist())
    assert nonzero_rows == accessed

    layer.zero_grad(set_to_none=True)
    chosen = [accessed[2], never[1], accessed[0], never[0], accessed[2], accessed[0]]  # unsorted, duplicates
    with table.train_rows(chosen) as tr:
        out = layer(x)
        assert torch.equal(out, out_dense)
        (out * g).sum().backward()
        assert table.weight.grad is None
    assert table.weight.grad is None  # no (N, v_dim) gradient was ever materialised
    assert table._trainable is None
    expected_rows = sorted(set(chosen))
    assert tr.rows.dtype == torch.int64
    assert tr.rows.tolist() == expected_rows
    assert tr.delta.shape == (len(expected_rows), 6)
    assert tr.delta.grad is not None
    torch.testing.assert_close(tr.delta.grad, dense[tr.rows], rtol=1e-10, atol=1e-12)
    for j, r in enumerate(expected_rows):
        if r in never:
            assert torch.equal(tr.delta.grad[j], torch.zeros(6, dtype=F64))
        else:
            assert tr.delta.grad[j].abs().max() > 0
    # every other parameter gets the same gradient as in the dense pass
    for n, p in layer.named_parameters():
        if n != "values.weight":
            torch.testing.assert_close(p.grad, other_grads[n], rtol=1e-10, atol=1e-12)

    # the caller's SGD step touches only the chosen rows
    before = table.weight.detach().clone()
    lr = 0.5
    with torch.no_grad():
        table.weight.index_add_(0, tr.rows, -lr * tr.delta.grad)
    after = table.weight.detach()
    untouched = [r for r in range(N) if r not in expected_rows]
    assert torch.equal(after[untouched], before[untouched])
    torch.testing.assert_close(after[tr.rows], before[tr.rows] - lr * dense[tr.rows], rtol=1e-12, atol=1e-12)
    for r in expected_rows:
        if r in accessed:
            assert not torch.equal(after[r], before[r])

    # the table is back to normal after the block: dense gradient again
    layer.zero_grad(set_to_none=True)
    (layer(x) * g).sum().backward()
    assert table.weight.grad is not None


def test_train_rows_accepts_tensor_rows():
    layer, x, g = _train_rows_setup()
    table = layer.value_table
    with table.train_rows(torch.tensor([5, 1, 5, 3])) as tr:
        (layer(x) * g).sum().backward()
    assert tr.rows.tolist() == [1, 3, 5]
    assert tr.delta.grad.shape == (3, 6)


@pytest.mark.parametrize("bad", [[64], [-1], [0, 3, 64], [100, 2]])
def test_train_rows_out_of_range_raises_config_error(bad):
    layer, x, g = _train_rows_setup()
    table = layer.value_table
    assert table.n_slots == 64
    with pytest.raises(ConfigError):
        with table.train_rows(bad):
            pass
    # a failed entry leaves the table usable
    with table.train_rows([0]):
        pass
    assert table._trainable is None


@pytest.mark.parametrize("empty", [[], torch.empty(0, dtype=torch.long)], ids=["list", "tensor"])
def test_train_rows_empty_gives_no_value_gradient(empty):
    layer, x, g = _train_rows_setup()
    table = layer.value_table
    with torch.no_grad():
        ref = layer(x)
    with table.train_rows(empty) as tr:
        out = layer(x)
        assert torch.equal(out, ref)
        (out * g).sum().backward()
    assert table.weight.grad is None
    assert tr.rows.numel() == 0
    assert tr.delta.grad is None or tr.delta.grad.numel() == 0
    assert layer.keys.grad is not None  # the rest of the layer still trains


def test_train_rows_cannot_nest():
    layer, x, g = _train_rows_setup()
    table = layer.value_table
    with table.train_rows([1]) as outer:
        with pytest.raises(RuntimeError):
            with table.train_rows([2]):
                pass
        assert table._trainable is outer  # the outer block is still in force
    assert table._trainable is None


# --------------------------------------------------------------------------- 5. zero switch


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_disabled_layer_outputs_zeros_and_emits_nothing(training):
    layer = make_layer(n_keys=5, heads=2, knn=2, k_dim=4, seed=11)
    layer.train(training)
    rec = Recorder()
    layer.add_access_hook(rec)
    x = torch.randn(2, 3, layer.dim, dtype=F64)
    assert layer(x).abs().max() > 0
    n = len(rec.calls)
    layer.enabled = False
    out = layer(x)
    assert torch.equal(out, torch.zeros_like(x))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert len(rec.calls) == n
    layer.enabled = True
    layer(x)
    assert len(rec.calls) == n + 1


def test_disabled_layer_clears_stale_aux_loss():
    layer = make_layer(n_keys=5, heads=2, knn=2, k_dim=4, balance_weight=0.1, seed=12)
    layer.train()
    x = torch.randn(2, 3, layer.dim, dtype=F64)
    layer(x)
    assert layer.aux_loss is not None
    layer.enabled = False
    layer(x)
    assert layer.aux_loss is None


# --------------------------------------------------------------------------- 6. MemoryConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_keys=8, knn=9),
        dict(n_keys=8, knn=0),
        dict(k_dim=7),
        dict(k_dim=0),
        dict(mode="sideways"),
        dict(query_norm="rmsnorm"),
        dict(key_lr_mult=-0.1),
        dict(value_lr_mult=-1.0),
        dict(layers=(1, 2, 1)),
        dict(layers=(-1,)),
        dict(n_keys=1, knn=1),
        dict(heads=0),
        dict(v_dim=0),
        dict(balance_weight=-0.5),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        MemoryConfig(**kwargs)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        MemoryConfig(n_keys=4, knn=5)


@pytest.mark.parametrize("kwargs", [dict(n_keys=4, knn=4), dict(k_dim=2), dict(layers=[3, 1]), dict(v_dim=None)])
def test_config_valid_edges_accepted(kwargs):
    cfg = MemoryConfig(**kwargs)
    assert isinstance(cfg.layers, tuple)


def test_config_round_trip():
    cfg = MemoryConfig(
        n_keys=12, heads=3, knn=5, k_dim=10, v_dim=7, layers=[2, 0], mode="parallel", swilu=False,
        query_norm="batchnorm", qk_norm=True, share_values=True, key_lr_mult=0.5, value_lr_mult=10.0,
        balance_weight=0.01,
    )
    assert cfg.n_slots == 144
    d = cfg.to_dict()
    assert d["layers"] == [2, 0] and isinstance(d["layers"], list)
    assert MemoryConfig.from_dict(d) == cfg
    assert MemoryConfig.from_dict(json.loads(json.dumps(d))) == cfg  # through JSON too
    assert set(d) == {f.name for f in dataclasses.fields(MemoryConfig)}


def test_config_from_dict_ignores_unknown_with_warning(caplog):
    d = MemoryConfig(n_keys=8, knn=4).to_dict() | {"future_knob": 3, "another": "x"}
    with caplog.at_level(logging.WARNING, logger="smviz.config"):
        cfg = MemoryConfig.from_dict(d)
    assert cfg == MemoryConfig(n_keys=8, knn=4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "future_knob" in warnings[0].getMessage() and "another" in warnings[0].getMessage()


def test_config_from_dict_known_keys_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="smviz.config"):
        MemoryConfig.from_dict(MemoryConfig().to_dict())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_config_from_dict_fills_defaults():
    cfg = MemoryConfig.from_dict({"n_keys": 8, "knn": 4})
    default = MemoryConfig()
    assert cfg.n_keys == 8 and cfg.knn == 4
    for f in dataclasses.fields(MemoryConfig):
        if f.name not in ("n_keys", "knn"):
            assert getattr(cfg, f.name) == getattr(default, f.name), f.name
    assert MemoryConfig.from_dict({}) == default


def test_config_from_dict_validates():
    with pytest.raises(ConfigError):
        MemoryConfig.from_dict({"n_keys": 4, "knn": 8})


# --------------------------------------------------------------------------- 7. balance loss


@pytest.mark.parametrize("qk_norm", [False, True])
def test_balance_loss_matches_reference(qk_norm):
    layer = make_layer(n_keys=6, heads=2, knn=3, k_dim=8, balance_weight=0.1, qk_norm=qk_norm, seed=13)
    layer.train()
    x = torch.randn(3, 4, layer.dim, dtype=F64)
    layer(x)
    aux = layer.aux_loss
    assert aux is not None and aux.dim() == 0
    assert aux.requires_grad  # P is differentiable
    with torch.no_grad():
        ref = ref_balance_loss(layer, x.reshape(-1, layer.dim))
    assert aux.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # bounds: n_keys * sum_j f_j P_j lies in (0, n_keys]
    assert 0 < aux.item() <= 6


def test_balance_loss_uniform_case_is_one():
    """Hand case: if every sub-key score is equal, P_j = 1/n_keys, so the loss is n_keys * Σ f_j / n_keys = 1."""
    layer = make_layer(n_keys=4, heads=1, knn=2, k_dim=2, balance_weight=1.0, query_norm="none", perturb=False, dim=2)
    layer.train()
    with torch.no_grad():
        layer.keys.zero_()
    layer(torch.randn(1, 5, 2, dtype=F64))
    assert layer.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_excludes_padding():
    layer = make_layer(n_keys=6, heads=2, knn=3, k_dim=8, balance_weight=0.1, seed=14)
    layer.train()
    B, T = 2, 5
    x = torch.randn(B, T, layer.dim, dtype=F64)
    token_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layer.token_mask = token_mask
    layer(x)
    masked = layer.aux_loss.item()
    with torch.no_grad():
        ref_real = ref_balance_loss(layer, x.reshape(-1, layer.dim), real=token_mask.reshape(-1).bool())
        ref_all = ref_balance_loss(layer, x.reshape(-1, layer.dim))
    assert masked == pytest.approx(ref_real, rel=1e-5, abs=1e-6)
    assert abs(ref_real - ref_all) > 1e-4  # padding really changes the number
    layer.token_mask = None
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(ref_all, rel=1e-5, abs=1e-6)


def test_balance_loss_absent_in_eval_and_when_weight_zero():
    layer = make_layer(n_keys=6, heads=2, knn=3, k_dim=8, balance_weight=0.1, seed=15)
    x = torch.randn(2, 3, layer.dim, dtype=F64)
    layer.train()
    layer(x)
    assert layer.aux_loss is not None
    layer.eval()
    layer(x)
    assert layer.aux_loss is None
    off = make_layer(n_keys=6, heads=2, knn=3, k_dim=8, balance_weight=0.0, seed=15)
    off.train()
    off(x)
    assert off.aux_loss is None


# --------------------------------------------------------------------------- 8. shared value table


def test_shared_value_table():
    torch.manual_seed(16)
    cfg = MemoryConfig(n_keys=5, heads=2, knn=3, k_dim=6)
    a = ProductKeyMemory(cfg, 10, dtype=F64)
    b = ProductKeyMemory(cfg, 10, shared_values=a.value_table, dtype=F64)
    assert b.value_table is a.value_table
    assert a.owns_values and not b.owns_values
    assert "values.weight" in a.state_dict()
    assert not any(k.startswith("values") for k in b.state_dict())
    assert all(p is not a.value_table.weight for p in b.parameters())
    # b reads the shared table: changing it through a changes b's output as the reference says
    b.eval()
    x = torch.randn(2, 3, 10, dtype=F64)
    with torch.no_grad():
        before = b(x)
        a.value_table.weight.mul_(-2.0)
        after = b(x)
        torch.testing.assert_close(after, ref_forward(b, x), **WTOL)
    assert not torch.allclose(before, after)


def test_shared_value_table_shape_mismatch_raises():
    cfg = MemoryConfig(n_keys=5, heads=2, knn=3, k_dim=6)
    with pytest.raises(ConfigError):
        ProductKeyMemory(cfg, 10, shared_values=ValueTable(24, 10))
    with pytest.raises(ConfigError):
        ProductKeyMemory(cfg, 10, shared_values=ValueTable(25, 9))


# --------------------------------------------------------------------------- 9. initialisation


def test_initialisation_statistics():
    torch.manual_seed(17)
    k_dim, v_dim, dim = 32, 16, 24
    cfg = MemoryConfig(n_keys=64, heads=2, knn=4, k_dim=k_dim, v_dim=v_dim)
    layer = ProductKeyMemory(cfg, dim, dtype=F64)
    bound = 1 / math.sqrt(k_dim)
    keys = layer.keys.detach()
    assert keys.shape == (2, 2, 64, k_dim // 2)
    assert keys.abs().max() <= bound
    assert keys.max() > 0.95 * bound and keys.min() < -0.95 * bound  # fills the range
    assert keys.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform std
    V = layer.value_table.weight.detach()
    assert V.shape == (64 * 64, v_dim)
    assert V.std().item() == pytest.approx(v_dim**-0.5, rel=0.03)
    assert abs(V.mean().item()) < 0.01
    # query bias and W biases start at zero, W1/W2 std ≈ dim^-1/2
    assert torch.equal(layer.query.bias, torch.zeros_like(layer.query.bias))
    assert layer.w2.weight.std().item() == pytest.approx(dim**-0.5, rel=0.15)
    assert layer.w1.weight.std().item() == pytest.approx(dim**-0.5, rel=0.15)


def test_config_from_dict_type_checks_every_field():
    with pytest.raises(ConfigError, match=r"MemoryConfig.heads must be an integer, got 'four'"):
        MemoryConfig.from_dict({"heads": "four"})
    with pytest.raises(ConfigError, match="MemoryConfig.swilu must be true or false"):
        MemoryConfig.from_dict({"swilu": "maybe"})
    with pytest.raises(ConfigError, match="MemoryConfig.layers must be a list"):
        MemoryConfig.from_dict({"layers": 3})
    with pytest.raises(ConfigError, match="MemoryConfig must be a JSON object"):
        MemoryConfig.from_dict(["heads", 4])


def test_config_from_dict_keeps_an_integer_in_a_float_field():
    """memory.json is hashed: what was read must be written back byte for byte."""
    d = MemoryConfig(n_keys=8, knn=4, value_lr_mult=10).to_dict()
    text = json.dumps(d, sort_keys=True)
    again = MemoryConfig.from_dict(json.loads(text))
    assert json.dumps(again.to_dict(), sort_keys=True) == text
    assert type(again.value_lr_mult) is int and type(again.key_lr_mult) is float
