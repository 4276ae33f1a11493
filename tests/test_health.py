"""Memory health (smviz.evaluate.health): value movement, memory vs FFN output norms and query similarity
against brute-force recomputations on the micro model (the FFN input captured, every pairwise cosine
computed from the full N×N matrix), and NLL with the memory off against a copy whose memory is zeroed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from smviz.errors import ConfigError
from smviz.evaluate import PairwiseCosine, heldout_nll, memory_activity, memory_health, value_movement
from smviz.model import MemoryFFN, MemoryModel


def loud_model(**memory) -> MemoryModel:
    """The micro model with a parallel memory whose output projection is not zero (so it is heard)."""
    model = MemoryModel.from_preset("micro", seed=0, mode="parallel", **memory).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.memory_layers.values():
            layer.w2.weight.normal_(std=0.5)
    return model


def rows_and_mask(n: int = 5, seq_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 512, (n, seq_len), generator=g)
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[1, 8:] = 0  # right padding in two rows
    mask[3, 5:] = 0
    return rows, mask


def brute_mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine over all ordered pairs i != j, from the full matrix."""
    u = F.normalize(x.double(), dim=-1)
    c = u @ u.T
    n = len(x)
    return ((c.sum() - c.diagonal().sum()) / (n * (n - 1))).item()


def ffn_inputs(model: MemoryModel, rows: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Block → the real-token inputs (N, dim) its MemoryFFN received (a different hook point from health's)."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for block_index, block in enumerate(model.lm.model.layers):
        if isinstance(block.mlp, MemoryFFN):
            handles.append(block.mlp.register_forward_pre_hook(
                lambda _m, args, i=block_index: captured.setdefault(i, []).append(args[0][mask.bool()])))
    with torch.no_grad():
        model(input_ids=rows, attention_mask=mask)
    for h in handles:
        h.remove()
    return {i: torch.cat(x) for i, x in captured.items()}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_activity_equals_brute_force(qk_norm):
    model = loud_model(qk_norm=qk_norm)
    rows, mask = rows_and_mask()
    got = memory_activity(model, rows, batch_size=2, attention_mask=mask)  # batches of 2: sums carried across
    x = ffn_inputs(model, rows, mask)[1]
    assert len(x) == int(mask.sum()) == got["1"]["tokens"]
    mffn = model.lm.model.layers[1].mlp
    layer = mffn.memory
    with torch.no_grad():
        memory_out, ffn_out = layer(x[None])[0], mffn.ffn(x)
        q = layer.query_norm(layer.query(x)).view(len(x), layer.config.heads, 2, -1)
        if qk_norm:
            q = F.rms_norm(q, q.shape[-1:]) * layer.query_gain
    memory_norm = memory_out.double().norm(dim=-1).mean().item()
    ffn_norm = ffn_out.double().norm(dim=-1).mean().item()
    normed = sum(brute_mean_cosine(q[:, h, s]) for h in range(q.shape[1]) for s in range(2)) / (2 * q.shape[1])
    assert memory_norm > 0.01 * ffn_norm  # the memory is heard: the ratio is not trivially 0
    assert got["1"]["memory_norm"] == pytest.approx(memory_norm, rel=1e-6)
    assert got["1"]["ffn_norm"] == pytest.approx(ffn_norm, rel=1e-6)
    assert got["1"]["memory_ffn_ratio"] == pytest.approx(memory_norm / ffn_norm, rel=1e-6)
    assert got["1"]["query_cosine_raw"] == pytest.approx(brute_mean_cosine(x), abs=1e-9)
    assert got["1"]["query_cosine_normed"] == pytest.approx(normed, abs=1e-9)
    assert got["1"]["query_cosine_raw"] != pytest.approx(got["1"]["query_cosine_normed"], abs=1e-3)


def test_replace_mode_has_no_ffn_to_compare_with(micro_model):
    rows, mask = rows_and_mask()
    got = memory_activity(micro_model, rows, attention_mask=mask)["1"]
    assert got["ffn_norm"] is None and got["memory_ffn_ratio"] is None and got["memory_norm"] > 0


def test_pairwise_cosine_by_hand():
    acc = PairwiseCosine()
    acc.add(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    acc.add(torch.tensor([[[2.0, 2.0]]]))
    # pairs: (e1, e2) 0, (e1, d) and (e2, d) 1/sqrt(2) each
    assert acc.mean() == pytest.approx(2 / math.sqrt(2) / 3, abs=1e-12)
    acc.add(torch.zeros(1, 1, 2))  # a zero vector is orthogonal to everything: 3 more pairs of cosine 0
    assert acc.mean() == pytest.approx(2 / math.sqrt(2) / 6, abs=1e-12)
    one = PairwiseCosine()
    one.add(torch.ones(1, 1, 3))
    assert one.mean() is None  # no pair


def test_value_movement_by_hand(micro_model):
    initial = {b: v.detach().clone() for b, v in micro_model.values.items()}
    assert value_movement(micro_model, initial) == {"1": 0.0}
    with torch.no_grad():
        micro_model.values[1].mul_(3)  # V - V0 = 2 V0, up to float32 rounding of 3 V0
    assert value_movement(micro_model, initial)["1"] == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ConfigError, match="missing for memory blocks"):
        value_movement(micro_model, {})


def test_health_nll_off_is_the_model_without_its_memory():
    model = loud_model()
    rows, mask = rows_and_mask()
    initial = {b: v.detach().clone() * 2 for b, v in model.values.items()}  # V = V0 / 2: moved by 1/2
    health = memory_health(model, rows, initial_values=initial, attention_mask=mask, batch_size=2)
    silent = copy.deepcopy(model)
    with torch.no_grad():
        silent.lm.model.layers[1].mlp.memory.w2.weight.zero_()
    assert health["nll_memory_off"] == heldout_nll(silent, rows, attention_mask=mask)["nll"]
    assert health["nll_memory_on"] == heldout_nll(model, rows, attention_mask=mask)["nll"]
    assert health["nll_memory_on"] != health["nll_memory_off"]
    assert health["nll_change"] == pytest.approx((health["nll_memory_on"] - health["nll_memory_off"]) / health["nll_memory_off"])
    assert health["tokens"] == int((mask[:, 1:].bool() & mask[:, :-1].bool()).sum())
    assert health["blocks"]["1"]["value_movement"] == pytest.approx(0.5, abs=1e-12)
    assert health["blocks"]["1"] == pytest.approx(
        memory_activity(model, rows, attention_mask=mask)["1"] | {"value_movement": 0.5})


def test_bad_rows(micro_model):
    with pytest.raises(ConfigError, match="LongTensor"):
        memory_activity(micro_model, torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="attention_mask shape"):
        memory_activity(micro_model, torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
