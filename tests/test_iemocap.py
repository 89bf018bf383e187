"""IEMOCAP: a miniature in the corpus's real layout (EmoEvaluation label files, per-dialog wav
folders), the 4-class mapping, the published 10-split session/speaker protocol, layout errors,
and `train --dataset iemocap` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audio_fixtures import speech_like, write_audio
from audiopetl.cli.main import main
from audiopetl.data import DatasetLayoutError, get_dataset

# The acceptance run (a speech encoder on speech emotion), and AST.
END_TO_END_BACKBONES = ["tiny-random-wav2vec2", "tiny-random"]

# Per session: dialog -> [(utterance suffix, label)]. Every label a real file carries
# appears somewhere; only neu/hap/exc/sad/ang are kept.
DIALOGS = {
    "impro01": [("F000", "neu"), ("M000", "hap"), ("F001", "exc"), ("M001", "fru"), ("F002", "sad"),
                ("M002", "ang"), ("F003", "xxx")],
    "script01_1": [("M000", "neu"), ("F000", "ang"), ("M001", "sur"), ("F001", "sad"), ("M002", "exc")],
}


def write_iemocap(root: Path, sessions=(1, 2, 3, 4, 5), seconds: float = 0.5) -> Path:
    """A miniature IEMOCAP_full_release under `root`; returns `root`."""
    seed = 0
    for session in sessions:
        base = root / "IEMOCAP_full_release" / f"Session{session}"
        labels = base / "dialog" / "EmoEvaluation"
        labels.mkdir(parents=True, exist_ok=True)
        (labels / "Categorical").mkdir(exist_ok=True)  # the real folder holds sub-folders too
        for dialog, utterances in DIALOGS.items():
            name = f"Ses0{session}F_{dialog}"
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            for number, (suffix, label) in enumerate(utterances):
                utterance = f"{name}_{suffix}"
                start = 2.0 * number
                lines += [
                    f"[{start:.4f} - {start + 1.5:.4f}]\t{utterance}\t{label}\t[2.5000, 3.0000, 2.5000]",
                    "C-E2:\tNeutral;\t()",
                    "A-E3:\tval 3; act 2; dom  2;\t()",
                    "",
                ]
                seed += 1
                write_audio(base / "sentences" / "wav" / name / f"{utterance}.wav",
                            speech_like(seconds, 16000, seed=seed), 16000)
            (labels / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_scan_keeps_four_classes_and_merges_excited_into_happy(tmp_path):
    index = get_dataset("iemocap").scan(write_iemocap(tmp_path))
    assert index.class_names == ["neutral", "happy", "sad", "angry"]
    kept = {f"{dialog}_{suffix}": label for dialog, us in DIALOGS.items() for suffix, label in us
            if label in ("neu", "hap", "exc", "sad", "ang")}
    assert len(index.clips) == 5 * len(kept)
    expected = {"neu": 0, "hap": 1, "exc": 1, "sad": 2, "ang": 3}
    for clip in index.clips:
        stem = Path(clip.path).stem  # Ses0SF_<dialog>_<speaker>
        assert clip.label == expected[kept[stem.split("_", 1)[1]]]
        assert Path(clip.path).parent.name == stem.rsplit("_", 1)[0]
        assert clip.fold == int(stem[4])


def test_protocol_rotates_held_out_session_and_speaker_gender(tmp_path):
    dataset = get_dataset("iemocap")
    index = dataset.scan(write_iemocap(tmp_path))
    splits = dataset.splits(index)
    assert [s.name for s in splits] == [f"session{s}-valid{g}" for s in (5, 1, 2, 3, 4) for g in ("F", "M")]

    def session_gender(i):
        stem = Path(index.clips[i].path).stem
        return int(stem[4]), stem.rsplit("_", 1)[1][0]

    for split in splits:
        held, valid_gender = int(split.name[7]), split.name[-1]
        test_gender = {"F": "M", "M": "F"}[valid_gender]
        assert {session_gender(i)[0] for i in split.train} == set(range(1, 6)) - {held}
        assert {session_gender(i)[1] for i in split.train} == {"F", "M"}  # training uses both speakers
        assert {session_gender(i) for i in split.valid} == {(held, valid_gender)}
        assert {session_gender(i) for i in split.test} == {(held, test_gender)}
        assert len(split.train) + len(split.valid) + len(split.test) == len(index.clips)


def test_layout_errors_name_the_problem(tmp_path):
    dataset = get_dataset("iemocap")
    with pytest.raises(DatasetLayoutError, match="(?s)missing.*Session3.*sail.usc.edu"):
        dataset.scan(write_iemocap(tmp_path / "partial", sessions=(1, 2)))
    root = write_iemocap(tmp_path / "nowav")
    (root / "IEMOCAP_full_release/Session2/sentences/wav/Ses02F_impro01/Ses02F_impro01_F002.wav").unlink()
    with pytest.raises(DatasetLayoutError, match="missing: .*Ses02F_impro01_F002.wav"):
        dataset.scan(root)
    root = write_iemocap(tmp_path / "badline")
    label_file = root / "IEMOCAP_full_release/Session4/dialog/EmoEvaluation/Ses04F_impro01.txt"
    label_file.write_text(label_file.read_text().replace("\tSes04F_impro01_F000\t", " Ses04F_impro01_F000 "))
    with pytest.raises(DatasetLayoutError, match="Ses04F_impro01.txt:3: expected"):
        dataset.scan(root)


def test_data_info_says_where_the_corpus_comes_from(capsys):
    assert main(["data", "info", "iemocap"]) == 0
    out = capsys.readouterr().out
    assert "licence" in out and "https://sail.usc.edu/iemocap/" in out and "EmoEvaluation" in out


@pytest.mark.parametrize("backbone", END_TO_END_BACKBONES)
def test_train_end_to_end_on_mini_iemocap(tmp_path, backbone):
    data = write_iemocap(tmp_path / "data")
    run_dir = tmp_path / "run"
    code = main([
        "train", "--dataset", "iemocap", "--data-root", str(data), "--backbone", backbone,
        "--method", "adapter", "--reduction-rate", "16", "--folds", "1", "--epochs", "1", "--batch-size", "8",
        "--max-frames", "64", "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"),
        "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    metrics = json.loads(next(run_dir.glob("*/metrics.json")).read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert next(run_dir.glob("session5-validF/adapter.safetensors")).exists()
