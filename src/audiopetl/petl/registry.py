"""Method names, presets, and turning user specs (names, dicts, lists) into config tuples.

``METHODS`` maps each method name to its config class and learning-rate family (the
paper: 5e-3 for adapters and LoRA, 1e-2 for prompt and prefix tuning). Presets name
the configurations of the paper's tables (``bottleneck_pf_par``, ``dpt``, ``lora_qkvo``...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .config import (
    AdapterConfig,
    BitFitConfig,
    DenseMoAConfig,
    FullFinetuneConfig,
    LinearProbeConfig,
    LoRAConfig,
    MethodConfig,
    PrefixConfig,
    PromptConfig,
    SoftMoAConfig,
)

METHODS: dict[str, tuple[type, str]] = {
    "full": (FullFinetuneConfig, "full"),
    "linear": (LinearProbeConfig, "linear"),
    "bitfit": (BitFitConfig, "adapter"),
    "prompt": (PromptConfig, "prompt"),
    "prefix": (PrefixConfig, "prompt"),
    "lora": (LoRAConfig, "adapter"),
    "adapter": (AdapterConfig, "adapter"),
    "dense_moa": (DenseMoAConfig, "adapter"),  # the follow-up's lr_MoA equals the adapters' 5e-3
    "soft_moa": (SoftMoAConfig, "adapter"),
}


def _adapter_presets() -> dict[str, AdapterConfig]:
    presets = {}
    for module in ("bottleneck", "convpass", "conformer"):
        presets[f"{module}_pf_par"] = AdapterConfig(
            module=module, layout="pfeiffer", location="mhsa", insertion="parallel", position="before"
        )
        # Table I's "PF seq" is FFN-Seq-After: its scores are Table V's "PF FFN-Seq-After".
        presets[f"{module}_pf_seq"] = AdapterConfig(
            module=module, layout="pfeiffer", location="ffn", insertion="sequential", position="after"
        )
        presets[f"{module}_hou_par"] = AdapterConfig(
            module=module, layout="houlsby", insertion="parallel", position="before"
        )
        presets[f"{module}_hou_seq"] = AdapterConfig(
            module=module, layout="houlsby", insertion="sequential", position="after"
        )
        presets[f"{module}_hou_mixed"] = AdapterConfig(module=module, layout="houlsby_mixed")
        presets[f"{module}_hydra"] = AdapterConfig(module=module, layout="hydra")
    return presets


PRESETS: dict[str, MethodConfig] = {
    "full": FullFinetuneConfig(),
    "linear": LinearProbeConfig(),
    "bitfit": BitFitConfig(),
    "prompt": PromptConfig(),
    "spt": PromptConfig(num_prompts=300, deep=False),
    "dpt": PromptConfig(num_prompts=25, deep=True),
    "prefix": PrefixConfig(num_tokens=24),
    "lora": LoRAConfig(),
    # Table IV: each target set at the reduction rate that keeps 221K parameters.
    "lora_q": LoRAConfig(targets=("q",), reduction_rate=64),
    "lora_qk": LoRAConfig(targets=("q", "k"), reduction_rate=128),
    "lora_qv": LoRAConfig(targets=("q", "v"), reduction_rate=128),
    "lora_qkvo": LoRAConfig(targets=("q", "k", "v", "o"), reduction_rate=256),
    "adapter": AdapterConfig(),
    **_adapter_presets(),
    "dense_moa": DenseMoAConfig(),
    "soft_moa": SoftMoAConfig(),
}


def method_names() -> list[str]:
    return list(METHODS)


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str) -> MethodConfig:
    """The config a method or preset name stands for (a method name gives its defaults)."""
    if name not in PRESETS:
        raise ValueError(f"unknown method or preset {name!r}; valid: {preset_names()}")
    return PRESETS[name]


def method_from_dict(values: Mapping[str, Any]) -> MethodConfig:
    """``{"method": name, **fields}`` -> config; ``name`` may also be a preset, whose fields are overridden."""
    values = dict(values)
    if "method" not in values:
        raise ValueError(f"a method dict needs a 'method' key, one of {method_names()} or a preset name")
    name = values.pop("method")
    if name in METHODS:
        cls, base = METHODS[name][0], None
    elif name in PRESETS:
        base = PRESETS[name]
        cls = type(base)
    else:
        raise ValueError(f"unknown method {name!r}; valid: {method_names()} or a preset: {preset_names()}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; valid: {valid}")
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def resolve_methods(spec: MethodConfig | str | Mapping | Sequence) -> tuple[MethodConfig, ...]:
    """A config, preset name, method dict, or a list of these -> a checked tuple of configs."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    methods = []
    for item in items:
        if isinstance(item, str):
            methods.append(preset(item))
        elif isinstance(item, Mapping):
            methods.append(method_from_dict(item))
        elif isinstance(item, tuple(cls for cls, _ in METHODS.values())):
            methods.append(item)
        else:
            raise ValueError(f"cannot read a method from {item!r}: give a config, a preset name or a method dict")
    check_compatible(methods)
    return tuple(methods)


def check_compatible(methods: Sequence[MethodConfig]) -> None:
    """Refuse combinations that cannot share one model, with the reason."""
    if not methods:
        raise ValueError("no method given")
    names = [m.method for m in methods]
    for alone in ("full", "linear"):
        if alone in names and len(methods) > 1:
            raise ValueError(f"method {alone!r} cannot be combined with other methods, got {names}")
    for single in ("bitfit", "prompt", "prefix"):
        if names.count(single) > 1:
            raise ValueError(f"method {single!r} appears {names.count(single)} times; a model holds at most one")
    seen: set[str] = set()
    for lora in (m for m in methods if isinstance(m, LoRAConfig)):
        overlap = seen & set(lora.targets)
        if overlap:
            raise ValueError(f"two LoRA configs both target {sorted(overlap)}; each projection takes one LoRA")
        seen |= set(lora.targets)


def learning_rate_family(methods: Sequence[MethodConfig]) -> str:
    """``full`` / ``linear`` alone, ``prompt`` when only prompt-family methods, else ``adapter``."""
    families = {METHODS[m.method][1] for m in methods}
    for alone in ("full", "linear"):
        if alone in families:
            return alone
    return "prompt" if families == {"prompt"} else "adapter"
