"""Sweep launchers (local, local workers), run states, failures and retries, `reproduce --status`,
and the build-once lock the feature cache takes (concurrent builders, stale-lock takeover)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from audiopetl.buildlock import BuildLock
from audiopetl.cli.main import main
from audiopetl.data import cache as cache_module
from audiopetl.experiments import recipes as recipes_module
from audiopetl.experiments.launchers import LocalLauncher, SlurmOptions, make_launcher, run_state
from audiopetl.experiments.recipes import load_recipe, run_sweep
from audiopetl.experiments.synthetic import make_synthetic_dataset
from audiopetl.frontend import FbankConfig

RECIPE = """title: mini
datasets: [folder]
methods:
  LoRA: {method: lora, targets: [q, v], reduction_rate: 16, alpha: 8.0}
  Bottleneck PF par: bottleneck_pf_par
base: {backbone: tiny-random, max_frames: 100, epochs: 2, batch_size: 16, progress: false, device: cpu,
       precision: fp32}
"""


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    data = make_synthetic_dataset(root / "data", clips_per_class=6, seconds=1.0, seed=5)
    recipe_file = root / "mini.yaml"
    recipe_file.write_text(RECIPE)
    return load_recipe(recipe_file), {"folder": str(data)}, {"cache_dir": str(root / "cache")}, recipe_file


def _accuracies(summaries):
    return sorted((s["method"][0]["method"], s["test_accuracy_mean"], round(s["splits"][0]["test_loss"], 4))
                  for s in summaries)


def test_local_workers_give_the_metrics_of_the_in_process_sweep(sweep_setup, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this test is about CPU workers
    recipe, roots, overrides, _ = sweep_setup
    here = run_sweep(recipe, roots, tmp_path / "here", overrides=overrides)
    workers = run_sweep(recipe, roots, tmp_path / "workers", overrides=overrides, launcher=LocalLauncher(workers=2))
    assert len(workers) == 2 and _accuracies(workers) == _accuracies(here)
    for run_id in ("folder/lora", "folder/bottleneck-pf-par"):
        assert (tmp_path / "workers" / run_id / "run.log").exists()
        assert run_state(tmp_path / "workers" / run_id)[0] == "done"
    sweep = json.loads((tmp_path / "workers" / "sweep.json").read_text())
    assert sweep["progress"]["done"] == 2 and sweep["progress"]["total"] == 2
    assert {s["state"] for s in sweep["status"].values()} == {"done"}


def test_a_failed_run_is_reported_with_its_log_and_retried_alone(sweep_setup, tmp_path, monkeypatch, capsys):
    recipe, roots, overrides, recipe_file = sweep_setup
    real = recipes_module.run_training

    def fail_lora(config, run_dir, resume=False):
        if "lora" in str(run_dir):
            raise RuntimeError("out of memory (simulated)")
        return real(config, run_dir, resume=resume)

    monkeypatch.setattr(recipes_module, "run_training", fail_lora)
    with pytest.raises(RuntimeError, match=r"(?s)1 run\(s\) failed.*folder/lora: RuntimeError: out of memory"):
        run_sweep(recipe, roots, tmp_path / "runs", overrides=overrides)
    state, details = run_state(tmp_path / "runs" / "folder" / "lora")
    assert state == "failed" and "out of memory" in details["error"]
    assert "Traceback" in open(details["log"]).read()
    assert run_state(tmp_path / "runs" / "folder" / "bottleneck-pf-par")[0] == "done"
    sweep = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert sweep["progress"] == {**sweep["progress"], "done": 1, "failed": 1, "pending": 0, "running": 0}

    argv = ["reproduce", str(recipe_file), "--runs-dir", str(tmp_path / "runs"), "--data", f"folder={roots['folder']}",
            "--set", f"cache_dir={overrides['cache_dir']}"]
    capsys.readouterr()
    assert main([*argv, "--status"]) == 0
    status = capsys.readouterr().out
    assert "failed   folder/lora  RuntimeError: out of memory" in status and "1 done, 0 running, 1 failed, 0 pending" in status

    from audiopetl.experiments.report import write_report

    report = (write_report(tmp_path / "runs", tmp_path / "report") / "results.md").read_text()
    assert "Partial sweep: 1 of 2 runs finished, 1 failed" in report

    monkeypatch.setattr(recipes_module, "run_training", real)
    calls = []
    monkeypatch.setattr(recipes_module, "run_training", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert main([*argv, "--run", "folder/lora"]) == 0
    assert [p.name for p in calls] == ["lora"]  # the finished run is not touched
    assert run_state(tmp_path / "runs" / "folder" / "lora")[0] == "done"
    sweep = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert len(sweep["runs"]) == 2 and sweep["progress"]["done"] == 2  # a retry of one run keeps the others listed


def test_an_interrupted_run_is_pending_and_resumes(sweep_setup, tmp_path):
    run_dir = tmp_path / "folder" / "lora"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "state.json").write_text(json.dumps({"state": "running", "host": socket.gethostname(), "pid": dead.pid}))
    state, details = run_state(run_dir)
    assert state == "pending" and details["interrupted"]
    (run_dir / "state.json").write_text(json.dumps({"state": "running", "host": socket.gethostname(), "pid": os.getpid()}))
    assert run_state(run_dir)[0] == "running"


def test_launcher_options_are_checked_and_become_sbatch_lines():
    with pytest.raises(ValueError, match="unknown launcher 'pbs'"):
        make_launcher("pbs")
    with pytest.raises(ValueError, match="--workers"):
        make_launcher("slurm", workers=2)
    with pytest.raises(ValueError, match="gpu"):
        SlurmOptions.from_dict({"gpu": 1})
    lines = SlurmOptions(partition="a100", time="04:00:00", gpus=1, cpus=8, mem="32G",
                         extra=["--account=abc", "#SBATCH --qos=high"]).directives("job", "out.log")
    for line in ("--partition=a100", "--time=04:00:00", "--gpus=1", "--cpus-per-task=8", "--mem=32G",
                 "--account=abc", "--qos=high", "--output=out.log"):
        assert f"#SBATCH {line}" in lines


def test_reproduce_help_explains_the_launchers(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    for phrase in ("--launcher", "--workers N", "CUDA_VISIBLE_DEVICES", "sbatch", "--status", "--run RUN_ID"):
        assert phrase in text


# ---------------------------------------------------------------------------- build-once lock
def _hold_and_record(path, record, hold):
    with BuildLock(path, heartbeat=0.05, stale_after=5.0, poll=0.01):
        with open(record, "a") as out:
            out.write(f"start {os.getpid()}\n")
        time.sleep(hold)
        with open(record, "a") as out:
            out.write(f"end {os.getpid()}\n")


def test_lock_admits_one_process_at_a_time(tmp_path):
    context = multiprocessing.get_context("fork")  # the lock needs no fresh interpreter; forking is quick
    record = tmp_path / "record.txt"
    workers = [context.Process(target=_hold_and_record, args=(tmp_path / "x.lock", record, 0.3)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    lines = record.read_text().split()
    events = list(zip(lines[::2], lines[1::2]))
    assert len(events) == 6
    for start, end in zip(events[::2], events[1::2]):  # never two holders: start/end pairs of one pid
        assert start[0] == "start" and end[0] == "end" and start[1] == end[1]
    assert not (tmp_path / "x.lock").exists()


def test_a_lock_left_by_a_dead_process_here_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "old"}))
    started = time.monotonic()
    with BuildLock(lock, heartbeat=1.0, stale_after=60.0, poll=0.01):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - started < 30


def test_a_silent_lock_of_another_host_is_taken_over_but_a_beating_one_is_not(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old"}))
    started = time.monotonic()
    with BuildLock(lock, heartbeat=0.05, stale_after=0.5, poll=0.01):
        waited = time.monotonic() - started
    assert waited >= 0.5

    holder = BuildLock(lock, heartbeat=0.05, stale_after=0.5, poll=0.01)
    holder.acquire()
    release = threading.Timer(1.5, holder.release)
    release.start()
    started = time.monotonic()
    with BuildLock(lock, heartbeat=0.05, stale_after=0.5, poll=0.01):
        waited = time.monotonic() - started
    release.join()
    assert waited >= 1.4  # the holder kept beating: nobody took its lock before it let go


def _cache_features(cache_dir, paths, counter):
    real = cache_module._compute

    def counted(*args, **kwargs):
        with open(counter, "a") as out:
            out.write("built\n")
        return real(*args, **kwargs)

    cache_module._compute = counted
    features, _, _ = cache_module.FeatureCache(cache_dir).features(paths, FbankConfig(max_frames=100), progress=False)
    np.save(f"{counter}.{os.getpid()}.npy", np.asarray(features))


def test_concurrent_processes_build_a_cache_entry_once(sweep_setup, tmp_path):
    _, roots, _, _ = sweep_setup
    paths = sorted(str(p) for p in __import__("pathlib").Path(roots["folder"]).rglob("*.wav"))[:12]
    counter = tmp_path / "built.txt"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_cache_features, args=(tmp_path / "cache", paths, counter)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert counter.read_text().count("built") == 1
    arrays = [np.load(p) for p in tmp_path.glob("built.txt.*.npy")]
    assert len(arrays) == 3 and all(np.array_equal(a, arrays[0]) for a in arrays)
    assert not list((tmp_path / "cache" / "features").glob("*.lock"))
