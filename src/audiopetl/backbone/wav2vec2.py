"""Self-supervised speech encoders: wav2vec 2.0, HuBERT and WavLM, in one readable file.

The three share one architecture (Baevski et al. 2020; Hsu et al. 2021; Chen et al. 2022),
with the same maths as transformers' ``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel``:

* a convolutional feature encoder turns a 16 kHz waveform into one 512-dim vector per
  20 ms (320x down-sampling), with a GroupNorm on its first layer ("group": the base
  models, wav2vec2-large-960h) or a LayerNorm on every layer ("layer": the "stable layer
  norm" models, e.g. wav2vec2-large-960h-lv60-self, HuBERT and WavLM large);
* a feature projection (LayerNorm, Linear to the hidden size), a grouped, weight-normed
  positional convolution added to its output;
* Transformer blocks, in one of two layouts set by ``stable_layer_norm``:
  post-LN (the "group" models): a LayerNorm after the positional convolution, then per block
  ``h = LN1(x + MHSA(x))``, ``out = LN2(h + FFN(h))``;
  pre-LN (the "stable layer norm" models): per block ``h = x + MHSA(LN1(x))``,
  ``out = h + FFN(LN2(h))``, and a final LayerNorm after the last block;
* WavLM adds a gated relative position bias to every attention: bucketed relative
  distances index a learned (buckets, heads) table (one table for all layers: the first
  layer's in transformers' checkpoints), and each query's bias is scaled by a gate
  computed from its own hidden vector.

PETL methods use the same extension points as :mod:`~audiopetl.backbone.ast`
(``Block.mhsa`` / ``Block.ffn`` taps, ``Block.linear(name)`` with q, k, v, o, ffn_in,
ffn_out, ``Attention.prefix``, ``Block.insert_tokens``, ``Block.frame_mask``: each block
sets its ``value`` to the padding mask of its sequence, prompts included, where the model
masks padding). In the post-LN layout a tap's
"before" reads the sub-layer's input ``x`` (already normalised by the previous LayerNorm)
and "after" reads ``f(x)``; whatever the taps produce is added to ``x`` and then goes
through the sub-layer's LayerNorm: ``LN(x + y)`` (see :class:`PostNormTaps`). Prompt tokens
go in front of the sequence (position 0), right after the positional convolution (and,
post-LN, its LayerNorm).

The feature encoder is frozen in PETL and is the frontend's job
(:class:`~audiopetl.frontend.waveform.WaveformFrontend`): the backbone's input is the
encoder's output plus one column marking which frames belong to the clip, so the feature
cache can store it and no epoch after the first runs the convolutions again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..dataclass_dict import from_dict
from .ast import MLP, Block, FrameMask, SublayerTaps
from .presets import seeded

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
POOLINGS = ("mean",)  # no [CLS] token: the clip embedding is the mean of its frames
SAMPLE_RATE = 16000  # every published checkpoint of these families reads 16 kHz audio


@dataclass(frozen=True)
class SpeechConfig:
    """Architecture of a wav2vec 2.0 / HuBERT / WavLM encoder. Defaults: the base models."""

    model_type: str = "wav2vec2"
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    num_buckets: int = 320  # WavLM only
    max_bucket_distance: int = 800  # WavLM only

    def __post_init__(self) -> None:
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from JSON -> hashable
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"SpeechConfig.model_type {self.model_type!r} is not one of {list(MODEL_TYPES)}")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"SpeechConfig.feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0:
            raise ValueError("SpeechConfig.conv_dim, conv_kernel and conv_stride must have the same, non-zero length")
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_size", "num_conv_pos_embeddings"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SpeechConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads or self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"SpeechConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                f"and num_conv_pos_embedding_groups ({self.num_conv_pos_embedding_groups})"
            )

    @property
    def uses_attention_mask(self) -> bool:
        """Only checkpoints with a LayerNorm feature encoder take a padding mask.

        That is transformers' rule (their feature extractors set ``return_attention_mask``
        for exactly these, e.g. wav2vec2-large-960h-lv60-self, HuBERT and WavLM large); its
        docs say the group-normed ones (wav2vec2-base, -large-960h) should get zero-padded
        input and no mask, as they were trained. The published PETL code pads without a mask.
        """
        return self.feat_extract_norm == "layer"

    def num_frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Feature-encoder frames for ``num_samples`` samples (each conv: ``(n - k) // s + 1``)."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            num_samples = (num_samples - kernel) // stride + 1
        return num_samples

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "SpeechConfig":
        return from_dict(cls, values)


class ConvLayer(nn.Module):
    """Conv1d, then GroupNorm (one group per channel), LayerNorm over channels, or nothing; GELU."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, norm: str | None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.norm_kind = norm
        if norm == "group":
            self.norm: nn.Module | None = nn.GroupNorm(out_dim, out_dim)
        elif norm == "layer":
            self.norm = nn.LayerNorm(out_dim)  # eps 1e-5, not the config's: as the released models
        else:
            self.norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm is not None:
            x = self.norm(x)
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    """(batch, samples) waveform -> (batch, frames, conv_dim[-1]) features."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        dims = (1, *config.conv_dim)
        norms = [config.feat_extract_norm if (i == 0 or config.feat_extract_norm == "layer") else None
                 for i in range(len(config.conv_dim))]
        self.layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], k, s, config.conv_bias, norms[i])
            for i, (k, s) in enumerate(zip(config.conv_kernel, config.conv_stride))
        )

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        x = waves[:, None]
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    """LayerNorm (absent in some HuBERT variants), then Linear to the hidden size."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        dim = config.conv_dim[-1]
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.feat_proj_layer_norm else None
        self.proj = nn.Linear(dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x) if self.norm is not None else x)


class PositionalConv(nn.Module):
    """Grouped convolution over time, weight-normed along the kernel axis, "same" length, GELU.

    ``weight = weight_g * weight_v / ||weight_v||``, the norm taken per kernel tap over
    (output, input) channels (``torch.nn.utils.weight_norm(dim=2)``).
    """

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        dim, kernel = config.hidden_size, config.num_conv_pos_embeddings
        self.groups = config.num_conv_pos_embedding_groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(dim, dim // self.groups, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.padding = kernel // 2

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv1d(x.transpose(1, 2), self.weight().to(x.dtype), self.bias.to(x.dtype),
                       padding=self.padding, groups=self.groups)
        return F.gelu(out[..., : x.shape[1]].transpose(1, 2))  # an even kernel gives one frame too many


class RelativePositionBias(nn.Module):
    """WavLM's (heads, T, T) bias from bucketed relative distances (T5-style, bidirectional)."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_bucket_distance
        self.embedding = nn.Embedding(config.num_buckets, config.num_heads)

    def buckets(self, length: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # key - query
        half = self.num_buckets // 2
        exact = half // 2
        bucket = (relative > 0).long() * half
        distance = relative.abs()
        far = exact + (
            torch.log(distance.float() / exact) / math.log(self.max_distance / exact) * (half - exact)
        ).long()
        far = far.clamp(max=half - 1)
        return bucket + torch.where(distance < exact, distance, far)

    def forward(self, length: int) -> torch.Tensor:
        return self.embedding(self.buckets(length, self.embedding.weight.device)).permute(2, 0, 1)


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v/o projections, key-padding mask and WavLM's gated bias.

    ``prefix`` is the same extension point as AST's: a module called with the batch size
    that returns (keys, values), each (batch, p, hidden), prepended to the projected ones.
    """

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.prefix: nn.Module | None = None
        if config.model_type == "wavlm":
            self.gate = nn.Linear(dim // config.num_heads, 8)
            self.gate_const = nn.Parameter(torch.ones(1, config.num_heads, 1, 1))
        else:
            self.gate = None

    def gated_bias(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(batch, heads, T, T): each query row of ``bias`` scaled by a gate in (1, max(2, 1 + gate_const))."""
        heads = x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, T, head_dim)
        logits = self.gate(heads).unflatten(-1, (2, 4)).sum(-1)
        gate_a, gate_b = torch.sigmoid(logits).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.gate_const - 1.0) + 2.0
        return gate * bias.to(x.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = self.gated_bias(x, bias) if self.gate is not None and bias is not None else None
        if self.prefix is not None:
            prefix_k, prefix_v = self.prefix(batch)
            k = torch.cat([prefix_k.to(k.dtype), k], dim=1)
            v = torch.cat([prefix_v.to(v.dtype), v], dim=1)
            extra = prefix_k.shape[1]
            if mask is not None:
                mask = F.pad(mask, (extra, 0), value=True)
            if scores is not None:
                scores = F.pad(scores, (extra, 0))  # prefix keys carry no position bias
        attn_mask = None
        if mask is not None:
            keep = mask[:, None, None, :]
            attn_mask = keep if scores is None else scores.masked_fill(~keep, float("-inf"))
        elif scores is not None:
            attn_mask = scores
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o(out.transpose(1, 2).reshape(batch, length, dim))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class PostNormTaps(SublayerTaps):
    """The taps of a post-LN sub-layer ``LN(x + f(x))``.

    The same steps as :class:`~audiopetl.backbone.ast.SublayerTaps` with ``n = x`` (the
    sub-layer input, which the previous LayerNorm already normalised): input transforms,
    ``y = f(n)``, output transforms, branches ``branch(n, f(n))`` added to ``y``; the
    sub-layer returns ``LN(x + y)``.
    """

    def forward(self, x: torch.Tensor, norm: nn.Module, sublayer: nn.Module) -> torch.Tensor:
        return norm(super().forward(x, _identity, sublayer))


class SpeechBlock(Block):
    """One Transformer layer, post-LN or pre-LN, with AST's extension points.

    ``norm1`` / ``norm2`` are the attention and FFN sub-layers' LayerNorms (transformers'
    ``layer_norm`` / ``final_layer_norm``): applied before the sub-layer in the pre-LN
    layout, after the residual sum in the post-LN one.
    """

    def __init__(self, config: SpeechConfig) -> None:
        nn.Module.__init__(self)  # Block's own __init__ builds AST modules; we reuse its linear()/taps API
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        taps = SublayerTaps if config.stable_layer_norm else PostNormTaps
        self.mhsa = taps()
        self.ffn = taps()
        self.insert_tokens: nn.Module | None = None
        self.frame_mask = FrameMask()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        position_bias: nn.Module | None = None,
        final_norm: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, padding mask) -> the same after this layer. Prompt tokens inserted in front
        count as valid frames; ``final_norm=False`` skips a post-LN layer's last LayerNorm."""
        if self.insert_tokens is not None:
            x = self.insert_tokens(x)
            if mask is not None and x.shape[1] != mask.shape[1]:
                mask = F.pad(mask, (x.shape[1] - mask.shape[1], 0), value=True)
        self.frame_mask.value = mask  # for taps modules that mix tokens (see FrameMask)
        bias = position_bias(x.shape[1]) if position_bias is not None else None
        attention = functools.partial(self.attn, mask=mask, bias=bias)
        x = self.mhsa(x, self.norm1, attention)
        return self.ffn(x, self.norm2 if final_norm else _identity, self.mlp), mask


class Wav2Vec2(nn.Module):
    """wav2vec 2.0 / HuBERT / WavLM encoder: frontend features (batch, frames, conv_dim + 1) -> hidden.

    The input's last column is 1 for frames of the clip and 0 for padding (see the frontend);
    models with ``uses_attention_mask`` use it as the attention mask, others ignore it.
    """

    poolings = POOLINGS

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_encoder = FeatureEncoder(config)
        self.feature_projection = FeatureProjection(config)
        self.pos_conv = PositionalConv(config)
        # Post-LN: the LayerNorm after the positional convolution; pre-LN: none there (see ``norm``).
        self.embed_norm = None if config.stable_layer_norm else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rel_pos = RelativePositionBias(config) if config.model_type == "wavlm" else None
        self.blocks = nn.ModuleList(SpeechBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.stable_layer_norm else None
        self.gradient_checkpointing = False
        self.waveform_normalize = True  # the checkpoint's do_normalize (preprocessor_config.json), for frontend()
        self.reset_parameters()

    @property
    def norm(self) -> nn.LayerNorm:
        """The last LayerNorm before pooling: the final one (pre-LN) or the last block's FFN norm (post-LN)."""
        return self.final_norm if self.final_norm is not None else self.blocks[-1].norm2

    def reset_parameters(self) -> None:
        """Random initialisation in the style of transformers' (tests and the offline demo)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        v = self.pos_conv.weight_v
        nn.init.normal_(v, std=2 * math.sqrt(1 / (v.shape[-1] * self.config.hidden_size)))
        with torch.no_grad():
            self.pos_conv.weight_g.copy_(v.norm(dim=(0, 1), keepdim=True))
        nn.init.zeros_(self.pos_conv.bias)

    # -- the backbone interface shared with AST (see audiopetl.backbone) --
    @property
    def prompt_start(self) -> int:
        return 0

    @property
    def input_fan_in(self) -> int:
        return self.config.conv_dim[-1]

    def embedding_biases(self) -> list[nn.Parameter]:
        modules = [self.feature_projection, self.pos_conv] + ([self.embed_norm] if self.embed_norm is not None else [])
        return [m.bias for module in modules for m in module.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)]

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "pos_conv": list(self.pos_conv.parameters()),
            "feature_projection": list(self.feature_projection.parameters()),
        }

    def frontend_parameters(self) -> list[nn.Parameter]:
        """The feature encoder's: the frontend runs it and the cache keeps its output, so nothing trains it."""
        return list(self.feature_encoder.parameters())

    def frontend(self, max_frames: int, normalize: bool | None = None):
        """The waveform frontend feeding this model: ``max_frames`` 10-ms steps of 16 kHz audio,
        normalised per clip unless ``normalize`` (default: the checkpoint's ``do_normalize``) is False."""
        from ..frontend.waveform import WaveformConfig, WaveformFrontend

        normalize = self.waveform_normalize if normalize is None else normalize
        config = WaveformConfig(max_frames=max_frames, normalize=normalize, attention_mask=self.config.uses_attention_mask)
        return WaveformFrontend(config, self.feature_encoder, self.config.num_frames, self.config.conv_dim[-1])

    def padding_mask(self, features: torch.Tensor) -> torch.Tensor | None:
        """(batch, frames) True for frames of the clip, or None for models without attention masks."""
        return features[..., -1] > 0.5 if self.config.uses_attention_mask else None

    def pool(self, hidden: torch.Tensor, features: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Mean over the clip's frames (padding left out where the model masks it) and any prompts."""
        if mode not in POOLINGS:
            raise ValueError(f"unknown pooling {mode!r} for {self.config.model_type}; valid: {list(POOLINGS)}")
        mask = self.padding_mask(features)
        if mask is None:
            return hidden.mean(dim=1)
        mask = F.pad(mask, (hidden.shape[1] - mask.shape[1], 0), value=True).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    # -- forward --
    def embed(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        expected = self.config.conv_dim[-1] + 1
        if features.dim() != 3 or features.shape[-1] != expected:
            raise ValueError(
                f"{self.config.model_type} expects frontend features of shape (batch, frames, {expected}) "
                f"(feature-encoder output and a validity column), got {tuple(features.shape)}"
            )
        mask = self.padding_mask(features)
        x = self.feature_projection(features[..., :-1].to(self.feature_projection.proj.weight.dtype))
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x, mask

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden sequence before ``norm`` (the final LayerNorm, or the last post-LN one)."""
        x, mask = self.embed(features)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            final_norm = index != last or self.final_norm is not None
            # Gated on grad mode, not self.training: PETL keeps a frozen backbone in eval mode while training.
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, mask = checkpoint(block, x, mask, self.rel_pos, final_norm, use_reentrant=False)
            else:
                x, mask = block(x, mask, self.rel_pos, final_norm)
        return x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encode(features))


# -- checkpoints: transformers' names -> ours, config.json -> SpeechConfig, presets --

# Tensors of pre-training / task heads, dropped on load (listed in the load report).
IGNORED_PREFIXES = (
    "lm_head.", "quantizer.", "project_hid.", "project_q.", "masked_spec_embed", "label_embs_concat",
    "final_proj.", "classifier.", "projector.", "feature_extractor._freeze", "adapter.",
)
_LAYER = r"encoder\.layers\.(\d+)\."
_RULES = [  # (transformers name regex, ours); first match wins
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_encoder.layers.\1.conv."),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_encoder.layers.\1.norm."),
    (r"feature_projection\.layer_norm\.", "feature_projection.norm."),
    (r"feature_projection\.projection\.", "feature_projection.proj."),
    (r"encoder\.pos_conv_embed\.conv\.(?:weight_g|parametrizations\.weight\.original0)$", "pos_conv.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.(?:weight_v|parametrizations\.weight\.original1)$", "pos_conv.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias$", "pos_conv.bias"),
    (r"encoder\.pos_conv_embed\.conv\.weight$", "pos_conv.weight"),  # saved without weight norm: split below
    (r"encoder\.layer_norm\.", "{encoder_norm}."),
    (_LAYER + r"attention\.q_proj\.", r"blocks.\1.attn.q."),
    (_LAYER + r"attention\.k_proj\.", r"blocks.\1.attn.k."),
    (_LAYER + r"attention\.v_proj\.", r"blocks.\1.attn.v."),
    (_LAYER + r"attention\.out_proj\.", r"blocks.\1.attn.o."),
    (_LAYER + r"attention\.gru_rel_pos_linear\.", r"blocks.\1.attn.gate."),
    (_LAYER + r"attention\.gru_rel_pos_const$", r"blocks.\1.attn.gate_const"),
    (r"encoder\.layers\.0\.attention\.rel_attn_embed\.", "rel_pos.embedding."),
    (_LAYER + r"layer_norm\.", r"blocks.\1.norm1."),
    (_LAYER + r"final_layer_norm\.", r"blocks.\1.norm2."),
    (_LAYER + r"feed_forward\.intermediate_dense\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"feed_forward\.output_dense\.", r"blocks.\1.mlp.fc2."),
]


def config_from_transformers(values: dict, source: str = "config.json") -> SpeechConfig:
    """Our config from a transformers ``Wav2Vec2Config`` / ``HubertConfig`` / ``WavLMConfig`` dict."""
    model_type = values.get("model_type")
    unsupported = {
        "hidden_act": values.get("hidden_act", "gelu") != "gelu",
        "feat_extract_activation": values.get("feat_extract_activation", "gelu") != "gelu",
        "add_adapter": bool(values.get("add_adapter", False)),
        "conv_pos_batch_norm": bool(values.get("conv_pos_batch_norm", False)),
    }
    bad = [f"{k}={values.get(k)!r}" for k, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"{source}: unsupported {model_type} options {bad} (supported: gelu activations, no adapter "
                         "layers, weight-normed positional convolution)")
    defaults = SpeechConfig()
    try:
        return SpeechConfig(
            model_type=model_type,
            hidden_size=values.get("hidden_size", defaults.hidden_size),
            num_layers=values.get("num_hidden_layers", defaults.num_layers),
            num_heads=values.get("num_attention_heads", defaults.num_heads),
            mlp_size=values.get("intermediate_size", defaults.mlp_size),
            conv_dim=values.get("conv_dim", defaults.conv_dim),
            conv_kernel=values.get("conv_kernel", defaults.conv_kernel),
            conv_stride=values.get("conv_stride", defaults.conv_stride),
            conv_bias=values.get("conv_bias", defaults.conv_bias),
            feat_extract_norm=values.get("feat_extract_norm", defaults.feat_extract_norm),
            stable_layer_norm=values.get("do_stable_layer_norm", defaults.stable_layer_norm),
            # Only HuBERT's config has the switch; wav2vec 2.0 and WavLM always have the LayerNorm.
            feat_proj_layer_norm=values.get("feat_proj_layer_norm", True) if model_type == "hubert" else True,
            num_conv_pos_embeddings=values.get("num_conv_pos_embeddings", defaults.num_conv_pos_embeddings),
            num_conv_pos_embedding_groups=values.get(
                "num_conv_pos_embedding_groups", defaults.num_conv_pos_embedding_groups
            ),
            layer_norm_eps=values.get("layer_norm_eps", defaults.layer_norm_eps),
            num_buckets=values.get("num_buckets", defaults.num_buckets),
            max_bucket_distance=values.get("max_bucket_distance", defaults.max_bucket_distance),
        )
    except ValueError as err:
        raise ValueError(f"{source}: config.json describes an invalid {model_type} model: {err}") from err


def convert_state_dict(
    state: dict[str, torch.Tensor], config: SpeechConfig, source: str = "<state dict>"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers tensors (any task model: ``wav2vec2.`` / ``hubert.`` / ``wavlm.`` prefix) ->
    (our float32 state dict, ignored head keys). Unknown keys raise ``ValueError`` naming them."""
    encoder_norm = "final_norm" if config.stable_layer_norm else "embed_norm"
    ours: dict[str, torch.Tensor] = {}
    ignored, unknown = [], []
    for key, tensor in state.items():
        name = key
        for prefix in ("wav2vec2.", "hubert.", "wavlm.", "model."):
            name = name.removeprefix(prefix)
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        for pattern, replacement in _RULES:
            new, count = re.subn("^" + pattern, replacement.format(encoder_norm=encoder_norm), name, count=1)
            if count:
                ours[new] = tensor.float()
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unexpected keys for a {config.model_type} checkpoint: {unknown}")
    if "pos_conv.weight" in ours:  # a plain weight is weight norm with g = ||w||
        weight = ours.pop("pos_conv.weight")
        ours["pos_conv.weight_v"] = weight
        ours["pos_conv.weight_g"] = weight.norm(dim=(0, 1), keepdim=True)
    return ours, ignored


def from_transformers(
    state: dict[str, torch.Tensor], config_json: dict, source: str
) -> tuple[Wav2Vec2, list[str]]:
    """(model in eval mode, ignored keys) from a transformers checkpoint's tensors and config.json."""
    config = config_from_transformers(config_json, source)
    ours, ignored = convert_state_dict(state, config, source)
    with torch.device("meta"):
        model = Wav2Vec2(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    wrong = [f"{k}: {tuple(ours[k].shape)} != {s}" for k, s in expected.items() if k in ours and tuple(ours[k].shape) != s]
    if missing or extra or wrong:
        raise ValueError(
            f"{source}: tensors do not fit the config.json's {config.model_type} model "
            f"(missing {missing}, unexpected {extra}, wrong shapes {wrong})"
        )
    model.load_state_dict(ours, assign=True)
    return model.eval(), ignored


# Offline presets for tests and the demo: tiny models with the real 320x feature encoder
# geometry (narrow convolutions), random weights from fixed seeds.
_TINY = dict(hidden_size=64, num_layers=3, num_heads=4, mlp_size=128, conv_dim=(32,) * 7,
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64)
PRESETS: dict[str, tuple[SpeechConfig, int]] = {
    "tiny-random-wav2vec2": (SpeechConfig(model_type="wav2vec2", **_TINY), 20240601),
    "tiny-random-hubert": (SpeechConfig(model_type="hubert", **_TINY), 20240602),
    "tiny-random-wavlm": (SpeechConfig(model_type="wavlm", **_TINY), 20240603),
    # The large models' layout: pre-LN, LayerNorm feature encoder, padding masks.
    "tiny-random-wav2vec2-stable": (
        SpeechConfig(model_type="wav2vec2", feat_extract_norm="layer", stable_layer_norm=True, conv_bias=True, **_TINY),
        20240604,
    ),
}


def preset(name: str) -> Wav2Vec2:
    """The deterministic preset ``name`` (same weights on every machine), in eval mode."""
    config, seed = PRESETS[name]
    return seeded(seed, lambda: Wav2Vec2(config).eval())


__all__ = [
    "MODEL_TYPES",
    "PRESETS",
    "config_from_transformers",
    "convert_state_dict",
    "from_transformers",
    "preset",
    "POOLINGS",
    "PostNormTaps",
    "SAMPLE_RATE",
    "SpeechBlock",
    "SpeechConfig",
    "Wav2Vec2",
]

# The family's entry in audiopetl.backbone.registry.
CONFIG = SpeechConfig
MODEL = Wav2Vec2
