"""Exports: a PEFT folder that transformers + peft load to our logits (1e-4), an ONNX file
onnxruntime runs to our logits (1e-3) at any batch size, and clear refusals."""

from __future__ import annotations

import json

import onnx
import onnxruntime
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from serve_fixtures import FRAMES, METHODS, make_adapter
from audiopetl.cli.main import main
from audiopetl.petl import LinearProbeConfig, load_adapter


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
