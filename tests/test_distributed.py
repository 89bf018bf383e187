"""Data-parallel training on CPU with gloo: 2 ranks at global batch B train the same adapter as
1 process at batch B (LoRA through `--nproc`, an adapter method through torchrun), a killed
2-rank run resumes exactly (as rank 0 sees the files), `train --resume` (torchrun, --nproc)
resumes like one process when rank 1 cannot see the run's config.yaml, and a write failing on rank 0 stops
every rank. Every multi-process run is bounded in time (``multiprocess``): a rank waiting
forever for another fails its test instead of hanging the suite."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multiprocess import run_bounded, run_ranks, spawn_bounded
from audiopetl.experiments.synthetic import make_synthetic_dataset
from audiopetl.train import ADAPTER, TrainConfig, distributed, resume_run, run_training
from audiopetl.train import loop as loop_module
from audiopetl.train import run as run_module
from audiopetl.train.precision import FAST_BF16_ENV

LORA = {"method": "lora", "targets": ["q", "v"], "reduction_rate": 16, "alpha": 8.0}
# Float tolerance: DDP sums two ranks' partial gradients where one process sums one batch.
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("ddp-data"), clips_per_class=8, seconds=1.0, seed=4)


def options(dataset, cache, method, batch_size) -> dict:
    # batch 9 does not divide by 2 ranks: shares of 5 and 4 clips, and a short last batch.
    return dict(dataset="folder", data_root=str(dataset), backbone="tiny-random", max_frames=100, epochs=3,
                batch_size=batch_size, cache_dir=str(cache), progress=False, device="cpu", precision="fp32",
                method=method, specaugment=True)


def adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = run_dir.glob(f"*/{ADAPTER}")
    return load_file(path)


def assert_same_run(ours: Path, theirs: Path) -> None:
    a, b = adapters(ours), adapters(theirs)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOLERANCE, msg=name)
    for x, y in zip(json.loads((ours / "metrics.json").read_text())["splits"],
                    json.loads((theirs / "metrics.json").read_text())["splits"]):
        assert x["test_accuracy"] == y["test_accuracy"] and x["best_epoch"] == y["best_epoch"]
        assert x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-4)


@pytest.fixture(scope="module")
def one_process_lora(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-ref")
    run_training(TrainConfig(**options(dataset, root / "cache", LORA, 9)), root / "run")
    return root / "run"


def test_teardown_frees_ddp_wrappers_in_reference_cycles_before_leaving_the_group(tmp_path):
    """A DDP wrapper freed only at interpreter exit, after the group is gone, sometimes aborts
    its process (SIGABRT, "terminate called without an active exception"; 2 of 30 two-rank runs
    here without this): teardown collects such cycles while the group still exists."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    model = DistributedDataParallel(torch.nn.Linear(2, 2))
    model.cycle = [model]  # unreachable after `del`, but not freed until a collection
    alive = weakref.ref(model)
    del model
    gc.disable()  # no automatic collection may do teardown's work for it
    try:
        assert alive() is not None
        distributed.teardown(created=True, wait=False)
        assert alive() is None
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_shares_of_a_global_batch_are_contiguous_and_cover_it():
    shares = [distributed.share(10, distributed.Ranks(rank, 3)) for rank in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 4), (4, 7), (7, 10)]
    assert distributed.share(1, distributed.Ranks(1, 2)) == slice(1, 1)  # an empty share is allowed


def test_two_processes_train_the_same_lora_as_one(dataset, one_process_lora, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({k: v for k, v in options(dataset, tmp_path / "cache", LORA, 9).items()}))
    result = run_bounded([sys.executable, "-m", "audiopetl", "train", "--config", str(config),
                          "--run-dir", str(tmp_path / "ddp"), "--nproc", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "ddp", one_process_lora)
    assert len(list((tmp_path / "cache" / "features").glob("*.f32"))) == 1  # built once, by one rank


def test_torchrun_trains_the_same_adapter_as_one_process(dataset, tmp_path):
    values = options(dataset, tmp_path / "cache", "bottleneck_pf_par", 8)
    run_training(TrainConfig(**values), tmp_path / "one")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(values))
    result = run_bounded(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "audiopetl", "train", "--config", str(config), "--run-dir", str(tmp_path / "two")],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # rank 0 alone reports
    assert_same_run(tmp_path / "two", tmp_path / "one")


def _train_and_die_after_epoch_2(config: TrainConfig, run_dir: Path) -> None:
    real_save = loop_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == 2:
            os._exit(1)  # a kill: no clean-up, no exception handling

    loop_module.save_checkpoint = save_then_die
    run_training(config, run_dir)


def _resume_where_rank_1_sees_no_files(config: TrainConfig, run_dir: Path) -> None:
    """Resume, on a rank 1 whose view of the run folder is stale (as a shared file system's
    attribute cache can be): it sees no config.yaml and no checkpoint. Rank 0 decides."""
    if os.environ["RANK"] != "0":
        real_exists = Path.exists
        Path.exists = lambda path, **kw: path.name not in ("config.yaml", "checkpoint.pt") and real_exists(path, **kw)
    run_training(config, run_dir, resume=True)


def _resume_where_rank_1_reads_an_older_checkpoint(config: TrainConfig, run_dir: Path) -> None:
    """Resume, on a rank 1 that reads an older version of the checkpoint (a shared file
    system's stale cache): the ranks would continue from different epochs."""
    if os.environ["RANK"] != "0":
        real_load = loop_module.load_checkpoint
        loop_module.load_checkpoint = lambda path: {**(state := real_load(path)), "epoch": state["epoch"] - 1}
    run_training(config, run_dir, resume=True)


def test_a_killed_two_process_run_resumes_exactly(dataset, one_process_lora, tmp_path):
    config = TrainConfig(**options(dataset, tmp_path / "cache", LORA, 9))
    assert spawn_bounded(_train_and_die_after_epoch_2, 2, config, tmp_path / "run").returncode != 0
    assert not (tmp_path / "run" / "metrics.json").exists()
    # A rank resuming alone from epoch 1 while the other resumes from epoch 3 would stall both.
    result = spawn_bounded(_resume_where_rank_1_sees_no_files, 2, config, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    (log,) = (tmp_path / "run").glob("*/log.jsonl")
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert_same_run(tmp_path / "run", one_process_lora)
    # Ranks that read different versions of the checkpoint both stop, saying so.
    result = spawn_bounded(_resume_where_rank_1_reads_an_older_checkpoint, 2, config, tmp_path / "run")
    assert result.returncode != 0 and "ranks read different versions" in result.stderr, result.stderr[-3000:]


def hide_run_files_on_rank_1() -> None:
    """On rank 1 only, a stale view of the run folder (a shared file system's attribute cache):
    no config.yaml, no checkpoint."""
    if os.environ["RANK"] == "0":
        return
    hidden = ("config.yaml", "checkpoint.pt")
    real_exists, real_is_file, real_read_text = Path.exists, Path.is_file, Path.read_text

    def read_text(path, *args, **kwargs):
        if path.name in hidden:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_read_text(path, *args, **kwargs)

    Path.exists = lambda path, **kw: path.name not in hidden and real_exists(path, **kw)
    Path.is_file = lambda path, **kw: path.name not in hidden and real_is_file(path, **kw)
    Path.read_text = read_text


# `audiopetl train ARGS...` as one rank, rank 1 seeing a stale run folder.
_CLI_ON_A_STALE_RANK_1 = ("import sys; from test_distributed import hide_run_files_on_rank_1; "
                          "hide_run_files_on_rank_1(); from audiopetl.cli.main import main; "
                          "sys.exit(main(sys.argv[1:]))")


def _resume_run_on_a_stale_rank_1(run_dir: Path) -> None:
    hide_run_files_on_rank_1()
    resume_run(run_dir, {"progress": False})  # what `train --resume --nproc N` runs on each rank


@pytest.fixture
def interrupted_run(dataset, tmp_path, monkeypatch) -> Path:
    """A one-process run stopped after its epoch-2 checkpoint (of 3)."""
    real_save = loop_module.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt("stopped after epoch 2")

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_training(TrainConfig(**options(dataset, tmp_path / "cache", LORA, 9)), tmp_path / "run")
    return tmp_path / "run"


def assert_resumed_like_one_process(run_dir: Path, one_process_lora: Path) -> None:
    (log,) = run_dir.glob("*/log.jsonl")
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert_same_run(run_dir, one_process_lora)


def test_torchrun_resume_with_a_rank_that_cannot_see_the_config_resumes_like_one_process(
        interrupted_run, one_process_lora):
    # Each rank reading config.yaml itself, rank 1 would fail alone before the group exists and
    # rank 0 would wait for it: the bounded run fails instead of resuming.
    argv = [sys.executable, "-c", _CLI_ON_A_STALE_RANK_1, "train", "--resume", "--run-dir", str(interrupted_run),
            "--no-progress"]
    results = run_ranks(argv, 2, distributed._free_port())
    for rank, result in enumerate(results):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    assert results[0].stdout.count("run directory:") == 1 and "run directory:" not in results[1].stdout
    assert_resumed_like_one_process(interrupted_run, one_process_lora)


def test_nproc_resume_with_a_rank_that_cannot_see_the_config_resumes_like_one_process(
        interrupted_run, one_process_lora):
    result = spawn_bounded(_resume_run_on_a_stale_rank_1, 2, interrupted_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_like_one_process(interrupted_run, one_process_lora)


def test_resume_of_a_folder_with_no_run_stops_every_rank_saying_why(tmp_path):
    argv = [sys.executable, "-m", "audiopetl", "train", "--resume", "--run-dir", str(tmp_path / "nothing")]
    for rank, result in enumerate(run_ranks(argv, 2, distributed._free_port())):
        assert result.returncode == 2, (rank, result.stderr[-3000:])
        assert "has no config.yaml to resume from" in result.stderr.strip().splitlines()[-1], (rank, result.stderr)
    assert not (tmp_path / "nothing").exists()


def _train_on_differing_cpus(config: TrainConfig, run_dir: Path, out: Path) -> None:
    rank = os.environ["RANK"]
    os.environ[FAST_BF16_ENV] = "1" if rank == "0" else "0"  # rank 0's CPU multiplies bf16 fast, rank 1's not
    real_fit = run_module.fit

    def recording_fit(*args, **kwargs):
        (out / f"rank{rank}").write_text(str(args[4].dtype))  # fit(model, train, valid, test, settings, ...)
        return real_fit(*args, **kwargs)

    run_module.fit = recording_fit
    run_training(config, run_dir)


def test_ranks_on_differing_cpus_all_take_rank_0s_precision(dataset, tmp_path):
    values = {**options(dataset, tmp_path / "cache", LORA, 8), "precision": "auto", "epochs": 1}
    result = spawn_bounded(_train_on_differing_cpus, 2, TrainConfig(**values), tmp_path / "run", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == str(torch.bfloat16)
    assert "precision: bf16" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_write_failing_on_rank_0_stops_every_rank_naming_the_file(dataset, tmp_path):
    # A folder where rank 0 must write the checkpoint file: its write fails (as on a full disk or
    # a read-only folder) while rank 1, which writes nothing, could go on to the next epoch.
    values = {**options(dataset, tmp_path / "cache", LORA, 8), "epochs": 2}
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(values))
    target = tmp_path / "run" / "auto" / "checkpoint.pt"
    target.mkdir(parents=True)
    argv = [sys.executable, "-m", "audiopetl", "train", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    rank0, rank1 = run_ranks(argv, 2, distributed._free_port())
    for rank, result in enumerate((rank0, rank1)):
        assert result.returncode == 2, (rank, result.stderr[-3000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("audiopetl train: error:") and str(target) in last, (rank, last)
        assert "Traceback" not in result.stderr
    assert "cannot write" in rank0.stderr and "Is a directory" in rank0.stderr  # the operating system's reason
    assert "rank 1 stopped: rank 0 failed to write in" in rank1.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
