"""The Conformer adapter: architecture checked against its definition, LayerNorm output used,
BatchNorm trains in train mode inside a frozen eval-mode backbone, every placement builds,
counts from first principles, and adapter files carry the BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from audiopetl.backbone import AST, ASTConfig
from audiopetl.petl import AdapterConfig, Conformer, build_model, count_method_parameters, load_adapter, preset
from audiopetl.petl.config import ADAPTER_LAYOUTS

TINY = ASTConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_size=64, num_mel_bins=32, max_frames=48)
RR = 8  # rank 4


def backbone() -> AST:
    torch.manual_seed(0)
    return AST(TINY)


def features() -> torch.Tensor:
    return torch.randn(4, TINY.max_frames, TINY.num_mel_bins, generator=torch.Generator().manual_seed(1))


def placements() -> dict[str, AdapterConfig]:
    configs = {
        f"pf_{loc}_{ins}_{pos}": AdapterConfig(module="conformer", location=loc, insertion=ins, position=pos,
                                               reduction_rate=RR, kernel_size=3)
        for loc in ("mhsa", "ffn") for ins in ("parallel", "sequential") for pos in ("before", "after")
    }
    for layout in ADAPTER_LAYOUTS[1:]:
        configs[layout] = AdapterConfig(module="conformer", layout=layout, reduction_rate=RR, kernel_size=4)
    return configs


PLACEMENTS = placements()


def by_definition(module: Conformer, x: torch.Tensor) -> torch.Tensor:
    """LN, pointwise conv to 2r, GLU, depthwise conv ('same'), BatchNorm (running stats), SiLU, pointwise conv."""
    h = F.layer_norm(x, (x.shape[-1],), module.norm.weight, module.norm.bias, module.norm.eps)
    h = torch.einsum("btd,cd->btc", h, module.pointwise1.weight[:, :, 0]) + module.pointwise1.bias
    rank = h.shape[-1] // 2
    h = h[..., :rank] * torch.sigmoid(h[..., rank:])
    k = module.depthwise.kernel_size[0]
    left = (k - 1) // 2  # PyTorch's "same": the extra pad of an even kernel goes right
    padded = F.pad(h.transpose(1, 2), (left, k - 1 - left))
    taps = module.depthwise.weight[:, 0, :]  # (rank, k)
    h = torch.stack([(padded[:, :, t : t + k] * taps).sum(-1) for t in range(x.shape[1])], dim=-1)
    h = h + module.depthwise.bias[:, None]
    bn = module.batch_norm
    h = (h - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[:, None] \
        + bn.bias[:, None]
    h = F.silu(h).transpose(1, 2)
    return torch.einsum("btc,dc->btd", h, module.pointwise2.weight[:, :, 0]) + module.pointwise2.bias


@pytest.mark.parametrize("kernel", [3, 4, 31])
def test_matches_its_definition_and_reads_the_layernorm_output(kernel):
    torch.manual_seed(0)
    module = Conformer(16, 3, kernel_size=kernel).double()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.3)
        module.batch_norm.running_mean.uniform_(-0.5, 0.5)
        module.batch_norm.running_var.uniform_(0.5, 2.0)
    module.eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        out = module(x)
        torch.testing.assert_close(out, by_definition(module, x), atol=1e-10, rtol=1e-10)
        # The LayerNorm's output feeds the convolutions: a per-token affine change of the
        # input leaves the output unchanged up to the LayerNorm eps (the raw input would change it).
        scale, shift = torch.rand(2, 9, 1, dtype=torch.float64) + 0.5, torch.randn(2, 9, 1, dtype=torch.float64)
        torch.testing.assert_close(module(x * scale + shift), out, atol=1e-4, rtol=1e-4)  # LN eps
    assert out.shape == x.shape


def expected_count(config: AdapterConfig, dim: int, layers: int) -> int:
    """LN (2d) + pointwise d->2r (2dr + 2r) + depthwise (rk + r) + BatchNorm (2r) + pointwise r->d (rd + d),
    per adapter, plus the LayerNorm of each sub-layer holding one."""
    r, k = dim // config.reduction_rate, config.kernel_size
    adapter = 2 * dim + (2 * dim * r + 2 * r) + (r * k + r) + 2 * r + (r * dim + dim)
    placements = config.placements()
    sublayers = {sublayer for sublayer, _, _ in placements}
    return layers * (len(placements) * adapter + 2 * dim * len(sublayers))


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_every_placement_trains_a_step_and_reloads_with_its_batchnorm_statistics(name, tmp_path):
    config = PLACEMENTS[name]
    plain = backbone()
    model = build_model(copy.deepcopy(plain), config, num_classes=3)
    assert model.paper_parameter_count() == expected_count(config, TINY.hidden_size, TINY.num_layers)
    x = features()
    model.eval()  # build_model returns a model in train mode; keep the statistics untouched here
    # zero-initialised last pointwise conv: starts as the identity of its placement, except
    # sequential-before, whose published wiring f(A(n)) + A(n) starts as f(0)
    if all((insertion, position) != ("sequential", "before") for _, insertion, position in config.placements()):
        with torch.no_grad():
            torch.testing.assert_close(model.hidden(x), plain(x), atol=0, rtol=0)
    conformers = [m for m in model.modules() if isinstance(m, Conformer)]
    assert len(conformers) == TINY.num_layers * len(config.placements())

    model.train()
    assert not model.backbone.training and not model.backbone.blocks[0].attn.training
    assert all(c.batch_norm.training for c in conformers)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        F.cross_entropy(model(x), torch.tensor([0, 2, 1, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(int(c.batch_norm.num_batches_tracked) == 2 for c in conformers)
    assert all(not torch.equal(c.batch_norm.running_mean, torch.zeros_like(c.batch_norm.running_mean))
               for c in conformers)

    model.eval()
    with torch.no_grad():
        stats = conformers[0].batch_norm.running_mean.clone()
        reference = model(x)
        assert torch.equal(conformers[0].batch_norm.running_mean, stats)  # eval mode: statistics frozen
    path = model.save_adapter(tmp_path / "conformer.safetensors")
    loaded = load_adapter(path, backbone=copy.deepcopy(plain)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference)


def test_half_precision_file_keeps_the_integer_step_count(tmp_path):
    model = build_model(backbone(), PLACEMENTS["pf_mhsa_parallel_before"], num_classes=3)
    model.train()
    model(features())
    path = model.save_adapter(tmp_path / "half.safetensors", dtype="fp16")
    loaded = load_adapter(path, backbone=backbone())
    tracked = [b for n, b in loaded.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(b.dtype == torch.int64 and int(b) == 1 for b in tracked)


def test_vit_b_counts_and_presets():
    vitb = ASTConfig()
    # d = 768, RR 64 -> r = 12, k = 31: 3d + 3dr + 5r + rk = 30,384 per adapter, + 1,536 LayerNorm.
    assert count_method_parameters("conformer_pf_par", vitb) == 12 * (30_384 + 1_536)
    assert preset("conformer_hou_par").module == "conformer"
    with pytest.raises(ValueError, match=r"AdapterConfig.module must be one of \['bottleneck', 'convpass', 'conformer'\]"):
        AdapterConfig(module="conv")
    with pytest.raises(ValueError, match="AdapterConfig.kernel_size must be a positive integer"):
        AdapterConfig(module="conformer", kernel_size=0)


def test_training_selects_the_best_epoch_with_its_batchnorm_statistics(tmp_path):
    from safetensors.torch import load_file

    from audiopetl.experiments.synthetic import make_synthetic_dataset
    from audiopetl.train import ADAPTER, TrainConfig, run_training
    from audiopetl.train.checkpoint import load_checkpoint

    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=6, seconds=1.0, seed=1)
    summary = run_training(TrainConfig(
        dataset="folder", data_root=str(data), backbone="tiny-random", max_frames=100, epochs=3, batch_size=8,
        method={"method": "conformer_pf_par", "reduction_rate": 16, "kernel_size": 3},
        cache_dir=str(tmp_path / "cache"), progress=False, device="cpu",
    ), tmp_path / "run")
    split_dir = tmp_path / "run" / summary["splits"][0]["split"]
    best = load_checkpoint(split_dir / "checkpoint.pt")["best"]["state"]
    statistics = [name for name in best if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(statistics) == 3 * 4  # tiny-random: 4 layers, one Conformer each
    shipped = load_file(str(split_dir / ADAPTER))
    assert set(shipped) == set(best)
    for name, tensor in best.items():
        assert torch.equal(shipped[name], tensor), name
