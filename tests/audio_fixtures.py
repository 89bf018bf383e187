"""Synthetic test audio: speech-like, noise and tone signals, written as real audio files.

Shared by every test module that needs audio on disk, so the helpers stay generic:
signals are float32 in [-1, 1], shaped (samples,) or (samples, channels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def write_audio(
    path: str | Path,
    signal: np.ndarray,
    sample_rate: int,
    subtype: str = "PCM_16",
    channels: int = 1,
    format: str | None = None,
) -> Path:
    """Write `signal` to `path` and return the path.

    A 1-D signal is copied to `channels` channels, each scaled slightly differently so a
    wrong channel mix shows up; a 2-D (samples, channels) signal is written as given.
    The container comes from the suffix (.wav, .flac, .ogg) unless `format` is given.
    """
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim == 1 and channels > 1:
        gains = np.linspace(1.0, 0.5, channels, dtype=np.float32)
        signal = signal[:, None] * gains
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, signal, sample_rate, subtype=subtype, format=format)
    return path


def tone(freq: float, seconds: float, sr: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    """A pure sine."""
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, sr: int = 16000, seed: int = 0, amplitude: float = 0.1) -> np.ndarray:
    """White Gaussian noise with standard deviation `amplitude`, clipped to [-1, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(amplitude * rng.standard_normal(int(seconds * sr)), -1, 1).astype(np.float32)


def speech_like(seconds: float, sr: int = 16000, seed: int = 0, amplitude: float = 0.5) -> np.ndarray:
    """Voiced syllables with formants, gliding pitch, fricative bursts and short pauses.

    Harmonics of a wandering 90-220 Hz pitch are weighted by three formant bumps, then
    gated by a ~4 Hz syllable envelope; high-passed noise stands in for fricatives.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 150 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)) + 10 * rng.standard_normal()
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = rng.uniform([500, 1200, 2400], [800, 2000, 3200])
    top = min(5000.0, 0.45 * sr)
    voiced = np.zeros(n)
    for k in range(1, int(top / f0.min()) + 1):
        harmonic_hz = k * f0
        weight = sum(np.exp(-0.5 * ((harmonic_hz - f) / 150.0) ** 2) for f in formants) + 0.05
        voiced += np.where(harmonic_hz < top, weight / k**0.5, 0.0) * np.sin(k * phase)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 2 * np.pi)), 0, None) ** 2
    hiss = np.diff(rng.standard_normal(n + 1)) * (syllables < 0.05) * (np.sin(2 * np.pi * 1.3 * t) > 0.3)
    signal = voiced * syllables + 0.3 * hiss + 1e-3 * rng.standard_normal(n)
    return (amplitude * signal / np.abs(signal).max()).astype(np.float32)
