"""Parameter-efficient transfer learning methods for the AST, behind one API.

    model = build_model(backbone, LoRAConfig(targets=("q", "v"), reduction_rate=128, alpha=8), num_classes=50)
    model.save_adapter("esc50-lora.safetensors")
    model = load_adapter("esc50-lora.safetensors")
"""

from .adapters import Bottleneck, Conformer, Convpass, ParallelAdapter, SequentialAdapter
from .budget import PAPER_ROWS, count_method_parameters, format_parameter_table, parameter_budget, parameter_table
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
from .files import AdapterFileError, load_adapter, load_recorded_backbone, read_adapter_metadata, save_adapter
from .lora import LoRALinear
from .moa import DenseMixture, SoftMixture
from .model import PETLModel, build_model
from .prompts import PrefixKV, PromptTokens
from .registry import (
    METHODS,
    check_compatible,
    learning_rate_family,
    method_from_dict,
    method_names,
    preset,
    preset_names,
    resolve_methods,
)

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "BitFitConfig",
    "Bottleneck",
    "Conformer",
    "Convpass",
    "DenseMixture",
    "DenseMoAConfig",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "LoRAConfig",
    "LoRALinear",
    "METHODS",
    "MethodConfig",
    "PAPER_ROWS",
    "PETLModel",
    "ParallelAdapter",
    "PrefixConfig",
    "PrefixKV",
    "PromptConfig",
    "PromptTokens",
    "SequentialAdapter",
    "SoftMixture",
    "SoftMoAConfig",
    "build_model",
    "check_compatible",
    "count_method_parameters",
    "format_parameter_table",
    "learning_rate_family",
    "load_adapter",
    "load_recorded_backbone",
    "method_from_dict",
    "method_names",
    "parameter_budget",
    "parameter_table",
    "preset",
    "preset_names",
    "read_adapter_metadata",
    "resolve_methods",
    "save_adapter",
]
