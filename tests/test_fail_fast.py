"""The command line's promises: exit codes, one clear message, no traceback, nothing lost.

Most tests run `exigo.cli.main` in-process on tiny blobs: `tiny_cli` swaps MNIST, the CNN and
the default analyses for toy ones, so the CLI's own logic runs in milliseconds.
"""

import errno
import json
import signal
import subprocess
import sys

import pytest
import torch
from test_reliability import HOLD_LOCK, PoisonedNet, SignalAt

import exigo.analyses
import exigo.data
import exigo.engine.run_dir
import exigo.models
import exigo.pipeline
from exigo.analysis import Analysis
from exigo.cli import main
from exigo.engine.checkpoint import save_checkpoint

from conftest import REPO, TinyNet, make_blobs


class Broken(Analysis):
    name = "broken"

    def __call__(self, ctx):
        raise RuntimeError("plotting backend exploded")


@pytest.fixture
def tiny_cli(monkeypatch):
    """Make `main` train TinyNet on blobs with `tiny_cli.analyses` (default none)."""

    class Setup:
        def __init__(self):
            self.analyses = []
            self.train = make_blobs(96, seed=0)
            self.model = TinyNet

    setup = Setup()
    monkeypatch.setattr(exigo.data, "load_mnist", lambda root, download: (setup.train, VAL))
    monkeypatch.setattr(exigo.data, "load_dataset", lambda name, root, **_: (setup.train, VAL))
    monkeypatch.setattr(exigo.models, "MnistCNN", lambda num_classes: setup.model(num_classes))
    monkeypatch.setattr(exigo.models, "default_model", lambda shape, classes: setup.model(classes))
    monkeypatch.setattr(exigo.analyses, "default_analyses", lambda config: setup.analyses)
    return setup


VAL = make_blobs(30, seed=1)


def args(save_dir, *more):
    return ["--save-dir", str(save_dir), "--batch-size", "16", "--lr", "0.01", *more]


def code_of(argv) -> int:
    """`main`'s exit code, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


# ---------------------------------------------------------------- 1. fail fast


@pytest.mark.parametrize(
    "option",
    [
        ["--run-name", "../elsewhere"],
        ["--run-name", "a/b"],
        ["--seed", "-1"],
        ["--seed", str(2**64)],
        ["--weight-decay", "inf"],
        ["--weight-decay", "nan"],
        ["--weight-decay", "-0.1"],
        ["--epochs", "two"],
        ["--label-smoothing", "1"],
        ["--device", "nonsense"],
        ["--device", "cuda:99"],
        ["--no-such-option"],
    ],
)
def test_bad_options_exit_2_before_anything(option, tmp_path, capsys):
    assert code_of(["--save-dir", str(tmp_path / "save"), *option]) == 2
    err = capsys.readouterr().err
    assert option[0] in err or "--device" in err
    assert "Traceback" not in err
    assert not (tmp_path / "save" / "run.json").exists()


DAMAGES = {
    "truncated images": ("train-images-idx3-ubyte", lambda data: data[: len(data) // 2]),
    "truncated labels": ("t10k-labels-idx1-ubyte", lambda data: data[:100]),
    "empty file": ("train-labels-idx1-ubyte", lambda data: b""),
    "not IDX": ("t10k-images-idx3-ubyte", lambda data: b"<html>404 Not Found</html>" * 100),
    "wrong type byte": ("train-labels-idx1-ubyte", lambda data: data[:2] + b"\x09" + data[3:]),
    "label out of range": ("t10k-labels-idx1-ubyte", lambda data: data[:8] + b"\xc8" + data[9:]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_corrupt_data_exit_2_naming_the_file_and_keeping_the_previous_run(
    damage, mnist_copy, tmp_path, capsys
):
    save = tmp_path / "save"
    save.mkdir()
    (save / "run.json").write_text(json.dumps({"run_name": "old", "config": {}}))
    (save / "metrics.json").write_text("[]\n")
    name, damaged = DAMAGES[damage]
    path = mnist_copy / "MNIST" / "raw" / name
    path.write_bytes(damaged(path.read_bytes()))
    assert main(["--data-dir", str(mnist_copy), "--no-download", "--save-dir", str(save)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err.replace("\n", "") and "corrupt" in err
    assert (save / "metrics.json").read_text() == "[]\n"  # the previous run is untouched


def test_failed_download_says_so_without_suggesting_to_allow_it(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import MNIST

    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\n")

    monkeypatch.setattr(MNIST, "download", no_network)
    assert main(["--data-dir", str(tmp_path / "none"), "--save-dir", str(tmp_path / "s")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "downloading it failed: Error downloading train-images-idx3-ubyte.gz" in err
    assert "allow the download" not in err and "--no-download" not in err
    assert "--data-dir" in err and "t10k-labels-idx1-ubyte" in err


def test_missing_data_with_no_download_names_files_and_the_way_out(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["--data-dir", str(root), "--no-download", "--save-dir", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    for name in exigo.data.MNIST_FILES:
        assert f"{root / name} (missing)" in err
    assert "drop --no-download" in err and "--data-dir" in err


@pytest.mark.parametrize("where", ["file", "under a file", "proc"])
def test_save_dir_that_cannot_be_written_exits_2(where, tmp_path, tiny_cli, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    save = {
        "file": blocker,
        "under a file": blocker / "save",
        "proc": "/proc/exigo-cannot-create",  # not creatable even for root
    }[where]
    assert main(args(save)) == 2
    assert "--save-dir" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_save_dir_with_files_exigo_did_not_write_is_not_emptied(tmp_path, tiny_cli, capsys):
    thesis = tmp_path / "models" / "thesis.pt"
    thesis.parent.mkdir()
    thesis.write_bytes(b"months of work")
    assert main(args(tmp_path, "--epochs", "1")) == 2
    assert "no exigo run.json" in capsys.readouterr().err
    assert thesis.read_bytes() == b"months of work"


# ---------------------------------------------------------------- 2. signals


def test_sigterm_exit_143_with_one_line(tmp_path, tiny_cli, capsys):
    tiny_cli.train = SignalAt(make_blobs(96, seed=0), 96 + 30, signal.SIGTERM)
    assert main(args(tmp_path, "--epochs", "3")) == 143
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert "interrupted by SIGTERM" in line and "--resume" in err


# ---------------------------------------------------------------- 3. resume refusals


def test_resume_problems_exit_2(tmp_path, tiny_cli, capsys):
    assert main(args(tmp_path, "--epochs", "1", "--resume")) == 2
    assert "nothing to continue" in capsys.readouterr().err

    assert main(args(tmp_path, "--epochs", "1")) == 0
    assert main(args(tmp_path, "--epochs", "2", "--resume")) == 2
    assert "epochs 1 then, 2 now" in capsys.readouterr().err

    last = tmp_path / "models" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by a full disk, say
    assert main(args(tmp_path, "--epochs", "1", "--resume")) == 2
    assert str(last) in capsys.readouterr().err.replace("\n", "")

    save_checkpoint(last, torch.nn.Linear(3, 3), epoch=1)  # another architecture
    assert main(args(tmp_path, "--epochs", "1", "--resume")) == 2
    assert str(last) in capsys.readouterr().err.replace("\n", "")


# ---------------------------------------------------------------- 5. divergence


def test_huge_learning_rate_exits_3_suggesting_a_smaller_one(tmp_path, tiny_cli, capsys):
    argv = ["--save-dir", str(tmp_path), "--batch-size", "16", "--lr", "1e30"]
    assert main(argv) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "training loss became nan" in err and "smaller --lr" in err
    assert not (tmp_path / "models" / "best.pt").exists()


def test_divergence_after_a_good_epoch_keeps_its_checkpoint(tmp_path, tiny_cli, capsys):
    tiny_cli.model = lambda classes: PoisonedNet(at=9)
    assert main(args(tmp_path, "--epochs", "3")) == 3
    assert "best model (epoch 1)" in " ".join(capsys.readouterr().err.split())
    assert torch.load(tmp_path / "models" / "best.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- 6. failing analyses


def test_failing_analysis_exit_1_naming_it_after_all_epochs(tmp_path, tiny_cli, capsys):
    tiny_cli.analyses = [Broken()]
    assert main(args(tmp_path, "--epochs", "2")) == 1
    captured = capsys.readouterr()
    assert "analysis broken failed at epochs 1, 2: RuntimeError: plotting backend exploded" in (
        " ".join(captured.err.split())
    )
    assert "Traceback" in captured.out  # once, to find the bug
    assert [row["epoch"] for row in json.loads((tmp_path / "metrics.json").read_text())] == [1, 2]


# ---------------------------------------------------------------- 7. concurrency


def test_second_process_on_the_same_save_dir_exits_2(tmp_path, tiny_cli, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert main(args(tmp_path, "--epochs", "1")) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"is in use by another exigo run (pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert main(args(tmp_path, "--epochs", "1")) == 0


# ---------------------------------------------------------------- full disk


def test_disk_full_mid_run_exits_1_with_a_message(tmp_path, tiny_cli, monkeypatch, capsys):
    real = exigo.engine.run_dir.atomic_write_json
    calls = []

    def full_on_second_metrics(path, value):
        if path.name == "metrics.json":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, value)

    monkeypatch.setattr(exigo.engine.run_dir, "atomic_write_json", full_on_second_metrics)
    assert main(args(tmp_path, "--epochs", "3")) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "No space left on device" in err and "--resume" in err
    assert torch.load(tmp_path / "models" / "last.pt", weights_only=True)["epoch"] == 1
