"""Results of a sweep as the paper shows them: Markdown and CSV tables, plots.

:func:`collect` reads every finished run of a sweep folder (``sweep.json`` plus each
run's ``metrics.json``). :func:`write_report` writes ``results.md`` / ``results.csv``
(rows = methods; columns = datasets, or dataset x K for few-shot, or budgets; the
paper's published figure beside ours where it exists), ``accuracy_vs_params.png``
(Fig. 3/4), ``few_shot.png`` for few-shot sweeps, and with ``tsne=True`` a t-SNE plot of
each run's clip embeddings (Fig. 2: the [CLS] token; the pooled output where the backbone
has no [CLS], as the speech encoders).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from .paper_results import paper_accuracy
from .recipes import SWEEP_FILE


def collect(runs_dir: str | Path) -> tuple[dict, list[dict]]:
    """(sweep description, finished runs with labels and metrics)."""
    runs_dir = Path(runs_dir)
    sweep_file = runs_dir / SWEEP_FILE
    if not sweep_file.exists():
        raise FileNotFoundError(f"{sweep_file} not found: is {runs_dir} a folder made by `audiopetl reproduce`?")
    sweep = json.loads(sweep_file.read_text())
    finished = []
    for run in sweep["runs"]:
        metrics_file = runs_dir / run["id"] / "metrics.json"
        if metrics_file.exists():
            finished.append({**run, "metrics": json.loads(metrics_file.read_text())})
    return sweep, finished


def _column(run: dict) -> str:
    if "k" in run:
        return f"{run['dataset']} K={run['k']}"
    if "budget" in run:
        return f"{run['dataset']} {run['budget'] // 1000}K"
    return run["dataset"]


def _cell(metrics: dict) -> str:
    mean, std = 100 * metrics["test_accuracy_mean"], 100 * metrics["test_accuracy_std"]
    return f"{mean:.2f} ± {std:.2f}" if len(metrics["splits"]) > 1 else f"{mean:.2f}"


def _setup(run: dict) -> str:
    return run.get("setup", "default")  # sweeps written before setups existed ran the default


SETUP_HEADINGS = {"paper": "ours, paper setup", "default": "ours, default"}


def results_table(sweep: dict, runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: method, trainable parameters, then per dataset column the accuracy.

    With default runs only, a cell is ``ours (paper's figure)``. Once paper-setup runs exist,
    each dataset column splits into the paper's figure, ours in the paper setup and ours in
    the default setup, side by side, with one average per setup.
    """
    columns = list(dict.fromkeys(_column(r) for r in runs))
    setups = [s for s in SETUP_HEADINGS if any(_setup(r) == s for r in runs)]
    side_by_side = setups != ["default"]
    by_row: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for run in runs:
        by_row[run["row"]][(_column(run), _setup(run))] = run
    if side_by_side:
        cells = [f"{c}: {heading}" for c in columns for heading in ("paper", *(SETUP_HEADINGS[s] for s in setups))]
        header = ["Method", "# params", *cells, *(f"Avg {SETUP_HEADINGS[s]}" for s in setups)]
    else:
        header = ["Method", "# params", *columns, "Avg"]
    rows = []
    for row, found in by_row.items():
        first = next(iter(found.values()))
        line = [row, f"{first['metrics']['paper_parameters'] / 1000:.0f}K"]
        ours: dict[str, list[float]] = {s: [] for s in setups}
        for column in columns:
            some = next((found[(column, s)] for s in setups if (column, s) in found), None)
            paper = paper_accuracy(sweep["recipe"], row, some["dataset"], some.get("k")) if some else None
            if side_by_side:
                line.append(f"{paper:.2f}" if paper is not None else "")
            for setup in setups:
                run = found.get((column, setup))
                if run is not None:
                    ours[setup].append(100 * run["metrics"]["test_accuracy_mean"])
                if side_by_side:
                    line.append(_cell(run["metrics"]) if run else "")
                elif run is None:
                    line.append("")
                else:
                    line.append(_cell(run["metrics"]) + (f" ({paper:.2f})" if paper is not None else ""))
        line += [f"{sum(ours[s]) / len(ours[s]):.2f}" if ours[s] else "" for s in setups]
        rows.append(line)
    return header, rows


def _progress_line(sweep: dict, finished: int) -> list[str]:
    """How complete the sweep is, from sweep.json's counts (written by `reproduce`)."""
    progress = sweep.get("progress")
    total = len(sweep["runs"])
    if finished == total and not (progress or {}).get("failed"):
        return []
    failed = f", {progress['failed']} failed" if progress and progress.get("failed") else ""
    return [f"Partial sweep: {finished} of {total} runs finished{failed} (`audiopetl reproduce ... --status`)."]


def write_report(runs_dir: str | Path, out: str | Path, tsne: bool = False) -> Path:
    sweep, runs = collect(runs_dir)
    if not runs:
        raise ValueError(f"no finished runs in {runs_dir}; run `audiopetl reproduce` first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = results_table(sweep, runs)
    markdown = [
        f"# {sweep['title']}",
        "",
        "Test accuracy (%) of our runs beside the paper's published figure where it gives one "
        "(in parentheses, or its own column once paper-setup runs exist: `reproduce --setup paper`).",
        "Parameters: trainable, counted as the paper does (head and final LayerNorm excluded except for Linear).",
        *_progress_line(sweep, len(runs)),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    (out / "results.md").write_text("\n".join(markdown))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["recipe", "row", "dataset", "k", "budget", "setup", "paper_parameters",
                         "test_accuracy_mean", "test_accuracy_std", "paper_accuracy"])
        for run in runs:
            metrics = run["metrics"]
            writer.writerow([
                sweep["recipe"], run["row"], run["dataset"], run.get("k", ""), run.get("budget", ""), _setup(run),
                metrics["paper_parameters"], metrics["test_accuracy_mean"], metrics["test_accuracy_std"],
                paper_accuracy(sweep["recipe"], run["row"], run["dataset"], run.get("k")) or "",
            ])
    _plot_accuracy_vs_params(runs, out / "accuracy_vs_params.png")
    _plot_few_shot(runs, out / "few_shot.png")
    if tsne:
        for run in runs:
            plot_tsne(Path(runs_dir) / run["id"], out / f"tsne-{run['id'].replace('/', '-')}.png")
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy_vs_params(runs: list[dict], path: Path) -> None:
    points = [(r, r["metrics"]["paper_parameters"]) for r in runs if "k" not in r]
    _plot_curves(points, "trainable parameters", path)


def _plot_few_shot(runs: list[dict], path: Path) -> None:
    _plot_curves([(r, r["k"]) for r in runs if "k" in r], "examples per class", path)


def _plot_curves(points: list[tuple[dict, float]], xlabel: str, path: Path) -> None:
    """Test accuracy against ``x`` (log scale), one panel per dataset, one line per method."""
    if not points:
        return
    plt = _pyplot()
    datasets = list(dict.fromkeys(run["dataset"] for run, _ in points))
    figure, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        series: dict[str, list] = defaultdict(list)
        for run, x in points:
            if run["dataset"] == dataset:
                label = run["row"] if _setup(run) == "default" else f"{run['row']} ({_setup(run)} setup)"
                series[label].append((x, 100 * run["metrics"]["test_accuracy_mean"]))
        for row, line in series.items():
            line.sort()
            axis.plot([x for x, _ in line], [a for _, a in line], marker="o", label=row)
        axis.set(xscale="log", xlabel=xlabel, ylabel="test accuracy (%)", title=dataset)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def tsne_embeddings(run_dir: Path, max_classes: int = 10) -> tuple["np.ndarray", "np.ndarray", list[str], str]:
    """(embeddings, labels, class names, what the embeddings are) of the test clips of the run's
    first split whose label is below ``max_classes``.

    The embedding is the final [CLS] token where the backbone has one (the paper's Fig. 2),
    otherwise the backbone's ``pool`` with the run's pooling (the speech encoders: the mean of
    the clip's frames, padding left out).
    """
    import numpy as np
    import torch
    import yaml

    from ..data import get_dataset, index_features
    from ..frontend import frontend_from_settings
    from .inference import load_for_inference

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    adapter = sorted(run_dir.glob("*/adapter.safetensors"))[0]
    model = load_for_inference(adapter, device="cpu")
    source = get_dataset(config["dataset"])
    index = source.scan(config["data_root"])
    split = {s.name: s for s in source.splits(index, protocol=config["protocol"])}[model.metadata["split"]]
    frontend = frontend_from_settings(model.metadata["frontend"], model.backbone)
    data = index_features(index, frontend, config["cache_dir"], progress=False)
    rows = data.rows([i for i in split.test if index.clips[i].label < max_classes])
    pooling = "cls" if "cls" in model.backbone.poolings else model.pooling
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            features = torch.from_numpy(data.features[rows[start : start + 32]])
            embeddings.append(model.backbone.pool(model.hidden(features), features, pooling).numpy())
    what = "[CLS]" if pooling == "cls" else f"{pooling}-pooled output"
    return np.concatenate(embeddings), data.labels[rows], index.class_names, what


def plot_tsne(run_dir: Path, path: Path, max_classes: int = 10) -> Path:
    """t-SNE of :func:`tsne_embeddings` (paper Fig. 2), written to ``path``."""
    import numpy as np
    from sklearn.manifold import TSNE

    embeddings, labels, class_names, what = tsne_embeddings(run_dir, max_classes)
    perplexity = min(30, max(2, len(embeddings) - 1) / 3)
    points = TSNE(n_components=2, perplexity=perplexity, random_state=0).fit_transform(embeddings)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    for label in np.unique(labels):
        mask = labels == label
        axis.scatter(points[mask, 0], points[mask, 1], s=8, label=class_names[label])
    axis.set(title=f"t-SNE of {what}: {run_dir.name}", xticks=[], yticks=[])
    axis.legend(fontsize=6, markerscale=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
