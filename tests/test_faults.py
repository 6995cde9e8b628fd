"""Fault drill (issue 20): each fault a careful user can meet, run for real, and what it leaves.

The promise under test, from the README: bad input gets a clear message and loses nothing,
exit 2 and one sentence; a run that fails before its first epoch is committed leaves the
previous run as it was; a full disk is one message naming the file and the free space.
Most faults run `exigo.cli.main` in-process on tiny blobs (`tiny_cli` from test_fail_fast);
the real-MNIST ones share one real run.
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from urllib.error import URLError

import pytest
import torch
from test_fail_fast import args, code_of, tiny_cli  # noqa: F401 (a fixture)
from test_reliability import PoisonedNet, SignalAfterEpoch, SignalAt, quiet, tiny_config
from test_reliability import make_blobs_pair as blobs_pair

import exigo.engine.run_dir
from exigo.analysis import Analysis
from exigo.cli import main
from exigo.data import DataError, load_mnist
from exigo.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from exigo.engine.preflight import PreflightError
from exigo.pipeline import ResumeError, RunInterrupted, run

from conftest import REPO, TinyNet, make_blobs

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
    from exigo.engine.devices import usable_devices

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

    seed = 2**63 - 1  # the largest the command line takes; numpy takes [0, 2**32)
    config = tiny_config(tmp_path, epochs=1, seed=seed, projection_limit=30)
    analyses = default_analyses(config)  # t-SNE, class models, examples, attribution checks
    assert {type(a).__name__ for a in analyses} >= {
        "ProjectionAnalysis",
        "ClassModelAnalysis",
        "ExampleAnalysis",
        "AttributionAnalysis",
    }
    torch.manual_seed(0)
    result = run(config, TinyNet(), *blobs_pair(), analyses, console=quiet())
    assert result.failed_analyses == []
    for name in ("tsne", "class_models", "data_map", "attribution_checks"):
        assert (tmp_path / "plots" / f"{name}_1.png").exists(), name


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
        # sequential: the signal from inside an analysis must drop that epoch, as in the
        # main thread (from the background thread it may arrive after the commit began)
        config = tiny_config(
            tmp_path, run_name="r", threads=threads, resume=resume, force=force, sequential=True
        )
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


# ---------------------------------------------------------------- the previous run (item 1)


def listing(folder):
    """Every file and folder under `folder` (relative), with each file's bytes' hash."""
    import hashlib

    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        )
        for path in sorted(folder.rglob("*"))
        if path.name != ".lock.holder"
    }


@pytest.mark.usefixtures("tiny_cli")
@pytest.mark.parametrize(
    "option",
    [["--lr", "1e39"], ["--lr", "1e38"], ["--device", "meta"]],
)
def test_an_option_that_cannot_work_is_exit_2_and_keeps_the_previous_run(option, tmp_path, capsys):
    assert main(args(tmp_path, "--epochs", "1", "--run-name", "r")) == 0
    before = listing(tmp_path)
    capsys.readouterr()
    code = main([*args(tmp_path, "--epochs", "1", "--run-name", "r"), *option])
    err = " ".join(capsys.readouterr().err.split())
    assert listing(tmp_path) == before
    assert code == 2 and "Traceback" not in err
    assert err.count("error:") == 1 and option[0] in err


def test_the_trial_step_catches_what_passes_every_check_before_it(tmp_path, monkeypatch):
    import exigo.engine.devices

    monkeypatch.setattr(exigo.engine.devices, "usable_devices", lambda: ["cpu", "meta"])
    torch.manual_seed(0)
    run(tiny_config(tmp_path, epochs=1), TinyNet(), *blobs_pair(), console=quiet())
    before = listing(tmp_path)
    with pytest.raises(PreflightError) as raised:
        run(tiny_config(tmp_path, epochs=1, device="meta"), TinyNet(), *blobs_pair())
    assert "fails on meta" in str(raised.value) and "meta tensors" in str(raised.value)
    assert listing(tmp_path) == before


def failing_in_epoch_1(fault, tiny_cli, monkeypatch):  # noqa: F811 (the fixture)
    """Make the next `main` run fail in its first epoch with `fault`; its exit code."""
    if fault == "SIGTERM":
        tiny_cli.train = SignalAt(make_blobs(96, seed=0), 40, signal.SIGTERM)
        return 143
    if fault == "diverged":
        tiny_cli.model = lambda classes: PoisonedNet(at=3)  # the trial step takes one
        return 3
    if fault == "disk full":
        real = exigo.engine.run_dir.atomic_write_json

        def full(path, value):
            if path.name == "metrics.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, value)

        monkeypatch.setattr(exigo.engine.run_dir, "atomic_write_json", full)
        return 1
    raise AssertionError(fault)


@pytest.mark.parametrize("fault", ["SIGTERM", "diverged", "disk full"])
def test_a_run_failing_before_its_first_commit_puts_the_previous_run_back(
    fault,
    tmp_path,
    tiny_cli,  # noqa: F811 (the fixture)
    monkeypatch,
    capsys,
):
    assert main(args(tmp_path, "--epochs", "2", "--run-name", "r")) == 0
    before = listing(tmp_path)
    metrics = (tmp_path / "metrics.json").read_bytes()
    capsys.readouterr()
    code = failing_in_epoch_1(fault, tiny_cli, monkeypatch)
    assert main(args(tmp_path, "--epochs", "1", "--run-name", "r")) == code
    err = " ".join(capsys.readouterr().err.split())
    assert listing(tmp_path) == before
    assert (tmp_path / "metrics.json").read_bytes() == metrics
    assert f"--save-dir {tmp_path} is back as it was" in err and "Traceback" not in err
    assert "--resume" not in err  # nothing of this run to resume


@pytest.mark.usefixtures("tiny_cli")
def test_the_previous_run_goes_once_the_first_epoch_is_committed(tmp_path, monkeypatch):
    assert main(args(tmp_path, "--epochs", "1", "--run-name", "old")) == 0
    real = exigo.engine.run_dir.atomic_write_json
    rows = []

    def full_at_epoch_2(path, value):
        if path.name == "metrics.json" and len(value) == 2:
            rows.append(value)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, value)

    monkeypatch.setattr(exigo.engine.run_dir, "atomic_write_json", full_at_epoch_2)
    assert main(args(tmp_path, "--epochs", "2", "--run-name", "new")) == 1
    assert rows and not (tmp_path / ".previous-run").exists()
    assert json.loads((tmp_path / "run.json").read_text())["run_name"] == "new"
    assert load_checkpoint(tmp_path / "models" / "last.pt")["epoch"] == 1


# ---------------------------------------------------------------- a full disk (item 5)


class FakeDisk:
    """A disk that holds `capacity` bytes of exigo's writes, then fails with ENOSPC.

    It counts what goes through `exigo._io.atomic_write` (checkpoints, metrics.json, figures,
    the report, the projector's files) and the TensorBoard event files' writes: every write
    exigo makes in the save dir.
    """

    def __init__(self, monkeypatch, capacity: float):
        import exigo._io
        import exigo.engine.events

        self.capacity, self.used = capacity, 0
        real_atomic_write = exigo._io.atomic_write

        def atomic_write(path, write):
            return real_atomic_write(path, lambda handle: write(self._Counted(handle, self)))

        class Os:  # the events module's `os`, with a write that fills the disk
            def __getattr__(_, name):
                return getattr(os, name)

            def write(_, fd, data):
                self.take(len(data))
                return os.write(fd, data)

        monkeypatch.setattr(exigo._io, "atomic_write", atomic_write)
        monkeypatch.setattr(exigo.engine.events, "os", Os())

    def take(self, size: int) -> None:
        if self.used + size > self.capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.used += size

    class _Counted:
        def __init__(self, handle, disk):
            self._handle, self._disk = handle, disk

        def write(self, data):
            self._disk.take(len(data))
            return self._handle.write(data)

        def __getattr__(self, name):
            return getattr(self._handle, name)


def event_records_are_whole(path) -> bool:
    """Whether the event file is a sequence of whole TensorBoard records, nothing cut."""
    import struct

    data, offset = path.read_bytes(), 0
    while offset < len(data):
        if offset + 12 > len(data):
            return False
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        offset += 12 + length + 4
    return offset == len(data)


def assert_every_file_whole_or_absent(save):
    from PIL import Image

    assert not [path for path in save.rglob("*") if path.name.endswith(".tmp")]
    for path in save.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            load_checkpoint(path)  # CRC-checked
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        elif path.name == "tensors.tsv":
            rows = path.read_text().splitlines()
            metadata = (path.parent / "metadata.tsv").read_text().splitlines()
            assert len(rows) == len(metadata) - 1
            assert {len(row.split("\t")) for row in rows} == {8}  # TinyNet's embedding
        elif path.name.startswith("events.out.tfevents"):
            assert event_records_are_whole(path), path


FULL_RUN_WRITES: dict[str, int] = {}  # bytes a whole run writes, measured once


@pytest.mark.parametrize("fraction", [0.1, 0.4, 0.7, 0.99])
def test_a_disk_filling_up_mid_run_is_one_message_and_whole_files(
    fraction,
    tmp_path,
    tiny_cli,  # noqa: F811 (the fixture)
    monkeypatch,
    capsys,
):
    from test_reliability import Plotter

    from exigo.analyses.projection import ProjectionAnalysis

    disk = FakeDisk(monkeypatch, capacity=float("inf"))
    if "total" not in FULL_RUN_WRITES:
        tiny_cli.analyses = [Plotter(), ProjectionAnalysis(limit=30)]
        assert main(args(tmp_path / "measure", "--epochs", "2", "--run-name", "r")) == 0
        FULL_RUN_WRITES["total"] = disk.used
    disk.capacity, disk.used = fraction * FULL_RUN_WRITES["total"], 0
    tiny_cli.analyses = [Plotter(), ProjectionAnalysis(limit=30)]
    capsys.readouterr()
    save = tmp_path / "save"
    assert main(args(save, "--epochs", "2", "--run-name", "r")) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "Exception in thread" not in out + err
    (line,) = [line for line in " ".join(err.split()).split("error: ")[1:]]
    assert f"cannot write {save}" in line and "No space left on device" in line
    assert "free there" in line and ".tmp" not in line
    assert_every_file_whole_or_absent(save)


TMPFS_RUNS = """
import contextlib, io, json, subprocess, sys
tests, *mounts = sys.argv[1:]
sys.path[:0] = [tests, tests.rsplit("/", 1)[0]]
import exigo.analyses, exigo.data, exigo.models
from conftest import REPO, TinyNet, make_blobs
from test_reliability import Plotter
from test_faults import assert_every_file_whole_or_absent
from exigo.analyses.projection import ProjectionAnalysis
from exigo.cli import main
exigo.data.load_dataset = lambda name, root, **_: (make_blobs(96, seed=0), make_blobs(30, seed=1))
exigo.models.default_model = lambda shape, classes: TinyNet(classes)
exigo.analyses.default_analyses = lambda config: [Plotter(), ProjectionAnalysis(limit=30)]
for mount in mounts:
    folder, size = mount.rsplit(":", 1)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], check=True)
    save, out, err = f"{folder}/save", io.StringIO(), io.StringIO()
    argv = ["--save-dir", save, "--batch-size", "16", "--lr", "0.01", "--run-name", "r"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    try:
        assert_every_file_whole_or_absent(__import__("pathlib").Path(save))
        whole = "yes"
    except AssertionError as error:
        whole = repr(error)
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "whole": whole}))
"""


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/tmp"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="no tmpfs in a user namespace here")
def test_a_real_small_tmpfs_at_several_sizes(tmp_path):
    sizes = ["96k", "256k", "400k"]  # a whole run takes about 500 kB
    mounts = []
    for size in sizes:
        (tmp_path / size).mkdir()
        mounts.append(f"{tmp_path / size}:{size}")
    process = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", TMPFS_RUNS, str(REPO / "tests"), *mounts],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert process.returncode == 0, process.stderr
    runs = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    assert len(runs) == len(sizes), process.stdout + process.stderr
    for size, outcome in zip(sizes, runs, strict=True):
        everything = outcome["out"] + outcome["err"]
        assert outcome["code"] == 1, (size, everything)
        assert "Traceback" not in everything and "Exception in thread" not in everything
        (line,) = " ".join(outcome["err"].split()).split("error: ")[1:]
        assert f"cannot write {tmp_path / size}/save/" in line, line
        assert "No space left on device" in line and "free there" in line
        assert ".tmp" not in line
        assert outcome["whole"] == "yes", (size, outcome["whole"])


# ---------------------------------------------------------------- kill -9 while replacing


def previous_and_attempt(save):
    """A finished tiny run in `save`; its listing, and a PreviousRun set aside by a new one."""
    from exigo.engine.run_dir import PreviousRun

    torch.manual_seed(0)
    run(tiny_config(save, epochs=1, run_name="r"), TinyNet(), *blobs_pair(), console=quiet())
    (save / "logs" / "other").mkdir()  # another TensorBoard run: never touched
    return listing(save), PreviousRun


@pytest.mark.parametrize("killed_after_moves", [0, 1, 3, 4])  # 4: run.json aside, report.html not
def test_killed_while_setting_aside_then_recovered(killed_after_moves, tmp_path, monkeypatch):
    from exigo.engine.run_dir import check_replaceable, recover_previous_run

    before, previous_run = previous_and_attempt(tmp_path)
    real, moves = os.replace, []

    def dies(source, target):
        if "/.previous-run/outputs/" in str(target):  # an output set aside
            if len(moves) == killed_after_moves:
                raise KeyboardInterrupt  # the process ends here, as with kill -9
            moves.append(source)
        return real(source, target)

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        previous_run.set_aside(tmp_path, "r")
    monkeypatch.undo()
    # the next run's early check sees an interrupted exigo run, not a stranger's folder
    check_replaceable(tmp_path)
    assert "put back" in recover_previous_run(tmp_path)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("killed_after_moves", [None, 0, 2])
def test_killed_before_the_first_commit_or_while_restoring_then_recovered(
    killed_after_moves, tmp_path, monkeypatch
):
    from exigo.engine.run_dir import recover_previous_run

    before, previous_run = previous_and_attempt(tmp_path)
    aside = previous_run.set_aside(tmp_path, "new")
    for name in ("plots/x_1.png", "run.json", "logs/new/events.out.tfevents.1", "report.html"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("the attempt's")
    if killed_after_moves is not None:
        real, moves = os.replace, []

        def dies(source, target):
            if len(moves) == killed_after_moves:
                raise KeyboardInterrupt
            moves.append(source)
            return real(source, target)

        monkeypatch.setattr(os, "replace", dies)
        with pytest.raises(KeyboardInterrupt):
            aside.restore()
        monkeypatch.undo()
    assert "put back" in recover_previous_run(tmp_path)
    assert listing(tmp_path) == before


def test_killed_after_the_first_commit_keeps_the_new_run(tmp_path):
    from exigo.engine.run_dir import recover_previous_run

    _, previous_run = previous_and_attempt(tmp_path)
    previous_run.set_aside(tmp_path, "new")
    save_checkpoint(tmp_path / "models" / "last.pt", TinyNet(), epoch=1)  # committed
    assert recover_previous_run(tmp_path) is None
    assert not (tmp_path / ".previous-run").exists()
    assert load_checkpoint(tmp_path / "models" / "last.pt")["epoch"] == 1


STUCK_IN_EPOCH_1 = """
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1].rsplit("/", 1)[0]]
import exigo.analyses, exigo.data, exigo.models
from conftest import TinyNet, make_blobs
from exigo.cli import main

class Stuck:
    def __init__(self, data):
        self.data, self.classes, self.reads = data, data.classes, 0
    def __len__(self):
        return len(self.data)
    def __getitem__(self, index):
        self.reads += 1
        if self.reads == 40:  # in epoch 1, after the trial step's batch
            print("stuck", flush=True)
            time.sleep(600)
        return self.data[index]

train, held_out = Stuck(make_blobs(96, seed=0)), make_blobs(30, seed=1)
exigo.data.load_dataset = lambda name, root, **_: (train, held_out)
exigo.models.default_model = lambda shape, classes: TinyNet(classes)
exigo.analyses.default_analyses = lambda config: []
main(["--save-dir", sys.argv[2], "--batch-size", "16", "--lr", "0.01", "--epochs", "1"])
"""


@pytest.mark.usefixtures("tiny_cli")
def test_kill_9_in_the_first_epoch_then_the_next_run_puts_the_previous_one_back(tmp_path, capsys):
    assert main(args(tmp_path, "--epochs", "1", "--run-name", "r")) == 0
    before = listing(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK_IN_EPOCH_1, str(REPO / "tests"), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "stuck"
        assert (tmp_path / ".previous-run").is_dir()
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
        process.stdout.close()
    capsys.readouterr()
    # the next run puts it back first, whatever it does next (here: an --lr that cannot work)
    assert main(args(tmp_path, "--epochs", "1", "--run-name", "r", "--lr", "1e39")) == 2
    assert "put back the outputs of the run before" in " ".join(capsys.readouterr().out.split())
    assert listing(tmp_path) == before


# ---------------------------------------------------------------- on one real MNIST run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One real run of runner.py's pipeline on the offline MNIST (1 epoch, lighter analyses)."""
    from conftest import SHARED_MNIST

    if not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"offline MNIST not found at {SHARED_MNIST}")
    save = tmp_path_factory.mktemp("real") / "save"
    options = [
        "--data-dir",
        str(SHARED_MNIST),
        "--epochs",
        "1",
        "--run-name",
        "real",
        "--projection-limit",
        "200",
        "--no-attribution-checks",
    ]
    assert main(["--save-dir", str(save), *options]) == 0
    return save, options


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (["--lr", "1e39"], "beyond the float range"),
        (["--device", "xpu"], "cannot be used here"),
        (["--resume", "--threads", "7"], "--threads 7 would change its results"),
        (["--resume"], "damaged"),
        (["--resume"], "not plain tensors (posix.system)"),
    ],
)
def test_faults_on_a_real_run_are_exit_2_and_lose_nothing(
    fault, expected, real_run, tmp_path, capsys
):
    source, options = real_run
    save = tmp_path / "save"
    shutil.copytree(source, save)
    if expected == "damaged":
        member = flip_bytes_inside(save / "models" / "last.pt", "data/0")
        expected = f"member {member}"
    elif "posix" in expected:
        if os.system.__module__ != "posix":
            pytest.skip("os.system lives in nt here")
        torch.save({"x": Malicious(tmp_path / "pwned")}, save / "models" / "last.pt")
    before = listing(save)
    capsys.readouterr()
    assert main(["--save-dir", str(save), *options, *fault]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and expected in err and "Traceback" not in err
    assert listing(save) == before
    assert not (tmp_path / "pwned").exists()
