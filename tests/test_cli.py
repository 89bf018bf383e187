"""The ``audiopetl`` command: help, validation at start-up, real boolean flags, and a run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from audiopetl.cli.commands import config_from_args
from audiopetl.cli.main import build_parser, main
from audiopetl.experiments.synthetic import make_synthetic_dataset


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_help_lists_and_explains_every_command():
    result = subprocess.run([sys.executable, "-m", "audiopetl.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "train", "eval", "predict", "params", "data", "cache", "reproduce", "report"):
        assert command in result.stdout


def test_boolean_flags_are_real_booleans():
    args = parse("train", "--dataset", "esc50", "--data-root", "x", "--no-specaugment", "--residual",
                 "--method", "bottleneck_pf_seq")
    config = config_from_args(args)
    assert config.specaugment is False
    assert config.method["residual"] is True
    args = parse("train", "--dataset", "esc50", "--data-root", "x", "--method", "bottleneck_pf_seq", "--no-residual")
    assert config_from_args(args).method["residual"] is False
    with pytest.raises(SystemExit):
        parse("train", "--dataset", "esc50", "--data-root", "x", "--specaugment", "False")


def test_flags_override_a_yaml_config_and_the_rest_comes_from_it(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("dataset: gsc\ndata_root: /data/gsc\nepochs: 3\nmethod: {method: prefix, num_tokens: 8}\n")
    config = config_from_args(parse("train", "--config", str(config_file), "--epochs", "5"))
    assert (config.dataset, config.data_root, config.epochs) == ("gsc", "/data/gsc", 5)
    assert config.method == {"method": "prefix", "num_tokens": 8}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "esc50", "--data-root", "x", "--method", "lorra"], "lora"),
        (["train", "--dataset", "esc50", "--data-root", "x", "--method", "lora", "--num-prompts", "3"], "num_prompts"),
        (["train", "--dataset", "esc50", "--data-root", "x", "--method", "lora", "--targets", "q,x"], "targets"),
        (["train", "--dataset", "nope", "--data-root", "x"], "esc50"),
        (["train", "--data-root", "x"], "--dataset"),
        (["train", "--dataset", "esc50", "--data-root", "x", "--method", "lora", "--nproc", "0"], "--nproc must be >= 1"),
    ],
)
def test_invalid_options_fail_before_any_work_with_the_valid_choices(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("train", "--dataset", "esc50", "--data-root", "x", "--precision", "fp16")
    assert "fp32" in capsys.readouterr().err


def test_params_prints_the_method_table_without_weights(capsys):
    assert main(["params", "--num-classes", "50"]) == 0
    out = capsys.readouterr().out
    assert "221" in out and "249" in out and "102" in out


def test_data_info_and_list(capsys):
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("esc50", "us8k", "gsc", "fsc", "folder"):
        assert name in listing
    assert main(["data", "info", "esc50"]) == 0
    assert "esc50.csv" in capsys.readouterr().out


def test_train_then_predict_from_the_command_line(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", clips_per_class=6, seconds=1.0)
    run_dir = tmp_path / "run"
    code = main([
        "train", "--dataset", "folder", "--data-root", str(data), "--backbone", "tiny-random", "--method", "lora",
        "--reduction-rate", "16", "--epochs", "2", "--batch-size", "8", "--max-frames", "100",
        "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    assert (run_dir / "metrics.json").exists()
    capsys.readouterr()
    adapter = next(run_dir.glob("*/adapter.safetensors"))
    assert main(["predict", str(adapter), str(data / "chirp"), "--top-k", "2", "--device", "cpu"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 6 and len(predictions[0]["top_k"]) == 2
    assert main(["eval", str(adapter), "--data-root", str(data), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    trained = json.loads((adapter.parent / "metrics.json").read_text())
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "clips" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "(cache is empty)" in capsys.readouterr().out


def test_fsc_download_says_where_to_get_it_and_how_to_unpack(tmp_path, capsys):
    assert main(["data", "download", "fsc", "--to", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "fluent" in error.lower() and "wavs" in error
