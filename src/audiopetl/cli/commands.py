"""The sub-commands of ``audiopetl``: for each, its options and the function that runs it.

``COMMANDS`` maps a name to ``(help, add_arguments, run)``; ``main.py`` builds the parser
from it. Heavy imports happen inside the run functions so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Method options the CLI exposes, mapped to the method-config field they set.
METHOD_OPTIONS = {
    "reduction_rate": (int, "LoRA / adapter reduction rate RR (rank or bottleneck = hidden / RR)"),
    "alpha": (float, "LoRA alpha; scaling = alpha / RR"),
    "targets": (lambda s: tuple(s.split(",")), "LoRA targets, comma-separated from q,k,v,o"),
    "num_prompts": (int, "prompt tuning: prompts (SPT: in total, DPT: per layer)"),
    "num_tokens": (int, "prefix tuning: tokens per layer, split between keys and values"),
    "module": (str, "adapter module: bottleneck, convpass or conformer (mixtures: bottleneck or convpass)"),
    "layout": (str, "adapter layout: pfeiffer, houlsby, houlsby_mixed or hydra"),
    "location": (str, "Pfeiffer adapter location: mhsa or ffn"),
    "insertion": (str, "adapter insertion: parallel or sequential"),
    "position": (str, "adapter position: before or after the sub-layer"),
    "kernel_size": (int, "Conformer adapter: depthwise convolution taps (default 31)"),
    "num_adapters": (int, "dense_moa / soft_moa: experts per placement"),
    "num_slots": (int, "soft_moa: slots per expert"),
}


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    from ..petl import preset_names

    group = parser.add_argument_group("method")
    group.add_argument(
        "--method",
        default=None,
        help=f"method or preset (default: lora), one of: {', '.join(preset_names())}; "
        "join several with '+' for a combination",
    )
    for name, (kind, help_text) in METHOD_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=help_text)
    group.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="adapter residual connection (default: on for sequential, off for parallel)",
    )


def method_from_args(args: argparse.Namespace):
    """The method spec (preset name, dict or list) the options describe; validated by petl."""
    from ..petl import preset, resolve_methods

    names = (args.method or "lora").split("+")
    options = {name: getattr(args, name) for name in [*METHOD_OPTIONS, "residual"] if getattr(args, name) is not None}
    if not options:
        spec = names[0] if len(names) == 1 else names
    elif len(names) > 1:
        raise ValueError("method options apply to a single method; describe combinations in a --config YAML file")
    else:
        values = preset(names[0]).to_dict()
        unknown = sorted(set(options) - set(values))
        if unknown:
            raise ValueError(f"option(s) {unknown} do not apply to method {names[0]!r}; it takes {sorted(values)}")
        spec = {**values, **options}
    resolve_methods(spec)  # fail now, not after the features are built
    return spec


# ---------------------------------------------------------------------------- train
# Train flags default to SUPPRESS: only the flags a user typed reach the config, so a
# --config YAML supplies the rest and TrainConfig's own defaults fill what neither gives.
_UNSET = argparse.SUPPRESS


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..backbone import POS_EMBED_MODES
    from ..backbone.ast import ATTENTION_KERNELS
    from ..petl.files import STORAGE_DTYPES
    from ..frontend.audio import CHANNEL_POLICIES
    from ..train.config import SETUPS
    from ..train.loop import SELECTIONS
    from ..train.precision import PRECISIONS

    parser.add_argument("--config", type=Path, help="YAML file of training options; flags override it")
    parser.add_argument("--dataset", default=_UNSET, help="dataset name (see `audiopetl data list`)")
    parser.add_argument("--data-root", default=_UNSET, help="dataset folder (see `audiopetl data info NAME`)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="output folder (default: runs/DATASET-METHOD, with -paper in the paper setup)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --run-dir with the options recorded in its config.yaml "
                        "(only --no-progress, --tensorboard, --cache-dir may be added)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes on this machine (one GPU each, or CPU processes with gloo); "
                        "--batch-size stays the global batch. Multi-node: torchrun -m audiopetl train (README)")
    _add_method_arguments(parser)
    model = parser.add_argument_group("model")
    parser.add_argument("--setup", choices=SETUPS, default=_UNSET,
                        help="'default' (ours) or 'paper': reproduce the published code's setup (README: "
                        "'Our default vs the paper's setup')")
    model.add_argument("--backbone", default=_UNSET,
                       help="hub id or local folder; its config.json's model_type picks AST, wav2vec 2.0, HuBERT or "
                            "WavLM; or a preset: 'tiny-random' (AST), 'tiny-random-wav2vec2', 'tiny-random-hubert', "
                            "'tiny-random-wavlm', 'tiny-random-wav2vec2-stable' "
                            "(default: MIT/ast-finetuned-audioset-10-10-0.4593)")
    model.add_argument("--pos-embed", choices=POS_EMBED_MODES, default=_UNSET,
                       help="'adapt' (default) the position table to the clip length, or 'zeros' as in the paper")
    model.add_argument("--pooling", choices=("mean", "cls", "cls_dist"), default=_UNSET, help="head input (default: mean; speech backbones: mean only)")
    model.add_argument("--extra-trainable", default=_UNSET, type=_comma_list,
                       help="comma-separated extras: final_norm, block.N; AST: pos_embed; "
                            "speech backbones: pos_conv, feature_projection")
    data = parser.add_argument_group("data")
    data.add_argument("--protocol", default=_UNSET, help="split protocol (US8K: default or reference)")
    data.add_argument("--channels", choices=CHANNEL_POLICIES, default=_UNSET,
                      help="multi-channel files: 'mean' of the channels (default) or the 'first' one")
    data.add_argument("--folds", default=_UNSET, type=lambda s: tuple(int(f) for f in _comma_list(s)),
                      help="comma-separated 1-based splits to run (default: all)")
    data.add_argument("--few-shot", type=int, default=_UNSET, help="K training clips per class")
    data.add_argument("--few-shot-seed", type=int, default=_UNSET, help="seed of the few-shot draw (default: 0)")
    data.add_argument("--max-frames", type=int, default=_UNSET, help="clip length in frames (default: dataset's)")
    data.add_argument("--specaugment", action=argparse.BooleanOptionalAction, default=_UNSET,
                      help="SpecAugment on training batches (default: dataset's)")
    data.add_argument("--skip-bad-audio", action=argparse.BooleanOptionalAction, default=_UNSET,
                      help="skip undecodable/empty/NaN/silent files (listed in bad_audio.txt) instead of stopping")
    data.add_argument("--cache-dir", default=_UNSET, help="feature cache (default: $AUDIOPETL_CACHE or ~/.cache/audiopetl)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=_UNSET, help="default: dataset's")
    optim.add_argument("--batch-size", type=int, default=_UNSET, help="default: dataset's")
    optim.add_argument("--lr", type=float, default=_UNSET, help="default: by method family (paper)")
    optim.add_argument("--weight-decay", type=float, default=_UNSET, help="default: 0.1")
    optim.add_argument("--grad-accum", type=int, default=_UNSET, help="default: 1")
    optim.add_argument("--seed", type=int, default=_UNSET, help="default: 0")
    optim.add_argument("--selection", choices=SELECTIONS, default=_UNSET,
                       help="weights to test: 'best' validation epoch or 'last' epoch "
                       "(default: best where the split has a validation set, else last)")
    system = parser.add_argument_group("system")
    system.add_argument("--adapter-dtype", choices=list(STORAGE_DTYPES), default=_UNSET,
                        help="storage of the adapter file: fp32 (default, exact) or fp16/bf16 (half the size)")
    system.add_argument("--device", default=_UNSET, help="auto (default), cpu, cuda, cuda:N")
    system.add_argument("--precision", choices=PRECISIONS, default=_UNSET,
                        help="auto (default): bf16 on CUDA and on CPUs with fast bf16, else fp32")
    system.add_argument("--attention-kernel", choices=list(ATTENTION_KERNELS), default=_UNSET,
                        help="AST attention: sdpa (fused kernel) or matmul (two GEMMs; keeps the attention "
                        "probabilities). Default: sdpa, except matmul for bf16 training on a CPU over at most "
                        "224 tokens, where it is faster")
    for flag, help_text in (
        ("grad-checkpointing", "activation checkpointing for long clips (default: off)"),
        ("compile", "torch.compile the model (default: on for CUDA, off on CPU)"),
        ("fused-qkv", "AST: one GEMM for q, k and v (default: on for CUDA, off on CPU)"),
        ("fused-adamw", "one fused AdamW kernel (default: on for CUDA, off on CPU)"),
        ("embedding-cache", "linear probing: train the head on cached embeddings (default: on)"),
        ("tensorboard", "also log to TensorBoard (default: off)"),
        ("progress", "progress bars (default: on)"),
    ):
        system.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=_UNSET, help=help_text)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item for item in text.split(",") if item)


_NOT_CONFIG = {"command", "config", "run_dir", "resume", "nproc", "method", "residual", *METHOD_OPTIONS}


def config_from_args(args: argparse.Namespace):
    import yaml

    from ..train import TrainConfig

    values: dict = {}
    if args.config is not None:
        values = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: expected a mapping of training options")
    values.update({k: v for k, v in vars(args).items() if k not in _NOT_CONFIG})
    method_flags = args.method is not None or any(getattr(args, o) is not None for o in [*METHOD_OPTIONS, "residual"])
    if method_flags or "method" not in values:
        values["method"] = method_from_args(args)
    for required in ("dataset", "data_root"):
        if not values.get(required):
            raise ValueError(f"--{required.replace('_', '-')} is required (or set it in --config)")
    return TrainConfig.from_dict(values)


def resume_options_from_args(args: argparse.Namespace) -> dict:
    """The options ``--resume`` may add to the run recorded in ``--run-dir`` (progress bars,
    TensorBoard, cache folder); any other option would change its result and is refused. The
    recorded configuration itself is read by the run (rank 0 alone, when there are several)."""
    from ..train.run import RUNTIME_OPTIONS

    if args.run_dir is None:
        raise ValueError("--resume needs --run-dir: the folder of the run to continue")
    changing = [k for k in vars(args) if k not in _NOT_CONFIG and k not in RUNTIME_OPTIONS]
    changing += [k for k in ["method", *METHOD_OPTIONS, "residual"] if getattr(args, k) is not None]
    changing += ["config"] if args.config is not None else []
    if changing:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in changing)
        raise ValueError(
            f"--resume continues {args.run_dir} exactly as recorded in its config.yaml; these options would "
            f"change its result: {flags}. Drop them, or train a new run with another --run-dir"
        )
    return {k: v for k, v in vars(args).items() if k in RUNTIME_OPTIONS}


def run_train(args: argparse.Namespace) -> dict:
    from ..train import resolve, resume_run, run_training

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.resume:
        run_dir = args.run_dir
        job, job_args = resume_run, (run_dir, resume_options_from_args(args))
    else:
        given = config_from_args(args)
        config = resolve(given)  # the paper setup rewrites method options, so name the run from what was given
        setup = "" if config.setup == "default" else f"-{config.setup}"
        run_dir = args.run_dir or Path("runs") / f"{config.dataset}-{_method_label(given.method)}{setup}"
        job, job_args = run_training, (config, run_dir)
    if args.nproc > 1:
        import json

        from ..train import distributed

        if distributed.requested():
            raise ValueError("--nproc: this process is already one of several ranks (torchrun); drop --nproc")
        try:
            distributed.spawn(job, args.nproc, *job_args)
        except Exception as error:  # a rank's failure arrives with its whole traceback: keep the message line
            raise RuntimeError(f"a training process failed: {str(error).strip().splitlines()[-1]}") from error
        summary = json.loads((run_dir / "metrics.json").read_text())
    else:
        summary = job(*job_args)
        if int(os.environ.get("RANK", "0")) != 0:
            return None  # started by torchrun: rank 0 reports
    print(f"run directory: {run_dir}")
    return {k: summary[k] for k in ("dataset", "test_accuracy_mean", "test_accuracy_std", "trainable_parameters")}


def _method_label(method) -> str:
    if isinstance(method, str):
        return method
    if isinstance(method, dict):
        return method["method"]
    return "+".join(_method_label(m) for m in method)


# ---------------------------------------------------------------------------- eval / predict
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, help="adapter file written by `train`")
    parser.add_argument("--data-root", required=True, help="dataset folder")
    parser.add_argument("--dataset", default=None, help="default: the adapter's dataset")
    parser.add_argument("--split", default=None, help="split name (default: the adapter's split)")
    parser.add_argument("--protocol", default="default", help="split protocol the adapter was trained with")
    parser.add_argument("--backbone", default=None, help="override the backbone named in the adapter file")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: $AUDIOPETL_CACHE or ~/.cache/audiopetl)")
    parser.add_argument("--skip-bad-audio", action=argparse.BooleanOptionalAction, default=False,
                        help="leave out undecodable/empty/NaN/silent files (listed in the output) instead of stopping")


def run_eval(args: argparse.Namespace) -> dict:
    from ..experiments.inference import evaluate_adapter

    return evaluate_adapter(
        args.adapter,
        data_root=args.data_root,
        dataset=args.dataset,
        split=args.split,
        protocol=args.protocol,
        backbone=args.backbone,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        skip_bad_audio=args.skip_bad_audio,
    )


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, help="adapter file written by `train`")
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="audio files or folders; files that cannot be used get an error row, and the exit "
                        "status is non-zero only when no file could be predicted")
    parser.add_argument("--top-k", type=int, default=5, help="labels (with probabilities) per file")
    parser.add_argument("--format", choices=("json", "csv"), default="json", help="output format")
    parser.add_argument("--output", type=Path, default=None, help="write here instead of stdout")
    parser.add_argument("--backbone", default=None, help="override the backbone named in the adapter file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def run_predict(args: argparse.Namespace) -> None:
    from ..experiments.inference import format_predictions, predict_files

    predictions = predict_files(args.adapter, args.inputs, top_k=args.top_k, backbone=args.backbone, device=args.device)
    text = format_predictions(predictions, args.format)
    if args.output:
        from ..atomic import atomic_path

        with atomic_path(args.output) as temp:
            temp.write_text(text)
    else:
        print(text, end="")
    failed = sum("error" in p for p in predictions)
    if failed == len(predictions):
        raise ValueError(f"none of the {failed} file(s) could be predicted (reasons above and in the output)")
    if failed:
        print(f"audiopetl predict: {failed} of {len(predictions)} file(s) could not be used (error rows in the output)",
              file=sys.stderr)


# ---------------------------------------------------------------------------- params
def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone-config", default="vit-b",
                        help="'vit-b' (AST base) or a config.json path (AST, wav2vec 2.0, HuBERT, WavLM); "
                             "no weights are downloaded")
    parser.add_argument("--num-classes", type=int, default=50, help="head size (Linear and Full FT counts)")
    parser.add_argument("--max-frames", type=int, default=1024, help="clip length (Full FT counts the position table)")


def run_params(args: argparse.Namespace) -> None:
    from ..backbone import ASTConfig
    from ..petl import format_parameter_table, parameter_table

    config = ASTConfig(max_frames=args.max_frames)
    if args.backbone_config != "vit-b":
        import dataclasses
        import json

        from ..backbone.checkpoint import config_from_transformers
        from ..backbone.registry import family_for_type

        path = Path(args.backbone_config)
        if not path.is_file():
            raise FileNotFoundError(f"--backbone-config: no such config.json {str(path)!r}")
        values = json.loads(path.read_text())
        family = family_for_type(values.get("model_type"))
        if family is not None:  # speech encoders: no position table, the clip length changes no count
            config = family.config_from_transformers(values, str(path))
        else:
            config = dataclasses.replace(config_from_transformers(values, source=str(path)), max_frames=args.max_frames)
    print(format_parameter_table(parameter_table(config, num_classes=args.num_classes)))


# ---------------------------------------------------------------------------- data / cache
def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    sub.add_parser("list", help="datasets audiopetl knows")
    info = sub.add_parser("info", help="expected folder layout and defaults of a dataset")
    info.add_argument("name")
    download = sub.add_parser("download", help="fetch and extract a dataset's official archive")
    download.add_argument("name")
    download.add_argument("--to", type=Path, required=True, help="destination folder")


def run_data(args: argparse.Namespace) -> None:
    from ..data import DATASETS, download_dataset, get_dataset

    if args.data_command == "list":
        for name, dataset in DATASETS.items():
            print(f"{name:8s} {dataset.description}")
    elif args.data_command == "info":
        dataset = get_dataset(args.name)
        print(f"{args.name}: {dataset.description}\n\n{dataset.layout}\n\ndefaults: {dataset.defaults}")
    else:
        print(f"dataset ready at {download_dataset(args.name, args.to)}")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    from ..buildlock import HEARTBEAT, STALE_AFTER

    clear_help = (
        "delete cached feature sets. Kept, and named: an entry a live process of this host is building, and one "
        "whose build lock another host holds; such an entry is cleared once its lock is stale: its file unchanged "
        f"for {STALE_AFTER:.0f} s (the lock's stale-after period; a live holder rewrites it every {HEARTBEAT:.0f} s), "
        "judged by the file's time against this machine's clock"
    )
    for action, help_text, description in (
        ("ls", "list cached feature sets, partly written files and leftovers", None),
        ("clear", "delete cached feature sets, except those a live process builds", clear_help),
    ):
        p = sub.add_parser(action, help=help_text, description=description or help_text)
        p.add_argument("--cache-dir", default=None, help="default: $AUDIOPETL_CACHE or ~/.cache/audiopetl")
        if action == "clear":
            p.add_argument("--key", default=None, help="one entry (default: all)")


def run_cache(args: argparse.Namespace) -> None:
    from ..data import clear_cache, list_cache_entries, list_old_heartbeats, list_temporaries

    if args.cache_command == "ls":
        entries = list_cache_entries(args.cache_dir)
        for entry in entries:
            print(entry)
        temporaries = list_temporaries(args.cache_dir)
        old_beats = list_old_heartbeats(args.cache_dir)
        described = [
            (temp, "stale: left by a killed build, removed at the next use or by `cache clear`"
             if temp.stale else f"being written by process {temp.pid} on {temp.host}")
            for temp in temporaries
        ] + [
            (beat, "stale: left by a killed build lock of an earlier version, removed at the next use or by "
             "`cache clear`" if beat.stale else f"heartbeat of an earlier version's build lock, written "
             f"{beat.age:.0f} s ago")
            for beat in old_beats
        ]
        for item, state in described:
            print(f"temporary {item.size_bytes / 2**20:9.1f} MiB  {item.path.name}  ({state})")
        if not entries and not temporaries and not old_beats:
            print("(cache is empty)")
    else:
        removed = clear_cache(args.cache_dir, key=args.key)
        print(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}")


# ---------------------------------------------------------------------------- reproduce / report / demo
REPRODUCE_DESCRIPTION = """Run a paper table or figure as a resumable sweep of training runs.

Launchers (--launcher):
  local               one run after another in this process (default)
  local --workers N   N concurrent worker processes: one visible GPU each (CUDA_VISIBLE_DEVICES,
                      round robin), or on a CPU-only machine the cores shared out; logs in RUN/run.log
  slurm               one sbatch job per run (script RUN/job.sbatch, log RUN/slurm-JOBID.log);
                      resources from --partition/--time/--gpus/--cpus/--mem/--sbatch or the
                      recipe's `slurm:` block; returns after submitting unless --wait

Starting the same command again skips finished runs, leaves running ones alone, resumes
interrupted ones from their checkpoint and retries failed ones; --run RUN_ID retries one
alone. --status prints done/running/failed/pending per run; sweep.json in the runs folder
keeps the same (the report reads it)."""


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    from ..experiments.recipes import recipe_names
    from ..train.config import SETUPS

    parser.description = REPRODUCE_DESCRIPTION
    parser.formatter_class = _RawDescriptionDefaults
    parser.add_argument("table", help=f"paper experiment to run: {', '.join(recipe_names())}, or a recipe YAML file")
    parser.add_argument("--data", action="append", default=[], metavar="DATASET=PATH",
                        help="dataset folder, repeat per dataset (e.g. --data esc50=ESC-50-master)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/TABLE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option for every run (e.g. --set epochs=5)")
    parser.add_argument("--only", default=None, help="comma-separated datasets to run (default: all in the recipe)")
    parser.add_argument("--run", action="append", default=None, metavar="RUN_ID",
                        help="only this run (a glob such as 'esc50/*' works); repeat for several")
    parser.add_argument("--dry-run", action="store_true", help="list the runs without training")
    parser.add_argument("--status", action="store_true", help="print done/running/failed/pending per run and exit")
    parser.add_argument("--setup", choices=SETUPS, default=None,
                        help="'paper': the published code's setup; its runs go under RUNS_DIR/paper/ and "
                        "`report` shows them beside the default runs (default: the recipe's, else default)")
    launch = parser.add_argument_group("launcher")
    launch.add_argument("--launcher", choices=("local", "slurm"), default="local", help="where runs execute")
    launch.add_argument("--workers", type=int, default=1, help="local: concurrent worker processes")
    launch.add_argument("--wait", action="store_true", help="slurm: wait until every job has left the queue")
    slurm = parser.add_argument_group("slurm (override the recipe's `slurm:` block)")
    slurm.add_argument("--partition", default=None, help="#SBATCH --partition")
    slurm.add_argument("--time", default=None, help="#SBATCH --time, e.g. 04:00:00")
    slurm.add_argument("--gpus", type=int, default=None, help="#SBATCH --gpus per job")
    slurm.add_argument("--cpus", type=int, default=None, help="#SBATCH --cpus-per-task")
    slurm.add_argument("--mem", default=None, help="#SBATCH --mem, e.g. 32G")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="LINE",
                       help="extra #SBATCH line, e.g. --sbatch=--account=abc; repeatable")


class _RawDescriptionDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def run_reproduce(args: argparse.Namespace) -> None:
    import yaml

    from ..experiments.launchers import make_launcher
    from ..experiments.recipes import format_status, load_recipe, run_sweep, select_runs, sweep_status

    recipe = load_recipe(args.table)
    roots = dict(_key_value(item, "--data") for item in args.data)
    overrides = {k: yaml.safe_load(v) for k, v in (_key_value(item, "--set") for item in args.set)}
    if args.setup is not None:
        overrides["setup"] = args.setup
    only = args.only.split(",") if args.only else None
    runs_dir = args.runs_dir or Path("runs") / recipe["name"]
    if args.status:
        print(format_status(sweep_status(select_runs(recipe, overrides, only, args.run), runs_dir)))
        return
    slurm = dict(recipe.get("slurm") or {})
    for key in ("partition", "time", "gpus", "cpus", "mem"):
        if getattr(args, key) is not None:
            slurm[key] = getattr(args, key)
    if args.sbatch:
        slurm["extra"] = [*slurm.get("extra", []), *args.sbatch]
    launcher = make_launcher(args.launcher, workers=args.workers, slurm=slurm, wait=args.wait)
    run_sweep(recipe, roots, runs_dir, overrides=overrides, only=only, dry_run=args.dry_run, launcher=launcher,
              select=args.run)


def _key_value(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
    return key, value


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs_dir", type=Path, help="a folder of runs (e.g. runs/table1)")
    parser.add_argument("--out", type=Path, default=None, help="default: RUNS_DIR/report")
    parser.add_argument("--tsne", action=argparse.BooleanOptionalAction, default=False,
                        help="also plot the t-SNE of each run's clip embeddings, the [CLS] token (AST) or "
                             "the pooled output (speech encoders) (needs the data)")


def run_report(args: argparse.Namespace) -> None:
    from ..experiments.report import write_report

    out = write_report(args.runs_dir, args.out or args.runs_dir / "report", tsne=args.tsne)
    print(f"report written to {out}")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-run"), help="folder for data, runs and adapters")
    parser.add_argument("--backbone", default="tiny-random",
                        help="'tiny-random' (offline AST, random weights), 'tiny-random-wav2vec2' (or -hubert, "
                             "-wavlm: offline speech encoders) or a hub id / folder for real weights")
    parser.add_argument("--epochs", type=int, default=None, help="default: 20 (tiny) / 3 (real backbone)")
    parser.add_argument("--clips-per-class", type=int, default=32, help="size of the generated dataset")


def run_demo(args: argparse.Namespace) -> None:
    from ..experiments.demo import run_demo as demo

    demo(args.out, backbone=args.backbone, epochs=args.epochs, clips_per_class=args.clips_per_class)


from .serve_commands import add_export_arguments, add_serve_arguments, run_export, run_serve  # noqa: E402

COMMANDS = {
    "demo": ("train LoRA and an adapter on a generated dataset, offline, in minutes", add_demo_arguments, run_demo),
    "train": ("train a PETL method on a dataset", add_train_arguments, run_train),
    "eval": ("score an adapter file on a dataset split", add_eval_arguments, run_eval),
    "predict": ("label audio files with an adapter file", add_predict_arguments, run_predict),
    "params": ("method x trainable-parameter table (no download)", add_params_arguments, run_params),
    "data": ("list, describe and download datasets", add_data_arguments, run_data),
    "cache": ("list or clear the feature cache", add_cache_arguments, run_cache),
    "reproduce": ("run a paper table or figure as a resumable sweep", add_reproduce_arguments, run_reproduce),
    "report": ("tables and plots from a folder of runs", add_report_arguments, run_report),
    "serve": ("serve adapters over HTTP on one shared backbone", add_serve_arguments, run_serve),
    "export": ("export an adapter to PEFT or ONNX", add_export_arguments, run_export),
}
