"""Dataset readers: generated miniatures of ESC-50, UrbanSound8K, Speech Commands V2 and
Fluent Speech Commands in their official layouts (real audio files), own data as folders
or manifests, evaluation protocols, and layout errors that say what was expected."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from audio_fixtures import noise, tone, write_audio
from audiopetl.data import (
    DATASETS,
    DatasetLayoutError,
    FeatureCache,
    get_dataset,
    rotation_splits,
)
from audiopetl.data.gsc import WORDS
from audiopetl.frontend import FbankConfig

ESC50_CLASSES = [
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow", "rain", "sea_waves",
    "crackling_fire", "crickets", "chirping_birds", "water_drops", "wind", "pouring_water", "toilet_flush",
    "thunderstorm", "crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps", "laughing",
    "brushing_teeth", "snoring", "drinking_sipping", "door_wood_knock", "mouse_click", "keyboard_typing",
    "door_wood_creaks", "can_opening", "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick",
    "glass_breaking", "helicopter", "chainsaw", "siren", "car_horn", "engine", "train", "church_bells",
    "airplane", "fireworks", "hand_saw",
]
US8K_CLASSES = [
    "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling", "engine_idling", "gun_shot",
    "jackhammer", "siren", "street_music",
]
# (sample rate, subtype, channels): the odd formats UrbanSound8K really contains.
US8K_FORMATS = [
    (44100, "PCM_16", 2), (48000, "PCM_24", 1), (22050, "PCM_U8", 1), (96000, "PCM_24", 2), (11025, "PCM_16", 1),
    (8000, "PCM_U8", 2), (44100, "FLOAT", 1), (48000, "PCM_32", 2), (16000, "PCM_16", 1), (22050, "DOUBLE", 2),
]
SECONDS = 0.1  # miniature clips: the readers check layout, not length


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_esc50(root: Path, classes: list[str] = ESC50_CLASSES) -> Path:
    """One 44.1 kHz clip per class and fold, named like the real ones (fold-source-take-target)."""
    rows = []
    for target, category in enumerate(classes):
        for fold in range(1, 6):
            name = f"{fold}-{1000 + target}-A-{target}.wav"
            write_audio(root / "audio" / name, tone(200 + 10 * target, SECONDS, 44100), 44100)
            rows.append([name, fold, target, category, False, 1000 + target, "A"])
    header = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    write_csv(root / "meta" / "esc50.csv", header, rows)
    return root


def make_us8k(root: Path) -> Path:
    """One clip per class and fold, cycling through US8K's sample rates, depths and channels."""
    rows = []
    for fold in range(1, 11):
        for class_id, name in enumerate(US8K_CLASSES):
            rate, subtype, channels = US8K_FORMATS[(fold + class_id) % len(US8K_FORMATS)]
            file = f"{100 + class_id}-{class_id}-0-{fold}.wav"
            signal = tone(300 + 50 * class_id, 0.25, rate) + noise(0.25, rate, seed=fold)
            write_audio(root / "audio" / f"fold{fold}" / file, signal, rate, subtype=subtype, channels=channels)
            rows.append([file, 100 + class_id, 0.0, 0.25, 1, fold, class_id, name])
    write_csv(root / "metadata" / "UrbanSound8K.csv",
              ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"], rows)
    return root


def make_gsc(root: Path) -> Path:
    """Three clips per word: the first trains, the second validates, the third tests."""
    valid, test = [], []
    for w, word in enumerate(WORDS):
        for take in range(3):
            name = f"{w:08x}_nohash_{take}.wav"
            write_audio(root / word / name, tone(300 + 20 * w, SECONDS, 16000), 16000)
            (valid if take == 1 else test if take == 2 else []).append(f"{word}/{name}")
    write_audio(root / "_background_noise_" / "white_noise.wav", noise(0.5, 16000), 16000)
    (root / "validation_list.txt").write_text("\n".join(valid) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    return root


FSC_INTENTS = [
    ("activate", "lamp", "none"), ("change language", "Chinese", "none"), ("increase", "heat", "kitchen"),
    ("decrease", "volume", "none"), ("bring", "shoes", "none"), ("deactivate", "lights", "washroom"),
]


def make_fsc(root: Path, seed: int = 0, test_extra: tuple | None = None) -> Path:
    """Two training clips per intent, one valid and one test; rows in a seeded random order."""
    split_rows = {"train": [], "valid": [], "test": []}
    n = 0
    for intent in FSC_INTENTS:
        for split in ("train", "train", "valid", "test"):
            relative = f"wavs/speakers/spk{n % 3}/{n:04d}.wav"
            write_audio(root / relative, tone(200 + 7 * n, SECONDS, 16000), 16000)
            split_rows[split].append([n, relative, f"spk{n % 3}", " ".join(intent), *intent])
            n += 1
    if test_extra:
        split_rows["test"].append([n, split_rows["test"][0][1], "spk0", "x", *test_extra])
    for split, rows in split_rows.items():
        random.Random(seed).shuffle(rows)
        write_csv(root / "data" / f"{split}_data.csv",
                  ["", "path", "speakerId", "transcription", "action", "object", "location"], rows)
    return root


def fold_of(index, indices) -> set[int]:
    return {index.clips[i].fold for i in indices}


def assert_partition(split, total: int) -> None:
    parts = [set(split.train), set(split.valid), set(split.test)]
    assert all(parts), f"{split.name} has an empty part"
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == total


# ---------------------------------------------------------------------------- benchmarks
def test_registry_names_and_paper_defaults():
    assert list(DATASETS) == ["esc50", "us8k", "gsc", "fsc", "iemocap", "folder"]
    expected = {"esc50": (500, 32, 50, True, 50), "us8k": (400, 32, 30, True, 10),
                "gsc": (100, 128, 75, False, 35), "fsc": (400, 32, 75, False, 31)}
    for name, values in expected.items():
        d = get_dataset(name).defaults
        assert (d.max_frames, d.batch_size, d.epochs, d.specaugment, d.num_classes) == values
    with pytest.raises(ValueError, match="esc50.*us8k.*gsc.*fsc.*folder"):
        get_dataset("esc10")


def test_esc50_classes_folds_and_paper_rotation(tmp_path):
    esc50 = get_dataset("esc50")
    index = esc50.scan(make_esc50(tmp_path / "ESC-50-master"))
    assert index.class_names == ESC50_CLASSES
    assert len(index.clips) == 250 and {c.fold for c in index.clips} == {1, 2, 3, 4, 5}
    assert all(index.clips[i].path.endswith(f"-{index.clips[i].label}.wav") for i in range(250))
    splits = esc50.splits(index)
    assert [s.name for s in splits] == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    by_name = {s.name: s for s in splits}
    # The paper's first rotation, then shifted by one fold each time.
    paper = [([1, 2, 3], 4, 5), ([2, 3, 4], 5, 1), ([3, 4, 5], 1, 2), ([4, 5, 1], 2, 3), ([5, 1, 2], 3, 4)]
    for train, valid, test in paper:
        split = by_name[f"fold{test}"]
        assert fold_of(index, split.train) == set(train)
        assert fold_of(index, split.valid) == {valid}
        assert fold_of(index, split.test) == {test}
        assert_partition(split, 250)
        assert {index.clips[i].label for i in split.test} == set(range(50))
    with pytest.raises(ValueError, match="unknown protocol 'reference' for esc50; valid: \\['default'\\]"):
        esc50.splits(index, protocol="reference")


def test_us8k_odd_formats_load_and_both_protocols(tmp_path):
    us8k = get_dataset("us8k")
    index = us8k.scan(make_us8k(tmp_path / "UrbanSound8K"))
    assert index.class_names == US8K_CLASSES
    assert len(index.clips) == 100

    default = us8k.splits(index)
    assert [s.name for s in default] == [f"fold{k}" for k in range(1, 11)]
    for k, split in enumerate(default, start=1):
        assert fold_of(index, split.test) == {k}
        valid_fold = fold_of(index, split.valid)
        assert len(valid_fold) == 1 and valid_fold != {k}
        assert fold_of(index, split.train) == set(range(1, 11)) - {k} - valid_fold  # valid held out of training
        assert_partition(split, 100)

    reference = us8k.splits(index, protocol="reference")  # published: 9 training folds, no validation
    for k, split in enumerate(reference, start=1):
        assert split.valid == [] and fold_of(index, split.test) == {k}
        assert fold_of(index, split.train) == set(range(1, 11)) - {k}
        assert "no validation" in split.description
        assert len(split.train) + len(split.test) == 100 and not set(split.train) & set(split.test)
    with pytest.raises(ValueError, match="valid: \\['default', 'reference'\\]"):
        us8k.splits(index, protocol="paper")

    # Every odd format decodes to 16 kHz mono features.
    config = FbankConfig(max_frames=24)
    features, kept, bad = FeatureCache(tmp_path / "cache").features(
        [c.path for c in index.clips], config, progress=False
    )
    assert bad == [] and kept == list(range(100)) and features.shape == (100, 24, 128)
    assert np.isfinite(features).all() and (features.std(axis=(1, 2)) > 0).all()


def test_gsc_words_official_split_and_background_noise(tmp_path):
    gsc = get_dataset("gsc")
    root = make_gsc(tmp_path / "speech_commands_v0.02")
    index = gsc.scan(root)
    assert index.class_names == list(WORDS) and len(WORDS) == 35
    assert not any("_background_noise_" in c.path for c in index.clips)
    [split] = gsc.splits(index)
    assert split.name == "official"
    assert (len(split.train), len(split.valid), len(split.test)) == (35, 35, 35)
    assert all(index.clips[i].path.endswith("_1.wav") for i in split.valid)
    assert all(index.clips[i].path.endswith("_2.wav") for i in split.test)
    assert_partition(split, 105)
    assert all(Path(c.path).parent.name == WORDS[c.label] for c in index.clips)


def test_gsc_layout_errors_name_the_problem(tmp_path):
    root = make_gsc(tmp_path / "gsc")
    (root / "validation_list.txt").write_text("yes/ghost.wav\n")
    with pytest.raises(DatasetLayoutError, match="not on disk.*yes/ghost.wav"):
        get_dataset("gsc").scan(root)
    for path in (root / "visual").iterdir():
        path.unlink()
    (root / "visual").rmdir()
    with pytest.raises(DatasetLayoutError, match="(?s)missing \\['visual'\\].*audiopetl data download gsc --to DIR"):
        get_dataset("gsc").scan(root)


def test_fsc_intents_from_training_split_are_stable(tmp_path):
    fsc = get_dataset("fsc")
    first = fsc.scan(make_fsc(tmp_path / "a", seed=0))
    second = fsc.scan(make_fsc(tmp_path / "b", seed=1))  # same data, other row order
    expected = sorted("|".join(intent) for intent in FSC_INTENTS)
    assert first.class_names == second.class_names == expected
    [split] = fsc.splits(first)
    assert (len(split.train), len(split.valid), len(split.test)) == (12, 6, 6)
    for i in split.test:
        clip = first.clips[i]
        assert clip.split == "test" and first.class_names[clip.label].count("|") == 2
    assert {first.clips[i].label for i in split.train} == set(range(len(FSC_INTENTS)))


def test_fsc_unknown_intent_and_missing_data_explain_the_licence(tmp_path):
    with pytest.raises(DatasetLayoutError, match="absent from training.*'bring\\|socks\\|none'"):
        get_dataset("fsc").scan(make_fsc(tmp_path / "fsc", test_extra=("bring", "socks", "none")))
    with pytest.raises(DatasetLayoutError, match="data/train_data.csv") as error:
        get_dataset("fsc").scan(tmp_path / "nothing-here")
    assert "accepting its licence" in str(error.value) and "https://fluent.ai/" in str(error.value)


def test_missing_or_wrong_layout_says_what_and_how(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"no such folder(.|\n)*meta/esc50.csv(.|\n)*"
                                                 r"audiopetl data download esc50 --to DIR"):
        get_dataset("esc50").scan(tmp_path / "absent")
    root = make_esc50(tmp_path / "esc", classes=ESC50_CLASSES[:2])
    (root / "audio" / "3-1001-A-1.wav").unlink()
    with pytest.raises(DatasetLayoutError, match="1 audio files .* missing: .*3-1001-A-1.wav"):
        get_dataset("esc50").scan(root)
    write_csv(root / "meta" / "esc50.csv", ["filename", "target"], [["x.wav", 0]])
    with pytest.raises(DatasetLayoutError, match="lacks columns \\['fold', 'category'\\]"):
        get_dataset("esc50").scan(root)
    with pytest.raises(DatasetLayoutError, match="metadata/UrbanSound8K.csv"):
        get_dataset("us8k").scan(root)


# ---------------------------------------------------------------------------- own data
def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_audio(root / name / f"{i:03d}.wav", tone(300 + 100 * c, SECONDS, 16000), 16000)
    return root


def test_folder_of_classes_gets_a_seeded_stratified_split(tmp_path):
    root = make_folder(tmp_path / "data", {"bird": 20, "car": 10, "rain": 6})
    (root / "_unused").mkdir()
    (root / "car" / "notes.txt").write_text("not audio")
    folder = get_dataset("folder")
    index = folder.scan(root)
    assert index.class_names == ["bird", "car", "rain"] and len(index.clips) == 36
    [split] = folder.splits(index)
    assert_partition(split, 36)
    labels = np.array(index.labels)
    for label, (n_valid, n_test) in enumerate([(2, 2), (1, 1), (1, 1)]):
        assert (labels[split.valid] == label).sum() == n_valid
        assert (labels[split.test] == label).sum() == n_test
    assert folder.splits(index)[0] == split  # same seed, same split
    from audiopetl.data import FolderDataset

    assert FolderDataset(seed=1).splits(index)[0].test != split.test


def test_folder_manifest_with_split_or_fold_column(tmp_path):
    root = make_folder(tmp_path / "audio", {"a": 6, "b": 6})
    files = sorted(root.rglob("*.wav"))
    split_names = ["train", "train", "val", "test", "train", "validation"] * 2
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, ["path", "label", "split"],
              [[str(p.relative_to(tmp_path)), p.parent.name, s] for p, s in zip(files, split_names)])
    folder = get_dataset("folder")
    index = folder.scan(manifest)
    [split] = folder.splits(index)
    assert index.class_names == ["a", "b"]
    assert (len(split.train), len(split.valid), len(split.test)) == (6, 4, 2)

    write_csv(manifest, ["path", "label", "fold"],
              [[str(p), p.parent.name, i % 3 + 1] for i, p in enumerate(files)])  # absolute paths
    index = folder.scan(manifest)
    splits = folder.splits(index)
    assert [s.name for s in splits] == ["fold1", "fold2", "fold3"]
    assert fold_of(index, splits[0].valid) == {3} and fold_of(index, splits[0].train) == {2}

    write_csv(manifest, ["path", "label", "split"], [["audio/a/000.wav", "a", "holdout"]])
    with pytest.raises(DatasetLayoutError, match="'holdout'"):
        folder.scan(manifest)


def test_rotation_needs_enough_populated_folds(tmp_path):
    index = get_dataset("esc50").scan(make_esc50(tmp_path / "esc", classes=ESC50_CLASSES[:1]))
    with pytest.raises(ValueError, match="folds \\[6\\] hold no clips"):
        rotation_splits(index, [1, 2, 6])
    with pytest.raises(ValueError, match="at least 3 folds"):
        rotation_splits(index, [1, 2])
