"""Data-parallel training over several processes (GPUs, or CPU processes) with torch.distributed.

One run, N processes ("ranks"), started by ``audiopetl train --nproc N`` (:func:`spawn`, one
machine) or by ``torchrun`` (one machine or several through its rendezvous; under Slurm,
``srun`` starting torchrun on every node). Each rank:

- joins the process group from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA (one GPU per rank,
  ``cuda:LOCAL_RANK``), gloo on CPU (:func:`setup`);
- draws the same shuffled order from the same seeded generator, reads the whole global
  batch, applies SpecAugment to all of it (so the random masks equal one process's), and
  trains on its contiguous share (:func:`local_part`). The global batch is the configured
  batch size whatever N is: per-rank batch = batch / N, and when N does not divide it the
  first (batch mod N) ranks take one clip more. Each rank's loss is its *sum* over the
  global count times N, and DistributedDataParallel averages gradients over ranks, so the
  update is the mean over the global batch, as in one process;
- wraps the model in DistributedDataParallel, which allocates gradient buckets for
  trainable parameters only (frozen weights have ``requires_grad=False``);
- evaluates its contiguous share of a split; predictions and loss sums are gathered
  (:func:`gather`);
- writes nothing unless it is rank 0 (logs, checkpoints, metrics, adapter files), and
  learns whether rank 0's write worked (:func:`on_main`): a write that fails on rank 0
  (full disk, read-only folder) stops every rank at once with an error naming the file,
  instead of leaving the others to wait for rank 0 in the next collective operation. The
  feature cache is built once: the first rank takes its build lock, the others wait.

Resume: rank 0 decides whether there is a run and a checkpoint to resume from and tells
the others (:func:`broadcast`; a shared file system's attribute cache may show ranks
different things); every rank reads that checkpoint and continues where one process would.
``train --resume`` joins the group before anything is read, so rank 0 alone reads the
run's recorded configuration (``train.run.resume_run``).

One difference from one process remains: BatchNorm layers (the Conformer adapter's)
normalise with their rank's share of the batch, and DDP copies rank 0's running statistics
to the other ranks at each step, as usual in data-parallel training.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def requested() -> bool:
    """Whether a launcher (torchrun, :func:`spawn`) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[Ranks, torch.device, bool]:
    """Join the process group torchrun/spawn describe, if any: (ranks, this rank's device,
    whether this call created the group and so must destroy it)."""
    if not requested() or dist.is_initialized():
        return current(), _rank_device(device), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return current(), _rank_device(device), True


def _rank_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def teardown(created: bool, wait: bool = True) -> None:
    """Leave the group :func:`setup` created; ``wait`` for the other ranks first (not after a failure)."""
    if created:
        if wait:
            dist.barrier()  # rank 0 may still be writing the run's files
        # DDP wrappers left in reference cycles hold the group's communication threads; freed
        # only at interpreter exit, after the group, they sometimes abort the process
        # ("terminate called without an active exception") though the run finished.
        gc.collect()
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over ``module``'s trainable parameters (identity in one process)."""
    if current().world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # static_graph: the same parameters take part in every step, so DDP need not search for
    # unused ones (a method whose parameter is unused would otherwise stall the reduction).
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, static_graph=True)


def share(count: int, ranks: Ranks | None = None) -> slice:
    """This rank's contiguous share of ``count`` items (the first ``count % N`` ranks get one more)."""
    ranks = ranks or current()
    size, extra = divmod(count, ranks.world_size)
    start = ranks.rank * size + min(ranks.rank, extra)
    return slice(start, start + size + (ranks.rank < extra))


def local_part(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's share of a global batch (the tensors themselves in one process)."""
    part = share(len(tensors[0]))
    return tuple(t[part] for t in tensors)


def all_sum(*values: float) -> list[float]:
    """Sums over ranks of a few numbers (the numbers themselves in one process)."""
    if current().world_size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return total.tolist()


def _collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: NCCL reduces GPU tensors only (this
    rank's GPU, set by :func:`setup`); gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(value):
    """Rank 0's ``value`` on every rank (``value`` itself in one process)."""
    if current().world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Rank 0 failed, so this rank stops too."""


def on_main(function: Callable[[], T], what: str) -> T | None:
    """``function()`` run by rank 0 alone (its result there, None elsewhere), its outcome every rank's.

    When it raises, rank 0 raises its own error and every other rank, at the same moment, one
    saying rank 0 failed to ``what``, with rank 0's message. Without this the other ranks would go
    on and wait for rank 0 in the next collective operation, until the backend notices that rank 0
    is gone (with an error that does not say why) or its timeout ends the wait.
    """
    ranks = current()
    result, error = None, None
    if ranks.is_main:
        try:
            result = function()
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
            error = caught
    message = broadcast(None if error is None else " ".join(str(error).split()) or type(error).__name__)
    if error is not None:
        raise error
    if message is not None:
        raise RankFailedError(f"rank {ranks.rank} stopped: rank 0 failed to {what}: {message}")
    return result


def gather(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    if current().world_size == 1:
        return [value]
    values = [None] * current().world_size
    dist.all_gather_object(values, value)
    return values


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(function, nproc: int, *args) -> None:
    """Run ``function(*args)`` in ``nproc`` new processes on this machine, as ranks 0..nproc-1."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    port = _free_port()
    torch.multiprocessing.spawn(_rank_main, args=(nproc, port, function, args), nprocs=nproc, join=True)


def _rank_main(rank: int, nproc: int, port: int, function, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    function(*args)
