"""The AST backbone and its checkpoint loading."""

from .ast import AST, NUM_SPECIAL_TOKENS, POOLINGS, ASTConfig, Block, SublayerTaps, count_parameters, pool

__all__ = ["AST", "ASTConfig", "Block", "NUM_SPECIAL_TOKENS", "POOLINGS", "SublayerTaps", "count_parameters", "pool"]
