"""Training-step throughput and peak memory: audiopetl vs. transformers (+ PEFT), ViT-B AST.

For each method (LoRA q,v RR 128; Bottleneck PF parallel RR 64; DPT-25; full fine-tuning)
and clip length, every side runs in its own process on the same random ViT-B weights and
inputs: a full step is forward, cross-entropy, backward and AdamW over the trainable
parameters. Baselines are transformers' ``ASTModel`` with ``attn_implementation`` "eager"
(what the paper's code used) and "sdpa"; LoRA through PEFT, the adapter and the deep
prompts through forward hooks (PEFT has neither), full fine-tuning as is. Before timing,
one process builds both models from the same checkpoint and checks their losses agree.

    python benchmarks/bench_train_step.py                       # all methods, 500 and 100 frames
    python benchmarks/bench_train_step.py --methods lora --frames 500 --steps 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import ast_flops, emit, machine, matmul_peak_gflops, peak_rss_mb, print_table, run_worker  # noqa: E402

METHODS = {
    "lora": {"method": "lora", "targets": ["q", "v"], "reduction_rate": 128, "alpha": 8.0},
    "adapter": "bottleneck_pf_par",
    "dpt25": {"method": "prompt", "num_prompts": 25, "deep": True},
    "full": "full",
}
BATCH = {500: 4, 100: 16}
NUM_CLASSES = 50
SIDES = ("audiopetl", "hf-eager", "hf-sdpa")


# ----------------------------------------------------------------------------- models
def checkpoint_dir() -> Path:
    """A random ViT-B AST saved once in transformers' format; every side loads it."""
    path = Path(tempfile.gettempdir()) / "audiopetl-bench-vitb"
    if not (path / "model.safetensors").exists():
        from transformers import ASTConfig, ASTModel

        torch.manual_seed(0)
        model = ASTModel(ASTConfig())
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 3:  # special tokens and position table start at zero in transformers
                    p.normal_(std=0.02)
        model.save_pretrained(path)
    return path


def head(hidden: int = 768) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(hidden, NUM_CLASSES)


def ours(method: str, frames: int, dtype: torch.dtype):
    from audiopetl.backbone import load_backbone
    from audiopetl.petl import build_model, resolve_methods

    # "zeros" builds the position table exactly as the baselines' from_pretrained does,
    # so the numerics check compares like with like; it costs the same as "adapt".
    backbone = load_backbone(checkpoint_dir(), max_frames=frames, pos_embed="zeros")
    model = build_model(backbone, resolve_methods(METHODS[method]), num_classes=NUM_CLASSES)
    with torch.no_grad():
        model.head.load_state_dict(head().state_dict())
    if dtype != torch.float32:
        model.cast_frozen(dtype)
    return model


class HFClassifier(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head()

    def forward(self, features):
        return self.head(self.backbone(features).last_hidden_state.mean(dim=1))


class Bottleneck(nn.Module):
    def __init__(self, dim: int = 768, rank: int = 12) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


def hf(method: str, frames: int, attention: str):
    """transformers' model with the method attached the way a script on top of it would."""
    from transformers import ASTModel

    backbone = ASTModel.from_pretrained(
        checkpoint_dir(), max_length=frames, ignore_mismatched_sizes=True, attn_implementation=attention
    )
    model = HFClassifier(backbone)
    if method == "full":
        return model
    backbone.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # PEFT scales by lora_alpha / r; the paper's alpha / RR = 8 / 128 with r = 768 / 128 = 6.
        config = LoraConfig(r=6, lora_alpha=6 * 8 / 128, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model.backbone = get_peft_model(backbone, config)
    elif method == "adapter":
        model.adapters = nn.ModuleList(Bottleneck() for _ in backbone.layers)
        for layer, adapter in zip(backbone.layers, model.adapters):
            layer.layernorm_before.requires_grad_(True)
            # MHSA parallel-before: attention(LN(x)) + adapter(LN(x)).
            layer.attention.register_forward_hook(
                lambda module, args, output, adapter=adapter: (output[0] + adapter(args[0]), *output[1:])
            )
    elif method == "dpt25":
        model.prompts = nn.ParameterList(nn.Parameter(torch.randn(1, 25, 768) * 0.02) for _ in backbone.layers)
        for index, (layer, prompt) in enumerate(zip(backbone.layers, model.prompts)):

            def insert(module, args, kwargs, prompt=prompt, first=index == 0):
                x = args[0]
                tokens = prompt.expand(len(x), -1, -1).to(x.dtype)
                rest = x[:, 2:] if first else x[:, 2 + tokens.shape[1] :]
                return (torch.cat([x[:, :2], tokens, rest], dim=1), *args[1:]), kwargs

            layer.register_forward_pre_hook(insert, with_kwargs=True)
    model.head.requires_grad_(True)
    backbone.layernorm.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- measuring
def step_fn(model: nn.Module, features, labels, dtype: torch.dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(features).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def inputs(frames: int, batch: int):
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, frames, 128, generator=generator), torch.randint(0, NUM_CLASSES, (batch,), generator=generator)


def worker(side: str, method: str, frames: int, batch: int, steps: int, precision: str) -> None:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = ours(method, frames, dtype) if side == "audiopetl" else hf(method, frames, side.split("-")[1])
    features, labels = inputs(frames, batch)
    step = step_fn(model, features, labels, dtype)
    step()  # warm-up: allocator, kernel selection, optimizer state
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit({"samples_per_s": batch / seconds, "step_s": seconds, "peak_rss_mb": peak_rss_mb(), "trainable": trainable})


def check(method: str, frames: int) -> float:
    """Loss of both implementations on the same batch, before any update: must agree.

    Prompts are random on each side, so they are zeroed on both for the comparison.
    """
    features, labels = inputs(frames, 2)
    losses = []
    for build in (lambda: ours(method, frames, torch.float32), lambda: hf(method, frames, "sdpa")):
        model = build().eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "prompt" in name:
                    parameter.zero_()
            losses.append(F.cross_entropy(model(features), labels).item())
    return abs(losses[0] - losses[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=6, metavar=("SIDE", "METHOD", "FRAMES", "BATCH", "STEPS", "PRECISION"))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {list(METHODS)}")
    parser.add_argument("--frames", default="500,100", help="clip lengths (paper: ESC-50 500, GSC 100)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast on every side, and our frozen weights stored in bf16")
    args = parser.parse_args()
    if args.worker:
        side, method, frames, batch, steps, precision = args.worker
        worker(side, method, int(frames), int(batch), int(steps), precision)
        return

    checkpoint_dir()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak_gflops(dtype)
    print(f"machine: {machine()}; {args.precision} matmul peak {peak:.0f} GFLOP/s")
    for frames in map(int, args.frames.split(",")):
        rows = []
        for method in args.methods.split(","):
            batch = BATCH.get(frames, 4)
            difference = check(method, frames)
            assert difference < 1e-3, f"{method}: losses differ by {difference}"
            results = {s: run_worker(__file__, s, method, frames, batch, args.steps, args.precision) for s in SIDES}
            best = max(results["hf-eager"]["samples_per_s"], results["hf-sdpa"]["samples_per_s"])
            mem = min(results["hf-eager"]["peak_rss_mb"], results["hf-sdpa"]["peak_rss_mb"])
            ours_ = results["audiopetl"]
            flops = ast_flops(frames, batch, extra_tokens=25 if method == "dpt25" else 0, step=method)
            mfu = flops / ours_["step_s"] / 1e9 / peak
            for side in SIDES:
                r = results[side]
                rows.append([
                    method, side, r["trainable"], r["samples_per_s"], r["peak_rss_mb"],
                    r["samples_per_s"] / best if side == "audiopetl" else "",
                    r["peak_rss_mb"] / mem if side == "audiopetl" else "",
                    f"{100 * mfu:.0f}%" if side == "audiopetl" else "",
                    f"{difference:.1e}" if side == "audiopetl" else "",
                ])
        print_table(
            f"training step, ViT-B, {frames} frames, batch {BATCH.get(frames, 4)}, {args.precision}",
            ["method", "side", "trainable", "samples/s", "peak MB", "x best", "mem ratio", "MFU", "|dloss|"],
            rows,
        )


if __name__ == "__main__":
    main()
