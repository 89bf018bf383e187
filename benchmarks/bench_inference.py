"""Inference with a LoRA adapter: unmerged vs. merged into the frozen weights vs. the plain
backbone with a head (the zero-overhead target).

    python benchmarks/bench_inference.py [--frames 500] [--batch 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ast_flops, machine, matmul_peak_gflops, median_seconds, print_table  # noqa: E402

from audiopetl.backbone import load_backbone  # noqa: E402
from audiopetl.petl import LinearProbeConfig, LoRAConfig, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from bench_train_step import checkpoint_dir

    backbone = load_backbone(checkpoint_dir(), max_frames=args.frames)
    lora = build_model(backbone, LoRAConfig(targets=("q", "v"), reduction_rate=128, alpha=8.0), num_classes=50).eval()
    with torch.no_grad():  # a trained adapter: non-zero B factors
        for parameter in lora.trainable_parameters():
            parameter.normal_(std=0.02)
    plain = build_model(load_backbone(checkpoint_dir(), max_frames=args.frames), LinearProbeConfig(), num_classes=50)
    plain.eval()
    features = torch.randn(args.batch, args.frames, 128)

    def timed(model):
        with torch.inference_mode():
            return median_seconds(lambda: model(features), repeats=args.repeats)

    with torch.inference_mode():
        unmerged_out = lora(features)
    t_unmerged = timed(lora)
    lora.merge_lora()
    with torch.inference_mode():
        difference = (lora(features) - unmerged_out).abs().max().item()
    t_merged, t_plain = timed(lora), timed(plain)
    peak = matmul_peak_gflops()
    flops = ast_flops(args.frames, args.batch)
    print(f"machine: {machine()}; fp32 matmul peak {peak:.0f} GFLOP/s")
    print_table(
        f"inference, ViT-B, {args.frames} frames, batch {args.batch} (merged vs unmerged max |diff| {difference:.1e})",
        ["model", "ms/clip", "vs plain", "forward MFU"],
        [
            [name, 1000 * t / args.batch, t / t_plain, f"{100 * flops / t / 1e9 / peak:.0f}%"]
            for name, t in (
                ("plain backbone + head", t_plain),
                ("LoRA q,v unmerged", t_unmerged),
                ("LoRA q,v merged", t_merged),
            )
        ],
    )


if __name__ == "__main__":
    main()
