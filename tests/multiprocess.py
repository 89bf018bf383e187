"""Multi-process runs for the tests, each bounded in time: a rank waiting forever for another
(the failure data-parallel bugs cause) fails its test after ``timeout`` seconds instead of
hanging the suite, and every process it started is killed.

Each run gets its own process session, so killing the session reaches the ranks that
``--nproc``, torchrun or :func:`audiopetl.train.distributed.spawn` started too.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIMEOUT = 300  # seconds; the 2-rank runs of the tests take well under a minute on 2 cores

_SPAWN = "import pickle, sys; from audiopetl.train import distributed; f, n, a = pickle.load(sys.stdin.buffer); " \
         "distributed.spawn(f, n, *a)"


def environment(**extra: str) -> dict[str, str]:
    """This interpreter's path (the source tree and the tests' helpers) and one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), *sys.path]), **extra}


def run_bounded(argv: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT,
                stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """``argv``'s exit status and output (text); fails the test when it runs past ``timeout``."""
    process = subprocess.Popen(argv, env=env or environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{argv[:6]}... did not finish in {timeout} s (a rank waiting for another?); its stderr:\n"
                    f"{err.decode(errors='replace')[-3000:]}")
    finally:
        _kill_session(process.pid)  # ranks left behind by a launcher that exited
    return subprocess.CompletedProcess(argv, process.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def spawn_bounded(function, nproc: int, *args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``distributed.spawn(function, nproc, *args)`` in a new interpreter (``function`` importable by
    name, ``args`` picklable), bounded by ``timeout``."""
    return run_bounded([sys.executable, "-c", _SPAWN], timeout=timeout,
                       stdin=pickle.dumps((function, nproc, args)))


def run_ranks(argv: list[str], nproc: int, port: int, timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """``argv`` started ``nproc`` times as ranks 0..nproc-1 of one group (the environment torchrun
    sets, without its agent, which stops the other ranks when one fails): each rank's own exit
    status and output."""
    processes = [
        subprocess.Popen(argv, env=environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                                               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                                               MASTER_PORT=str(port)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in range(nproc)
    ]
    results, late = [], []
    deadline = time.monotonic() + timeout  # the ranks run together: one budget for all
    try:
        for rank, process in enumerate(processes):
            try:
                out, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(rank)
                process.kill()
                out, err = process.communicate()
            results.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    finally:
        for process in processes:
            _kill_session(process.pid)
    if late:
        pytest.fail(f"ranks {late} did not finish in {timeout} s (waiting for another rank?); their stderr:\n"
                    + "\n".join(results[r].stderr[-2000:] for r in late))
    return results


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
