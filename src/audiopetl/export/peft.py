"""``export peft``: a LoRA adapter file as a PEFT adapter folder for transformers' ``ASTModel``.

The folder holds what PEFT itself writes (``adapter_config.json``, ``adapter_model.safetensors``:
the LoRA matrices on the installed transformers version's module names, and the trained final
LayerNorm as a ``modules_to_save`` copy of ``layernorm``), plus our head, which ``ASTModel``
has no place for: ``head.safetensors`` (``weight``, ``bias``) and ``head.json`` (pooling, class
names, frontend settings). ``base/`` (unless left out) is the backbone exactly as audiopetl
built it (position table adapted to the clip length), as a transformers checkpoint:

    base = ASTModel.from_pretrained(OUT / "base")
    model = PeftModel.from_pretrained(base, OUT)
    hidden = model(input_values=features).last_hidden_state   # features as `predict` computes them
    logits = F.linear(pool(hidden), head["weight"], head["bias"])   # pool: head.json's "pooling"

Only LoRA can be expressed: PEFT's LoRA is ``base(x) + B(A(x)) * lora_alpha / r``, ours the
same with ``scaling = alpha / RR``, so ``lora_alpha = scaling * r``. Adapters, prompts,
prefixes and BitFit have no PEFT equivalent on ``ASTModel`` and are refused, and so are
adapters on the speech encoders (wav2vec 2.0, HuBERT, WavLM): use ``export onnx`` for those.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..backbone.ast import ASTConfig
from ..backbone.checkpoint import convert_state_dict
from ..petl import LoRAConfig, load_adapter, load_recorded_backbone, method_from_dict, read_adapter_metadata
from ..petl.lora import LoRALinear

POOLING_CODE = {
    "mean": "hidden.mean(dim=1)",
    "cls": "hidden[:, 0]",
    "cls_dist": "(hidden[:, 0] + hidden[:, 1]) / 2",
}


class PeftExportError(ValueError):
    """An adapter that PEFT cannot express."""


def transformers_config(config: ASTConfig):
    """transformers' ``ASTConfig`` for our architecture (dropout off: inference)."""
    from transformers import ASTConfig as HFASTConfig

    return HFASTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_size,
        num_mel_bins=config.num_mel_bins,
        max_length=config.max_frames,
        patch_size=config.patch_size,
        frequency_stride=config.frequency_stride,
        time_stride=config.time_stride,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def transformers_names(hf_model: torch.nn.Module) -> dict[str, str]:
    """Our backbone parameter names -> the installed transformers ``ASTModel``'s, via our checkpoint reader."""
    keys = list(hf_model.state_dict())
    ours, _, _ = convert_state_dict({key: torch.tensor(float(i)) for i, key in enumerate(keys)}, "ASTModel")
    return {name: keys[int(marker)] for name, marker in ours.items()}


def check_expressible(adapter: str | Path) -> LoRAConfig:
    """The adapter's LoRA config, or :class:`PeftExportError` saying why PEFT cannot hold it."""
    header = read_adapter_metadata(adapter)
    record = header["backbone"]
    model_type = record["config"].get("model_type")  # recorded by the speech encoders' config; AST's has none
    if model_type is not None:
        raise PeftExportError(
            f"{adapter}: made for the {model_type} backbone {record.get('source')!r}; export peft writes adapters "
            "for transformers' ASTModel only (transformers' speech models take raw waveforms, so this export's "
            "features-in base model and parity check do not carry over); use `audiopetl export onnx`"
        )
    methods = [method_from_dict(values) for values in header["methods"]]
    others = [m.method for m in methods if not isinstance(m, LoRAConfig)]
    if others or not methods:
        raise PeftExportError(
            f"{adapter}: PEFT cannot express method(s) {others or ['none']}: only LoRA adapters (with their head) "
            "export to PEFT; use `audiopetl export onnx` for a self-contained model of any method"
        )
    if header["extra_trainable"]:
        raise PeftExportError(
            f"{adapter}: trains extra backbone tensors {header['extra_trainable']}, which a PEFT LoRA adapter "
            "cannot hold; use `audiopetl export onnx`"
        )
    return methods[0]


def export_peft(adapter: str | Path, out: str | Path, include_base: bool = True) -> Path:
    """Write the PEFT folder described in the module docstring to ``out``; returns it."""
    lora = check_expressible(adapter)
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import ASTModel
    except ImportError as error:
        raise RuntimeError(f"export peft needs the export extra: pip install 'audiopetl[export]' ({error})") from None
    record = read_adapter_metadata(adapter)["backbone"]
    pretrained = load_recorded_backbone(adapter, record)
    plain_state = {name: t.clone() for name, t in pretrained.state_dict().items()}
    model = load_adapter(adapter, backbone=pretrained).eval()

    base = ASTModel(transformers_config(model.backbone.config)).eval()
    names = transformers_names(base)
    base.load_state_dict({names[name]: tensor for name, tensor in plain_state.items()}, strict=True)

    layers = {name: m for name, m in model.backbone.named_modules() if isinstance(m, LoRALinear)}
    targets = {name: names[f"{name}.weight"].removesuffix(".weight") for name in layers}
    rank = next(iter(layers.values())).lora_down.shape[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed to ``out`` when complete
    try:
        if include_base:
            base.save_pretrained(staging / "base")
        config = LoraConfig(
            r=rank,
            lora_alpha=lora.scaling * rank,
            target_modules=sorted(targets.values()),
            lora_dropout=0.0,
            bias="none",
            modules_to_save=[_final_norm_name(names)],
        )
        peft_model = get_peft_model(base, config)
        with torch.no_grad():
            inner = peft_model.base_model.model
            for ours, theirs in targets.items():
                module = inner.get_submodule(theirs)
                module.lora_A["default"].weight.copy_(layers[ours].lora_down)
                module.lora_B["default"].weight.copy_(layers[ours].lora_up)
            norm = inner.get_submodule(_final_norm_name(names)).modules_to_save["default"]
            norm.weight.copy_(model.backbone.norm.weight)
            norm.bias.copy_(model.backbone.norm.bias)
        peft_model.peft_config["default"].base_model_name_or_path = record["source"]
        peft_model.save_pretrained(staging, save_embedding_layers=False)  # no hub look-up
        save_file(
            {"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
            staging / "head.safetensors",
        )
        head = {
            "pooling": model.pooling,
            "pooling_code": POOLING_CODE[model.pooling],
            "class_names": model.class_names,
            "frontend": model.metadata.get("frontend"),
            "backbone": record["source"],
            "adapter": Path(adapter).name,
        }
        (staging / "head.json").write_text(json.dumps(head, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _final_norm_name(names: dict[str, str]) -> str:
    return re.sub(r"\.weight$", "", names["norm.weight"])
