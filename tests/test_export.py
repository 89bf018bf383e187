"""Exports: a PEFT folder that transformers + peft load to our logits (1e-4), for AST and the
speech encoders (raw waveforms prepared as head.json says, padded and unpadded), an ONNX file
onnxruntime runs to our logits (1e-3) at any batch size, and clear refusals."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import onnx
import onnxruntime
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from audio_fixtures import noise, tone
from serve_fixtures import FRAMES, METHODS, make_adapter
from audiopetl.backbone import load_backbone
from audiopetl.cli.main import main
from audiopetl.experiments.inference import waveform_features
from audiopetl.frontend import frontend_from_settings
from audiopetl.petl import LinearProbeConfig, LoRAConfig, build_model, load_adapter, read_adapter_metadata

SPEECH_MODELS = {
    "tiny-random-wav2vec2": "Wav2Vec2Model",
    "tiny-random-hubert": "HubertModel",
    "tiny-random-wavlm": "WavLMModel",
    "tiny-random-wav2vec2-stable": "Wav2Vec2Model",
}
MASKED = "tiny-random-wav2vec2-stable"  # LayerNorm feature encoder: takes an attention mask
SPEECH_LORA = LoRAConfig(targets=("q", "k", "v", "o", "ffn_in", "ffn_out"), reduction_rate=16)
# Our LoRA targets -> transformers' module names in every speech family.
SPEECH_TARGETS = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                  "o": "attention.out_proj", "ffn_in": "feed_forward.intermediate_dense",
                  "ffn_out": "feed_forward.output_dense"}


def features(batch: int) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 128, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("name", ["lora", "lora_wide"])
def test_peft_export_gives_our_logits(tmp_path, name):
    adapter = make_adapter(tmp_path / f"{name}.safetensors", METHODS[name], seed=3)
    out = tmp_path / "peft"
    assert main(["export", "peft", str(adapter), str(out)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head.json", "base"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    base = transformers.ASTModel.from_pretrained(out / "base").eval()
    module_names = {n for n, _ in base.named_modules()}
    # The installed transformers version's module names (PEFT may shorten them to common suffixes).
    assert config["target_modules"]
    assert all(any(n == t or n.endswith("." + t) for n in module_names) for t in config["target_modules"])
    model = peft.PeftModel.from_pretrained(base, out).eval()
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(wrapped) == len(load_adapter(adapter).lora_layers())
    head = load_file(out / "head.safetensors")
    info = json.loads((out / "head.json").read_text())
    assert info["pooling"] == "mean"
    x = features(3)
    with torch.no_grad():
        hidden = model(input_values=x).last_hidden_state
        theirs = torch.nn.functional.linear(hidden.mean(dim=1), head["weight"], head["bias"])
        ours = load_adapter(adapter).eval()(x)
    assert info["class_names"] == load_adapter(adapter).class_names
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    # The export is not a no-op: without the adapter, the base model gives other logits.
    with torch.no_grad(), model.disable_adapter():
        plain = torch.nn.functional.linear(model(input_values=x).last_hidden_state.mean(1), head["weight"], head["bias"])
    assert (plain - ours).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["adapter", "prompt_bitfit"])
def test_methods_peft_cannot_express_are_refused(tmp_path, name, capsys):
    adapter = make_adapter(tmp_path / f"{name}.safetensors", METHODS[name], seed=0)
    assert main(["export", "peft", str(adapter), str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "PEFT cannot express" in message and "export onnx" in message
    assert not (tmp_path / "out").exists()


def test_linear_probe_is_refused_for_peft(tmp_path):
    from audiopetl.export.peft import PeftExportError, export_peft

    adapter = make_adapter(tmp_path / "linear.safetensors", LinearProbeConfig(), seed=0)
    with pytest.raises(PeftExportError, match="linear"):
        export_peft(adapter, tmp_path / "out")


@pytest.mark.parametrize("name", ["lora", "adapter", "prompt_bitfit"])
def test_onnx_export_gives_our_logits_at_any_batch_size(tmp_path, name):
    adapter = make_adapter(tmp_path / f"{name}.safetensors", METHODS[name], seed=4)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(adapter), str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model.onnx")] == ["model.onnx"]
    graph = onnx.load(str(out))
    meta = {p.key: p.value for p in graph.metadata_props}
    model = load_adapter(adapter).eval()
    assert json.loads(meta["audiopetl.class_names"]) == model.class_names
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]  # export_onnx's default
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = features(batch)
        (logits,) = session.run(["logits"], {"features": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=1e-3, rtol=0)


def test_onnx_export_refuses_an_opset_it_cannot_write(tmp_path, capsys):
    # torch exports at its own opset and converts down; where that fails it keeps its own,
    # which must not pass for the opset asked for.
    adapter = make_adapter(tmp_path / "lora.safetensors", METHODS["lora"], seed=4)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(adapter), str(out), "--opset", "16"]) == 2
    assert "--opset 16" in capsys.readouterr().err  # LayerNormalization needs 17
    assert not out.exists() and list(tmp_path.iterdir()) == [adapter]


def test_peft_export_without_base_names_the_backbone(tmp_path):
    adapter = make_adapter(tmp_path / "lora.safetensors", METHODS["lora"], seed=1)
    out = tmp_path / "nested" / "peft"
    assert main(["export", "peft", str(adapter), str(out), "--no-base"]) == 0
    assert not (out / "base").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"
    assert [p.name for p in out.parent.iterdir()] == ["peft"]  # no staging folder left behind


def speech_clips(seconds: list[float]) -> list[torch.Tensor]:
    """Tones with noise and a DC offset (so normalising them matters), one per length."""
    return [torch.from_numpy(tone(300.0 * (i + 1), s) + noise(s, seed=i, amplitude=0.05) + 0.05)
            for i, s in enumerate(seconds)]


def peft_speech_logits(model, out, clips: list[torch.Tensor]) -> torch.Tensor:
    """Logits as head.json tells a transformers + PEFT user to compute them (model merged if it says so)."""
    info = json.loads((out / "head.json").read_text())
    head = load_file(out / "head.safetensors")
    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(out)
    batch = extractor([c.numpy() for c in clips], sampling_rate=info["input"]["sample_rate"], padding="max_length",
                      truncation=True, max_length=info["input"]["num_samples"], return_tensors="pt")
    attention_mask = batch["attention_mask"] if info["input"]["attention_mask"] else None
    hidden = model(input_values=batch["input_values"], attention_mask=attention_mask).last_hidden_state
    scope = {"hidden": hidden, "model": model, "attention_mask": attention_mask}
    if "frame_mask_code" in info:
        scope["frames"] = eval(info["frame_mask_code"], {}, scope)
    return torch.nn.functional.linear(eval(info["pooling_code"], {}, scope), head["weight"], head["bias"])


def predict_logits(adapter, clips: list[torch.Tensor]) -> torch.Tensor:
    """Our logits, computed as `predict` does: the recorded frontend on clips of any lengths."""
    model = load_adapter(adapter).eval()
    frontend = frontend_from_settings(model.metadata["frontend"], model.backbone)
    return model(waveform_features(frontend, clips))


@pytest.mark.parametrize("preset", list(SPEECH_MODELS))
def test_peft_export_of_a_speech_lora_gives_our_logits(tmp_path, preset):
    adapter = make_adapter(tmp_path / "lora.safetensors", SPEECH_LORA, seed=5, backbone=preset)
    ours_model = load_adapter(adapter)
    assert all(layer.lora_up.abs().min() > 0 for layer in ours_model.lora_layers())  # a trained state: B != 0
    out = tmp_path / "peft"
    assert main(["export", "peft", str(adapter), str(out)]) == 0
    info = json.loads((out / "head.json").read_text())
    assert info["input"] == {"kind": "waveform", "sample_rate": 16000, "num_samples": FRAMES * 160,
                             "normalize": True, "attention_mask": preset == MASKED}
    assert info["merge_adapter"] == (preset == "tiny-random-wavlm")  # q/k/v/o are targets
    # base/ is the backbone exactly as audiopetl built it: it loads back to the same weights.
    recorded = read_adapter_metadata(adapter)["backbone"]["fingerprint"]
    assert load_backbone(out / "base").load_report.fingerprint == recorded
    base = getattr(transformers, SPEECH_MODELS[preset]).from_pretrained(out / "base").eval()
    config = json.loads((out / "adapter_config.json").read_text())
    final_norm = "encoder.layer_norm" if preset == MASKED else "encoder.layers.2.final_layer_norm"
    assert config["modules_to_save"] == [final_norm]
    model = peft.PeftModel.from_pretrained(base, out).eval()
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert wrapped == sorted(f"encoder.layers.{i}.{SPEECH_TARGETS[t]}" for i in range(3) for t in SPEECH_LORA.targets)
    if info["merge_adapter"]:
        with torch.no_grad():  # WavLM's attention ignores an unmerged LoRA on its projections
            unmerged = peft_speech_logits(model, out, speech_clips([1.0]))
        model.merge_adapter()
    # Padded (shorter clips) and unpadded (full-length and longer, cut) batches.
    for seconds in ([0.4, 0.9, 0.65], [1.0, 1.5]):
        clips = speech_clips(seconds)
        with torch.no_grad():
            torch.testing.assert_close(peft_speech_logits(model, out, clips), predict_logits(adapter, clips),
                                       atol=1e-4, rtol=0)
    with torch.no_grad():
        ours = predict_logits(adapter, speech_clips([1.0]))
        if info["merge_adapter"]:
            assert (unmerged - ours).abs().max() > 1e-2
            model.unmerge_adapter()
        with model.disable_adapter():  # the export is not a no-op
            plain = peft_speech_logits(model, out, speech_clips([1.0]))
    assert (plain - ours).abs().max() > 1e-2


def test_wavlm_lora_on_the_feed_forward_only_needs_no_merge(tmp_path):
    lora = LoRAConfig(targets=("ffn_in", "ffn_out"), reduction_rate=16)
    adapter = make_adapter(tmp_path / "lora.safetensors", lora, seed=7, backbone="tiny-random-wavlm")
    out = tmp_path / "peft"
    assert main(["export", "peft", str(adapter), str(out)]) == 0
    assert json.loads((out / "head.json").read_text())["merge_adapter"] is False
    base = transformers.WavLMModel.from_pretrained(out / "base").eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    clips = speech_clips([0.7, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(peft_speech_logits(model, out, clips), predict_logits(adapter, clips),
                                   atol=1e-4, rtol=0)


def test_speech_peft_export_of_a_transformers_checkpoint_without_normalisation(tmp_path):
    """A HuBERT checkpoint of another shape (no projection LayerNorm, do_normalize false) round-trips."""
    config = transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_proj_layer_norm=False,
    )
    torch.manual_seed(0)
    transformers.HubertModel(config).save_pretrained(tmp_path / "hubert")
    (tmp_path / "hubert" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    adapter = make_adapter(tmp_path / "lora.safetensors", SPEECH_LORA, seed=8, backbone=str(tmp_path / "hubert"))
    out = tmp_path / "peft"
    assert main(["export", "peft", str(adapter), str(out)]) == 0
    info = json.loads((out / "head.json").read_text())
    assert info["input"]["normalize"] is False and info["backbone"] == str(tmp_path / "hubert")
    exported = json.loads((out / "base" / "config.json").read_text())
    assert exported["feat_proj_layer_norm"] is False and exported["conv_dim"] == [16, 16, 16]
    assert load_backbone(out / "base").frontend(FRAMES).config.normalize is False
    model = peft.PeftModel.from_pretrained(transformers.HubertModel.from_pretrained(out / "base"), out).eval()
    clips = speech_clips([0.6, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(peft_speech_logits(model, out, clips), predict_logits(adapter, clips),
                                   atol=1e-4, rtol=0)


RECIPE = """
import json, sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel, Wav2Vec2FeatureExtractor

out, clips_file = Path(sys.argv[1]), sys.argv[2]
info = json.loads((out / "head.json").read_text())
head = load_file(out / "head.safetensors")
model = PeftModel.from_pretrained(AutoModel.from_pretrained(out / "base"), out).eval()
if info["merge_adapter"]:
    model.merge_adapter()
clips = [t.numpy() for _, t in sorted(load_file(clips_file).items())]
batch = Wav2Vec2FeatureExtractor.from_pretrained(out)(
    clips, sampling_rate=16000, padding="max_length", truncation=True,
    max_length=info["input"]["num_samples"], return_tensors="pt")
attention_mask = batch["attention_mask"] if info["input"]["attention_mask"] else None
with torch.no_grad():
    hidden = model(input_values=batch["input_values"], attention_mask=attention_mask).last_hidden_state
    if info["input"]["attention_mask"]:
        frames = model._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
        pooled = (hidden * frames[..., None]).sum(1) / frames.sum(1, keepdim=True)
    else:
        pooled = hidden.mean(dim=1)
    logits = torch.nn.functional.linear(pooled, head["weight"], head["bias"])
save_file({"logits": logits.contiguous()}, sys.argv[3])
print(sorted(sys.modules).count("audiopetl"))
"""


@pytest.mark.parametrize("preset", [MASKED, "tiny-random-wavlm"])
def test_speech_peft_folder_works_in_a_fresh_process_without_audiopetl(tmp_path, preset):
    adapter = make_adapter(tmp_path / "lora.safetensors", SPEECH_LORA, seed=6, backbone=preset)
    out = tmp_path / "peft"
    assert main(["export", "peft", str(adapter), str(out)]) == 0
    clips = speech_clips([0.5, 1.2, 0.8])
    save_file({f"{i}": c for i, c in enumerate(clips)}, tmp_path / "clips.safetensors")
    script = tmp_path / "recipe.py"
    script.write_text(textwrap.dedent(RECIPE))
    done = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "clips.safetensors"),
                           str(tmp_path / "logits.safetensors")], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "0"  # audiopetl was not imported
    with torch.no_grad():
        torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"],
                                   predict_logits(adapter, clips), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["adapter", "prompt_bitfit"])
def test_speech_methods_peft_cannot_express_are_refused(tmp_path, name, capsys):
    adapter = make_adapter(tmp_path / f"{name}.safetensors", METHODS[name], seed=0, backbone="tiny-random-wavlm")
    assert main(["export", "peft", str(adapter), str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert f"{name}.safetensors" in message and "PEFT cannot express" in message and "export onnx" in message
    assert not (tmp_path / "out").exists()


def test_speech_lora_with_extra_trained_tensors_is_refused(tmp_path):
    from audiopetl.export.peft import PeftExportError, export_peft

    backbone = load_backbone(MASKED)
    model = build_model(copy.deepcopy(backbone), SPEECH_LORA, num_classes=2, class_names=["a", "b"],
                        extra_trainable=("pos_conv",), metadata={"frontend": backbone.frontend(FRAMES).settings})
    adapter = model.save_adapter(tmp_path / "lora_pos_conv.safetensors")
    with pytest.raises(PeftExportError, match="pos_conv"):
        export_peft(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
