"""End-to-end training on a generated dataset: every method family learns, runs are
resumable, linear probing on cached embeddings equals the plain loop, eval/predict
reproduce the run's test accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from audiopetl.experiments.inference import evaluate_adapter, predict_files
from audiopetl.experiments.synthetic import CLASSES, make_synthetic_dataset
from audiopetl.train import ADAPTER, TrainConfig, resolve, run_training
from audiopetl.train import loop as loop_module

CHANCE = 1 / len(CLASSES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), clips_per_class=12, seconds=1.0, seed=1)


def config(dataset, tmp_path, **overrides) -> TrainConfig:
    values = dict(
        dataset="folder",
        data_root=str(dataset),
        backbone="tiny-random",
        max_frames=100,
        epochs=6,
        batch_size=16,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        device="cpu",
        precision="fp32",  # pinned: numbers must not depend on whether this CPU has fast bf16
    )
    values.update(overrides)
    return TrainConfig(**values)


METHOD_FAMILIES = {
    "lora": {"method": "lora", "targets": ["q", "v"], "reduction_rate": 16, "alpha": 8.0},
    "adapter": "bottleneck_pf_par",
    "convpass": "convpass_hou_par",
    "prompt": {"method": "prompt", "num_prompts": 4, "deep": True},
    "prefix": {"method": "prefix", "num_tokens": 4},
    "bitfit": "bitfit",
    "linear": "linear",
    "full": "full",
}


@pytest.mark.parametrize("family", sorted(METHOD_FAMILIES))
def test_every_method_family_learns_and_writes_a_run_directory(family, dataset, tmp_path):
    run_dir = tmp_path / family
    lr = {"full": 1e-3, "linear": 3e-2, "bitfit": 1e-2}.get(family)
    epochs = {"bitfit": 12}.get(family, 6)  # biases alone of a random backbone learn slowly (in fp32, pinned)
    summary = run_training(config(dataset, tmp_path, method=METHOD_FAMILIES[family], lr=lr, epochs=epochs), run_dir)
    assert summary["test_accuracy_mean"] > CHANCE + 0.2, summary
    for name in ("config.yaml", "metrics.json"):
        assert (run_dir / name).exists()
    split_dir = next(p for p in run_dir.iterdir() if p.is_dir())
    for name in ("log.jsonl", "checkpoint.pt", "metrics.json", ADAPTER):
        assert (split_dir / name).exists(), name
    log = [json.loads(line) for line in (split_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))


def test_eval_and_predict_reproduce_the_runs_test_accuracy(dataset, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    summary = run_training(config(dataset, tmp_path, method="bottleneck_pf_par"), run_dir)
    split = summary["splits"][0]
    adapter = run_dir / split["split"] / ADAPTER
    with monkeypatch.context() as patch:  # eval reads the training run's cache entry: no decoding
        patch.setattr("audiopetl.data.cache.load_audio", lambda *a, **k: pytest.fail("eval decoded audio again"))
        evaluated = evaluate_adapter(adapter, data_root=str(dataset), cache_dir=str(tmp_path / "cache"), device="cpu")
    assert evaluated["test_accuracy"] == pytest.approx(split["test_accuracy"], abs=1e-9)
    assert evaluated["num_test"] == split["num_test"]
    predictions = predict_files(adapter, [dataset], top_k=3, device="cpu")
    assert len(predictions) == len(CLASSES) * 12
    assert all(len(p["top_k"]) == 3 and p["label"] in CLASSES for p in predictions)
    truth = [p["path"].split("/")[-2] for p in predictions]
    accuracy = np.mean([p["label"] == t for p, t in zip(predictions, truth)])
    assert accuracy > CHANCE + 0.2


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(dataset, tmp_path, monkeypatch):
    settings = dict(method={"method": "lora", "targets": ["q", "v"], "reduction_rate": 16, "alpha": 8.0}, epochs=4)
    reference = run_training(config(dataset, tmp_path, **settings), tmp_path / "reference")

    real_save = loop_module.save_checkpoint
    saves = []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt("simulated kill after epoch 2")

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(config(dataset, tmp_path, **settings), tmp_path / "resumed")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    resumed = run_training(config(dataset, tmp_path, **settings), tmp_path / "resumed", resume=True)

    assert saves == [1, 2]
    for ours, theirs in zip(resumed["splits"], reference["splits"]):
        for key in ("test_accuracy", "test_loss", "best_valid_accuracy", "best_epoch"):
            assert ours[key] == theirs[key], key
    log = (tmp_path / "resumed" / resumed["splits"][0]["split"] / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3, 4]


def test_linear_probe_on_cached_embeddings_equals_the_plain_loop(dataset, tmp_path):
    cached = run_training(config(dataset, tmp_path, method="linear", embedding_cache=True), tmp_path / "cached")
    plain = run_training(config(dataset, tmp_path, method="linear", embedding_cache=False), tmp_path / "plain")
    for a, b in zip(cached["splits"], plain["splits"]):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["best_valid_accuracy"] == b["best_valid_accuracy"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    from audiopetl.petl import load_adapter

    heads = [load_adapter(p / cached["splits"][0]["split"] / ADAPTER).head.weight for p in (tmp_path / "cached", tmp_path / "plain")]
    torch.testing.assert_close(heads[0], heads[1], atol=1e-4, rtol=1e-3)


def test_best_checkpoint_is_a_copy_not_the_live_weights(dataset, tmp_path):
    """The test score must come from the best epoch's weights even when later epochs differ."""
    summary = run_training(config(dataset, tmp_path, method="bottleneck_pf_par", epochs=3, lr=0.5), tmp_path / "r")
    split = summary["splits"][0]
    log = [json.loads(x) for x in (tmp_path / "r" / split["split"] / "log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda r: r["valid_accuracy"])
    assert split["best_epoch"] == best["epoch"]
    assert split["best_valid_accuracy"] == best["valid_accuracy"]


def test_resolve_fills_paper_defaults(dataset, tmp_path):
    resolved = resolve(TrainConfig(dataset="esc50", data_root="x", method="lora"))
    assert (resolved.max_frames, resolved.epochs, resolved.batch_size, resolved.lr) == (500, 50, 32, 5e-3)
    assert resolved.specaugment is True
    assert resolve(TrainConfig(dataset="gsc", data_root="x", method="dpt")).lr == 1e-2
    assert resolve(TrainConfig(dataset="fsc", data_root="x", method="linear")).lr == 1e-3
    assert resolve(TrainConfig(dataset="us8k", data_root="x", method="full")).lr == 5e-5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"precision": "fp16"}, "precision"),
        ({"pos_embed": "random"}, "pos_embed"),
        ({"epochs": 0}, "epochs"),
        ({"bogus": 1}, "unknown training options"),
    ],
)
def test_invalid_options_fail_at_start_with_the_valid_choices(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"dataset": "esc50", "data_root": "x", **options})


def test_unknown_dataset_and_method_list_the_valid_names():
    with pytest.raises(ValueError, match="esc50"):
        resolve(TrainConfig(dataset="esc-51", data_root="x"))
    with pytest.raises(ValueError, match="lora"):
        resolve(TrainConfig(dataset="esc50", data_root="x", method="lorra"))


def test_missing_data_root_says_what_was_expected(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="esc50|ESC-50|meta"):
        run_training(TrainConfig(dataset="esc50", data_root=str(tmp_path / "nope"), backbone="tiny-random"), tmp_path / "r")


def test_bf16_keeps_frozen_weights_in_bf16_and_trained_ones_in_fp32():
    from audiopetl.backbone import load_backbone
    from audiopetl.petl import build_model, resolve_methods

    model = build_model(load_backbone("tiny-random", max_frames=100), resolve_methods("bottleneck_pf_par"), num_classes=6)
    features = torch.randn(2, 100, 128)
    reference = model(features)
    model.cast_frozen(torch.bfloat16)
    for name, param in model.named_parameters():
        expected = torch.float32 if param.requires_grad or param.dim() < 2 else torch.bfloat16
        assert param.dtype == expected, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(features).float()
    torch.testing.assert_close(logits, reference, atol=0.05, rtol=0.05)
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    logits.sum().backward()
    optimizer.step()
    assert all(p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_bf16_training_reaches_the_fp32_accuracy(dataset, tmp_path):
    """Frozen weights in bf16 + autocast must not cost accuracy (on CPUs without fast bf16
    this run is slow, so it is small)."""
    method = {"method": "lora", "targets": ["q", "v"], "reduction_rate": 16, "alpha": 8.0}
    results = {
        precision: run_training(config(dataset, tmp_path, method=method, precision=precision), tmp_path / precision)
        for precision in ("fp32", "bf16")
    }
    assert results["bf16"]["test_accuracy_mean"] > CHANCE + 0.2
    assert abs(results["bf16"]["test_accuracy_mean"] - results["fp32"]["test_accuracy_mean"]) <= 0.15


def test_gradient_accumulation_equals_the_larger_batch(dataset, tmp_path):
    """8 clips x 2 accumulation steps train exactly like batches of 16 (48 training clips)."""
    from audiopetl.petl import load_adapter

    common = dict(method="bottleneck_pf_par", epochs=2, few_shot=8, specaugment=False)
    runs = {
        name: run_training(config(dataset, tmp_path, **common, **options), tmp_path / name)
        for name, options in (("big", {"batch_size": 16}), ("accumulated", {"batch_size": 8, "grad_accum": 2}))
    }
    split = runs["big"]["splits"][0]["split"]
    big, accumulated = (load_adapter(tmp_path / n / split / ADAPTER).adapter_state_dict() for n in runs)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_training_matches_eager(dataset, tmp_path):
    eager = run_training(config(dataset, tmp_path, method="bottleneck_pf_par", epochs=2), tmp_path / "eager")
    compiled = run_training(config(dataset, tmp_path, method="bottleneck_pf_par", epochs=2, compile=True), tmp_path / "c")
    assert compiled["splits"][0]["test_loss"] == pytest.approx(eager["splits"][0]["test_loss"], rel=1e-3)
