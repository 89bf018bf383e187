"""Dense-MoA and Soft-MoA: maths against direct re-computations from their definitions,
wiring (parallel to the sub-layer, the published double addition as an option), parameter
counts from first principles, what trains, and exact adapter-file round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from audiopetl.backbone import AST, ASTConfig
from audiopetl.petl import (
    DenseMoAConfig,
    SoftMoAConfig,
    build_model,
    count_method_parameters,
    load_adapter,
    method_from_dict,
    preset,
)
from audiopetl.petl.moa import DenseMixture, MixtureBranch, SoftMixture

# hidden 32, reduction rate 8 -> expert width 4; grid 2 x 4 -> 10 tokens.
TINY = ASTConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_size=64, num_mel_bins=32, max_frames=48)
RR = 8


def backbone() -> AST:
    torch.manual_seed(0)
    return AST(TINY)


def features(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, TINY.max_frames, TINY.num_mel_bins, generator=torch.Generator().manual_seed(1))


def perturb(module: torch.nn.Module, seed: int = 5, scale: float = 0.3) -> None:
    """Move every parameter away from its (partly zero) initialisation."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * scale)


ALL = {
    f"{kind}_{layout}_{module}": cls(module=module, layout=layout, num_adapters=3, reduction_rate=RR)
    for kind, cls in (("dense", DenseMoAConfig), ("soft", SoftMoAConfig))
    for layout in ("pfeiffer", "houlsby")
    for module in ("bottleneck", "convpass")
}
ALL.update({
    "dense_ffn": DenseMoAConfig(location="ffn", num_adapters=2, reduction_rate=RR),
    "soft_ffn_slots2_normalized": SoftMoAConfig(location="ffn", num_adapters=2, num_slots=2, normalize=True,
                                                reduction_rate=RR),
    "soft_published_double_add": SoftMoAConfig(num_adapters=2, num_slots=2, reduction_rate=RR,
                                               published_double_add=True),
    "dense_published_double_add": DenseMoAConfig(num_adapters=2, reduction_rate=RR, published_double_add=True),
    "soft_no_norm_training": SoftMoAConfig(num_adapters=2, reduction_rate=RR, train_norm=False),
})


# -- maths ----------------------------------------------------------------------------------

def bottleneck_by_hand(expert, x: torch.Tensor) -> torch.Tensor:
    """up(GELU(down(x))) from the expert's weights, in float64."""
    down_w, down_b = expert.down.weight.double(), expert.down.bias.double()
    up_w, up_b = expert.up.weight.double(), expert.up.bias.double()
    return F.gelu(x @ down_w.T + down_b) @ up_w.T + up_b


@pytest.mark.parametrize("normalize", [False, True])
def test_soft_moa_matches_its_definition(normalize):
    """Soft MoE's dispatch/combine maths, written out element by element (Puigcerver et al. Sec. 2)."""
    dim, experts, slots, tokens, batch = 8, 3, 2, 5, 2
    torch.manual_seed(0)
    config = SoftMoAConfig(num_adapters=experts, num_slots=slots, reduction_rate=4, normalize=normalize)
    layer = SoftMixture(dim, 2, config).double()
    perturb(layer)
    x = torch.randn(batch, tokens, dim, dtype=torch.float64)
    phi = layer.slots.detach()
    for b in range(batch):
        xs = [x[b, m] for m in range(tokens)]
        # logits[m][i][j] = <x_m, phi[:, i, j]>  (optionally scale * cosine)
        logits = [[[0.0] * slots for _ in range(experts)] for _ in range(tokens)]
        for m in range(tokens):
            for i in range(experts):
                for j in range(slots):
                    column = phi[:, i, j]
                    value = float(xs[m] @ column)
                    if normalize:
                        value = float(layer.scale.detach()) * value / (float(xs[m].norm()) * float(column.norm()))
                    logits[m][i][j] = value
        # dispatch: softmax over tokens, per slot; combine: softmax over all slots, per token
        dispatch = [[[math.exp(logits[m][i][j]) / sum(math.exp(logits[t][i][j]) for t in range(tokens))
                      for j in range(slots)] for i in range(experts)] for m in range(tokens)]
        combine = [[[math.exp(logits[m][i][j]) / sum(math.exp(v) for row in logits[m] for v in row)
                     for j in range(slots)] for i in range(experts)] for m in range(tokens)]
        slot_out = []
        for i in range(experts):
            inputs = torch.stack([sum(dispatch[m][i][j] * xs[m] for m in range(tokens)) for j in range(slots)])
            slot_out.append(bottleneck_by_hand(layer.experts[i], inputs))  # expert i sees its p slots
        expected = torch.stack([
            sum(combine[m][i][j] * slot_out[i][j] for i in range(experts) for j in range(slots))
            for m in range(tokens)
        ])
        with torch.no_grad():
            torch.testing.assert_close(layer(x)[b], expected, atol=1e-10, rtol=1e-10)
            d, c = layer.weights(x)
        torch.testing.assert_close(d[b].sum(dim=0), torch.ones(experts, slots, dtype=torch.float64))
        torch.testing.assert_close(c[b].sum(dim=(1, 2)), torch.ones(tokens, dtype=torch.float64))


def test_soft_moa_dispatches_real_tokens_only():
    """Padded tokens get no dispatch weight: the slots, and the real tokens' outputs, are those of the
    real tokens alone; the combine weights of every token are untouched."""
    torch.manual_seed(0)
    layer = SoftMixture(8, 2, SoftMoAConfig(num_adapters=3, num_slots=2, reduction_rate=4)).double()
    perturb(layer)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        dispatch, combine = layer.weights(x, valid)
        _, plain_combine = layer.weights(x)
        assert (dispatch[1, 4:] == 0).all()
        torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(2, 3, 2, dtype=torch.float64))
        torch.testing.assert_close(combine, plain_combine, rtol=0, atol=0)
        torch.testing.assert_close(layer(x, valid)[1, :4], layer(x[1:, :4])[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(layer(x, valid)[0], layer(x)[0], rtol=0, atol=0)


def test_dense_moa_matches_its_definition():
    dim, experts, tokens = 8, 3, 5
    torch.manual_seed(0)
    layer = DenseMixture(dim, 2, DenseMoAConfig(num_adapters=experts, reduction_rate=4)).double()
    perturb(layer)
    x = torch.randn(2, tokens, dim, dtype=torch.float64)
    w, bias = layer.router.weight.detach(), layer.router.bias.detach()
    for b in range(2):
        for m in range(tokens):
            scores = [math.exp(float(x[b, m] @ w[i] + bias[i])) for i in range(experts)]
            expected = sum(scores[i] / sum(scores) * bottleneck_by_hand(layer.experts[i], x[b, m])
                           for i in range(experts))
            with torch.no_grad():
                torch.testing.assert_close(layer(x)[b, m], expected, atol=1e-10, rtol=1e-10)


# -- wiring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL))
def test_identity_at_initialisation(name):
    plain = backbone()
    model = build_model(copy.deepcopy(plain), ALL[name], num_classes=3)
    x = features()
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(x), plain(x), atol=0, rtol=0)


@pytest.mark.parametrize("config", [DenseMoAConfig(num_adapters=2, reduction_rate=RR),
                                    SoftMoAConfig(num_adapters=2, num_slots=2, reduction_rate=RR)])
def test_mixture_runs_in_parallel_and_published_option_adds_the_mhsa_output_twice(config):
    """block(x) = x1 + FFN(LN2(x1)) with x1 = x + MHSA(n) + M(n), n = LN1(x); the published code
    then adds M(n) once more to the FFN output."""
    import dataclasses

    torch.manual_seed(3)
    single = build_model(backbone(), config, num_classes=3)
    torch.manual_seed(3)
    double = build_model(backbone(), dataclasses.replace(config, published_double_add=True), num_classes=3)
    perturb(single)
    perturb(double)
    single.double()  # float64: the comparison below then fixes the maths, not the rounding order
    double.double()
    for a, b in zip(single.parameters(), double.parameters()):
        assert torch.equal(a, b)
    block = single.backbone.blocks[0]
    x = torch.randn(2, TINY.num_tokens, TINY.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        n = block.norm1(x)
        mixture = block.mhsa.branches[0].mixture(n)
        x1 = x + block.attn(n) + mixture
        expected = x1 + block.mlp(block.norm2(x1))
        torch.testing.assert_close(block(x), expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(double.backbone.blocks[0](x), expected + mixture, atol=1e-12, rtol=1e-12)
    assert len(double.backbone.blocks[0].ffn.branches) == 1 and not list(double.backbone.blocks[0].ffn.parameters())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"SoftMoAConfig.module must be one of \['bottleneck', 'convpass'\]"):
        SoftMoAConfig(module="conformer")
    with pytest.raises(ValueError, match="DenseMoAConfig.location applies to layout 'pfeiffer' only"):
        DenseMoAConfig(layout="houlsby", location="ffn")
    with pytest.raises(ValueError, match="published_double_add reproduces a bug of the Pfeiffer MHSA"):
        SoftMoAConfig(location="ffn", published_double_add=True)
    with pytest.raises(ValueError, match="num_slots must be a positive integer"):
        SoftMoAConfig(num_slots=0)
    with pytest.raises(ValueError, match="num_adapters must be a positive integer"):
        DenseMoAConfig(num_adapters=0)
    config = SoftMoAConfig(layout="houlsby", num_adapters=4, num_slots=2)
    assert method_from_dict(config.to_dict()) == config
    assert preset("dense_moa") == DenseMoAConfig() and preset("soft_moa") == SoftMoAConfig()


# -- parameter counts ---------------------------------------------------------------------------

def expected_count(config, dim: int, layers: int) -> int:
    """From first principles: per sub-layer holding a mixture, N experts, the router or Phi,
    and the sub-layer's LayerNorm (2 d)."""
    r = dim // config.reduction_rate
    n = config.num_adapters
    expert = dim * r + r + r * dim + dim  # down, up (with biases)
    if config.module == "convpass":
        expert += r * r * 3 + r  # 3-tap convolution r -> r
    if isinstance(config, DenseMoAConfig):
        gate = dim * n + n  # linear router
    else:
        gate = dim * n * config.num_slots + (1 if config.normalize else 0)  # Phi (+ learned scale)
    norm = 2 * dim if config.train_norm else 0
    sublayers = 2 if config.layout == "houlsby" else 1
    return layers * sublayers * (n * expert + gate + norm)


@pytest.mark.parametrize("name", list(ALL))
def test_parameter_counts_from_first_principles(name):
    config = ALL[name]
    model = build_model(backbone(), config, num_classes=3)
    assert model.paper_parameter_count() == expected_count(config, TINY.hidden_size, TINY.num_layers)


def test_vit_b_parameter_counts():
    """ViT-B on the meta device, at the follow-up's README example (7 bottleneck experts, RR 128):
    per layer 7 x 9,990 (experts) + 5,383 (router) or 5,376 (Phi) + 1,536 (LayerNorm)."""
    vitb = ASTConfig()
    assert count_method_parameters(DenseMoAConfig(), vitb) == 12 * (7 * 9_990 + 5_383 + 1_536) == 922_188
    assert count_method_parameters(SoftMoAConfig(), vitb) == 12 * (7 * 9_990 + 5_376 + 1_536) == 922_104
    for big in (DenseMoAConfig(layout="houlsby", module="convpass"), SoftMoAConfig(num_slots=2, normalize=True)):
        assert count_method_parameters(big, vitb) == expected_count(big, 768, 12)


# -- training and files --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL))
def test_trains_a_step_saves_and_reloads_to_identical_outputs(name, tmp_path):
    plain = backbone()
    model = build_model(copy.deepcopy(plain), ALL[name], num_classes=3)
    config = ALL[name]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {f"backbone.blocks.{i}.{ln}.{w}" for i in range(TINY.num_layers)
             for ln in {"mhsa": ["norm1"], "ffn": ["norm2"]}[config.sublayers()[0]]
             + (["norm2"] if config.layout == "houlsby" else []) for w in ("weight", "bias")}
    assert {n for n in trainable if n.startswith("backbone.") and ".branches." not in n} == (
        {"backbone.norm.weight", "backbone.norm.bias"} | (norms if config.train_norm else set())
    )
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    first = getattr(model.backbone.blocks[0], config.sublayers()[0]).branches[0]
    assert not model.backbone.blocks[0].attn.training and first.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):  # the second step moves the experts' down-projections and the gates too
        F.cross_entropy(model(features()), torch.tensor([0, 2])).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= trainable
    assert any(".branches." in k for k in changed)
    model.eval()
    path = model.save_adapter(tmp_path / "moa.safetensors")
    loaded = load_adapter(path, backbone=copy.deepcopy(plain)).eval()
    x = features()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.methods == model.methods


def test_mixture_modules_sit_in_the_taps_only():
    model = build_model(backbone(), SoftMoAConfig(layout="houlsby", num_adapters=2, reduction_rate=RR),
                        num_classes=3)
    for block in model.backbone.blocks:
        assert [type(b) for b in block.mhsa.branches] == [MixtureBranch]
        assert [type(b) for b in block.ffn.branches] == [MixtureBranch]
        assert not block.mhsa.input_transforms and not block.mhsa.output_transforms


# -- recipes ---------------------------------------------------------------------------------------

def test_follow_up_recipes_cover_methods_datasets_and_ablations(tmp_path, capsys):
    from audiopetl.cli.main import main
    from audiopetl.experiments.recipes import expand, load_recipe

    methods = expand(load_recipe("moa_methods"))
    assert {r.labels["dataset"] for r in methods} == {"esc50", "us8k", "gsc", "fsc"}
    kinds = {method_from_dict(r.options["method"]).method for r in methods}
    assert kinds == {"adapter", "dense_moa", "soft_moa"}
    adapters = {method_from_dict(r.options["method"]).num_adapters for r in expand(load_recipe("moa_num_adapters"))}
    assert adapters == {2, 4, 7, 10, 15}
    grid = {(c.num_adapters, c.num_slots) for c in
            (method_from_dict(r.options["method"]) for r in expand(load_recipe("moa_num_slots")))}
    assert {p for _, p in grid} == {1, 2} and len(grid) == 8
    assert main(["reproduce", "moa_methods", "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would run") == 6 * 4


def test_command_line_options_set_the_mixture_fields():
    from audiopetl.cli.commands import config_from_args
    from audiopetl.cli.main import build_parser

    def method(*options):
        args = build_parser().parse_args(["train", "--dataset", "esc50", "--data-root", "x", *options])
        return method_from_dict(config_from_args(args).method)

    assert method("--method", "soft_moa", "--num-adapters", "4", "--num-slots", "2", "--layout", "houlsby") == \
        SoftMoAConfig(layout="houlsby", num_adapters=4, num_slots=2)
    assert method("--method", "dense_moa", "--location", "ffn").location == "ffn"
    with pytest.raises(ValueError, match="num_slots"):
        method("--method", "dense_moa", "--num-slots", "2")
