"""The committed recipes: how the built-in models are pretrained (`RECIPES`, `recipe`) and how a memory
is retrofitted into an imported model so that it holds the world's facts (`RETROFIT_RECIPES`,
`retrofit_recipe`; analyses/memory_usage.md and analyses/retrofit.md say how each was found), and the
dense twin of a memory model's recipe (`dense_twin`: no memory, FFNs as wide as makes a token use as many
parameters), the dense baseline a reviewer asks for."""

from __future__ import annotations

import dataclasses
from typing import Any

from smviz.errors import ConfigError
from smviz.model import MemoryModel
from smviz.train.pretrain import PretrainConfig, RetrofitConfig

RECIPES: dict[str, dict[str, Any]] = {
    # The tiny model's pretraining recipe: see analyses/memory_usage.md for how it was found.
    "tiny": dict(preset="tiny", steps=1600, lr=2e-3, fact_share=0.7, eval_every=800, eval_facts=40,
                 checkpoint_every=200, memory={"value_lr_mult": 10}),
    # A short version (1-2 minutes) for CI and `smviz demo --preset micro`: shows the pipeline, learns little.
    "micro": dict(preset="micro", steps=150, lr=3e-3, fact_share=0.7, eval_every=0, eval_facts=10,
                  usage_rows=16, checkpoint_every=50, memory={"value_lr_mult": 10}),
}


# Retrofit recipes: how a memory is given to an imported model so that it holds the world's facts
# (analyses/retrofit.md, run r10: r3's memory and rates, 2,400 replayed answers of the base in 4 of every
# 16 rows, 4 corpus rows, and the base's whole distribution distilled on those 8 at weight 4, 500 steps). `world` is the fact world it is held to (smviz world flags).
RETROFIT_RECIPES: dict[str, dict[str, Any]] = {
    "smollm2": dict(
        config=dict(steps=500, batch_size=16, lr=3e-3, warmup_steps=10, fact_share=0.5, world_copies=4,
                    replay=2400, replay_share=0.25, distill=8.0, eval_every=200, eval_facts=20, usage_rows=16, log_every=20,
                    checkpoint_every=100, prompt_format="chat",
                    memory={"n_keys": 128, "layers": [24], "value_lr_mult": 10}),
        world=dict(n_known=20, n_bio_only=5, n_new=20),
    ),
}


def retrofit_recipe(name: str, base: str, **overrides: Any) -> RetrofitConfig:
    """Retrofit recipe `name` (`RETROFIT_RECIPES`) of base model directory `base` as a RetrofitConfig,
    with `overrides` applied (None values ignored)."""
    if name not in RETROFIT_RECIPES:
        raise ConfigError(f"no retrofit recipe {name!r}; recipes exist for {sorted(RETROFIT_RECIPES)}")
    config = RETROFIT_RECIPES[name]["config"] | {"base": base}
    return RetrofitConfig.from_dict(config | {k: v for k, v in overrides.items() if v is not None})


def active_parameters(model: MemoryModel) -> int:
    """Parameters one token's forward pass uses: all of the model's, except that of each value table only
    the heads × knn rows a token reads count (queries, keys and projections are all used)."""
    total = sum(p.numel() for p in model.parameters())
    c = model.memory_config
    tables = {id(v): v for v in model.values.values()}.values()
    return total - sum(v.numel() for v in tables) + sum(c.heads * c.knn * v.shape[1] for v in model.values.values())


def dense_twin(config: PretrainConfig, vocab_size: int) -> PretrainConfig:
    """The pretraining `config` of a memory model (a preset's, with its tokenizer's `vocab_size`) for its
    dense twin: the same recipe with no memory layers and every block's FFN widened to the width at which
    a token's forward pass uses as many parameters as it does in the memory model (`active_parameters`).
    It is the nearest honest match that pretrains in the same time: a twin of equal total parameters
    would need FFNs about 30 times wider (the tiny model's 16.8M value parameters)."""
    if isinstance(config, RetrofitConfig):
        raise ConfigError("a retrofit has no dense twin here: its base model is the dense model")
    memory = MemoryModel.from_preset(config.preset, vocab_size=vocab_size, hf_overrides=config.model, **config.memory)
    if not memory.memory_layers:
        raise ConfigError("the config's model has no memory layers: it is dense already")
    target = active_parameters(memory)

    def dense_total(width: int) -> int:
        model = MemoryModel.from_preset(config.preset, vocab_size=vocab_size,
                                        hf_overrides=config.model | {"intermediate_size": width}, layers=[])
        return sum(p.numel() for p in model.parameters())

    one, two = dense_total(1), dense_total(2)  # the total is linear in the width
    width = max(1, 1 + round((target - one) / (two - one)))
    return dataclasses.replace(config, memory={"layers": []}, model=config.model | {"intermediate_size": width})


def recipe(preset_name: str, **overrides: Any) -> PretrainConfig:
    """The pretraining recipe of a preset (`RECIPES`: tiny, the demo's model; micro, for CI and
    `smviz demo --preset micro`) as a PretrainConfig, with `overrides` applied (None values ignored)."""
    if preset_name not in RECIPES:
        raise ConfigError(f"no pretraining recipe for preset {preset_name!r}; recipes exist for {sorted(RECIPES)}")
    return PretrainConfig.from_dict(RECIPES[preset_name] | {k: v for k, v in overrides.items() if v is not None})
