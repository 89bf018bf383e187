"""Issue 10, item by item: precision from hardware facts, eval/predict with bad files, resume
from config.yaml only, non-finite runs stopped, corruption caught, temporaries cleaned,
operating-system errors in one line, own-data checks, early checks, console and log
consistency, files created per the umask."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from audio_fixtures import speech_like, write_audio
from multiprocess import run_bounded
from audiopetl.atomic import atomic_path, find_temporaries, remove_stale_temporaries
from audiopetl.cli.main import main
from audiopetl.data import FeatureCache, FolderDataset
from audiopetl.data import cache as cache_module
from audiopetl.experiments.synthetic import make_synthetic_dataset
from audiopetl.frontend import FbankConfig
from audiopetl.petl import read_adapter_metadata
from audiopetl.train import ADAPTER, TrainConfig, run_training
from audiopetl.train import loop as loop_module
from audiopetl.train import precision as precision_module
from audiopetl.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from audiopetl.train.loop import Batches, LoopSettings, NonFiniteLossError, fit

LORA = {"method": "lora", "targets": ["q", "v"], "reduction_rate": 16, "alpha": 8.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), clips_per_class=6, seconds=0.5, seed=3)


def config(dataset, tmp_path, **overrides) -> TrainConfig:
    values = dict(
        dataset="folder", data_root=str(dataset), backbone="tiny-random", method=LORA, max_frames=50, epochs=2,
        batch_size=8, cache_dir=str(tmp_path / "cache"), progress=False, device="cpu", precision="fp32",
    )
    values.update(overrides)
    return TrainConfig(**values)


def train_argv(dataset, tmp_path, run_dir, *extra) -> list[str]:
    return [
        "train", "--dataset", "folder", "--data-root", str(dataset), "--backbone", "tiny-random", "--method", "lora",
        "--reduction-rate", "16", "--epochs", "2", "--batch-size", "8", "--max-frames", "50", "--run-dir",
        str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu", "--precision", "fp32",
        *extra,
    ]


# ------------------------------------------------------------------ 1-2: precision
@pytest.mark.parametrize("fast", ["0", "1"])
def test_auto_precision_follows_the_detection_and_is_recorded(fast, dataset, tmp_path, monkeypatch):
    """Both detection results, forced: auto picks bf16 exactly when the CPU has fast bf16,
    config.yaml and the adapter record it, and eval reproduces the run with it."""
    monkeypatch.setenv(precision_module.FAST_BF16_ENV, fast)
    expected = "bf16" if fast == "1" else "fp32"
    assert precision_module.resolve_precision_name("auto", torch.device("cpu")) == expected
    assert precision_module.resolve_precision_name("auto", torch.device("cuda")) == "bf16"
    summary = run_training(config(dataset, tmp_path, precision="auto", epochs=1), tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["precision"] == expected
    adapter = tmp_path / "run" / summary["splits"][0]["split"] / ADAPTER
    assert read_adapter_metadata(adapter)["metadata"]["precision"] == expected
    monkeypatch.setenv(precision_module.FAST_BF16_ENV, "1" if fast == "0" else "0")  # eval elsewhere
    from audiopetl.experiments.inference import evaluate_adapter

    evaluated = evaluate_adapter(adapter, data_root=str(dataset), cache_dir=str(tmp_path / "cache"), device="cpu")
    assert evaluated["test_accuracy"] == summary["splits"][0]["test_accuracy"]


def test_detection_reads_hardware_flags_not_a_stopwatch(monkeypatch):
    monkeypatch.delenv(precision_module.FAST_BF16_ENV, raising=False)
    hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if hardware:
        assert precision_module.cpu_has_fast_bf16()
    assert precision_module.cpu_has_fast_bf16() == bool(precision_module.cpu_bf16_features())
    assert len({precision_module.cpu_has_fast_bf16() for _ in range(20)}) == 1  # no stopwatch to flip it
    monkeypatch.setenv(precision_module.FAST_BF16_ENV, "maybe")
    with pytest.raises(ValueError, match="AUDIOPETL_FAST_BF16"):
        precision_module.cpu_has_fast_bf16()


def interrupt_after_first_checkpoint(train_config, run_dir, monkeypatch) -> None:
    """Train ``train_config`` into ``run_dir`` and stop it right after epoch 1's checkpoint is written."""
    real_save = loop_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(train_config, run_dir)
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)


def test_resume_keeps_the_recorded_precision_when_the_detection_differs(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(precision_module.FAST_BF16_ENV, "1")
    reference = run_training(config(dataset, tmp_path, precision="auto"), tmp_path / "reference")
    interrupt_after_first_checkpoint(config(dataset, tmp_path, precision="auto"), tmp_path / "run", monkeypatch)
    monkeypatch.setenv(precision_module.FAST_BF16_ENV, "0")  # the resuming machine would choose fp32
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "run")]) == 0
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["precision"] == "bf16"
    assert resumed["splits"][0]["test_loss"] == reference["splits"][0]["test_loss"]


# ------------------------------------------------------------------ 3-4: eval / predict with bad files
@pytest.fixture
def data_with_bad_file(dataset, tmp_path):
    copy = tmp_path / "data"
    for path in Path(dataset).rglob("*.wav"):
        target = copy / path.relative_to(dataset)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    bad = copy / "chirp" / "zz_broken.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    return copy, bad


def test_eval_skips_bad_audio_and_says_which(data_with_bad_file, tmp_path, capsys):
    data, bad = data_with_bad_file
    run_dir = tmp_path / "run"
    assert main(train_argv(data, tmp_path, run_dir, "--skip-bad-audio")) == 0
    assert "skipped 1 unusable audio file(s)" in capsys.readouterr().err  # item 12: said on the console
    adapter = next(run_dir.glob("*/" + ADAPTER))
    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(["eval", str(adapter), "--data-root", str(data), *cache]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["eval", str(adapter), "--data-root", str(data), "--skip-bad-audio", *cache]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["skipped_audio"][0]["path"] == str(bad) and str(bad) in captured.err
    assert result["test_accuracy"] == json.loads((adapter.parent / "metrics.json").read_text())["test_accuracy"]


def test_predict_labels_every_readable_file_and_reports_the_rest(data_with_bad_file, tmp_path, capsys):
    data, bad = data_with_bad_file
    run_dir = tmp_path / "run"
    assert main(train_argv(data, tmp_path, run_dir, "--skip-bad-audio")) == 0
    adapter = str(next(run_dir.glob("*/" + ADAPTER)))
    capsys.readouterr()
    assert main(["predict", adapter, str(data / "chirp"), "--device", "cpu", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 7 and sum("error" in r for r in rows) == 1
    assert [r for r in rows if "error" in r][0]["path"] == str(bad) and str(bad) in captured.err
    assert main(["predict", adapter, str(data / "chirp"), "--device", "cpu", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in table if r["error"]] == [str(bad)]
    assert main(["predict", adapter, str(bad), "--device", "cpu"]) == 2  # nothing could be predicted
    assert "none of the 1 file(s)" in capsys.readouterr().err
    assert main(["predict", adapter, str(data / "chirp"), "--top-k", "0", "--device", "cpu"]) == 2  # item 9
    err = capsys.readouterr().err
    assert "--top-k" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ 5: resume
def test_resume_needs_only_the_run_dir_and_refuses_result_changing_options(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_argv(dataset, tmp_path, run_dir)) == 0
    recorded = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    for extra in (["--epochs", "6"], ["--seed", "99"], ["--reduction-rate", "8"], ["--method", "bitfit"],
                  ["--dataset", "folder", "--lr", "0.1"]):
        assert main(["train", "--resume", "--run-dir", str(run_dir), *extra]) == 2
        err = capsys.readouterr().err
        for flag in extra[::2]:
            assert flag in err
        assert (run_dir / "config.yaml").read_text() == recorded
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    with pytest.raises(ValueError, match="epochs"):  # the library refuses too
        run_training(config(dataset, tmp_path, epochs=3), run_dir, resume=True)


# ------------------------------------------------------------------ 6: non-finite
@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "nan")])
def test_non_finite_options_are_refused_at_start(option, value, dataset, tmp_path, capsys):
    assert main(train_argv(dataset, tmp_path, tmp_path / "run", option, value)) == 2
    assert option.lstrip("-").replace("-", "_") in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before any audio was decoded


def test_a_run_that_goes_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 3)
    calls = {"n": 0}

    def forward(inputs):  # finite during epoch 1 (3 batches + validation), then NaN
        calls["n"] += 1
        logits = model(inputs)
        return logits * float("nan") if calls["n"] > 4 else logits

    inputs = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    labels = np.arange(12) % 3
    batches = Batches(inputs, labels, np.arange(12))
    settings = LoopSettings(epochs=3, batch_size=4, lr=1e-2, progress=False)
    with pytest.raises(NonFiniteLossError, match="epoch 2.*checkpoint of epoch 1"):
        fit(model, batches, batches, batches, settings, tmp_path, forward=forward)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "checkpoint.pt")["trainable"].values())
    assert not (tmp_path / "metrics.json").exists()


def test_a_diverging_run_exits_non_zero_without_an_adapter(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = train_argv(dataset, tmp_path, run_dir, "--lr", "1e30")
    del argv[argv.index("--reduction-rate") : argv.index("--reduction-rate") + 2]
    argv[argv.index("lora")] = "full"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training stopped" in err and len(err.strip().splitlines()) == 1
    assert not list(run_dir.glob("*/" + ADAPTER)) and not (run_dir / "metrics.json").exists()


def test_a_diverging_two_rank_run_stops_on_every_rank(dataset, tmp_path):
    """The stop is collective: a rank stopping alone would leave the other waiting forever."""
    argv = train_argv(dataset, tmp_path, tmp_path / "run", "--lr", "1e30", "--nproc", "2")
    del argv[argv.index("--reduction-rate") : argv.index("--reduction-rate") + 2]
    argv[argv.index("lora")] = "full"
    result = run_bounded([sys.executable, "-m", "audiopetl", *argv])
    assert result.returncode == 2 and "training stopped" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("audiopetl train: error:") and "training stopped" in last
    assert "Traceback" not in result.stderr  # (torch's own warnings may precede the line)
    assert not list((tmp_path / "run").glob("*/" + ADAPTER))


# ------------------------------------------------------------------ 7: corruption
def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 3, "trainable": {"w": torch.arange(1000.0)}})
    data = bytearray(path.read_bytes())
    offset = data.find(np.arange(1000, dtype=np.float32)[500:502].tobytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checkpoint.pt.*corrupt"):
        load_checkpoint(path)


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, dataset, capsys):
    paths = sorted(str(p) for p in Path(dataset).rglob("*.wav"))[:4]
    cache = FeatureCache(tmp_path / "cache")
    first = np.array(cache.features(paths, FbankConfig(max_frames=50), progress=False)[0])
    data_file = next((tmp_path / "cache" / "features").glob("*.f32"))
    raw = bytearray(data_file.read_bytes())
    raw[1000:1004] = np.float32(np.nan).tobytes()
    data_file.write_bytes(bytes(raw))
    cache_module._VERIFIED.clear()  # as a new process would
    again = np.array(cache.features(paths, FbankConfig(max_frames=50), progress=False)[0])
    assert "corrupt" in capsys.readouterr().err
    np.testing.assert_array_equal(again, first)


# ------------------------------------------------------------------ 8: temporaries
def test_stale_temporaries_are_removed_but_not_a_live_processs(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    from audiopetl.atomic import _HOST

    folder = tmp_path / "cache" / "features"
    folder.mkdir(parents=True)
    stale = folder / f"abc.f32.{_HOST}.{dead_pid}.0123abcd.tmp"
    live = folder / f"def.f32.{_HOST}.{os.getpid()}.0123abcd.tmp"
    remote = folder / f"ghi.f32.otherhost.{dead_pid}.0123abcd.tmp"
    for path in (stale, live, remote):
        path.write_bytes(b"x" * 1000)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    listing = capsys.readouterr().out
    assert stale.name in listing and "stale" in listing and live.name in listing and "being written" in listing
    assert [t.path for t in remove_stale_temporaries(folder)] == [stale]
    assert sorted(t.path for t in find_temporaries(folder)) == sorted([live, remote])


def test_a_killed_run_leaves_no_temporaries_after_resume(dataset, tmp_path, monkeypatch):
    interrupt_after_first_checkpoint(config(dataset, tmp_path), tmp_path / "run", monkeypatch)
    # What a SIGKILL during the next checkpoint write leaves (the fault-injection test kills for real).
    from audiopetl.atomic import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    split_dir = next(p for p in (tmp_path / "run").iterdir() if p.is_dir())
    (split_dir / f"checkpoint.pt.{_HOST}.{int(dead.stdout)}.0123abcd.tmp").write_bytes(b"half")
    run_training(config(dataset, tmp_path), tmp_path / "run", resume=True)
    assert not list((tmp_path / "run").rglob("*.tmp"))


# ------------------------------------------------------------------ 9: operating-system errors
def test_an_unwritable_cache_folder_is_one_line_naming_it(dataset, tmp_path, capsys):
    argv = train_argv(dataset, tmp_path, tmp_path / "run")
    argv[argv.index("--cache-dir") + 1] = "/sys/audiopetl-cache"  # a read-only file system
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/sys/audiopetl-cache" in err and "--cache-dir" in err


def test_a_full_disk_during_a_checkpoint_write_is_one_clear_error(tmp_path):
    script = f"""
import resource, signal, torch
from audiopetl.train.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint({str(tmp_path / 'checkpoint.pt')!r}, {{"w": torch.zeros(100000)}})
except OSError as error:
    print("ERROR", error)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "ERROR cannot write" in result.stdout and "checkpoint.pt" in result.stdout and "disk" in result.stdout
    assert list(tmp_path.iterdir()) == []  # neither checkpoint nor temporary


def test_a_full_cache_folder_is_one_clear_error(tmp_path, dataset):
    paths = sorted(str(p) for p in Path(dataset).rglob("*.wav"))
    script = f"""
import resource, signal
from audiopetl.data import FeatureCache
from audiopetl.frontend import FbankConfig
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    FeatureCache({str(tmp_path / 'cache')!r}).features({paths!r}, FbankConfig(max_frames=50), progress=False)
except OSError as error:
    print("ERROR", error)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "ERROR cannot write the feature cache in" in result.stdout and "--cache-dir" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
    assert list((tmp_path / "cache" / "features").iterdir()) == []  # no partial entry, no temporary


def test_a_csv_row_with_too_few_fields_names_the_line(tmp_path, dataset):
    manifest = tmp_path / "manifest.csv"
    wav = next(Path(dataset).rglob("*.wav"))
    manifest.write_text(f"path,label,split\n{wav},chirp,train\n{wav},chirp\n")
    with pytest.raises(ValueError, match="line 3: too few fields"):
        FolderDataset().scan(manifest)


# ------------------------------------------------------------------ 10: own data
def test_own_data_nonsense_is_reported(tmp_path, dataset):
    root = tmp_path / "own"
    for name in ("a", "b"):
        for i in range(3):
            write_audio(root / name / f"{i}.wav", speech_like(0.3, seed=i), 16000)
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        FolderDataset().scan(root)
    (root / "empty_class").rmdir()
    os.symlink(root / "nowhere.wav", root / "a" / "dangling.wav")
    (root / "b" / "folder.wav").mkdir()
    clips = {Path(c.path).name for c in FolderDataset().scan(root).clips}
    assert {"dangling.wav", "folder.wav"} <= clips  # kept, so the cache reports them by path
    reasons = dict(FeatureCache(tmp_path / "cache").features(
        [c.path for c in FolderDataset().scan(root).clips], FbankConfig(max_frames=20), skip_bad_audio=True,
        progress=False)[2])
    assert "broken symbolic link" in reasons[str(root / "a" / "dangling.wav")]
    assert "folder" in reasons[str(root / "b" / "folder.wav")]

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{root / 'a' / '0.wav'},\n")
    with pytest.raises(ValueError, match=r"line 2: empty \['label'\]"):
        FolderDataset().scan(manifest)


def test_a_label_only_in_the_test_split_is_warned_about(tmp_path, dataset, capsys):
    wavs = sorted(Path(dataset).rglob("*.wav"))
    manifest = tmp_path / "m.csv"
    rows = [f"{w},{w.parent.name},{'train' if i % 3 else 'valid'}" for i, w in enumerate(wavs)]
    rows.append(f"{wavs[0]},only_in_test,test")
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    run_training(config(manifest, tmp_path, epochs=1), tmp_path / "run")
    assert "['only_in_test'] occur in the test set but not in the training set" in capsys.readouterr().err


# ------------------------------------------------------------------ 11: checks before decoding
@pytest.mark.parametrize(
    "options, message",
    [
        ({"backbone": "./no-such-backbone"}, "no-such-backbone"),
        ({"method": {**LORA, "reduction_rate": 1000}}, "reduction"),
        ({"extra_trainable": ("block.99",)}, "block.99"),
        ({"extra_trainable": ("bogus",)}, "bogus"),
    ],
)
def test_everything_checkable_fails_before_audio_is_decoded(options, message, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "load_audio", lambda *a, **k: pytest.fail("decoded audio before the check"))
    with pytest.raises((ValueError, OSError), match=message):
        run_training(config(dataset, tmp_path, **options), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a refused run leaves no run folder behind


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--data-root", "{tmp}/no-such-folder"], "{tmp}/no-such-folder"),
        (["--dataset", "esc50", "--data-root", "{tmp}/empty"], "{tmp}/empty"),  # not ESC-50's layout
        (["--folds", "7"], "folds [7]"),
        (["--backbone", "{tmp}/no-such-backbone"], "no-such-backbone"),
    ],
)
def test_train_options_refused_after_start_up_write_nothing(flags, named, dataset, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = train_argv(dataset, tmp_path, tmp_path / "run")
    for flag, value in zip(flags[::2], flags[1::2]):
        value = value.format(tmp=tmp_path)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("audiopetl train: error:") and named.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "run").exists()  # no config.yaml, nothing


# ------------------------------------------------------------------ 12: log, umask
def test_the_log_matches_the_checkpoint_after_a_kill_during_its_write(dataset, tmp_path, monkeypatch):
    def die_while_writing(path, state):
        raise KeyboardInterrupt("killed while writing the checkpoint")

    real_save = loop_module.save_checkpoint
    saves = []

    def first_ok_then_die(path, state):
        if saves:
            die_while_writing(path, state)
        saves.append(state["epoch"])
        real_save(path, state)

    monkeypatch.setattr(loop_module, "save_checkpoint", first_ok_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(config(dataset, tmp_path, epochs=3), tmp_path / "run")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    split_dir = next(p for p in (tmp_path / "run").iterdir() if p.is_dir())
    assert len((split_dir / "log.jsonl").read_text().splitlines()) == 2  # epoch 2 logged, not checkpointed
    run_training(config(dataset, tmp_path, epochs=3), tmp_path / "run", resume=True)
    epochs = [json.loads(line)["epoch"] for line in (split_dir / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_files_are_created_per_the_umask(dataset, tmp_path):
    old = os.umask(0o022)
    try:
        run_training(config(dataset, tmp_path, epochs=1), tmp_path / "run")
        with atomic_path(tmp_path / "plain.txt") as temp:
            temp.write_text("x")
    finally:
        os.umask(old)
    files = [p for p in [*(tmp_path / "run").rglob("*"), *(tmp_path / "cache").rglob("*"), tmp_path / "plain.txt"]
             if p.is_file()]
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert any(p.endswith(ADAPTER) for p in modes) and any(p.endswith(".f32") for p in modes)
    assert set(modes.values()) == {"0o644"}, modes
