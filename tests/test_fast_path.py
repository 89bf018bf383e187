"""The fast path: every knob computes the same function as with it off, at small size.

Knobs: the fused q/k/v GEMM (``AST.set_fused_qkv``), frozen weights stored in bf16
(``PETLModel.cast_frozen``), fused AdamW (``LoopSettings.fused_adamw``), ``torch.compile``
(``AST.compile_blocks``; ``TrainConfig.compile``, default on for CUDA only).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audiopetl.backbone import AST, ASTConfig
from audiopetl.backbone.checkpoint import CANONICAL_KEY, fingerprint_state_dict
from audiopetl.petl import (
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    LoRAConfig,
    PrefixConfig,
    PromptConfig,
    build_model,
    load_adapter,
)

TINY = ASTConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_size=64, num_mel_bins=32, max_frames=48)
METHODS = {
    "full": FullFinetuneConfig(),
    "bitfit": BitFitConfig(),
    "lora_qv": LoRAConfig(targets=("q", "v"), reduction_rate=8),
    "lora_all": LoRAConfig(targets=("q", "k", "v", "o", "ffn_in", "ffn_out"), reduction_rate=8),
    "adapter_pf_par": AdapterConfig(reduction_rate=8),
    "dpt": PromptConfig(num_prompts=3, deep=True),
    "prefix+lora": [PrefixConfig(num_tokens=4), LoRAConfig(targets=("k",), reduction_rate=8)],
}


def model_for(method, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(AST(TINY), method, num_classes=5)
    with torch.no_grad():  # a trained state: LoRA's B and adapters' up-projections non-zero
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, TINY.max_frames, TINY.num_mel_bins, generator=generator), torch.tensor([0, 3, 4])


def loss_and_grads(model, features, labels, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(features).float()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(model, other, tolerance: float = 1e-5, grad_rtol: float = 1e-4):
    """Both models give the same fp32 logits and gradients on one batch."""
    features, labels = batch()
    logits, grads = loss_and_grads(model, features, labels)
    logits_other, grads_other = loss_and_grads(other, features, labels)
    torch.testing.assert_close(logits, logits_other, atol=tolerance, rtol=tolerance)
    assert grads.keys() == grads_other.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], grads_other[key], atol=tolerance, rtol=grad_rtol, msg=key)


@pytest.mark.parametrize("name", METHODS)
def test_fused_qkv_computes_the_same_logits_and_gradients(name):
    fused = model_for(METHODS[name])
    fused.backbone.set_fused_qkv(True)
    separate = copy.deepcopy(fused)
    separate.backbone.set_fused_qkv(False)
    assert_same_step(fused, separate)


@pytest.mark.parametrize("name", METHODS)
def test_matmul_attention_computes_what_sdpa_does(name):
    """Prefix tuning included: its keys and values join the sequence the kernel attends over."""
    matmul = model_for(METHODS[name])
    matmul.backbone.set_attention_kernel("matmul")
    sdpa = copy.deepcopy(matmul)
    sdpa.backbone.set_attention_kernel("sdpa")
    assert_same_step(matmul, sdpa)
    features, _ = batch()
    with torch.no_grad():
        scale = sdpa(features).abs().max()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 inputs, the softmax in fp32
            assert (matmul(features).float() - sdpa(features).float()).abs().max() <= 0.02 * scale


def test_attention_kernel_defaults_to_matmul_for_short_bf16_training_passes_on_cpu_only():
    from audiopetl.backbone.ast import MATMUL_ATTENTION_MAX_KEYS, attention_kernel

    def qk(keys, dtype=torch.bfloat16, device="cpu", grad=True):
        q = torch.zeros(1, 1, 4, 8, dtype=dtype, device=device, requires_grad=grad)
        return q, torch.zeros(1, 1, keys, 8, dtype=dtype, device=device)

    assert attention_kernel(None, *qk(MATMUL_ATTENTION_MAX_KEYS)) == "matmul"
    assert attention_kernel(None, *qk(MATMUL_ATTENTION_MAX_KEYS + 1)) == "sdpa"
    assert attention_kernel(None, *qk(10, dtype=torch.float32)) == "sdpa"
    assert attention_kernel(None, *qk(10, grad=False)) == "sdpa"  # inference
    assert attention_kernel(None, *qk(10, device="meta")) == "sdpa"  # not a CPU
    assert attention_kernel("matmul", *qk(10_000, grad=False)) == "matmul"
    assert AST(TINY).blocks[0].attn.kernel is None
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'.*sdpa"):
        AST(TINY).set_attention_kernel("flash")


@pytest.mark.parametrize("name", ["lora_qv", "adapter_pf_par", "full"])
def test_bf16_fast_path_stays_within_bf16_tolerance_of_fp32(name):
    reference = model_for(METHODS[name])
    fast = copy.deepcopy(reference)
    fast.cast_frozen(torch.bfloat16)
    fast.backbone.set_fused_qkv(True)
    features, labels = batch()
    logits_ref, _ = loss_and_grads(reference, features, labels)
    logits_fast, grads_fast = loss_and_grads(fast, features, labels, torch.bfloat16)
    separate = copy.deepcopy(fast)
    separate.backbone.set_fused_qkv(False)
    logits_sep, _ = loss_and_grads(separate, features, labels, torch.bfloat16)
    scale = logits_ref.abs().max().item()
    assert (logits_fast - logits_ref).abs().max().item() <= 0.05 * scale
    assert (logits_fast - logits_sep).abs().max().item() <= 0.05 * scale
    assert all(torch.isfinite(g).all() for g in grads_fast.values())


def test_merged_lora_takes_the_fused_path_unchanged():
    model = model_for(LoRAConfig(targets=("q", "k", "v"), reduction_rate=8)).eval()
    model.backbone.set_fused_qkv(True)
    features, _ = batch()
    with torch.no_grad():
        unmerged = model(features)
        model.merge_lora()
        merged = model(features)
        model.backbone.set_fused_qkv(False)
        merged_separate = model(features)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_separate, merged, atol=1e-5, rtol=1e-5)


class Doubled(nn.Module):
    """A replacement projection the fused path does not know: the layer must fall back."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    def forward(self, x):
        return 2 * self.base(x)


def test_an_unknown_projection_module_falls_back_to_separate_projections():
    torch.manual_seed(0)
    backbone = AST(TINY).eval()
    backbone.set_fused_qkv(True)
    reference = copy.deepcopy(backbone)
    features, _ = batch()
    for model in (backbone, reference):
        for block in model.blocks:
            block.replace_linear("k", Doubled(block.linear("k")))
    reference.set_fused_qkv(False)
    with torch.no_grad():
        torch.testing.assert_close(backbone(features), reference(features), atol=1e-5, rtol=1e-5)
        backbone.set_fused_qkv(False)
        assert not torch.allclose(backbone(features), AST(TINY).eval()(features))


def test_state_dict_keys_fingerprint_and_adapter_files_are_unchanged(tmp_path):
    torch.manual_seed(0)
    backbone = AST(TINY).eval()
    keys = list(backbone.state_dict())
    assert all(CANONICAL_KEY.fullmatch(key) for key in keys)
    assert "blocks.0.attn.q.weight" in keys and not any("qkv" in key for key in keys)
    fingerprint = fingerprint_state_dict(backbone.state_dict())
    model = build_model(copy.deepcopy(backbone), METHODS["lora_qv"], num_classes=5)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05)
    assert model.backbone_record["fingerprint"] == fingerprint
    path = model.save_adapter(tmp_path / "adapter.safetensors")
    loaded = load_adapter(path, backbone=copy.deepcopy(backbone)).eval()
    features, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), model.eval()(features), atol=1e-6, rtol=1e-6)


def saved_tensors(model, features, labels):
    """Every tensor autograd saves for the backward of one training step (shapes, storages)."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(model(features), labels)
    return saved


def test_the_fused_gemm_saves_no_copy_of_the_frozen_weights():
    model = model_for(METHODS["adapter_pf_par"])
    model.backbone.set_fused_qkv(True)
    features, labels = batch()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = saved_tensors(model, features, labels)
    fused_shape = (3 * TINY.hidden_size, TINY.hidden_size)
    assert not [t for t in saved if tuple(t.shape) == fused_shape]
    new_bytes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    fused_bytes = sum(n for ptr, n in new_bytes.items() if ptr not in params)
    model.backbone.set_fused_qkv(False)
    saved = saved_tensors(model, features, labels)
    new_bytes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    assert fused_bytes <= sum(n for ptr, n in new_bytes.items() if ptr not in params)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_adamw_takes_the_same_steps(tmp_path, fused):
    import numpy as np

    from audiopetl.train.loop import Batches, LoopSettings, fit

    torch.manual_seed(0)
    inputs = np.random.default_rng(0).standard_normal((12, TINY.max_frames, TINY.num_mel_bins)).astype(np.float32)
    labels = np.arange(12) % 5
    results = {}
    for choice in (False, fused):
        model = model_for(METHODS["lora_qv"])
        data = Batches(inputs, labels, np.arange(12))
        settings = LoopSettings(epochs=2, batch_size=4, lr=1e-2, progress=False, fused_adamw=choice)
        fit(model, data, data, data, settings, tmp_path / f"run{choice}")
        results[choice] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name in results[False]:
        torch.testing.assert_close(results[fused][name], results[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_qkv_defaults_to_cuda_only():
    attention = AST(TINY).blocks[0].attn
    assert attention.fused_qkv is None  # decided per call from the input's device
    calls = []
    attention.q.register_forward_hook(lambda *args: calls.append("q"))
    attention(torch.randn(1, 4, TINY.hidden_size))
    assert calls == ["q"]  # on the CPU: the separate projections ran


def test_compile_defaults_to_cuda_only():
    from audiopetl.train import TrainConfig

    assert TrainConfig(dataset="folder", data_root=".").compile is None


def test_regionally_compiled_blocks_match_eager_and_keep_names():
    model = model_for(METHODS["dpt"])
    model.backbone.set_fused_qkv(True)
    reference = copy.deepcopy(model)
    model.backbone.compile_blocks()
    assert list(model.state_dict()) == list(reference.state_dict())
    assert_same_step(model, reference, tolerance=1e-4, grad_rtol=1e-3)


def test_the_cuda_fast_path_trains_the_demo_dataset_to_the_fp32_accuracy(tmp_path):
    """Every knob on by default on CUDA (bf16 with frozen weights in bf16, fused q/k/v, compiled
    blocks, fused AdamW), forced on here, against fp32 with every knob off: the same demo run
    (tiny random AST, generated sounds) must reach the same test accuracy."""
    from audiopetl.backbone.presets import TINY_RANDOM
    from audiopetl.data import get_dataset
    from audiopetl.experiments.demo import DEMO_METHODS
    from audiopetl.experiments.synthetic import make_synthetic_dataset
    from audiopetl.train import TrainConfig, run_training

    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=24, seconds=1.0)
    accuracy = {}
    for name, knobs in {
        "fp32": dict(precision="fp32", fused_qkv=False, compile=False, fused_adamw=False),
        "fast": dict(precision="bf16", fused_qkv=True, compile=True, fused_adamw=True),
    }.items():
        config = TrainConfig(
            dataset="folder", data_root=str(data), method=DEMO_METHODS["lora"], backbone=TINY_RANDOM, max_frames=100,
            epochs=20, batch_size=16, cache_dir=str(tmp_path / "cache"), progress=False, **knobs,
        )
        summary = run_training(config, tmp_path / name)
        accuracy[name] = summary["test_accuracy_mean"]
    # bf16 rounding (which differs between CPUs and thread counts) may flip one test clip either
    # way; here both reached 11 of 12 with 1 and with 2 threads.
    source = get_dataset("folder")
    (split,) = source.splits(source.scan(data))
    assert accuracy["fp32"] > 0.75
    assert accuracy["fast"] >= accuracy["fp32"] - 1 / len(split.test) - 1e-9
