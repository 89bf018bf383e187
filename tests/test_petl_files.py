"""Adapter files: exact round trips, refusal of other backbones and corrupt files, size, atomic writes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from audiopetl.integrity import tensor_checksum
from audiopetl.backbone import AST, ASTConfig, load_backbone
from audiopetl.petl import (
    AdapterConfig,
    AdapterFileError,
    BitFitConfig,
    LoRAConfig,
    PrefixConfig,
    PromptConfig,
    build_model,
    load_adapter,
    read_adapter_metadata,
)

FRAMES = 100  # a short input keeps the tiny-random backbone fast
CLASSES = ["dog", "rain", "siren"]
METHODS = {
    "lora": LoRAConfig(targets=("q", "v"), reduction_rate=16),
    "adapter+dpt+lora": [AdapterConfig(module="convpass", location="ffn", reduction_rate=16), PromptConfig(3),
                         LoRAConfig(reduction_rate=32)],
    "bitfit+prefix": [BitFitConfig(), PrefixConfig(4)],
    "full": "full",
}


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random", max_frames=FRAMES)


def features(config: ASTConfig) -> torch.Tensor:
    return torch.randn(2, config.max_frames, config.num_mel_bins, generator=torch.Generator().manual_seed(3))


def trained(backbone: AST, method) -> torch.nn.Module:
    """A model whose every trainable tensor has moved away from its initial value."""
    model = build_model(copy.deepcopy(backbone), method, num_classes=3, class_names=CLASSES,
                        metadata={"frontend": {"max_frames": FRAMES}, "dataset": "toy"})
    torch.manual_seed(7)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", list(METHODS))
def test_round_trip_reproduces_outputs_exactly(tiny, tmp_path, name):
    model = trained(tiny, METHODS[name])
    path = model.save_adapter(tmp_path / "sub" / "adapter.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]  # no temporary file left
    loaded = load_adapter(path, backbone=copy.deepcopy(tiny)).eval()
    x = features(tiny.config)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.methods == model.methods and loaded.class_names == CLASSES
    assert loaded.metadata == {"frontend": {"max_frames": FRAMES}, "dataset": "toy"}


def test_load_fetches_the_backbone_named_in_the_file(tiny, tmp_path):
    model = trained(tiny, METHODS["lora"])
    path = model.save_adapter(tmp_path / "a.safetensors", extra_metadata={"split": "fold1"})
    header = read_adapter_metadata(path)
    assert header["backbone"]["source"] == "tiny-random" and header["backbone"]["config"]["max_frames"] == FRAMES
    assert header["metadata"]["split"] == "fold1"
    loaded = load_adapter(path).eval()
    x = features(tiny.config)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_file_holds_only_trained_tensors(tiny, tmp_path):
    from safetensors import safe_open

    model = trained(tiny, METHODS["lora"])
    path = model.save_adapter(tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {n for n, p in model.named_parameters() if p.requires_grad}
        assert all("lora_" in k or k.startswith(("head.", "backbone.norm.")) for k in handle.keys())


def test_fingerprint_is_taken_before_training_backbone_tensors(tiny, tmp_path):
    # BitFit trains backbone biases: the file must still match the untouched pre-trained backbone.
    model = trained(tiny, BitFitConfig())
    path = model.save_adapter(tmp_path / "a.safetensors")
    assert read_adapter_metadata(path)["backbone"]["fingerprint"] == tiny.load_report.fingerprint
    load_adapter(path, backbone=copy.deepcopy(tiny))


def test_other_backbone_weights_are_refused(tiny, tmp_path):
    path = trained(tiny, METHODS["lora"]).save_adapter(tmp_path / "a.safetensors")
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.blocks[0].attn.q.weight.add_(1e-3)
    with pytest.raises(AdapterFileError, match="fingerprint"):
        load_adapter(path, backbone=other)


def test_other_backbone_config_is_refused(tiny, tmp_path):
    path = trained(tiny, METHODS["lora"]).save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(AdapterFileError, match="max_frames"):
        load_adapter(path, backbone=load_backbone("tiny-random", max_frames=200))


def test_saving_while_merged_is_refused(tiny, tmp_path):
    model = trained(tiny, METHODS["lora"])
    model.merge_lora()
    with pytest.raises(ValueError, match="unmerge"):
        model.save_adapter(tmp_path / "a.safetensors")


def test_corrupt_files_are_refused(tiny, tmp_path):
    good = trained(tiny, METHODS["lora"]).save_adapter(tmp_path / "good.safetensors")
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for path in (truncated, garbage, foreign):
        with pytest.raises(AdapterFileError):
            load_adapter(path, backbone=copy.deepcopy(tiny))

    header = read_adapter_metadata(good)
    tensors = load_file(str(good))
    tensors["head.weight"] = torch.zeros(5, 5)
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file(tensors, str(wrong_shape), metadata={"audiopetl": json.dumps(header)})
    with pytest.raises(AdapterFileError, match="head.weight"):
        load_adapter(wrong_shape, backbone=copy.deepcopy(tiny))
    del tensors["head.weight"]
    missing = tmp_path / "missing.safetensors"
    save_file(tensors, str(missing), metadata={"audiopetl": json.dumps(header)})
    with pytest.raises(AdapterFileError, match="missing"):
        load_adapter(missing, backbone=copy.deepcopy(tiny))


def test_vit_b_esc50_files_are_well_under_2mb(tmp_path):
    # ViT-B with ESC-50's 5 s clips (500 frames) and 50 classes; the layer shapes decide the size.
    torch.manual_seed(0)
    backbone = AST(ASTConfig(max_frames=500))
    for name in ("lora", "bottleneck_pf_par", "convpass_pf_par"):
        model = build_model(copy.deepcopy(backbone), name, num_classes=50)
        size = model.save_adapter(tmp_path / f"{name}.safetensors").stat().st_size
        assert size < 1.3e6, (name, size)


def test_half_precision_adapter_files_halve_the_size_and_load_back(tmp_path):
    # Houlsby on ViT-B at ESC-50's shape is ~2.2 MB in fp32; fp16 storage ships it well under 2 MB.
    torch.manual_seed(0)
    backbone = AST(ASTConfig(max_frames=500))
    model = build_model(copy.deepcopy(backbone), "bottleneck_hou_par", num_classes=50)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.normal_(std=0.02)
    full = model.save_adapter(tmp_path / "fp32.safetensors").stat().st_size
    half_path = model.save_adapter(tmp_path / "fp16.safetensors", dtype="fp16")
    assert half_path.stat().st_size < 1.2e6 < full
    reloaded = load_adapter(half_path, backbone=backbone)
    for name, tensor in model.adapter_state_dict().items():
        assert reloaded.adapter_state_dict()[name].dtype == torch.float32
        torch.testing.assert_close(reloaded.adapter_state_dict()[name], tensor, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="fp16"):
        model.save_adapter(tmp_path / "x.safetensors", dtype="int8")


def test_flipped_bytes_and_non_finite_tensors_are_refused_naming_the_file(tiny, tmp_path):
    """Issue 10 items 6-7: a checksum of the tensors in the header catches a flipped byte;
    NaN tensors are never written and never loaded."""
    model = trained(tiny, METHODS["lora"])
    good = model.save_adapter(tmp_path / "good.safetensors")
    data = bytearray(good.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="flipped.safetensors.*corrupt"):
        load_adapter(flipped, backbone=copy.deepcopy(tiny))

    header = read_adapter_metadata(good)
    tensors = load_file(str(good))
    tensors["head.bias"] = torch.full_like(tensors["head.bias"], float("nan"))
    header["checksum"] = tensor_checksum(tensors)  # a consistent file of NaNs
    nan_file = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_file), metadata={"audiopetl": json.dumps(header)})
    with pytest.raises(AdapterFileError, match="nan.safetensors.*NaN"):
        load_adapter(nan_file, backbone=copy.deepcopy(tiny))

    del header["checksum"]  # a file written before adapter files carried a checksum: refused, not called corrupt
    unverifiable = tmp_path / "unverifiable.safetensors"
    save_file(load_file(str(good)), str(unverifiable), metadata={"audiopetl": json.dumps(header)})
    with pytest.raises(AdapterFileError, match="unverifiable.safetensors.*no tensor checksum"):
        load_adapter(unverifiable, backbone=copy.deepcopy(tiny))

    with torch.no_grad():
        model.head.bias.fill_(float("inf"))
    with pytest.raises(ValueError, match="head.bias"):
        model.save_adapter(tmp_path / "inf.safetensors")
    assert not (tmp_path / "inf.safetensors").exists()
