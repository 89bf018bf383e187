"""``export peft``: a LoRA adapter file as a PEFT adapter folder for transformers.

The backbone becomes transformers' ``ASTModel``, ``Wav2Vec2Model``, ``HubertModel`` or
``WavLMModel``. The folder holds what PEFT itself writes (``adapter_config.json``,
``adapter_model.safetensors``: the LoRA matrices on the installed transformers version's
module names, and the trained final LayerNorm as a ``modules_to_save`` copy: AST's
``layernorm``; the speech encoders' ``encoder.layer_norm`` in the pre-LN "stable layer norm"
layout, the last layer's ``final_layer_norm`` in the post-LN one), plus our head, which the
base models have no place for: ``head.safetensors`` (``weight``, ``bias``) and ``head.json``
(pooling, class names, frontend settings). ``base/`` (unless left out) is the backbone exactly
as audiopetl built it (AST: position table adapted to the clip length), as a transformers
checkpoint for inference (dropout off; the speech encoders also without LayerDrop and
SpecAugment masking).

AST takes the filterbank features ``predict`` computes::

    base = ASTModel.from_pretrained(OUT / "base")
    model = PeftModel.from_pretrained(base, OUT)
    hidden = model(input_values=features).last_hidden_state   # features as `predict` computes them
    logits = F.linear(pool(hidden), head["weight"], head["bias"])   # pool: head.json's "pooling"

The speech encoders take the raw waveform, prepared as ``predict`` prepares it (head.json's
``input``): 16 kHz float audio in [-1, 1], channels averaged (soxr HQ resampling where a file
has another rate, as ``predict`` decodes); each clip cut to ``input.num_samples``
samples (``max_frames`` 10-ms steps); with ``input.normalize``, scaled to zero mean and unit
variance over its own samples (``(x - mean) / sqrt(var + 1e-7)``); then zero-padded to
``input.num_samples``, whatever the batch. transformers' feature extractor does exactly this
with the ``preprocessor_config.json`` written to ``OUT`` (and ``base/``)::

    extractor = Wav2Vec2FeatureExtractor.from_pretrained(OUT)
    batch = extractor(clips, sampling_rate=16000, padding="max_length", truncation=True,
                      max_length=info["input"]["num_samples"], return_tensors="pt")
    mask = batch["attention_mask"] if info["input"]["attention_mask"] else None
    hidden = model(input_values=batch["input_values"], attention_mask=mask).last_hidden_state

``return_attention_mask`` is on there because the normalisation needs each clip's length;
only models with ``input.attention_mask`` (``feat_extract_norm == "layer"``: the large
"stable layer norm" checkpoints) take the mask: the group-normed ones see the zero padding as
input, as they were trained. Pooling is the mean over frames: over every frame without a
mask, over the clip's frames with one (``pooling_code``, with ``frames = `` head.json's
``frame_mask_code``: the masked mean transformers' ``Wav2Vec2ForSequenceClassification`` computes).

transformers' ``WavLMAttention`` hands the ``q_proj``/``k_proj``/``v_proj``/``out_proj``
weights to ``F.multi_head_attention_forward`` instead of calling those modules, so an
unmerged PEFT LoRA on them has no effect: head.json's ``merge_adapter`` is then true and the
model must be merged first (``model.merge_adapter()`` or ``merge_and_unload()``).

Only LoRA can be expressed: PEFT's LoRA is ``base(x) + B(A(x)) * lora_alpha / r``, ours the
same with ``scaling = alpha / RR``, so ``lora_alpha = scaling * r``. Adapters, prompts,
prefixes, BitFit and extra trained backbone tensors have no PEFT LoRA equivalent and are
refused: use ``export onnx`` for those.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..backbone import wav2vec2
from ..backbone.ast import ASTConfig
from ..backbone.checkpoint import convert_state_dict
from ..backbone.wav2vec2 import SpeechConfig
from ..frontend import frontend_from_settings
from ..petl import LoRAConfig, load_adapter, load_recorded_backbone, method_from_dict, read_adapter_metadata
from ..petl.lora import LoRALinear

POOLING_CODE = {
    "mean": "hidden.mean(dim=1)",
    "cls": "hidden[:, 0]",
    "cls_dist": "(hidden[:, 0] + hidden[:, 1]) / 2",
}
# The speech models with an attention mask: mean over the clip's frames, as transformers'
# Wav2Vec2ForSequenceClassification pools (``frames``: ``FRAME_MASK_CODE``, True for the clip's frames).
MASKED_MEAN_CODE = "(hidden * frames[..., None]).sum(1) / frames.sum(1, keepdim=True)"
FRAME_MASK_CODE = "model._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)"
# transformers' (config, model) class names of each speech family.
SPEECH_CLASSES = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "hubert": ("HubertConfig", "HubertModel"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
}
ATTENTION_TARGETS = ("q", "k", "v", "o")


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


def speech_transformers_config(config: SpeechConfig):
    """transformers' ``Wav2Vec2Config`` / ``HubertConfig`` / ``WavLMConfig`` for our architecture
    (the reverse of :func:`~audiopetl.backbone.wav2vec2.config_from_transformers`), for inference:
    no dropout or LayerDrop, and no SpecAugment masking (whose learned ``masked_spec_embed``
    our backbone does not have)."""
    import transformers

    extra = {}
    if config.model_type == "hubert":
        extra["feat_proj_layer_norm"] = config.feat_proj_layer_norm
    if config.model_type == "wavlm":
        extra.update(num_buckets=config.num_buckets, max_bucket_distance=config.max_bucket_distance)
    config_class = getattr(transformers, SPEECH_CLASSES[config.model_type][0])
    return config_class(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_size,
        conv_dim=list(config.conv_dim),
        conv_kernel=list(config.conv_kernel),
        conv_stride=list(config.conv_stride),
        conv_bias=config.conv_bias,
        feat_extract_norm=config.feat_extract_norm,
        do_stable_layer_norm=config.stable_layer_norm,
        num_conv_pos_embeddings=config.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=config.num_conv_pos_embedding_groups,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="gelu",
        feat_extract_activation="gelu",
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        **extra,
    )


def transformers_base(config: ASTConfig | SpeechConfig) -> torch.nn.Module:
    """An untrained transformers base model of our architecture, in eval mode."""
    if isinstance(config, SpeechConfig):
        import transformers

        model_class = getattr(transformers, SPEECH_CLASSES[config.model_type][1])
        return model_class(speech_transformers_config(config)).eval()
    from transformers import ASTModel

    return ASTModel(transformers_config(config)).eval()


def transformers_names(hf_model: torch.nn.Module, config: ASTConfig | SpeechConfig | None = None) -> dict[str, str]:
    """Our backbone parameter names -> the installed transformers model's, via our checkpoint
    readers (AST's, or the speech family's for a :class:`SpeechConfig`)."""
    keys = list(hf_model.state_dict())
    markers = {key: torch.tensor(float(i)) for i, key in enumerate(keys)}
    if isinstance(config, SpeechConfig):
        ours, _ = wav2vec2.convert_state_dict(markers, config, type(hf_model).__name__)
    else:
        ours, _, _ = convert_state_dict(markers, "ASTModel")
    return {name: keys[int(marker)] for name, marker in ours.items()}


def check_expressible(adapter: str | Path) -> LoRAConfig:
    """The adapter's LoRA config, or :class:`PeftExportError` saying why PEFT cannot hold it."""
    header = read_adapter_metadata(adapter)
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
        from transformers import Wav2Vec2FeatureExtractor
    except ImportError as error:
        raise RuntimeError(f"export peft needs the export extra: pip install 'audiopetl[export]' ({error})") from None
    record = read_adapter_metadata(adapter)["backbone"]
    pretrained = load_recorded_backbone(adapter, record)
    plain_state = {name: t.clone() for name, t in pretrained.state_dict().items()}
    model = load_adapter(adapter, backbone=pretrained).eval()
    config = model.backbone.config
    speech = isinstance(config, SpeechConfig)

    base = transformers_base(config)
    names = transformers_names(base, config)
    base.load_state_dict({names[name]: tensor for name, tensor in plain_state.items()}, strict=True)

    layers = {name: m for name, m in model.backbone.named_modules() if isinstance(m, LoRALinear)}
    targets = {name: names[f"{name}.weight"].removesuffix(".weight") for name in layers}
    norm_name = next(name for name, m in model.backbone.named_modules() if m is model.backbone.norm)
    final_norm = names[f"{norm_name}.weight"].removesuffix(".weight")
    rank = next(iter(layers.values())).lora_down.shape[0]
    head = {
        "pooling": model.pooling,
        "pooling_code": POOLING_CODE[model.pooling],
        "class_names": model.class_names,
        "frontend": model.metadata.get("frontend"),
        "backbone": record["source"],
        "adapter": Path(adapter).name,
    }
    extractor = None
    if speech:
        frontend = frontend_from_settings(model.metadata["frontend"], model.backbone)
        head["input"] = {
            "kind": "waveform",
            "sample_rate": frontend.sample_rate,
            "num_samples": frontend.max_samples,
            "normalize": frontend.config.normalize,
            "attention_mask": frontend.config.attention_mask,
        }
        if frontend.config.attention_mask:
            head.update(pooling_code=MASKED_MEAN_CODE, frame_mask_code=FRAME_MASK_CODE)
        # transformers' WavLMAttention reads these projections' weights (see the module docstring).
        head["merge_adapter"] = config.model_type == "wavlm" and any(t in ATTENTION_TARGETS for t in lora.targets)
        extractor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=frontend.sample_rate, padding_value=0.0,
            do_normalize=frontend.config.normalize, return_attention_mask=True,
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed to ``out`` when complete
    try:
        if include_base:
            base.save_pretrained(staging / "base")
            if extractor is not None:
                extractor.save_pretrained(staging / "base")  # its do_normalize: what audiopetl reads back
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=lora.scaling * rank,
            target_modules=sorted(targets.values()),
            lora_dropout=0.0,
            bias="none",
            modules_to_save=[final_norm],
        )
        peft_model = get_peft_model(base, peft_config)
        with torch.no_grad():
            inner = peft_model.base_model.model
            for ours, theirs in targets.items():
                module = inner.get_submodule(theirs)
                module.lora_A["default"].weight.copy_(layers[ours].lora_down)
                module.lora_B["default"].weight.copy_(layers[ours].lora_up)
            norm = inner.get_submodule(final_norm).modules_to_save["default"]
            norm.weight.copy_(model.backbone.norm.weight)
            norm.bias.copy_(model.backbone.norm.bias)
        peft_model.peft_config["default"].base_model_name_or_path = record["source"]
        peft_model.save_pretrained(staging, save_embedding_layers=False)  # no hub look-up
        if extractor is not None:
            extractor.save_pretrained(staging)
        save_file(
            {"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
            staging / "head.safetensors",
        )
        (staging / "head.json").write_text(json.dumps(head, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
