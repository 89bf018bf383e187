"""Fetching a dataset's official archive: resumable HTTP download (Range requests), size
and checksum verification, and extraction into the layout the dataset module reads.

Only a verified archive ever gets its final name: bytes arrive in `NAME.part`, which is
checked and then renamed; a failed check deletes it. Extraction happens in a staging
folder next to the destination and is moved into place in one rename.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where a dataset's archive lives and what it must look like.

    `folder` is the dataset folder created under the destination; `archive_root` is the
    folder inside the archive that becomes it ("" when the archive has no top folder).
    Checksums and size are only given where they are published; anything left None is
    simply not checked.
    """

    url: str
    folder: str
    archive_root: str = ""
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    @property
    def archive_name(self) -> str:
        return os.path.basename(urlparse(self.url).path)


class DownloadError(RuntimeError):
    """A transfer that failed for good or an archive that did not verify."""


def download_file(source: Source, dest: str | os.PathLike, retries: int = 3, progress: bool = True,
                  timeout: float = 60.0) -> Path:
    """Download `source.url` to `dest` (resuming `dest.part` if present) and verify it."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch(source.url, part, progress, timeout)
            break
        except urllib.error.HTTPError as error:
            raise DownloadError(f"cannot download {source.url}: HTTP {error.code} {error.reason}") from error
        except (OSError, http.client.HTTPException) as error:  # dropped connection, timeout, DNS...
            if attempt == retries:
                raise DownloadError(
                    f"cannot download {source.url} after {retries + 1} attempts ({error}); "
                    f"run again to resume from {part}"
                ) from error
    problem = _verify(part, source)
    if problem:
        part.unlink()
        raise DownloadError(f"downloaded {source.url} but {problem}; the file was deleted, try again")
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left past what we have: the .part is complete
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the Range header: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    received = part.stat().st_size
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


def _verify(path: Path, source: Source) -> str | None:
    """What is wrong with the downloaded file, or None."""
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        return f"its size is {size} bytes, expected {source.size}"
    for algorithm, expected in (("sha256", source.sha256), ("md5", source.md5)):
        if expected is not None:
            digest = hashlib.new(algorithm)
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != expected.lower():
                return f"its {algorithm} is {digest.hexdigest()}, expected {expected}"
    return None


def extract(archive: str | os.PathLike, dest: str | os.PathLike, source: Source) -> Path:
    """Unpack `archive` (zip or tar[.gz]) so that `dest/source.folder` holds the dataset."""
    archive, dest = Path(archive), Path(dest)
    target = dest / source.folder
    staging = Path(tempfile.mkdtemp(prefix=f".{source.folder}.", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(staging)  # zipfile drops absolute paths and ".." itself
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as bundle:
                bundle.extractall(staging, filter="data")  # refuses absolute paths, "..", devices
        else:
            raise DownloadError(f"{archive} is neither a zip nor a tar archive")
        content = staging / source.archive_root if source.archive_root else staging
        if not content.is_dir():
            found = sorted(p.name for p in staging.iterdir())
            raise DownloadError(f"{archive} has no top folder {source.archive_root!r} (found {found})")
        os.replace(content, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_dataset(name: str, to: str | os.PathLike, source: Source | None = None, progress: bool = True,
                     keep_archive: bool = False, retries: int = 3) -> Path:
    """Fetch, verify and unpack dataset `name` under `to`; returns the dataset folder.

    Steps already done (a verified archive, an extracted folder) are not repeated, and an
    interrupted transfer resumes. `source` overrides the dataset's official one.
    """
    from .registry import get_dataset  # the registry imports the dataset modules, which import Source

    dataset = get_dataset(name)
    source = source or dataset.download
    if source is None:
        raise ValueError(
            f"{name} cannot be downloaded automatically. {dataset.how_to_get}\nexpected layout:\n{dataset.layout}"
        )
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    root = to / source.folder
    if not root.exists():
        archive = to / source.archive_name
        if not archive.exists():
            download_file(source, archive, retries=retries, progress=progress)
        extract(archive, to, source)
        if not keep_archive:
            archive.unlink()
    dataset.scan(root)  # fails with the expected layout if the archive was not what we thought
    return root
