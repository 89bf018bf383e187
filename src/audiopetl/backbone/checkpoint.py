"""Load pre-trained backbones: AST here, other families through :mod:`~audiopetl.backbone.registry`.

The checkpoint chooses the backbone: a ``config.json`` whose ``model_type`` a registered
family reads (``wav2vec2``, ``hubert``, ``wavlm``) goes to that family's loader, and the
family presets (``tiny-random-wav2vec2`` ...) to its ``preset``; everything else is read
as an AST, as described below.

Sources accepted by :func:`load_backbone`:

* a Hugging Face Hub repo id (``MIT/ast-finetuned-audioset-10-10-0.4593``): only
  ``config.json`` and one weights file (``model.safetensors``, else ``pytorch_model.bin``)
  are downloaded;
* a local directory holding the same files (``config.json`` optional);
* a single weights file (``.safetensors``, or a ``torch.save`` file such as the original
  release's ``audioset_10_10_0.4593.pth``); ``.bin``/``.pth`` are read with ``weights_only=True``;
* ``"tiny-random"``, the offline preset of :mod:`audiopetl.backbone.presets`, and the
  presets of the registered families.

Three key layouts are recognised and renamed to ours (see :data:`CANONICAL_KEY`):

* transformers, classic (what the hub checkpoints hold and what ``save_pretrained`` of
  transformers 5.x still writes): ``[audio_spectrogram_transformer.]encoder.layer.N.attention.attention.query``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, ``layernorm_before/after``,
  ``embeddings.*``, ``layernorm``; and the in-memory transformers 5.x names
  ``layers.N.attention.q_proj`` / ``o_proj`` / ``mlp.fc1`` / ``mlp.fc2``;
* the original AST release: ``[module.]v.blocks.N.attn.qkv`` (split into q/k/v), ``attn.proj``,
  ``norm1/2``, ``mlp.fc1/2``, ``v.pos_embed``, ``v.cls_token``, ``v.dist_token``, ``v.patch_embed.proj``, ``v.norm``;
* ours (``patch_embed.proj``, ``blocks.N.attn.q`` ...), e.g. ``torch.save(ast.state_dict())``.

Classification heads (``classifier.*``; ``mlp_head.*``, ``v.head.*``, ``v.head_dist.*``) are
dropped and listed in the :class:`LoadReport`; anything else that does not fit raises
:class:`CheckpointError` naming the file and the keys.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors.torch import load_file

from ..integrity import digest_tensors
from .ast import AST, NUM_SPECIAL_TOKENS, ASTConfig
from .presets import TINY_CONFIG, TINY_RANDOM, tiny_random_state
from .registry import family_for_preset, family_for_type, fingerprint

logger = logging.getLogger(__name__)

PosEmbedMode = Literal["adapt", "zeros"]
POS_EMBED_MODES: tuple[str, ...] = ("adapt", "zeros")
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
PREPROCESSOR_FILE = "preprocessor_config.json"  # speech models: the feature extractor's do_normalize

# The original release has no config.json; its layout (Gong et al. 2021): 128 mel bins,
# 16x16 patches, stride 10, 1024 frames -> a 12 x 101 grid; timm's ViT LayerNorm eps.
ORIGINAL_NUM_MEL_BINS = 128
ORIGINAL_STRIDE = 10
ORIGINAL_FRAMES = 1024
ORIGINAL_LAYER_NORM_EPS = 1e-6
HEAD_DIM = 64  # every ViT/DeiT width uses 64-dim heads (768 -> 12 heads)

# The backbone parameter names of our AST, the key set that fingerprints are computed over.
CANONICAL_KEY = re.compile(
    r"cls_token|dist_token|pos_embed"
    r"|(patch_embed\.proj|norm|blocks\.\d+\.(norm1|norm2|attn\.[qkvo]|mlp\.fc[12]))\.(weight|bias)"
)

_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
# (checkpoint-name prefix regex, our prefix); the first matching rule wins, the rest of the name is kept.
_TRANSFORMERS_RULES = [
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"embeddings\.cls_token$", "cls_token"),
    (r"embeddings\.distillation_token$", "dist_token"),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (_LAYER + r"attention\.(?:attention\.query|q_proj)\.", r"blocks.\1.attn.q."),
    (_LAYER + r"attention\.(?:attention\.key|k_proj)\.", r"blocks.\1.attn.k."),
    (_LAYER + r"attention\.(?:attention\.value|v_proj)\.", r"blocks.\1.attn.v."),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.o."),
    (_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (_LAYER + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_LAYER + r"layernorm_after\.", r"blocks.\1.norm2."),
    (r"layernorm\.", "norm."),
]
_ORIGINAL_RULES = [(r"v\.blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.o."), (r"v\.", "")]
_OURS_RULES: list[tuple[str, str]] = [(r"", "")]  # names kept as they are
_IGNORED_HEADS = {
    "transformers": ("classifier.",),
    "original": ("mlp_head.", "v.head.", "v.head_dist."),
    "audiopetl": (),
}
# Defaults for configs inferred from shapes: transformers' AST uses 1e-12, timm's ViT 1e-6.
_INFERRED_EPS = {"transformers": 1e-12, "original": ORIGINAL_LAYER_NORM_EPS, "audiopetl": 1e-12}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as an AST backbone; the message names the file and keys."""


@dataclass(frozen=True)
class LoadReport:
    """How :func:`load_backbone` built a model (attached to it as ``model.load_report``).

    ``files``: files read (weights first); ``checkpoint_format``: ``transformers``,
    ``original`` or ``audiopetl``; ``ignored_keys``: classification-head tensors dropped;
    ``checkpoint_grid`` / ``grid``: (frequency, time) patch grids before / after the
    position-table change made by ``pos_embed`` (``adapt`` or ``zeros``; AST only, None
    for other families); ``fingerprint``: :func:`backbone_fingerprint` of the returned model.
    """

    source: str
    files: tuple[str, ...]
    checkpoint_format: str
    ignored_keys: tuple[str, ...]
    checkpoint_grid: tuple[int, int] | None
    grid: tuple[int, int] | None
    pos_embed: str
    fingerprint: str


def load_backbone(
    name_or_path: str | Path,
    max_frames: int | None = None,
    pos_embed: PosEmbedMode = "adapt",
    num_heads: int | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> AST:
    """A pre-trained backbone in eval mode, with ``model.source`` and ``model.load_report`` set.

    For speech encoders ``max_frames``, ``pos_embed`` and ``num_heads`` do not apply (their
    positional convolution takes any length; the clip length is the frontend's setting).
    AST: ``max_frames``: input length; ``None`` keeps the checkpoint's. When it changes the
    patch grid the position table is rebuilt per ``pos_embed`` (:func:`adapt_pos_embed`).
    ``num_heads`` overrides the head count inferred for checkpoints without ``config.json``
    (default ``hidden_size // 64``); ``cache_dir``/``revision`` are passed to the hub.
    """
    check_pos_embed_mode(pos_embed)
    source = str(name_or_path)
    family = family_for_preset(source)
    if family is not None:
        return _finish(family.preset(source), source, (), "audiopetl", [], pos_embed)
    if source == TINY_RANDOM:
        state, ignored, fmt, files = tiny_random_state(), [], "audiopetl", ()
        config = TINY_CONFIG
    else:
        weights, config_path = _resolve(source, cache_dir, revision)
        config_json = _read_json(config_path) if config_path else None
        family = family_for_type(config_json.get("model_type")) if config_json else None
        if family is not None:
            try:
                model, ignored = family.from_transformers(_read_weights(weights), config_json, str(weights))
            except ValueError as err:
                raise CheckpointError(str(err)) from err
            preprocessor = _optional_file(source, PREPROCESSOR_FILE, cache_dir, revision)
            if preprocessor is not None:
                model.waveform_normalize = bool(_read_json(preprocessor).get("do_normalize", True))
            files = (str(weights), str(config_path)) + ((str(preprocessor),) if preprocessor else ())
            return _finish(model, source, files, "transformers", ignored, pos_embed)
        files = (str(weights),) + ((str(config_path),) if config_path else ())
        state, ignored, fmt = convert_state_dict(_read_weights(weights), str(weights))
        config = _checkpoint_config(state, config_json, fmt, num_heads, str(weights))
        _check_keys_and_shapes(state, config, str(weights))

    target = config if max_frames is None else replace(config, max_frames=max_frames)
    state["pos_embed"] = adapt_pos_embed(state["pos_embed"], config.grid, target.grid, pos_embed)
    with torch.device("meta"):  # skip the random init; every tensor is assigned below
        model = AST(target)
    model.load_state_dict(state, assign=True)
    model.eval()
    if ignored:
        logger.info("%s: ignored classification-head tensors %s", source, ignored)
    model.source = source
    model.load_report = LoadReport(
        source=source,
        files=files,
        checkpoint_format=fmt,
        ignored_keys=tuple(ignored),
        checkpoint_grid=config.grid,
        grid=target.grid,
        pos_embed=pos_embed,
        fingerprint=backbone_fingerprint(model),
    )
    return model


def _finish(model, source: str, files: tuple, fmt: str, ignored: list, pos_embed: str):
    """A non-AST backbone with its source and load report attached."""
    if ignored:
        logger.info("%s: ignored head tensors %s", source, ignored)
    model.source = source
    model.load_report = LoadReport(
        source=source, files=files, checkpoint_format=fmt, ignored_keys=tuple(ignored),
        checkpoint_grid=None, grid=None, pos_embed=pos_embed, fingerprint=fingerprint(model),
    )
    return model


def _optional_file(source: str, name: str, cache_dir: str | Path | None, revision: str | None) -> Path | None:
    """``name`` next to the weights (local directory) or in the hub repo, or None where there is none."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path / name if (path / name).is_file() else None
    if path.exists():
        return None
    try:
        return Path(hf_hub_download(source, name, revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError):  # absent from the repo, or offline: the defaults apply
        return None


def check_pos_embed_mode(mode: str) -> None:
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"unknown pos_embed mode {mode!r}; valid: {list(POS_EMBED_MODES)}")


def adapt_pos_embed(
    table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: PosEmbedMode = "adapt"
) -> torch.Tensor:
    """A (1, 2 + F*T, hidden) position table for ``old_grid`` -> one for ``new_grid``.

    ``adapt`` (the original AST recipe): the [CLS]/distillation rows are kept; the patch
    part, seen as a (hidden, F, T) plane, is first fitted along time then along frequency:
    a shorter axis keeps the middle ``new`` entries from ``old // 2 - new // 2``, a longer
    one is bilinearly interpolated (``align_corners=False``, torch's default used there).
    ``zeros``: an all-zero table, tokens included, which is what transformers'
    ``from_pretrained(..., ignore_mismatched_sizes=True)`` gives a resized AST.
    An unchanged grid returns ``table`` as it is in both modes.
    """
    check_pos_embed_mode(mode)
    (old_f, old_t), (new_f, new_t) = old_grid, new_grid
    if (old_f, old_t) == (new_f, new_t):
        return table
    dim = table.shape[-1]
    if mode == "zeros":
        return table.new_zeros(1, NUM_SPECIAL_TOKENS + new_f * new_t, dim)
    tokens, patches = table[:, :NUM_SPECIAL_TOKENS], table[:, NUM_SPECIAL_TOKENS:]
    plane = patches.transpose(1, 2).reshape(1, dim, old_f, old_t)
    plane = _fit_axis(plane, new_t, axis=3)
    plane = _fit_axis(plane, new_f, axis=2)
    return torch.cat([tokens, plane.flatten(2).transpose(1, 2)], dim=1)


def _fit_axis(plane: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    old = plane.shape[axis]
    if size < old:
        return plane.narrow(axis, old // 2 - size // 2, size)
    if size > old:
        target = list(plane.shape[2:])
        target[axis - 2] = size
        return F.interpolate(plane, size=tuple(target), mode="bilinear", align_corners=False)
    return plane


def convert_state_dict(
    state: Mapping[str, torch.Tensor], source: str = "<state dict>"
) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Checkpoint tensors -> (our float32 state dict, ignored head keys, format name).

    Keys are only renamed here; :func:`load_backbone` checks completeness and shapes.
    """
    fmt, prefix = _detect_format(state, source)
    rules = {"transformers": _TRANSFORMERS_RULES, "original": _ORIGINAL_RULES, "audiopetl": _OURS_RULES}[fmt]
    ours: dict[str, torch.Tensor] = {}
    ignored, unknown = [], []
    for key, tensor in state.items():
        name = key.removeprefix("module.").removeprefix(prefix)  # "module.": saved from DataParallel
        if name.startswith(_IGNORED_HEADS[fmt]):
            ignored.append(key)
            continue
        new = _rename(name, rules)
        if fmt == "original" and new is not None and re.fullmatch(r"blocks\.\d+\.attn\.qkv\.(weight|bias)", new):
            # timm fuses q, k, v into one (3 * hidden, ...) projection, stacked in that order.
            for part, chunk in zip("qkv", tensor.float().chunk(3)):
                ours[new.replace(".qkv.", f".{part}.")] = chunk.clone()
        elif new is None or not CANONICAL_KEY.fullmatch(new):
            unknown.append(key)
        else:
            ours[new] = tensor.float()
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys for an AST checkpoint ({fmt} layout): {unknown}")
    return ours, ignored, fmt


def _detect_format(state: Mapping[str, torch.Tensor], source: str) -> tuple[str, str]:
    """(format, key prefix to drop) from telltale keys."""
    names = {key.removeprefix("module.") for key in state}
    for prefix in ("", "audio_spectrogram_transformer."):
        if prefix + "embeddings.patch_embeddings.projection.weight" in names:
            return "transformers", prefix
    if "v.patch_embed.proj.weight" in names:
        return "original", ""
    if "patch_embed.proj.weight" in names:
        return "audiopetl", ""
    sample = sorted(state)[:8]
    raise CheckpointError(
        f"{source}: not an AST checkpoint: no patch-embedding weight "
        f"('embeddings.patch_embeddings.projection.weight', 'v.patch_embed.proj.weight' or "
        f"'patch_embed.proj.weight'); its first keys are {sample}"
    )


def _rename(name: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        renamed, count = re.subn("^" + pattern, replacement, name, count=1)
        if count:
            return renamed
    return None


def _checkpoint_config(
    state: dict[str, torch.Tensor], config_json: dict | None, fmt: str, num_heads: int | None, source: str
) -> ASTConfig:
    """Our config from config.json when there is one, else inferred from tensor shapes."""
    if config_json is not None:
        return config_from_transformers(config_json, num_heads, source)
    _require(state, ["pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"], source)
    hidden = state["pos_embed"].shape[-1]
    if num_heads is None and hidden % HEAD_DIM:
        raise CheckpointError(f"{source}: cannot infer the head count of hidden size {hidden}; pass num_heads")
    patch = state["patch_embed.proj.weight"].shape[-1]
    freq = (ORIGINAL_NUM_MEL_BINS - patch) // ORIGINAL_STRIDE + 1
    patches = state["pos_embed"].shape[1] - NUM_SPECIAL_TOKENS
    if patches % freq:
        raise CheckpointError(
            f"{source}: 'pos_embed' has {patches} patch rows, not a {freq}-row grid "
            f"({ORIGINAL_NUM_MEL_BINS} mel bins, stride {ORIGINAL_STRIDE}); add a config.json"
        )
    time = patches // freq
    # Several lengths share a grid; 1024 is the release's own, else take the shortest.
    frames = ORIGINAL_FRAMES if time == 101 else (time - 1) * ORIGINAL_STRIDE + patch
    layers = 1 + max(int(m[1]) for key in state if (m := re.match(r"blocks\.(\d+)\.", key)))
    try:
        return ASTConfig(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=num_heads or hidden // HEAD_DIM,
            mlp_size=state["blocks.0.mlp.fc1.weight"].shape[0],
            num_mel_bins=ORIGINAL_NUM_MEL_BINS,
            max_frames=frames,
            patch_size=patch,
            frequency_stride=ORIGINAL_STRIDE,
            time_stride=ORIGINAL_STRIDE,
            layer_norm_eps=_INFERRED_EPS[fmt],
            qkv_bias="blocks.0.attn.q.bias" in state,
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: inferred an invalid config: {err}") from err


def config_from_transformers(values: dict, num_heads: int | None = None, source: str = "config.json") -> ASTConfig:
    """Our config from a transformers AST ``config.json`` (or ``ASTConfig.to_dict()``)."""
    if values.get("model_type") != "audio-spectrogram-transformer":
        raise CheckpointError(
            f"{source}: config.json has model_type {values.get('model_type')!r}, "
            "not an AST ('audio-spectrogram-transformer')"
        )
    if values.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {values['hidden_act']!r} is not supported (only 'gelu')")
    patch = values.get("patch_size", 16)
    if isinstance(patch, list):
        if len(set(patch)) != 1:
            raise CheckpointError(f"{source}: only square patches are supported, got patch_size {patch}")
        patch = patch[0]
    heads = values.get("num_attention_heads", 12)
    if num_heads is not None and num_heads != heads:
        raise CheckpointError(f"{source}: num_heads={num_heads} contradicts config.json ({heads} heads)")
    # Missing fields take transformers' ASTConfig defaults, which are also ours.
    defaults = ASTConfig()
    try:
        return ASTConfig(
            hidden_size=values.get("hidden_size", defaults.hidden_size),
            num_layers=values.get("num_hidden_layers", defaults.num_layers),
            num_heads=heads,
            mlp_size=values.get("intermediate_size", defaults.mlp_size),
            num_mel_bins=values.get("num_mel_bins", defaults.num_mel_bins),
            max_frames=values.get("max_length", defaults.max_frames),
            patch_size=patch,
            frequency_stride=values.get("frequency_stride", defaults.frequency_stride),
            time_stride=values.get("time_stride", defaults.time_stride),
            layer_norm_eps=values.get("layer_norm_eps", defaults.layer_norm_eps),
            qkv_bias=values.get("qkv_bias", defaults.qkv_bias),
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: config.json describes an invalid AST: {err}") from err


def _require(state: Mapping[str, torch.Tensor], keys: list[str], source: str) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"{source}: missing keys (our names) {missing}")


def _check_keys_and_shapes(state: Mapping[str, torch.Tensor], config: ASTConfig, source: str) -> None:
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in AST(config).state_dict().items()}
    _require(state, list(expected), source)
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: keys (our names) that a {config.num_layers}-layer AST does not have: {extra}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {shape}" for k, shape in expected.items() if state[k].shape != shape]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes do not match the config (checkpoint != expected): {wrong}")


def _resolve(source: str, cache_dir: str | Path | None, revision: str | None) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a local file, a local directory or a hub repo."""
    path = Path(source).expanduser()
    if path.is_dir():
        weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if weights is None:
            found = sorted(p.name for p in path.iterdir())
            raise CheckpointError(f"{path}: no weights file; expected one of {list(WEIGHT_FILES)}, found {found}")
        config = path / CONFIG_FILE
        return weights, config if config.is_file() else None
    if path.is_file():
        return path, None
    # Hub ids are "name" or "owner/name" (dots allowed: "...-10-10-0.4593"); other missing names are bad paths.
    looks_like_file = path.suffix in (".safetensors", ".bin", ".pth", ".pt")
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 or looks_like_file:
        raise CheckpointError(f"no such checkpoint file or directory: {source!r}")
    return _download(source, cache_dir, revision)


def _download(repo_id: str, cache_dir: str | Path | None, revision: str | None) -> tuple[Path, Path]:
    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))

    try:
        config = fetch(CONFIG_FILE)
        for name in WEIGHT_FILES:
            try:
                return fetch(name), config
            except RemoteEntryNotFoundError:
                continue  # the repo lacks this format; try the next
    except (OSError, ValueError) as err:  # not found, offline, bad id: the hub's message says which
        raise CheckpointError(
            f"{repo_id!r} is not a local file or directory and could not be fetched from the Hugging Face Hub: {err}"
        ) from err
    raise CheckpointError(f"hub repo {repo_id!r} has none of {list(WEIGHT_FILES)}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and pickle raise many types for a damaged file
        raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read config ({err})") from err


def fingerprint_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """First 16 hex digits of a sha256 over the backbone tensors of ``state``.

    Only keys of :data:`CANONICAL_KEY` count, after ``X.base.weight``/``X.base.bias`` are
    read as ``X.weight``/``X.bias`` (a wrapped frozen projection, e.g. LoRA's); other keys
    (adapters, prompts, heads) are ignored. Each tensor is hashed by sorted name, shape and
    float32 bytes, so the value does not depend on dtype, device or key order. Pass the
    backbone's own state dict (names without a ``backbone.`` prefix).
    """
    canonical: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = re.sub(r"\.base\.(weight|bias)$", r".\1", name)
        if CANONICAL_KEY.fullmatch(key):
            canonical[key] = tensor
    missing = [key for key in ("patch_embed.proj.weight", "pos_embed") if key not in canonical]
    if missing:
        raise ValueError(f"not an AST backbone state dict: missing {missing}")
    return digest_tensors(canonical)


def backbone_fingerprint(model) -> str:
    """The weights fingerprint of a backbone of any family (:func:`~audiopetl.backbone.registry.fingerprint`;
    for AST the same as :func:`fingerprint_state_dict` of ``model.state_dict()``).

    Take it on the backbone as loaded (``model.load_report.fingerprint``): training backbone
    tensors (BitFit, LayerNorm tuning) or another ``max_frames`` / ``pos_embed`` changes it.
    """
    return fingerprint(model)


__all__ = [
    "CANONICAL_KEY",
    "CheckpointError",
    "LoadReport",
    "POS_EMBED_MODES",
    "PosEmbedMode",
    "WEIGHT_FILES",
    "adapt_pos_embed",
    "backbone_fingerprint",
    "check_pos_embed_mode",
    "config_from_transformers",
    "convert_state_dict",
    "fingerprint_state_dict",
    "load_backbone",
]
