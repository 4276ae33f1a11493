"""The committed recipes: how the built-in models are pretrained (`RECIPES`, `recipe`) and how a memory
is retrofitted into an imported model so that it holds the world's facts (`RETROFIT_RECIPES`,
`retrofit_recipe`; analyses/memory_usage.md and analyses/retrofit.md say how each was found)."""

from __future__ import annotations

from typing import Any

from smviz.errors import ConfigError
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
# (analyses/retrofit.md, run r5: r3's memory and rates, 1,200 replayed answers of the base with 4 of every
# 16 rows). `world` is the fact world it is held to (smviz world flags).
RETROFIT_RECIPES: dict[str, dict[str, Any]] = {
    "smollm2": dict(
        config=dict(steps=400, batch_size=16, lr=3e-3, warmup_steps=10, fact_share=0.7, world_copies=4,
                    replay=1200, replay_share=0.25, eval_every=200, eval_facts=20, usage_rows=16, log_every=20,
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


def recipe(preset_name: str, **overrides: Any) -> PretrainConfig:
    """The pretraining recipe of a preset (`RECIPES`: tiny, the demo's model; micro, for CI and
    `smviz demo --preset micro`) as a PretrainConfig, with `overrides` applied (None values ignored)."""
    if preset_name not in RECIPES:
        raise ConfigError(f"no pretraining recipe for preset {preset_name!r}; recipes exist for {sorted(RECIPES)}")
    return PretrainConfig.from_dict(RECIPES[preset_name] | {k: v for k, v in overrides.items() if v is not None})
