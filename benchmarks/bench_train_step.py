"""Training-step throughput, peak memory and MFU: audiopetl vs. transformers (+ PEFT), ViT-B AST.

A step is forward, cross-entropy, backward and AdamW over the trainable parameters, for
LoRA q,v RR 128, Bottleneck PF parallel RR 64, DPT-25 and full fine-tuning. Every side
loads the same random ViT-B checkpoint (transformers format) and trains on the same batch:

  audiopetl          the library's defaults: frozen weights stored in the compute dtype,
                     fused q/k/v GEMM, fused AdamW and regional torch.compile on CUDA
  audiopetl-eager    the same without torch.compile
  audiopetl-compile  the same with torch.compile (to measure compile on CPU)
  audiopetl-cudagraphs  compiled with mode "reduce-overhead" (CUDA graphs of the fixed-shape blocks)
  audiopetl-unfused  separate q/k/v projections, no compile (the CPU default)
  audiopetl-fused    fused q/k/v forced on, no compile (the CUDA default, measured on CPU)
  audiopetl-sdpa     attention by SDPA forced, no compile (the CUDA default, measured on CPU)
  audiopetl-matmul   attention by two GEMMs around a softmax forced, no compile
  hf-sdpa            transformers ``ASTModel`` (SDPA) + PEFT LoRA / forward hooks, autocast
  hf-sdpa-compile    the same, ``torch.compile`` of the whole model
  hf-eager           transformers eager attention + PEFT / hooks, autocast
  hf-eager-fp32      transformers eager, fp32: the paper's configuration

"best peer" is the fastest of hf-sdpa, hf-sdpa-compile and hf-eager that ran. With
``--precision bf16`` every side except hf-eager-fp32 runs under bf16 autocast. On CPU
each side runs in its own process (peak memory = its max RSS); on CUDA all sides of one
clip length share a process and peak memory is ``torch.cuda.max_memory_allocated`` per side.
Before timing, the losses of audiopetl and transformers on one batch are checked to agree.

    python benchmarks/bench_train_step.py --device cuda                  # 500x32 and 100x128
    python benchmarks/bench_train_step.py --device cpu --shapes 100x8 --sides audiopetl,hf-sdpa,hf-eager
    python benchmarks/bench_train_step.py --tiny                         # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    ast_flops,
    emit,
    has_fast_cpu_bf16,
    machine,
    matmul_peak_gflops,
    peak_memory_mb,
    print_table,
    reset_peak_memory,
    run_worker,
    synchronize,
)

METHODS = {
    "lora": {"method": "lora", "targets": ["q", "v"], "reduction_rate": 128, "alpha": 8.0},
    "adapter": "bottleneck_pf_par",
    "dpt25": {"method": "prompt", "num_prompts": 25, "deep": True},
    "full": "full",
}
SIDES = {
    "audiopetl": {"impl": "ours"},
    "audiopetl-eager": {"impl": "ours", "compile": False},
    "audiopetl-compile": {"impl": "ours", "compile": True},
    "audiopetl-cudagraphs": {"impl": "ours", "compile": True, "mode": "reduce-overhead"},
    "audiopetl-unfused": {"impl": "ours", "compile": False, "fused": False},
    "audiopetl-fused": {"impl": "ours", "compile": False, "fused": True},
    "audiopetl-sdpa": {"impl": "ours", "compile": False, "attention": "sdpa"},
    "audiopetl-matmul": {"impl": "ours", "compile": False, "attention": "matmul"},
    "hf-sdpa": {"impl": "hf", "attention": "sdpa"},
    "hf-sdpa-compile": {"impl": "hf", "attention": "sdpa", "compile": True},
    "hf-eager": {"impl": "hf", "attention": "eager"},
    "hf-eager-fp32": {"impl": "hf", "attention": "eager", "fp32": True},
}
PEERS = ("hf-sdpa", "hf-sdpa-compile", "hf-eager")
PAPER = "hf-eager-fp32"
DEFAULT_SHAPES = {"cuda": "500x32,100x128", "cpu": "500x4,100x16"}
DEFAULT_SIDES = {
    "cuda": "audiopetl,hf-sdpa,hf-eager-fp32,audiopetl-eager,hf-sdpa-compile",
    "cpu": "audiopetl,audiopetl-fused,hf-sdpa,hf-eager",
}
NUM_CLASSES = 50
# --tiny: a 2-layer, 128-wide AST (LoRA RR 128 still leaves rank 1) at 48 frames, batch 2.
TINY_HF = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)


# ----------------------------------------------------------------------------- models
def checkpoint_dir(tiny: bool = False) -> Path:
    """A random AST (ViT-B, or the tiny one) saved once in transformers' format; every side loads it."""
    path = Path(tempfile.gettempdir()) / ("audiopetl-bench-tiny" if tiny else "audiopetl-bench-vitb")
    if not (path / "model.safetensors").exists():
        from transformers import ASTConfig, ASTModel

        torch.manual_seed(0)
        model = ASTModel(ASTConfig(**(TINY_HF if tiny else {})))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 3:  # special tokens and position table start at zero in transformers
                    p.normal_(std=0.02)
        model.save_pretrained(path)
    return path


def hidden_size(tiny: bool) -> int:
    return TINY_HF["hidden_size"] if tiny else 768


def head(hidden: int) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(hidden, NUM_CLASSES)


def ours(method: str, frames: int, dtype: torch.dtype, tiny: bool, fused: bool | None = None,
         attention: str | None = None):
    from audiopetl.backbone import load_backbone
    from audiopetl.petl import build_model, resolve_methods

    # "zeros" builds the position table exactly as the baselines' from_pretrained does,
    # so the numerics check compares like with like; it costs the same as "adapt".
    backbone = load_backbone(checkpoint_dir(tiny), max_frames=frames, pos_embed="zeros")
    backbone.set_fused_qkv(fused)
    backbone.set_attention_kernel(attention)
    model = build_model(backbone, resolve_methods(METHODS.get(method, method)), num_classes=NUM_CLASSES)
    with torch.no_grad():
        model.head.load_state_dict(head(hidden_size(tiny)).state_dict())
    return model


class HFClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head(hidden)

    def forward(self, features):
        return self.head(self.backbone(features).last_hidden_state.mean(dim=1))


class Bottleneck(nn.Module):
    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


def hf(method: str, frames: int, attention: str, tiny: bool, checkpoint: Path | None = None):
    """transformers' model with the method attached the way a script on top of it would."""
    from transformers import ASTModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the expected "position table re-initialised" report
    backbone = ASTModel.from_pretrained(
        checkpoint or checkpoint_dir(tiny), max_length=frames, ignore_mismatched_sizes=True,
        attn_implementation=attention,
    )
    dim = hidden_size(tiny)
    model = HFClassifier(backbone, dim)
    if method == "full":
        return model
    backbone.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # PEFT scales by lora_alpha / r; the paper's alpha / RR = 8 / 128 with r = hidden / 128.
        rank = dim // 128
        config = LoraConfig(r=rank, lora_alpha=rank * 8 / 128, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model.backbone = get_peft_model(backbone, config)
    elif method == "adapter":
        model.adapters = nn.ModuleList(Bottleneck(dim, dim // 64) for _ in backbone.layers)
        for layer, adapter in zip(backbone.layers, model.adapters):
            layer.layernorm_before.requires_grad_(True)
            # MHSA parallel-before: attention(LN(x)) + adapter(LN(x)).
            layer.attention.register_forward_hook(
                lambda module, args, output, adapter=adapter: (output[0] + adapter(args[0]), *output[1:])
            )
    elif method == "dpt25":
        model.prompts = nn.ParameterList(nn.Parameter(torch.randn(1, 25, dim) * 0.02) for _ in backbone.layers)
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
def inputs(frames: int, batch: int, device: torch.device):
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(batch, frames, 128, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return features.to(device), labels.to(device)


def build_side(
    side: str, method: str, frames: int, dtype: torch.dtype, device: torch.device, tiny: bool, mode: str | None
):
    """(model, forward, optimizer-fused flag, compute dtype) of one side, on ``device``."""
    spec = SIDES[side]
    mode = spec.get("mode", mode)
    if spec.get("fp32"):
        dtype = torch.float32
    if spec["impl"] == "ours":
        model = ours(method, frames, dtype, tiny, fused=spec.get("fused"), attention=spec.get("attention")).to(device)
        if dtype != torch.float32:
            model.cast_frozen(dtype)
        compile_ = spec.get("compile", device.type == "cuda")  # the library's default (TrainConfig.compile)
        if compile_:
            model.backbone.compile_blocks(mode=mode)
        return model, model, device.type == "cuda", dtype  # fused AdamW: LoopSettings' default
    model = hf(method, frames, spec["attention"], tiny).to(device)
    forward = torch.compile(model, mode=mode) if spec.get("compile") else model
    return model, forward, False, dtype


def make_step(job: dict, device: torch.device, dtype: torch.dtype, tiny: bool):
    """(step function, trainable parameter count) of one side, built on ``device``."""
    side, method, frames, batch = job["side"], job["method"], job["frames"], job["batch"]
    model, forward, fused, dtype = build_side(side, method, frames, dtype, device, tiny, job.get("compile_mode"))
    features, labels = inputs(frames, batch, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, fused=fused)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(forward(features).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params)


def measure_paired(jobs: list[dict], device: torch.device, dtype: torch.dtype, tiny: bool) -> list[dict]:
    """All sides of one method and shape in this process, their timed steps interleaved
    (A B C A B C ...), each side's median step: a fair comparison on a machine whose load
    drifts (a shared CPU). Peak memory is not per side here, so it is left out."""
    built = []
    for job in jobs:
        step, trainable = make_step(job, device, dtype, tiny)
        started = time.perf_counter()
        for _ in range(job["warmup"]):
            step()
        built.append((job, step, trainable, time.perf_counter() - started, []))
    for _ in range(jobs[0]["steps"]):
        for job, step, _, _, times in built:
            started = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - started)
    results = []
    for job, _, trainable, warmup_s, times in built:
        seconds = statistics.median(times)
        results.append({**job, "samples_per_s": job["batch"] / seconds, "step_s": seconds, "warmup_s": warmup_s,
                        "peak_mb": float("nan"), "trainable": trainable, "step_times": times})
    return results


def measure(job: dict, device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    steps = job["steps"]
    reset_peak_memory(device)
    step, trainable = make_step(job, device, dtype, tiny)

    started = time.perf_counter()
    for _ in range(job["warmup"]):  # allocator, kernel selection, optimizer state, compilation
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    return {
        **job,
        "samples_per_s": job["batch"] / seconds,
        "step_s": seconds,
        "warmup_s": warmup_s,
        "peak_mb": peak_memory_mb(device),
        "trainable": trainable,
        "loss": float(loss),
    }


def measure_or_skip(job: dict, payload: dict) -> dict:
    if time.time() > payload["deadline"]:
        return {**job, "skipped": "time budget"}
    device = torch.device(payload["device"])
    dtype = torch.bfloat16 if payload["precision"] == "bf16" else torch.float32
    print(f"[{time.strftime('%H:%M:%S')}] {job['side']} {job['method']} {job['frames']}x{job['batch']}",
          file=sys.stderr, flush=True)
    try:
        return measure(job, device, dtype, payload["tiny"])
    except Exception as error:  # one failing side (e.g. out of memory) must not lose the others
        return {**job, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    finally:
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def worker(payload: dict) -> None:
    emit({"results": [measure_or_skip(job, payload) for job in payload["jobs"]]})


def check(method: str, frames: int, device: torch.device, tiny: bool) -> float:
    """Loss of both implementations on the same batch, before any update, in fp32: must agree.

    Prompts are random on each side, so they are zeroed on both for the comparison.
    """
    features, labels = inputs(frames, 2, device)
    losses = []
    for build in (lambda: ours(method, frames, torch.float32, tiny), lambda: hf(method, frames, "sdpa", tiny)):
        model = build().to(device).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "prompt" in name:
                    parameter.zero_()
            losses.append(F.cross_entropy(model(features), labels).item())
    return abs(losses[0] - losses[1])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        frames, _, batch = item.partition("x")
        if not (frames.isdigit() and batch.isdigit()):
            raise SystemExit(f"--shapes: {item!r} is not FRAMESxBATCH (e.g. 500x32)")
        shapes.append((int(frames), int(batch)))
    return shapes


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {list(METHODS)}")
    parser.add_argument("--shapes", help="FRAMESxBATCH list (default: cuda 500x32,100x128; cpu 500x4,100x16)")
    parser.add_argument("--sides", help=f"comma-separated from {list(SIDES)} (default depends on the device)")
    parser.add_argument("--peer-compile-methods", default="lora",
                        help="methods for which hf-sdpa-compile runs (it compiles for a minute each on CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps per side (default: cuda 20, cpu 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 with compile, else 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="bf16 (default on CUDA and on CPUs reporting AVX512-BF16/AMX) or fp32")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the compiled sides (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip sides that would start later")
    parser.add_argument("--out", help="folder: append the tables to train_step.md and write train_step.json")
    parser.add_argument("--tiny", action="store_true", help="2-layer 128-wide model, 48x2: a smoke run in seconds")
    parser.add_argument("--paired", action="store_true",
                        help="in this process, the sides' timed steps interleaved, median per side "
                             "(for a shared machine; no per-side peak memory)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every side in this process (fast start; CPU peak memory is then shared)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return []

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = args.precision or ("bf16" if cuda or has_fast_cpu_bf16() else "fp32")
    shapes = parse_shapes(args.shapes or ("48x2" if args.tiny else DEFAULT_SHAPES[device.type]))
    sides = (args.sides or DEFAULT_SIDES[device.type]).split(",")
    methods = args.methods.split(",")
    unknown = [s for s in sides if s not in SIDES] + [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown sides/methods {unknown}; sides: {list(SIDES)}, methods: {list(METHODS)}")
    steps = args.steps or (1 if args.tiny else 20 if cuda else 3)
    deadline = time.time() + args.budget_s
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    checkpoint_dir(args.tiny)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak_gflops(dtype, size=256 if args.tiny else 8192 if cuda else 2048, device=str(device))
    header = f"machine: {machine(device)}; {precision} matmul peak {peak:.0f} GFLOP/s"
    print(header, flush=True)
    if out:
        (out / "train_step.md").open("a").write(f"\n{header}\n")
    differences = {}
    for frames, _ in shapes:
        for method in methods:
            differences[method, frames] = difference = check(method, frames, device, args.tiny)
            assert difference < 1e-3, f"{method}: losses of audiopetl and transformers differ by {difference}"
    # The sides of one method and shape run back to back (paired under drifting machine load).
    # Under a time budget only the first three sides (ours, the main peer, the paper's setup)
    # do; the others follow, side by side, so a spent budget cuts optional sides first.
    primary = sides if args.budget_s == float("inf") else sides[:3]
    order = [(side, shape, method) for shape in shapes for method in methods for side in primary]
    order += [(side, shape, method) for side in sides[len(primary):] for shape in shapes for method in methods]
    jobs = []
    for side, (frames, batch), method in order:
        if side == "hf-sdpa-compile" and method not in args.peer_compile_methods.split(","):
            continue
        compiled = SIDES[side].get("compile", side == "audiopetl" and cuda)
        warmup = args.warmup if args.warmup is not None else (3 if compiled else 1)
        jobs.append({"side": side, "method": method, "frames": frames, "batch": batch,
                     "steps": steps, "warmup": warmup, "compile_mode": args.compile_mode})
    payload = {"device": str(device), "precision": precision, "tiny": args.tiny, "deadline": deadline}
    if args.paired:
        dtype_ = torch.bfloat16 if precision == "bf16" else torch.float32
        groups = {}
        for job in jobs:
            groups.setdefault((job["frames"], job["method"]), []).append(job)
        results = [r for group in groups.values() for r in measure_paired(group, device, dtype_, args.tiny)]
    elif args.in_process:
        results = [measure_or_skip(job, payload) for job in jobs]
    elif cuda:  # one process: interpreter and CUDA start-up once; peak memory is reset per side
        results = run_worker(__file__, json.dumps({**payload, "jobs": jobs}))["results"]
    else:  # one process per side: peak RSS is that side's alone
        results = [run_worker(__file__, json.dumps({**payload, "jobs": [job]}))["results"][0] for job in jobs]
    for frames, batch in shapes:
        shape_results = [r for r in results if (r["frames"], r["batch"]) == (frames, batch)]
        shape_differences = {m: differences[m, frames] for m in methods}
        report(shape_results, methods, sides, frames, batch, precision, peak, shape_differences, args.tiny, out)
    if out:
        (out / "train_step.json").write_text(json.dumps({"machine": header, "results": results}, indent=1))
    return results


def report(results, methods, sides, frames, batch, precision, peak, differences, tiny, out) -> None:
    from audiopetl.backbone import ASTConfig

    config = ASTConfig(hidden_size=128, num_layers=2, num_heads=2, mlp_size=256) if tiny else None
    by = {(r["method"], r["side"]): r for r in results}
    rows = []
    for method in methods:
        ran = {s: by[(method, s)] for s in sides if (method, s) in by and "samples_per_s" in by[(method, s)]}
        peers = [ran[s] for s in PEERS if s in ran]
        best = max(peers, key=lambda r: r["samples_per_s"]) if peers else None
        paper = ran.get(PAPER)
        flops = ast_flops(frames, batch, extra_tokens=25 if method == "dpt25" else 0, step=method, config=config)
        for side in sides:
            r = by.get((method, side))
            if r is None:
                continue
            if "samples_per_s" not in r:
                rows.append([method, side, r.get("error") or f"skipped ({r.get('skipped')})", *[""] * 7])
                continue
            mine = side.startswith("audiopetl")
            rows.append([
                method, side, r["samples_per_s"], r["peak_mb"],
                r["samples_per_s"] / best["samples_per_s"] if mine and best else "",
                r["samples_per_s"] / paper["samples_per_s"] if mine and paper else "",
                r["peak_mb"] / best["peak_mb"] if mine and best else "",
                f"{100 * flops / r['step_s'] / 1e9 / peak:.1f}%",
                f"{r['warmup_s']:.1f}",
                f"{differences[method]:.1e}" if side == "audiopetl" else "",
            ])
    print_table(
        f"training step, {'tiny AST' if tiny else 'ViT-B'}, {frames} frames, batch {batch}, {precision}",
        ["method", "side", "samples/s", "peak MB", "x best peer", "x paper", "mem / best peer", "MFU",
         "warm-up s", "dloss fp32"],
        rows,
        markdown=out / "train_step.md" if out else None,
    )


if __name__ == "__main__":
    main()
