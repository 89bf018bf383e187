"""audiopetl: parameter-efficient transfer learning of Audio Spectrogram Transformers."""

__version__ = "0.1.0"
