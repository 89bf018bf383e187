"""Faults a real run meets: `kill -9` at random moments (every resume must end bit-identical
to an uninterrupted run) and a corpus of broken and odd-but-valid audio files (every
broken one reported by path by `train`, `eval` and `predict`; every valid one loads)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audio_corpus import write_corpus
from audio_fixtures import speech_like, tone, write_audio
from audiopetl.cli.main import main
from audiopetl.experiments.synthetic import make_synthetic_dataset
from audiopetl.frontend import load_audio

SRC = Path(__file__).parents[1] / "src"
LOSSES = ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "lr")


def _train(data: Path, run_dir: Path, cache: Path, resume: bool) -> subprocess.Popen:
    if resume:
        argv = ["train", "--resume", "--run-dir", str(run_dir), "--no-progress"]
    else:
        argv = [
            "train", "--dataset", "folder", "--data-root", str(data), "--backbone", "tiny-random", "--method", "lora",
            "--reduction-rate", "16", "--epochs", "4", "--batch-size", "8", "--max-frames", "50", "--device", "cpu",
            "--precision", "fp32", "--cache-dir", str(cache), "--run-dir", str(run_dir), "--no-progress",
        ]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "audiopetl.cli.main", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _log(run_dir: Path) -> list[dict]:
    path = next(run_dir.glob("*/log.jsonl"))
    return [{k: json.loads(line)[k] for k in LOSSES} for line in path.read_text().splitlines()]


def kill_and_resume(tmp_path: Path, kills: int, seed: int) -> None:
    """Kill runs with SIGKILL at random moments, resume each until it finishes; every epoch
    logged and the final adapter and metrics must equal an uninterrupted run's, bit for bit."""
    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=6, seconds=0.5, seed=5)
    cache = tmp_path / "cache"
    started = time.monotonic()
    reference = _train(data, tmp_path / "reference", cache, resume=False)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    window = time.monotonic() - started  # only where to aim the kills; nothing is asserted on time
    expected_log = _log(tmp_path / "reference")
    expected = load_file(next((tmp_path / "reference").glob("*/adapter.safetensors")))
    expected_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())["splits"][0]

    def check_finished(run_dir: Path) -> None:
        assert _log(run_dir) == expected_log
        resumed = load_file(next(run_dir.glob("*/adapter.safetensors")))
        assert resumed.keys() == expected.keys()
        assert all(torch.equal(resumed[k], expected[k]) for k in expected)
        metrics = json.loads((run_dir / "metrics.json").read_text())["splits"][0]
        for name in ("test_accuracy", "test_loss", "best_epoch", "best_valid_accuracy"):
            assert metrics[name] == expected_metrics[name], name
        assert not list(run_dir.rglob("*.tmp")) and not list((cache / "features").glob("*.tmp"))

    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    done = 0
    for _ in range(6 * kills):  # a run may finish before its kill: then it is checked and a new one starts
        if done == kills:
            break
        process = _train(data, run_dir, cache, resume=(run_dir / "config.yaml").exists())
        time.sleep(rng.uniform(0.2, window))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=300)
            done += 1
            if list(run_dir.glob("*/log.jsonl")):  # every epoch logged so far equals the uninterrupted run's
                log = _log(run_dir)
                assert log == expected_log[: len(log)]
        else:
            assert process.wait() == 0, process.stderr.read()
            check_finished(run_dir)
            shutil.rmtree(run_dir)
    assert done == kills
    final = _train(data, run_dir, cache, resume=(run_dir / "config.yaml").exists())
    assert final.wait(timeout=300) == 0, final.stderr.read()
    check_finished(run_dir)


def test_two_kills_at_random_moments_resume_bit_identical(tmp_path):
    kill_and_resume(tmp_path, kills=2, seed=0)


@pytest.mark.slow
def test_ten_kills_at_random_moments_resume_bit_identical(tmp_path):
    kill_and_resume(tmp_path, kills=10, seed=1)


# ------------------------------------------------------------------ the corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "data"
    for i in range(5):
        write_audio(root / "tone" / f"{i}.wav", tone(300 + 40 * i, 0.5), 16000)
        write_audio(root / "speech" / f"{i}.wav", speech_like(0.5, seed=i), 16000)
    broken, valid = write_corpus(root / "odd")
    return root, broken, valid


def test_every_valid_corpus_file_loads(corpus):
    _, broken, valid = corpus
    assert len(broken) + len(valid) >= 15
    for path in valid:
        assert load_audio(path).size > 0, path


def test_train_eval_and_predict_report_every_broken_file_by_path(corpus, tmp_path, capsys):
    root, broken, valid = corpus
    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    train = ["train", "--dataset", "folder", "--data-root", str(root), "--backbone", "tiny-random", "--epochs", "1",
             "--method", "lora", "--reduction-rate", "16",
             "--batch-size", "8", "--max-frames", "50", "--run-dir", str(tmp_path / "run"), "--no-progress",
             "--precision", "fp32", *common]
    assert main(train) == 2
    err = capsys.readouterr().err
    assert all(path in err for path in broken) and not any(f"{path}:" in err for path in valid)

    assert main([*train, "--skip-bad-audio"]) == 0
    assert "skipped 10 unusable audio file(s)" in capsys.readouterr().err
    listed = (tmp_path / "run" / "bad_audio.txt").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in listed) == sorted(broken)

    adapter = str(next((tmp_path / "run").glob("*/adapter.safetensors")))
    assert main(["eval", adapter, "--data-root", str(root), *common]) == 2
    err = capsys.readouterr().err
    assert all(path in err for path in broken)
    assert main(["eval", adapter, "--data-root", str(root), "--skip-bad-audio", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(item["path"] for item in result["skipped_audio"]) == sorted(broken)

    assert main(["predict", adapter, str(root / "odd"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    rows = {row["path"]: row for row in json.loads(captured.out)}
    assert sorted(p for p, row in rows.items() if "error" in row) == sorted(broken)
    assert all("label" in rows[path] for path in valid)
    assert all(path in captured.err for path in broken)
