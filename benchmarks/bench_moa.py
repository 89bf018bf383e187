"""Mixtures of adapters: forward + backward time of one mixture layer, Soft-MoA vs Dense-MoA,
with the single adapter as the baseline (ViT-B width, an ESC-50 sequence, bottleneck experts).

Soft-MoA's experts see N * p slots instead of every token, so its cost should stay close to
the single adapter's as N grows, while Dense-MoA's grows with N.

    python benchmarks/bench_moa.py [--tokens 590] [--batch 4] [--experts 2 7 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds, print_table  # noqa: E402

from audiopetl.petl import Bottleneck, DenseMixture, DenseMoAConfig, SoftMixture, SoftMoAConfig  # noqa: E402


def step_seconds(layer: torch.nn.Module, x: torch.Tensor) -> float:
    def step() -> None:
        layer(x).square().mean().backward()

    return median_seconds(step, repeats=5, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=590, help="default: ESC-50 at 500 frames (12 x 49 + 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--reduction-rate", type=int, default=128)
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 7, 15])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.hidden)
    rank = args.hidden // args.reduction_rate
    single = step_seconds(Bottleneck(args.hidden, rank), x)
    rows = []
    for n in args.experts:
        dense = step_seconds(DenseMixture(args.hidden, rank, DenseMoAConfig(num_adapters=n)), x)
        soft = step_seconds(SoftMixture(args.hidden, rank, SoftMoAConfig(num_adapters=n, num_slots=1)), x)
        rows.append([n, single * 1e3, dense * 1e3, soft * 1e3, dense / soft, soft / single])
    print(f"machine: {machine()}")
    print_table(
        f"one mixture layer, forward + backward, batch {args.batch} x {args.tokens} tokens x {args.hidden} "
        f"(RR {args.reduction_rate}, 1 slot), ms",
        ["N", "single adapter", "Dense-MoA", "Soft-MoA", "Dense/Soft", "Soft/single"],
        rows,
    )


if __name__ == "__main__":
    main()
