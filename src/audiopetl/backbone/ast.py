"""The Audio Spectrogram Transformer (AST) backbone, in one readable file.

Same maths as Gong et al. (2021) and transformers' ``ASTModel``: 16x16 patches of the
(frequency, time) log-mel plane with stride 10, [CLS] and distillation tokens, learned
absolute position embeddings, pre-LN Transformer blocks and a final LayerNorm.

PETL methods never rewrite a forward pass. They plug into named extension points:

* ``Block.mhsa`` / ``Block.ffn`` (:class:`SublayerTaps`): transforms of a sub-layer's
  (normalised) input or of its output, and side branches added to its output. Sequential
  and parallel adapters, before or after a sub-layer, are all expressed through these.
* ``Block.linear(name)`` / ``Block.replace_linear(name, module)``: the projections
  ``q``, ``k``, ``v``, ``o``, ``ffn_in``, ``ffn_out`` by semantic name (LoRA).
* ``Attention.prefix``: a module returning extra key and value vectors (prefix tuning).
* ``Block.insert_tokens``: a module run on the sequence before the block (prompt tuning);
  inserted tokens live at positions ``[NUM_SPECIAL_TOKENS, NUM_SPECIAL_TOKENS + p)``.
* ``Block.frame_mask`` (:class:`FrameMask`): which tokens the block's sub-layers run on are
  real, for modules that mix tokens (convolutions over time, softmaxes over tokens). The AST
  has no padding: its ``value`` stays None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..dataclass_dict import from_dict

NUM_SPECIAL_TOKENS = 2  # [CLS] and distillation
POOLINGS = ("mean", "cls", "cls_dist")


@dataclass(frozen=True)
class ASTConfig:
    """Architecture of an AST. Defaults are ViT-B with AudioSet's 1024-frame input."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    num_mel_bins: int = 128
    max_frames: int = 1024
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "qkv_bias":
                continue
            if not value > 0:
                raise ValueError(f"ASTConfig.{field.name} must be positive, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ASTConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.max_frames < self.patch_size or self.num_mel_bins < self.patch_size:
            raise ValueError(
                f"ASTConfig: max_frames ({self.max_frames}) and num_mel_bins ({self.num_mel_bins}) "
                f"must be at least patch_size ({self.patch_size})"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (frequency, time), as transformers' ``ASTEmbeddings.get_shape``."""
        freq = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        time = (self.max_frames - self.patch_size) // self.time_stride + 1
        return freq, time

    @property
    def num_tokens(self) -> int:
        freq, time = self.grid
        return freq * time + NUM_SPECIAL_TOKENS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ASTConfig":
        return from_dict(cls, values)


class PatchEmbed(nn.Module):
    """(batch, frames, mel) features -> (batch, patches, hidden), frequency-major order."""

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            1,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=(config.frequency_stride, config.time_stride),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        plane = features.transpose(1, 2).unsqueeze(1)  # (B, 1, mel, frames)
        return self.proj(plane).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v/o projections and fused SDPA.

    The projections stay four modules (their names are the checkpoint keys and the
    ``Block.linear`` extension point), but with ``fused_qkv`` (default: on CUDA; measured
    slower with the CPU's bf16 kernels, so off there) q, k and v run as
    one GEMM on the concatenated weights, and SDPA reads (batch, heads, tokens, head_dim)
    strided views of its output: one cast of the input under autocast instead of three,
    one wide matmul instead of three narrow ones, and no layout copies. A projection
    wrapped as a :class:`LowRankUpdate` (LoRA) joins the fused GEMM with its frozen
    ``base``, and its low-rank update is added to its slice. Any other replacement module
    makes the layer take the separate path, which computes the same function.
    """

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.k = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.v = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.o = nn.Linear(dim, dim)
        # Extension point: a module called with the batch size, returning (keys, values),
        # each (batch, p, hidden), prepended to the projected keys and values.
        self.prefix: nn.Module | None = None
        # Fast-path knobs (not parameters, not in the state dict): see the class docstring.
        # None: fused on CUDA only; True / False force it.
        self.fused_qkv: bool | None = None
        # "sdpa" (fused kernel), "matmul" (two batched GEMMs around a softmax); None: ``attention_kernel`` decides.
        self.kernel: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        projections = (self.q, self.k, self.v)
        fused = self.fused_qkv if self.fused_qkv is not None else x.device.type == "cuda"
        if fused and _fusable(projections):
            qkv = self._fused_qkv(x, projections)
            # (batch, tokens, 3, heads, head_dim) -> three strided (batch, heads, tokens, head_dim) views.
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (_heads(p(x), self.num_heads) for p in projections)
        if self.prefix is not None:
            prefix_k, prefix_v = (_heads(t, self.num_heads) for t in self.prefix(batch))
            k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
            v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
        if attention_kernel(self.kernel, q, k) == "matmul":
            out = _matmul_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(batch, length, dim))

    @staticmethod
    def _fused_qkv(x: torch.Tensor, projections: tuple[nn.Module, ...]) -> torch.Tensor:
        """(batch, tokens, 3 * hidden): q, k and v side by side, low-rank updates included."""
        if torch.is_autocast_enabled(x.device.type):
            # Cast once for the fused GEMM and the updates (autocast would cast per call, and
            # each low-rank down-projection would save its own copy for the backward).
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bases = [_base(p) for p in projections]
        weights = [base.weight for base in bases]
        bias = None if bases[0].bias is None else torch.cat([base.bias for base in bases])
        if any(w.requires_grad for w in weights):
            qkv = F.linear(x, torch.cat(weights), bias)
        else:
            qkv = _FrozenLinear.apply(x, bias, *weights)
        updates = [p if isinstance(p, LowRankUpdate) and not p.merged else None for p in projections]
        if all(u is None for u in updates):
            return qkv
        # All updates as one pair of GEMMs: stacked down-projections, then a block-diagonal
        # up-projection (zero rows for a projection without update) accumulated into qkv by
        # addmm, so no extra (tokens, 3 * hidden) sum is materialised or saved.
        factors = [u.factors() if u is not None else None for u in updates]
        downs = torch.cat([f[0] for f in factors if f is not None])
        ups = torch.block_diag(
            *(f[1] if f is not None else base.weight.new_zeros(base.out_features, 0) for f, base in zip(factors, bases))
        )
        low = F.linear(x, downs).flatten(0, 1)
        return torch.addmm(qkv.flatten(0, 1), low, ups.t().to(low.dtype)).view(qkv.shape)


class _FrozenLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` the row-wise concatenation of frozen ``weights``.

    Plain autograd would save the concatenated ``W`` (a new tensor) for the input gradient;
    this saves the weights themselves (no new memory) and concatenates again in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*weights)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, torch.cat(weights).to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights = ctx.saved_tensors  # read once: activation checkpointing allows one unpack
        grad_x = grad @ torch.cat(weights).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.flatten(0, -2).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, *(None for _ in weights)


class LowRankUpdate(nn.Module):
    """What a projection wrapper exposes to join the fused q/k/v GEMM (see :class:`Attention`).

    ``base`` is the wrapped ``nn.Linear``; ``factors()`` returns ``(down, up)`` of shapes
    (rank, in) and (out, rank), scaling folded in, with ``forward(x) == base(x) + x down^T up^T``
    while not ``merged`` (once merged the update lives in ``base.weight`` and is skipped).
    """

    base: nn.Linear
    merged: bool

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _base(projection: nn.Module) -> nn.Linear:
    return projection.base if isinstance(projection, LowRankUpdate) else projection


def _fusable(projections: tuple[nn.Module, ...]) -> bool:
    """Plain ``nn.Linear`` (or low-rank wrappers of one) with the same input size and bias presence."""
    bases = [_base(p) for p in projections]
    return (
        all(type(p) is nn.Linear or isinstance(p, LowRankUpdate) for p in projections)
        and all(type(base) is nn.Linear for base in bases)
        and len({(base.in_features, base.bias is None, base.weight.dtype) for base in bases}) == 1
    )


ATTENTION_KERNELS = ("sdpa", "matmul")
# Up to this many keys per query the matmul kernel's bf16 training pass beats PyTorch's CPU
# flash-attention kernel (benchmarks/bench_attention.py: 1.97x at 110 keys, 1.31x at 206,
# 1.01x at 230, slower beyond; in fp32 or without autograd 0.3-1.08x, i.e. no gain).
MATMUL_ATTENTION_MAX_KEYS = 224


def attention_kernel(choice: str | None, q: torch.Tensor, k: torch.Tensor) -> str:
    """The attention kernel a layer runs: ``choice`` if given; else "matmul" for a bf16 training
    pass on the CPU over at most ``MATMUL_ATTENTION_MAX_KEYS`` keys, and SDPA otherwise."""
    if choice is not None:
        return choice
    training = q.requires_grad or k.requires_grad
    short = k.shape[-2] <= MATMUL_ATTENTION_MAX_KEYS
    return "matmul" if q.device.type == "cpu" and q.dtype == torch.bfloat16 and training and short else "sdpa"


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` as two batched GEMMs, the softmax in fp32 (as SDPA's math)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, tokens, hidden) -> (batch, heads, tokens, head_dim), a view."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class MLP(nn.Module):
    """The FFN sub-layer: Linear, GELU, Linear."""

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_size)
        self.fc2 = nn.Linear(config.mlp_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FrameMask:
    """Which tokens are real while a block runs; not a module (no state, nothing saved).

    ``value`` is None when every token is real (always for the AST) or the (batch, tokens)
    bool mask, True for real tokens, of the sequence the block's sub-layers see (the block
    sets it before running them). Taps modules that mix tokens read it so that padding
    never changes a clip's output; per-token modules need not. A holder, not an argument of
    the taps, so that no tap's signature changes; it assumes one forward at a time per model
    (true of training, DDP's one model per process and the server's single model thread;
    not of ``nn.DataParallel``'s replicas, which would share it).
    """

    value: torch.Tensor | None = None


class SublayerTaps(nn.Module):
    """Extension point around one pre-LN sub-layer ``x + f(LN(x))``.

    With ``n = LN(x)``:
      1. every ``input_transforms`` module maps ``n -> n`` in turn (sequential-before);
      2. ``y = f(n)``; every ``output_transforms`` module maps ``y -> y`` (sequential-after);
      3. every ``branches`` module is called as ``branch(n, y_raw)`` with ``y_raw`` the
         sub-layer output before step 2's transforms, and its result is added to ``y``
         (parallel modules);
      4. the sub-layer returns ``x + y``.
    Empty taps cost nothing and leave the sub-layer as in the pre-trained model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_transforms = nn.ModuleList()
        self.output_transforms = nn.ModuleList()
        self.branches = nn.ModuleList()

    def forward(self, x: torch.Tensor, norm: nn.Module, sublayer: nn.Module) -> torch.Tensor:
        n = norm(x)
        for transform in self.input_transforms:
            n = transform(n)
        y_raw = sublayer(n)
        y = y_raw
        for transform in self.output_transforms:
            y = transform(y)
        for branch in self.branches:
            y = y + branch(n, y_raw)
        return x + y


class Block(nn.Module):
    """One pre-LN Transformer layer: ``x + MHSA(LN(x))`` then ``x + FFN(LN(x))``."""

    # Semantic projection names -> (sub-module, attribute); stable across refactors.
    LINEARS = {
        "q": ("attn", "q"),
        "k": ("attn", "k"),
        "v": ("attn", "v"),
        "o": ("attn", "o"),
        "ffn_in": ("mlp", "fc1"),
        "ffn_out": ("mlp", "fc2"),
    }

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.mhsa = SublayerTaps()
        self.ffn = SublayerTaps()
        # Extension point: module mapping the token sequence before this block.
        self.insert_tokens: nn.Module | None = None
        self.frame_mask = FrameMask()  # never set: AST sequences have no padding

    def linear(self, name: str) -> nn.Module:
        owner, attr = self._linear_slot(name)
        return getattr(owner, attr)

    def replace_linear(self, name: str, module: nn.Module) -> None:
        owner, attr = self._linear_slot(name)
        setattr(owner, attr, module)

    def _linear_slot(self, name: str) -> tuple[nn.Module, str]:
        if name not in self.LINEARS:
            raise ValueError(f"unknown projection {name!r}; valid: {sorted(self.LINEARS)}")
        owner, attr = self.LINEARS[name]
        return getattr(self, owner), attr

    def sublayer_norm(self, sublayer: str) -> nn.LayerNorm:
        return {"mhsa": self.norm1, "ffn": self.norm2}[sublayer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.insert_tokens is not None:
            x = self.insert_tokens(x)
        x = self.mhsa(x, self.norm1, self.attn)
        return self.ffn(x, self.norm2, self.mlp)


class AST(nn.Module):
    """Audio Spectrogram Transformer: features (batch, frames, mel) -> hidden (batch, tokens, hidden)."""

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random ViT-style initialisation (used for tests and the offline demo)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for token in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(token, std=0.02)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        expected = (self.config.max_frames, self.config.num_mel_bins)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"AST expects features of shape (batch, {expected[0]}, {expected[1]}), "
                f"got {tuple(features.shape)}; pad or truncate clips to max_frames={expected[0]}"
            )
        patches = self.patch_embed(features.to(self.patch_embed.proj.weight.dtype))
        special = torch.cat([self.cls_token, self.dist_token], dim=1).expand(len(patches), -1, -1)
        return torch.cat([special.to(patches.dtype), patches], dim=1) + self.pos_embed.to(patches.dtype)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden sequence after the last block, before the final LayerNorm."""
        x = self.embed(features)
        for block in self.blocks:
            # Gated on grad mode, not self.training: PETL keeps a frozen backbone in eval mode while training.
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encode(features))

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block in place (regional compilation).

        The blocks share one code path, so one compiled graph serves all of them (one per
        distinct block wiring, e.g. DPT's first block): compile time is that of one block,
        not of the whole network. Parameter names and the extension points are unchanged;
        switch extension modules before compiling (a change recompiles).
        """
        for block in self.blocks:
            block.compile(**options)

    def set_fused_qkv(self, enabled: bool | None) -> None:
        """Force the fused q/k/v GEMM of every block on or off; None: on for CUDA only (the default).

        Either way the function is the same (see :class:`Attention`)."""
        for block in self.blocks:
            block.attn.fused_qkv = enabled

    def set_attention_kernel(self, kernel: str | None) -> None:
        """Force every block's attention kernel ("sdpa" or "matmul"); None: :func:`attention_kernel`'s choice."""
        if kernel is not None and kernel not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; valid: {list(ATTENTION_KERNELS)}")
        for block in self.blocks:
            block.attn.kernel = kernel

    # The backbone interface every family provides (see audiopetl.backbone.registry).
    poolings = POOLINGS
    prompt_start = NUM_SPECIAL_TOKENS  # prompts go right after [CLS] and the distillation token

    @property
    def input_fan_in(self) -> int:
        return self.config.patch_size**2  # one input channel: a spectrogram, not RGB

    def embedding_biases(self) -> list[nn.Parameter]:
        return [self.patch_embed.proj.bias]

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"pos_embed": [self.pos_embed]}

    def frontend_parameters(self) -> list[nn.Parameter]:
        return []  # the filterbank frontend has no weights

    def pool(self, hidden: torch.Tensor, features: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        return pool(hidden, mode)

    def frontend(self, max_frames: int):
        """The filterbank frontend for clips of ``max_frames`` frames (one per 10 ms)."""
        from ..frontend.fbank import Fbank, FbankConfig

        return Fbank(FbankConfig(num_mel_bins=self.config.num_mel_bins, max_frames=max_frames))


def pool(hidden: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Sequence -> one vector per clip.

    ``mean``: mean of all output tokens (the paper's head); ``cls``: the [CLS] token;
    ``cls_dist``: mean of [CLS] and distillation tokens (the original AST head).
    """
    if mode == "mean":
        return hidden.mean(dim=1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "cls_dist":
        return (hidden[:, 0] + hidden[:, 1]) / 2
    raise ValueError(f"unknown pooling {mode!r}; valid: {list(POOLINGS)}")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "AST",
    "ASTConfig",
    "Attention",
    "Block",
    "FrameMask",
    "LowRankUpdate",
    "MLP",
    "NUM_SPECIAL_TOKENS",
    "POOLINGS",
    "SublayerTaps",
    "count_parameters",
    "pool",
]
