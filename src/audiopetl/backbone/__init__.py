"""The AST backbone and its checkpoint loading."""

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

__all__ = [
    "AST",
    "ASTConfig",
    "Block",
    "CheckpointError",
    "LoadReport",
    "NUM_SPECIAL_TOKENS",
    "POOLINGS",
    "POS_EMBED_MODES",
    "PosEmbedMode",
    "SublayerTaps",
    "adapt_pos_embed",
    "backbone_fingerprint",
    "count_parameters",
    "fingerprint_state_dict",
    "load_backbone",
    "pool",
]
