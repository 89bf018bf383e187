"""Audio loading: any file soundfile can decode becomes a float32 mono waveform at the
requested sample rate, or an `AudioError` that says which file and why.

`check_waveform` holds the sanity checks so callers that obtain waveforms some other way
(e.g. the data layer's caches) reject exactly the same things.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# How a multi-channel file becomes mono: "mean" averages the channels (our default: no
# channel is privileged); "first" keeps channel 0, as the published UrbanSound8K reader did.
CHANNEL_POLICIES = ("mean", "first")


def channel_policy(settings: Mapping) -> str:
    """The channel policy a frontend's settings record: the filterbank's ``channels``; frontends
    without one (the speech encoders' waveform frontend) average the channels."""
    return settings.get("channels", "mean")


# Peak amplitude (full scale = 1.0) below which a clip counts as silent; far below the
# quietest non-zero 24-bit sample, so only digital silence trips it.
SILENCE_PEAK = 1e-8


class AudioError(ValueError):
    """An audio file that cannot be used; `.path` names it and `.reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot use audio file '{self.path}': {reason}")


def check_waveform(wave: np.ndarray, path: str | os.PathLike, allow_silent: bool = False) -> None:
    """Raise `AudioError` if `wave` is empty, holds NaN/Inf, or (unless allowed) is silent."""
    if wave.size == 0:
        raise AudioError(path, "it contains no samples")
    if not np.isfinite(wave).all():
        raise AudioError(path, "it contains NaN or infinite samples")
    if not allow_silent and float(np.abs(wave).max()) < SILENCE_PEAK:
        raise AudioError(path, "it is silent (all samples are zero)")


def load_audio(
    path: str | os.PathLike, sample_rate: int = 16000, allow_silent: bool = False, channels: str = "mean"
) -> np.ndarray:
    """Decode `path` to a float32 mono waveform at `sample_rate` Hz, scaled to [-1, 1].

    Channels are averaged (`channels="mean"`) or the first is kept (`"first"`); other sample
    rates are resampled with soxr's HQ filter.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if channels not in CHANNEL_POLICIES:
        raise ValueError(f"unknown channel policy {channels!r}; valid: {list(CHANNEL_POLICIES)}")
    if not Path(path).is_file():
        if Path(path).is_dir():
            raise AudioError(path, "it is a folder, not an audio file")
        if Path(path).is_symlink():
            raise AudioError(path, f"it is a broken symbolic link (to {os.readlink(path)!r}): no such file")
        raise AudioError(path, "no such file")
    try:
        data, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except RuntimeError as error:  # soundfile's decode errors all derive from RuntimeError
        raise AudioError(path, f"cannot decode it ({error})") from error
    wave = data[:, 0] if channels == "first" else data.mean(axis=1, dtype=np.float32)
    check_waveform(wave, path, allow_silent=allow_silent)
    if file_rate != sample_rate:
        wave = soxr.resample(wave, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)
