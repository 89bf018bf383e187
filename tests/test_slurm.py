"""The Slurm launcher against a real one-node Slurm cluster started by the test.

Needs Debian's slurm-wlm and munge (``.ci/system-packages`` installs them); without them the test
fails rather than skips. One module-scoped cluster; the whole file stays under a few minutes.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from audiopetl.experiments.launchers import SlurmLauncher, SlurmOptions, run_state
from audiopetl.experiments.recipes import load_recipe, run_sweep
from audiopetl.experiments.synthetic import make_synthetic_dataset

from slurm_cluster import slurm_cluster

RECIPE = """title: tiny slurm sweep
datasets: [folder]
methods:
  LoRA: {method: lora, targets: [q, v], reduction_rate: 16, alpha: 8.0}
  Bottleneck PF par: bottleneck_pf_par
  BitFit: bitfit
  Linear: {method: linear}
base: {backbone: tiny-random, max_frames: 100, epochs: 8, batch_size: 16, progress: false, device: cpu,
       precision: fp32, embedding_cache: false}
"""
TIMEOUT = 300  # seconds any wait of this file may take


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    with slurm_cluster(root) as env:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", env["SLURM_CONF"])
            yield env


def _wait_for(condition, what: str, timeout: float = TIMEOUT, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def test_slurm_sweep_matches_local_and_resumes_a_cancelled_job(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=12, seconds=1.0, seed=3)
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(RECIPE)
    recipe = load_recipe(recipe_file)
    roots = {"folder": str(data)}
    overrides = {"cache_dir": str(tmp_path / "cache")}

    local = {s["method"][0]["method"]: s for s in run_sweep(recipe, roots, tmp_path / "local", overrides=overrides)}
    assert len(local) == 4

    # Submit all four without waiting; cancel the first job once it has checkpointed an epoch.
    runs_dir = tmp_path / "slurm"
    run_sweep(recipe, roots, runs_dir, overrides=overrides, launcher=SlurmLauncher(SlurmOptions(cpus=1)))
    target = runs_dir / "folder" / "lora"
    job = json.loads((target / "state.json").read_text())["slurm_job_id"]
    assert "#SBATCH --cpus-per-task=1" in (target / "job.sbatch").read_text()
    _wait_for(lambda: any(target.glob("*/checkpoint.pt")),
              "the first checkpoint of the LoRA run")
    subprocess.run(["scancel", job], check=True)
    _wait_for(lambda: run_state(target)[0] != "running", "the cancelled job to leave the queue")
    state, details = run_state(target)
    assert state == "pending" and details["interrupted"], (state, details)
    epochs_before = len(next(target.glob("*/log.jsonl")).read_text().splitlines())
    assert 1 <= epochs_before < 8

    # A second start resubmits only the interrupted run; it resumes from its checkpoint.
    run_sweep(recipe, roots, runs_dir, overrides=overrides, launcher=SlurmLauncher(wait=True, poll=0.5))
    _wait_for(lambda: all(run_state(d)[0] == "done" for d in (runs_dir / "folder").iterdir()), "all runs", poll=0.5)
    epochs = [json.loads(line)["epoch"] for line in next(target.glob("*/log.jsonl")).read_text().splitlines()]
    assert epochs == list(range(1, 9))  # nothing trained twice, nothing skipped
    assert len(list(target.glob("slurm-*.log"))) == 2

    sweep = json.loads((runs_dir / "sweep.json").read_text())
    for run in sweep["runs"]:
        metrics = json.loads((runs_dir / run["id"] / "metrics.json").read_text())
        reference = local[metrics["method"][0]["method"]]
        for ours, theirs in zip(metrics["splits"], reference["splits"]):
            assert ours["test_accuracy"] == theirs["test_accuracy"], run["id"]
            assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-4, abs=1e-6), run["id"]
            assert ours["best_epoch"] == theirs["best_epoch"], run["id"]
