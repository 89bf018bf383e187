"""Typed, validated method configurations: one frozen dataclass per PETL method.

A config is pure data: it says *what* to train, never touches a model. ``to_dict()``
gives a JSON/YAML-ready dict with a ``"method"`` name that :func:`method_from_dict`
turns back into the same config (adapter files and recipes rely on this round trip).
Invalid values raise ``ValueError`` naming the field and the valid choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Union

LORA_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")
ADAPTER_MODULES = ("bottleneck", "convpass", "conformer")
MIXTURE_MODULES = ("bottleneck", "convpass")
MIXTURE_LAYOUTS = ("pfeiffer", "houlsby")
ADAPTER_LAYOUTS = ("pfeiffer", "houlsby", "houlsby_mixed", "hydra")
SUBLAYERS = ("mhsa", "ffn")
INSERTIONS = ("parallel", "sequential")
POSITIONS = ("before", "after")
# "default": our initialisations (each module says which and why); "paper": what the published
# runs effectively had (new nn.Linear weights trunc-normal std 0.02 with zero bias, prompts and
# prefixes uniform with VPT's RGB bound). Each method module implements both.
INITS = ("default", "paper")


def _choice(owner: str, field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {list(choices)}, got {value!r}")


def _bool(owner: str, field: str, value, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        choices = [None, True, False] if allow_none else [True, False]
        raise ValueError(f"{owner}.{field} must be one of {choices}, got {value!r}")


def _positive_int(owner: str, field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{field} must be a positive integer, got {value!r}")


class _MethodConfig:
    """Shared behaviour: ``method`` name (class constant) and ``to_dict``."""

    method: ClassVar[str]

    def to_dict(self) -> dict:
        values = asdict(self)  # type: ignore[call-overload]
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}


@dataclass(frozen=True)
class FullFinetuneConfig(_MethodConfig):
    """Train every backbone parameter (and the head)."""

    method: ClassVar[str] = "full"


@dataclass(frozen=True)
class LinearProbeConfig(_MethodConfig):
    """Train only the head and the final LayerNorm."""

    method: ClassVar[str] = "linear"


@dataclass(frozen=True)
class BitFitConfig(_MethodConfig):
    """Train the biases of every Linear and LayerNorm of the encoder, the final LayerNorm's included."""

    method: ClassVar[str] = "bitfit"


@dataclass(frozen=True)
class PromptConfig(_MethodConfig):
    """Prompt tuning: ``num_prompts`` learnable tokens after [CLS] and the distillation token.

    ``deep=False`` (SPT): inserted once, before the first layer. ``deep=True`` (DPT): every
    layer gets its own ``num_prompts`` fresh prompts, replacing the previous layer's.
    ``distillation_token=False``: the first layer drops the distillation token, so the
    sequence is [CLS, prompts, patches] as in the published code.
    """

    method: ClassVar[str] = "prompt"
    num_prompts: int = 25
    deep: bool = True
    distillation_token: bool = True
    init: str = "default"

    def __post_init__(self) -> None:
        _positive_int("PromptConfig", "num_prompts", self.num_prompts)
        _bool("PromptConfig", "deep", self.deep)
        _bool("PromptConfig", "distillation_token", self.distillation_token)
        _choice("PromptConfig", "init", self.init, INITS)


@dataclass(frozen=True)
class PrefixConfig(_MethodConfig):
    """Prefix tuning: ``num_tokens`` learnable vectors per layer, half keys, half values."""

    method: ClassVar[str] = "prefix"
    num_tokens: int = 24
    init: str = "default"

    def __post_init__(self) -> None:
        _positive_int("PrefixConfig", "num_tokens", self.num_tokens)
        _choice("PrefixConfig", "init", self.init, INITS)
        if self.num_tokens % 2:
            raise ValueError(
                f"PrefixConfig.num_tokens must be even (split equally between keys and values), got {self.num_tokens}"
            )


@dataclass(frozen=True)
class LoRAConfig(_MethodConfig):
    """LoRA on the named projections: rank ``hidden // reduction_rate``, scaling ``alpha / reduction_rate``.

    The scaling follows the paper (s = alpha / RR), not the LoRA paper's alpha / r.
    """

    method: ClassVar[str] = "lora"
    targets: tuple[str, ...] = ("q", "v")
    reduction_rate: int = 128
    alpha: float = 8.0
    init: str = "default"

    def __post_init__(self) -> None:
        _choice("LoRAConfig", "init", self.init, INITS)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)  # lists from JSON/YAML -> hashable tuple
        if not targets:
            raise ValueError(f"LoRAConfig.targets must name at least one of {list(LORA_TARGETS)}")
        for target in targets:
            _choice("LoRAConfig", "targets", target, LORA_TARGETS)
        if len(set(targets)) != len(targets):
            raise ValueError(f"LoRAConfig.targets has duplicates: {list(targets)}")
        _positive_int("LoRAConfig", "reduction_rate", self.reduction_rate)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scaling(self) -> float:
        return self.alpha / self.reduction_rate


@dataclass(frozen=True)
class AdapterConfig(_MethodConfig):
    """Bottleneck, Convpass or Conformer adapters, bottleneck width ``hidden // reduction_rate``.

    ``layout``:
      * ``pfeiffer``: one adapter per layer in sub-layer ``location`` (default ``mhsa``, the
        paper's best), inserted per ``insertion`` / ``position``;
      * ``houlsby``: one adapter in each sub-layer, both per ``insertion`` / ``position``;
      * ``houlsby_mixed``: parallel-before on MHSA and sequential-after on FFN (Table V);
      * ``hydra``: parallel-before and sequential-after, both on ``location`` (default ``ffn``).
    The last two fix the insertion and position, so those fields must stay at their defaults.
    ``residual``: ``None`` means on for sequential, off for parallel adapters (Table VII).
    ``train_norm``: also train the LayerNorm of each sub-layer holding an adapter (as the
    reference code, and so the paper's parameter counts, do).
    ``kernel_size``: taps of the Conformer module's depthwise convolution (the reference
    code's default, 31); only ``module="conformer"`` uses it.
    ``convpass_conv=False``: Convpass as published, computing ``up(QuickGELU(QuickGELU(down(x))))``
    (its convolution's output was discarded); the convolution's weights stay in the model,
    untrained, so the parameter count is the paper's.
    """

    method: ClassVar[str] = "adapter"
    module: str = "bottleneck"
    layout: str = "pfeiffer"
    location: str | None = None
    insertion: str = "parallel"
    position: str = "before"
    residual: bool | None = None
    reduction_rate: int = 64
    train_norm: bool = True
    kernel_size: int = 31
    convpass_conv: bool = True
    init: str = "default"

    def __post_init__(self) -> None:
        _choice("AdapterConfig", "module", self.module, ADAPTER_MODULES)
        _positive_int("AdapterConfig", "kernel_size", self.kernel_size)
        _choice("AdapterConfig", "layout", self.layout, ADAPTER_LAYOUTS)
        _choice("AdapterConfig", "insertion", self.insertion, INSERTIONS)
        _choice("AdapterConfig", "position", self.position, POSITIONS)
        _bool("AdapterConfig", "residual", self.residual, allow_none=True)
        _bool("AdapterConfig", "train_norm", self.train_norm)
        _positive_int("AdapterConfig", "reduction_rate", self.reduction_rate)
        _bool("AdapterConfig", "convpass_conv", self.convpass_conv)
        _choice("AdapterConfig", "init", self.init, INITS)
        if not self.convpass_conv and self.module != "convpass":
            raise ValueError(f"AdapterConfig.convpass_conv=False applies to module 'convpass' only, got {self.module!r}")
        if self.layout in ("pfeiffer", "hydra"):
            _choice("AdapterConfig", "location", self.location, (None, *SUBLAYERS))
        elif self.location is not None:
            raise ValueError(
                f"AdapterConfig.location applies to layouts 'pfeiffer' and 'hydra' only; "
                f"layout {self.layout!r} uses both sub-layers, leave location=None"
            )
        if self.layout in ("houlsby_mixed", "hydra") and (self.insertion, self.position) != ("parallel", "before"):
            raise ValueError(
                f"AdapterConfig layout {self.layout!r} fixes insertion and position "
                "(parallel-before + sequential-after); leave insertion and position at their defaults"
            )

    def placements(self) -> tuple[tuple[str, str, str], ...]:
        """The adapters this config inserts in every layer: ``(sub-layer, insertion, position)``."""
        if self.layout == "pfeiffer":
            return ((self.location or "mhsa", self.insertion, self.position),)
        if self.layout == "houlsby":
            return tuple((sublayer, self.insertion, self.position) for sublayer in SUBLAYERS)
        if self.layout == "houlsby_mixed":
            return (("mhsa", "parallel", "before"), ("ffn", "sequential", "after"))
        location = self.location or "ffn"  # hydra
        return ((location, "parallel", "before"), (location, "sequential", "after"))

    def uses_residual(self, insertion: str) -> bool:
        return insertion == "sequential" if self.residual is None else self.residual

    def module_options(self) -> dict:
        """Constructor options of the adapter module beyond (hidden size, bottleneck width)."""
        if self.module == "conformer":
            return {"kernel_size": self.kernel_size}
        if self.module == "convpass":
            return {"conv": self.convpass_conv}
        return {}


@dataclass(frozen=True)
class MixtureConfig(_MethodConfig):
    """Fields shared by the mixtures of adapters (Cappellazzo et al., Interspeech 2024).

    ``num_adapters`` experts (``module``: bottleneck or convpass, width
    ``hidden // reduction_rate``) per placement, inserted in parallel and reading the
    sub-layer's normalised input, without residual: ``y = f(n) + M(n)``. ``layout``
    ``pfeiffer`` puts one mixture in sub-layer ``location`` (default ``mhsa``), ``houlsby``
    one in each sub-layer. ``train_norm``: also train the LayerNorm of each sub-layer
    holding a mixture, as the single adapter does.

    ``published_double_add``: reproduce the published code, which (Pfeiffer, MHSA) adds the
    mixture's output after the MHSA sub-layer and adds the same tensor again to the FFN
    sub-layer's output. Off by default: the intended function adds it once.
    """

    module: str = "bottleneck"
    layout: str = "pfeiffer"
    location: str | None = None
    num_adapters: int = 7
    reduction_rate: int = 128
    train_norm: bool = True
    published_double_add: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _choice(owner, "module", self.module, MIXTURE_MODULES)
        _choice(owner, "layout", self.layout, MIXTURE_LAYOUTS)
        _positive_int(owner, "num_adapters", self.num_adapters)
        _positive_int(owner, "reduction_rate", self.reduction_rate)
        _bool(owner, "train_norm", self.train_norm)
        _bool(owner, "published_double_add", self.published_double_add)
        if self.layout == "pfeiffer":
            _choice(owner, "location", self.location, (None, *SUBLAYERS))
        elif self.location is not None:
            raise ValueError(f"{owner}.location applies to layout 'pfeiffer' only; 'houlsby' uses both sub-layers")
        if self.published_double_add and self.sublayers() != ("mhsa",):
            raise ValueError(
                f"{owner}.published_double_add reproduces a bug of the Pfeiffer MHSA mixture only; "
                f"layout {self.layout!r} location {self.location!r} has nothing to add twice"
            )

    def sublayers(self) -> tuple[str, ...]:
        """The sub-layers holding a mixture in every layer."""
        return (self.location or "mhsa",) if self.layout == "pfeiffer" else SUBLAYERS


@dataclass(frozen=True)
class DenseMoAConfig(MixtureConfig):
    """Dense mixture of adapters: a linear router's softmax over the experts weights, per
    token, the sum of every expert's output. See :class:`MixtureConfig` for the fields."""

    method: ClassVar[str] = "dense_moa"


@dataclass(frozen=True)
class SoftMoAConfig(MixtureConfig):
    """Soft mixture of adapters (after Soft MoE, Puigcerver et al. 2024).

    Each expert has ``num_slots`` slots; a slot is a dispatch-weighted average of all tokens,
    and each token's output a combine-weighted sum of all slot outputs. ``normalize``:
    l2-normalise the tokens and the slot parameters before their product, with a learned
    scale (the Soft MoE paper's normalisation; the follow-up left it off).
    See :class:`MixtureConfig` for the shared fields.
    """

    method: ClassVar[str] = "soft_moa"
    num_slots: int = 1
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("SoftMoAConfig", "num_slots", self.num_slots)
        _bool("SoftMoAConfig", "normalize", self.normalize)


MethodConfig = Union[
    FullFinetuneConfig,
    LinearProbeConfig,
    BitFitConfig,
    PromptConfig,
    PrefixConfig,
    LoRAConfig,
    AdapterConfig,
    DenseMoAConfig,
    SoftMoAConfig,
]


def reduced_size(hidden_size: int, reduction_rate: int, owner: str) -> int:
    """The paper's rank / bottleneck rule r = d // RR, refusing an RR that leaves nothing."""
    size = hidden_size // reduction_rate
    if size < 1:
        raise ValueError(
            f"{owner}.reduction_rate={reduction_rate} leaves no rank for hidden size {hidden_size}; "
            f"use at most {hidden_size}"
        )
    return size
