"""A real one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd.

Everything lives in a temporary folder (config, state, spool, logs, a private munge socket
and a copy of the munge key), on free ports, with plugins that need neither systemd nor
cgroups (proctrack/linuxproc, task/none, no accounting). The programs come from Debian's
``slurm-wlm`` and ``munge`` packages, installed by ``.ci/system-packages``. If they are missing the
cluster does not start and the test fails: it never skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(root: Path, cpus: int) -> str:
    return f"""ClusterName=audiopetltest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def slurm_cluster(root: Path, cpus: int = 2, start_timeout: float = 60.0):
    """Start the cluster under ``root``; yields the environment (``SLURM_CONF``) clients need."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing or not MUNGE_KEY.exists():
        raise RuntimeError(
            f"Slurm is not installed (missing {missing or [str(MUNGE_KEY)]}): run .ci/system-packages (apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        raise RuntimeError("the test Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    root = Path(root)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    shutil.copyfile(MUNGE_KEY, key)
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, cpus))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    sock = root / "munge" / "munge.sock"
    started = []
    try:
        subprocess.run(
            ["munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
             f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed"],
            check=True, timeout=30,
        )
        started.append("munged")
        subprocess.run(["slurmctld", "-i", "-c"], env=env, check=True, timeout=30)
        started.append("slurmctld")
        subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True, timeout=30)
        started.append("slurmd")
        deadline = time.monotonic() + start_timeout
        while True:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            if state.stdout.strip() in ("idle", "mixed", "allocated"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm node not ready after {start_timeout} s: {state.stdout!r} {state.stderr!r}"
                                   f"\n{_tail(root / 'slurmctld.log')}\n{_tail(root / 'slurmd.log')}")
            time.sleep(0.5)
        yield env
    finally:
        if "slurmctld" in started:
            subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True, timeout=30)
            subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for pid_file in (root / "slurmd.pid", root / "slurmctld.pid"):
            _wait_gone(pid_file)
        if "munged" in started:
            subprocess.run(["munged", "--stop", f"--socket={sock}"], capture_output=True, timeout=30)


def _wait_gone(pid_file: Path, timeout: float = 20.0) -> None:
    """Wait for the daemon of ``pid_file`` to exit; SIGKILL it if it does not."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"
