"""Parameter counts without weights: per-method counts, the paper's table, and budget sizing.

Counts come from building the real model on the ``meta`` device (shapes, no memory), so
they can never drift from what training uses. The paper counts exclude the head and the
final LayerNorm except for linear probing and full fine-tuning, and except the final
LayerNorm tensors a method trains itself: BitFit's bias, and in post-LN models (whose final
LayerNorm is the last FFN sub-layer's) that of adapters and mixtures on the FFN
(:meth:`PETLModel.paper_parameter_count`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..backbone.ast import ASTConfig
from ..backbone.registry import build_backbone
from .config import AdapterConfig, DenseMoAConfig, LoRAConfig, MethodConfig, PrefixConfig, PromptConfig, SoftMoAConfig
from .model import PETLModel, build_model
from .registry import resolve_methods

_ADAPTER_FFN_PAR = {"method": "adapter", "location": "ffn", "insertion": "parallel", "position": "before"}

# (table, row label, method spec, the paper's published count or None, note).
PAPER_ROWS: list[tuple[str, str, Any, int | None, str]] = [
    ("I", "Full FT", "full", 85_500_000,
     "paper 85.5M matches no clip length exactly; ours depends on max_frames (position table)"),
    ("I", "Linear", "linear", None, "paper: 9-40K over its datasets (10-50 classes); head + final LayerNorm"),
    ("I", "BitFit", "bitfit", 102_000, "12 x 8,448 block biases + the final LayerNorm's bias"),
    ("I", "SPT-300", "spt", 230_000, ""),
    ("I", "DPT-25", "dpt", 230_000, ""),
    ("I", "Pref-T 24", "prefix", 221_000, ""),
    ("I", "Bottleneck PF par", "bottleneck_pf_par", 249_000, ""),
    ("I", "Bottleneck PF seq", "bottleneck_pf_seq", 249_000, ""),
    ("I", "Bottleneck HOU par", "bottleneck_hou_par", 498_000, ""),
    ("I", "Bottleneck HOU seq", "bottleneck_hou_seq", 498_000, ""),
    ("I", "Convpass PF par", "convpass_pf_par", 254_000, ""),
    ("I", "Convpass PF seq", "convpass_pf_seq", 254_000, ""),
    ("I", "Convpass HOU par", "convpass_hou_par", 508_000, "paper: 2 x 254K"),
    ("I", "Convpass HOU seq", "convpass_hou_seq", 508_000, "paper: 2 x 254K"),
    ("I", "LoRA", "lora", 221_000, ""),
    *[
        ("III", f"{loc.upper()}-{ins[:3].title()}-{pos.title()}",
         {"method": "adapter", "location": loc, "insertion": ins, "position": pos}, None, "")
        for loc in ("ffn", "mhsa")
        for ins, pos in (("sequential", "after"), ("sequential", "before"), ("parallel", "before"))
    ],
    ("IV", "LoRA Wq (RR 64)", "lora_q", 221_000, ""),
    ("IV", "LoRA Wq,Wk (RR 128)", "lora_qk", 221_000, ""),
    ("IV", "LoRA Wq,Wv (RR 128)", "lora_qv", 221_000, ""),
    ("IV", "LoRA Wq,Wk,Wv,Wo (RR 256)", "lora_qkvo", 221_000, ""),
    ("V", "PF FFN-Seq-After", "bottleneck_pf_seq", 249_000, ""),
    ("V", "PF MHSA-Par-Before", "bottleneck_pf_par", 249_000, ""),
    ("V", "PF FFN-Seq-After x2", {"method": "bottleneck_pf_seq", "reduction_rate": 32}, 470_000, ""),
    ("V", "PF MHSA-Par-Before x2", {"method": "bottleneck_pf_par", "reduction_rate": 32}, 470_000, ""),
    ("V", "HOU seq", "bottleneck_hou_seq", 498_000, ""),
    ("V", "HOU par", "bottleneck_hou_par", 498_000, ""),
    ("V", "HOU mixed", "bottleneck_hou_mixed", 498_000, ""),
    ("V", "HYDRA FFN", "bottleneck_hydra", 470_000,
     "paper 470K (HYDRA has no published code); ours: two RR-64 adapters + the FFN LayerNorm per layer"),
    ("VI", "LoRA (RR 64)", {"method": "lora", "reduction_rate": 64}, 442_000, ""),
    ("VI", "Adapter + LoRA", [_ADAPTER_FFN_PAR, "lora"], 470_000, ""),
    ("VI", "Adapter + DPT-25", [_ADAPTER_FFN_PAR, "dpt"], 479_000, ""),
    ("VI", "Adapter + DPT-14 + LoRA",
     [_ADAPTER_FFN_PAR, {"method": "dpt", "num_prompts": 14}, {"method": "lora", "reduction_rate": 256}],
     488_000, ""),
    *[
        ("VII", f"{ins[:3].title()} {'residual' if res else 'no residual'}",
         {"method": "adapter", "location": "ffn", "insertion": ins, "position": pos, "residual": res}, None, "")
        for ins, pos in (("sequential", "after"), ("parallel", "before"))
        for res in (True, False)
    ],
    # The paper's code base beyond the paper (no published counts): the Conformer adapter and
    # the Soft-MoA follow-up's mixtures at its authors' defaults (7 bottleneck experts, RR 128).
    ("code", "Conformer PF par (RR 64, k 31)", "conformer_pf_par", None, ""),
    ("code", "Conformer HOU par (RR 64, k 31)", "conformer_hou_par", None, ""),
    ("MoA", "Dense-MoA PF MHSA (N 7)", "dense_moa", None, ""),
    ("MoA", "Soft-MoA PF MHSA (N 7, p 1)", "soft_moa", None, ""),
    ("MoA", "Dense-MoA HOU (N 7)", {"method": "dense_moa", "layout": "houlsby"}, None, ""),
    ("MoA", "Soft-MoA HOU (N 7, p 1)", {"method": "soft_moa", "layout": "houlsby"}, None, ""),
]


def meta_model(method: Any, backbone_config: ASTConfig, num_classes: int = 50) -> PETLModel:
    """The model ``method`` builds, on the meta device: exact shapes, no memory, no weights."""
    with torch.device("meta"):
        return build_model(build_backbone(backbone_config), method, num_classes=num_classes)


def count_method_parameters(method: Any, backbone_config: ASTConfig, num_classes: int = 50) -> int:
    """Trainable parameters of ``method`` as the paper counts them (see module docstring)."""
    return _count(resolve_methods(method), backbone_config, num_classes)


@functools.lru_cache(maxsize=4096)
def _count(methods: tuple[MethodConfig, ...], backbone_config: ASTConfig, num_classes: int) -> int:
    # Cached: budget searches and recipe expansion ask for the same sizes many times.
    return meta_model(methods, backbone_config, num_classes).paper_parameter_count()


def _size_knob(config: MethodConfig, backbone_config: ASTConfig, target: int) -> tuple[list, Callable]:
    """Values of ``config``'s size knob, in increasing-parameter order, and value -> config."""
    dim = backbone_config.hidden_size
    if isinstance(config, (LoRAConfig, AdapterConfig, DenseMoAConfig, SoftMoAConfig)):
        # One reduction rate per reachable width d // RR, largest RR (smallest width) first.
        rates = sorted({dim // rank for rank in range(1, dim + 1)}, reverse=True)
        return rates, lambda rr: dataclasses.replace(config, reduction_rate=rr)
    if isinstance(config, PromptConfig):  # >= dim parameters per prompt
        return list(range(1, target // dim + 2)), lambda p: dataclasses.replace(config, num_prompts=p)
    if isinstance(config, PrefixConfig):  # >= 2 * dim parameters per key/value pair
        return list(range(2, 2 * (target // dim) + 3, 2)), lambda p: dataclasses.replace(config, num_tokens=p)
    raise ValueError(f"method {config.method!r} has no size to choose; budgets apply to lora, adapter, dense_moa, soft_moa, prompt, prefix")


def parameter_budget(method: MethodConfig | str | Mapping, target: int, backbone_config: ASTConfig) -> MethodConfig:
    """``method`` with its reduction rate / prompt count set so its paper count is closest to ``target``."""
    methods = resolve_methods(method)
    if len(methods) != 1:
        raise ValueError("parameter_budget sizes one method; got a combination")
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f"target must be a positive number of parameters, got {target!r}")
    values, make = _size_knob(methods[0], backbone_config, target)

    def count(index: int) -> int:
        return count_method_parameters(make(values[index]), backbone_config)

    low, high = 0, len(values) - 1  # binary search: first value whose count reaches the target
    while low < high:
        middle = (low + high) // 2
        if count(middle) < target:
            low = middle + 1
        else:
            high = middle
    best = min({low, max(low - 1, 0)}, key=lambda i: (abs(count(i) - target), i))
    return make(values[best])


def parameter_table(
    backbone_config: ASTConfig, num_classes: int = 50, methods: Mapping[str, Any] | None = None
) -> list[dict]:
    """One row per method: paper-convention count, count with head, the paper's figure.

    ``methods``: row label -> method spec; default: every configuration of the paper's tables.
    """
    specs = [("", label, spec, None, "") for label, spec in methods.items()] if methods else PAPER_ROWS
    rows = []
    for table, label, spec, paper, note in specs:
        model = meta_model(spec, backbone_config, num_classes)
        rows.append({
            "table": table,
            "method": label,
            "config": [m.to_dict() for m in model.methods],
            "parameters": model.paper_parameter_count(),
            "with_head": model.num_trainable(),
            "paper": paper,
            "note": note,
        })
    return rows


def _short(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.0f}K"


def format_parameter_table(rows: Sequence[dict]) -> str:
    """Rows of :func:`parameter_table` as an aligned text table."""
    header = ("Table", "Method", "Params (paper conv.)", "With head", "Paper", "Note")
    lines = [
        (row["table"], row["method"], f"{row['parameters']:,} ({_short(row['parameters'])})",
         f"{row['with_head']:,}", _short(row["paper"]), row["note"])
        for row in rows
    ]
    widths = [max(len(str(cells[i])) for cells in (header, *lines)) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in (header, *lines)]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
