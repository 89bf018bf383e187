"""wav2vec 2.0 / HuBERT / WavLM backbones: parity with transformers, checkpoint formats, the
waveform frontend and its cache, and every PETL method on every backbone."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from audiopetl.backbone import load_backbone
from audiopetl.backbone.checkpoint import CheckpointError
from audiopetl.backbone.registry import fingerprint, preset_names
from audiopetl.backbone.wav2vec2 import SpeechConfig, Wav2Vec2
from audiopetl.data import index_features
from audiopetl.data.folder import FolderDataset
from audiopetl.petl import build_model, load_adapter
from audiopetl.petl.config import ADAPTER_MODULES, MIXTURE_MODULES
from audiopetl.petl.budget import count_method_parameters, parameter_budget
from audiopetl.petl.registry import method_from_dict, method_names
from audiopetl.train.loop import Batches, LoopSettings, fit

transformers = pytest.importorskip("transformers")

SPEECH_PRESETS = ["tiny-random-wav2vec2", "tiny-random-hubert", "tiny-random-wavlm", "tiny-random-wav2vec2-stable"]
BACKBONES = ["tiny-random", *SPEECH_PRESETS]
TOLERANCE = dict(rtol=0, atol=1e-4)

_HF = {
    "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
    "hubert": (transformers.HubertConfig, transformers.HubertModel),
    "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
}


def _hf_model(model_type: str, stable: bool, seed: int = 0):
    config_cls, model_cls = _HF[model_type]
    extra = {"num_buckets": 32, "max_bucket_distance": 64} if model_type == "wavlm" else {}
    config = config_cls(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=stable, feat_extract_norm="layer" if stable else "group", conv_bias=stable, **extra,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.mark.parametrize("stable", [False, True], ids=["post-LN", "stable-LN"])
@pytest.mark.parametrize("model_type", list(_HF))
def test_matches_transformers_with_and_without_padding(tmp_path, model_type, stable):
    hf = _hf_model(model_type, stable)
    hf.save_pretrained(tmp_path)
    ours = load_backbone(tmp_path)
    assert isinstance(ours, Wav2Vec2) and ours.config.model_type == model_type
    assert ours.config.stable_layer_norm == stable and ours.config.uses_attention_mask == stable
    frontend = ours.frontend(max_frames=25, normalize=False)  # 4000 samples
    torch.manual_seed(1)
    waves = torch.randn(2, 4000) * 0.3
    lengths = torch.tensor([4000, 2500])
    padded = waves * (torch.arange(4000) < lengths[:, None])
    with torch.no_grad():
        torch.testing.assert_close(ours(frontend(waves)), hf(waves).last_hidden_state, **TOLERANCE)
        features = frontend(padded, lengths)
        if stable:  # large layout: a padding mask, as transformers' feature extractor returns for these models
            mask = (torch.arange(4000) < lengths[:, None]).long()
            expected = hf(padded, attention_mask=mask).last_hidden_state
            assert features[1, :, -1].sum() == ours.config.num_frames(2500)
        else:  # base layout: trained without masks, the zero padding is input
            expected = hf(padded).last_hidden_state
            assert bool(features[..., -1].all())
        torch.testing.assert_close(ours(features), expected, **TOLERANCE)


def test_frontend_normalisation_matches_the_feature_extractor():
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    clips = [np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.2 + 0.05,
             np.random.default_rng(1).standard_normal(2500).astype(np.float32) * 0.1]
    batch = extractor(clips, sampling_rate=16000, padding="max_length", max_length=4000, return_tensors="pt")
    backbone = load_backbone("tiny-random-wav2vec2-stable")
    frontend = backbone.frontend(max_frames=25, normalize=True)
    waves = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(c) for c in clips], batch_first=True)
    ours = frontend(waves, torch.tensor([4000, 2500]))
    reference = torch.cat([backbone.feature_encoder(batch["input_values"]), ours[..., -1:]], dim=-1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


def test_loads_bin_with_legacy_names_and_task_heads(tmp_path):
    """pytorch_model.bin of a task model (``wav2vec2.`` prefix, ``lm_head``) with weight_g/weight_v names."""
    hf = _hf_model("wav2vec2", stable=False)
    reference = load_backbone(_saved(hf, tmp_path / "new"))
    state = {}
    for key, tensor in hf.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        state["wav2vec2." + key] = tensor
    state["lm_head.weight"] = torch.zeros(5, 32)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(state, legacy / "pytorch_model.bin")
    (legacy / "config.json").write_text(json.dumps(hf.config.to_dict()))
    (legacy / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    loaded = load_backbone(legacy)
    assert loaded.load_report.fingerprint == reference.load_report.fingerprint
    assert "lm_head.weight" in loaded.load_report.ignored_keys
    assert loaded.frontend(25).config.normalize is False and reference.frontend(25).config.normalize is True


def test_bad_speech_checkpoints_are_refused_by_name(tmp_path):
    hf = _hf_model("hubert", stable=False)
    path = _saved(hf, tmp_path)
    state = {k: v for k, v in hf.state_dict().items()}
    state["encoder.layers.0.something.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="something"):
        load_backbone(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        load_backbone(path)


def _saved(hf, path):
    hf.save_pretrained(path)
    return path


def test_presets_are_deterministic_and_fingerprints_generalise():
    for name in SPEECH_PRESETS:
        a, b = load_backbone(name), load_backbone(name)
        assert a.load_report.fingerprint == b.load_report.fingerprint == fingerprint(b)
    assert set(SPEECH_PRESETS) <= set(preset_names())
    from audiopetl.backbone.checkpoint import fingerprint_state_dict

    ast = load_backbone("tiny-random")
    assert fingerprint(ast) == fingerprint_state_dict(ast.state_dict())


def _features(backbone, seed=0):
    frontend = backbone.frontend(max_frames=40)
    generator = torch.Generator().manual_seed(seed)
    waves = torch.randn(3, 6400, generator=generator) * 0.2
    return frontend(waves, torch.tensor([6400, 4000, 3000]))


# Every registered method with its defaults, and the adapter modules beyond the default one.
METHOD_SPECS = {name: {"method": name} for name in method_names()} | {
    f"adapter-{module}": {"method": "adapter", "module": module} for module in ADAPTER_MODULES[1:]
}


@pytest.mark.parametrize("backbone_name", BACKBONES)
@pytest.mark.parametrize("method", list(METHOD_SPECS))
def test_every_method_on_every_backbone_trains_saves_and_reloads(tmp_path, backbone_name, method):
    backbone = load_backbone(backbone_name, max_frames=40)
    torch.manual_seed(0)
    config = method_from_dict(METHOD_SPECS[method])
    if hasattr(config, "reduction_rate"):  # the paper's RR leaves no rank at the tiny presets' width
        config = dataclasses.replace(config, reduction_rate=16)
    model = build_model(copy.deepcopy(backbone), config, num_classes=3, class_names=["a", "b", "c"])
    features = _features(backbone)
    labels = torch.tensor([0, 1, 2])
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(features), labels)
    loss.backward()
    optimizer.step()
    changed = [k for k, v in model.adapter_state_dict().items() if not torch.equal(v, before[k])]
    assert changed and any(not k.startswith(("head.", "backbone.norm")) for k in changed) or method == "linear"
    model.eval()
    path = model.save_adapter(tmp_path / "adapter.safetensors")
    reloaded = load_adapter(path).eval()
    with torch.no_grad():
        assert torch.equal(model(features), reloaded(features))


@pytest.mark.parametrize("backbone_name", SPEECH_PRESETS)
def test_adapters_in_every_placement_and_combinations(backbone_name):
    backbone = load_backbone(backbone_name)
    features = _features(backbone)
    specs = [
        {"method": "adapter", "module": module, "layout": "pfeiffer", "location": location,
         "insertion": insertion, "position": position}
        for module in ADAPTER_MODULES
        for location in ("mhsa", "ffn")
        for insertion in ("parallel", "sequential")
        for position in ("before", "after")
    ]
    specs += [{"method": "adapter", "layout": layout} for layout in ("houlsby", "houlsby_mixed", "hydra")]
    specs += [[{"method": "adapter", "location": "ffn"}, {"method": "lora", "reduction_rate": 16},
               {"method": "dpt", "num_prompts": 3}, "bitfit"]]
    specs += [["prefix", {"method": "lora", "reduction_rate": 16, "targets": ["q", "v", "ffn_in", "ffn_out"]}]]
    specs += [{"method": mixture, "module": module, "layout": layout, "num_adapters": 3, "reduction_rate": 16}
              for mixture in ("dense_moa", "soft_moa") for module in MIXTURE_MODULES for layout in ("pfeiffer", "houlsby")]
    for spec in specs:
        torch.manual_seed(0)
        model = build_model(copy.deepcopy(backbone), spec, num_classes=2)
        loss = model(features).logsumexp(-1).sum()
        loss.backward()
        assert all(p.grad is not None for p in model.trainable_parameters()), spec


def test_new_modules_start_as_the_pretrained_function():
    """Zero-initialised adapters and LoRA leave the post-LN backbone's output unchanged at init."""
    backbone = load_backbone("tiny-random-wavlm")
    features = _features(backbone)
    with torch.no_grad():
        plain = backbone(features)
        for spec in ["bottleneck_pf_seq", "bottleneck_hou_par", {"method": "lora", "reduction_rate": 16}]:
            model = build_model(copy.deepcopy(backbone), spec, num_classes=2)
            torch.testing.assert_close(model.hidden(features), plain, rtol=0, atol=1e-5)


def test_prompts_follow_the_positional_convolution_and_count_as_frames():
    backbone = load_backbone("tiny-random-wav2vec2-stable")
    features = _features(backbone)
    model = build_model(copy.deepcopy(backbone), {"method": "prompt", "num_prompts": 4, "deep": True}, num_classes=2)
    hidden = model.hidden(features)
    assert hidden.shape[1] == features.shape[1] + 4
    assert model.backbone.blocks[0].insert_tokens.start == 0
    valid = features[2, :, -1].sum()
    pooled = model.embed(features)[2]
    torch.testing.assert_close(pooled, hidden[2, : 4 + int(valid)].mean(0), rtol=0, atol=1e-5)


# Methods that mix tokens: convolutions over time, Soft-MoA's dispatch softmax over tokens.
TOKEN_MIXING = {
    "soft_moa": {"method": "soft_moa", "layout": "houlsby", "num_adapters": 3, "num_slots": 2, "reduction_rate": 16},
    "dense_moa-convpass": {"method": "dense_moa", "module": "convpass", "num_adapters": 2, "reduction_rate": 16},
    "convpass": {"method": "adapter", "module": "convpass", "layout": "houlsby", "reduction_rate": 16},
    "convpass-seq-before": {"method": "adapter", "module": "convpass", "insertion": "sequential",
                            "position": "before", "reduction_rate": 16},
    "conformer": {"method": "adapter", "module": "conformer", "layout": "houlsby", "reduction_rate": 16},
    "dpt+conformer": [{"method": "dpt", "num_prompts": 2},
                      {"method": "adapter", "module": "conformer", "location": "ffn", "reduction_rate": 16}],
}


@pytest.mark.parametrize("method", list(TOKEN_MIXING))
def test_a_clips_logits_do_not_depend_on_the_padding_of_its_batch(method):
    """On a model that masks padding, a clip alone (no padding) and in a batch padded to a longer clip."""
    backbone = load_backbone("tiny-random-wav2vec2-stable")
    features = _features(backbone)  # clips of 6400, 4000 and 3000 samples
    frames = int(features[2, :, -1].sum())
    assert 0 < frames < features.shape[1]
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(backbone), TOKEN_MIXING[method], num_classes=3).eval()
    with torch.no_grad():
        for param in model.trainable_parameters():  # adapters start at zero output: give them a function
            param.normal_(0, 0.3)
        batched = model(features)[2]
        alone = model(features[2:, :frames])[0]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)


def test_gradient_checkpointing_recomputes_with_the_blocks_padding_mask():
    backbone = load_backbone("tiny-random-wav2vec2-stable")
    features = _features(backbone)
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(backbone), TOKEN_MIXING["soft_moa"], num_classes=3)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.normal_(0, 0.3)
    model(features).logsumexp(-1).sum().backward()
    expected = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad()
    model.backbone.gradient_checkpointing = True
    model(features).logsumexp(-1).sum().backward()
    for grad, param in zip(expected, model.trainable_parameters()):
        torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-6)


def test_conformer_batch_statistics_leave_padding_out():
    """In training the Conformer's BatchNorm normalises with batch statistics: those of real frames only,
    so more padding changes neither the outputs nor the running statistics."""
    backbone = load_backbone("tiny-random-wav2vec2-stable")
    features = _features(backbone)
    longer = torch.cat([features, torch.zeros(3, 7, features.shape[-1])], dim=1)  # 7 more padded frames each
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(backbone), TOKEN_MIXING["conformer"], num_classes=3)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.normal_(0, 0.3)
    other = copy.deepcopy(model)
    assert model.training and model.backbone.blocks[0].ffn.branches[0].adapter.batch_norm.training
    with torch.no_grad():
        torch.testing.assert_close(model(features), other(longer), rtol=0, atol=1e-5)
    for name, buffer in model.named_buffers():
        if "running" in name:
            torch.testing.assert_close(buffer, dict(other.named_buffers())[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone_name", SPEECH_PRESETS)
@pytest.mark.parametrize("init", ["default", "paper"])
def test_prompt_init_bound_uses_the_speech_encoders_own_fan_in(backbone_name, init):
    """uniform(-v, v), v = sqrt(6 / (fan_in + hidden)) with the feature projection's fan-in; the AST's
    paper bound (3 x its patch fan-in, VPT's RGB channels) is tested in test_paper_setup."""
    backbone = load_backbone(backbone_name)
    config = backbone.config
    bound = math.sqrt(6 / (config.conv_dim[-1] + config.hidden_size))
    assert backbone.input_fan_in == backbone.feature_projection.proj.in_features == config.conv_dim[-1]
    torch.manual_seed(0)
    prompts = build_model(copy.deepcopy(backbone), {"method": "dpt", "num_prompts": 50, "init": init}, num_classes=2)
    values = torch.cat([b.insert_tokens.prompts.flatten() for b in prompts.backbone.blocks])
    assert bound * 0.95 < values.abs().max() <= bound
    prefix = build_model(copy.deepcopy(backbone), {"method": "prefix", "num_tokens": 40, "init": init}, num_classes=2)
    keys = torch.cat([b.attn.prefix.keys.flatten() for b in prefix.backbone.blocks])
    assert bound * 0.95 < keys.abs().max() <= bound


def test_parameter_counts_and_budgets_on_a_speech_config():
    config = SpeechConfig()  # wav2vec 2.0 base
    dim, layers = config.hidden_size, config.num_layers
    rank = dim // method_from_dict({"method": "adapter"}).reduction_rate
    # Pfeiffer bottleneck: down + up per layer, and the trained LayerNorm of its sub-layer.
    expected = layers * ((dim * rank + rank) + (rank * dim + dim) + 2 * dim)
    assert count_method_parameters("bottleneck_pf_par", config) == expected
    assert count_method_parameters("linear", config, num_classes=10) == dim * 10 + 10 + 2 * dim
    full = count_method_parameters("full", config, num_classes=10)
    with torch.device("meta"):
        model = Wav2Vec2(config)
    frozen = sum(p.numel() for p in model.feature_encoder.parameters())
    assert full == sum(p.numel() for p in model.parameters()) - frozen + dim * 10 + 10
    sized = parameter_budget("lora", 100_000, config)
    assert abs(count_method_parameters(sized, config) - 100_000) < 20_000


@pytest.mark.parametrize("backbone_name", ["tiny-random-wav2vec2", "tiny-random-wav2vec2-stable"])
def test_paper_counts_keep_the_sublayer_norms_a_method_trains_in_post_and_pre_ln_models(backbone_name):
    """Post-LN, the final LayerNorm is the last block's FFN one: FFN adapters train it as theirs, so it counts.

    Pre-LN, the final LayerNorm is a module of its own, left out as the paper leaves it out.
    """
    config = load_backbone(backbone_name).config
    dim, layers = config.hidden_size, config.num_layers
    rank = dim // 16
    adapter = (dim * rank + rank) + (rank * dim + dim)  # down, up
    norm = 2 * dim
    expected = [
        # Houlsby: an adapter and the trained LayerNorm of each sub-layer, in every layer.
        ({"method": "bottleneck_hou_par", "reduction_rate": 16}, layers * (2 * adapter + 2 * norm)),
        ({"method": "adapter", "location": "ffn", "reduction_rate": 16}, layers * (adapter + norm)),
        ({"method": "adapter", "location": "mhsa", "reduction_rate": 16}, layers * (adapter + norm)),
        # Mixtures train their sub-layer's LayerNorm too (Houlsby: both sub-layers).
        ({"method": "dense_moa", "layout": "houlsby", "num_adapters": 2, "reduction_rate": 16},
         layers * 2 * (2 * adapter + (dim * 2 + 2) + norm)),
        # LoRA trains no block LayerNorm: the final one alone, left out.
        ({"method": "lora", "reduction_rate": 16}, layers * 2 * (dim * rank + rank * dim)),
    ]
    for spec, count in expected:
        assert count_method_parameters(spec, config) == count, spec


def test_cache_runs_the_feature_encoder_once_and_training_never(tmp_path):
    from audiopetl.experiments.synthetic import make_synthetic_dataset

    data_root = make_synthetic_dataset(tmp_path / "data", clips_per_class=3, seconds=0.5)
    backbone = load_backbone("tiny-random-wav2vec2")
    calls = []
    backbone.feature_encoder.register_forward_hook(lambda *_: calls.append(1))
    frontend = backbone.frontend(max_frames=50)
    index = FolderDataset().scan(str(data_root))
    first = index_features(index, frontend, tmp_path / "cache", progress=False)
    built = len(calls)
    assert built > 0 and first.features.shape[1:] == frontend.feature_shape
    again = index_features(index, backbone.frontend(max_frames=50), tmp_path / "cache", progress=False)
    assert len(calls) == built and np.array_equal(np.asarray(first.features), np.asarray(again.features))
    model = build_model(copy.deepcopy(backbone), "adapter", num_classes=len(index.class_names))
    model.backbone.feature_encoder.register_forward_hook(lambda *_: calls.append(1))
    rows = np.arange(len(first.labels))
    settings = LoopSettings(epochs=2, batch_size=4, lr=1e-3, progress=False)
    batches = Batches(first.features, first.labels, rows)
    fit(model, batches, batches, batches, settings, tmp_path / "run")
    assert len(calls) == built  # two epochs, validation and test: the encoder never ran again
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len([row for row in log if "epoch" in row]) >= 2


def test_train_on_a_folder_with_a_speech_backbone_end_to_end(tmp_path, capsys):
    from audiopetl.cli.main import main
    from audiopetl.experiments.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=4, seconds=0.5)
    run_dir = tmp_path / "run"
    code = main([
        "train", "--dataset", "folder", "--data-root", str(data), "--backbone", "tiny-random-wav2vec2",
        "--method", "adapter", "--epochs", "2", "--batch-size", "4", "--max-frames", "50",
        "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["paper_parameters"] > 0
    adapter = next(run_dir.glob("*/adapter.safetensors"))
    capsys.readouterr()
    assert main(["predict", str(adapter), str(data), "--top-k", "1", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert main(["eval", str(adapter), "--data-root", str(data), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    trained = json.loads((adapter.parent / "metrics.json").read_text())
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "(waveform)" in capsys.readouterr().out


def test_params_command_reads_a_speech_config(tmp_path, capsys):
    from audiopetl.cli.main import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(transformers.HubertConfig().to_dict()))
    assert main(["params", "--backbone-config", str(path), "--num-classes", "10"]) == 0
    table = capsys.readouterr().out
    assert "Bottleneck PF par" in table and "248,976" in table  # 12 x (2 x 768 x 12 + 12 + 768 + 2 x 768)


@pytest.mark.parametrize("backbone_name", ["tiny-random-wav2vec2", "tiny-random-wav2vec2-stable"])
def test_linear_probe_embedding_cache_equals_the_model(backbone_name):
    """Cached embeddings (masked mean of the un-affined final norm) + the norm's affine and head = the model."""
    from audiopetl.train.embeddings import LinearProbeForward, pooled_embeddings

    backbone = load_backbone(backbone_name)
    features = _features(backbone)
    model = build_model(copy.deepcopy(backbone), "linear", num_classes=3)
    with torch.no_grad():
        model.backbone.norm.weight.uniform_(0.5, 1.5)
        model.backbone.norm.bias.uniform_(-0.5, 0.5)
        settings = LoopSettings(epochs=1, batch_size=2, lr=1e-3, progress=False)
        embeddings = pooled_embeddings(model.backbone, features.numpy(), "mean", settings)
        torch.testing.assert_close(LinearProbeForward(model)(torch.from_numpy(embeddings)), model(features),
                                   rtol=0, atol=1e-5)


def test_bf16_storage_and_gradient_checkpointing_on_a_speech_backbone():
    backbone = load_backbone("tiny-random-wavlm")
    features = _features(backbone)
    model = build_model(copy.deepcopy(backbone), {"method": "lora", "reduction_rate": 16}, num_classes=2)
    reference = model(features).sum()
    reference.backward()
    expected = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad()
    model.backbone.gradient_checkpointing = True
    torch.testing.assert_close(model(features).sum(), reference)
    model(features).sum().backward()
    for grad, param in zip(expected, model.trainable_parameters()):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    model.cast_frozen(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(features)
    assert torch.isfinite(logits).all()


def test_hub_id_dispatches_on_model_type_and_reads_the_preprocessor_config(tmp_path, monkeypatch):
    """A hub repo with pytorch_model.bin (no safetensors), as facebook/wav2vec2-base-960h ships it."""
    from test_checkpoint import fake_hub

    hf = _hf_model("wavlm", stable=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    torch.save(hf.state_dict(), repo / "pytorch_model.bin")
    (repo / "config.json").write_text(json.dumps(hf.config.to_dict()))
    (repo / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "return_attention_mask": True}))
    requests = []
    fake_hub(monkeypatch, repo, requests)
    ours = load_backbone("microsoft/wavlm-large", cache_dir=tmp_path / "cache")
    assert [r[1] for r in requests] == ["config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json"]
    assert ours.config.model_type == "wavlm" and ours.source == "microsoft/wavlm-large"
    assert ours.frontend(25).config.normalize is False and ours.frontend(25).config.attention_mask is True
    waves = torch.randn(1, 4000) * 0.3
    with torch.no_grad():
        torch.testing.assert_close(ours(ours.frontend(25)(waves)), hf(waves).last_hidden_state, **TOLERANCE)


def test_frontend_settings_name_the_encoder_weights():
    from audiopetl.data.cache import FeatureCache
    from audiopetl.frontend import frontend_from_settings

    backbone = load_backbone("tiny-random-hubert")
    settings = backbone.frontend(50).settings
    assert settings["kind"] == "waveform" and settings["max_frames"] == 50
    assert frontend_from_settings(settings, backbone).settings == settings
    changed = copy.deepcopy(backbone)
    with torch.no_grad():
        changed.feature_encoder.layers[0].conv.weight.mul_(1.01)
    assert changed.frontend(50).settings["encoder"] != settings["encoder"]
    paths = ["/nonexistent/a.wav"]
    assert FeatureCache("/tmp").key(paths, changed.frontend(50)) != FeatureCache("/tmp").key(paths, backbone.frontend(50))
    with pytest.raises(ValueError, match="differs"):
        frontend_from_settings(settings, changed)
