"""`MemoryModel`: a Hugging Face causal LM with product-key memory layers attached at chosen blocks
(where a family keeps its blocks is the registry's, `smviz.model.registry`; the files of a saved
model are `smviz.model.format`'s).

Attach modes (`MemoryConfig.mode`):
- `replace` — the block's FFN is removed and the memory layer takes its place (the paper);
- `parallel` — the memory output is added to the FFN output; the memory's output projection starts at
  zero, so attaching to a pretrained model leaves its logits unchanged (Kim & Jung 2020).

A base model (a pretrained LM imported without a memory, `smviz import`) is read by `load_base_model`
and given a memory by `MemoryModel.attach`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from smviz.errors import ConfigError, ModelFileError
from smviz.memory import MemoryConfig, ProductKeyMemory, ValueTable
from smviz.model.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    has_tokenizer,
    hash_files,
    is_base_model_dir,
    read_hf_config,
    read_memory_config,
    read_source,
    read_tokenizer,
    read_weights,
    unique_tensors,
    verify_model_dir,
    write_model_dir,
)
from smviz.model.layers import resolve_layer
from smviz.model.presets import preset
from smviz.model.registry import architecture_of, module_at


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
        blocks = module_at(lm, arch.blocks)
        n_blocks = len(blocks)
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
        unknown = sorted(set(memory_overrides) - set(p.memory.to_dict()))
        if unknown:
            raise ConfigError(f"MemoryConfig has no field {', '.join(unknown)}; its fields: {', '.join(p.memory.to_dict())}")
        memory = MemoryConfig.from_dict(p.memory.to_dict() | memory_overrides)  # every value type-checked
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = transformers.AutoModelForCausalLM.from_config(config)
            return cls(lm, memory)

    @classmethod
    def attach(
        cls,
        lm: transformers.PreTrainedModel,
        memory_config: MemoryConfig,
        tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    ) -> MemoryModel:
        """Give a pretrained LM (e.g. from `load_base_model`) memory layers at `memory_config.layers`;
        the LM's modules are changed in place. In `parallel` mode the model's logits are unchanged, bit
        for bit, until the memory is trained (its output projection W2 starts at zero, so it adds exact
        zeros to the FFN output). In `replace` mode the blocks' FFNs are dropped: the model changes."""
        return cls(lm, memory_config, tokenizer)

    # ---- running

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.lm(*args, **kwargs)
        aux_loss = self.aux_loss()
        if self.training and aux_loss is not None and getattr(out, "loss", None) is not None:
            out["memory_aux_loss"] = aux_loss.detach()
            out["loss"] = out.loss + self.memory_config.balance_weight * aux_loss
        return out

    def aux_loss(self) -> torch.Tensor | None:
        """The usage-balancing loss of the last forward pass (mean over memory layers, before
        `balance_weight`), or None when it is off; a loss computed outside `forward` adds it itself."""
        aux = [m.aux_loss for m in self._memory_layers.values() if m.aux_loss is not None]
        return torch.stack(aux).mean() if aux else None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm.generate(*args, **kwargs)

    def lm_arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The arguments of one call of the LM's forward by name (positional ones bound to their names),
        for hooks that need e.g. its input_ids or attention_mask."""
        return dict(self._lm_signature.bind_partial(*args, **kwargs).arguments)

    def _pass_token_mask(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:  # passed by position
            mask = self.lm_arguments(args, kwargs).get("attention_mask")
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

    def resolve_layer(self, layer: int | None) -> int:
        """The memory block `layer` names (None: the only memory layer); ConfigError otherwise."""
        return resolve_layer(layer, self._memory_layers, what="the model")

    def require_tokenizer(self, purpose: str) -> transformers.PreTrainedTokenizerBase:
        """The model's tokenizer, or a ModelFileError saying that `purpose` needs one and how to get one."""
        if self.tokenizer is None:
            raise ModelFileError(
                f"the model has no tokenizer, and {purpose} needs one: it was saved without one (as `smviz build` "
                "saves a fresh preset); use a model trained with `smviz pretrain`, which saves the workspace "
                "tokenizer with it, or set model.tokenizer and save the model again"
            )
        return self.tokenizer

    def require_memory(self, purpose: str) -> None:
        """A ConfigError saying that `purpose` needs memory layers, if the model has none (a dense model,
        e.g. the dense twin a baseline is compared on: MemoryConfig.layers empty)."""
        if not self._memory_layers:
            raise ConfigError(f"the model has no memory layers (a dense model), and {purpose} needs one")

    @property
    def values(self) -> dict[int, nn.Parameter]:
        """Block index → the (N, v_dim) value table its memory reads (the same tensor when shared)."""
        return {i: m.value_table.weight for i, m in self._memory_layers.items()}

    @contextmanager
    def memory_off(self, layers: list[int] | None = None) -> Iterator[None]:
        """Inside the block, the memory layers (all, or those at `layers`) output zeros — the memory term
        is removed from the forward pass without touching any weight (parallel mode keeps the FFN)."""
        wanted = [self.resolve_layer(i) for i in layers] if layers is not None else list(self._memory_layers)
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

    # ---- on disk (the format is smviz.model.format's)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write the model directory atomically (a temp dir renamed into place); returns the model hash.
        An existing directory is replaced only if it is an smviz model directory."""
        files = write_model_dir(directory, self.lm, self.memory_config, self.tokenizer)
        self.model_hash = hash_files(files)
        return self.model_hash

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None) -> MemoryModel:
        """Load a model directory written by `save_pretrained`, after verifying every file's sha256 and
        type-checking what its files hold. A base model (imported, no memory) is refused with a
        ModelFileError saying how to load it (`load_base_model`) or give it a memory (`attach`)."""
        directory = Path(directory)
        files = verify_model_dir(directory)
        memory = read_memory_config(directory)
        lm = _build_lm(directory)
        tokenizer = read_tokenizer(directory) if has_tokenizer(files) else None
        model = cls(lm, memory, tokenizer)
        _load_weights(model.lm, directory)
        model.model_hash = hash_files(files)
        model.eval()
        return model.to(device) if device is not None else model


def _build_lm(directory: Path) -> transformers.PreTrainedModel:
    """A freshly initialised LM of the model directory's (type-checked) config.json."""
    config = read_hf_config(directory)
    try:
        return transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{directory / CONFIG_FILE} does not describe a model transformers can build ({e})") from None


def _load_weights(lm: nn.Module, directory: Path) -> None:
    """Load model.safetensors into `lm` (with its memory layers, if any); every saved tensor must fit."""
    state = read_weights(directory)
    try:
        missing, unexpected = lm.load_state_dict(state, strict=False)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].strip()
        raise ModelFileError(f"{directory / WEIGHTS_FILE} does not match its config ({reason})") from None
    saved_once = set(unique_tensors(lm))  # tied tensors are stored under one name
    missing = [k for k in missing if k in saved_once]
    if missing or unexpected:
        raise ModelFileError(
            f"{directory / WEIGHTS_FILE} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_base_model(
    directory: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase | None, dict[str, Any]]:
    """Load a base model directory (an LM without a memory, written by `smviz import`) after verifying
    every file's sha256: returns (lm in eval mode, tokenizer, metadata), metadata = {"model_hash",
    "model_type", "source"} (the source record of smviz.model.format). A model with a memory is refused."""
    directory = Path(directory)
    files = verify_model_dir(directory)
    if not is_base_model_dir(directory):
        raise ModelFileError(f"{directory} holds a model with a memory, not a base model: load it with MemoryModel.from_pretrained")
    lm = _build_lm(directory)
    tokenizer = read_tokenizer(directory) if has_tokenizer(files) else None
    _load_weights(lm, directory)
    lm.eval()
    metadata = {"model_hash": hash_files(files), "model_type": lm.config.model_type, "source": read_source(directory)}
    return (lm.to(device) if device is not None else lm), tokenizer, metadata
