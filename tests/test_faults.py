"""Fault drill (issue 20): each fault a careful user can meet, run for real, and what it leaves.

The promise under test, from the README: bad input gets a clear message and loses nothing,
exit 2 and one sentence; a run that fails before its first epoch is committed leaves the
previous run as it was; a full disk is one message naming the file and the free space.
Most faults run `exigo.cli.main` in-process on tiny blobs (`tiny_cli` from test_fail_fast);
the real-MNIST ones share one real run.
"""

import contextlib
import json
import os
import shutil
import zipfile
from urllib.error import URLError

import pytest
import torch
from test_fail_fast import args, code_of, tiny_cli  # noqa: F401 (a fixture)
from test_reliability import SignalAfterEpoch, quiet, tiny_config
from test_reliability import make_blobs_pair as blobs_pair

from exigo.analysis import Analysis
from exigo.cli import main
from exigo.data import DataError, load_mnist
from exigo.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from exigo.pipeline import ResumeError, RunInterrupted, run

from conftest import TinyNet

# ---------------------------------------------------------------- checkpoints


def flip_bytes_inside(path, member_suffix: str) -> str:
    """Flip a byte in the middle of the first archive member ending in `member_suffix`."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
        with open(path, "rb") as handle:  # the local header: 30 bytes, then name and extra
            handle.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in "ne")
    start = info.header_offset + 30 + name_length + extra_length
    data = bytearray(path.read_bytes())
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


def test_checkpoint_with_damaged_tensor_data_is_refused_naming_the_member(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, TinyNet(), epoch=1)
    member = flip_bytes_inside(path, "data/0")
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, TinyNet())
    message = str(raised.value)
    assert str(path) in message and member in message and "damaged" in message
    assert "\n" not in message


class Malicious:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_one_sentence_naming_the_global(tmp_path):
    path = tmp_path / "last.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": "exigo-checkpoint", "model": {}, "x": Malicious(marker)}, path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, TinyNet())
    message = str(raised.value)
    assert not marker.exists()
    assert message.startswith(f"{path} was not loaded: it holds code or objects")
    assert f"({os.system.__module__}.system)" in message  # posix.system
    assert "\n" not in message and "weights_only" not in message and "Re-running" not in message


# ---------------------------------------------------------------- options


UNUSABLE_DEVICES = ["xpu", "hpu", "xla", "vulkan", "ipu", "mtia", "privateuseone", "lazy", "meta"]


@pytest.mark.parametrize("device", UNUSABLE_DEVICES)
def test_devices_this_torch_cannot_use_exit_2_listing_the_usable_ones(device, tmp_path, capsys):
    from exigo.engine.world import usable_devices

    if device in usable_devices():
        pytest.skip(f"{device} is usable on this machine")
    save = tmp_path / "save"
    assert code_of(["--save-dir", str(save), "--device", device]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--device '{device}' cannot be used here" in err
    assert "usable: auto, cpu" in err and "Traceback" not in err
    assert not save.exists()


def test_an_abbreviated_option_is_not_taken_for_a_longer_one(tmp_path, capsys):
    assert code_of(["--save-dir", str(tmp_path / "save"), "--epoch", "3"]) == 2
    assert "unrecognized arguments: --epoch 3" in capsys.readouterr().err
    assert not (tmp_path / "save").exists()


def test_the_largest_seed_reaches_every_seeded_analysis(tmp_path):
    from exigo.analyses import default_analyses

    config = tiny_config(tmp_path, epochs=1, seed=2**63 - 1, projection_limit=30)
    torch.manual_seed(config.seed)
    result = run(config, TinyNet(), *blobs_pair(), default_analyses(config), console=quiet())
    assert result.failed_analyses == []
    assert (tmp_path / "plots" / "tsne_1.png").exists()


def test_numpy_seed_keeps_small_seeds_and_folds_large_ones():
    from exigo.analyses._random import numpy_seed

    assert [numpy_seed(s) for s in (0, 7, 2**32 - 1, 2**32, 2**32 + 7, 2**63 - 1)] == [
        0,
        7,
        2**32 - 1,
        0,
        7,
        2**32 - 1,
    ]


# ---------------------------------------------------------------- smaller ones (item 9)


class PartlyMeasured(Analysis):
    """Records one metric, then fails: the metric must not outlive the failure."""

    name = "partly"

    def __call__(self, ctx):
        ctx.metrics["partly/first"] = 1.0
        raise RuntimeError("second half failed")


def test_a_failed_analysis_leaves_no_partial_metrics(tmp_path):
    result = run(tiny_config(tmp_path, epochs=1), TinyNet(), *blobs_pair(), [PartlyMeasured()])
    assert [name for _, name, _ in result.failed_analyses] == ["partly"]
    (row,) = json.loads((tmp_path / "metrics.json").read_text())
    assert "partly/first" not in row and "partly/first" not in result.history[0]


def test_images_and_labels_of_different_lengths_name_both_files(mnist_copy):
    raw = mnist_copy / "MNIST" / "raw"
    # each file whole and valid, but the images are the held-out split's 2,000
    shutil.copyfile(raw / "t10k-images-idx3-ubyte", raw / "train-images-idx3-ubyte")
    with pytest.raises(DataError) as raised:
        load_mnist(mnist_copy, download=False)
    message = str(raised.value)
    assert str(raw / "train-images-idx3-ubyte") in message
    assert str(raw / "train-labels-idx1-ubyte") in message
    assert "(2000 images)" in message and "(8000 labels)" in message


@pytest.mark.usefixtures("tiny_cli")
def test_save_dir_that_is_a_file_says_so(tmp_path, capsys):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n")
    assert main(args(path)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--save-dir {path} is a file, not a folder" in err
    assert path.read_text() == "a,b\n"
    assert main(args(path / "save")) == 2
    assert f"{path} is a file, not a folder" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("inside_save_dir", [False, True])
def test_a_failed_download_creates_no_folder(inside_save_dir, tmp_path, monkeypatch, capsys):
    import torchvision.datasets.mnist

    def offline(url, **_):
        raise URLError("no network")

    # torchvision itself creates MNIST/raw, then fails to download into it
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    save = tmp_path / "save"
    data = save / "data" if inside_save_dir else tmp_path / "nonexistent" / "deeper"
    assert main(["--data-dir", str(data), "--save-dir", str(save)]) == 2
    assert "downloading it failed" in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("tiny_cli")
def test_a_folder_of_someone_elses_files_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "thesis.docx").write_bytes(b"months of work")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert main(args(tmp_path, "--epochs", "1")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds files exigo did not write (photos, thesis.docx)" in err
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


@pytest.mark.usefixtures("tiny_cli")
def test_an_exigo_run_folder_keeps_the_users_notes_and_its_data_folder(tmp_path):
    (tmp_path / "data" / "MNIST").mkdir(parents=True)  # --data-dir inside --save-dir
    assert main(args(tmp_path, "--epochs", "1", "--data-dir", str(tmp_path / "data"))) == 0
    (tmp_path / "notes.txt").write_text("lr 0.01 looks good")
    assert main(args(tmp_path, "--epochs", "1", "--data-dir", str(tmp_path / "data"))) == 0
    assert (tmp_path / "notes.txt").read_text() == "lr 0.01 looks good"
    assert (tmp_path / "data" / "MNIST").is_dir()


# ---------------------------------------------------------------- threads (item 7)


class Threads(Analysis):
    """Records torch's CPU thread count at every epoch."""

    name = "threads"

    def __init__(self):
        self.seen = []

    def __call__(self, ctx):
        self.seen.append(torch.get_num_threads())


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("keep_threads")
def test_run_applies_config_threads_and_gives_the_old_count_back(tmp_path):
    torch.set_num_threads(2)
    watcher = Threads()
    run(tiny_config(tmp_path, epochs=1, threads=1), TinyNet(), *blobs_pair(), [watcher])
    assert watcher.seen == [1] and torch.get_num_threads() == 2


@pytest.mark.usefixtures("keep_threads")
def test_resume_holds_to_the_runs_thread_count_unless_forced(tmp_path):
    def attempt(threads, *, resume=False, force=False, stop_at=None):
        """The thread counts each epoch's analyses saw; stopped during epoch `stop_at`."""
        torch.manual_seed(0)
        watcher = Threads()
        config = tiny_config(tmp_path, run_name="r", threads=threads, resume=resume, force=force)
        analyses = [watcher, SignalAfterEpoch(stop_at)]
        with contextlib.suppress(RunInterrupted):
            run(config, TinyNet(), *blobs_pair(), analyses, console=quiet())
        return watcher.seen

    assert attempt(1, stop_at=2) == [1, 1]  # epoch 1 committed with one thread
    assert load_checkpoint(tmp_path / "models" / "last.pt")["threads"] == 1
    assert json.loads((tmp_path / "run.json").read_text())["threads"] == 1
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(ResumeError) as raised:
        attempt(2, resume=True)
    message = str(raised.value)
    assert "trained with 1 CPU threads and --threads 2" in message and "--force" in message
    assert (tmp_path / "metrics.json").read_bytes() == before
    torch.set_num_threads(2)
    assert attempt(0, resume=True, stop_at=3) == [1, 1]  # left out: the run's own count
    assert attempt(2, resume=True, force=True) == [2]
    assert load_checkpoint(tmp_path / "models" / "last.pt")["threads"] == 2
