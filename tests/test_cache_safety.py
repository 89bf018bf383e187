"""The feature cache next to live and killed processes: `cache clear` keeps what a live process
holds and clears what another host's stale lock held, a heartbeat temporary of a killed lock
holder (this version's or an earlier one's) is swept, a corrupt entry is read once,
the key names where a network frontend ran, and local sweep workers decode with their share
of the cores."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audio_fixtures import speech_like, write_audio
from audiopetl.atomic import _HOST
from audiopetl.backbone import load_backbone
from audiopetl.buildlock import STALE_AFTER
from audiopetl.cli.main import main
from audiopetl.data import FeatureCache
from audiopetl.data import cache as cache_module
from audiopetl.experiments.launchers import LocalLauncher
from audiopetl.frontend import Fbank, FbankConfig

CONFIG = FbankConfig(max_frames=20)
SRC = Path(__file__).parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}

HOLD = """
import sys, time
from audiopetl.buildlock import BuildLock
BuildLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""

# Holds the lock and stops in its first heartbeat, after writing the heartbeat's temporary and
# before renaming it over the lock: where a kill -9 mid-beat leaves that temporary behind.
STUCK_IN_HEARTBEAT = """
import os, sys, time
from audiopetl.buildlock import BuildLock
replace = os.replace
def stuck(source, target):
    if os.fspath(target) == sys.argv[1]:
        print("beating", flush=True)
        time.sleep(120)
    replace(source, target)
os.replace = stuck
BuildLock(sys.argv[1], heartbeat=0.05, stale_after=60.0).acquire()
time.sleep(120)
"""


@pytest.fixture
def clips(tmp_path) -> list[str]:
    return [str(write_audio(tmp_path / "audio" / f"clip{i}.wav", speech_like(0.2, 16000, seed=i), 16000))
            for i in range(3)]


def _start(program: str, *args: str, expect: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", program, *args], stdout=subprocess.PIPE, text=True, env=ENV)
    assert child.stdout.readline().strip() == expect
    return child


def _kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    child.stdout.close()


def two_entries(cache_dir: Path, clips) -> tuple[Path, str, str]:
    """A cache with two built entries (all clips, the first two): its folder and their keys."""
    cache = FeatureCache(cache_dir)
    cache.features(clips, CONFIG, progress=False)
    cache.features(clips[:2], CONFIG, progress=False)
    return cache_dir / "features", cache.key(clips, CONFIG), cache.key(clips[:2], CONFIG)


def test_clear_keeps_an_entry_a_live_process_builds_and_its_temporaries(tmp_path, clips, capsys):
    cache_dir = tmp_path / "cache"
    folder, held, other = two_entries(cache_dir, clips)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    child = _start(HOLD, str(folder / f"{held}.lock"), expect="held")
    try:
        live_temp = folder / f"{other}.f32.{_HOST}.{child.pid}.0123abcd.tmp"
        dead_temp = folder / f"{other}.f32.{_HOST}.{dead_pid}.89abcdef.tmp"
        for temp in (live_temp, dead_temp):
            temp.write_bytes(b"half")
        # A lock left by a dead process of this host does not keep its entry.
        (folder / f"{other}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid}))

        assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
        out = capsys.readouterr().out.splitlines()
        kept = sorted(line for line in out if line.startswith("kept "))  # "kept <path>: ...", by path
        assert len(kept) == 2
        lock_line, temp_line = kept if held < other else kept[::-1]
        assert lock_line.startswith(f"kept {folder / held}.lock: ")
        assert f"process {child.pid} on {socket.gethostname()}" in lock_line
        assert temp_line.startswith(f"kept {live_temp}: ") and f"process {child.pid} on {_HOST}" in temp_line
        assert out[-1] == "removed 1 cache entry"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{held}.f32", f"{held}.json", f"{held}.lock", live_temp.name])
    finally:
        _kill(child)
    # Their owner gone, the next clear removes everything (taking over the dead lock).
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.strip() == "removed 1 cache entry"
    assert list(folder.iterdir()) == []


def test_the_heartbeat_temporary_of_a_killed_lock_holder_is_shown_and_swept(tmp_path, clips, capsys):
    cache_dir = tmp_path / "cache"
    folder = cache_dir / "features"
    key = FeatureCache(cache_dir).key([os.path.abspath(p) for p in clips], CONFIG)
    lock = folder / f"{key}.lock"
    folder.mkdir(parents=True)
    child = _start(STUCK_IN_HEARTBEAT, str(lock), expect="beating")
    _kill(child)
    leftovers = [p for p in folder.iterdir() if p != lock]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(lock.name)  # the heartbeat's temporary

    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0
    listing = capsys.readouterr().out
    assert leftovers[0].name in listing and "stale" in listing
    FeatureCache(cache_dir).features(clips, CONFIG, progress=False)  # the next start sweeps it
    assert sorted(p.name for p in folder.iterdir()) == [f"{key}.f32", f"{key}.json"]


def test_heartbeat_files_of_earlier_versions_locks_are_listed_and_swept_once_stale(tmp_path, clips, capsys):
    cache_dir = tmp_path / "cache"
    folder = cache_dir / "features"
    folder.mkdir(parents=True)
    key = FeatureCache(cache_dir).key([os.path.abspath(p) for p in clips], CONFIG)
    # Earlier versions wrote `<lock>.beat-<token>`: no host or pid to judge it by, only its age.
    old = folder / f"{key}.lock.beat-{'a' * 32}"
    young = folder / f"{'0' * 64}.lock.beat-{'b' * 32}"  # another entry's, a live holder's moment ago
    for beat in (old, young):
        beat.write_text(json.dumps({"host": "node7", "pid": 4242, "token": "t", "time": 0}))
    long_ago = time.time() - 2 * STALE_AFTER
    os.utime(old, (long_ago, long_ago))

    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0
    listing = {line.split()[3]: line for line in capsys.readouterr().out.splitlines() if line.startswith("temporary")}
    assert "(stale: " in listing[old.name] and "stale" not in listing[young.name]
    FeatureCache(cache_dir).features(clips, CONFIG, progress=False)  # the next start sweeps the stale one
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{key}.f32", f"{key}.json", young.name])


def test_clear_takes_over_another_hosts_lock_once_stale_and_keeps_a_fresh_one(tmp_path, clips, capsys):
    cache_dir = tmp_path / "cache"
    folder, stale, fresh = two_entries(cache_dir, clips)
    for key in (stale, fresh):  # locks of builders on another node, whose pids cannot be asked
        (folder / f"{key}.lock").write_text(json.dumps({"host": "node7", "pid": 4242, "token": key, "time": 0}))
    long_ago = time.time() - 2 * STALE_AFTER  # no heartbeat for twice the stale-after period
    os.utime(folder / f"{stale}.lock", (long_ago, long_ago))

    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"kept {folder / fresh}.lock: its entry is being built by process 4242 on node7",
                   "removed 1 cache entry"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{fresh}.f32", f"{fresh}.json", f"{fresh}.lock"])


def test_a_corrupt_entry_is_checksummed_once(tmp_path, clips, monkeypatch, capsys):
    cache = FeatureCache(tmp_path / "cache")
    cache.features(clips, CONFIG, progress=False)
    data = next((tmp_path / "cache" / "features").glob("*.f32"))
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x40
    data.write_bytes(bytes(raw))  # same inode, new bytes
    corrupt = data.stat().st_ino
    monkeypatch.setattr(cache_module, "_VERIFIED", set())  # as a new process would start
    monkeypatch.setattr(cache_module, "_CORRUPT", set())
    read: list[int] = []  # inode of every data file checksummed
    real_checksum = cache_module.file_checksum

    def counting_checksum(path):
        read.append(os.stat(path).st_ino)
        return real_checksum(path)

    monkeypatch.setattr(cache_module, "file_checksum", counting_checksum)
    cache.features(clips, CONFIG, progress=False)
    cache.features(clips, CONFIG, progress=False)
    rebuilt = data.stat().st_ino
    # Once to find it corrupt (not again under the build lock), once to record the rebuilt file's
    # checksum in its manifest (not again at the next use).
    assert read == [corrupt, rebuilt] and rebuilt != corrupt
    assert capsys.readouterr().err.count("checksum mismatch") == 1


def test_the_key_names_the_device_of_a_network_frontend_only(tmp_path, clips):
    cache = FeatureCache(tmp_path / "cache")
    speech = load_backbone("tiny-random-hubert").frontend(20)
    assert speech.device_type == "cpu" and "device" not in speech.settings  # adapter files stay device-free
    assert cache.key(clips, speech) == cache.key(clips, speech, device_type="cpu")
    assert cache.key(clips, speech, device_type="cuda") != cache.key(clips, speech, device_type="cpu")

    # The filterbank's key is what it was before devices were keyed, so existing entries stay valid.
    files = [[path, os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in clips]
    before = json.dumps({"format": cache_module.FORMAT, "frontend": Fbank(CONFIG).settings, "files": files},
                        sort_keys=True)
    expected = hashlib.sha256(before.encode()).hexdigest()
    assert cache.key(clips, CONFIG) == cache.key(clips, CONFIG, device_type="cuda") == expected


PROBE = "from audiopetl.data.cache import _decode_workers; print(_decode_workers(10**6))"


def test_a_local_worker_decodes_with_its_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv(cache_module.CPUS_ENV, raising=False)
    cores = cache_module.usable_cpus()
    launcher = LocalLauncher(workers=cores)  # one core each
    for slot in ("cpu", "cuda:0"):
        env = launcher._worker_env(slot, tmp_path / "run.log")
        assert env[cache_module.CPUS_ENV] == "1"
        worker = subprocess.run([sys.executable, "-c", PROBE], env={**env, "PYTHONPATH": str(SRC)},
                                capture_output=True, text=True, check=True, timeout=120)
        assert worker.stdout.strip() == "1"
    assert launcher._worker_env("cpu", tmp_path / "run.log")["OMP_NUM_THREADS"] == "1"
    # Unshared, the pool takes every core of the process's affinity.
    assert cache_module._decode_workers(10**6) == cores == len(os.sched_getaffinity(0))


def test_usable_cpus_follows_the_affinity_and_the_share(monkeypatch):
    monkeypatch.setenv(cache_module.CPUS_ENV, "100000")
    assert cache_module.usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(cache_module.CPUS_ENV, "1")
    assert cache_module.usable_cpus() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(cache_module.CPUS_ENV, bad)
        with pytest.raises(ValueError, match="AUDIOPETL_CPUS"):
            cache_module.usable_cpus()
    pinned = (f"import os; os.sched_setaffinity(0, {{{min(os.sched_getaffinity(0))}}}); "
              "from audiopetl.data.cache import usable_cpus; print(usable_cpus())")
    worker = subprocess.run([sys.executable, "-c", pinned], env={k: v for k, v in ENV.items()
                            if k != cache_module.CPUS_ENV}, capture_output=True, text=True, check=True, timeout=120)
    assert worker.stdout.strip() == "1"
