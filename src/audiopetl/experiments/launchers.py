"""Where the runs of a sweep execute: here, in N local worker processes, or as Slurm jobs.

Every launcher runs the same unit of work, :func:`run_job`: it reads ``job.yaml`` (the
run's full training options, written by the sweep), records ``state.json`` (running, with
host, pid and Slurm job id; or failed, with the error and the log path) and trains with
``resume=True``, so a run that was killed continues from its last checkpoint the next time
the sweep is started. A run is *done* when its ``metrics.json`` exists.

- :class:`LocalLauncher` (``--launcher local``): one run after another in this process, or
  with ``workers > 1`` that many concurrent worker processes (``python -m
  audiopetl.experiments.launchers RUN_DIR``), one visible GPU each via
  ``CUDA_VISIBLE_DEVICES`` (round robin when there are more workers than GPUs), or on a
  CPU-only machine the cores split between them (``OMP_NUM_THREADS``). Either way each
  worker's feature cache decodes with at most its share of the cores (``AUDIOPETL_CPUS``).
  Each worker's output goes to ``run.log``.
- :class:`SlurmLauncher` (``--launcher slurm``): one ``sbatch`` job per run (plain
  ``sbatch``, no extra Python dependency), its script ``job.sbatch`` and output
  ``slurm-JOBID.log`` in the run directory; partition, time, GPUs, CPUs, memory and extra
  ``#SBATCH`` lines come from :class:`SlurmOptions` (CLI options or the recipe's ``slurm:``
  block). With ``wait`` it polls ``squeue`` until its jobs have left the queue.

:func:`run_state` tells done / running / failed / pending for one run directory.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ..atomic import atomic_path, process_alive
from ..data.cache import CPUS_ENV, usable_cpus
from ..dataclass_dict import from_dict
from ..train import TrainConfig, is_finished, run_training
from ..train.run import _plain

JOB = "job.yaml"
STATE = "state.json"
WORKER_LOG = "run.log"
SBATCH_SCRIPT = "job.sbatch"
ERROR_LOG = "error.log"  # traceback of a run that failed inside the sweep's own process
IN_PROCESS = "(console)"
STATES = ("done", "running", "failed", "pending")


# ---------------------------------------------------------------------------- one run
def write_job(run_dir: Path, options: dict) -> None:
    """The run's full training options, for a worker process or a Slurm job to read."""
    with atomic_path(run_dir / JOB) as temp:
        temp.write_text(yaml.safe_dump(_plain(options), sort_keys=False))


def run_job(run_dir: str | Path, train: Callable = run_training) -> bool:
    """Train the run in ``run_dir`` (resuming); True when it finished, False when it failed.

    A failure is recorded in ``state.json`` with the error and where the full log is.
    """
    run_dir = Path(run_dir)
    config = TrainConfig.from_dict(yaml.safe_load((run_dir / JOB).read_text()))
    log = _log_path(run_dir)
    _write_state(run_dir, {"state": "running", **_where(), "log": log})
    try:
        train(config, run_dir, resume=True)
    except Exception as error:  # noqa: BLE001 - recorded, reported by the sweep, retriable
        traceback.print_exc()
        if log == IN_PROCESS:  # the console scrolls away: keep the traceback with the run
            log = str(run_dir / ERROR_LOG)
            Path(log).write_text(traceback.format_exc())
        _write_state(run_dir, {"state": "failed", **_where(), "error": f"{type(error).__name__}: {error}", "log": log})
        return False
    (run_dir / STATE).unlink(missing_ok=True)
    return True


def run_state(run_dir: str | Path) -> tuple[str, dict]:
    """(``done``/``running``/``failed``/``pending``, details such as the log path or job id).

    A run recorded as running whose process or Slurm job no longer exists was interrupted:
    it is *pending* (``interrupted: True``) and resumes on the next start of the sweep.
    """
    run_dir = Path(run_dir)
    if is_finished(run_dir):
        return "done", {}
    try:
        state = json.loads((run_dir / STATE).read_text())
    except (OSError, ValueError):
        return "pending", {}
    if state.get("state") == "failed":
        return "failed", state
    if _alive(state):
        return "running", state
    return "pending", {**state, "interrupted": True}


def _where() -> dict:
    where = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    if os.environ.get("SLURM_JOB_ID"):
        where["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return where


def _log_path(run_dir: Path) -> str:
    if os.environ.get("SLURM_JOB_ID"):
        return str(run_dir / f"slurm-{os.environ['SLURM_JOB_ID']}.log")
    if os.environ.get("AUDIOPETL_WORKER_LOG"):
        return os.environ["AUDIOPETL_WORKER_LOG"]
    return IN_PROCESS


def _write_state(run_dir: Path, state: dict) -> None:
    with atomic_path(run_dir / STATE) as temp:
        temp.write_text(json.dumps(state, indent=1))


def _alive(state: dict) -> bool:
    job = state.get("slurm_job_id")
    if job:
        return job in _slurm_jobs_in_queue([job])
    if state.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, trust it
    try:
        return process_alive(int(state.get("pid", -1)))
    except ValueError:
        return False


# ---------------------------------------------------------------------------- launchers
@dataclass
class LocalLauncher:
    """Runs one at a time in this process (``workers=1``) or in ``workers`` processes."""

    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")

    def describe(self) -> str:
        return "local" if self.workers == 1 else f"local, {self.workers} workers ({', '.join(self._slots())})"

    def launch(self, run_dirs: list[Path], on_finish: Callable[[Path], None], train: Callable = run_training) -> None:
        if self.workers == 1:
            for run_dir in run_dirs:
                run_job(run_dir, train)
                on_finish(run_dir)
            return
        slots = self._slots()
        free = list(range(self.workers))
        lock = threading.Lock()

        def work(run_dir: Path) -> None:
            with lock:
                worker = free.pop()
            try:
                self._run_worker(run_dir, slots[worker])
            finally:
                with lock:
                    free.append(worker)
            on_finish(run_dir)

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(work, run_dirs))

    def _slots(self) -> list[str]:
        """Per worker: the GPU it sees (``cuda:N``) or its share of the CPU (``cpu``)."""
        gpus = visible_gpus()
        if gpus:
            return [f"cuda:{gpus[i % len(gpus)]}" for i in range(self.workers)]
        return ["cpu"] * self.workers

    def _worker_env(self, slot: str, log: Path) -> dict[str, str]:
        """The environment of a worker process: its GPU, or its share of this process's cores."""
        share = str(max(1, usable_cpus() // self.workers))
        env = {**os.environ, "AUDIOPETL_WORKER_LOG": str(log), CPUS_ENV: share}  # its decode pool's size
        if slot.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = slot.split(":", 1)[1]
        else:
            env["OMP_NUM_THREADS"] = share
        return env

    def _run_worker(self, run_dir: Path, slot: str) -> None:
        log = run_dir / WORKER_LOG
        with open(log, "w") as out:
            result = subprocess.run(
                [sys.executable, "-m", "audiopetl.experiments.launchers", str(run_dir)],
                stdout=out, stderr=subprocess.STDOUT, env=self._worker_env(slot, log), check=False,
            )
        if result.returncode != 0 and run_state(run_dir)[0] != "failed":  # killed or crashed before recording it
            _write_state(run_dir, {"state": "failed", "error": f"worker exited with status {result.returncode}",
                                   "log": str(log), "time": time.time()})


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` if set, else all CUDA devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class SlurmOptions:
    """Resources of each run's job; ``None`` leaves the cluster's default."""

    partition: str | None = None
    time: str | None = None  # Slurm time limit, e.g. "04:00:00"
    gpus: int | None = None
    cpus: int | None = None  # --cpus-per-task
    mem: str | None = None  # e.g. "32G"
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. "--account=abc" or "--qos=high"

    @classmethod
    def from_dict(cls, values: dict) -> "SlurmOptions":
        return from_dict(cls, values, what="slurm options")

    def directives(self, name: str, log: str) -> list[str]:
        lines = [f"--job-name={name}", f"--output={log}", "--open-mode=append"]
        for flag, value in (("partition", self.partition), ("time", self.time), ("gpus", self.gpus),
                            ("cpus-per-task", self.cpus), ("mem", self.mem)):
            if value is not None:
                lines.append(f"--{flag}={value}")
        lines += [line.removeprefix("#SBATCH").strip() for line in self.extra]
        return [f"#SBATCH {line}" for line in lines]


@dataclass
class SlurmLauncher:
    """One ``sbatch`` job per run; ``wait`` polls ``squeue`` until they have all left it."""

    options: SlurmOptions = field(default_factory=SlurmOptions)
    wait: bool = False
    poll: float = 10.0

    def describe(self) -> str:
        return "slurm" + (", waiting" if self.wait else "")

    def launch(self, run_dirs: list[Path], on_finish: Callable[[Path], None], train: Callable = run_training) -> None:
        jobs = {self.submit(run_dir): run_dir for run_dir in run_dirs}
        if not self.wait:
            print(f"submitted {len(jobs)} job(s); follow them with `reproduce ... --status` or squeue")
            return
        pending = dict(jobs)
        while pending:
            time.sleep(self.poll)
            queued = _slurm_jobs_in_queue(list(pending))
            for job in [j for j in pending if j not in queued]:
                on_finish(pending.pop(job))

    def submit(self, run_dir: Path) -> str:
        run_dir = run_dir.resolve()
        name = "audiopetl-" + "-".join(run_dir.parts[-3:])
        command = " ".join(shlex.quote(part) for part in (sys.executable, "-m", "audiopetl.experiments.launchers"))
        script = "\n".join([
            "#!/bin/bash",
            *self.options.directives(name, str(run_dir / "slurm-%j.log")),
            "# Written by audiopetl reproduce: trains (or resumes) this run; see state.json.",
            f"exec {command} {shlex.quote(str(run_dir))}",
            "",
        ])
        (run_dir / SBATCH_SCRIPT).write_text(script)
        try:
            result = subprocess.run(["sbatch", "--parsable", str(run_dir / SBATCH_SCRIPT)],
                                    capture_output=True, text=True, check=False)
        except FileNotFoundError as error:
            raise RuntimeError("--launcher slurm: `sbatch` not found; run on a Slurm login node") from error
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {run_dir / SBATCH_SCRIPT} failed: {result.stderr.strip()}")
        job = result.stdout.strip().split(";")[0]
        # Recorded before the job starts, so --status sees it queued and no second sweep submits it again.
        _write_state(run_dir, {"state": "queued", "slurm_job_id": job, "time": time.time(),
                               "log": str(run_dir / f"slurm-{job}.log")})
        return job


# Job states after which a job will not run again (squeue -t all lists them for a while).
_FINISHED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
             "PREEMPTED", "SPECIAL_EXIT", "TIMEOUT"}


def _slurm_jobs_in_queue(jobs: list[str]) -> set[str]:
    """Which of ``jobs`` are still queued or running (squeue no longer lists a forgotten job)."""
    try:
        result = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"],
                                capture_output=True, text=True, check=False, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return set(jobs)  # cannot ask: assume they are still there rather than resubmit them
    if result.returncode != 0:
        return set(jobs)
    live = {parts[0] for parts in map(str.split, result.stdout.splitlines()) if len(parts) == 2
            and parts[1] not in _FINISHED}
    return live & set(jobs)


def make_launcher(name: str, workers: int = 1, slurm: dict | None = None, wait: bool = False):
    if name == "local":
        return LocalLauncher(workers=workers)
    if name == "slurm":
        if workers != 1:
            raise ValueError("--workers applies to --launcher local; Slurm runs every job on its own")
        return SlurmLauncher(SlurmOptions.from_dict(slurm or {}), wait=wait)
    raise ValueError(f"unknown launcher {name!r}; choose one of ['local', 'slurm']")


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m audiopetl.experiments.launchers RUN_DIR``."""
    (run_dir,) = argv if argv is not None else sys.argv[1:]
    return 0 if run_job(run_dir) else 1


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["LocalLauncher", "SlurmLauncher", "SlurmOptions", "STATES", "make_launcher", "run_job", "run_state",
           "visible_gpus", "write_job"]
