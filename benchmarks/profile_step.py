"""Where a training step copies and what it keeps: copy/cast ops per layer and saved-activation bytes.

For each method, one bf16-autocast training step (forward, cross-entropy, backward) of a
ViT-B-wide AST (2 layers by default, so per-layer figures are quick to get) is run with
separate q/k/v projections and the fused q/k/v GEMM (the CUDA default), both with SDPA, the
CPU's own default on a CPU (separate projections, matmul attention for short sequences),
frozen weights stored in bf16 each time, and, for reference, transformers SDPA + PEFT/hooks:

* ``copy_`` calls per layer and the elements they move: every dtype cast, ``contiguous``
  and layout copy ends in one ``aten::copy_``; counted with ``torch.profiler`` over the
  whole step and divided by the number of layers;
* bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``),
  counting each storage once and leaving out the parameters themselves.

    python benchmarks/profile_step.py                     # CPU, 100 frames, batch 4
    python benchmarks/profile_step.py --device cuda --frames 500 --batch 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

METHODS = ("lora", "adapter", "dpt25", "full")


def build(side: str, method: str, layers: int, frames: int, tiny: bool, device: torch.device):
    import bench_train_step as bench
    from audiopetl.backbone import AST, ASTConfig
    from audiopetl.petl import build_model, resolve_methods

    torch.manual_seed(0)
    if side == "peer":
        from transformers import ASTConfig as HFConfig
        from transformers import ASTModel

        sizes = bench.TINY_HF if tiny else {}
        path = Path(tempfile.gettempdir()) / f"audiopetl-profile-{layers}-{'tiny' if tiny else 'vitb'}"
        ASTModel(HFConfig(**{**sizes, "num_hidden_layers": layers, "max_length": frames})).save_pretrained(path)
        return bench.hf(method, frames, "sdpa", tiny, checkpoint=path).to(device)
    width = dict(hidden_size=128, num_heads=2, mlp_size=256) if tiny else {}
    backbone = AST(ASTConfig(num_layers=layers, max_frames=frames, **width))
    backbone.set_fused_qkv(side == "on")
    # "off"/"on" isolate the fused GEMM with SDPA (the CUDA kernel); "default" is this device's default.
    backbone.set_attention_kernel(None if side == "default" else "sdpa")
    model = build_model(backbone, resolve_methods(bench.METHODS[method]), num_classes=bench.NUM_CLASSES).to(device)
    model.cast_frozen(torch.bfloat16)
    return model


def one_step(model, features, labels, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(features).float(), labels)
    loss.backward()


def copies(model, features, labels, device) -> tuple[int, int]:
    """(aten::copy_ calls, elements copied) in one training step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    one_step(model, features, labels, device)  # warm-up
    with profile(activities=activities, record_shapes=True) as prof:
        one_step(model, features, labels, device)
    calls = elements = 0
    for event in prof.events():
        if event.name == "aten::copy_":
            calls += 1
            shape = event.input_shapes[0] if event.input_shapes else []
            elements += int(torch.Size(shape).numel()) if shape else 0
    return calls, elements


def saved_bytes(model, features, labels, device) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(features).float(), labels)
    loss.backward()
    return sum(storages.values())


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-peer", action="store_true", help="leave out transformers + PEFT")
    parser.add_argument("--tiny", action="store_true", help="128-wide model, 48 frames, batch 2: a smoke run")
    parser.add_argument("--out", help="folder: append the table to profile_step.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.frames, args.batch = 48, 2
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, args.frames, 128, generator=generator).to(device)
    labels = torch.randint(0, 50, (args.batch,), generator=generator).to(device)
    sides = ("off", "on") + (("default",) if device.type == "cpu" else ()) + (() if args.no_peer else ("peer",))
    label = {"off": "audiopetl, separate q/k/v, SDPA", "on": "audiopetl, fused q/k/v, SDPA (CUDA default)",
             "default": "audiopetl, CPU default (separate, matmul attention up to 224 keys)",
             "peer": "transformers SDPA + PEFT"}
    rows = []
    for method in args.methods.split(","):
        for side in sides:
            model = build(side, method, args.layers, args.frames, args.tiny, device).train()
            calls, elements = copies(model, features, labels, device)
            saved = saved_bytes(model, features, labels, device)
            rows.append([method, label[side], calls / args.layers, elements / args.layers / 1e6, saved / 2**20])
    print(f"machine: {machine(device)}")
    out = Path(args.out) if args.out else None
    print_table(
        f"one bf16 training step, {args.layers} layers, {args.frames} frames, batch {args.batch}: copies and saved tensors",
        ["method", "side", "copy_ calls / layer", "M elements copied / layer", "saved activations MB"],
        rows,
        markdown=out / "profile_step.md" if out else None,
    )
    return rows


if __name__ == "__main__":
    main()
