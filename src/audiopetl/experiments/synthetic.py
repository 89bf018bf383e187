"""A small labelled audio dataset made from scratch: distinct sound classes as real WAV files.

Used by ``audiopetl demo`` (so the first command works offline) and by the end-to-end
tests. Each class is a family of sounds with random pitch, timing, level and background
noise, so a model has to learn the class rather than memorise one waveform.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


def _low_tone(t, rng):
    return np.sin(2 * np.pi * rng.uniform(220, 360) * t)


def _high_tone(t, rng):
    return np.sin(2 * np.pi * rng.uniform(2600, 3400) * t)


def _chirp(t, rng):
    start, stop = rng.uniform(200, 500), rng.uniform(3000, 5000)
    phase = 2 * np.pi * (start * t + (stop - start) * t**2 / (2 * t[-1]))
    return np.sin(phase)


def _noise_bursts(t, rng):
    envelope = (np.sin(2 * np.pi * rng.uniform(3, 6) * t) > 0.3).astype(np.float64)
    return envelope * rng.standard_normal(len(t))


def _clicks(t, rng):
    signal = np.zeros(len(t))
    period = int(SAMPLE_RATE / rng.uniform(8, 14))
    signal[rng.integers(0, period) :: period] = 1.0
    return np.convolve(signal, np.hanning(48), mode="same")


def _vowel(t, rng):
    """Harmonic tone with formant-like weighting: a crude speech-like class."""
    f0 = rng.uniform(100, 180)
    harmonics = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 25) if k * f0 < 4000)
    return harmonics * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 4) * t))


CLASSES = {
    "low_tone": _low_tone,
    "high_tone": _high_tone,
    "chirp": _chirp,
    "noise_bursts": _noise_bursts,
    "clicks": _clicks,
    "vowel": _vowel,
}


def synth_clip(label: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One clip of class ``label``: the class sound at a random level over faint noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    sound = CLASSES[label](t, rng)
    sound = sound / (np.abs(sound).max() + 1e-9) * rng.uniform(0.2, 0.8)
    return (sound + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def make_synthetic_dataset(
    root: str | Path,
    clips_per_class: int = 20,
    seconds: float = 1.0,
    classes: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/<class>/<class>_NNN.wav`` (16 kHz, 16-bit) and return ``root``.

    The layout is the one the ``folder`` dataset reads: one sub-folder per class.
    """
    import soundfile as sf  # here, not at the top: synth_clip alone needs no audio I/O

    root = Path(root)
    rng = np.random.default_rng(seed)
    for label in classes or tuple(CLASSES):
        if label not in CLASSES:
            raise ValueError(f"unknown synthetic class {label!r}; valid: {sorted(CLASSES)}")
        (root / label).mkdir(parents=True, exist_ok=True)
        for number in range(clips_per_class):
            path = root / label / f"{label}_{number:03d}.wav"
            sf.write(path, synth_clip(label, seconds, rng), SAMPLE_RATE, subtype="PCM_16")
    return root
