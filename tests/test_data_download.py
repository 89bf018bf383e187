"""Dataset downloads against a local HTTP server with Range support: resume after an
interrupted transfer, checksum and size checks, and extraction into the expected layout."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from audio_fixtures import tone, write_audio
from audiopetl.data import DownloadError, Source, download_dataset, download_file, get_dataset
from audiopetl.data.gsc import WORDS


class ArchiveServer:
    """Serves `files` on 127.0.0.1; can drop the first `drops` transfers after `drop_at`
    bytes and can ignore Range headers. Records each request's Range header."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.drop_at = 0
        self.drops = 0
        self.honour_range = True
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                header = self.headers.get("Range")
                if header and server.honour_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops:
                    server.drops -= 1
                    self.wfile.write(body[: server.drop_at])
                    self.close_connection = True  # the promised length never arrives
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"


@pytest.fixture
def serve():
    servers = []

    def start(files: dict[str, bytes]) -> ArchiveServer:
        server = ArchiveServer({f"/{name}": data for name, data in files.items()})
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


def esc50_zip(tmp_path: Path) -> bytes:
    """A two-class ESC-50 miniature, zipped the way GitHub zips the repository."""
    staging = tmp_path / "esc-src"
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in enumerate(["dog", "rooster"]):
            name = f"{fold}-{100 + target}-A-{target}.wav"
            write_audio(staging / "audio" / name, tone(300 + 100 * target, 0.05, 44100), 44100)
            rows.append(f"{name},{fold},{target},{category},True,{100 + target},A")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ESC-50-master/meta/esc50.csv", "\n".join(rows) + "\n")
        bundle.writestr("ESC-50-master/README.md", "# ESC-50\n")
        for path in sorted((staging / "audio").iterdir()):
            bundle.write(path, f"ESC-50-master/audio/{path.name}")
    return buffer.getvalue()


def gsc_tar_gz(tmp_path: Path) -> bytes:
    """A flat Speech Commands archive (no top folder), one clip per word plus the lists."""
    staging = tmp_path / "gsc-src"
    for w, word in enumerate(WORDS):
        write_audio(staging / word / "0_nohash_0.wav", tone(300 + 10 * w, 0.05, 16000), 16000)
    (staging / "validation_list.txt").write_text("yes/0_nohash_0.wav\n")
    (staging / "testing_list.txt").write_text("no/0_nohash_0.wav\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        bundle.add(staging, arcname=".")
    return buffer.getvalue()


def test_zip_download_extracts_the_esc50_layout(tmp_path, serve):
    archive = esc50_zip(tmp_path)
    server = serve({"master.zip": archive})
    source = Source(server.url("master.zip"), folder="ESC-50-master", archive_root="ESC-50-master",
                    sha256=hashlib.sha256(archive).hexdigest(), size=len(archive))
    root = download_dataset("esc50", tmp_path / "data", source=source, progress=False)
    assert root == tmp_path / "data" / "ESC-50-master"
    assert (root / "meta" / "esc50.csv").is_file() and len(list((root / "audio").glob("*.wav"))) == 10
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ESC-50-master"]  # no archive, .part, staging
    index = get_dataset("esc50").scan(root)
    assert index.class_names == ["dog", "rooster"] and len(get_dataset("esc50").splits(index)) == 5
    # Already there: nothing is fetched again.
    download_dataset("esc50", tmp_path / "data", source=source, progress=False)
    assert len(server.ranges) == 1


def test_flat_tar_gz_goes_into_its_folder_with_md5(tmp_path, serve):
    archive = gsc_tar_gz(tmp_path)
    server = serve({"speech_commands_v0.02.tar.gz": archive})
    source = Source(server.url("speech_commands_v0.02.tar.gz"), folder="speech_commands_v0.02",
                    md5=hashlib.md5(archive).hexdigest())
    root = download_dataset("gsc", tmp_path / "data", source=source, progress=False, keep_archive=True)
    assert (tmp_path / "data" / "speech_commands_v0.02.tar.gz").read_bytes() == archive
    index = get_dataset("gsc").scan(root)
    assert index.class_names == list(WORDS)
    [split] = get_dataset("gsc").splits(index)
    assert (len(split.train), len(split.valid), len(split.test)) == (33, 1, 1)


def test_resume_after_the_connection_drops_midway(tmp_path, serve):
    archive = esc50_zip(tmp_path)
    server = serve({"master.zip": archive})
    server.drop_at, server.drops = len(archive) // 3, 1
    source = Source(server.url("master.zip"), folder="ESC-50-master", sha256=hashlib.sha256(archive).hexdigest())
    dest = download_file(source, tmp_path / "master.zip", progress=False)
    assert dest.read_bytes() == archive and not (tmp_path / "master.zip.part").exists()
    assert server.ranges == [None, f"bytes={len(archive) // 3}-"]


def test_resume_from_a_partial_file_left_by_an_earlier_run(tmp_path, serve):
    archive = esc50_zip(tmp_path)
    server = serve({"master.zip": archive})
    server.drop_at, server.drops = 1000, 5  # fails for good: every attempt gets 1000 more bytes
    source = Source(server.url("master.zip"), folder="ESC-50-master", size=len(archive))
    with pytest.raises(DownloadError, match="after 3 attempts.*run again to resume"):
        download_file(source, tmp_path / "master.zip", retries=2, progress=False)
    part = tmp_path / "master.zip.part"
    assert part.read_bytes() == archive[:3000] and not (tmp_path / "master.zip").exists()

    server.drops = 0  # the next run continues where the last stopped
    download_file(source, tmp_path / "master.zip", progress=False)
    assert (tmp_path / "master.zip").read_bytes() == archive
    assert server.ranges[-1] == "bytes=3000-"


def test_server_ignoring_range_restarts_the_file(tmp_path, serve):
    archive = esc50_zip(tmp_path)
    server = serve({"master.zip": archive})
    server.honour_range = False
    (tmp_path / "master.zip.part").write_bytes(b"stale bytes from elsewhere")
    source = Source(server.url("master.zip"), folder="ESC-50-master", sha256=hashlib.sha256(archive).hexdigest())
    assert download_file(source, tmp_path / "master.zip", progress=False).read_bytes() == archive


@pytest.mark.parametrize("check", ["sha256", "md5", "size"])
def test_checksum_or_size_mismatch_is_rejected_and_deleted(tmp_path, serve, check):
    archive = esc50_zip(tmp_path)
    server = serve({"master.zip": archive})
    wrong = {"sha256": {"sha256": "0" * 64}, "md5": {"md5": "0" * 32}, "size": {"size": len(archive) + 1}}[check]
    source = Source(server.url("master.zip"), folder="ESC-50-master", archive_root="ESC-50-master", **wrong)
    with pytest.raises(DownloadError, match=f"its {check} is"):
        download_dataset("esc50", tmp_path / "data", source=source, progress=False)
    assert list((tmp_path / "data").iterdir()) == []  # no final archive, no .part, no dataset folder


def test_http_errors_and_datasets_without_a_download(tmp_path, serve):
    server = serve({})
    source = Source(server.url("missing.zip"), folder="x")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(source, tmp_path / "missing.zip", progress=False)
    assert server.ranges == [None]  # a 404 is not retried
    with pytest.raises(ValueError, match="(?s)licence.*https://fluent.ai/.*data/train_data.csv"):
        download_dataset("fsc", tmp_path / "fsc")
    with pytest.raises(ValueError, match="folder cannot be downloaded"):
        download_dataset("folder", tmp_path / "own")


def test_archive_without_the_expected_top_folder_fails_cleanly(tmp_path, serve):
    archive = gsc_tar_gz(tmp_path)
    server = serve({"a.tar.gz": archive})
    source = Source(server.url("a.tar.gz"), folder="UrbanSound8K", archive_root="UrbanSound8K")
    with pytest.raises(DownloadError, match="no top folder 'UrbanSound8K'"):
        download_dataset("us8k", tmp_path / "data", source=source, progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a.tar.gz"]  # verified archive kept


def test_official_sources_use_only_published_checksums():
    sources = {name: get_dataset(name).download for name in ("esc50", "us8k", "gsc", "fsc")}
    assert sources["fsc"] is None
    assert sources["esc50"].url == "https://github.com/karoldvl/ESC-50/archive/master.zip"
    assert (sources["esc50"].sha256, sources["esc50"].md5, sources["esc50"].size) == (None, None, None)
    assert sources["us8k"].md5 == "9aa69802bbf37fb986f71ec1483a196e"
    assert sources["gsc"].url == "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
