"""Tests of smviz.model: attaching memory layers to HF causal LMs, the memory switch, optimizer groups,
parameter counts, the padding mask passed to access hooks, the balance loss, and the verified on-disk format.

Every expectation is computed here independently of smviz (plain HF models, hashlib, hand-built
reference modules); only micro-size models are built.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import pickle
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

from smviz.errors import ConfigError, ModelFileError, SmvizError, WriteError
from smviz.memory import MemoryConfig, ProductKeyMemory
from smviz.model import PRESETS, Architecture, MemoryFFN, MemoryModel, register_architecture, registry, resolve_layer

VOCAB = 96


# --------------------------------------------------------------------------- helpers


def tiny_llama(seed: int = 0, *, layers: int = 2, tie: bool = True) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def blocks_of(lm: nn.Module) -> nn.ModuleList:
    return lm.model.layers if isinstance(lm, transformers.LlamaForCausalLM) else lm.transformer.h


def mem_cfg(**kw) -> MemoryConfig:
    base = dict(n_keys=8, heads=2, knn=4, k_dim=16, layers=(1,))
    base.update(kw)
    return MemoryConfig(**base)


def token_ids(batch: int = 2, length: int = 7, vocab: int = VOCAB, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def logits_of(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def snapshot(directory) -> dict[str, bytes]:
    """name → bytes of every file under `directory` (recursively), to prove a refusal changed nothing."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.05, seed: int = 7) -> None:
    """Add noise to every parameter (so a loaded model can't match a fresh init by accident, and so
    parallel-mode W2 is non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


class Zeros(nn.Module):
    """Reference FFN that removes the FFN term: outputs zeros of the input's shape."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


class FFNPlusMemory(nn.Module):
    """Reference for a parallel-mode FFN slot, written independently of MemoryFFN."""

    def __init__(self, ffn: nn.Module, memory: nn.Module) -> None:
        super().__init__()
        self.ffn, self.memory = ffn, memory

    def forward(self, x, *args, **kwargs):
        return self.ffn(x) + self.memory(x)


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


# --------------------------------------------------------------------------- 1. parallel attach


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parallel_attach_leaves_logits_unchanged(arch):
    original = BUILDERS[arch]()
    ids = token_ids()
    ref = logits_of(original, ids)

    model = MemoryModel(copy.deepcopy(original), mem_cfg(mode="parallel", layers=(0, 1))).eval()
    blocks = blocks_of(model.lm)
    for i in (0, 1):
        assert isinstance(blocks[i].mlp, MemoryFFN)
        assert blocks[i].mlp.ffn is not None
    calls = []
    for m in model.memory_layers.values():
        m.add_access_hook(lambda layer, idx, w, mask: calls.append(idx.shape))

    assert torch.equal(logits_of(model, ids), ref)
    # The memory really ran (both layers read slots) ...
    assert calls == [(2, 7, 2, 4), (2, 7, 2, 4)]
    # ... and its output is what keeps logits identical: once W2 is non-zero they differ.
    with torch.no_grad():
        model.memory_layers[1].w2.weight.normal_()
    assert not torch.allclose(logits_of(model, ids), ref)


# --------------------------------------------------------------------------- 2. replace attach


def test_replace_attach_removes_the_ffn():
    original = tiny_llama()
    model = MemoryModel(copy.deepcopy(original), mem_cfg(mode="replace", layers=(1,))).eval()

    slot = model.lm.model.layers[1].mlp
    assert isinstance(slot, MemoryFFN)
    assert slot.ffn is None
    assert isinstance(slot.memory, ProductKeyMemory)
    assert slot.memory is model.memory_layers[1]
    assert isinstance(model.lm.model.layers[0].mlp, transformers.models.llama.modeling_llama.LlamaMLP)

    sd = model.lm.state_dict()
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.1.mlp.{name}.weight" not in sd
        assert f"model.layers.0.mlp.{name}.weight" in sd
    assert not any(k.startswith("model.layers.1.mlp.") and ".memory." not in k for k in sd)
    assert "model.layers.1.mlp.memory.values.weight" in sd
    mlp_params = sum(p.numel() for p in original.model.layers[1].mlp.parameters())
    mem_params = sum(p.numel() for p in slot.memory.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in original.parameters()) - mlp_params + mem_params

    # The block's FFN output is now exactly the memory layer's output: compare with a reference model
    # whose block-1 mlp is (a copy of) the memory module itself.
    ref = copy.deepcopy(original)
    ref.model.layers[1].mlp = copy.deepcopy(slot.memory)
    ids = token_ids()
    assert torch.equal(logits_of(model, ids), logits_of(ref, ids))
    assert not torch.allclose(logits_of(model, ids), logits_of(original, ids))


# --------------------------------------------------------------------------- 3. memory_off


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_off_parallel_equals_original_model(arch):
    original = BUILDERS[arch]()
    ids = token_ids()
    ref = logits_of(original, ids)
    model = MemoryModel(copy.deepcopy(original), mem_cfg(mode="parallel", layers=(0, 1))).eval()
    with torch.no_grad():
        for m in model.memory_layers.values():
            m.w2.weight.normal_(std=0.5)
    on = logits_of(model, ids)
    assert not torch.allclose(on, ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with model.memory_off():
        assert torch.equal(logits_of(model, ids), ref)
    assert torch.equal(logits_of(model, ids), on)
    state_equal(before, model.state_dict())


def test_memory_off_single_layer_parallel():
    original = tiny_llama()
    ids = token_ids()
    model = MemoryModel(copy.deepcopy(original), mem_cfg(mode="parallel", layers=(0, 1))).eval()
    with torch.no_grad():
        for m in model.memory_layers.values():
            m.w2.weight.normal_(std=0.5)
    on = logits_of(model, ids)

    for off, keep in ((0, 1), (1, 0)):
        # Reference: the block whose memory is off gets back its plain FFN; the other keeps FFN + memory.
        ref = copy.deepcopy(original)
        ref.model.layers[keep].mlp = FFNPlusMemory(
            copy.deepcopy(original.model.layers[keep].mlp), copy.deepcopy(model.memory_layers[keep])
        )
        expected = logits_of(ref, ids)
        assert not torch.allclose(expected, on) and not torch.allclose(expected, logits_of(original, ids))
        with model.memory_off(layers=[off]):
            assert torch.equal(logits_of(model, ids), expected)
        assert torch.equal(logits_of(model, ids), on)


def test_memory_off_replace_equals_zero_ffn_reference():
    original = tiny_llama()
    ids = token_ids()
    model = MemoryModel(copy.deepcopy(original), mem_cfg(mode="replace", layers=(1,))).eval()
    ref = copy.deepcopy(original)
    ref.model.layers[1].mlp = Zeros()
    expected = logits_of(ref, ids)
    on = logits_of(model, ids)
    assert not torch.allclose(on, expected)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with model.memory_off():
        assert torch.equal(logits_of(model, ids), expected)
    assert torch.equal(logits_of(model, ids), on)

    with model.memory_off(layers=[1]):
        assert torch.equal(logits_of(model, ids), expected)
    assert torch.equal(logits_of(model, ids), on)
    state_equal(before, model.state_dict())


def test_memory_off_restores_on_exception(micro_model):
    micro_model.eval()
    ids = token_ids(vocab=512)
    on = logits_of(micro_model, ids)
    with pytest.raises(KeyboardInterrupt):
        with micro_model.memory_off():
            raise KeyboardInterrupt
    assert torch.equal(logits_of(micro_model, ids), on)


def test_memory_off_in_training_adds_no_stale_balance_loss():
    model = MemoryModel(tiny_llama(), mem_cfg(layers=(1,), balance_weight=0.5)).train()
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()  # a normal training step sets aux_loss
    with model.memory_off():
        out = model(input_ids=ids, labels=ids)
        with torch.no_grad():
            plain = model.lm(input_ids=ids, labels=ids).loss
    assert "memory_aux_loss" not in out
    assert torch.equal(out.loss.detach(), plain)
    out.loss.backward()  # must not reach into the previous step's freed graph


# --------------------------------------------------------------------------- 4. save / load


def _build_for_save(kind: str) -> MemoryModel:
    if kind == "micro":
        model = MemoryModel.from_preset("micro", seed=0)
    elif kind == "micro-gpt2":
        model = MemoryModel.from_preset("micro-gpt2", seed=0)
    elif kind == "shared":
        model = MemoryModel(
            tiny_llama(),
            mem_cfg(layers=(0, 1), share_values=True, mode="parallel", query_norm="batchnorm", qk_norm=True, v_dim=24),
        )
        model.train()
        with torch.no_grad():
            model(input_ids=token_ids())  # moves the batchnorm running statistics off their init
    else:
        raise AssertionError(kind)
    perturb(model)
    return model.eval()


def _tied(model: MemoryModel) -> bool:
    return model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight


@pytest.mark.parametrize("kind", ["micro", "micro-gpt2", "shared"])
def test_save_load_bit_exact(tmp_path, kind):
    model = _build_for_save(kind)
    ids = token_ids(vocab=model.config.vocab_size)
    logits = logits_of(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    h = model.save_pretrained(tmp_path / "m")
    assert model.model_hash == h
    state_equal(before, model.state_dict())  # saving changes nothing

    d = tmp_path / "m"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["config.json", "model.safetensors", "memory.json", "manifest.json"]
    )
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "memory.json"}
    for name, digest in manifest["files"].items():
        assert digest == hashlib.sha256((d / name).read_bytes()).hexdigest()
    listing = "".join(f"{n} {manifest['files'][n]}\n" for n in sorted(manifest["files"]))
    assert h == hashlib.sha256(listing.encode()).hexdigest()[:16]
    assert json.loads((d / "memory.json").read_text())["memory"]["layers"] == list(model.memory_config.layers)

    loaded = MemoryModel.from_pretrained(d)
    assert not loaded.training
    assert loaded.model_hash == h
    assert loaded.memory_config == model.memory_config
    state_equal(model.state_dict(), loaded.state_dict())
    assert torch.equal(logits_of(loaded, ids), logits)

    # tied embeddings survive as one tensor; a shared value table is still one table
    assert _tied(loaded) == _tied(model)
    if kind == "micro":
        assert _tied(loaded)
    if kind == "shared":
        assert loaded.memory_layers[0].value_table is loaded.memory_layers[1].value_table
        assert loaded.values[0] is loaded.values[1]
        assert sum(k.endswith("values.weight") for k in loaded.state_dict()) == 1

    # the loaded weights are what was saved: the safetensors file reads back as the model's state
    on_disk = safetensors.torch.load_file(d / "model.safetensors")
    lm_state = loaded.lm.state_dict()
    for k, v in on_disk.items():
        assert torch.equal(lm_state[k], v), k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_hash_stable_across_saves_untied(tmp_path, arch):
    if arch == "llama":
        lm = tiny_llama(tie=False)
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False
        )
        torch.manual_seed(0)
        lm = transformers.GPT2LMHeadModel(config)
    model = MemoryModel(lm, mem_cfg(layers=(0, 1), share_values=True)).eval()
    perturb(model)
    h = model.save_pretrained(tmp_path / "a")
    assert model.save_pretrained(tmp_path / "b") == h
    for name in ("config.json", "model.safetensors", "memory.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    loaded = MemoryModel.from_pretrained(tmp_path / "a")
    assert loaded.model_hash == h
    assert loaded.save_pretrained(tmp_path / "resaved") == h  # load -> save round-trips the hash


def test_model_hash_stable_across_saves_tied(tmp_path, micro_model):
    assert _tied(micro_model)
    hashes = {micro_model.save_pretrained(tmp_path / f"s{i}") for i in range(20)}
    assert len(hashes) == 1


def test_save_load_with_tokenizer(tmp_path, micro_model):
    tok = make_tokenizer()
    text = "the cat sat on the zebra mat"
    expected = [2, 3, 4, 5, 2, 0, 6]
    assert tok(text)["input_ids"] == expected  # sanity of the hand-built tokenizer
    micro_model.tokenizer = tok
    h = micro_model.save_pretrained(tmp_path / "m")

    d = tmp_path / "m"
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "memory.json", "manifest.json", "tokenizer_config.json"} <= names
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert digest == hashlib.sha256((d / name).read_bytes()).hexdigest()

    loaded = MemoryModel.from_pretrained(d)
    assert loaded.model_hash == h
    assert loaded.tokenizer is not None
    assert loaded.tokenizer(text)["input_ids"] == expected
    assert loaded.tokenizer.pad_token == "[PAD]" and loaded.tokenizer.unk_token == "[UNK]"


def test_resaving_loaded_model_with_tokenizer_keeps_hash(tmp_path):
    model = MemoryModel(tiny_llama(tie=False), mem_cfg(), tokenizer=make_tokenizer())  # untied: see above
    h = model.save_pretrained(tmp_path / "m")
    assert model.save_pretrained(tmp_path / "again") == h  # deterministic before the round trip
    loaded = MemoryModel.from_pretrained(tmp_path / "m")
    assert loaded.save_pretrained(tmp_path / "resaved") == h


def test_model_hash_changes_with_weights(tmp_path, micro_model):
    h1 = micro_model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        micro_model.values[1][0, 0] += 1.0
    h2 = micro_model.save_pretrained(tmp_path / "b")
    assert h1 != h2


# --------------------------------------------------------------------------- 5. refusals


@pytest.fixture
def saved_dir(tmp_path, micro_model):
    d = tmp_path / "model"
    micro_model.save_pretrained(d)
    return d


def _refused(directory, match: str | None = None):
    before = snapshot(directory) if directory.exists() else None
    with pytest.raises(ModelFileError, match=match):
        MemoryModel.from_pretrained(directory)
    if before is not None:
        assert snapshot(directory) == before  # a refused load changes nothing


def test_load_refuses_missing_file(saved_dir):
    (saved_dir / "memory.json").unlink()
    _refused(saved_dir, "memory.json")


def test_load_refuses_altered_file(saved_dir):
    path = saved_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(saved_dir, "(?i)altered|sha256")


def test_load_refuses_missing_manifest(saved_dir):
    (saved_dir / "manifest.json").unlink()
    _refused(saved_dir, "manifest.json")


def test_load_refuses_damaged_manifest(saved_dir):
    manifest = saved_dir / "manifest.json"
    files = json.loads(manifest.read_text())["files"]
    del files["memory.json"]  # a manifest that no longer lists a required file
    manifest.write_text(json.dumps({"format": "smviz-model/1", "files": files}))
    _refused(saved_dir, "memory.json")
    manifest.write_text("{not json")
    _refused(saved_dir)


def test_load_refuses_nonexistent_dir(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        MemoryModel.from_pretrained(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_model_file_error_is_an_smviz_error():
    assert issubclass(ModelFileError, SmvizError)
    assert issubclass(ConfigError, SmvizError) and issubclass(ConfigError, ValueError)


def test_save_refuses_non_model_directory(tmp_path, micro_model):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "notes.txt").write_text("do not delete")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(d)
    with pytest.raises(ModelFileError, match="not an smviz model directory"):
        micro_model.save_pretrained(d)
    assert snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no temp dir left behind
    assert micro_model.model_hash is None


def test_resave_replaces_model_dir_atomically(tmp_path, micro_model):
    d = tmp_path / "m"
    micro_model.tokenizer = make_tokenizer()
    micro_model.save_pretrained(d)
    assert (d / "tokenizer_config.json").exists()

    other = MemoryModel.from_preset("micro", seed=1).eval()  # different weights, no tokenizer
    h = other.save_pretrained(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .tmp / .old dirs left
    # replaced, not merged: the first model's tokenizer files are gone
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["config.json", "model.safetensors", "memory.json", "manifest.json"]
    )
    loaded = MemoryModel.from_pretrained(d)
    assert loaded.model_hash == h and loaded.tokenizer is None
    state_equal(other.state_dict(), loaded.state_dict())


def test_failed_save_leaves_existing_model_intact(tmp_path, micro_model, monkeypatch):
    d = tmp_path / "m"
    h = micro_model.save_pretrained(d)
    before = snapshot(d)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    other = MemoryModel.from_preset("micro", seed=1)
    with pytest.raises(WriteError, match="disk full"):
        other.save_pretrained(d)
    assert snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert other.model_hash is None
    monkeypatch.undo()
    assert MemoryModel.from_pretrained(d).model_hash == h


# --------------------------------------------------------------------------- 6. bad configs


def test_unknown_preset():
    with pytest.raises(ConfigError, match="micro"):
        MemoryModel.from_preset("no-such-preset")


def test_unknown_memory_override():
    with pytest.raises(ConfigError, match="not_a_field"):
        MemoryModel.from_preset("micro", not_a_field=3)


def test_knn_larger_than_n_keys():
    with pytest.raises(ConfigError, match="knn"):
        MemoryModel.from_preset("micro", knn=17)  # micro has n_keys=16
    with pytest.raises(ConfigError, match="knn"):
        MemoryConfig(n_keys=4, knn=5, k_dim=8, layers=(0,))
    MemoryConfig(n_keys=4, knn=4, k_dim=8, layers=(0,))  # the boundary is allowed


def test_unsupported_architecture_mentions_register_architecture():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, is_decoder=True,
    )
    torch.manual_seed(0)
    lm = transformers.BertLMHeadModel(config)
    keys = list(lm.state_dict())
    with pytest.raises(ConfigError, match="register_architecture") as err:
        MemoryModel(lm, mem_cfg())
    assert "bert" in str(err.value)
    assert list(lm.state_dict()) == keys  # nothing was attached


@pytest.mark.parametrize("layers", [(5,), (2,), (0, 2)])
def test_layer_index_out_of_range(layers):
    lm = tiny_llama()
    types = [type(b.mlp) for b in lm.model.layers]
    with pytest.raises(ConfigError, match="out of range"):
        MemoryModel(lm, mem_cfg(layers=layers))
    assert [type(b.mlp) for b in lm.model.layers] == types  # nothing attached before refusing
    with pytest.raises(ConfigError):
        MemoryModel.from_preset("micro", layers=layers)


def test_empty_layers_make_a_dense_model_that_is_the_lm():
    lm = tiny_llama()
    ids = torch.randint(0, lm.config.vocab_size, (2, 7))
    with torch.no_grad():
        reference = lm(input_ids=ids).logits
    dense = MemoryModel(lm, mem_cfg(layers=()))
    assert not dense.memory_layers and dense.values == {}
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids).logits, reference)
        with dense.memory_off():  # nothing to turn off
            assert torch.equal(dense(input_ids=ids).logits, reference)
    with pytest.raises(ConfigError, match="no memory layers \\(a dense model\\), and slot statistics needs one"):
        dense.require_memory("slot statistics")


def test_tiny_preset_declared_shape():
    p = PRESETS["tiny"]
    assert p.model_type == "llama"
    m = p.memory
    assert m.n_slots == 65_536 and m.n_keys**2 == 65_536
    assert m.heads == 4 and m.knn == 32
    assert m.mode == "replace"
    n_blocks = p.hf["num_hidden_layers"]
    assert len(m.layers) == 1 and 0 < m.layers[0] < n_blocks - 1  # a middle block


def test_register_architecture_makes_new_type_attachable(monkeypatch):
    monkeypatch.setattr(registry, "ARCHITECTURES", dict(registry.ARCHITECTURES))
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    original = transformers.GPTNeoXForCausalLM(config).eval()
    assert original.config.model_type not in registry.ARCHITECTURES
    with pytest.raises(ConfigError, match="register_architecture"):
        MemoryModel(copy.deepcopy(original), mem_cfg())

    register_architecture(original.config.model_type, Architecture(blocks="gpt_neox.layers", ffn="mlp"))
    ids = token_ids()
    ref = logits_of(original, ids)
    model = MemoryModel(copy.deepcopy(original), mem_cfg(mode="parallel", layers=(0, 1))).eval()
    assert all(isinstance(b.mlp, MemoryFFN) for b in model.lm.gpt_neox.layers)
    assert torch.equal(logits_of(model, ids), ref)

    replaced = MemoryModel(copy.deepcopy(original), mem_cfg(mode="replace", layers=(1,))).eval()
    assert replaced.lm.gpt_neox.layers[1].mlp.ffn is None
    assert logits_of(replaced, ids).shape == ref.shape


def test_register_architecture_custom_paths_are_used(monkeypatch):
    """Registering llama with a wrong FFN attribute must make attaching fail: the registry is consulted."""
    without_llama = {k: v for k, v in registry.ARCHITECTURES.items() if k != "llama"}
    monkeypatch.setattr(registry, "ARCHITECTURES", dict(without_llama))
    register_architecture("llama", Architecture(blocks="model.layers", ffn="no_such_ffn"))
    with pytest.raises(AttributeError):
        MemoryModel(tiny_llama(), mem_cfg())
    # and a custom hidden-size attribute is read from the HF config
    monkeypatch.setattr(registry, "ARCHITECTURES", dict(without_llama))
    register_architecture("llama", Architecture(blocks="model.layers", ffn="mlp", hidden_size="intermediate_size"))
    with pytest.raises(RuntimeError):  # the memory now expects width 64 on a width-32 stream
        MemoryModel(tiny_llama(), mem_cfg())(input_ids=token_ids())


# --------------------------------------------------------------------------- 7. training step + generate


@pytest.mark.parametrize("name", ["micro", "micro-gpt2"])
def test_one_adamw_step_changes_parameters(name):
    model = MemoryModel.from_preset(name, seed=0).train()
    ids = token_ids(vocab=512)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.param_groups(1e-2))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    graded = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    changed = 0
    for n, p in model.named_parameters():
        moved = p.detach() != before[n]
        g = graded.get(n)
        if g is not None:
            # every element with a non-zero gradient moved (Adam's first step is ~lr·sign(g))
            assert moved[g != 0].all(), n
        changed += int(moved.any())
    assert changed > 0
    memory_names = [n for n in graded if ".memory." in n]
    assert any(n.endswith("values.weight") for n in memory_names)
    assert any(n.endswith(".keys") for n in memory_names)


@pytest.mark.parametrize("name", ["micro", "micro-gpt2"])
def test_sgd_step_touches_only_accessed_value_rows(name):
    model = MemoryModel.from_preset(name, seed=0).train()
    ids = token_ids(vocab=512)
    accessed = []
    model.memory_layers[1].add_access_hook(lambda layer, idx, w, mask: accessed.append(idx.detach()))
    values = model.values[1]
    before = values.detach().clone()
    opt = torch.optim.SGD(model.param_groups(1.0), lr=1.0, momentum=0.0, weight_decay=0.0)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    (idx,) = accessed  # (B, T, H, K)
    n = values.shape[0]
    # Block 1 is the last block: the memory read at the last position only feeds logits[:, -1], which
    # the shifted LM loss never uses. Rows read at earlier positions get gradient; no other row does.
    in_loss = torch.zeros(n, dtype=torch.bool)
    in_loss[idx[:, :-1].flatten()] = True
    read = in_loss.clone()
    read[idx.flatten()] = True
    assert 0 < in_loss.sum() and read.sum() < n
    row_changed = (values.detach() != before).any(dim=1)
    assert row_changed[in_loss].all()
    assert torch.equal(values.detach()[~in_loss], before[~in_loss])


@pytest.mark.parametrize("name", ["micro", "micro-gpt2"])
def test_generate_shape(name):
    model = MemoryModel.from_preset(name, seed=0).eval()
    ids = token_ids(batch=3, length=4, vocab=512)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
        do_sample=False, pad_token_id=0,
    )
    assert out.shape == (3, 4 + 5)
    assert torch.equal(out[:, :4], ids)
    assert ((out >= 0) & (out < 512)).all()


# --------------------------------------------------------------------------- 8. param_groups


def _expected_group(name: str, p: torch.Tensor) -> str:
    if name.endswith(".memory.values.weight"):
        return "values"
    if any(f".memory.{part}" in name for part in ("keys", "query.", "query_norm.", "query_gain")):
        return "keys"
    if ".memory.w1." in name or ".memory.w2." in name:
        return "memory_out"
    return "dense"


def _expected_group_name(name: str, p: torch.Tensor) -> str:
    group = _expected_group(name, p)
    return group if p.dim() >= 2 else f"{group}_no_decay"


@pytest.mark.parametrize("shared", [False, True])
def test_param_groups_membership_and_lr(shared):
    cfg = mem_cfg(layers=(0, 1), share_values=shared, value_lr_mult=10.0, key_lr_mult=0.5, qk_norm=True)
    model = MemoryModel(tiny_llama(), cfg)
    lr, wd = 1e-3, 0.1
    groups = model.param_groups(lr, weight_decay=wd)
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["dense", "dense_no_decay", "keys", "keys_no_decay", "memory_out", "memory_out_no_decay", "values"]
    assert math.isclose(by_name["values"]["lr"], lr * 10.0)
    assert math.isclose(by_name["keys"]["lr"], lr * 0.5)
    assert by_name["dense"]["lr"] == lr and by_name["dense_no_decay"]["lr"] == lr
    assert by_name["dense"]["weight_decay"] == wd and by_name["dense_no_decay"]["weight_decay"] == 0.0

    counts = Counter(id(p) for g in groups for p in g["params"])
    assert all(c == 1 for c in counts.values())  # no parameter twice
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(counts) == trainable

    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert group_of[id(p)] == _expected_group_name(n, p), n
    assert len(by_name["values"]["params"]) == (1 if shared else 2)
    torch.optim.AdamW(groups)  # a valid optimizer spec (would raise on a duplicate parameter)


def test_param_groups_key_lr_zero_freezes_keys():
    model = MemoryModel(tiny_llama(), mem_cfg(layers=(0, 1), key_lr_mult=0.0, query_norm="layernorm"))
    groups = model.param_groups(1e-3)
    assert not {"keys", "keys_no_decay"} & {g["name"] for g in groups}
    in_groups = {id(p) for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        if _expected_group(n, p) == "keys":
            assert not p.requires_grad, n
            assert id(p) not in in_groups, n
        else:
            assert p.requires_grad, n
            assert id(p) in in_groups, n
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    for i in (0, 1):
        for part in ("keys", "query.weight", "query.bias", "query_norm.weight", "query_norm.bias"):
            assert f"model.layers.{i}.mlp.memory.{part}" in {n.removeprefix("lm.") for n in frozen}
    ids = token_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.memory_layers[0].keys.grad is None and model.memory_layers[0].query.weight.grad is None
    assert model.values[0].grad is not None


def test_param_groups_value_lr_zero_freezes_values():
    model = MemoryModel(tiny_llama(), mem_cfg(layers=(1,), value_lr_mult=0.0))
    groups = model.param_groups(1e-3)
    assert sorted(g["name"] for g in groups) == ["dense", "dense_no_decay", "keys", "keys_no_decay", "memory_out", "memory_out_no_decay"]
    assert not model.values[1].requires_grad
    assert sum(p.requires_grad for p in model.parameters()) == sum(len(g["params"]) for g in groups)


def test_param_groups_no_weight_decay_on_vectors():
    model = MemoryModel(tiny_llama(), mem_cfg(layers=(1,), qk_norm=True))
    for g in model.param_groups(1e-3, weight_decay=0.1):
        for p in g["params"]:
            if p.dim() < 2:
                assert g["weight_decay"] == 0.0, g["name"]


# --------------------------------------------------------------------------- 9. padding mask reaches hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_mask_reaches_hook(arch):
    model = MemoryModel(BUILDERS[arch](), mem_cfg(layers=(0, 1))).eval()
    seen = {0: [], 1: []}
    for i, m in model.memory_layers.items():
        m.add_access_hook(lambda layer, idx, w, mask, i=i: seen[i].append((idx.shape, mask)))
    ids = token_ids(batch=3, length=6)
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    for i in (0, 1):
        (shape, mask), = seen[i]
        assert shape == (3, 6, 2, 4)
        assert mask is not None and mask.dtype == torch.bool and mask.shape == (3, 6)
        assert torch.equal(mask, am.bool())

    # a later call without a mask must not see the previous call's mask
    with torch.no_grad():
        model(input_ids=ids)
    assert seen[0][-1][1] is None and seen[1][-1][1] is None


def test_positional_attention_mask_reaches_hook(micro_model):
    micro_model.eval()
    masks = []
    micro_model.memory_layers[1].add_access_hook(lambda layer, idx, w, mask: masks.append(mask))
    ids = token_ids(vocab=512, length=4)
    am = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        positional = micro_model(ids, am).logits
        keyword = micro_model(input_ids=ids, attention_mask=am).logits
    assert torch.equal(positional, keyword)  # the LM does use the positional mask
    assert masks[1] is not None and torch.equal(masks[1], am.bool())
    assert masks[0] is not None and torch.equal(masks[0], am.bool())


@pytest.mark.parametrize("name", ["micro", "micro-gpt2"])
def test_generate_with_left_padding_passes_current_masks(name):
    model = MemoryModel.from_preset(name, seed=0).eval()
    masks = []
    model.memory_layers[1].add_access_hook(lambda layer, idx, w, mask: masks.append((idx.shape[:2], mask)))
    steps = []
    model.lm.register_forward_pre_hook(
        lambda mod, args, kwargs: steps.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    ids = token_ids(batch=2, length=5, vocab=512)
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = ids.masked_fill(am == 0, 0)
    out = model.generate(
        input_ids=ids, attention_mask=am, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
        use_cache=True,
    )
    assert out.shape == (2, 10)
    assert len(masks) == len(steps) == 5
    assert steps[0] == (2, 5) and all(s == (2, 1) for s in steps[1:])  # the KV cache is in use
    for (lead, mask), step in zip(masks, steps):
        assert mask is not None and mask.dtype == torch.bool
        assert tuple(mask.shape) == step == tuple(lead)
    assert torch.equal(masks[0][1], am.bool())
    assert all(m.all() for _, m in masks[1:])  # generated tokens are real


# --------------------------------------------------------------------------- 10. parameter counts


@pytest.mark.parametrize(
    "cfg, n_value_tables",
    [
        (dict(layers=(1,)), 1),
        (dict(layers=(0, 1)), 2),
        (dict(layers=(0, 1), share_values=True), 1),
        (dict(layers=(0, 1), share_values=True, v_dim=24, mode="parallel"), 1),
        (dict(layers=(1,), swilu=False, qk_norm=True, query_norm="batchnorm"), 1),
    ],
)
def test_parameter_counts(cfg, n_value_tables):
    config = mem_cfg(**cfg)
    model = MemoryModel(tiny_llama(), config)
    counts = model.parameter_counts()
    total = sum(p.numel() for p in model.parameters())
    assert counts["total"] == total
    assert counts["memory_values"] + counts["memory_other"] + counts["dense"] == total
    v_dim = config.v_dim or 32
    assert counts["memory_values"] == n_value_tables * config.n_slots * v_dim
    memory_other = sum(
        p.numel() for n, p in model.named_parameters() if ".memory." in n and not n.endswith("values.weight")
    )
    assert counts["memory_other"] == memory_other
    plain = sum(p.numel() for n, p in model.named_parameters() if ".memory." not in n)
    assert counts["dense"] == plain


def test_parameter_counts_micro(micro_model):
    counts = micro_model.parameter_counts()
    assert counts["memory_values"] == 256 * 64
    assert counts["total"] == sum(p.numel() for p in micro_model.parameters())


# --------------------------------------------------------------------------- 11. balance loss


def test_balance_loss_added_in_training():
    bw = 0.3
    model = MemoryModel(tiny_llama(), mem_cfg(layers=(0, 1), balance_weight=bw)).train()
    ids = token_ids(batch=3, length=8)
    am = torch.ones_like(ids)
    am[0, 6:] = 0
    out = model(input_ids=ids, attention_mask=am, labels=ids)
    aux = [m.aux_loss for m in model.memory_layers.values()]
    assert all(a is not None and torch.isfinite(a) and a > 0 for a in aux)
    aux_mean = (aux[0].detach() + aux[1].detach()) / 2
    assert "memory_aux_loss" in out
    torch.testing.assert_close(out["memory_aux_loss"], aux_mean, rtol=1e-6, atol=0)
    assert not out["memory_aux_loss"].requires_grad

    with torch.no_grad():
        plain = model.lm(input_ids=ids, attention_mask=am, labels=ids).loss  # train mode too
    torch.testing.assert_close(out.loss.detach(), plain + bw * aux_mean, rtol=1e-6, atol=0)
    assert not torch.allclose(out.loss.detach(), plain)
    out.loss.backward()  # the aux term is differentiable (reaches the keys through the sub-key softmax)
    assert model.memory_layers[0].keys.grad is not None

    # eval mode: the plain LM loss, no aux
    model.eval()
    with torch.no_grad():
        ev = model(input_ids=ids, attention_mask=am, labels=ids)
        plain_eval = model.lm(input_ids=ids, attention_mask=am, labels=ids).loss
    assert "memory_aux_loss" not in ev
    assert torch.equal(ev.loss, plain_eval)


def test_no_balance_loss_when_weight_zero_or_no_labels():
    model = MemoryModel(tiny_llama(), mem_cfg(layers=(1,), balance_weight=0.0)).train()
    ids = token_ids()
    out = model(input_ids=ids, labels=ids)
    assert "memory_aux_loss" not in out
    with torch.no_grad():
        assert torch.equal(out.loss.detach(), model.lm(input_ids=ids, labels=ids).loss)

    model = MemoryModel(tiny_llama(), mem_cfg(layers=(1,), balance_weight=0.5)).train()
    out = model(input_ids=ids)
    assert out.loss is None and "memory_aux_loss" not in out


# --------------------------------------------------------------------------- 8. damaged files whose manifest was updated


def _rewrite(directory, name: str, data: bytes) -> None:
    """Replace one file of a model directory and update the manifest to match, as a careless edit would."""
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _one_line_refusal(directory, match: str) -> str:
    before = snapshot(directory)
    with pytest.raises(ModelFileError, match=match) as err:
        MemoryModel.from_pretrained(directory)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert snapshot(directory) == before  # nothing on disk changed
    return str(err.value)


def test_memory_json_with_a_string_for_an_integer_is_refused_naming_the_field(saved_dir):
    memory = json.loads((saved_dir / "memory.json").read_text())
    memory["memory"]["heads"] = "four"
    _rewrite(saved_dir, "memory.json", json.dumps(memory).encode())
    message = _one_line_refusal(saved_dir, "memory.json")
    assert "heads must be an integer" in message and "'four'" in message


def test_memory_json_that_is_no_object_is_refused(saved_dir):
    _rewrite(saved_dir, "memory.json", b'["not", "an", "object"]')
    _one_line_refusal(saved_dir, "memory.json must hold a JSON object, got list")


def test_memory_json_unknown_field_is_ignored_with_a_warning(saved_dir, caplog):
    memory = json.loads((saved_dir / "memory.json").read_text())
    memory["memory"]["future_knob"] = 1
    _rewrite(saved_dir, "memory.json", json.dumps(memory).encode())
    with caplog.at_level(logging.WARNING):
        model = MemoryModel.from_pretrained(saved_dir)
    assert model.memory_config == MemoryModel.from_preset("micro").memory_config
    assert any("future_knob" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field, value", [("hidden_size", "sixty-four"), ("num_hidden_layers", 2.5),
                                          ("tie_word_embeddings", "yes"), ("model_type", 7)])
def test_config_json_fields_are_type_checked(saved_dir, field, value):
    config = json.loads((saved_dir / "config.json").read_text())
    config[field] = value
    _rewrite(saved_dir, "config.json", json.dumps(config).encode())
    message = _one_line_refusal(saved_dir, "config.json")
    assert field in message


@pytest.mark.parametrize("files", [["model.safetensors"], {"memory.json": 3}, {"../outside": "0" * 64}])
def test_manifest_entries_are_type_checked(saved_dir, files):
    manifest = json.loads((saved_dir / "manifest.json").read_text())
    manifest["files"] = files if isinstance(files, list) else manifest["files"] | files
    (saved_dir / "manifest.json").write_text(json.dumps(manifest))
    _one_line_refusal(saved_dir, "manifest.json")


def test_a_pickle_named_model_safetensors_is_refused_and_never_unpickled(saved_dir, tmp_path):
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))  # what loading the pickle would do

    data = pickle.dumps({"weights": Payload()})
    _rewrite(saved_dir, "model.safetensors", data)
    message = _one_line_refusal(saved_dir, "model.safetensors is not a safetensors file")
    assert str(saved_dir) in message
    assert not sentinel.exists()
    torch_file = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, torch_file)  # torch's own (zip + pickle) format
    _rewrite(saved_dir, "model.safetensors", torch_file.getvalue())
    _one_line_refusal(saved_dir, "is not a safetensors file")


def test_a_truncated_model_safetensors_is_refused(saved_dir):
    data = (saved_dir / "model.safetensors").read_bytes()
    _rewrite(saved_dir, "model.safetensors", data[: len(data) // 2])
    _one_line_refusal(saved_dir, "is not a safetensors file")


def test_weights_of_another_shape_are_refused(saved_dir):
    state = safetensors.torch.load_file(saved_dir / "model.safetensors")
    name = next(k for k in state if state[k].dim() == 2)
    state[name] = torch.zeros(3, 3)
    _rewrite(saved_dir, "model.safetensors", safetensors.torch.save(state))
    _one_line_refusal(saved_dir, "does not match its config")


def test_saving_onto_a_file_is_refused(tmp_path, micro_model):
    f = tmp_path / "model"
    f.write_text("a file")
    with pytest.raises(ModelFileError, match="is a file"):
        micro_model.save_pretrained(f)
    assert f.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(ModelFileError, match="is a file, not a model directory"):
        MemoryModel.from_pretrained(f)
    with pytest.raises(WriteError, match="cannot write"):
        micro_model.save_pretrained(f / "inside")  # a file where a folder must be
    assert f.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert micro_model.model_hash is None


# --------------------------------------------------------------------------- 9. registry, layers, tokenizer


def test_registering_a_name_twice_is_refused():
    before = dict(registry.ARCHITECTURES)
    with pytest.raises(ConfigError, match="'llama' is already registered"):
        register_architecture("llama", Architecture(blocks="model.layers", ffn="mlp"))
    assert registry.ARCHITECTURES == before


def test_resolve_layer_one_function_one_message_style():
    assert resolve_layer(None, (3,)) == 3
    assert resolve_layer(1, [0, 1], what="this trace") == 1
    with pytest.raises(ConfigError, match=r"^this trace has memory layers \[0, 1\]; say which one \(layer=\.\.\.\)$"):
        resolve_layer(None, (1, 0), what="this trace")
    with pytest.raises(ConfigError, match=r"^the model has no memory layer 2; its memory layers are \[0, 1\]$"):
        resolve_layer(2, (0, 1))
    with pytest.raises(ConfigError, match="no memory layer"):
        resolve_layer(True, (1,))
    model = MemoryModel(tiny_llama(), mem_cfg(layers=(0, 1)))
    assert model.resolve_layer(0) == 0
    with pytest.raises(ConfigError, match="say which one"):
        model.resolve_layer(None)
    with pytest.raises(ConfigError, match="no memory layer 5"):
        with model.memory_off([5]):
            pass


def test_require_tokenizer_says_what_to_do(micro_model):
    with pytest.raises(ModelFileError, match="the model has no tokenizer, and evaluation needs one") as err:
        micro_model.require_tokenizer("evaluation")
    assert "smviz pretrain" in str(err.value) and "\n" not in str(err.value)
    micro_model.tokenizer = make_tokenizer()
    assert micro_model.require_tokenizer("evaluation") is micro_model.tokenizer
