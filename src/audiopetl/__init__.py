"""audiopetl: parameter-efficient transfer learning of Audio Spectrogram Transformers.

    backbone = audiopetl.load_backbone("MIT/ast-finetuned-audioset-10-10-0.4593", max_frames=500)
    model = audiopetl.build_model(backbone, method=LoRAConfig(), num_classes=50)
    model.save_adapter("esc50-lora.safetensors")
    model = audiopetl.load_adapter("esc50-lora.safetensors")
"""

from .backbone import AST, ASTConfig, load_backbone
from .petl import (
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    LinearProbeConfig,
    LoRAConfig,
    PETLModel,
    PrefixConfig,
    PromptConfig,
    build_model,
    load_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "AST",
    "ASTConfig",
    "AdapterConfig",
    "BitFitConfig",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "LoRAConfig",
    "PETLModel",
    "PrefixConfig",
    "PromptConfig",
    "build_model",
    "load_adapter",
    "load_backbone",
]
