"""Datasets and everything between audio files and training batches: the four paper
benchmarks, IEMOCAP and your own data, their evaluation protocols, few-shot subsets, SpecAugment,
the feature cache, bad-audio handling and dataset downloads."""

from .augment import SpecAugment
from .base import AudioDataset, Clip, DatasetDefaults, DatasetIndex, DatasetLayoutError, Split
from .cache import (
    BadAudioError,
    CacheEntry,
    FeatureCache,
    FeatureDataset,
    IndexedFeatures,
    clear_cache,
    default_cache_dir,
    index_features,
    list_cache_entries,
    list_old_heartbeats,
    list_temporaries,
    write_bad_audio_report,
)
from .download import DownloadError, Source, download_dataset, download_file, extract
from .esc50 import ESC50
from .fewshot import few_shot_subset
from .folder import FolderDataset
from .fsc import FluentSpeechCommands
from .gsc import SpeechCommands
from .iemocap import IEMOCAP
from .protocols import given_split, rotation_splits, stratified_split
from .registry import DATASETS, get_dataset
from .us8k import UrbanSound8K

__all__ = [
    "DATASETS",
    "ESC50",
    "AudioDataset",
    "BadAudioError",
    "CacheEntry",
    "Clip",
    "DatasetDefaults",
    "DatasetIndex",
    "DatasetLayoutError",
    "DownloadError",
    "FeatureCache",
    "FeatureDataset",
    "FluentSpeechCommands",
    "FolderDataset",
    "IEMOCAP",
    "IndexedFeatures",
    "Source",
    "SpecAugment",
    "SpeechCommands",
    "Split",
    "UrbanSound8K",
    "clear_cache",
    "default_cache_dir",
    "download_dataset",
    "download_file",
    "extract",
    "few_shot_subset",
    "get_dataset",
    "given_split",
    "index_features",
    "list_cache_entries",
    "list_old_heartbeats",
    "list_temporaries",
    "rotation_splits",
    "stratified_split",
    "write_bad_audio_report",
]
