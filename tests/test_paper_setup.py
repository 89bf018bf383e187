"""The ``paper`` setup against the published functions, rebuilt here from their equations.

Each reference below is written from the published code's maths (PETL_AST at 1fe23af) on
the same tiny AST weights, never by calling our PETL modules: a pre-LN layer is
``x + f(LN(x))``, the adapters are ``up(act(down(.)))``. Our model in paper mode must match
to 1e-5; our defaults must still compute what the README says.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from audiopetl.backbone import AST, ASTConfig
from audiopetl.petl import (
    AdapterConfig,
    PrefixConfig,
    PromptConfig,
    build_model,
    count_method_parameters,
    read_adapter_metadata,
)
from audiopetl.petl.budget import PAPER_ROWS
from audiopetl.petl.lora import LoRALinear
from audiopetl.petl.registry import resolve_methods
from audiopetl.train import TrainConfig, resolve
from audiopetl.train.setups import paper_method

TINY = ASTConfig(hidden_size=32, num_layers=3, num_heads=4, mlp_size=64, num_mel_bins=32, max_frames=48)
RR = 8  # rank 4


def tiny_backbone() -> AST:
    torch.manual_seed(0)
    return AST(TINY).eval()


def features() -> torch.Tensor:
    return torch.randn(2, TINY.max_frames, TINY.num_mel_bins, generator=torch.Generator().manual_seed(1))


def paper_model(config, **kwargs):
    (method,) = resolve_methods(paper_method(config))
    model = build_model(tiny_backbone(), method, num_classes=3, **kwargs).eval()
    torch.manual_seed(7)
    with torch.no_grad():  # non-zero everywhere, so every wiring difference shows
        for name, param in model.named_parameters():
            if param.requires_grad and not name.startswith(("head.", "backbone.norm.")):
                param.normal_(0, 0.3)
    return model


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def bottleneck(adapter, z):  # Bottleneck_adapter: up(GELU(down(z)))
    return F.linear(F.gelu(F.linear(z, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)


def convpass_published(adapter, z):  # Convpass_adapter.forward: the conv output is never used
    down = quick_gelu(F.linear(z, adapter.down.weight, adapter.down.bias))
    return F.linear(quick_gelu(down), adapter.up.weight, adapter.up.bias)


def layer(block, x, mhsa=None, ffn=None):
    """One pre-LN layer; ``mhsa`` / ``ffn`` replace ``f(LN(x))`` of that sub-layer."""
    x = x + (mhsa(block, x) if mhsa else block.attn(block.norm1(x)))
    return x + (ffn(block, x) if ffn else block.mlp(block.norm2(x)))


def logits(model, hidden):
    return model.head(model.backbone.norm(hidden).mean(dim=1))


# ------------------------------------------------------------------------------ Seq-Before


@pytest.mark.parametrize("sublayer", ["mhsa", "ffn"])
def test_seq_before_is_the_published_function(sublayer):
    """ASTLayer_adapter_ablation CASES 3 and 7: a = A(LN(x)); out = f(a) + a; x + out."""
    model = paper_model(AdapterConfig(location=sublayer, insertion="sequential", position="before", reduction_rate=RR))
    x = features()

    def seq_before(norm, f, adapter_of):
        def sub(block, h):
            a = bottleneck(adapter_of(block), norm(block)(h))
            return f(block)(a) + a
        return sub

    adapter_of = lambda block: getattr(block, sublayer).input_transforms[0].adapter  # noqa: E731
    if sublayer == "mhsa":
        sub = {"mhsa": seq_before(lambda b: b.norm1, lambda b: b.attn, adapter_of)}
    else:
        sub = {"ffn": seq_before(lambda b: b.norm2, lambda b: b.mlp, adapter_of)}
    with torch.no_grad():
        h = model.backbone.embed(x)
        for block in model.backbone.blocks:
            h = layer(block, h, **sub)
        torch.testing.assert_close(model(x), logits(model, h), rtol=0, atol=1e-5)
        # the default computes the same function: the published wiring is our wiring
        default = build_model(tiny_backbone(), model.methods[0], num_classes=3).eval()
        default.load_state_dict(model.state_dict())
        torch.testing.assert_close(default(x), model(x), rtol=0, atol=1e-5)


def test_seq_before_without_residual_drops_the_skip():
    model = paper_model(AdapterConfig(location="ffn", insertion="sequential", position="before", residual=False,
                                      reduction_rate=RR))
    x = features()
    with torch.no_grad():
        h = model.backbone.embed(x)
        for block in model.backbone.blocks:
            h = layer(block, h, ffn=lambda b, z: b.mlp(bottleneck(b.ffn.input_transforms[0].adapter, b.norm2(z))))
        torch.testing.assert_close(model(x), logits(model, h), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ Convpass


@pytest.mark.parametrize("layout", ["pfeiffer", "houlsby"])
def test_convpass_is_the_published_function_in_paper_mode(layout):
    """Parallel-before Convpass: x + f(n) + up(QuickGELU(QuickGELU(down(n)))), conv unused."""
    model = paper_model(AdapterConfig(module="convpass", layout=layout, reduction_rate=RR))
    assert model.methods[0].convpass_conv is False
    x = features()

    def par(norm, f, sublayer):
        def sub(block, h):
            n = norm(block)(h)
            return f(block)(n) + convpass_published(getattr(block, sublayer).branches[0].adapter, n)
        return sub

    subs = {"mhsa": par(lambda b: b.norm1, lambda b: b.attn, "mhsa")}
    if layout == "houlsby":
        subs["ffn"] = par(lambda b: b.norm2, lambda b: b.mlp, "ffn")
    with torch.no_grad():
        h = model.backbone.embed(x)
        for block in model.backbone.blocks:
            h = layer(block, h, **subs)
        torch.testing.assert_close(model(x), logits(model, h), rtol=0, atol=1e-5)


def test_default_convpass_uses_its_convolution():
    """README: by default the 3-tap convolution over tokens feeds ``up``."""
    model = paper_model(AdapterConfig(module="convpass", reduction_rate=RR))
    default = build_model(tiny_backbone(), dataclasses.replace(model.methods[0], convpass_conv=True), num_classes=3)
    default.load_state_dict(model.state_dict())
    adapter = default.backbone.blocks[0].mhsa.branches[0].adapter
    z = torch.randn(2, 5, TINY.hidden_size)
    with torch.no_grad():
        down = quick_gelu(F.linear(z, adapter.down.weight, adapter.down.bias))
        conv = F.conv1d(down.transpose(1, 2), adapter.conv.weight, adapter.conv.bias, padding=1).transpose(1, 2)
        expected = F.linear(quick_gelu(conv), adapter.up.weight, adapter.up.bias)
        torch.testing.assert_close(adapter(z), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(adapter(z), convpass_published(adapter, z), atol=1e-3)


# ------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("paper", [True, False])
def test_prompt_sequence(deep, paper):
    """Paper: [CLS, prompts, patches] (PromptAST.incorporate_prompt drops token 1); deep prompts
    overwrite positions [1, 1 + p) before each later layer. Default: [CLS, dist, prompts, patches]."""
    p = 3
    config = PromptConfig(num_prompts=p, deep=deep)
    model = paper_model(config) if paper else build_model(tiny_backbone(), config, num_classes=3).eval()
    assert model.methods[0].distillation_token is (not paper)
    prompts = [b.insert_tokens.prompts[0] for b in model.backbone.blocks if b.insert_tokens is not None]
    assert len(prompts) == (TINY.num_layers if deep else 1)
    keep = 1 if paper else 2  # tokens before the prompts
    x = features()
    with torch.no_grad():
        e = model.backbone.embed(x)
        h = torch.cat([e[:, :keep], prompts[0].expand(2, -1, -1), e[:, 2:]], dim=1)
        for index, block in enumerate(model.backbone.blocks):
            if index and deep:
                h = torch.cat([h[:, :keep], prompts[index].expand(2, -1, -1), h[:, keep + p :]], dim=1)
            h = layer(block, h)
        assert h.shape[1] == TINY.num_tokens + p - (1 if paper else 0)
        torch.testing.assert_close(model(x), logits(model, h), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ BitFit


def test_bitfit_trains_the_published_bias_set():
    """Every Linear and LayerNorm bias of the encoder, the final LayerNorm's, and the head."""
    model = build_model(tiny_backbone(), "bitfit", num_classes=3)
    expected = {"head.weight", "head.bias", "backbone.norm.bias"}
    for i in range(TINY.num_layers):
        for name in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2", "norm1", "norm2"):
            expected.add(f"backbone.blocks.{i}.{name}.bias")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert count_method_parameters("bitfit", ASTConfig()) == 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768 == 102_144


def test_paper_mode_leaves_every_parameter_count_unchanged():
    for _, label, spec, _, _ in PAPER_ROWS:
        methods = resolve_methods(spec)
        paper = [paper_method(m) for m in methods]
        assert count_method_parameters(paper, ASTConfig()) == count_method_parameters(methods, ASTConfig()), label


# ------------------------------------------------------------------------------ init


def test_paper_init_is_what_from_pretrained_gave_the_published_runs():
    torch.manual_seed(0)
    layer_ = LoRALinear(torch.nn.Linear(512, 512), rank=64, scaling=1.0, init="paper")
    for weight in (layer_.lora_down, layer_.lora_up):
        assert abs(weight.std().item() - 0.02) < 0.001
    model = build_model(AST(ASTConfig(hidden_size=512, num_layers=1, num_heads=8, mlp_size=64, num_mel_bins=32,
                                      max_frames=48)),
                        paper_method(AdapterConfig(module="convpass", reduction_rate=8)), num_classes=3)
    adapter = model.backbone.blocks[0].mhsa.branches[0].adapter
    for linear in (adapter.down, adapter.up):
        assert abs(linear.weight.std().item() - 0.02) < 0.001 and not linear.bias.any()
    prompts = build_model(tiny_backbone(), paper_method(PromptConfig(num_prompts=50)), num_classes=3)
    bound = math.sqrt(6 / (3 * TINY.patch_size**2 + TINY.hidden_size))  # VPT's RGB bound, as published
    values = torch.cat([b.insert_tokens.prompts.flatten() for b in prompts.backbone.blocks])
    assert bound * 0.95 < values.abs().max() <= bound
    prefix = build_model(tiny_backbone(), paper_method(PrefixConfig(num_tokens=40)), num_classes=3)
    assert bound * 0.95 < prefix.backbone.blocks[0].attn.prefix.keys.abs().max() <= bound


# ------------------------------------------------------------------------------ setup resolution


def test_paper_setup_sets_every_option_in_one_place():
    paper = resolve(TrainConfig(dataset="us8k", data_root="x", method="linear", setup="paper"))
    assert (paper.pos_embed, paper.selection, paper.precision) == ("zeros", "last", "fp32")
    assert (paper.protocol, paper.channels, paper.embedding_cache) == ("reference", "first", False)
    gsc = resolve(TrainConfig(dataset="gsc", data_root="x", method="linear", setup="paper"))
    assert (gsc.protocol, gsc.channels, gsc.embedding_cache) == ("default", "mean", True)  # no SpecAugment
    methods = resolve(TrainConfig(dataset="esc50", data_root="x", setup="paper",
                                  method=["convpass_pf_par", "dpt", {"method": "lora", "reduction_rate": 256}]))
    adapter, prompt, lora = resolve_methods(methods.method)
    assert (adapter.init, adapter.convpass_conv, prompt.init, prompt.distillation_token, lora.init) == (
        "paper", False, "paper", False, "paper")
    assert resolve(methods) == methods  # idempotent: the CLI and run_training both resolve
    soft_mhsa, dense_houlsby = resolve_methods(
        resolve(TrainConfig(dataset="esc50", data_root="x", setup="paper",
                            method=[{"method": "soft_moa"}, {"method": "dense_moa", "layout": "houlsby"}])).method)
    assert (soft_mhsa.published_double_add, dense_houlsby.published_double_add) == (True, False)
    default = resolve(TrainConfig(dataset="us8k", data_root="x", method="dpt"))
    assert (default.pos_embed, default.selection, default.protocol, default.channels) == ("adapt", None, "default",
                                                                                          "mean")
    with pytest.raises(ValueError, match="setup 'paper' sets precision='fp32'; got precision='bf16'"):
        resolve(TrainConfig(dataset="esc50", data_root="x", setup="paper", precision="bf16"))
    with pytest.raises(ValueError, match="TrainConfig.setup='papers' is not valid; choose one of"):
        TrainConfig(dataset="esc50", data_root="x", setup="papers")


@pytest.mark.parametrize(
    "dataset, lr_family, epochs, batch, frames, specaugment",
    [("esc50", "adapter", 50, 32, 500, True), ("us8k", "prompt", 30, 32, 400, True),
     ("gsc", "linear", 75, 128, 100, False), ("fsc", "full", 75, 32, 400, False)],
)
def test_paper_hyper_parameters_are_pinned(dataset, lr_family, epochs, batch, frames, specaugment):
    """hparams/train.yaml and main.py of the published code, in both setups."""
    method = {"adapter": "lora", "prompt": "dpt", "linear": "linear", "full": "full"}[lr_family]
    lrs = {"adapter": 5e-3, "prompt": 1e-2, "linear": 1e-3, "full": 5e-5}
    for setup in ("default", "paper"):
        config = resolve(TrainConfig(dataset=dataset, data_root="x", method=method, setup=setup))
        assert (config.epochs, config.batch_size, config.max_frames, config.specaugment) == (
            epochs, batch, frames, specaugment)
        assert config.lr == lrs[lr_family]
        assert (config.betas, config.eps, config.weight_decay) == ((0.9, 0.98), 1e-6, 0.1)
    assert resolve(TrainConfig(dataset=dataset, data_root="x", method="bitfit")).lr == 5e-3
    assert resolve(TrainConfig(dataset=dataset, data_root="x", method="prefix")).lr == 1e-2
    from audiopetl.data import SpecAugment

    assert (SpecAugment().freq_mask, SpecAugment().time_mask) == (24, 80)  # the ESC-50 / US8K readers' masks


def test_cosine_schedule_is_per_step():
    from audiopetl.train.loop import cosine_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = cosine_schedule(optimizer, total_steps=10)
    rates = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    # torch's CosineAnnealingLR(T_max = steps per epoch x epochs), stepped every batch, as published
    assert rates == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(1, 11)])


# ------------------------------------------------------------------------------ end to end


def test_reproduce_in_paper_mode_records_the_setup_and_reports_both_columns(tmp_path):
    from audiopetl.experiments.recipes import load_recipe, run_sweep
    from audiopetl.experiments.report import write_report
    from audiopetl.experiments.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=4, seconds=0.5, seed=3)
    recipe = tmp_path / "one.yaml"
    recipe.write_text(
        "title: one row\ndatasets: [folder]\nmethods:\n  DPT-2: {method: prompt, num_prompts: 2, deep: true}\n"
        "base: {backbone: tiny-random, max_frames: 64, epochs: 2, batch_size: 8, progress: false, device: cpu}\n"
    )
    runs_dir = tmp_path / "runs"
    overrides = {"cache_dir": str(tmp_path / "cache")}
    for setup in ("paper", "default"):
        run_sweep(load_recipe(recipe), {"folder": str(data)}, runs_dir, overrides={**overrides, "setup": setup})
    paper_run = runs_dir / "paper" / "folder" / "dpt-2"
    config = yaml.safe_load((paper_run / "config.yaml").read_text())
    assert config["setup"] == "paper" and config["selection"] == "last" and config["pos_embed"] == "zeros"
    assert config["method"]["distillation_token"] is False
    (adapter,) = paper_run.glob("*/adapter.safetensors")
    header = read_adapter_metadata(adapter)
    assert header["metadata"]["setup"] == "paper"
    assert header["methods"][0]["distillation_token"] is False and header["methods"][0]["init"] == "paper"
    split = json.loads((adapter.parent / "metrics.json").read_text())
    assert split["selection"] == "last" and split["tested_epoch"] == 2
    default_config = yaml.safe_load((runs_dir / "folder" / "dpt-2" / "config.yaml").read_text())
    assert default_config["setup"] == "default"

    out = write_report(runs_dir, tmp_path / "report")
    markdown = (out / "results.md").read_text()
    assert "folder: ours, paper setup" in markdown and "folder: ours, default" in markdown
    for run_dir in (paper_run, runs_dir / "folder" / "dpt-2"):
        accuracy = json.loads((run_dir / "metrics.json").read_text())["test_accuracy_mean"]
        assert f"{100 * accuracy:.2f}" in markdown


# ------------------------------------------------------------------------------ selection, US8K


def _fit(tmp_path, selection, valid_rows):
    from audiopetl.train.loop import Batches, LoopSettings, fit

    torch.manual_seed(0)
    model = build_model(tiny_backbone(), "linear", num_classes=3)
    inputs = torch.randn(12, TINY.max_frames, TINY.num_mel_bins).numpy()
    labels = (torch.arange(12) % 3).numpy()
    settings = LoopSettings(epochs=3, batch_size=4, lr=0.05, progress=False, selection=selection)
    batches = lambda rows: Batches(inputs, labels, torch.tensor(rows).long().numpy())  # noqa: E731
    metrics = fit(model, batches(range(8)), batches(valid_rows), batches([8, 9, 10, 11]), settings, tmp_path)
    return model, metrics


def test_last_selection_tests_the_last_epochs_weights(tmp_path):
    from audiopetl.train.checkpoint import load_checkpoint

    model, metrics = _fit(tmp_path, "last", [])
    last = load_checkpoint(tmp_path / "checkpoint.pt")["trainable"]  # written after the final epoch
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.detach(), last[name], rtol=0, atol=0)
    assert metrics["selection"] == "last" and metrics["tested_epoch"] == 3 and metrics["num_valid"] == 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["valid_accuracy"] for r in log] == [None, None, None]
    with pytest.raises(ValueError, match="selection 'best' needs validation clips"):
        _fit(tmp_path / "best", "best", [])


def test_channel_policy_keeps_channel_0_or_averages(tmp_path):
    import numpy as np
    import soundfile as sf

    from audiopetl.frontend import FbankConfig, load_audio

    left, right = np.full(1600, 0.5, np.float32), np.full(1600, -0.1, np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "stereo.wav", channels="first"), left)
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.wav"), (left + right) / 2, rtol=0, atol=1e-7)
    assert FbankConfig(channels="first").to_dict() != FbankConfig().to_dict()  # so feature caches differ
    with pytest.raises(ValueError, match="FbankConfig.channels must be one of \\['mean', 'first'\\]"):
        FbankConfig(channels="left")


def test_us8k_in_paper_mode_trains_on_nine_folds_and_reports_the_last_epoch(tmp_path):
    from test_data_datasets import make_us8k

    from audiopetl.train import run_training

    root = make_us8k(tmp_path / "UrbanSound8K")
    config = TrainConfig(dataset="us8k", data_root=str(root), method="linear", setup="paper", backbone="tiny-random",
                         max_frames=32, epochs=2, batch_size=16, folds=(3,), cache_dir=str(tmp_path / "cache"),
                         progress=False, device="cpu")
    summary = run_training(config, tmp_path / "run")
    (split,) = summary["splits"]
    assert (split["num_train"], split["num_valid"], split["num_test"]) == (90, 0, 10)
    assert split["selection"] == "last" and summary["setup"] == "paper"
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json")]
    assert [m["frontend"]["channels"] for m in manifests] == ["first"]  # stereo clips: channel 0
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["embedding_cache"] is False and recorded["protocol"] == "reference"  # SpecAugment on the fly


def test_cli_and_config_yaml_select_the_setup(tmp_path, capsys):
    from audiopetl.cli.commands import config_from_args
    from audiopetl.cli.main import build_parser, main

    assert main(["reproduce", "table3", "--setup", "paper", "--dry-run", "--runs-dir", str(tmp_path / "r")]) == 0
    assert "[2/24] paper/esc50/ffn-seq-before: would run" in capsys.readouterr().out

    args = build_parser().parse_args(["train", "--dataset", "us8k", "--data-root", "x", "--setup", "paper",
                                      "--method", "dpt"])
    assert resolve(config_from_args(args)).protocol == "reference"
    (tmp_path / "run.yaml").write_text("dataset: esc50\ndata_root: x\nsetup: paper\nmethod: convpass_pf_seq\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--channels", "first"])
    config = resolve(config_from_args(args))
    assert (config.setup, config.channels, config.method["convpass_conv"]) == ("paper", "first", False)
    with pytest.raises(ValueError, match="pooling 'cls_dist' needs the distillation token"):
        build_model(tiny_backbone(), paper_method(PromptConfig(num_prompts=2)), num_classes=3, pooling="cls_dist")
