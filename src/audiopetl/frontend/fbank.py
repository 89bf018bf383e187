"""Kaldi-compatible log-mel filterbank features, batched in PyTorch, as AST expects them.

`kaldi_fbank` reproduces `torchaudio.compliance.kaldi.fbank` with the settings AST uses
(and the numpy fallback of transformers' `ASTFeatureExtractor`): snip-edges framing,
per-frame DC removal, pre-emphasis, symmetric Hann window, power spectrum, Kaldi mel
filters, natural log floored at float32 eps, no dither. Waveforms stay in [-1, 1]:
AST's AudioSet mean/std were computed on unscaled audio, not on 16-bit integer values.

`Fbank` turns that into the model input: pad with zero frames or truncate to
`max_frames`, then normalise with (x - mean) / (2 * std).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dataclass_dict import from_dict
from .audio import CHANNEL_POLICIES


@dataclass(frozen=True)
class FbankConfig:
    """Frontend settings; stored with every adapter so inference rebuilds the same features."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    max_frames: int = 1024
    mean: float = -4.2677393
    std: float = 4.5689974
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 is an offset from Nyquist, as in Kaldi; 0 means Nyquist
    preemphasis: float = 0.97
    channels: str = "mean"  # multi-channel files: see audio.CHANNEL_POLICIES

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_POLICIES:
            raise ValueError(f"FbankConfig.channels must be one of {list(CHANNEL_POLICIES)}, got {self.channels!r}")
        for name in ("sample_rate", "num_mel_bins", "max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"FbankConfig.{name} must be a positive integer, got {value!r}")
        for name in ("frame_length_ms", "frame_shift_ms", "std"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"FbankConfig.{name} must be a positive number, got {value!r}")
        for name in ("mean", "low_freq", "high_freq", "preemphasis"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"FbankConfig.{name} must be a finite number, got {getattr(self, name)!r}")
        if self.window_size < 2:
            raise ValueError(f"FbankConfig.frame_length_ms={self.frame_length_ms} gives fewer than 2 samples per frame")
        if self.window_shift < 1:
            raise ValueError(f"FbankConfig.frame_shift_ms={self.frame_shift_ms} gives less than 1 sample of shift")
        if not 0.0 <= self.preemphasis <= 1.0:
            raise ValueError(f"FbankConfig.preemphasis must be in [0, 1], got {self.preemphasis}")
        nyquist = self.sample_rate / 2
        if not 0.0 <= self.low_freq < nyquist:
            raise ValueError(f"FbankConfig.low_freq must be in [0, {nyquist}), got {self.low_freq}")
        if not self.low_freq < self.top_freq <= nyquist:
            raise ValueError(
                f"FbankConfig.high_freq={self.high_freq} gives an upper edge of {self.top_freq} Hz; "
                f"it must lie above low_freq={self.low_freq} and at most at Nyquist ({nyquist} Hz)"
            )

    @property
    def window_size(self) -> int:
        """Samples per frame (truncated, as Kaldi does)."""
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def window_shift(self) -> int:
        """Samples between frame starts."""
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def fft_size(self) -> int:
        """FFT length: the frame rounded up to a power of two."""
        return 1 << (self.window_size - 1).bit_length()

    @property
    def top_freq(self) -> float:
        """Upper edge of the mel filters in Hz, with Kaldi's "<= 0 counts from Nyquist" rule applied."""
        return self.high_freq if self.high_freq > 0 else self.sample_rate / 2 + self.high_freq

    @property
    def max_samples(self) -> int:
        """Samples that can reach the first `max_frames` frames; anything later is cut anyway."""
        return (self.max_frames - 1) * self.window_shift + self.window_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> FbankConfig:
        return from_dict(cls, data)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def num_frames(num_samples: int, config: FbankConfig = FbankConfig()) -> int:
    """Frames Kaldi's snip-edges framing yields for `num_samples` (0 if shorter than one frame)."""
    if num_samples < config.window_size:
        return 0
    return 1 + (num_samples - config.window_size) // config.window_shift


def mel_filterbank(config: FbankConfig = FbankConfig()) -> Tensor:
    """Kaldi mel filters as a float64 (fft_size // 2 + 1, num_mel_bins) matrix.

    The triangles are linear in mel, not in Hz, which is what distinguishes Kaldi's bank
    from HTK/librosa ones. The Nyquist row is zero, as in torchaudio.
    """

    def mel(hz: Tensor | float) -> Tensor:
        return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)

    low, high = float(mel(config.low_freq)), float(mel(config.top_freq))
    edges = torch.linspace(low, high, config.num_mel_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    bin_hz = torch.arange(config.fft_size // 2 + 1, dtype=torch.float64) * config.sample_rate / config.fft_size
    bin_mel = mel(bin_hz)[:, None]
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    return torch.minimum(rising, falling).clamp_min(0.0)


def _frame_counts(lengths: Tensor, config: FbankConfig) -> Tensor:
    full = lengths >= config.window_size
    counts = 1 + torch.div(lengths - config.window_size, config.window_shift, rounding_mode="floor")
    return torch.where(full, counts, torch.zeros_like(counts))


class Fbank(nn.Module):
    """AST input features for a batch of 1-D waveforms, with window and mel matrix built once.

    `forward(waveforms (B, T), lengths=None) -> (B, max_frames, num_mel_bins)` float32.
    With `lengths`, a zero-padded batch gives each clip exactly what it would give alone.
    """

    def __init__(self, config: FbankConfig = FbankConfig()):
        super().__init__()
        self.config = config
        # Non-persistent: both are derived from `config`, so they don't belong in state dicts.
        window = torch.hann_window(config.window_size, periodic=False, dtype=torch.float64)
        if window[0] != 0:
            raise ValueError("Fbank assumes a window that is zero at its first sample (Hann, as Kaldi's 'hanning')")
        self.register_buffer("window", window.float(), persistent=False)
        self.register_buffer("mel_pairs", mel_filterbank(config).float().repeat_interleave(2, dim=0), persistent=False)

    spectrogram = True  # rows are a (time, mel) plane: SpecAugment applies

    @property
    def settings(self) -> dict:
        """What identifies the computation (cache key, adapter metadata): the config."""
        return self.config.to_dict()

    @property
    def feature_shape(self) -> tuple[int, int]:
        return self.config.max_frames, self.config.num_mel_bins

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def max_samples(self) -> int:
        return self.config.max_samples

    def log_mel(self, waveforms: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Raw Kaldi log-mel, (B, num_frames(T), num_mel_bins); frames past a clip's length are 0."""
        cfg = self.config
        waves = _as_batch(waveforms).to(self.window.device, torch.float32)
        batch, samples = waves.shape
        if samples < cfg.window_size:
            return waves.new_zeros(batch, 0, cfg.num_mel_bins)
        # Kaldi removes each frame's mean m, then pre-emphasises within the frame, then
        # windows. Pre-emphasis after mean removal is (x[i] - k x[i-1]) - (1 - k) m, so we
        # pre-emphasise the whole waveform once and frame it once. Kaldi's special case for
        # a frame's first sample needs no handling: the window is zero there.
        emphasised = torch.cat([waves[:, :1], waves[:, 1:] - cfg.preemphasis * waves[:, :-1]], dim=1)
        means = F.avg_pool1d(waves[:, None], cfg.window_size, cfg.window_shift)[:, 0]
        frames = emphasised.unfold(-1, cfg.window_size, cfg.window_shift) - (1.0 - cfg.preemphasis) * means[..., None]
        spectrum = torch.fft.rfft(frames * self.window, n=cfg.fft_size)
        # |X|^2 @ mel as one matmul: squared (re, im) pairs against the mel rows repeated twice.
        squared_parts = torch.view_as_real(spectrum).square_().flatten(-2)
        eps = torch.finfo(torch.float32).eps
        features = (squared_parts @ self.mel_pairs).clamp_min(eps).log()
        if lengths is None:
            return features
        counts = _frame_counts(_check_lengths(lengths, batch, samples, waves.device), cfg)
        keep = torch.arange(features.shape[1], device=waves.device) < counts[:, None]
        return features * keep[..., None]

    def forward(self, waveforms: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        cfg = self.config
        waves = _as_batch(waveforms)[:, : cfg.max_samples]
        if lengths is not None:
            lengths = _check_lengths(lengths, waves.shape[0], waveforms.shape[-1], waves.device)
            lengths = lengths.clamp(max=waves.shape[1])
        features = self.log_mel(waves, lengths)
        features = F.pad(features, (0, 0, 0, cfg.max_frames - features.shape[1]))
        return (features - cfg.mean) / (2 * cfg.std)


def kaldi_fbank(
    waveforms: Tensor, config: FbankConfig = FbankConfig(), lengths: Tensor | Sequence[int] | None = None
) -> Tensor:
    """One-off raw Kaldi log-mel (no padding or normalisation); see `Fbank.log_mel`.

    Builds the filters on each call; keep an `Fbank` module around for repeated use.
    """
    return Fbank(config).to(waveforms.device).log_mel(waveforms, lengths)


def _as_batch(waveforms: Tensor) -> Tensor:
    if not isinstance(waveforms, Tensor) or waveforms.ndim != 2:
        shape = tuple(waveforms.shape) if isinstance(waveforms, Tensor) else type(waveforms).__name__
        raise ValueError(f"expected waveforms as a (batch, samples) tensor, got {shape}")
    if waveforms.is_complex() or not waveforms.is_floating_point():
        raise ValueError(f"expected real floating-point waveforms, got {waveforms.dtype}")
    return waveforms


def _check_lengths(lengths, batch: int, samples: int, device: torch.device) -> Tensor:
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be {batch} integers, one per clip, got {lengths}")
    if bool(((lengths < 0) | (lengths > samples)).any()):
        raise ValueError(f"lengths must lie in [0, {samples}], got {lengths.tolist()}")
    return lengths.long()
