"""Live probing and steering (smviz.analysis.steer), each against an independent reference: read_text
against a hook of our own and the tokenizer; zero (renormalised), force and scale against the memory
layer's output computed by hand from lookup → softmax → edited weights → value rows → W2/swilu; scale 0
= zero, scale 1 and an empty steer change nothing; hooks gone after the block (also after an
exception); steer_generate against a hand-written greedy loop; ablation_effects against a direct
log_softmax; clear errors for bad input and for gradients."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from smviz.analysis.ablate import ablated, answer_logprob
from smviz.analysis.steer import (
    ablation_effects,
    read_text,
    steer_generate,
    steered,
    text_top_slots,
)
from smviz.data.facts import qa_prompt, qa_text
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import AnalysisError, ConfigError, SmvizError
from smviz.model import MemoryModel
from smviz.record import AccessRecorder

TEXTS = [f"{name} was born in {city} and works as a {job}." for name, city, job in
         [("Ada Number0", "Paris", "baker"), ("Bo Number1", "Lima", "pilot"), ("Cy Number2", "Oslo", "nurse"),
          ("Di Number3", "Cairo", "judge")]]
QUESTION, ANSWER = "Where was Ada Number0 born?", "Paris"


@pytest.fixture(scope="module")
def model():
    tokenizer = train_tokenizer(TEXTS * 3 + [qa_text(QUESTION, ANSWER)] * 3, vocab_size=300)
    m = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    m.tokenizer = tokenizer
    return m.eval()


def ids_of(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def plain_reads(model, ids):
    """(indices, weights) (T, H, K) of the memory layer on `ids`, from a hook of our own."""
    got = {}
    handle = model.memory_layers[1].add_access_hook(lambda _l, i, w, _m: got.update(i=i[0].clone(), w=w[0].clone()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return got["i"], got["w"]


def layer_io(model, ids):
    """The memory layer's input x (T, dim) and output (T, dim) in a forward pass (steered if inside)."""
    memory, cap = model.memory_layers[1], {}
    handle = memory.register_forward_hook(lambda _m, args, out: cap.update(x=args[0][0].clone(), out=out[0].clone()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return cap["x"], cap["out"]


def by_hand(memory, x, edit):
    """The memory layer's output computed from scratch: lookup → softmax → edit(idx, w) → Σ w·V[idx] →
    swilu → W2."""
    with torch.no_grad():
        idx, scores, _ = memory.lookup(x)
        w = torch.softmax(scores.float(), dim=-1)
        idx, w = edit(idx.clone(), w.clone())
        y = (w[..., None] * memory.value_table.weight[idx]).sum((1, 2))
        if memory.w1 is not None:
            y = y * F.silu(memory.w1(x))
        return memory.w2(y)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# --------------------------------------------------------------------------- read_text


def test_read_text_matches_a_hook_and_the_tokenizer(model):
    text = TEXTS[0]
    ids = ids_of(model, text)
    ref_i, ref_w = plain_reads(model, ids)
    df = read_text(model, text)
    T, H, K = ref_i.shape
    assert list(df.columns) == ["position", "token", "token_id", "layer", "head", "rank", "slot", "weight"]
    assert len(df) == T * H * K
    assert (df["position"].to_numpy() == np.repeat(np.arange(T), H * K)).all()
    assert (df["token_id"].to_numpy() == np.repeat(ids, H * K)).all()
    assert list(df["token"][:: H * K]) == [model.tokenizer.decode([i]) for i in ids]
    assert (df["layer"] == 1).all() and (df["head"].to_numpy() == np.tile(np.repeat(np.arange(H), K), T)).all()
    assert (df["slot"].to_numpy() == ref_i.flatten().numpy()).all()
    assert np.array_equal(df["weight"].to_numpy(), ref_w.flatten().half().double().numpy())  # float16, as a trace

    # top: per token, the slots with the most weight summed over heads, by hand
    top = read_text(model, text, top=2)
    kept = set()
    for t in range(T):
        total = defaultdict(float)
        for s, w in zip(ref_i[t].flatten().tolist(), ref_w[t].flatten().half().double().tolist()):
            total[s] += w
        best = sorted(total, key=lambda s: (-total[s], s))[:2]
        kept |= {(t, h, k) for h in range(H) for k in range(K) if int(ref_i[t, h, k]) in best}
    assert set(zip(top["position"], top["head"], top["rank"])) == kept
    view = text_top_slots(df, 2)
    assert (view.groupby("position").size() <= 2).all() and set(view["rank"]) <= {0, 1}
    row = view.iloc[0]
    mask = (df["position"] == row["position"]) & (df["slot"] == row["slot"])
    assert row["weight"] == pytest.approx(df.loc[mask, "weight"].sum()) and row["reads"] == mask.sum()


def test_read_text_errors(model):
    with pytest.raises(AnalysisError, match="empty"):
        read_text(model, "")
    with pytest.raises(AnalysisError, match="reads at once"):
        read_text(model, " ".join(TEXTS * 20))
    with pytest.raises(ConfigError, match="top"):
        read_text(model, TEXTS[0], top=0)
    with pytest.raises(ConfigError, match="no memory layer"):
        read_text(model, TEXTS[0], layer=0)


# --------------------------------------------------------------------------- steering against a hand computation


def test_zero_renormalised_equals_brute_force(model):
    ids = ids_of(model, TEXTS[1])
    ref_i, _ = plain_reads(model, ids)
    slots = ref_i[:, 0, 0].unique()[:3]  # slots some heads read, at rank 0 among others
    x, plain = layer_io(model, ids)

    def drop(idx, w):
        w = w.masked_fill(torch.isin(idx, slots), 0)
        return idx, w / w.sum(-1, keepdim=True)

    expected = by_hand(model.memory_layers[1], x, drop)
    with steered(model, zero=slots, renormalise=True):
        _, got = layer_io(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain)
    with ablated(model, slots, renormalise=True):  # ablate delegates to the same code
        _, got2 = layer_io(model, ids)
    assert torch.equal(got, got2)
    # without renormalise: exactly the dropped rows' terms are removed
    expected = by_hand(model.memory_layers[1], x, lambda idx, w: (idx, w.masked_fill(torch.isin(idx, slots), 0)))
    with steered(model, zero=slots):
        _, got = layer_io(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_head_whose_every_read_is_dropped_adds_nothing(model):
    ids = ids_of(model, TEXTS[2])
    with steered(model, zero=range(256), renormalise=True):
        _, got = layer_io(model, ids)
        out = logits(model, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(got, model.memory_layers[1].w2.bias.expand_as(got))  # W2 · 0 + bias


def test_force_puts_the_slot_in_every_head(model):
    ids = ids_of(model, TEXTS[0])
    ref_i, ref_w = plain_reads(model, ids)
    counts = torch.bincount(ref_i.flatten(), minlength=256)
    slot = int(counts.argmax())  # read by some heads, not by all
    had = (ref_i == slot).any(-1)
    assert had.any() and not had.all()
    fw = 0.4
    with steered(model, force=[slot], force_weight=fw):
        got_i, got_w = plain_reads(model, ids)
    hit = got_i == slot
    assert (hit.sum(-1) == 1).all()
    torch.testing.assert_close(got_w[hit], torch.full((hit.sum(),), fw))
    torch.testing.assert_close(got_w.sum(-1), torch.ones(got_w.shape[:-1]))
    # a head without it gives up its last rank (the weakest read); the others keep their proportions
    assert torch.equal(got_i[~had][:, :-1], ref_i[~had][:, :-1]) and (got_i[~had][:, -1] == slot).all()
    assert torch.equal(got_i[had], ref_i[had])
    kept = torch.where(hit, 0, ref_w)  # the unsteered weights of the reads that were neither forced nor replaced
    torch.testing.assert_close(torch.where(hit, 0, got_w), kept / kept.sum(-1, keepdim=True) * (1 - fw))

    # the layer's output is the bag of exactly those reads
    x, _ = layer_io(model, ids)
    with steered(model, force=[slot], force_weight=fw):
        _, got = layer_io(model, ids)
    expected = by_hand(model.memory_layers[1], x, lambda idx, w: (got_i.clone(), got_w.float().clone()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # read_text inside the block sees the steered reads
    with steered(model, force=[slot], force_weight=fw):
        df = read_text(model, TEXTS[0])
    assert (df[df["slot"] == slot].groupby(["position", "head"]).size() == 1).sum() == hit.shape[0] * hit.shape[1]


def test_force_several_slots(model):
    ids = ids_of(model, TEXTS[3])
    with steered(model, force=[3, 77], force_weight=0.3):
        got_i, got_w = plain_reads(model, ids)
    forced = torch.isin(got_i, torch.tensor([3, 77]))
    assert (forced.sum(-1) == 2).all()
    torch.testing.assert_close(got_w[forced], torch.full((forced.sum(),), 0.3))
    torch.testing.assert_close(torch.where(forced, 0, got_w).sum(-1), torch.full(got_w.shape[:-1], 0.4))


def test_scale(model):
    ids = ids_of(model, TEXTS[1])
    ref_i, _ = plain_reads(model, ids)
    slot = int(ref_i[0, 0, 0])
    plain = logits(model, ids)
    with steered(model, scale={slot: 1.0}):
        assert torch.equal(logits(model, ids), plain)
    with steered(model):
        assert torch.equal(logits(model, ids), plain)
    with steered(model, scale={slot: 0.0}):
        zero_scaled = logits(model, ids)
    with steered(model, zero=[slot]):
        assert torch.equal(logits(model, ids), zero_scaled)
    assert not torch.allclose(zero_scaled, plain)
    x, _ = layer_io(model, ids)
    expected = by_hand(model.memory_layers[1], x, lambda idx, w: (idx, torch.where(idx == slot, 2 * w, w)))
    with steered(model, scale={slot: 2.0}):
        _, got = layer_io(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_hooks_removed_also_after_an_exception(model):
    ids = ids_of(model, TEXTS[0])
    plain = logits(model, ids)
    memory = model.memory_layers[1]
    with steered(model, zero=[1], force=[2], scale={3: 2.0}) as plan:
        assert len(memory._access_hooks) == 1 and list(plan) == [1]
    assert not memory._access_hooks
    with pytest.raises(RuntimeError, match="boom"), steered(model, force=[5]):
        raise RuntimeError("boom")
    assert not memory._access_hooks
    assert torch.equal(logits(model, ids), plain)


def test_bad_input(model):
    for kw in ({"zero": [256]}, {"force": [-1]}, {"scale": {999: 2.0}}):
        with pytest.raises(ConfigError, match="out of range"), steered(model, **kw):
            pass
    for fw in (0, 1.5, float("nan"), -0.1):
        with pytest.raises(ConfigError, match="force_weight"), steered(model, force=[1], force_weight=fw):
            pass
    with pytest.raises(ConfigError, match="weigh more than 1"), steered(model, force=[1, 2, 3], force_weight=0.5):
        pass
    with pytest.raises(ConfigError, match="top-4"), steered(model, force=[1, 2, 3, 4, 5], force_weight=0.1):
        pass
    with pytest.raises(ConfigError, match="both zeroed"), steered(model, zero=[1], force=[1]):
        pass
    for bad in ({1: float("inf")}, {1: "x"}):
        with pytest.raises(ConfigError, match="finite factor"), steered(model, scale=bad):
            pass
    assert not model.memory_layers[1]._access_hooks
    for kw in ({"zero": [1]}, {"force": [1]}, {"scale": {1: 2.0}}):
        with torch.enable_grad(), steered(model, **kw), pytest.raises(SmvizError, match="no_grad"):
            model(input_ids=torch.tensor([[1, 2, 3]]))


# --------------------------------------------------------------------------- generation and effects


def greedy_by_hand(model, ids, n):
    """Greedy decoding without a KV cache: argmax of a full forward pass per step, up to eos."""
    out = list(ids)
    for _ in range(n):
        nxt = int(logits(model, out)[0, -1].argmax())
        if nxt == model.tokenizer.eos_token_id:
            break
        out.append(nxt)
    return out[len(ids):]


def test_steer_generate(model):
    ids = ids_of(model, qa_prompt(QUESTION))
    ref_i, _ = plain_reads(model, ids)
    slot = int(ref_i[-1, 0, 0])
    res = steer_generate(model, QUESTION, force=[slot], force_weight=0.9, answer=ANSWER, max_new_tokens=6, question=True)
    before = greedy_by_hand(model, ids, 6)
    assert res["tokens_before"] == before and res["text_before"] == model.tokenizer.decode(before)
    assert res["prompt"] == qa_prompt(QUESTION)
    assert res["logprob_before"] == pytest.approx(answer_logprob(model, QUESTION, ANSWER), rel=1e-9)
    with steered(model, force=[slot], force_weight=0.9):
        after = greedy_by_hand(model, ids, 6)
        lp_after = answer_logprob(model, QUESTION, ANSWER)
    assert res["tokens_after"] == after and res["changed"] == (after != before)
    assert res["logprob_after"] == pytest.approx(lp_after, rel=1e-9)
    assert res["delta_logprob"] == pytest.approx(lp_after - res["logprob_before"], rel=1e-9)
    same = steer_generate(model, TEXTS[0][:20], max_new_tokens=4)
    assert same["text_before"] == same["text_after"] and same["logprob_before"] is None
    with pytest.raises(AnalysisError, match="empty"):
        steer_generate(model, "", force=[1])
    with pytest.raises(ConfigError, match="out of range"):
        steer_generate(model, "Ada", zero=[300])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        steer_generate(model, "Ada", max_new_tokens=0)


def test_ablation_effects_against_direct_log_softmax(model):
    with torch.no_grad(), AccessRecorder(model) as rec:
        for text in TEXTS:
            model(input_ids=torch.tensor([ids_of(model, text)]))
    index = rec.trace().slot_index()
    counts = np.bincount(index.trace.accesses.column("slot").to_numpy(), minlength=256)
    slot = int(counts.argmax())
    df = ablation_effects(model, index, slot, n=6)
    contexts = index.contexts(slot, n=6)
    assert list(df.columns) == ["row", "token", "next_token", "logprob_before", "logprob_after", "delta"]
    assert list(df["row"]) == list(contexts["row"])
    for r, (doc, pos) in enumerate(zip(contexts["doc"], contexts["position"])):
        ids = ids_of(model, TEXTS[doc])
        assert df["token"][r] == model.tokenizer.decode([ids[pos]])
        if pos + 1 == len(ids):  # the document's last token has no next token
            assert pd.isna(df["next_token"][r]) and np.isnan(df["delta"][r])
            continue
        before = torch.log_softmax(logits(model, ids[: pos + 1])[0, -1].double(), -1)[ids[pos + 1]].item()
        with ablated(model, [slot], renormalise=True):
            after = torch.log_softmax(logits(model, ids[: pos + 1])[0, -1].double(), -1)[ids[pos + 1]].item()
        assert df["next_token"][r] == model.tokenizer.decode([ids[pos + 1]])
        assert df["logprob_before"][r] == pytest.approx(before, abs=1e-5)
        assert df["logprob_after"][r] == pytest.approx(after, abs=1e-5)
        assert df["delta"][r] == pytest.approx(after - before, abs=1e-5)
    assert (df["delta"].dropna().abs() > 0).any()
    # the same contexts given as (token ids, position) pairs
    pairs = [(ids_of(model, TEXTS[d]), int(p)) for d, p in zip(contexts["doc"], contexts["position"])]
    again = ablation_effects(model, pairs, slot)
    np.testing.assert_allclose(again["delta"], df["delta"], atol=1e-6)
    with pytest.raises(AnalysisError, match="position"):
        ablation_effects(model, [([1, 2, 3], 3)], slot)
    with pytest.raises(ConfigError, match="out of range"):
        ablation_effects(model, index, 256)
