"""Backbones: AST and the speech encoders (wav2vec 2.0, HuBERT, WavLM), one module per
family with the same named extension points, the family registry, and checkpoint loading."""

from .ast import AST, NUM_SPECIAL_TOKENS, POOLINGS, ASTConfig, Block, SublayerTaps, count_parameters, pool
from .checkpoint import (
    POS_EMBED_MODES,
    CheckpointError,
    LoadReport,
    PosEmbedMode,
    adapt_pos_embed,
    backbone_fingerprint,
    fingerprint_state_dict,
    load_backbone,
)
from .registry import FAMILIES, build_backbone, fingerprint, preset_names
from .wav2vec2 import SpeechConfig, Wav2Vec2

__all__ = [
    "AST",
    "ASTConfig",
    "Block",
    "CheckpointError",
    "FAMILIES",
    "LoadReport",
    "NUM_SPECIAL_TOKENS",
    "POOLINGS",
    "POS_EMBED_MODES",
    "PosEmbedMode",
    "SpeechConfig",
    "SublayerTaps",
    "Wav2Vec2",
    "adapt_pos_embed",
    "backbone_fingerprint",
    "build_backbone",
    "count_parameters",
    "fingerprint",
    "fingerprint_state_dict",
    "load_backbone",
    "pool",
    "preset_names",
]
