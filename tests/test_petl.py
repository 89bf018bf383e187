"""PETL methods: configs, wiring (paper Eqs. 5-7), identity at initialisation, what trains."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from audiopetl.backbone import AST, ASTConfig
from audiopetl.backbone.ast import NUM_SPECIAL_TOKENS
from audiopetl.petl import (
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    LinearProbeConfig,
    LoRAConfig,
    PrefixConfig,
    PromptConfig,
    build_model,
    learning_rate_family,
    method_from_dict,
    preset,
    preset_names,
    resolve_methods,
)
from audiopetl.petl.adapters import Convpass, ParallelAdapter, SequentialAdapter
from audiopetl.petl.prompts import PromptTokens

# hidden 32 -> reduction rate 8 gives rank 4; grid 2 x 4 -> 10 tokens.
TINY = ASTConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_size=64, num_mel_bins=32, max_frames=48)
RR = 8

# Every method family at tiny size; those that leave the function unchanged at init first.
IDENTITY_AT_INIT = {
    "full": FullFinetuneConfig(),
    "linear": LinearProbeConfig(),
    "bitfit": BitFitConfig(),
    "lora_qkvo": LoRAConfig(targets=("q", "k", "v", "o"), reduction_rate=RR),
    "lora_ffn": LoRAConfig(targets=("ffn_in", "ffn_out"), reduction_rate=RR),
    **{
        f"{module}_{layout}": AdapterConfig(module=module, layout=layout, reduction_rate=RR)
        for module in ("bottleneck", "convpass")
        for layout in ("pfeiffer", "houlsby", "houlsby_mixed", "hydra")
    },
    **{
        f"pf_{loc}_{ins}_{pos}": AdapterConfig(location=loc, insertion=ins, position=pos, reduction_rate=RR)
        for loc in ("mhsa", "ffn")
        for ins, pos in (("parallel", "before"), ("parallel", "after"), ("sequential", "after"))
    },
    "adapter+lora+bitfit": [
        AdapterConfig(location="ffn", reduction_rate=RR), LoRAConfig(reduction_rate=RR), BitFitConfig()
    ],
}
CHANGES_AT_INIT = {
    # The published sequential-before wiring f(A(n)) + A(n) gives f(0) where A outputs zeros.
    **{f"pf_{loc}_sequential_before": AdapterConfig(location=loc, insertion="sequential", position="before",
                                                     reduction_rate=RR) for loc in ("mhsa", "ffn")},
    "spt": PromptConfig(num_prompts=3, deep=False),
    "dpt": PromptConfig(num_prompts=3, deep=True),
    "prefix": PrefixConfig(num_tokens=4),
    "adapter+dpt+lora": [
        AdapterConfig(location="ffn", reduction_rate=RR), PromptConfig(3), LoRAConfig(reduction_rate=RR)
    ],
}
ALL_METHODS = {**IDENTITY_AT_INIT, **CHANGES_AT_INIT}


def tiny_backbone(seed: int = 0) -> AST:
    torch.manual_seed(seed)
    return AST(TINY).eval()


def features(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, TINY.max_frames, TINY.num_mel_bins, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ configs


def test_presets_round_trip_through_dicts():
    for name in preset_names():
        config = preset(name)
        assert method_from_dict(config.to_dict()) == config, name
        assert config.to_dict()["method"] in (
            "full", "linear", "bitfit", "prompt", "prefix", "lora", "adapter", "dense_moa", "soft_moa"
        )


def test_recipe_style_dicts_and_preset_overrides():
    assert method_from_dict({"method": "prompt", "num_prompts": 300, "deep": False}) == PromptConfig(300, False)
    assert method_from_dict({"method": "lora", "targets": ["q", "v"], "reduction_rate": 128}) == LoRAConfig()
    assert method_from_dict({"method": "dpt", "num_prompts": 14}) == PromptConfig(14, deep=True)
    assert method_from_dict({"method": "bottleneck_pf_par", "reduction_rate": 32}).reduction_rate == 32
    assert preset("spt") == PromptConfig(num_prompts=300, deep=False)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: AdapterConfig(module="lstm"), ["AdapterConfig.module", "bottleneck", "convpass"]),
        (lambda: AdapterConfig(insertion="diagonal"), ["AdapterConfig.insertion", "parallel", "sequential"]),
        (lambda: AdapterConfig(layout="houlsby", location="ffn"), ["location", "pfeiffer"]),
        (lambda: AdapterConfig(layout="hydra", insertion="sequential"), ["hydra", "insertion"]),
        (lambda: AdapterConfig(reduction_rate=0), ["AdapterConfig.reduction_rate"]),
        (lambda: LoRAConfig(targets=("q", "x")), ["LoRAConfig.targets", "'q'", "'o'"]),
        (lambda: LoRAConfig(alpha=-1), ["LoRAConfig.alpha"]),
        (lambda: PrefixConfig(num_tokens=5), ["PrefixConfig.num_tokens", "even"]),
        (lambda: PromptConfig(deep="yes"), ["PromptConfig.deep"]),
        (lambda: method_from_dict({"method": "lora", "rank": 4}), ["rank", "reduction_rate"]),
        (lambda: method_from_dict({"method": "nope"}), ["nope", "lora"]),
    ],
)
def test_bad_values_name_the_field_and_the_choices(make, words):
    with pytest.raises(ValueError) as error:
        make()
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    "spec, words",
    [
        (["full", "lora"], ["full", "combined"]),
        (["dpt", "spt"], ["prompt", "at most one"]),
        ([LoRAConfig(("q", "v")), LoRAConfig(("v", "o"))], ["'v'"]),
    ],
)
def test_incompatible_combinations_are_refused(spec, words):
    with pytest.raises(ValueError) as error:
        resolve_methods(spec)
    for word in words:
        assert word in str(error.value)


def test_learning_rate_families():
    assert learning_rate_family(resolve_methods("dpt")) == "prompt"
    assert learning_rate_family(resolve_methods("prefix")) == "prompt"
    assert learning_rate_family(resolve_methods(["adapter", "dpt"])) == "adapter"
    assert learning_rate_family(resolve_methods("lora")) == "adapter"
    assert learning_rate_family(resolve_methods("linear")) == "linear"
    assert learning_rate_family(resolve_methods("full")) == "full"


def test_backbone_with_petl_modules_is_refused():
    backbone = tiny_backbone()
    build_model(backbone, LoRAConfig(reduction_rate=RR), num_classes=3)
    with pytest.raises(ValueError, match="fresh"):
        build_model(backbone, BitFitConfig(), num_classes=3)


def test_reduction_rate_larger_than_hidden_is_refused():
    with pytest.raises(ValueError, match="reduction_rate"):
        build_model(tiny_backbone(), AdapterConfig(reduction_rate=64), num_classes=3)


# ------------------------------------------------------------------------------ function


@pytest.mark.parametrize("name", list(IDENTITY_AT_INIT))
def test_methods_start_from_the_pretrained_function(name):
    backbone = tiny_backbone()
    frozen = copy.deepcopy(backbone)
    model = build_model(backbone, IDENTITY_AT_INIT[name], num_classes=3)
    x = features()
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(x), frozen(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.embed(x), frozen(x).mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CHANGES_AT_INIT))
def test_prompts_prefix_and_seq_before_change_the_function_at_init(name):
    backbone = tiny_backbone()
    frozen = copy.deepcopy(backbone)
    model = build_model(backbone, CHANGES_AT_INIT[name], num_classes=3)
    x = features()
    with torch.no_grad():
        hidden = model.hidden(x)
        expected_tokens = TINY.num_tokens + (3 if "pt" in name else 0)
        assert hidden.shape == (2, expected_tokens, TINY.hidden_size)
        assert not torch.allclose(hidden.mean(1), frozen(x).mean(1))


def test_pooling_choices():
    backbone = tiny_backbone()
    frozen = copy.deepcopy(backbone)
    x = features()
    with torch.no_grad():
        out = frozen(x)
        for pooling, expected in (("mean", out.mean(1)), ("cls", out[:, 0]), ("cls_dist", (out[:, 0] + out[:, 1]) / 2)):
            model = build_model(copy.deepcopy(backbone), "linear", num_classes=3, pooling=pooling)
            torch.testing.assert_close(model.embed(x), expected)
            torch.testing.assert_close(model(x), model.head(expected))
    with pytest.raises(ValueError, match="pooling"):
        build_model(tiny_backbone(), "linear", num_classes=3, pooling="max")


def _randomise_new_modules(model) -> None:
    """Non-zero adapter / LoRA outputs, so wiring differences show."""
    torch.manual_seed(5)
    for name, param in model.named_parameters():
        if param.requires_grad and ("adapter" in name or "lora" in name):
            param.data.normal_(0, 0.3)


@pytest.mark.parametrize("sublayer", ["mhsa", "ffn"])
@pytest.mark.parametrize("insertion, position", [("sequential", "after"), ("sequential", "before"),
                                                 ("parallel", "before"), ("parallel", "after")])
@pytest.mark.parametrize("residual", [True, False])
def test_adapter_wiring_follows_the_equations(sublayer, insertion, position, residual):
    config = AdapterConfig(
        location=sublayer, insertion=insertion, position=position, residual=residual, reduction_rate=RR
    )
    model = build_model(tiny_backbone(), config, num_classes=3)
    _randomise_new_modules(model)
    block = model.backbone.blocks[0]
    taps, norm = getattr(block, sublayer), block.sublayer_norm(sublayer)
    f = {"mhsa": block.attn, "ffn": block.mlp}[sublayer]
    (placed,) = [m for m in (*taps.input_transforms, *taps.output_transforms, *taps.branches) if hasattr(m, "adapter")]
    adapter = placed.adapter
    x = torch.randn(2, TINY.num_tokens, TINY.hidden_size)

    def res(out, z):
        return out + z if residual else out

    n = norm(x)
    with torch.no_grad():
        if (insertion, position) == ("sequential", "after"):  # Eq. 6: X^ + A(f(LN X^)) [+ f]
            expected = x + res(adapter(f(n)), f(n))
        elif (insertion, position) == ("sequential", "before"):  # published: f(A(n)) [+ A(n)]
            expected = x + res(f(adapter(n)), adapter(n))
        elif (insertion, position) == ("parallel", "before"):  # Eq. 7 with the adapter reading LN X^
            expected = x + f(n) + res(adapter(n), n)
        else:
            expected = x + f(n) + res(adapter(f(n)), f(n))
        torch.testing.assert_close(taps(x, norm, f), expected)


def test_seq_after_with_residual_equals_par_after_without():
    outs = []
    for insertion, residual in (("sequential", True), ("parallel", False)):
        config = AdapterConfig(
            location="ffn", insertion=insertion, position="after", residual=residual, reduction_rate=RR
        )
        model = build_model(tiny_backbone(), config, num_classes=3)
        _randomise_new_modules(model)
        with torch.no_grad():
            outs.append(model.hidden(features()))
    torch.testing.assert_close(outs[0], outs[1])


def test_adapter_defaults_and_layouts():
    pf = AdapterConfig()
    assert pf.placements() == (("mhsa", "parallel", "before"),) and not pf.uses_residual("parallel")
    assert AdapterConfig(insertion="sequential").uses_residual("sequential")
    mixed = AdapterConfig(layout="houlsby_mixed").placements()
    assert mixed == (("mhsa", "parallel", "before"), ("ffn", "sequential", "after"))
    assert AdapterConfig(layout="hydra").placements() == (("ffn", "parallel", "before"), ("ffn", "sequential", "after"))
    model = build_model(tiny_backbone(), AdapterConfig(layout="hydra", reduction_rate=RR), num_classes=3)
    block = model.backbone.blocks[0]
    assert isinstance(block.ffn.branches[0], ParallelAdapter) and not block.ffn.branches[0].residual
    assert isinstance(block.ffn.output_transforms[0], SequentialAdapter) and block.ffn.output_transforms[0].residual
    assert not len(block.mhsa.branches) and block.norm2.weight.requires_grad and not block.norm1.weight.requires_grad


def test_convpass_convolves_neighbouring_tokens():
    torch.manual_seed(0)
    conv = Convpass(dim=8, rank=4)
    torch.nn.init.normal_(conv.up.weight)
    x = torch.randn(1, 6, 8)
    moved = x.clone()
    moved[0, 3] += 1.0
    with torch.no_grad():
        changed = (conv(moved) - conv(x)).abs().sum(-1)[0]
        assert (changed[2:5] > 0).all() and (changed[[0, 1, 5]] == 0).all()
        conv.conv.weight.zero_()  # with the convolution silenced the adapter sees only its bias
        assert (conv(moved) - conv(x)).abs().max() == 0


def test_prompt_tokens_insert_then_replace():
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    insert = PromptTokens(2, 1, bound=0.1, replace=False)
    out = insert(x)
    assert out.shape == (2, 7, 1)
    torch.testing.assert_close(out[:, :NUM_SPECIAL_TOKENS], x[:, :NUM_SPECIAL_TOKENS])
    torch.testing.assert_close(out[:, NUM_SPECIAL_TOKENS:4], insert.prompts.expand(2, -1, -1).detach())
    torch.testing.assert_close(out[:, 4:], x[:, NUM_SPECIAL_TOKENS:])
    replace = PromptTokens(2, 1, bound=0.1, replace=True)
    again = replace(out)
    assert again.shape == out.shape
    torch.testing.assert_close(again[:, NUM_SPECIAL_TOKENS:4], replace.prompts.expand(2, -1, -1).detach())
    torch.testing.assert_close(again[:, 4:], out[:, 4:])


def test_deep_prompts_per_layer_and_shallow_once():
    dpt = build_model(tiny_backbone(), PromptConfig(num_prompts=3, deep=True), num_classes=3)
    assert [b.insert_tokens.replace for b in dpt.backbone.blocks] == [False, True]
    spt = build_model(tiny_backbone(), PromptConfig(num_prompts=3, deep=False), num_classes=3)
    assert spt.backbone.blocks[0].insert_tokens is not None and spt.backbone.blocks[1].insert_tokens is None


def test_prefix_adds_keys_and_values_as_the_attention_equation_says():
    model = build_model(tiny_backbone(), PrefixConfig(num_tokens=4), num_classes=3)
    attn = model.backbone.blocks[0].attn
    assert attn.prefix.keys.shape == attn.prefix.values.shape == (1, 2, TINY.hidden_size)
    x = torch.randn(2, 5, TINY.hidden_size)
    heads = TINY.num_heads

    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    with torch.no_grad():
        k = torch.cat([attn.prefix.keys.expand(2, -1, -1), attn.k(x)], 1)
        v = torch.cat([attn.prefix.values.expand(2, -1, -1), attn.v(x)], 1)
        q = split(attn.q(x))
        weights = torch.softmax(q @ split(k).transpose(-1, -2) / (TINY.hidden_size // heads) ** 0.5, -1)
        expected = attn.o((weights @ split(v)).transpose(1, 2).reshape(2, 5, -1))
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_equation_and_merge_unmerge():
    config = LoRAConfig(targets=("q", "v"), reduction_rate=RR, alpha=8)
    model = build_model(tiny_backbone(), config, num_classes=3).eval()
    _randomise_new_modules(model)
    layer = model.backbone.blocks[0].attn.q
    assert layer.lora_down.shape == (TINY.hidden_size // RR, TINY.hidden_size)
    assert layer.scaling == 8 / RR  # paper convention alpha / RR, not alpha / r
    z = torch.randn(3, TINY.hidden_size)
    with torch.no_grad():
        low_rank = z @ layer.lora_down.T @ layer.lora_up.T  # X A B with A = down^T, B = up^T
        expected = F.linear(z, layer.base.weight, layer.base.bias) + layer.scaling * low_rank
        torch.testing.assert_close(layer(z), expected)
        x = features()
        before = model(x)
        model.merge_lora()
        assert layer.merged
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        model.unmerge_lora()
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA"):
        build_model(tiny_backbone(), "linear", num_classes=3).merge_lora()


# ------------------------------------------------------------------------------ training


def _expected_trainable(name: str, params: list[str]) -> set[str]:
    always = {p for p in params if p.startswith(("head.", "backbone.norm."))}
    blocks = [p for p in params if p.startswith("backbone.blocks.")]
    selections = {
        "full": set(params),
        "linear": always,
        # the published set: every Linear and LayerNorm bias of the encoder; final LayerNorm: bias only
        "bitfit": {"head.weight", "head.bias", "backbone.norm.bias"} | {p for p in blocks if p.endswith(".bias")},
        "lora_qkvo": always | {p for p in blocks if ".lora_" in p},
        "pf_ffn_sequential_after": always | {p for p in blocks if ".ffn." in p or ".norm2." in p},
        "bottleneck_houlsby": always | {p for p in blocks if ".ffn." in p or ".mhsa." in p or ".norm" in p},
        "dpt": always | {p for p in blocks if "insert_tokens" in p},
        "prefix": always | {p for p in blocks if ".prefix." in p},
    }
    return selections[name]


@pytest.mark.parametrize("name", ["full", "linear", "bitfit", "lora_qkvo", "pf_ffn_sequential_after",
                                  "bottleneck_houlsby", "dpt", "prefix"])
def test_only_declared_parameters_train(name):
    model = build_model(tiny_backbone(), ALL_METHODS[name], num_classes=3)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(name, names)
    assert set(model.adapter_state_dict()) == trainable
    assert model.num_trainable() == sum(p.numel() for p in model.trainable_parameters())


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_optimizer_step_changes_only_trainable_tensors(name):
    model = build_model(tiny_backbone(), ALL_METHODS[name], num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    F.cross_entropy(model(features()), torch.tensor([0, 2])).backward()
    for param_name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, param_name
    optimizer.step()
    trainable = set(model.adapter_state_dict())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= trainable
    assert "head.weight" in changed


def test_adapter_up_projection_gets_a_gradient_at_init():
    model = build_model(tiny_backbone(), AdapterConfig(reduction_rate=RR), num_classes=3)
    F.cross_entropy(model(features()), torch.tensor([0, 2])).backward()
    up = model.backbone.blocks[0].mhsa.branches[0].adapter.up.weight
    assert up.grad.abs().sum() > 0


def test_train_mode_leaves_the_frozen_backbone_in_eval():
    model = build_model(tiny_backbone(), [AdapterConfig(reduction_rate=RR), PromptConfig(2)], num_classes=3)
    model.train()
    assert model.training and model.head.training
    assert not model.backbone.training and not model.backbone.blocks[0].attn.training
    assert model.backbone.blocks[0].mhsa.branches[0].training
    assert model.backbone.blocks[1].insert_tokens.training
    model.eval()
    assert not model.backbone.blocks[0].mhsa.branches[0].training and not model.head.training
    full = build_model(tiny_backbone(), "full", num_classes=3).train()
    assert full.backbone.blocks[0].attn.training


def test_extra_trainable_names():
    extra = ("pos_embed", "block.1")
    model = build_model(tiny_backbone(), LoRAConfig(reduction_rate=RR), num_classes=3, extra_trainable=extra)
    assert model.backbone.pos_embed.requires_grad
    assert all(p.requires_grad for p in model.backbone.blocks[1].parameters())
    assert not model.backbone.blocks[0].attn.q.base.weight.requires_grad
    with pytest.raises(ValueError, match="block.N"):
        build_model(tiny_backbone(), LoRAConfig(reduction_rate=RR), num_classes=3, extra_trainable=("block.7",))


def test_gradient_checkpointing_runs_with_the_frozen_backbone_in_eval():
    model = build_model(tiny_backbone(), LoRAConfig(reduction_rate=RR), num_classes=3).train()
    model.backbone.gradient_checkpointing = True
    F.cross_entropy(model(features()), torch.tensor([0, 2])).backward()
    assert model.backbone.blocks[0].attn.q.lora_down.grad is not None


@pytest.mark.parametrize(
    "method, owner",
    [(LoRAConfig(reduction_rate=1024), "LoRAConfig"), (AdapterConfig(reduction_rate=1024), "AdapterConfig")],
)
def test_a_reduction_rate_that_leaves_no_rank_is_refused(method, owner):
    backbone = AST(ASTConfig(hidden_size=64, num_layers=1, num_heads=4, mlp_size=128, max_frames=100))
    with pytest.raises(ValueError, match=f"{owner}.reduction_rate=1024 leaves no rank for hidden size 64"):
        build_model(backbone, method, num_classes=3)
