"""The feature cache decodes in worker processes: same bytes, same order, same bad-file report."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from audio_fixtures import speech_like, write_audio
from audiopetl.data import FeatureCache
from audiopetl.data import cache as cache_module
from audiopetl.frontend import FbankConfig, as_frontend

CONFIG = FbankConfig(max_frames=40)


def test_worker_processes_write_the_same_features_in_order(tmp_path):
    rates = [16000, 44100, 22050, 8000, 48000, 16000, 22050, 44100, 16000]
    paths = [
        str(write_audio(tmp_path / f"clip{i}.wav", speech_like(0.1 + 0.05 * i, rate, seed=i), rate))
        for i, rate in enumerate(rates)
    ]
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not audio" * 20)
    sf.write(tmp_path / "silent.wav", np.zeros(800, dtype=np.float32), 16000)
    paths[2:2] = [str(tmp_path / "garbage.wav")]
    paths[6:6] = [str(tmp_path / "silent.wav"), str(tmp_path / "missing.wav")]

    outputs = {}
    for workers in (1, 3):
        buffer = io.BytesIO()
        bad = cache_module._compute(paths, as_frontend(CONFIG), buffer, progress=False, workers=workers)
        outputs[workers] = (buffer.getvalue(), bad)
    assert outputs[3] == outputs[1]
    data, bad = outputs[1]
    assert [index for index, _ in bad] == [2, 6, 7]
    assert "decode" in bad[0][1] and "silent" in bad[1][1] and "no such file" in bad[2][1]
    assert len(data) == 9 * 40 * 128 * 4
    single, _, _ = FeatureCache(tmp_path / "cache").features(paths[:2], CONFIG, progress=False)
    np.testing.assert_array_equal(np.frombuffer(data, np.float32)[: 2 * 40 * 128].reshape(2, 40, 128), single)


def test_worker_count_follows_files_and_cores():
    assert cache_module._decode_workers(0) == 1
    assert cache_module._decode_workers(cache_module.FILES_PER_WORKER - 1) == 1
    assert 1 <= cache_module._decode_workers(10_000) <= (__import__("os").cpu_count() or 1)
