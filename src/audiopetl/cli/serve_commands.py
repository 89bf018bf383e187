"""The ``serve`` and ``export`` sub-commands (registered in ``commands.COMMANDS``)."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.precision import PRECISIONS

    parser.add_argument(
        "adapters", nargs="+", metavar="ADAPTER",
        help="adapter files, each served as a task named by its file stem, or NAME=PATH; all must share one backbone",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start-up)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--max-batch", type=int, default=32, help="most clips run in one batch")
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="longest a request waits for others to batch with"
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload, in MB (10^6 bytes)")
    parser.add_argument(
        "--lora-batching", choices=("shared", "per-task"), default="shared",
        help="shared: LoRA tasks share one backbone pass with per-sample low-rank updates; per-task: one pass per task",
    )
    parser.add_argument(
        "--precision", choices=("recorded", *PRECISIONS), default="recorded",
        help="compute precision: 'recorded' runs each adapter in the precision its file records (as predict and "
        "eval do); 'auto' in what this hardware runs fast (bf16 on CUDA and on CPUs with bf16 instructions, else "
        "fp32); fp32 or bf16 for every adapter",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from ..serve import ServeLimits, create_app, load_tasks
    except ImportError as error:
        raise SystemExit(f"`audiopetl serve` needs the serve extra: pip install 'audiopetl[serve]' ({error})") from None
    from ..train.precision import resolve_device

    limits = ServeLimits(int(args.max_upload_mb * 1_000_000), args.max_batch, args.max_wait_ms)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    # Bind before loading the models, so a taken port or a bad --host fails at once, and here
    # so the address (the real port, when --port 0) is printed whatever the log level.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections made before uvicorn starts wait in the backlog
    except OSError as error:
        sock.close()
        raise ValueError(
            f"cannot listen on {args.host}:{args.port} ({error.strerror}); choose another --port"
        ) from None
    try:
        tasks = load_tasks(args.adapters, resolve_device(args.device), args.precision)
        app = create_app(tasks, limits, args.lora_batching)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shared = app.state.engine.shared_index
    print(
        f"audiopetl serve: {len(tasks)} task(s) on one backbone: {', '.join(tasks)}"
        + (f"; LoRA tasks sharing each backbone pass: {', '.join(shared)}" if shared else "")
        + f"\naudiopetl serve: listening on http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}/",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    server.run(sockets=[sock])


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    peft = sub.add_parser(
        "peft", help="LoRA adapter as a PEFT adapter folder (+ the head and, by default, the base model)",
        description="Write OUT/ with adapter_config.json + adapter_model.safetensors (PEFT LoRA on transformers' "
        "ASTModel, Wav2Vec2Model, HubertModel or WavLMModel), head.safetensors + head.json (pooling, classes and, "
        "for the speech encoders, how to prepare the waveform and pool the frames as `predict` does; "
        "preprocessor_config.json holds the matching feature extractor), and base/ (the backbone as a transformers "
        "checkpoint). Only LoRA can be expressed in PEFT; other methods and extra trained backbone tensors are "
        "refused (use `export onnx`). WavLM with LoRA on q/k/v/o: merge the PEFT model before use "
        "(head.json's merge_adapter; transformers' WavLM attention ignores unmerged LoRA there).",
    )
    peft.add_argument("adapter", type=Path, help="adapter file written by `train`")
    peft.add_argument("out", type=Path, help="output folder")
    peft.add_argument("--no-base", dest="base", action="store_false",
                      help="skip base/ (load the backbone named in adapter_config.json yourself)")
    onnx = sub.add_parser(
        "onnx", help="whole model (LoRA merged, other modules included) as ONNX: features in, logits out",
        description="Write one ONNX file: input 'features' as `predict` computes them (AST: (batch, frames, mel "
        "bins); wav2vec 2.0/HuBERT/WavLM: (batch, frames, conv channels + 1), the frozen feature encoder's output "
        "and a validity column, the feature encoder not included), output 'logits' (batch, classes); the batch axis is dynamic. Class names and the frontend settings are "
        "stored in the model's metadata.",
    )
    onnx.add_argument("adapter", type=Path, help="adapter file written by `train`")
    onnx.add_argument("out", type=Path, help="output .onnx file")
    onnx.add_argument("--opset", type=int, default=18,
                      help="ONNX opset version (default: 18, what torch's exporter writes; lower ones are converted)")


def run_export(args: argparse.Namespace) -> None:
    if args.format == "peft":
        from ..export.peft import export_peft

        out = export_peft(args.adapter, args.out, include_base=args.base)
    else:
        from ..export.onnx import export_onnx

        out = export_onnx(args.adapter, args.out, opset=args.opset)
    print(f"wrote {out}")
