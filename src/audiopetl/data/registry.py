"""The dataset names audiopetl knows, mapped to their readers."""

from __future__ import annotations

from .base import AudioDataset
from .esc50 import ESC50
from .folder import FolderDataset
from .fsc import FluentSpeechCommands
from .gsc import SpeechCommands
from .iemocap import IEMOCAP
from .us8k import UrbanSound8K

DATASETS: dict[str, type[AudioDataset]] = {
    cls.name: cls for cls in (ESC50, UrbanSound8K, SpeechCommands, FluentSpeechCommands, IEMOCAP, FolderDataset)
}


def get_dataset(name: str) -> AudioDataset:
    """A reader for dataset `name` (see `DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {list(DATASETS)}")
    return DATASETS[name]()
