"""`MemoryModel`: a Hugging Face causal LM with product-key memory layers attached at chosen blocks;
the architecture registry that says where each model family keeps its FFN; the built-in presets;
and the on-disk model format (save, verified load, model hash).

Attach modes (`MemoryConfig.mode`):
- `replace` — the block's FFN is removed and the memory layer takes its place (the paper);
- `parallel` — the memory output is added to the FFN output; the memory's output projection starts at
  zero, so attaching to a pretrained model leaves its logits unchanged (Kim & Jung 2020).

Model directory: config.json (HF), model.safetensors, memory.json, tokenizer files (when a tokenizer
is given) and manifest.json (sha256 of every other file). Loading verifies every hash and refuses a
missing or altered file; the model hash is the sha256 of the manifest's file list.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from torch import nn

from smviz.errors import ConfigError, ModelFileError
from smviz.io import replace_dir
from smviz.memory import MemoryConfig, ProductKeyMemory, ValueTable

log = logging.getLogger(__name__)

MODEL_FORMAT = "smviz-model/1"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "memory.json")


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps its parts, as attribute paths from the `*ForCausalLM` module."""

    blocks: str
    """Dotted path to the `nn.ModuleList` of transformer blocks, e.g. 'model.layers'."""
    ffn: str
    """Attribute of one block that holds its feed-forward module, called as `ffn(hidden_states)`."""
    hidden_size: str = "hidden_size"
    """Attribute of the HF config that holds the model width."""
    final_norm: str = "model.norm"
    """Dotted path to the norm applied before the unembedding (used by vocabulary projection)."""


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model.layers", "mlp"),  # Llama 1-3, SmolLM, TinyLlama, ...
    "mistral": Architecture("model.layers", "mlp"),
    "qwen2": Architecture("model.layers", "mlp"),
    "gpt2": Architecture("transformer.h", "mlp", hidden_size="n_embd", final_norm="transformer.ln_f"),
}


def register_architecture(model_type: str, architecture: Architecture) -> None:
    """Teach smviz a new model family, keyed by its HF `config.model_type`."""
    ARCHITECTURES[model_type] = architecture


def architecture_of(config: transformers.PretrainedConfig) -> Architecture:
    try:
        return ARCHITECTURES[config.model_type]
    except KeyError:
        raise ConfigError(
            f"unsupported architecture {config.model_type!r} (supported: {sorted(ARCHITECTURES)}). "
            "Register it with smviz.model.register_architecture("
            f"{config.model_type!r}, Architecture(blocks='<path to the block list>', ffn='<FFN attribute>', "
            "hidden_size='<config width attribute>'))"
        ) from None


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A built-in model: an HF config (as keyword arguments) plus the memory attached to it."""

    model_type: str
    hf: dict[str, Any]
    memory: MemoryConfig
    description: str = ""


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "llama",
        dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            tie_word_embeddings=True,
        ),
        MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=32, layers=(1,)),
        "tests and CI: 2 Llama blocks, d=64, 256 slots; builds and runs in milliseconds",
    ),
    "micro-gpt2": Preset(
        "gpt2",
        dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0),
        MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=32, layers=(1,)),
        "the micro shape on GPT-2 blocks",
    ),
    # The demo's default model: the paper's memory shape (4 heads, top-32, one memory replacing the
    # FFN of a middle block) scaled down for 2 CPU cores. The other blocks' FFNs are narrow (64, not
    # 4·d) so that the facts land in the memory rather than in dense weights: analyses/memory_usage.md.
    "tiny": Preset(
        "llama",
        dict(
            vocab_size=4096, hidden_size=256, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
        MemoryConfig(n_keys=256, heads=4, knn=32, k_dim=128, v_dim=256, layers=(2,)),
        "4 Llama blocks, d=256, FFN 64; 65,536-slot memory (4 heads x top-32) replacing the FFN of block 2",
    ),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


# --------------------------------------------------------------------------- the model


class MemoryFFN(nn.Module):
    """What sits in a block's FFN slot: the memory layer, plus the original FFN in parallel mode."""

    def __init__(self, memory: ProductKeyMemory, ffn: nn.Module | None) -> None:
        super().__init__()
        self.memory = memory
        self.ffn = ffn

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.memory(hidden_states)
        if self.ffn is None:
            return out
        return self.ffn(hidden_states, *args, **kwargs) + out


def module_at(module: nn.Module, path: str) -> Any:
    """The submodule at a dotted attribute path, e.g. 'model.norm'."""
    return _get(module, path)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


class MemoryModel(nn.Module):
    """A Hugging Face causal LM (`self.lm`) with memory layers attached to some of its blocks.

    Calling the model calls the LM (same arguments, same outputs); in training mode with
    `MemoryConfig.balance_weight > 0` and labels given, the usage-balancing loss is added to `loss`
    and reported as `memory_aux_loss`. `generate` is the LM's.
    """

    def __init__(
        self,
        lm: transformers.PreTrainedModel,
        memory_config: MemoryConfig,
        tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        arch = architecture_of(lm.config)
        blocks = _get(lm, arch.blocks)
        n_blocks = len(blocks)
        if not memory_config.layers:
            raise ConfigError("MemoryConfig.layers is empty: name the block indices that get a memory layer")
        bad = [i for i in memory_config.layers if i >= n_blocks]
        if bad:
            raise ConfigError(f"memory layer index {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
        self.lm = lm
        self.memory_config = memory_config
        self.tokenizer = tokenizer
        self.model_hash: str | None = None  # set by save_pretrained / from_pretrained

        dim = getattr(lm.config, arch.hidden_size)
        shared: ValueTable | None = None
        self._memory_layers: dict[int, ProductKeyMemory] = {}
        for i in sorted(memory_config.layers):
            block = blocks[i]
            ffn = getattr(block, arch.ffn)
            ref = next(ffn.parameters())
            memory = ProductKeyMemory(memory_config, dim, shared_values=shared, device=ref.device, dtype=ref.dtype)
            if memory_config.share_values and shared is None:
                shared = memory.value_table
            setattr(block, arch.ffn, MemoryFFN(memory, ffn if memory_config.mode == "parallel" else None))
            self._memory_layers[i] = memory
        # Hooks need to know which positions are padding: take the mask of every LM call
        # (direct calls and generate() alike).
        self._lm_signature = inspect.signature(lm.forward)
        lm.register_forward_pre_hook(self._pass_token_mask, with_kwargs=True)

    # ---- construction

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        seed: int = 0,
        vocab_size: int | None = None,
        hf_overrides: dict[str, Any] | None = None,
        **memory_overrides: Any,
    ) -> MemoryModel:
        """A freshly initialised built-in model (see `PRESETS`); `hf_overrides` replace HF config values
        (e.g. intermediate_size), `memory_overrides` replace MemoryConfig fields."""
        p = preset(name)
        hf = dict(p.hf, **(hf_overrides or {}), **({"vocab_size": vocab_size} if vocab_size is not None else {}))
        config = transformers.AutoConfig.for_model(p.model_type, **hf)
        try:
            memory = replace(p.memory, **memory_overrides)
        except TypeError as e:
            raise ConfigError(f"unknown MemoryConfig field in {sorted(memory_overrides)}: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = transformers.AutoModelForCausalLM.from_config(config)
            return cls(lm, memory)

    # ---- running

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.lm(*args, **kwargs)
        aux = [m.aux_loss for m in self._memory_layers.values() if m.aux_loss is not None]
        if self.training and aux and getattr(out, "loss", None) is not None:
            aux_loss = torch.stack(aux).mean()
            out["memory_aux_loss"] = aux_loss.detach()
            out["loss"] = out.loss + self.memory_config.balance_weight * aux_loss
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm.generate(*args, **kwargs)

    def _pass_token_mask(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:  # passed by position
            mask = self._lm_signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            mask = None  # a custom 4-D mask carries no padding information we can read
        for memory in self._memory_layers.values():
            memory.token_mask = mask

    @property
    def config(self) -> transformers.PretrainedConfig:
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def memory_layers(self) -> dict[int, ProductKeyMemory]:
        """Block index → memory layer, in block order."""
        return dict(self._memory_layers)

    @property
    def values(self) -> dict[int, nn.Parameter]:
        """Block index → the (N, v_dim) value table its memory reads (the same tensor when shared)."""
        return {i: m.value_table.weight for i, m in self._memory_layers.items()}

    @contextmanager
    def memory_off(self, layers: list[int] | None = None) -> Iterator[None]:
        """Inside the block, the memory layers (all, or those at `layers`) output zeros — the memory term
        is removed from the forward pass without touching any weight (parallel mode keeps the FFN)."""
        wanted = list(layers) if layers is not None else list(self._memory_layers)
        unknown = [i for i in wanted if i not in self._memory_layers]
        if unknown:
            raise ConfigError(f"blocks {unknown} have no memory layer; memory layers are at {list(self._memory_layers)}")
        chosen = [self._memory_layers[i] for i in wanted]
        before = [m.enabled for m in chosen]
        for m in chosen:
            m.enabled = False
        try:
            yield
        finally:
            for m, was in zip(chosen, before):
                m.enabled = was

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups that apply the memory learning-rate multipliers:
        'values' at lr·value_lr_mult, 'keys' (keys, query projection and norm) at lr·key_lr_mult,
        'memory_out' (the memory's W1/W2 output projections) at lr,
        'dense' (everything else) at lr. Weight decay applies to matrices and keys, never to vectors
        (biases, norm gains), which go to '<group>_no_decay'.
        A multiplier of 0 freezes that group: it is left out and its parameters stop requiring grad."""
        c = self.memory_config
        value_ids = {id(p) for p in self.values.values()}
        key_ids = set()
        for m in self._memory_layers.values():
            key_ids |= {id(p) for p in (m.keys, *m.query.parameters(), *m.query_norm.parameters())}
            if m.query_gain is not None:
                key_ids.add(id(m.query_gain))
        output_ids = {
            id(p) for m in self._memory_layers.values() for lin in (m.w1, m.w2) if lin is not None for p in lin.parameters()
        }
        group_lr = {"values": lr * c.value_lr_mult, "keys": lr * c.key_lr_mult, "memory_out": lr, "dense": lr}
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {(g, d): [] for g in group_lr for d in (True, False)}
        for p in self.parameters():  # parameters() yields a shared or tied tensor once
            group = (
                "values" if id(p) in value_ids
                else "keys" if id(p) in key_ids
                else "memory_out" if id(p) in output_ids
                else "dense"
            )
            buckets[(group, p.dim() >= 2)].append(p)
        groups = []
        for (group, decay), params in buckets.items():
            name = group if decay else f"{group}_no_decay"
            wd = weight_decay if decay else 0.0
            if group_lr[group] == 0:
                for p in params:
                    p.requires_grad_(False)
            elif params:
                groups.append({"name": name, "params": params, "lr": group_lr[group], "weight_decay": wd})
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: 'memory_values', 'memory_other' (keys, query, W1/W2), 'dense', 'total'."""
        value_ids = {id(p) for p in self.values.values()}
        memory_ids = {id(p) for m in self._memory_layers.values() for p in m.parameters()} | value_ids
        counts = {"memory_values": 0, "memory_other": 0, "dense": 0}
        for p in self.parameters():
            key = "memory_values" if id(p) in value_ids else "memory_other" if id(p) in memory_ids else "dense"
            counts[key] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    # ---- on disk

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write the model directory atomically (a temp dir renamed into place); returns the model hash.
        An existing directory is replaced only if it is an smviz model directory."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
            raise ModelFileError(f"{directory} exists and is not an smviz model directory; refusing to overwrite it")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self.lm.config.save_pretrained(tmp)
            safetensors.torch.save_file(_unique_tensors(self.lm), tmp / "model.safetensors", metadata={"format": "pt"})
            _write_json(tmp / "memory.json", {"format": MODEL_FORMAT, "memory": self.memory_config.to_dict()})
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
                _drop_load_time_keys(tmp / "tokenizer_config.json")
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            _write_json(tmp / MANIFEST, {"format": MODEL_FORMAT, "files": files})
            replace_dir(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.model_hash = _hash_files(files)
        return self.model_hash

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None) -> MemoryModel:
        """Load a model directory written by `save_pretrained`, after verifying every file's sha256."""
        directory = Path(directory)
        files = verify_model_dir(directory)
        memory_json = json.loads((directory / "memory.json").read_text())
        memory = MemoryConfig.from_dict(memory_json["memory"])
        config = transformers.AutoConfig.from_pretrained(directory)
        lm = transformers.AutoModelForCausalLM.from_config(config)
        tokenizer = None
        if "tokenizer_config.json" in files:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        model = cls(lm, memory, tokenizer)
        state = safetensors.torch.load_file(directory / "model.safetensors")
        missing, unexpected = model.lm.load_state_dict(state, strict=False)
        saved_once = set(_unique_tensors(model.lm))  # tied tensors are stored under one name
        missing = [k for k in missing if k in saved_once]
        if missing or unexpected:
            raise ModelFileError(
                f"{directory}/model.safetensors does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.model_hash = _hash_files(files)
        model.eval()
        return model.to(device) if device is not None else model


def verify_model_dir(directory: Path) -> dict[str, str]:
    """Check that `directory` is a complete, unaltered smviz model; returns its manifest's file → sha256."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise ModelFileError(f"model directory {directory} does not exist")
    if not manifest_path.is_file():
        raise ModelFileError(f"{directory} is not an smviz model directory: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelFileError(f"{manifest_path} is unreadable ({e}); the model directory is damaged") from None
    absent = [name for name in REQUIRED_FILES if name not in files]
    if absent:
        raise ModelFileError(f"{manifest_path} does not list {absent}; the model directory is damaged")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise ModelFileError(f"{path} is missing (listed in {MANIFEST}); re-save or re-download the model")
        if _sha256(path) != digest:
            raise ModelFileError(f"{path} was altered since the model was saved (sha256 mismatch); refusing to load it")
    return files


def model_dir_hash(directory: str | os.PathLike) -> str:
    """The model hash of a model directory, verified, without loading its weights."""
    return _hash_files(verify_model_dir(Path(directory)))


def _unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied/shared tensor once (under its first name), contiguous — so the
    same weights always give the same safetensors bytes (and the same model hash)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


def _drop_load_time_keys(tokenizer_config: Path) -> None:
    """A tokenizer loaded from disk saves how it was loaded ('is_local', ...); keep the file a
    function of the tokenizer alone, so save → load → save keeps the model hash."""
    if tokenizer_config.is_file():
        cfg = json.loads(tokenizer_config.read_text())
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        _write_json(tokenizer_config, cfg)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(files: dict[str, str]) -> str:
    """The model hash: sha256 of the sorted 'name sha256' lines of the manifest (first 16 hex digits)."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


