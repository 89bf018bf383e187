"""The waveform frontend of the speech encoders (wav2vec 2.0, HuBERT, WavLM): their frozen
convolutional feature encoder, run once per clip so the feature cache can keep its output.

Rule for clips of different lengths (``WaveformConfig``): every clip is cut or zero-padded
to ``max_frames`` 10-ms steps (``max_frames * 160`` samples at 16 kHz) and, with
``normalize``, first scaled to zero mean and unit variance over its own samples (the
feature extractors' ``do_normalize``). Models with a LayerNorm feature encoder (the
"stable layer norm" checkpoints: wav2vec 2.0 large-lv60, HuBERT and WavLM large) get a padding mask (``attention_mask=True``): attention
and mean pooling skip the padding frames. The group-normed base models were trained
without one and see the padded clip as it is (the mask column is all ones), as
transformers' docs prescribe for them and the published PETL code feeds them.

Output rows are ``(frames, conv_dim + 1)``: the feature encoder's output and, in the last
column, 1 for frames the model should use and 0 for padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..dataclass_dict import from_dict
from ..integrity import digest_tensors

KIND = "waveform"
CHUNK = 4  # clips per feature-encoder call: its first layer's output is 512 x 50*320 floats per 10 s clip


@dataclass(frozen=True)
class WaveformConfig:
    """Settings of a :class:`WaveformFrontend`; stored with adapters and in the cache key."""

    max_frames: int = 1024  # clip length in 10-ms steps, as for the filterbank frontend
    sample_rate: int = 16000
    normalize: bool = True
    attention_mask: bool = False

    def __post_init__(self) -> None:
        for name in ("max_frames", "sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"WaveformConfig.{name} must be a positive integer, got {value!r}")

    @property
    def max_samples(self) -> int:
        return self.max_frames * self.sample_rate // 100

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> "WaveformConfig":
        return from_dict(cls, values)


class WaveformFrontend(nn.Module):
    """Waveforms (batch, samples) -> (batch, frames, conv_dim + 1) float32 on the CPU.

    ``encoder`` is the backbone's own feature encoder (shared, not copied);
    ``num_frames`` maps sample counts to its frame counts; ``encoder_width``: its output channels per frame.
    """

    spectrogram = False  # rows are not a (time, mel) plane: SpecAugment does not apply

    def __init__(self, config: WaveformConfig, encoder: nn.Module, num_frames: Callable, encoder_width: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.num_frames = num_frames
        self.frames = int(num_frames(config.max_samples))
        if self.frames < 1:
            raise ValueError(f"max_frames={config.max_frames} is too short for the feature encoder")
        self.encoder_width = encoder_width  # feature channels per frame; not the audio channel policy
        self.encoder_digest = digest_tensors(encoder.state_dict())

    @property
    def settings(self) -> dict:
        """What identifies the computation: the config, the kind, and the encoder weights' digest."""
        return {"kind": KIND, **self.config.to_dict(), "encoder": self.encoder_digest}

    @property
    def device_type(self) -> str:
        """Where the encoder runs (``"cpu"``, ``"cuda"``): the feature cache keys on it, since
        GPU and CPU convolutions differ in the last bits. Not in ``settings``, which adapter
        files record: an adapter trained on one device loads on any."""
        return next(self.encoder.parameters()).device.type

    @property
    def feature_shape(self) -> tuple[int, int]:
        return self.frames, self.encoder_width + 1

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def max_samples(self) -> int:
        return self.config.max_samples

    @torch.no_grad()
    def forward(self, waves: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        if waves.ndim != 2 or not waves.is_floating_point():
            raise ValueError(f"expected real waveforms as a (batch, samples) tensor, got {tuple(waves.shape)}")
        device = next(self.encoder.parameters()).device
        total = self.config.max_samples
        waves = waves[:, :total].to(device, torch.float32)
        batch, samples = waves.shape
        lengths = torch.full((batch,), samples) if lengths is None else torch.as_tensor(lengths).long()
        lengths = lengths.clamp(max=samples).to(device)
        valid = torch.arange(samples, device=device) < lengths[:, None]
        if self.config.normalize:
            count = lengths.clamp(min=1)[:, None]
            mean = (waves * valid).sum(1, keepdim=True) / count
            var = ((waves - mean) ** 2 * valid).sum(1, keepdim=True) / count
            waves = (waves - mean) / torch.sqrt(var + 1e-7)
        waves = torch.nn.functional.pad(waves * valid, (0, total - samples))
        features = torch.cat([self.encoder(chunk) for chunk in waves.split(CHUNK)])
        if self.config.attention_mask:
            frames = self.num_frames(lengths).clamp(min=0)
            column = torch.arange(self.frames, device=device) < frames[:, None]
        else:
            column = torch.ones(batch, self.frames, dtype=torch.bool, device=device)
        return torch.cat([features, column[..., None].to(features.dtype)], dim=-1).cpu()


__all__ = ["KIND", "WaveformConfig", "WaveformFrontend"]
