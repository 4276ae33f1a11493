"""Vocabulary projection against a direct manual computation for one slot: the gate averaged by hand
over the tokens that read the slot (their memory inputs captured by a hook on the block's FFN slot,
their reads by an access hook of our own; documents of unequal length, batched with padding, give the
gate each document gives alone), then W2, the final norm and the unembedding; the gate of
ones without a trace; GPT-2's final norm; and clear errors for bad slot ids, a never-read slot and
a trace of another memory config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smviz.analysis.vocab import promoted_tokens, slot_gate
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import ConfigError, TraceError
from smviz.model import MemoryModel
from smviz.record import AccessRecorder

TEXTS = ["Ada Number0 was born in Paris.", "The birthplace of Ada Number1 is Lima.", "Where was Ada Number2 born? Oslo"]


@pytest.fixture(scope="module")
def model():
    tokenizer = train_tokenizer(TEXTS * 3, vocab_size=300)
    m = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    m.tokenizer = tokenizer
    return m.eval()


def batch(model):
    ids = [model.tokenizer(t)["input_ids"] for t in TEXTS]
    n = min(map(len, ids))
    return torch.tensor([i[:n] for i in ids])  # equal lengths: no padding


def test_projection_with_recorded_contexts_by_hand(model):
    ids = batch(model)
    memory = model.memory_layers[1]
    reads, inputs = [], []
    h1 = memory.add_access_hook(lambda _l, i, w, m: reads.append(i.clone()))
    h2 = model.lm.model.layers[1].mlp.register_forward_hook(lambda _m, args, _o: inputs.append(args[0].clone()))
    with torch.no_grad(), AccessRecorder(model) as rec:
        model(input_ids=ids)
    h1.remove()
    h2.remove()
    trace = rec.trace()
    idx, x = reads[0], inputs[0]  # (B, T, H, K), (B, T, dim)
    counts = torch.bincount(idx.flatten(), minlength=256)
    slot = int(counts.argmax())
    readers = (idx == slot).any(-1).any(-1)  # (B, T): tokens that read the slot in some head
    with torch.no_grad():
        gate = F.silu(memory.w1(x[readers])).double().mean(0)
        y = (memory.value_table.weight[slot].double() * gate).float()
        ref = model.lm.lm_head(model.lm.model.norm(y @ memory.w2.weight.T)).double()
    df = promoted_tokens(model, slot, trace=trace, k=5)
    assert df.attrs["gate"] == "contexts" and df.attrs["n_contexts"] == int(readers.sum())
    top = df[df["direction"] == "promoted"]
    low = df[df["direction"] == "suppressed"]
    assert list(top["token_id"]) == ref.topk(5).indices.tolist()
    assert list(low["token_id"]) == ref.topk(5, largest=False).indices.tolist()
    torch.testing.assert_close(torch.tensor(top["logit"].to_numpy()), ref.topk(5).values, rtol=1e-5, atol=1e-5)
    assert list(top["rank"]) == list(range(5))
    assert top.iloc[0]["token"] == model.tokenizer.decode([top.iloc[0]["token_id"]])


@pytest.mark.parametrize("batch_tokens", [1, 64, 8192])  # one document per forward, a few, all at once
def test_gate_of_unequal_documents_is_each_documents_own(model, batch_tokens):
    memory = model.memory_layers[1]
    docs = [torch.tensor([model.tokenizer(t * n)["input_ids"]]) for n, t in zip((1, 3, 2), TEXTS)]
    assert len({d.shape[1] for d in docs}) == 3
    reads, inputs = [], []
    h1 = memory.add_access_hook(lambda _l, i, w, m: reads.append(i.clone()))
    h2 = model.lm.model.layers[1].mlp.register_forward_hook(lambda _m, args, _o: inputs.append(args[0].clone()))
    with torch.no_grad(), AccessRecorder(model) as rec:
        for d in docs:  # each document alone: the reference inputs
            model(input_ids=d)
    h1.remove()
    h2.remove()
    idx = torch.cat([r.flatten(0, 1) for r in reads])  # (tokens, H, K)
    x = torch.cat([i.flatten(0, 1) for i in inputs])
    slot = int(torch.bincount(idx.flatten(), minlength=256).argmax())
    readers = (idx == slot).any(-1).any(-1)
    with torch.no_grad():
        want = F.silu(memory.w1(x[readers])).double().mean(0)
    gate, n = slot_gate(model, slot, trace=rec.trace(), batch_tokens=batch_tokens)
    assert n == int(readers.sum()) and n > len(docs)
    torch.testing.assert_close(gate, want, rtol=1e-5, atol=1e-6)


def test_gate_of_ones_without_trace(model):
    memory = model.memory_layers[1]
    slot = 17
    with torch.no_grad():
        ref = model.lm.lm_head(model.lm.model.norm(memory.value_table.weight[slot] @ memory.w2.weight.T))
    df = promoted_tokens(model, slot, k=3)
    assert df.attrs["gate"] == "ones" and df.attrs["n_contexts"] == 0
    assert list(df[df["direction"] == "promoted"]["token_id"]) == ref.topk(3).indices.tolist()


def test_gpt2_final_norm_and_no_swilu():
    m = MemoryModel.from_preset("micro-gpt2", seed=0, swilu=False)
    memory = m.memory_layers[1]
    with torch.no_grad():
        torch.nn.init.normal_(memory.w2.weight)  # parallel-mode presets start at zero; give it a direction
        ref = m.lm.lm_head(m.lm.transformer.ln_f(memory.value_table.weight[5] @ memory.w2.weight.T))
    df = promoted_tokens(m, 5, k=4)
    assert df.attrs["gate"] == "none"
    assert list(df[df["direction"] == "promoted"]["token_id"]) == ref.topk(4).indices.tolist()
    assert df["token"].eq("").all()  # no tokenizer


def test_bad_input(model):
    with pytest.raises(ConfigError, match="out of range"):
        promoted_tokens(model, 256)
    with pytest.raises(ConfigError, match="out of range"):
        promoted_tokens(model, -3)
    with pytest.raises(ConfigError, match="no memory layer"):
        promoted_tokens(model, 3, layer=0)
    ids = batch(model)
    with torch.no_grad(), AccessRecorder(model) as rec:
        model(input_ids=ids)
    trace = rec.trace()
    never = int(torch.nonzero(torch.from_numpy(trace.slot_counts()) == 0)[0])
    with pytest.raises(TraceError, match="never read"):
        promoted_tokens(model, never, trace=trace)
    other = MemoryModel.from_preset("micro", seed=0, vocab_size=len(model.tokenizer), knn=2)
    other.tokenizer = model.tokenizer
    with pytest.raises(TraceError, match="memory config"):
        promoted_tokens(other, 3, trace=trace)
