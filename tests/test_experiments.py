"""Recipes, resumable sweeps, reports and the offline demo."""

from __future__ import annotations

import csv
import json

import pytest

from audiopetl.experiments import recipes as recipes_module
from audiopetl.experiments.demo import run_demo
from audiopetl.experiments.recipes import expand, load_recipe, recipe_names, run_sweep
from audiopetl.experiments.report import write_report
from audiopetl.experiments.synthetic import CLASSES, make_synthetic_dataset
from audiopetl.train import resolve


def test_every_bundled_recipe_expands_into_valid_runs():
    from audiopetl.train import TrainConfig

    assert {"table1", "table2", "table3", "table4", "table5", "table6", "table7", "fig3"} <= set(recipe_names())
    for name in recipe_names():
        runs = expand(load_recipe(name))
        assert runs, name
        assert len({r.run_id for r in runs}) == len(runs), f"{name}: run ids collide"
        for run in runs:
            resolve(TrainConfig.from_dict({**run.options, "data_root": "x"}))


def test_table1_covers_methods_times_datasets_and_table2_the_paper_shots():
    table1 = expand(load_recipe("table1"))
    assert len(table1) == 15 * 4
    shots = {(r.labels["dataset"], r.labels["k"]) for r in expand(load_recipe("table2"))}
    assert shots == {("esc50", k) for k in (1, 2, 4, 8)} | {("gsc", k) for k in (2, 8, 32, 64)}


def test_fig3_budgets_choose_sizes_near_the_target():
    from audiopetl.backbone import ASTConfig
    from audiopetl.petl import build_model, resolve_methods
    from audiopetl.backbone import AST

    runs = [r for r in expand(load_recipe("fig3")) if r.labels["dataset"] == "gsc" and r.labels["row"] == "LoRA"]
    counts = []
    for run in runs:
        config = ASTConfig(max_frames=100)
        with __import__("torch").device("meta"):
            model = build_model(AST(config), resolve_methods(run.options["method"]), num_classes=35)
        counts.append(model.paper_parameter_count())
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    for run, count in zip(runs, counts):
        assert abs(count - run.labels["budget"]) / run.labels["budget"] < 0.5


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = make_synthetic_dataset(root / "data", clips_per_class=8, seconds=1.0, seed=2)
    recipe_file = root / "mini.yaml"
    recipe_file.write_text(
        "title: mini\n"
        "datasets: [folder]\n"
        "methods:\n"
        "  LoRA: {method: lora, targets: [q, v], reduction_rate: 16, alpha: 8.0}\n"
        "  Bottleneck PF par: bottleneck_pf_par\n"
        "base: {backbone: tiny-random, max_frames: 100, epochs: 3, batch_size: 16, progress: false, device: cpu}\n"
    )
    runs_dir = root / "runs"
    overrides = {"cache_dir": str(root / "cache")}
    summaries = run_sweep(load_recipe(recipe_file), {"folder": str(data)}, runs_dir, overrides=overrides)
    return recipe_file, data, runs_dir, overrides, summaries


def test_sweep_runs_the_grid_and_skips_finished_runs_on_restart(mini_sweep, monkeypatch):
    recipe_file, data, runs_dir, overrides, summaries = mini_sweep
    assert len(summaries) == 2
    assert (runs_dir / "folder" / "lora" / "metrics.json").exists()
    called = []
    monkeypatch.setattr(recipes_module, "run_training", lambda *a, **k: called.append(a))
    assert run_sweep(load_recipe(recipe_file), {"folder": str(data)}, runs_dir, overrides=overrides) == []
    assert called == []


def test_sweep_refuses_missing_data_before_training(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        run_sweep(load_recipe("table7"), {"esc50": "x"}, tmp_path)


def test_report_renders_tables_and_plots_with_the_runs_numbers(mini_sweep, tmp_path):
    _, _, runs_dir, _, summaries = mini_sweep
    out = write_report(runs_dir, tmp_path / "report")
    markdown = (out / "results.md").read_text()
    for summary in summaries:
        assert f"{100 * summary['test_accuracy_mean']:.2f}" in markdown
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(float(r["test_accuracy_mean"]) for r in rows) == sorted(s["test_accuracy_mean"] for s in summaries)
    assert (out / "accuracy_vs_params.png").stat().st_size > 1000


def test_report_shows_the_papers_figure_beside_ours(tmp_path):
    from audiopetl.experiments.report import results_table

    sweep = {"recipe": "table1", "title": "t"}
    metrics = {"test_accuracy_mean": 0.5, "test_accuracy_std": 0.0, "splits": [{}], "paper_parameters": 221184}
    header, rows = results_table(sweep, [{"id": "esc50/lora", "dataset": "esc50", "row": "LoRA", "metrics": metrics}])
    assert rows[0][:3] == ["LoRA", "221K", "50.00 (86.45)"]


def test_demo_learns_offline(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", clips_per_class=12, progress=False)
    output = capsys.readouterr().out
    assert "randomly initialised" in output
    for summary in results.values():
        assert summary["test_accuracy_mean"] > 1 / len(CLASSES) + 0.25
    assert list((tmp_path / "demo" / "runs" / "lora").glob("*/adapter.safetensors"))
    metrics = json.loads((tmp_path / "demo" / "runs" / "lora" / "metrics.json").read_text())
    assert metrics["trainable_parameters"] > 0


def test_few_shot_report_puts_k_in_columns_and_plots_curves(tmp_path):
    """Rendering only: the runs' metrics files are written here by hand."""
    runs = []
    for k, accuracy in ((1, 0.3), (2, 0.4)):
        run_id = f"esc50/lora/k{k}"
        metrics = {"test_accuracy_mean": accuracy, "test_accuracy_std": 0.0, "splits": [{}], "paper_parameters": 221184}
        (tmp_path / run_id).mkdir(parents=True)
        (tmp_path / run_id / "metrics.json").write_text(json.dumps(metrics))
        runs.append({"id": run_id, "dataset": "esc50", "row": "LoRA", "k": k})
    (tmp_path / "sweep.json").write_text(json.dumps({"recipe": "table2", "title": "few-shot", "runs": runs}))
    out = write_report(tmp_path, tmp_path / "report")
    markdown = (out / "results.md").read_text()
    assert "esc50 K=1" in markdown and "30.00 (31.80)" in markdown and "40.00 (42.20)" in markdown
    assert (out / "few_shot.png").stat().st_size > 1000
    assert not (out / "accuracy_vs_params.png").exists()


def test_report_tsne_plots_the_cls_token_of_each_run(mini_sweep, tmp_path):
    _, _, runs_dir, _, _ = mini_sweep
    out = write_report(runs_dir, tmp_path / "report", tsne=True)
    plots = sorted(p.name for p in out.glob("tsne-*.png"))
    assert plots == ["tsne-folder-bottleneck-pf-par.png", "tsne-folder-lora.png"]
    assert all((out / p).stat().st_size > 1000 for p in plots)


def test_report_tsne_embeds_speech_clips_with_the_runs_pooling(tmp_path):
    """A speech encoder has no [CLS]: each point is the run's pooled output, the mean of the clip's
    frames with the padding left out, computed here from the WAV files."""
    import torch

    from audiopetl.experiments.inference import load_for_inference, waveform_features
    from audiopetl.experiments.report import tsne_embeddings
    from audiopetl.frontend import frontend_from_settings
    from audiopetl.frontend.audio import load_audio

    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=4, seconds=0.5, classes=("low_tone", "chirp"))
    recipe = tmp_path / "speech.yaml"
    recipe.write_text(
        "title: speech\ndatasets: [folder]\nmethods:\n  Linear: linear\n"
        "base: {backbone: tiny-random-wav2vec2-stable, max_frames: 80, epochs: 1, batch_size: 8, progress: false, "
        "device: cpu}\n"
    )
    runs_dir = tmp_path / "runs"
    run_sweep(load_recipe(recipe), {"folder": str(data)}, runs_dir, overrides={"cache_dir": str(tmp_path / "cache")})
    run_dir = runs_dir / "folder" / "linear"
    embeddings, labels, class_names, what = tsne_embeddings(run_dir)
    assert what == "mean-pooled output" and len(embeddings) > 0

    model = load_for_inference(sorted(run_dir.glob("*/adapter.safetensors"))[0], device="cpu")
    frontend = frontend_from_settings(model.metadata["frontend"], model.backbone)
    by_hand = {}
    with torch.no_grad():
        for path in sorted(data.glob("*/*.wav")):
            features = waveform_features(frontend, [torch.from_numpy(load_audio(path))])
            valid = features[0, :, -1] > 0.5
            assert not valid.all()  # 0.5 s clips in 0.8 s inputs: padded
            hidden = model.hidden(features)[0]
            by_hand[path] = (class_names.index(path.parent.name), hidden[valid].mean(0), hidden[0])
    for embedding, label in zip(torch.from_numpy(embeddings), labels):
        matches = [p for p, (lab, mean, _) in by_hand.items() if torch.allclose(embedding, mean, rtol=0, atol=1e-5)]
        assert len(matches) == 1 and by_hand[matches[0]][0] == label
        assert not any(torch.allclose(embedding, first, rtol=0, atol=1e-3) for _, _, first in by_hand.values())
    assert (write_report(runs_dir, tmp_path / "report", tsne=True) / "tsne-folder-linear.png").stat().st_size > 1000
