"""Frontend tests: audio decoding/validation and Kaldi fbank parity with transformers' AST extractor."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from audio_fixtures import noise, speech_like, tone, write_audio
from audiopetl.frontend import (
    AudioError,
    Fbank,
    FbankConfig,
    check_waveform,
    kaldi_fbank,
    load_audio,
    mel_filterbank,
    num_frames,
)

SIGNALS = {"speech": speech_like, "noise": noise}


def hf_features(wave: np.ndarray, max_length: int, config: FbankConfig) -> np.ndarray:
    from transformers import ASTFeatureExtractor
    from transformers.utils import is_speech_available

    # Parity is against the numpy path; with torchaudio present HF would use that instead.
    assert not is_speech_available()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF warns that the lowest Kaldi filters catch no FFT bin
        extractor = ASTFeatureExtractor(max_length=max_length, do_normalize=True, mean=config.mean, std=config.std)
    assert hasattr(extractor, "mel_filters")
    return extractor(wave, sampling_rate=16000, return_tensors="np")["input_values"][0]


@pytest.mark.parametrize("kind", sorted(SIGNALS))
@pytest.mark.parametrize("file_rate,channels", [(44100, 2), (8000, 1), (16000, 1)])
@pytest.mark.parametrize("seconds,max_frames", [(1.0, 256), (4.0, 128)], ids=["padded", "truncated"])
def test_matches_transformers_ast_extractor(tmp_path, kind, file_rate, channels, seconds, max_frames):
    path = write_audio(tmp_path / "clip.wav", SIGNALS[kind](seconds, file_rate, seed=3), file_rate, channels=channels)
    wave = load_audio(path)
    config = FbankConfig(max_frames=max_frames)
    expected = hf_features(wave, max_frames, config)
    ours = Fbank(config)(torch.from_numpy(wave)[None])[0].numpy()
    assert ours.shape == expected.shape == (max_frames, 128)
    assert np.abs(ours - expected).max() < 1e-3


def test_matches_transformers_with_digital_silence_and_tone():
    # Exact zeros hit the log floor; a pure tone leaves most mel bins nearly empty.
    wave = np.concatenate([tone(440, 0.5), np.zeros(4000, np.float32), noise(0.5, seed=1)])
    config = FbankConfig(max_frames=200)
    expected = hf_features(wave, 200, config)
    ours = Fbank(config)(torch.from_numpy(wave)[None])[0].numpy()
    assert np.abs(ours - expected).max() < 1e-3


def test_mel_filterbank_matches_transformers():
    from transformers.audio_utils import mel_filter_bank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = mel_filter_bank(257, 128, 20, 8000, 16000, mel_scale="kaldi", triangularize_in_mel_space=True)
    np.testing.assert_allclose(mel_filterbank(FbankConfig()).numpy(), expected, atol=1e-10)


def test_batched_lengths_match_per_clip():
    config = FbankConfig(max_frames=300)
    fbank = Fbank(config)
    sizes = [16000 * 2, 5000, 300, 400, 560, 16000 * 4]  # incl. shorter than a frame and beyond max_frames
    clips = [torch.from_numpy(speech_like(n / 16000, seed=i)) for i, n in enumerate(sizes)]
    # Non-zero padding proves that nothing past a clip's length leaks into its features.
    padded = torch.randn(len(clips), max(sizes))
    for row, clip in zip(padded, clips):
        row[: len(clip)] = clip
    batched = fbank(padded, lengths=torch.tensor(sizes))
    assert batched.shape == (len(sizes), 300, 128)
    for clip, features in zip(clips, batched):
        torch.testing.assert_close(features, fbank(clip[None])[0], atol=1e-5, rtol=0)
    assert torch.equal(fbank(padded, lengths=sizes), batched)


def test_raw_fbank_shape_and_padding_value():
    config = FbankConfig(max_frames=100)
    wave = torch.from_numpy(noise(0.5, seed=2))[None]
    raw = kaldi_fbank(wave, config)
    assert raw.shape == (1, num_frames(8000, config), 128) == (1, 48, 128)
    features = Fbank(config)(wave)
    torch.testing.assert_close(features[:, :48], (raw - config.mean) / (2 * config.std))
    # Padded frames are zeros before normalisation, as in the AST extractor.
    assert torch.allclose(features[:, 48:], torch.tensor(-config.mean / (2 * config.std)))


def test_num_frames_snip_edges():
    assert [num_frames(n) for n in (0, 399, 400, 559, 560, 16000)] == [0, 0, 1, 1, 2, 98]


def test_fbank_rejects_bad_inputs():
    fbank = Fbank(FbankConfig(max_frames=10))
    with pytest.raises(ValueError, match="batch, samples"):
        fbank(torch.zeros(1600))
    with pytest.raises(ValueError, match="floating-point"):
        fbank(torch.zeros(1, 1600, dtype=torch.int16))
    with pytest.raises(ValueError, match="lengths"):
        fbank(torch.zeros(2, 1600), lengths=[1600])
    with pytest.raises(ValueError, match="lengths"):
        fbank(torch.zeros(2, 1600), lengths=[1600, 1601])


@pytest.mark.parametrize(
    "subtype,suffix,tolerance",
    [
        ("PCM_U8", ".wav", 1e-2),
        ("PCM_16", ".wav", 1e-4),
        ("PCM_24", ".wav", 1e-6),
        ("PCM_32", ".wav", 1e-6),
        ("FLOAT", ".wav", 0.0),
        ("DOUBLE", ".wav", 1e-7),
        ("PCM_16", ".flac", 1e-4),
        ("PCM_24", ".flac", 1e-6),
    ],
)
def test_load_audio_formats(tmp_path, subtype, suffix, tolerance):
    signal = speech_like(0.5, 16000, seed=4)
    path = write_audio(tmp_path / f"clip{suffix}", signal, 16000, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.shape == signal.shape
    assert np.abs(wave - signal).max() <= tolerance


@pytest.mark.skipif("VORBIS" not in sf.available_subtypes("OGG"), reason="libsndfile built without Vorbis")
def test_load_audio_ogg_vorbis(tmp_path):
    signal = tone(440, 1.0, 16000)
    wave = load_audio(write_audio(tmp_path / "clip.ogg", signal, 16000, subtype="VORBIS"))
    assert wave.dtype == np.float32 and abs(len(wave) - len(signal)) <= 16
    n = min(len(wave), len(signal))
    assert np.corrcoef(wave[:n], signal[:n])[0, 1] > 0.99


def test_load_audio_mixes_channels_by_averaging(tmp_path):
    left, right = tone(300, 0.5), noise(0.5, seed=5)
    path = write_audio(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("file_rate", [8000, 22050, 44100, 48000])
def test_load_audio_resamples(tmp_path, file_rate):
    path = write_audio(tmp_path / "tone.wav", tone(1000, 2.0, file_rate), file_rate, channels=2)
    wave = load_audio(path, sample_rate=16000)
    assert wave.dtype == np.float32 and len(wave) == 32000
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.argmax(spectrum) * 16000 / len(wave) == pytest.approx(1000, abs=1)


def _bad_files(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 10)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    nan = write_audio(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 100), 16000, subtype="FLOAT")
    inf = write_audio(tmp_path / "inf.wav", np.array([0.1, np.inf, 0.2] * 100), 16000, subtype="FLOAT")
    silent = write_audio(tmp_path / "silent.wav", np.zeros(1600), 16000)
    return {
        "missing": (tmp_path / "missing.wav", "no such file"),
        "garbage": (garbage, "cannot decode"),
        "empty": (empty, "no samples"),
        "nan": (nan, "NaN"),
        "inf": (inf, "infinite"),
        "silent": (silent, "silent"),
    }


@pytest.mark.parametrize("kind", ["missing", "garbage", "empty", "nan", "inf", "silent"])
def test_load_audio_rejects_bad_files(tmp_path, kind):
    path, reason = _bad_files(tmp_path)[kind]
    with pytest.raises(AudioError, match=reason) as caught:
        load_audio(path)
    assert caught.value.path == str(path)
    assert f"cannot use audio file '{path}'" in str(caught.value)
    assert isinstance(caught.value, ValueError) and reason in caught.value.reason


def test_silence_allowed_on_request(tmp_path):
    path = write_audio(tmp_path / "silent.wav", np.zeros(1600), 16000)
    assert not load_audio(path, allow_silent=True).any()
    check_waveform(np.zeros(10, np.float32), "x.wav", allow_silent=True)
    with pytest.raises(AudioError, match="no samples"):
        check_waveform(np.zeros(0, np.float32), "x.wav", allow_silent=True)


@pytest.mark.parametrize(
    "field,value",
    [
        ("sample_rate", 0),
        ("sample_rate", 16000.0),
        ("num_mel_bins", -1),
        ("max_frames", 0),
        ("frame_length_ms", 0.0),
        ("frame_shift_ms", -10.0),
        ("std", 0.0),
        ("mean", float("nan")),
        ("low_freq", -1.0),
        ("high_freq", 9000.0),
        ("high_freq", -7990.0),
        ("preemphasis", 1.5),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FbankConfig(**{field: value})


def test_config_dict_round_trip():
    config = FbankConfig(max_frames=512, num_mel_bins=64, high_freq=-400.0)
    stored = json.loads(json.dumps(config.to_dict()))
    assert FbankConfig.from_dict(stored) == config
    assert FbankConfig.from_dict({}) == FbankConfig()
    with pytest.raises(ValueError, match="unknown FbankConfig keys \\['n_fft'\\].*max_frames"):
        FbankConfig.from_dict({"n_fft": 512})
