"""Audio frontend: decoding files to 16 kHz mono waveforms and turning those into AST's
normalised Kaldi log-mel filterbank input."""

from .audio import SILENCE_PEAK, AudioError, check_waveform, load_audio
from .fbank import Fbank, FbankConfig, kaldi_fbank, mel_filterbank, num_frames

__all__ = [
    "SILENCE_PEAK",
    "AudioError",
    "Fbank",
    "FbankConfig",
    "check_waveform",
    "kaldi_fbank",
    "load_audio",
    "mel_filterbank",
    "num_frames",
]
