"""Setups: ``default`` (ours) and ``paper``, which reproduces what the published code ran.

:func:`apply_setup` is the one place where ``setup: paper`` turns into training options
and method options. Everything that changes the model's function goes into the method
configs (and so into the adapter file), so ``load_adapter`` rebuilds the same function.

``paper`` sets, over the defaults (README: "Our default vs the paper's setup"):

* ``pos_embed: zeros``: transformers' ``from_pretrained(max_length=...,
  ignore_mismatched_sizes=True)`` gave the published runs an all-zero position table at
  each of the paper's clip lengths;
* ``selection: last``: the published ``best_params = model.state_dict()`` aliases the
  live weights, so every figure is the last epoch's;
* ``precision: fp32``;
* UrbanSound8K: ``protocol: reference`` (9 training folds, no validation split) and
  ``channels: first`` (its reader kept channel 0 of stereo files);
* linear probing runs the plain loop (``embedding_cache: false``) where the dataset uses
  SpecAugment, so the augmentation applies as published;
* every method: ``init: paper``; prompts without the distillation token; Convpass with its
  convolution discarded (``convpass_conv: false``); Pfeiffer-MHSA mixtures of adapters
  add their output twice, as the published MoA code does (``published_double_add``).
  Sequential-before adapters and BitFit already compute the published function by default.
"""

from __future__ import annotations

import dataclasses

from ..petl import AdapterConfig, LoRAConfig, MethodConfig, PrefixConfig, PromptConfig, resolve_methods
from ..petl.config import MixtureConfig
from .config import TrainConfig

# Training options the paper setup fixes; a different value set by the user is refused.
PAPER_OPTIONS = {"pos_embed": "zeros", "selection": "last", "precision": "fp32"}
PAPER_US8K_OPTIONS = {"protocol": "reference", "channels": "first"}


def paper_method(config: MethodConfig) -> MethodConfig:
    """``config`` as the published code built it."""
    if isinstance(config, PromptConfig):
        return dataclasses.replace(config, init="paper", distillation_token=False)
    if isinstance(config, AdapterConfig):
        return dataclasses.replace(config, init="paper", convpass_conv=config.module != "convpass")
    if isinstance(config, (LoRAConfig, PrefixConfig)):
        return dataclasses.replace(config, init="paper")
    if isinstance(config, MixtureConfig) and config.sublayers() == ("mhsa",):
        return dataclasses.replace(config, published_double_add=True)
    return config  # full, linear, BitFit: nothing new to initialise or rewire


def apply_setup(config: TrainConfig) -> TrainConfig:
    """``config`` with its setup's options set; ``specaugment`` must already be resolved."""
    if config.setup == "default":
        return config
    fixed = dict(PAPER_OPTIONS, **(PAPER_US8K_OPTIONS if config.dataset == "us8k" else {}))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, value in fixed.items():
        if getattr(config, name) not in (defaults[name], value):
            raise ValueError(
                f"setup 'paper' sets {name}={value!r}; got {name}={getattr(config, name)!r}. "
                f"Drop the option, or use setup 'default'"
            )
    methods = [paper_method(m).to_dict() for m in resolve_methods(config.method)]
    embedding_cache = config.embedding_cache and not config.specaugment
    return dataclasses.replace(
        config, **fixed, method=methods[0] if len(methods) == 1 else methods, embedding_cache=embedding_cache
    )


__all__ = ["PAPER_OPTIONS", "PAPER_US8K_OPTIONS", "apply_setup", "paper_method"]
