"""Attention alone, forward + backward: SDPA vs two GEMMs around a softmax ("matmul").

The evidence for ``audiopetl.backbone.ast.attention_kernel``'s default: for each sequence
length (the AST's token counts at 100 to 1024 frames) both kernels run the same
(batch, 12 heads, tokens, 64) attention, their timed calls interleaved (A B A B ...) so a
drifting machine load hits both alike, and the median of each is reported with the ratio
and the bytes the matmul kernel keeps for the backward (the probabilities).

    python benchmarks/bench_attention.py                    # CPU, bf16 where the CPU has fast bf16, and fp32
    python benchmarks/bench_attention.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import parse_shapes  # noqa: E402
from common import has_fast_cpu_bf16, machine, print_table, synchronize  # noqa: E402

# (frames, batch): tokens = 12 * ((frames - 16) // 10 + 1) + 2 for 128 mel bins.
SHAPES = ((100, 8), (300, 4), (500, 4), (700, 2), (1024, 2))


def tokens(frames: int) -> int:
    from audiopetl.backbone import ASTConfig

    return ASTConfig(max_frames=frames).num_tokens


def timed_pair(q, k, v, grad, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each kernel's forward + backward ("sdpa", "matmul") and forward alone
    without autograd ("sdpa fwd", "matmul fwd"), all interleaved."""
    from audiopetl.backbone.ast import _matmul_attention

    functions = {"sdpa": F.scaled_dot_product_attention, "matmul": _matmul_attention}

    def train(function):
        function(q, k, v).backward(grad)

    def infer(function):
        with torch.no_grad():
            function(q, k, v)

    runs = {**{n: (train, f) for n, f in functions.items()}, **{f"{n} fwd": (infer, f) for n, f in functions.items()}}
    times = {name: [] for name in runs}
    for _ in range(repeats + 1):  # the first round warms up
        for name, (run, function) in runs.items():
            q.grad = k.grad = v.grad = None
            synchronize(device)
            started = time.perf_counter()
            run(function)
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", help="comma-separated: bf16,fp32 (default: bf16 on CUDA/fast-bf16 CPUs, and fp32)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="folder: append the table to attention.md")
    parser.add_argument("--shapes", default=",".join(f"{f}x{b}" for f, b in SHAPES),
                        help="FRAMESxBATCH list (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="one short sequence: a smoke run in seconds")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = args.dtypes or ("bf16,fp32" if device.type == "cuda" or has_fast_cpu_bf16() else "fp32")
    print(f"machine: {machine(device)}")
    rows = []
    for dtype_name in dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        for frames, batch in parse_shapes("48x2" if args.tiny else args.shapes):
            length = tokens(frames)
            generator = torch.Generator().manual_seed(0)
            q, k, v, grad = (torch.randn(batch, 12, length, 64, generator=generator).to(device, dtype) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)
            seconds = timed_pair(q, k, v, grad, args.repeats, device)
            # The fp32 softmax output, and its bf16 cast that the second GEMM keeps.
            kept_mb = batch * 12 * length * length * (4 + (2 if dtype == torch.bfloat16 else 0)) / 2**20
            rows.append([dtype_name, frames, length, batch, seconds["sdpa"] * 1e3, seconds["matmul"] * 1e3,
                         seconds["sdpa"] / seconds["matmul"], seconds["sdpa fwd"] / seconds["matmul fwd"], kept_mb])
    print_table(
        f"attention, 12 heads x 64, {device.type}: forward + backward (training), and forward alone (inference)",
        ["dtype", "frames", "tokens", "batch", "sdpa ms", "matmul ms", "matmul speed-up", "inference speed-up",
         "matmul keeps MB/layer"],
        rows,
        markdown=Path(args.out) / "attention.md" if args.out else None,
    )


if __name__ == "__main__":
    main()
