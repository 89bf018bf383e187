"""The feature cache: decode, resample and run a frontend over a list of files once per
(files, frontend settings), store the result as a memory-mapped float32 array, and reuse it.

Any :class:`~audiopetl.frontend.Frontend` works: AST's filterbanks, or the frozen
convolutional feature encoder of a speech backbone, so that epochs after the first skip it.
An entry is `<key>.f32` (raw rows of the frontend's `feature_shape`) plus `<key>.json`, its
manifest, under `<cache dir>/features/`. The key hashes every file's path, size and
mtime (ns) with the frontend settings, so a touched file or a changed setting gives a new
entry. For a frontend computed by a neural network (a speech encoder's conv feature
encoder) it also names the device type the network runs on (``cpu``/``cuda``: their
kernels differ in the last bits); filterbank keys stay as they were (training computes
filterbanks on the CPU). The data file is built under a temporary name, fsynced and
renamed; the manifest is written the same way and last, with a checksum of the data file.
Only an entry with a manifest is trusted, and only while its data file matches the
checksum (read once per process and data file, whether it matches or not), so a build that
dies halfway or a corrupted file leaves nothing a later run would use: the entry is
rebuilt. Concurrent processes, on one host or several sharing the
cache over NFS, build an entry once: the builder holds `<key>.lock`
(:class:`audiopetl.buildlock.BuildLock`, a heartbeat lock file, not flock). Temporaries of
killed builds on this host are removed at the next use (never a live process's); `cache
ls` shows the ones present; `cache clear` skips, naming them, entries whose build lock a
process holds and temporaries a live process of this host is writing.

Decoding runs in a pool of one process per usable core: the cores of this process's CPU
affinity, capped by ``$AUDIOPETL_CPUS`` when set (``--launcher local --workers N`` sets it
to each worker's share, so N workers do not each start a pool of every core).

Unusable files (undecodable, empty, NaN/Inf, silent) are recorded in the manifest, so a
rerun reports them, or skips them, without decoding anything again.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import Temporary, WriteError, atomic_path, find_temporaries, remove_stale_temporaries
from ..buildlock import BuildLock, LockHeld
from ..frontend import AudioError, FbankConfig, Frontend, as_frontend, channel_policy, load_audio
from ..integrity import file_checksum
from .base import DatasetIndex

CACHE_ENV = "AUDIOPETL_CACHE"
CPUS_ENV = "AUDIOPETL_CPUS"  # most cores one process uses (its decode pool); set by local sweep workers
FORMAT = 1  # bump when the stored layout or the meaning of a key changes
BATCH = 32  # clips per frontend call: enough to amortise, small enough for 2-core laptops
# Data files this process has checksummed, by (path, size, mtime ns, inode): a rebuilt file is a new inode.
_VERIFIED: set[tuple[str, int, int, int]] = set()  # matched their manifest
_CORRUPT: set[tuple[str, int, int, int]] = set()  # did not: rebuilt, never read again


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "audiopetl")


class BadAudioError(ValueError):
    """Audio files that cannot be used; `.bad` lists every (path, reason)."""

    def __init__(self, bad: Sequence[tuple[str, str]]):
        self.bad = list(bad)
        listing = "\n".join(f"  {path}: {reason}" for path, reason in self.bad)
        super().__init__(
            f"{len(self.bad)} audio file(s) cannot be used; fix or remove them, or skip them "
            f"(skip_bad_audio=True, `--skip-bad-audio`):\n{listing}"
        )


def write_bad_audio_report(path: str | os.PathLike, bad: Sequence[tuple[str, str]]) -> Path:
    """Write one `path<TAB>reason` line per skipped file, for keeping next to results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {len(bad)} audio file(s) skipped: path<TAB>reason"] + [f"{p}\t{reason}" for p, reason in bad]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class CacheEntry:
    """One cached feature set, as `audiopetl cache ls` shows it."""

    key: str
    path: Path
    size_bytes: int
    created: float  # Unix time
    source: str  # the folder the files share
    num_clips: int
    num_bad: int
    frontend: dict

    def __str__(self) -> str:
        date = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))
        return (
            f"{self.key[:16]}  {self.size_bytes / 2**20:9.1f} MiB  {date}  {self.num_clips} clips"
            f" ({self.num_bad} bad), {self.frontend['max_frames']} frames"
            f"{' (' + self.frontend['kind'] + ')' if 'kind' in self.frontend else ''}  {self.source}"
        )


class FeatureCache:
    """Frontend features of audio files, computed once and memory-mapped afterwards.

    Methods take a :class:`~audiopetl.frontend.Frontend` or, for filterbanks, its :class:`FbankConfig`.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.dir = self.root / "features"

    def key(self, paths: Sequence[str], config: Frontend | FbankConfig, device_type: str | None = None) -> str:
        """Content hash of the files' identities (path, size, mtime ns) and the settings.

        A frontend computed by a network (one with a ``device_type``) adds the device type it
        runs on, ``device_type`` if given (``"cpu"``/``"cuda"``), else its own.
        """
        files = []
        for path in paths:
            try:
                stat = os.stat(path)
                files.append([path, stat.st_size, stat.st_mtime_ns])
            except OSError:
                files.append([path, None, None])  # missing: reported as bad when built
        frontend = as_frontend(config)
        identity = {"format": FORMAT, "frontend": frontend.settings, "files": files}
        if hasattr(frontend, "device_type"):  # not filterbanks: their existing keys stay valid
            identity["device"] = device_type or frontend.device_type
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def features(
        self, paths: Sequence[str | os.PathLike], config: Frontend | FbankConfig, skip_bad_audio: bool = False,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        """(features (N_good, *feature_shape) float32, kept indices, bad (path, reason)).

        Raises `BadAudioError` listing every bad file unless `skip_bad_audio`.
        """
        paths = [os.path.abspath(p) for p in paths]
        config = as_frontend(config)
        key = self.key(paths, config)
        remove_stale_temporaries(self.dir)  # leftovers of builds killed earlier (never a live one's)
        manifest = self._verified_manifest(key)
        if manifest is None:
            # Concurrent runs (sweep workers, Slurm jobs, DDP ranks) build an entry once: the
            # first takes the lock, the others wait and then find the finished entry.
            try:
                with BuildLock(self.dir / f"{key}.lock", on_wait=_waiting(key)):
                    manifest = self._verified_manifest(key) or self._build(key, paths, config, progress)
            except TimeoutError:
                raise
            except OSError as error:  # a read-only or full cache folder
                raise WriteError(
                    f"cannot write the feature cache in {str(self.dir)!r}: {error}; pass --cache-dir (or set "
                    f"${CACHE_ENV}) to a writable folder with enough free space"
                ) from error
        bad = [(paths[i], reason) for i, reason in manifest["bad"]]
        if bad and not skip_bad_audio:
            raise BadAudioError(bad)
        bad_indices = {i for i, _ in manifest["bad"]}
        kept = [i for i in range(len(paths)) if i not in bad_indices]
        shape = (len(kept), *config.feature_shape)
        if not kept:  # numpy cannot memory-map an empty file
            return np.zeros(shape, dtype=np.float32), kept, bad
        return np.memmap(self.dir / f"{key}.f32", dtype=np.float32, mode="r", shape=shape), kept, bad

    def _trusted_manifest(self, key: str) -> dict | None:
        try:
            manifest = json.loads((self.dir / f"{key}.json").read_text())
            size = (self.dir / f"{key}.f32").stat().st_size
        except (OSError, ValueError):
            return None
        if manifest.get("format") != FORMAT or manifest.get("size_bytes") != size:
            return None
        return manifest

    def _verified_manifest(self, key: str) -> dict | None:
        """The entry's manifest if its data file still has the checksum recorded at build time;
        a corrupt entry is announced and left to be rebuilt."""
        manifest = self._trusted_manifest(key)
        if manifest is None:
            return None
        data = self.dir / f"{key}.f32"
        identity = _identity(data)
        if identity in _VERIFIED:
            return manifest
        if identity in _CORRUPT:  # found corrupt before the lock was taken: not read again
            return None
        if manifest.get("checksum") != file_checksum(data):
            print(f"audiopetl: cache entry {data} is corrupt (checksum mismatch); rebuilding it", file=sys.stderr)
            _CORRUPT.add(identity)
            return None
        _VERIFIED.add(identity)
        return manifest

    def _build(self, key: str, paths: list[str], config: Frontend, progress: bool) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        # An old manifest must not vouch for a data file that is about to be replaced.
        (self.dir / f"{key}.json").unlink(missing_ok=True)
        with atomic_path(self.dir / f"{key}.f32") as temp, open(temp, "wb") as out:
            bad = _compute(paths, config, out, progress)
        manifest = {
            "format": FORMAT,
            "key": key,
            "created": time.time(),
            "source": os.path.commonpath(paths) if paths else "",
            "num_clips": len(paths),
            "bad": bad,
            "frontend": config.settings,
            "size_bytes": (self.dir / f"{key}.f32").stat().st_size,
            "checksum": file_checksum(self.dir / f"{key}.f32"),
        }
        _VERIFIED.add(_identity(self.dir / f"{key}.f32"))  # just checksummed: a later use need not read it again
        with atomic_path(self.dir / f"{key}.json") as temp:
            temp.write_text(json.dumps(manifest, indent=1))
        return manifest


def _identity(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def _waiting(key: str):
    def report(owner: dict) -> None:
        # A lock seen between its creation and its first write names no owner yet.
        who = f"{owner['host']}:{owner.get('pid')}" if owner.get("host") else "another process"
        print(f"feature cache entry {key[:16]} is being built by {who}; waiting")

    return report


@torch.no_grad()
def _compute(
    paths: list[str], frontend: Frontend, out, progress: bool, workers: int | None = None
) -> list[tuple[int, str]]:
    """Write the features of every decodable file to `out`, in order; return the bad ones.

    Decoding and resampling (the slow part) run in `workers` processes (default: one per
    usable core (:func:`usable_cpus`), at least `FILES_PER_WORKER` files each); the frontend
    runs here, batched.
    """
    workers = _decode_workers(len(paths)) if workers is None else workers
    bad: list[tuple[int, str]] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        lengths = torch.tensor([len(w) for w in pending])
        waves = torch.nn.utils.rnn.pad_sequence(pending, batch_first=True)
        out.write(frontend(waves, lengths=lengths).cpu().numpy().astype(np.float32, copy=False).tobytes())
        pending.clear()

    decode = functools.partial(
        _decode, sample_rate=frontend.sample_rate, max_samples=frontend.max_samples,
        channels=channel_policy(frontend.settings),
    )
    with _ordered_map(decode, paths, workers) as results:
        for i, result in enumerate(tqdm(results, total=len(paths), desc="computing features", unit="clip",
                                        disable=not progress)):
            if isinstance(result, str):
                bad.append((i, result))
                continue
            pending.append(torch.from_numpy(result))
            if len(pending) == BATCH:
                flush()
    if pending:
        flush()
    return bad


FILES_PER_WORKER = 32  # below this a worker process costs more (start-up, imports) than it saves


def usable_cpus() -> int:
    """Cores this process may use: those of its CPU affinity, at most ``$AUDIOPETL_CPUS`` when set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = os.environ.get(CPUS_ENV, "").strip()
    if not share:
        return cores
    if not share.isdigit() or int(share) < 1:
        raise ValueError(f"${CPUS_ENV} must be a positive whole number of cores, got {share!r}")
    return min(cores, int(share))


def _decode_workers(num_files: int) -> int:
    return max(1, min(usable_cpus(), num_files // FILES_PER_WORKER))


def _decode(path: str, sample_rate: int, max_samples: int, channels: str) -> np.ndarray | str:
    """The waveform of `path` up to `max_samples` (later samples never reach a frame), or why it is unusable."""
    try:
        return load_audio(path, sample_rate=sample_rate, channels=channels)[:max_samples]
    except AudioError as error:
        return error.reason


@contextlib.contextmanager
def _ordered_map(function, items: list, workers: int):
    """`map(function, items)` in input order, over `workers` processes when more than one.

    At most a few results per worker wait in memory, so a slow consumer never holds a
    whole dataset of decoded audio; on error or interrupt, queued work is cancelled.
    """
    if workers <= 1:
        yield map(function, items)
        return
    # forkserver/spawn: forking a process that runs torch's thread pools is not safe.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))

    def results():
        queue: collections.deque = collections.deque()
        remaining = iter(items)
        for item in itertools.islice(remaining, 4 * workers):
            queue.append(pool.submit(function, item))
        while queue:
            result = queue.popleft().result()
            for item in itertools.islice(remaining, 1):
                queue.append(pool.submit(function, item))
            yield result

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def list_cache_entries(cache_dir: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Complete cache entries, oldest first."""
    cache = FeatureCache(cache_dir)
    entries = []
    for manifest_path in sorted(cache.dir.glob("*.json")) if cache.dir.is_dir() else []:
        manifest = cache._trusted_manifest(manifest_path.stem)
        if manifest is not None:
            entries.append(
                CacheEntry(
                    key=manifest["key"],
                    path=cache.dir / f"{manifest['key']}.f32",
                    size_bytes=manifest["size_bytes"],
                    created=manifest["created"],
                    source=manifest["source"],
                    num_clips=manifest["num_clips"],
                    num_bad=len(manifest["bad"]),
                    frontend=manifest["frontend"],
                )
            )
    return sorted(entries, key=lambda entry: entry.created)


def list_temporaries(cache_dir: str | os.PathLike | None = None) -> list[Temporary]:
    """Partly written files in the cache: builds under way, or leftovers of killed ones
    (``.stale``; removed by the next cache use on this host, or by `cache clear`)."""
    return find_temporaries(FeatureCache(cache_dir).dir)


def clear_cache(
    cache_dir: str | os.PathLike | None = None, key: str | None = None, on_skip: Callable[[str], None] = print
) -> int:
    """Delete every entry (and leftovers of interrupted builds), or the one whose key starts
    with `key`; returns how many entries were removed.

    Nothing is pulled from under a live process: an entry whose build lock another process
    holds, and a temporary a live process of this host is writing, are kept, each reported to
    `on_skip` in one line naming the path and its owner. (A lock of another host is always
    kept: whether its holder lives cannot be told at once; the next build takes it over once
    it stops beating.)"""
    cache = FeatureCache(cache_dir)
    if not cache.dir.is_dir():
        if key is not None:
            raise ValueError(f"no cache entry {key!r}: the cache at {cache.dir} is empty")
        return 0
    keys = sorted({path.name.split(".")[0] for path in cache.dir.iterdir()})
    if key is not None:
        matches = [k for k in keys if k.startswith(key)]
        if len(matches) != 1:
            found = "no" if not matches else "several"
            raise ValueError(f"{found} cache entries match {key!r}; entries: {[k[:16] for k in keys]}")
        keys = matches
    temporaries = {temporary.path: temporary for temporary in find_temporaries(cache.dir)}
    removed = 0
    for k in keys:
        # Held while deleting, so no build starts meanwhile; a dead process's lock here is taken over.
        lock = BuildLock(cache.dir / f"{k}.lock", timeout=0)
        try:
            lock.acquire()
        except LockHeld as held:
            on_skip(f"kept {lock.path}: its entry is being built by process {held.owner.get('pid', '?')} on "
                    f"{held.owner.get('host', '?')}")
            continue
        try:
            removed += (cache.dir / f"{k}.json").exists()
            # Manifest first: once it is gone no reader trusts the data file.
            for path in sorted(cache.dir.glob(f"{k}.*"), key=lambda p: p.suffix != ".json"):
                if path == lock.path:
                    continue  # ours now: release removes it
                temporary = temporaries.get(path)
                if temporary is not None and temporary.live_here:
                    on_skip(f"kept {path}: being written by process {temporary.pid} on {temporary.host}")
                    continue
                path.unlink(missing_ok=True)
        finally:
            lock.release()
    return removed


@dataclass
class IndexedFeatures:
    """The cached features of a dataset's clips, with the map from clip index to feature row.

    Clips skipped as bad audio have no row (``position`` -1); ``labels`` follow the rows.
    """

    features: np.ndarray
    labels: np.ndarray
    position: np.ndarray
    bad: list[tuple[str, str]]

    def rows(self, clip_indices: Sequence[int]) -> np.ndarray:
        """Feature rows of ``clip_indices``, in order, leaving out skipped clips."""
        rows = self.position[np.asarray(clip_indices, dtype=np.int64)]
        return rows[rows >= 0]


def index_features(
    index: DatasetIndex,
    config: Frontend | FbankConfig,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_audio: bool = False,
    progress: bool = True,
) -> IndexedFeatures:
    """Features of every clip of ``index`` through the cache: one entry per dataset and frontend
    setting, shared by training, evaluation and reports."""
    features, kept, bad = FeatureCache(cache_dir).features(
        [clip.path for clip in index.clips], config, skip_bad_audio=skip_bad_audio, progress=progress
    )
    position = np.full(len(index.clips), -1, dtype=np.int64)
    position[np.asarray(kept, dtype=np.int64)] = np.arange(len(kept))
    labels = np.asarray([index.clips[i].label for i in kept], dtype=np.int64)
    return IndexedFeatures(features, labels, position, bad)


class FeatureDataset(torch.utils.data.Dataset):
    """Rows `indices` of a feature array as (features tensor, label) pairs;
    `labels` is aligned with the array's rows."""

    def __init__(self, features: np.ndarray, labels: Sequence[int] | np.ndarray, indices: Sequence[int] | np.ndarray):
        if len(labels) != len(features):
            raise ValueError(f"{len(labels)} labels for {len(features)} feature rows")
        self.features = features
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        row = self.indices[item]
        return torch.from_numpy(np.array(self.features[row])), int(self.labels[row])
