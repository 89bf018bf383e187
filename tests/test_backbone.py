"""Our AST computes what transformers' ASTModel computes, given the same weights."""

from __future__ import annotations

import pytest
import torch

from audiopetl.backbone import AST
from audiopetl.backbone.checkpoint import config_from_transformers, convert_state_dict
from checkpoint_fixtures import features, hf_hidden, random_hf_model, tiny_ast_config, vit_b_config

CONFIGS = {"tiny": tiny_ast_config, "vit_b": vit_b_config}


def ours_from_hf(hf_model) -> AST:
    state, ignored, fmt = convert_state_dict(hf_model.state_dict())
    assert (ignored, fmt) == ([], "transformers")
    model = AST(config_from_transformers(hf_model.config.to_dict()))
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize(
    "size, frames, attn, overrides",
    [
        ("tiny", 100, "eager", {}),
        ("tiny", 400, "sdpa", {}),
        ("tiny", 1024, "sdpa", {"layer_norm_eps": 1e-6}),
        ("tiny", 128, "eager", {"qkv_bias": False, "num_mel_bins": 64, "time_stride": 16, "frequency_stride": 12}),
        ("vit_b", 100, "sdpa", {}),
        pytest.param("vit_b", 1024, "eager", {}, marks=pytest.mark.slow),
    ],
)
def test_hidden_states_match_transformers(size, frames, attn, overrides):
    hf = random_hf_model(CONFIGS[size](max_length=frames, **overrides), attn_implementation=attn)
    assert hf.config._attn_implementation == attn
    ours = ours_from_hf(hf)
    x = features(2, frames, hf.config.num_mel_bins)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_hidden(hf, x), atol=1e-4, rtol=0)
