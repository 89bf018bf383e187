"""``build_model``: a backbone plus one or more method configs -> a :class:`PETLModel`.

Building has three steps, kept apart as in PEFT: (1) pick the backbone tensors the
methods train (on the plain backbone), (2) inject the new modules through the backbone's
extension points (the same on every family, see :mod:`audiopetl.backbone.registry`),
(3) freeze everything else. Every model also trains a linear head on the pooled output
and the final LayerNorm, as the reference implementation does (BitFit alone: the final
LayerNorm's bias only, as there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..backbone.ast import AST
from ..backbone.registry import fingerprint
from .adapters import adapter_norms, inject_adapters
from .config import (
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    LinearProbeConfig,
    DenseMoAConfig,
    LoRAConfig,
    MethodConfig,
    PrefixConfig,
    PromptConfig,
    SoftMoAConfig,
)
from .finetune import bitfit_parameters, extra_parameters, full_parameters, linear_parameters
from .lora import LoRALinear, inject_lora
from .moa import inject_mixtures, mixture_norms
from .prompts import inject_prefix, inject_prompts
from .registry import resolve_methods

# Per config class: backbone parameters it trains, and the modules it injects.
SELECT: dict[type, Callable[[AST, Any], list[nn.Parameter]]] = {
    FullFinetuneConfig: full_parameters,
    LinearProbeConfig: linear_parameters,
    BitFitConfig: bitfit_parameters,
    AdapterConfig: adapter_norms,
    DenseMoAConfig: mixture_norms,
    SoftMoAConfig: mixture_norms,
}
INJECT: dict[type, Callable[[AST, Any], list[nn.Module]]] = {
    PromptConfig: inject_prompts,
    PrefixConfig: inject_prefix,
    LoRAConfig: inject_lora,
    AdapterConfig: inject_adapters,
    DenseMoAConfig: inject_mixtures,
    SoftMoAConfig: inject_mixtures,
}


class PETLModel(nn.Module):
    """Frozen backbone + method modules + linear head: features (batch, frames, mel) -> logits.

    ``train(mode)`` switches only the head and the injected modules (the whole backbone for
    full fine-tuning): the frozen backbone stays in eval mode during training.
    """

    def __init__(
        self,
        backbone: AST,
        head: nn.Linear,
        methods: tuple[MethodConfig, ...],
        injected: list[nn.Module],
        pooling: str,
        extra_trainable: tuple[str, ...],
        class_names: list[str] | None,
        metadata: dict,
        backbone_record: dict,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.methods = methods
        self._injected = injected  # a plain list: these modules are registered inside the backbone
        self.pooling = pooling
        self.extra_trainable = extra_trainable
        self.class_names = class_names
        self.metadata = metadata
        # What the adapter file records to rebuild and check the backbone: source, config, fingerprint.
        self.backbone_record = backbone_record

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """Output token sequence after the final LayerNorm, (batch, tokens, hidden)."""
        return self.backbone(features)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding fed to the head, (batch, hidden)."""
        return self.backbone.pool(self.hidden(features), features, self.pooling)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(features))

    def train(self, mode: bool = True) -> "PETLModel":
        super().train(mode)
        if not any(isinstance(m, FullFinetuneConfig) for m in self.methods):
            self.backbone.train(False)
            for module in self._injected:
                module.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        """Every trained parameter, head and final LayerNorm included."""
        return sum(p.numel() for p in self.trainable_parameters())

    def paper_parameter_count(self) -> int:
        """Trained parameters as the paper counts them.

        The head and final LayerNorm, trained with every method, are left out, except for
        linear probing and full fine-tuning where they are (part of) what the method trains,
        and except where a method selects final-LayerNorm tensors itself: BitFit its bias
        (one of BitFit's biases); in a post-LN model, where the final LayerNorm is the last
        block's FFN LayerNorm, the adapters and mixtures that train their sub-layer's norm.
        """
        if any(isinstance(m, (FullFinetuneConfig, LinearProbeConfig)) for m in self.methods):
            return self.num_trainable()
        selected = {id(p) for m in self.methods if type(m) in SELECT for p in SELECT[type(m)](self.backbone, m)}
        shared = {id(p) for p in (*self.head.parameters(), *self.backbone.norm.parameters())} - selected
        return sum(p.numel() for p in self.trainable_parameters() if id(p) not in shared)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Store the frozen weight matrices (and tokens/position table) in ``dtype``.

        With bf16 autocast a frozen matrix needs no fp32 master copy: keeping it in bf16
        halves its memory and saves a cast every step. Trained parameters (and so the
        optimizer state) stay fp32, and so do frozen vectors: CPU LayerNorm refuses
        mixed-dtype parameters, and biases and norms are a rounding error in memory.
        The model must then run under autocast to ``dtype``.
        """
        for module in self.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.requires_grad and param.dim() >= 2 and param.dtype != dtype:
                    setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, by their names in this model: what an adapter file holds.

        Besides the trained parameters: the buffers of the injected modules (the Conformer
        adapter's BatchNorm statistics), which training updates too.
        """
        state = {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
        injected = {id(b) for module in self._injected for b in module.buffers()}
        state.update((name, b.detach()) for name, b in self.named_buffers() if id(b) in injected)
        return state

    def lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def merge_lora(self) -> None:
        """Fold every LoRA update into its frozen weight (inference only: training needs unmerged)."""
        layers = self.lora_layers()
        if not layers:
            raise ValueError("this model has no LoRA layers to merge")
        for layer in layers:
            layer.merge()

    def unmerge_lora(self) -> None:
        layers = self.lora_layers()
        if not layers:
            raise ValueError("this model has no LoRA layers to unmerge")
        for layer in layers:
            layer.unmerge()

    def save_adapter(self, path: str | Path, extra_metadata: dict | None = None, dtype: str = "fp32") -> Path:
        from .files import save_adapter

        return save_adapter(self, path, extra_metadata, dtype=dtype)


def build_model(
    backbone: AST,
    method: MethodConfig | str | Sequence,
    num_classes: int,
    pooling: str = "mean",
    extra_trainable: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    metadata: dict | None = None,
) -> PETLModel:
    """Apply ``method`` (a config, preset name, method dict, or a list for a combination).

    The backbone is modified in place (pass ``copy.deepcopy(backbone)`` to keep it) and must
    not hold PETL modules already.
    """
    methods = resolve_methods(method)
    if pooling not in backbone.poolings:
        raise ValueError(f"unknown pooling {pooling!r}; valid: {list(backbone.poolings)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for num_classes={num_classes}")
    if pooling == "cls_dist" and any(isinstance(m, PromptConfig) and not m.distillation_token for m in methods):
        raise ValueError("pooling 'cls_dist' needs the distillation token, which distillation_token=False prompts drop")
    _check_plain(backbone)
    metadata = dict(metadata or {})
    record = _backbone_record(backbone, metadata)

    trained = list(extra_parameters(backbone, extra_trainable))
    if not all(isinstance(m, BitFitConfig) for m in methods):
        # BitFit alone trains the final LayerNorm's bias only (its own selection), as published.
        trained += backbone.norm.parameters()
    for config in methods:
        if type(config) in SELECT:
            trained += SELECT[type(config)](backbone, config)

    reference = next(backbone.parameters())
    injected: list[nn.Module] = []
    with torch.device(reference.device):
        for config in methods:
            if type(config) in INJECT:
                injected += INJECT[type(config)](backbone, config)
        head = nn.Linear(backbone.config.hidden_size, num_classes)
    for module in (*injected, head):
        module.to(dtype=reference.dtype)

    backbone.requires_grad_(False)
    for param in trained:
        param.requires_grad_(True)
    for module in injected:
        for name, param in module.named_parameters():
            # LoRA keeps the frozen projection inside its wrapper; it stays as selected above.
            if not name.startswith("base."):
                param.requires_grad_(True)

    model = PETLModel(
        backbone,
        head,
        methods,
        injected,
        pooling,
        tuple(extra_trainable),
        list(class_names) if class_names is not None else None,
        metadata,
        record,
    )
    return model.train()


def _check_plain(backbone: AST) -> None:
    for index, block in enumerate(backbone.blocks):
        taps = [block.mhsa, block.ffn]
        wrapped = [n for n in block.LINEARS if not isinstance(block.linear(n), nn.Linear)]
        if (
            any(len(t.input_transforms) + len(t.output_transforms) + len(t.branches) for t in taps)
            or block.insert_tokens is not None
            or block.attn.prefix is not None
            or wrapped
        ):
            raise ValueError(
                f"backbone block {index} already holds PETL modules; build each model from a fresh "
                "backbone (e.g. copy.deepcopy of the loaded one)"
            )


def _backbone_record(backbone: AST, metadata: dict) -> dict:
    """Source, config and weight fingerprint of the pre-trained backbone, taken before training."""
    report = getattr(backbone, "load_report", None)
    digest = None
    if next(backbone.parameters()).device.type != "meta":  # meta models (parameter counting) have no weights
        digest = fingerprint(backbone)
    return {
        "source": getattr(backbone, "source", None) or metadata.get("backbone"),
        "config": backbone.config.to_dict(),
        "pos_embed": getattr(report, "pos_embed", None) or metadata.get("pos_embed", "adapt"),
        "fingerprint": digest,
    }
