"""Tiny random transformers AST models and checkpoints in the real on-disk formats.

For tests only (imports transformers). Every parameter is random and non-trivial,
including the position table and the special tokens (transformers initialises those to
zeros), so a wrong key mapping shows in the outputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import ASTConfig, ASTForAudioClassification, ASTModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_length=100)


def tiny_ast_config(**overrides) -> ASTConfig:
    """A 2-layer, 32-wide transformers ``ASTConfig`` (128 mel bins, 100 frames) with overrides."""
    return ASTConfig(**{**TINY, **overrides})


def vit_b_config(**overrides) -> ASTConfig:
    """The AudioSet AST architecture (ViT-B, 1024 frames) with overrides."""
    return ASTConfig(**overrides)


def random_hf_model(
    config: ASTConfig, classification: bool = False, seed: int = 0, attn_implementation: str = "sdpa"
) -> ASTModel | ASTForAudioClassification:
    """A transformers AST (eval mode) whose every parameter is random."""
    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = (ASTForAudioClassification if classification else ASTModel)(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.05)
    return model.eval()


def classic_state_dict(model: ASTModel | ASTForAudioClassification) -> dict[str, torch.Tensor]:
    """The model's tensors under the classic names that ``save_pretrained`` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(Path(tmp) / "model.safetensors")


def save_tiny_hf_checkpoint(
    directory: str | Path,
    safetensors: bool = True,
    classification: bool = False,
    new_names: bool = False,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Save a random tiny transformers AST to ``directory`` (config.json + weights); returns it.

    ``safetensors``: ``model.safetensors`` via ``save_pretrained`` (classic key names, or the
    transformers 5 in-memory names with ``new_names``); else ``pytorch_model.bin`` written by
    ``torch.save`` with the classic names, since transformers 5 ``save_pretrained`` only
    writes safetensors. Reload the reference with ``ASTModel.from_pretrained(directory)``.
    """
    directory = Path(directory)
    model = random_hf_model(tiny_ast_config(**config_overrides), classification, seed)
    if safetensors:
        model.save_pretrained(directory, save_original_format=not new_names)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(directory)
        torch.save(classic_state_dict(model), directory / "pytorch_model.bin")
    return directory


def tiny_original_state_dict(model: ASTModel, num_classes: int = 5) -> dict[str, torch.Tensor]:
    """``model``'s weights in the original AST release layout (``audioset_10_10_0.4593.pth``).

    DataParallel ``module.`` prefix, timm names with fused qkv, and the heads the release
    carries: the AudioSet ``mlp_head`` and DeiT's ``v.head`` / ``v.head_dist``.
    """
    hidden = model.config.hidden_size
    emb = model.embeddings
    state = {
        "v.cls_token": emb.cls_token,
        "v.dist_token": emb.distillation_token,
        "v.pos_embed": emb.position_embeddings,
        "v.patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
        "v.patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
        "v.norm.weight": model.layernorm.weight,
        "v.norm.bias": model.layernorm.bias,
    }
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        prefix = f"v.blocks.{i}."
        for leaf in ("weight", "bias"):
            state[prefix + f"norm1.{leaf}"] = getattr(layer.layernorm_before, leaf)
            state[prefix + f"norm2.{leaf}"] = getattr(layer.layernorm_after, leaf)
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)  # timm stacks them in this order
            state[prefix + f"attn.qkv.{leaf}"] = torch.cat([getattr(p, leaf) for p in qkv])
            state[prefix + f"attn.proj.{leaf}"] = getattr(attn.o_proj, leaf)
            state[prefix + f"mlp.fc1.{leaf}"] = getattr(layer.mlp.fc1, leaf)
            state[prefix + f"mlp.fc2.{leaf}"] = getattr(layer.mlp.fc2, leaf)
    heads = {
        "mlp_head.0.weight": torch.ones(hidden),
        "mlp_head.0.bias": torch.zeros(hidden),
        "mlp_head.1.weight": torch.randn(num_classes, hidden),
        "mlp_head.1.bias": torch.zeros(num_classes),
        "v.head.weight": torch.randn(1000, hidden),
        "v.head.bias": torch.zeros(1000),
        "v.head_dist.weight": torch.randn(1000, hidden),
        "v.head_dist.bias": torch.zeros(1000),
    }
    return {f"module.{k}": v.detach().clone() for k, v in {**state, **heads}.items()}


def hf_hidden(model: ASTModel, features: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last LayerNorm) of a transformers ``ASTModel``."""
    with torch.no_grad():
        return model(features).last_hidden_state


def features(batch: int, frames: int, mel: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, mel, generator=torch.Generator().manual_seed(seed))
