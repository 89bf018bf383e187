"""Inference (eval/predict forward) with a LoRA adapter: unmerged, merged into the frozen
weights, and merged + compiled, against the peer's plain backbone (transformers ``ASTModel``,
SDPA, weights in the compute dtype, same head) and our own plain backbone + head.

All sides load the same random ViT-B checkpoint (``bench_train_step.checkpoint_dir``).

    python benchmarks/bench_inference.py --device cuda              # 500 frames, batch 64, bf16
    python benchmarks/bench_inference.py --frames 500 --batch 4     # CPU
    python benchmarks/bench_inference.py --tiny                     # smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ast_flops, has_fast_cpu_bf16, machine, matmul_peak_gflops, median_seconds, print_table  # noqa: E402
from common import synchronize  # noqa: E402


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--batch", type=int, help="default: 64 on CUDA, 4 on CPU")
    parser.add_argument("--repeats", type=int, help="timed calls (median; default: 20 on CUDA, 5 on CPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA / fast-bf16 CPUs")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time merged + compiled blocks (default: on CUDA)")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 48 frames, batch 2: a smoke run")
    parser.add_argument("--out", help="folder: append the table to inference.md")
    args = parser.parse_args(argv)
    from bench_train_step import checkpoint_dir, hf, hidden_size, ours

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    frames = 48 if args.tiny else args.frames
    batch = 2 if args.tiny else args.batch or (64 if cuda else 4)
    repeats = args.repeats or (20 if cuda else 5)
    precision = args.precision or ("bf16" if cuda or has_fast_cpu_bf16() else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    compile_ = args.compile if args.compile is not None else cuda
    checkpoint_dir(args.tiny)
    features = torch.randn(batch, frames, 128, generator=torch.Generator().manual_seed(0)).to(device)

    def timed(forward, autocast: bool = True) -> float:
        def call():
            with torch.autocast(device.type, dtype=dtype, enabled=autocast and dtype != torch.float32):
                forward(features)
            synchronize(device)

        with torch.inference_mode():
            return median_seconds(call, repeats=repeats, warmup=3 if compile_ else 1)

    peer = hf("linear", frames, "sdpa", args.tiny).to(device=device, dtype=dtype).eval()
    t_peer = timed(lambda x: peer(x.to(dtype)), autocast=False)  # a bf16 model takes bf16 features
    del peer

    plain = ours("linear", frames, dtype, args.tiny).to(device).eval()
    if dtype != torch.float32:
        plain.cast_frozen(dtype)
    t_plain = timed(plain)
    del plain

    lora = ours("lora", frames, dtype, args.tiny).to(device).eval()
    with torch.no_grad():  # a trained adapter: non-zero B factors
        for parameter in lora.trainable_parameters():
            parameter.normal_(std=0.02)
    if dtype != torch.float32:
        lora.cast_frozen(dtype)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        unmerged_out = lora(features).float()
    t_unmerged = timed(lora)
    lora.merge_lora()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        difference = (lora(features).float() - unmerged_out).abs().max().item()
    t_merged = timed(lora)
    rows_in = [
        ("transformers SDPA, plain backbone + head", t_peer),
        ("audiopetl plain backbone + head", t_plain),
        ("audiopetl LoRA q,v unmerged", t_unmerged),
        ("audiopetl LoRA q,v merged", t_merged),
    ]
    if compile_:
        lora.backbone.compile_blocks()
        rows_in.append(("audiopetl LoRA q,v merged, compiled blocks", timed(lora)))

    peak = matmul_peak_gflops(dtype, size=256 if args.tiny else 8192 if cuda else 2048, device=str(device))
    from audiopetl.backbone import ASTConfig

    config = ASTConfig(hidden_size=128, num_layers=2, num_heads=2, mlp_size=256) if args.tiny else None
    assert hidden_size(args.tiny) == (config.hidden_size if config else 768)
    flops = ast_flops(frames, batch, config=config)
    print(f"machine: {machine(device)}; {precision} matmul peak {peak:.0f} GFLOP/s")
    rows = [[name, batch / t, t_peer / t, f"{100 * flops / t / 1e9 / peak:.1f}%"] for name, t in rows_in]
    out = Path(args.out) if args.out else None
    print_table(
        f"inference, {'tiny AST' if args.tiny else 'ViT-B'}, {frames} frames, batch {batch}, {precision} "
        f"(merged vs unmerged max |diff| {difference:.1e})",
        ["model", "samples/s", "x peer plain", "forward MFU"],
        rows,
        markdown=out / "inference.md" if out else None,
    )
    return rows


if __name__ == "__main__":
    main()
