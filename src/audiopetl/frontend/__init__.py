"""Audio frontends: decoding files to 16 kHz mono waveforms, and turning those into a
backbone's input: AST's normalised Kaldi log-mel filterbanks (:mod:`.fbank`), or the frozen
convolutional feature encoder of the speech encoders (:mod:`.waveform`).

Every frontend is a :class:`Frontend`: what the feature cache needs to key, store and
compute a clip's rows, and what an adapter file records to rebuild it.
"""

from typing import Protocol

from torch import Tensor

from .audio import SILENCE_PEAK, AudioError, channel_policy, check_waveform, load_audio
from .fbank import Fbank, FbankConfig, kaldi_fbank, mel_filterbank, num_frames
from .waveform import WaveformConfig, WaveformFrontend


class Frontend(Protocol):
    """``settings``: a JSON dict identifying the computation (the cache key, adapter metadata);
    ``feature_shape``: one clip's output shape; ``sample_rate`` / ``max_samples``: the audio
    it reads (later samples never matter); ``spectrogram``: whether SpecAugment applies;
    calling it maps (batch, samples) waveforms and their lengths to (batch, *feature_shape).
    A frontend computed by a neural network also has ``device_type`` (``"cpu"``/``"cuda"``,
    where it runs), which the feature cache keys on."""

    settings: dict
    feature_shape: tuple[int, ...]
    sample_rate: int
    max_samples: int
    spectrogram: bool

    def __call__(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor: ...


def frontend_from_settings(settings: dict, backbone) -> Frontend:
    """Rebuild the frontend an adapter file records (``metadata["frontend"]``) for ``backbone``.

    Filterbank settings are the :class:`FbankConfig` itself; a waveform frontend is the
    backbone's feature encoder, refused if its weights differ from those the file names.
    """
    if settings.get("kind") != "waveform":
        return Fbank(FbankConfig.from_dict(settings))
    frontend = backbone.frontend(settings["max_frames"], normalize=settings["normalize"])
    if frontend.settings != settings:
        raise ValueError(f"the backbone's waveform frontend {frontend.settings} differs from the recorded {settings}")
    return frontend


def as_frontend(frontend: "Frontend | FbankConfig") -> Frontend:
    """A frontend from itself or from a bare :class:`FbankConfig` (the filterbank frontend)."""
    return Fbank(frontend) if isinstance(frontend, FbankConfig) else frontend


__all__ = [
    "SILENCE_PEAK",
    "AudioError",
    "Fbank",
    "FbankConfig",
    "Frontend",
    "WaveformConfig",
    "WaveformFrontend",
    "as_frontend",
    "frontend_from_settings",
    "channel_policy",
    "check_waveform",
    "kaldi_fbank",
    "load_audio",
    "mel_filterbank",
    "num_frames",
]
