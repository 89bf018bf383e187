"""Paper experiments as YAML recipes, expanded into resumable sweeps of training runs.

A recipe (``recipes/NAME.yaml``) names its datasets, its rows (label -> method spec),
optionally few-shot sizes per dataset or parameter budgets, shared training options, and
optionally ``setup: paper``. :func:`expand` turns it into runs, each with its own directory
under the sweep folder (``paper/...`` for the paper setup, so both setups of a table can
share one folder and one report);
:func:`run_sweep` trains them in order, skipping finished runs and resuming interrupted
ones, so a sweep can be stopped and started again at any time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..train import TrainConfig, is_finished, resolve, run_training
from ..train.checkpoint import write_json

RECIPE_KEYS = {"title", "datasets", "methods", "few_shot", "budgets", "base", "setup"}
SWEEP_FILE = "sweep.json"


@dataclass
class Run:
    run_id: str  # relative directory of the run inside the sweep folder
    labels: dict  # dataset, row and, where used, k / budget: what the report groups by
    options: dict = field(default_factory=dict)  # TrainConfig fields (without data_root)


def recipe_names() -> list[str]:
    folder = resources.files(__package__) / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> dict:
    """A bundled recipe by name (``table1``) or a YAML file path; validated."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        recipe, source = yaml.safe_load(path.read_text()), str(path)
    elif str(name_or_path) in recipe_names():
        text = (resources.files(__package__) / "recipes" / f"{name_or_path}.yaml").read_text()
        recipe, source = yaml.safe_load(text), str(name_or_path)
    else:
        raise ValueError(f"unknown recipe {str(name_or_path)!r}; bundled recipes: {recipe_names()}")
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"recipe {source}: unknown keys {unknown}; valid keys: {sorted(RECIPE_KEYS)}")
    for required in ("datasets", "methods"):
        if not recipe.get(required):
            raise ValueError(f"recipe {source}: '{required}' is required")
    recipe.setdefault("title", source)
    recipe["name"] = path.stem if path.suffix else str(name_or_path)
    return recipe


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def expand(recipe: dict, overrides: dict | None = None) -> list[Run]:
    """Every run of the recipe, in order (dataset-major)."""
    from ..backbone import ASTConfig
    from ..petl import parameter_budget, resolve_methods

    setup_option = {"setup": recipe["setup"]} if "setup" in recipe else {}
    base = {**recipe.get("base", {}), **setup_option, **(overrides or {})}
    setup = base.get("setup", "default")
    runs = []
    for dataset in recipe["datasets"]:
        for row, method in recipe["methods"].items():
            point = {"dataset": dataset, "row": row}
            variants = [({}, "")]
            if "few_shot" in recipe:
                variants = [({"few_shot": k}, f"k{k}") for k in recipe["few_shot"].get(dataset, [])]
            elif "budgets" in recipe:
                variants = []
                for budget in recipe["budgets"]:
                    (config,) = resolve_methods(method)
                    sized = parameter_budget(config, budget, ASTConfig())
                    variants.append(({"method": sized.to_dict(), "budget": budget}, f"p{budget}"))
            for extra, suffix in variants:
                budget = extra.pop("budget", None)
                options = {**base, "dataset": dataset, "method": method, **extra}
                labels = dict(point, **({"k": extra["few_shot"]} if "few_shot" in extra else {}))
                if budget is not None:
                    labels["budget"] = budget
                labels["setup"] = setup
                prefix = "" if setup == "default" else setup
                run_id = "/".join(filter(None, [prefix, dataset, slug(row), suffix]))
                runs.append(Run(run_id, labels, options))
    return runs


def _merge_runs(sweep_file: Path, recipe: dict, listed: list[dict]) -> list[dict]:
    """``listed`` plus the runs an earlier sweep of the same recipe in this folder listed (e.g. the
    other setup, or other datasets under ``--only``), so one report covers them all."""
    if not sweep_file.exists():
        return listed
    earlier = json.loads(sweep_file.read_text())
    if earlier.get("recipe") != recipe["name"]:
        return listed
    ids = {run["id"] for run in listed}
    return [run for run in earlier["runs"] if run["id"] not in ids] + listed


def run_sweep(
    recipe: dict,
    roots: dict[str, str],
    runs_dir: str | Path,
    overrides: dict | None = None,
    only: list[str] | None = None,
    dry_run: bool = False,
) -> list[dict]:
    """Train every run of ``recipe`` under ``runs_dir``; finished runs are skipped."""
    runs = expand(recipe, overrides)
    if only is not None:
        unknown = sorted(set(only) - set(recipe["datasets"]))
        if unknown:
            raise ValueError(f"--only {unknown}: not in this recipe's datasets {recipe['datasets']}")
        runs = [r for r in runs if r.labels["dataset"] in only]
    needed = sorted({r.labels["dataset"] for r in runs})
    missing = [d for d in needed if d not in roots]
    if missing and not dry_run:
        raise ValueError(
            f"no data folder given for {missing}; pass --data NAME=PATH for each of {needed} "
            f"(or --only to run a subset)"
        )
    # Validate every configuration before the first (possibly hours-long) run starts.
    configs = [resolve(TrainConfig.from_dict({**r.options, "data_root": roots.get(r.labels["dataset"], "")})) for r in runs]
    runs_dir = Path(runs_dir)
    if not dry_run:
        listed = _merge_runs(runs_dir / SWEEP_FILE, recipe, [{"id": r.run_id, **r.labels} for r in runs])
        write_json(runs_dir / SWEEP_FILE, {"recipe": recipe["name"], "title": recipe["title"], "runs": listed})
    summaries = []
    for number, (run, config) in enumerate(zip(runs, configs), start=1):
        run_dir = runs_dir / run.run_id
        status = "done" if is_finished(run_dir) else ("would run" if dry_run else "running")
        print(f"[{number}/{len(runs)}] {run.run_id}: {status}")
        if status == "running":
            summaries.append(run_training(config, run_dir, resume=True))
    return summaries
