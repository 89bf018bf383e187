"""Paper experiments as YAML recipes, expanded into resumable sweeps of training runs.

A recipe (``recipes/NAME.yaml``) names its datasets, its rows (label -> method spec),
optionally few-shot sizes per dataset or parameter budgets, shared training options, and
optionally ``setup: paper``. :func:`expand` turns it into runs, each with its own directory
under the sweep folder (``paper/...`` for the paper setup, so both setups of a table can
share one folder and one report);
:func:`run_sweep` hands the unfinished ones to a launcher (here, local workers or Slurm:
:mod:`.launchers`), skipping finished runs and resuming interrupted ones, so a sweep can be
stopped and started again at any time. ``sweep.json`` in the sweep folder lists the runs
with their labels, state (done / running / failed / pending) and log, and the counts.
A recipe's optional ``slurm:`` block sets the resources of its Slurm jobs.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from fnmatch import fnmatch
from pathlib import Path

import yaml

from ..train import METRICS, TrainConfig, is_finished, resolve, run_training
from ..train.checkpoint import write_json
from .launchers import STATES, LocalLauncher, run_state, write_job

RECIPE_KEYS = {"title", "datasets", "methods", "few_shot", "budgets", "base", "setup", "slurm"}
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


def select_runs(recipe: dict, overrides: dict | None = None, only: list[str] | None = None,
                select: list[str] | None = None) -> list[Run]:
    """The recipe's runs, narrowed to datasets ``only`` and run ids matching ``select`` (globs)."""
    runs = expand(recipe, overrides)
    if only is not None:
        unknown = sorted(set(only) - set(recipe["datasets"]))
        if unknown:
            raise ValueError(f"--only {unknown}: not in this recipe's datasets {recipe['datasets']}")
        runs = [r for r in runs if r.labels["dataset"] in only]
    if select:
        unmatched = [p for p in select if not any(fnmatch(r.run_id, p) for r in runs)]
        if unmatched:
            raise ValueError(f"--run {unmatched}: no such run; runs: {[r.run_id for r in runs]}")
        runs = [r for r in runs if any(fnmatch(r.run_id, p) for p in select)]
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
    launcher=None,
    select: list[str] | None = None,
) -> list[dict]:
    """Train every run of ``recipe`` under ``runs_dir`` with ``launcher`` (default: one after
    another here); finished runs and runs still running elsewhere are skipped, interrupted and
    failed ones (re)started. Returns the metrics of the runs this call finished; raises
    ``RuntimeError`` naming each failed run and its log once the others are done."""
    launcher = launcher or LocalLauncher()
    runs = select_runs(recipe, overrides, only, select)
    listed = select_runs(recipe, overrides, only) if select else runs  # sweep.json keeps every run
    needed = sorted({r.labels["dataset"] for r in runs})
    missing = [d for d in needed if d not in roots]
    if missing and not dry_run:
        raise ValueError(
            f"no data folder given for {missing}; pass --data NAME=PATH for each of {needed} "
            f"(or --only to run a subset)"
        )
    # Validate every configuration before the first (possibly hours-long) run starts.
    options = [{**r.options, "data_root": roots.get(r.labels["dataset"], "")} for r in runs]
    for values in options:
        resolve(TrainConfig.from_dict(values))
    runs_dir = Path(runs_dir)
    states = {r.run_id: run_state(runs_dir / r.run_id) for r in runs}
    todo = [r for r in runs if states[r.run_id][0] in ("pending", "failed")]
    for number, run in enumerate(runs, start=1):
        state, details = states[run.run_id]
        action = {"done": "done", "running": f"running ({_where(details)}), left alone"}.get(
            state, "would run" if dry_run else ("resuming" if details.get("interrupted") else "to run")
        )
        print(f"[{number}/{len(runs)}] {run.run_id}: {action}")
    if dry_run:
        return []
    progress = SweepProgress(recipe, listed, runs_dir)
    for run, values in zip(runs, options):
        if run in todo:
            write_job(runs_dir / run.run_id, values)
    print(f"launcher: {launcher.describe()}; {len(todo)} of {len(runs)} run(s) to start")
    progress.write()
    launcher.launch([runs_dir / r.run_id for r in todo], progress.finished, train=_train)
    counts = progress.write()
    print(", ".join(f"{counts[s]} {s}" for s in STATES) + f" (of {len(listed)}); details: {runs_dir / SWEEP_FILE}")
    summaries = [
        json.loads((runs_dir / r.run_id / METRICS).read_text()) for r in todo if is_finished(runs_dir / r.run_id)
    ]
    failed = [(r.run_id, run_state(runs_dir / r.run_id)[1]) for r in todo if run_state(runs_dir / r.run_id)[0] == "failed"]
    if failed:
        listing = "\n".join(f"  {run_id}: {d.get('error', '?')} (log: {d.get('log', '?')})" for run_id, d in failed)
        raise RuntimeError(
            f"{len(failed)} run(s) failed ({counts['done']}/{len(listed)} done):\n{listing}\n"
            f"retry one alone with --run RUN_ID (the same command retries them all)"
        )
    return summaries


def _train(*args, **kwargs):
    return run_training(*args, **kwargs)  # looked up at call time (tests replace run_training)


def _where(details: dict) -> str:
    if details.get("slurm_job_id"):
        return f"Slurm job {details['slurm_job_id']}"
    return f"{details.get('host')}:{details.get('pid')}"


class SweepProgress:
    """Counts of done / running / failed / pending runs, printed and kept in ``sweep.json``."""

    def __init__(self, recipe: dict, runs: list[Run], runs_dir: Path):
        self.recipe, self.runs, self.runs_dir = recipe, runs, runs_dir
        self.lock = threading.Lock()

    def finished(self, run_dir: Path) -> None:
        with self.lock:
            counts = self.write()
            state, details = run_state(run_dir)
            note = f" (log: {details.get('log')})" if state == "failed" else ""
            print(
                f"{run_dir.relative_to(self.runs_dir)}: {state}{note} -- {counts['done']}/{len(self.runs)} done, "
                f"{counts['running']} running, {counts['failed']} failed, {counts['pending']} pending",
                flush=True,
            )

    def write(self) -> dict:
        return write_sweep_file(self.recipe, self.runs, self.runs_dir)


def sweep_status(runs: list[Run], runs_dir: str | Path) -> dict[str, tuple[str, dict]]:
    """run id -> (done / running / failed / pending, details) for every run."""
    return {r.run_id: run_state(Path(runs_dir) / r.run_id) for r in runs}


def write_sweep_file(recipe: dict, runs: list[Run], runs_dir: Path) -> dict:
    """``sweep.json``: the runs with their labels (what the report groups by), each run's state
    and log, and the counts per state. Returns the counts."""
    status = sweep_status(runs, runs_dir)
    counts = {state: sum(s == state for s, _ in status.values()) for state in STATES}
    write_json(
        runs_dir / SWEEP_FILE,
        {
            "recipe": recipe["name"],
            "title": recipe["title"],
            "runs": _merge_runs(runs_dir / SWEEP_FILE, recipe, [{"id": r.run_id, **r.labels} for r in runs]),
            "status": {run_id: {"state": s, **{k: d[k] for k in ("log", "error", "slurm_job_id") if k in d}}
                       for run_id, (s, d) in status.items()},
            "progress": {**counts, "total": len(runs), "updated": time.time()},
        },
    )
    return counts


def format_status(status: dict[str, tuple[str, dict]]) -> str:
    """One line per run and a total line, for ``reproduce --status``."""
    lines = []
    for run_id, (state, details) in status.items():
        extra = ""
        if state == "failed":
            extra = f"  {details.get('error', '')}  log: {details.get('log')}"
        elif state == "running":
            extra = f"  {_where(details)}"
        elif details.get("interrupted"):
            extra = "  interrupted; resumes on the next start"
        lines.append(f"{state:8s} {run_id}{extra}")
    counts = {state: sum(s == state for s, _ in status.values()) for state in STATES}
    lines.append(", ".join(f"{counts[s]} {s}" for s in STATES) + f" (of {len(status)})")
    return "\n".join(lines)
