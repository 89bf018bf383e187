"""Many adapter files served on one backbone: loading them as tasks, and running batches of them.

The backbone is loaded once. Each task's model is built on a copy of it that *shares*
every frozen tensor and owns only the tensors its file trains (LoRA updates, adapters,
BitFit biases, its final LayerNorm, its head), so N tasks cost one backbone plus N
adapters in memory.

Two ways to run a batch that mixes tasks (``lora_batching``):

* ``shared`` (default): every task whose only method is LoRA joins one backbone pass
  (one per input shape and recorded precision, each under that precision's autocast as in
  ``predict``; in bf16 the stacked updates round differently, within bf16 tolerance).
  Each LoRA projection holds the stacked low-rank updates of all those tasks and adds,
  for each sample, the update of the sample's own task (gathered by task index, then two
  batched matmuls). Merging weights is not an option across tasks: a merged projection
  holds one task's update only. Other methods (adapters, prompts, BitFit...) change the
  network in ways that differ per task, so their requests run one pass per task.
* ``per-task``: one pass per task for every method (the baseline the benchmark compares).

Each task computes in the precision its file records, as ``predict`` and ``eval`` do, unless
the server is told otherwise (``precision``: ``auto`` is what this hardware runs fast, as
``train`` chooses; ``fp32``/``bf16`` force one).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..experiments.inference import recorded_dtype, waveform_features
from ..frontend import Frontend, frontend_from_settings
from ..petl import AdapterFileError, LoRAConfig, PETLModel, load_adapter, load_recorded_backbone, read_adapter_metadata
from ..petl.lora import LoRALinear
from ..train.precision import DTYPES, PRECISIONS, resolve_precision_name

LORA_BATCHING = ("shared", "per-task")
SERVE_PRECISIONS = ("recorded", *PRECISIONS)  # recorded: each file's own, as predict runs it


@dataclass
class Task:
    """One served adapter: its model (on shared frozen weights) and the frontend its file records."""

    name: str
    path: Path
    model: PETLModel
    frontend: Frontend = field(repr=False)
    precision: str | None = None  # fp32/bf16 overriding the file's record; None: as recorded

    @property
    def method(self) -> str:
        return "+".join(m.method for m in self.model.methods)

    @property
    def lora_only(self) -> bool:
        """Only LoRA (and the head and final LayerNorm every method trains): it can join the shared pass."""
        return [type(m) for m in self.model.methods] == [LoRAConfig] and not self.model.extra_trainable

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype its file records (as ``predict`` runs it: bf16-trained adapters run in bf16),
        unless the server overrides it."""
        return DTYPES[self.precision] if self.precision else recorded_dtype(self.model)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(1, *feature_shape) model input of one waveform at ``frontend.sample_rate``, as ``predict`` builds it."""
        return waveform_features(self.frontend, [wave])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "methods": [m.to_dict() for m in self.model.methods],
            "classes": list(self.model.class_names or []),
            "trainable_parameters": self.model.num_trainable(),
            "sample_rate": self.frontend.sample_rate,
            "max_seconds": round(self.frontend.max_samples / self.frontend.sample_rate, 3),
            "file": self.path.name,
        }


def parse_task_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """``PATH`` or ``NAME=PATH`` -> (name, path); the name defaults to the file stem."""
    tasks: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        path = Path(path if sep else spec)
        name = name if sep else path.stem
        if not name or "/" in name:
            raise ValueError(f"invalid task name {name!r} in {spec!r}; use NAME=PATH with a name without '/'")
        if not path.is_file():
            raise FileNotFoundError(f"adapter file not found: {str(path)!r} (task {name!r})")
        if name in {n for n, _ in tasks}:
            raise ValueError(f"task name {name!r} given twice; name them explicitly with NAME=PATH")
        tasks.append((name, path))
    if not tasks:
        raise ValueError("give at least one adapter file")
    return tasks


def load_tasks(specs: list[str], device: torch.device, precision: str = "recorded") -> dict[str, Task]:
    """Load the backbone once and every adapter on it; a file made for another backbone is refused.

    ``precision`` (one of ``SERVE_PRECISIONS``): ``recorded`` runs each task as its file records."""
    if precision not in SERVE_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(SERVE_PRECISIONS)}")
    override = None if precision == "recorded" else resolve_precision_name(precision, device)
    named = parse_task_specs(specs)
    headers = {name: read_adapter_metadata(path) for name, path in named}
    first_name, first_path = named[0]
    reference = headers[first_name]["backbone"]
    for name, path in named[1:]:
        record = headers[name]["backbone"]
        for key in ("config", "fingerprint", "pos_embed"):
            if record.get(key) != reference.get(key):
                raise AdapterFileError(
                    f"{path}: made for another backbone than {first_path} ({key}: {record.get(key)!r} vs "
                    f"{reference.get(key)!r}); every served adapter must share one backbone"
                )
    backbone = load_recorded_backbone(first_path, reference).to(device)
    tasks = {}
    for name, path in named:
        model = load_adapter(path, backbone=_sharing_copy(backbone, path)).to(device).eval()
        # As ``predict`` builds it: a filterbank, or the task's own backbone's (shared) feature encoder.
        frontend = frontend_from_settings(model.metadata["frontend"], model.backbone).to(device)
        tasks[name] = Task(name, path, model, frontend, override)
    return tasks


def _sharing_copy(backbone: nn.Module, adapter: Path) -> nn.Module:
    """A copy of ``backbone`` sharing every parameter except those the adapter file trains."""
    with safe_open(str(adapter), framework="pt") as handle:
        trained = {key.removeprefix("backbone.") for key in handle.keys() if key.startswith("backbone.")}
    memo = {id(p): p for name, p in backbone.named_parameters() if name not in trained}
    return copy.deepcopy(backbone, memo)


class _Routing:
    """The task index of every sample in the batch being run (set before each shared pass)."""

    index: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """A frozen projection plus the LoRA updates of several tasks; each sample gets its own task's.

    ``downs`` (tasks, rank, in) and ``ups`` (tasks, out, rank) are zero-padded to the largest
    rank, and zero for tasks without LoRA on this projection, so padding adds exactly nothing.
    """

    def __init__(
        self, base: nn.Module, downs: torch.Tensor, ups: torch.Tensor, scalings: torch.Tensor, routing: _Routing
    ) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("downs", downs)
        self.register_buffer("ups", ups)
        self.register_buffer("scalings", scalings)
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.routing.index
        low_rank = torch.bmm(torch.bmm(x, self.downs[index].transpose(1, 2)), self.ups[index].transpose(1, 2))
        return self.base(x) + low_rank * self.scalings[index].view(-1, 1, 1)


class SharedLoRAPass(nn.Module):
    """One backbone pass for a batch mixing LoRA tasks; then each task's own final LayerNorm and head."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        self.tasks = tasks
        first = tasks[0].model.backbone
        # Shares every tensor of the first task's backbone; each projection that any task adapts
        # is replaced below, and its final LayerNorm is never used (each task applies its own).
        self.backbone = copy.deepcopy(first, {id(p): p for p in first.parameters()})
        self.routing = _Routing()
        for index, block in enumerate(self.backbone.blocks):
            for target in block.LINEARS:
                layers = [t.model.backbone.blocks[index].linear(target) for t in tasks]
                if not any(isinstance(layer, LoRALinear) for layer in layers):
                    continue
                block.replace_linear(target, self._stack(layers))

    def _stack(self, layers: list[nn.Module]) -> MultiLoRALinear:
        base = next(layer.base for layer in layers if isinstance(layer, LoRALinear))
        rank = max(layer.lora_down.shape[0] for layer in layers if isinstance(layer, LoRALinear))
        downs = base.weight.new_zeros(len(layers), rank, base.in_features)
        ups = base.weight.new_zeros(len(layers), base.out_features, rank)
        scalings = base.weight.new_zeros(len(layers))
        for i, layer in enumerate(layers):
            if isinstance(layer, LoRALinear):
                r = layer.lora_down.shape[0]
                downs[i, :r], ups[i, :, :r], scalings[i] = layer.lora_down, layer.lora_up, layer.scaling
        return MultiLoRALinear(base, downs, ups, scalings, self.routing)

    def forward(self, features: torch.Tensor, task_index: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each sample (list, in batch order: tasks have different class counts).

        Each task pools its rows as its own model does: the backbone's ``pool``, which reads
        the padding mask of the speech encoders from the features."""
        self.routing.index = task_index
        try:
            hidden = self.backbone.encode(features)
        finally:
            self.routing.index = None
        logits: list[torch.Tensor | None] = [None] * len(features)
        for t, task in enumerate(self.tasks):
            rows = (task_index == t).nonzero().flatten()
            if len(rows):
                model = task.model
                embedding = model.backbone.pool(model.backbone.norm(hidden[rows]), features[rows], model.pooling)
                out = model.head(embedding)
                for row, value in zip(rows.tolist(), out):
                    logits[row] = value
        return logits


class Engine:
    """Runs a batch of (task name, features) on the tasks; counts backbone passes."""

    def __init__(self, tasks: dict[str, Task], lora_batching: str = "shared") -> None:
        if lora_batching not in LORA_BATCHING:
            raise ValueError(f"unknown lora_batching {lora_batching!r}; valid: {list(LORA_BATCHING)}")
        self.tasks = tasks
        self.lora_batching = lora_batching
        shared = [t for t in tasks.values() if t.lora_only] if lora_batching == "shared" else []
        self.shared = SharedLoRAPass(shared).eval() if len(shared) > 1 else None
        self.shared_index = {t.name: i for i, t in enumerate(shared)} if self.shared else {}
        self.device = next(next(iter(tasks.values())).model.parameters()).device
        self.passes = 0
        self.samples = 0

    @torch.no_grad()
    def run(self, items: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor | Exception]:
        """Class probabilities (CPU, float32) of each item, in order; a pass that fails gives its error
        to its own items only."""
        out: list[torch.Tensor | Exception | None] = [None] * len(items)
        groups: list[tuple[list[int], str | None, torch.dtype]] = []  # (rows, task name, dtype); None: shared pass
        # One shared pass per input shape and recorded precision: tasks on one speech encoder may record
        # different clip lengths, and each task computes in the precision it trained in, as ``predict`` does.
        shared: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = {}
        for i, (name, features) in enumerate(items):
            if name in self.shared_index:
                shared.setdefault((tuple(features.shape[1:]), self.tasks[name].dtype), []).append(i)
        groups.extend((rows, None, dtype) for (_, dtype), rows in shared.items())
        for name in dict.fromkeys(name for name, _ in items if name not in self.shared_index):
            groups.append(([i for i, (n, _) in enumerate(items) if n == name], name, self.tasks[name].dtype))
        for rows, name, dtype in groups:
            try:
                features = torch.cat([items[i][1] for i in rows]).to(self.device)
                with nullcontext() if dtype == torch.float32 else torch.autocast(self.device.type, dtype=dtype):
                    if name is None:
                        logits = self._run_shared(features, [items[i][0] for i in rows])
                    else:
                        logits = self.tasks[name].model(features)
                for row, row_logits in zip(rows, logits):
                    out[row] = row_logits.float().softmax(-1).cpu()
            except Exception as error:  # handed to this pass's requests only; their handlers log it
                for row in rows:
                    out[row] = error
            self.passes += 1
        self.samples += len(items)
        return out

    def _run_shared(self, features: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        index = torch.tensor([self.shared_index[name] for name in names], device=self.device)
        return self.shared(features, index)
