"""torchrun and DistributedDataParallel: sharding, gathering, agreeing, and a real 2-process run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from exigo.engine import world as distributed
from exigo.engine.checkpoint import load_checkpoint
from exigo.engine.world import evaluation_shard, interleave_shards, training_indices
from exigo.models import MnistCNN

from conftest import REPO, make_blobs

TESTS = REPO / "tests"


# ---------------------------------------------------------------- pure index arithmetic


@pytest.mark.parametrize(("size", "world_size"), [(1, 1), (7, 1), (7, 2), (8, 2), (7, 3), (9, 3)])
def test_evaluation_shards_cover_every_index_once_and_interleave_back(size, world_size):
    shards = [evaluation_shard(size, rank, world_size) for rank in range(world_size)]
    assert sorted(torch.cat(shards).tolist()) == list(range(size))
    assert max(s.numel() for s in shards) - min(s.numel() for s in shards) <= 1
    # rows of a 2-D quantity per rank, padded like the gather pads them, back in dataset order
    values = torch.arange(size * 2).view(size, 2)
    longest = -(-size // world_size)
    padded = [torch.full((longest, 2), -1) for _ in shards]
    for part, shard in zip(padded, shards, strict=True):
        part[: shard.numel()] = values[shard]
    assert torch.equal(interleave_shards(padded, size), values)


def test_interleave_by_hand():
    parts = [torch.tensor([0, 2, 4]), torch.tensor([1, 3, 99])]  # 99: padding of rank 1
    assert interleave_shards(parts, 5).tolist() == [0, 1, 2, 3, 4]


def test_training_indices_partition_each_epoch_and_reshuffle():
    data = make_blobs(7)
    epoch1 = [training_indices(data, 1, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [part.numel() for part in epoch1] == [4, 4]  # ceil(7 / 2), one index padded
    assert set(torch.cat(epoch1).tolist()) == set(range(7))
    again = [training_indices(data, 1, seed=0, rank=r, world_size=2) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(epoch1, again, strict=True))
    epoch2 = [training_indices(data, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    assert not all(torch.equal(a, b) for a, b in zip(epoch1, epoch2, strict=True))
    whole = training_indices(data, 1, seed=0, rank=0, world_size=1)
    assert sorted(whole.tolist()) == list(range(7))


# ---------------------------------------------------------------- no torchrun, no process group


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.join("cpu") is None
    assert distributed.is_main() and distributed.current() is None
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: one process, no DDP
    with distributed.process_group("cpu") as world:
        assert world is None


def test_is_main_reads_the_rank_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()


def test_devices_that_cannot_be_shared_out_are_refused():
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        distributed._device_and_backend("cuda:1", 0)
    assert distributed._device_and_backend("cpu", 3) == (torch.device("cpu"), "gloo")


# ---------------------------------------------------------------- two Gloo processes

WORKER = textwrap.dedent(
    """
    import os, sys, time, torch
    from exigo.engine import world as distributed
    from exigo.engine.training import TrainResult, evaluate
    from conftest import TinyNet, make_blobs

    mode, out = sys.argv[1], sys.argv[2]
    world = distributed.join("cpu", timeout=float(sys.argv[3]))
    rank = world.rank
    if mode == "silent":
        if rank == 1:
            time.sleep(6)  # longer than the timeout, then leave without the collective
            sys.exit(0)
        try:
            world.all_ok(True)
        except distributed.DistributedError as error:
            with open(out + "/message.txt", "w") as handle:
                handle.write(str(error))
        # after a timed-out collective, Gloo's background thread can abort the interpreter's
        # teardown ("terminate called without an active exception", exit -6): leave at once
        os._exit(0)
    torch.manual_seed(0)
    model = TinyNet()
    data = make_blobs(37, seed=3)  # odd: the shards differ in length (19 and 18)
    result = distributed.evaluate_sharded(model, data, world, batch_size=5)
    trained = distributed.reduce_train_result(
        TrainResult(loss=1.0 + rank, accuracy=0.5 * rank, seconds=1.0, images=10 + 30 * rank),
        world,
    )
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(float(rank + 5))
    distributed.broadcast_buffers(norm, world)
    saved = dict(
        result=result.__dict__,
        single=evaluate(model, data, batch_size=7).__dict__ if rank == 0 else None,
        trained=trained.__dict__,
        signal=world.agree_on_signal(15 if rank == 1 else None),
        no_signal=world.agree_on_signal(None),
        all_ok=world.all_ok(rank == 0),
        broadcast=world.broadcast_object({"from": rank}),
        running_mean=norm.running_mean.clone(),
    )
    try:  # rank 1 fails inside the block: both raise, rank 0 with DistributedError
        with distributed.all_or_none(world, "testing"):
            if rank == 1:
                raise KeyError("only here")
    except BaseException as error:
        saved["all_or_none"] = type(error).__name__
    torch.save(saved, f"{out}/rank{rank}.pt")
    distributed.leave()
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two(
    tmp_path, mode: str, timeout: float = 60.0, script=None
) -> list[subprocess.CompletedProcess]:
    """Start ranks 0 and 1 as torchrun would (environment variables), wait for both."""
    if script is None:
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]),
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), mode, str(tmp_path), str(timeout)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    return [
        subprocess.CompletedProcess(process.args, process.returncode, output)
        for process, output in zip(processes, outputs, strict=True)
    ]


def test_two_processes_evaluate_reduce_and_agree_like_one(tmp_path):
    finished = launch_two(tmp_path, "collectives")
    assert [p.returncode for p in finished] == [0, 0], [p.stdout for p in finished]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    sharded, single = rank0["result"], rank0["single"]
    # the gathered evaluation is the single-process evaluation, row for row
    assert torch.equal(sharded["predictions"], single["predictions"])
    assert torch.equal(sharded["targets"], single["targets"])
    torch.testing.assert_close(sharded["probabilities"], single["probabilities"])
    torch.testing.assert_close(sharded["embeddings"], single["embeddings"])
    assert sharded["accuracy"] == single["accuracy"]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-6)
    # every rank knows the loss and accuracy; only rank 0 holds the rows
    assert rank1["result"]["loss"] == sharded["loss"]
    assert rank1["result"]["accuracy"] == sharded["accuracy"]
    assert rank1["result"]["predictions"].shape == (0,)
    assert rank1["result"]["probabilities"].shape == (0, 3)
    # image-weighted means: (1 * 10 + 2 * 40) / 50 and (0 * 10 + 0.5 * 40) / 50
    for saved in (rank0, rank1):
        assert saved["trained"]["loss"] == pytest.approx(1.8)
        assert saved["trained"]["accuracy"] == pytest.approx(0.4)
        assert saved["trained"]["images"] == 50
        assert saved["signal"] == 15 and saved["no_signal"] is None
        assert saved["all_ok"] is False
        assert saved["broadcast"] == {"from": 0}
        assert saved["running_mean"].tolist() == [5.0, 5.0, 5.0]
    assert rank0["all_or_none"] == "DistributedError"
    assert rank1["all_or_none"] == "KeyError"


def test_a_rank_that_does_not_answer_fails_the_others_after_the_timeout(tmp_path):
    finished = launch_two(tmp_path, "silent", timeout=2.0)
    assert [p.returncode for p in finished] == [0, 0], [p.stdout for p in finished]
    message = (tmp_path / "message.txt").read_text()
    assert message.startswith("rank 0 of 2: checking that every process is ready failed")
    assert "--dist-timeout 2 s" in message


PIPELINE_WORKER = textwrap.dedent(
    """
    import io, json, os, signal, sys, torch
    from rich.console import Console
    from torch.utils.data import Dataset
    from exigo.engine import world as distributed
    from exigo.analysis import Analysis
    from exigo.config import Config
    from exigo.pipeline import RunDiverged, RunInterrupted, run
    from conftest import TinyNet, make_blobs

    out = sys.argv[2]
    world = distributed.join("cpu", timeout=60.0)
    rank = world.rank

    class Trap(Dataset):
        # on rank `rank_`, the `at`-th image read sends SIGTERM or is NaN from then on
        def __init__(self, data, rank_=None, at=None, what="signal"):
            self.data, self.rank_, self.at, self.what, self.reads = data, rank_, at, what, 0
            self.classes = data.classes
        def __len__(self):
            return len(self.data)
        def __getitem__(self, index):
            image, label = self.data[index]
            if rank != self.rank_:
                return image, label
            self.reads += 1
            if self.what == "signal" and self.reads == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.what == "nan" and self.reads >= self.at:
                image = image * float("nan")
            return image, label

    class SignalOnMain(Analysis):
        name = "signal"
        def __call__(self, ctx):
            if ctx.epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    def attempt(name, train, analyses=(), **changes):
        config = Config(epochs=3, batch_size=8, lr=1e-2, probe_size=3, save_dir=f"{out}/{name}",
                        **changes)
        torch.manual_seed(0)
        try:
            result = run(config, TinyNet(), train, make_blobs(30, seed=1), list(analyses),
                         console=Console(file=io.StringIO()))
            return {"outcome": "done", "epochs": len(result.history)}
        except RunInterrupted as stop:
            return {"outcome": "interrupted", "signal": stop.signal_number}
        except RunDiverged as error:
            return {"outcome": "diverged", "message": str(error)}

    train = make_blobs(96, seed=0)  # 48 images, 6 batches per process per epoch
    outcomes = {
        "whole": attempt("whole", train),
        "stop_rank1": attempt("stopped", Trap(train, rank_=1, at=48 + 15)),  # epoch 2
        "resumed": attempt("stopped", train, resume=True),
        "stop_analysis": attempt("analysis", train, [SignalOnMain()], sequential=True),
        "stop_beside": attempt("beside", train, [SignalOnMain()]),
        "nan_rank1": attempt("nan", Trap(train, rank_=1, at=48 + 45, what="nan")),  # epoch 2
    }
    json.dump(outcomes, open(f"{out}/outcomes{rank}.json", "w"))
    distributed.leave()
    """
)


@pytest.mark.slow  # five tiny runs in two processes: tens of seconds on 2 loaded cores
def test_two_processes_stop_resume_and_diverge_together(tmp_path):
    script = tmp_path / "pipeline_worker.py"
    script.write_text(PIPELINE_WORKER)
    finished = launch_two(tmp_path, "pipeline", script=script)
    assert [p.returncode for p in finished] == [0, 0], [p.stdout[-3000:] for p in finished]
    rank0, rank1 = (
        json.loads((tmp_path / f"outcomes{rank}.json").read_text()) for rank in range(2)
    )
    metrics = {
        name: json.loads((tmp_path / name / "metrics.json").read_text())
        for name in ("whole", "stopped", "nan")
    }
    assert rank0["whole"] == {"outcome": "done", "epochs": 3}
    assert rank1["whole"] == {"outcome": "done", "epochs": 0}  # rank 1 records nothing
    # SIGTERM to rank 1 only, in epoch 2: both stop, epoch 1 kept, and resuming finishes the
    # run with the metrics of the uninterrupted one
    for outcomes in (rank0, rank1):
        assert outcomes["stop_rank1"] == {"outcome": "interrupted", "signal": 15}
        assert outcomes["stop_analysis"] == {"outcome": "interrupted", "signal": 15}
        assert outcomes["stop_beside"] == {"outcome": "interrupted", "signal": 15}
        assert outcomes["nan_rank1"]["outcome"] == "diverged"
    assert rank0["resumed"] == {"outcome": "done", "epochs": 3}
    keys = ["epoch", "train_loss", "eval_loss", "eval_accuracy", "lr"]
    assert [[row[k] for k in keys] for row in metrics["stopped"]] == [
        [row[k] for k in keys] for row in metrics["whole"]
    ]
    # SIGTERM on rank 0 during its analyses of epoch 1: that epoch is dropped on both
    assert not (tmp_path / "analysis" / "metrics.json").exists()
    # ... the same beside epoch 2's training: the signal reaches rank 0's main thread when it
    # can, so epoch 1 is dropped or saved whole, and epoch 2 is dropped on both
    beside = tmp_path / "beside" / "metrics.json"
    assert not beside.exists() or [row["epoch"] for row in json.loads(beside.read_text())] == [1]
    # NaN on rank 1's images in epoch 2: both stop; rank 0 keeps epoch 1 and says why
    assert [row["epoch"] for row in metrics["nan"]] == [1]
    assert "training loss became nan" in rank1["nan_rank1"]["message"]
    assert "another process" in rank0["nan_rank1"]["message"]


# ---------------------------------------------------------------- torchrun, end to end


@pytest.mark.slow
def test_torchrun_two_gloo_processes_on_mnist(mnist_root, tmp_path):
    save_dir = tmp_path / "save"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "runner.py",
        "--data-dir",
        str(mnist_root),
        "--epochs",
        "1",
        "--save-dir",
        str(save_dir),
        "--no-attribution-checks",
        "--projection-limit",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    # one set of outputs, written once (by rank 0)
    rows = json.loads((save_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in rows] == [1]
    assert len(list((save_dir / "logs").iterdir())) == 1
    assert finished.stdout.count("epoch 1/1  train loss") == 1
    run_info = json.loads((save_dir / "run.json").read_text())
    assert run_info["distributed"] == {"world_size": 2, "backend": "gloo"}
    # the checkpoint is the plain model's, loadable without torchrun
    checkpoint = load_checkpoint(save_dir / "models" / "best.pt", MnistCNN())
    assert checkpoint["model_class"] == "MnistCNN"
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    # 2 x 64 images per step, half the steps: in line with one process (about 0.97 here)
    assert rows[0]["eval_accuracy"] >= 0.95
    assert checkpoint["eval_accuracy"] == rows[0]["eval_accuracy"]
