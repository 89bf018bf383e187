"""Feature cache and bad audio: computed once and reused without decoding, invalidated by
a touched file or a changed setting, never trusted after an interrupted build; bad files
reported by path (stop or skip), plus `cache ls` / `cache clear` helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio_fixtures import noise, speech_like, tone, write_audio
from audiopetl.data import (
    BadAudioError,
    FeatureCache,
    FeatureDataset,
    clear_cache,
    default_cache_dir,
    list_cache_entries,
    write_bad_audio_report,
)
from audiopetl.data import cache as cache_module
from audiopetl.frontend import Fbank, FbankConfig, load_audio

CONFIG = FbankConfig(max_frames=40)


@pytest.fixture
def clips(tmp_path) -> list[str]:
    """Seven clips of different lengths, rates and formats (one longer than max_frames)."""
    specs = [(0.3, 16000), (0.5, 44100), (0.2, 22050), (0.45, 16000), (0.1, 8000), (0.6, 48000), (0.35, 16000)]
    return [
        str(write_audio(tmp_path / "audio" / f"clip{i}.wav", speech_like(seconds, rate, seed=i), rate))
        for i, (seconds, rate) in enumerate(specs)
    ]


@pytest.fixture
def decode_calls(monkeypatch) -> list[str]:
    """Every path the cache decodes."""
    calls: list[str] = []

    def counting_load(path, *args, **kwargs):
        calls.append(path)
        return load_audio(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "load_audio", counting_load)
    return calls


def test_features_match_the_frontend_clip_by_clip(tmp_path, clips):
    features, kept, bad = FeatureCache(tmp_path / "cache").features(clips, CONFIG, progress=False)
    assert isinstance(features, np.memmap) and features.dtype == np.float32
    assert features.shape == (7, 40, 128) and kept == list(range(7)) and bad == []
    fbank = Fbank(CONFIG)
    for row, path in enumerate(clips):
        alone = fbank(torch.from_numpy(load_audio(path))[None])[0].numpy()
        np.testing.assert_allclose(features[row], alone, atol=1e-4)


def test_second_run_decodes_nothing_and_matches(tmp_path, clips, decode_calls):
    first, _, _ = FeatureCache(tmp_path / "cache").features(clips, CONFIG, progress=False)
    first = np.array(first)
    assert len(decode_calls) == 7
    decode_calls.clear()
    again, kept, _ = FeatureCache(tmp_path / "cache").features(clips, CONFIG, progress=False)  # e.g. next method
    assert decode_calls == [] and kept == list(range(7))
    np.testing.assert_array_equal(first, again)


def test_changed_setting_or_touched_file_rebuilds(tmp_path, clips, decode_calls):
    cache = FeatureCache(tmp_path / "cache")
    base, _, _ = cache.features(clips, CONFIG, progress=False)
    base = np.array(base)
    decode_calls.clear()
    cache.features(clips, FbankConfig(max_frames=40, num_mel_bins=64), progress=False)
    assert len(decode_calls) == 7

    decode_calls.clear()
    write_audio(clips[2], tone(880, 0.2, 22050), 22050)  # new content
    stat = os.stat(clips[3])
    os.utime(clips[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched only
    rebuilt, _, _ = cache.features(clips, CONFIG, progress=False)
    assert len(decode_calls) == 7
    assert not np.array_equal(rebuilt[2], base[2])
    np.testing.assert_array_equal(rebuilt[3], base[3])
    assert len(list_cache_entries(tmp_path / "cache")) == 3


def test_interrupted_build_is_never_reused(tmp_path, clips, monkeypatch):
    calls = []

    def dying_load(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user pressing Ctrl-C halfway
        return load_audio(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "load_audio", dying_load)
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        cache.features(clips, CONFIG, progress=False)
    assert list((tmp_path / "cache" / "features").iterdir()) == []  # no temp file, no entry
    assert list_cache_entries(tmp_path / "cache") == []

    calls.clear()
    monkeypatch.setattr(cache_module, "load_audio", lambda p, *a, **k: calls.append(p) or load_audio(p, *a, **k))
    features, _, _ = cache.features(clips, CONFIG, progress=False)
    assert len(calls) == 7
    clean, _, _ = FeatureCache(tmp_path / "clean").features(clips, CONFIG, progress=False)
    np.testing.assert_array_equal(features, clean)


def test_data_without_manifest_or_truncated_is_not_trusted(tmp_path, clips, decode_calls):
    cache = FeatureCache(tmp_path / "cache")
    cache.features(clips, CONFIG, progress=False)
    key = cache.key([os.path.abspath(p) for p in clips], CONFIG)
    (cache.dir / f"{key}.json").unlink()  # a crash between renaming the data and writing the manifest
    decode_calls.clear()
    cache.features(clips, CONFIG, progress=False)
    assert len(decode_calls) == 7
    with open(cache.dir / f"{key}.f32", "r+b") as handle:  # a damaged data file
        handle.truncate(100)
    decode_calls.clear()
    features, _, _ = cache.features(clips, CONFIG, progress=False)
    assert len(decode_calls) == 7 and features.shape == (7, 40, 128)


def test_cache_dir_defaults_to_environment(tmp_path, monkeypatch, clips):
    monkeypatch.setenv("AUDIOPETL_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    FeatureCache().features(clips[:2], CONFIG, progress=False)
    assert len(list_cache_entries()) == 1
    monkeypatch.delenv("AUDIOPETL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "audiopetl"


def test_list_and_clear_entries(tmp_path, clips):
    cache_dir = tmp_path / "cache"
    assert list_cache_entries(cache_dir) == [] and clear_cache(cache_dir) == 0
    FeatureCache(cache_dir).features(clips, CONFIG, progress=False)
    FeatureCache(cache_dir).features(clips[:3], FbankConfig(max_frames=20), progress=False)
    entries = list_cache_entries(cache_dir)
    assert [(e.num_clips, e.frontend["max_frames"]) for e in entries] == [(7, 40), (3, 20)]
    assert entries[0].size_bytes == 7 * 40 * 128 * 4 and entries[0].source == str(Path(clips[0]).parent)
    assert str(tmp_path / "audio") in str(entries[0]) and "7 clips" in str(entries[0])
    (cache_dir / "features" / f"{entries[1].key}.123.tmp").write_bytes(b"leftover of a killed build")

    assert clear_cache(cache_dir, key=entries[0].key[:10]) == 1
    assert [e.key for e in list_cache_entries(cache_dir)] == [entries[1].key]
    with pytest.raises(ValueError, match="no cache entries match 'ffff"):
        clear_cache(cache_dir, key="ffff" + entries[1].key[4:])
    assert clear_cache(cache_dir) == 1
    assert list(os.scandir(cache_dir / "features")) == []


def test_feature_dataset_serves_rows_and_labels(tmp_path, clips):
    features, kept, _ = FeatureCache(tmp_path / "cache").features(clips, CONFIG, progress=False)
    labels = np.arange(7) % 3
    dataset = FeatureDataset(features, labels, [5, 1])
    assert len(dataset) == 2
    x, y = dataset[0]
    assert isinstance(x, torch.Tensor) and x.shape == (40, 128) and y == 2
    np.testing.assert_array_equal(x.numpy(), features[5])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch[0].shape == (2, 40, 128) and batch[1].tolist() == [2, 1]


# ---------------------------------------------------------------------------- bad audio
@pytest.fixture
def bad_files(tmp_path) -> dict[str, str]:
    """One file of each unusable kind -> the words its reason must contain."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "garbage.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        signal = noise(0.2, 16000)
        signal[100] = value
        sf.write(folder / name, signal, 16000, subtype="FLOAT")
    write_audio(folder / "silent.wav", np.zeros(3200, dtype=np.float32), 16000)
    return {
        str(folder / "garbage.wav"): "decode",
        str(folder / "empty.wav"): "no samples",
        str(folder / "nan.wav"): "NaN",
        str(folder / "inf.wav"): "infinite",
        str(folder / "silent.wav"): "silent",
        str(folder / "missing.wav"): "no such file",
    }


def test_bad_files_stop_the_run_listing_every_one(tmp_path, clips, bad_files, decode_calls):
    paths = clips[:3] + list(bad_files) + clips[3:]
    with pytest.raises(BadAudioError) as error:
        FeatureCache(tmp_path / "cache").features(paths, CONFIG, progress=False)
    assert len(decode_calls) == len(paths)  # every file was checked, not just up to the first bad one
    reported = dict(error.value.bad)
    assert sorted(reported) == sorted(bad_files)
    for path, words in bad_files.items():
        assert words in reported[path]
        assert path in str(error.value)
    assert "--skip-bad-audio" in str(error.value)
    decode_calls.clear()
    with pytest.raises(BadAudioError):  # reported again from the cache, without decoding
        FeatureCache(tmp_path / "cache").features(paths, CONFIG, progress=False)
    assert decode_calls == []


def test_bad_files_skipped_and_reported(tmp_path, clips, bad_files, decode_calls):
    paths = clips[:3] + list(bad_files) + clips[3:]
    features, kept, bad = FeatureCache(tmp_path / "cache").features(
        paths, CONFIG, skip_bad_audio=True, progress=False
    )
    assert kept == [0, 1, 2, 9, 10, 11, 12] and features.shape == (7, 40, 128)
    assert [p for p, _ in bad] == list(bad_files)
    good, _, _ = FeatureCache(tmp_path / "good").features(clips, CONFIG, progress=False)
    np.testing.assert_array_equal(features, good)
    report = write_bad_audio_report(tmp_path / "run" / "bad_audio.txt", bad).read_text()
    for path, words in bad_files.items():
        line = next(line for line in report.splitlines() if line.startswith(path + "\t"))
        assert words in line
    # All files bad: an empty feature array rather than a failure to memory-map nothing.
    features, kept, bad = FeatureCache(tmp_path / "cache").features(
        list(bad_files), CONFIG, skip_bad_audio=True, progress=False
    )
    assert features.shape == (0, 40, 128) and kept == [] and len(bad) == 6


def test_clear_removes_the_leftover_of_a_killed_build(tmp_path):
    from audiopetl.atomic import atomic_path
    from audiopetl.data import clear_cache

    cache_dir = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt), atomic_path(cache_dir / "features" / "abc123.f32") as temp:
        temp.write_bytes(b"half")
        leftover = temp.with_name(temp.name + "-copy")  # what a SIGKILL would leave behind
        leftover.write_bytes(b"half")
        raise KeyboardInterrupt
    assert [p.name for p in (cache_dir / "features").iterdir()] == [leftover.name]
    clear_cache(cache_dir)
    assert list((cache_dir / "features").iterdir()) == []
