"""Fault drill (issue 20): each fault a careful user can meet, run for real, and what it leaves.

The promise under test, from the README: bad input gets a clear message and loses nothing,
exit 2 and one sentence; a run that fails before its first epoch is committed leaves the
previous run as it was; a full disk is one message naming the file and the free space.
Most faults run `exigo.cli.main` in-process on tiny blobs (`tiny_cli` from test_fail_fast);
the real-MNIST ones share one real run.
"""

import os
import zipfile

import pytest
import torch
from test_fail_fast import code_of
from test_reliability import make_blobs_pair as blobs_pair
from test_reliability import quiet, tiny_config

from exigo.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from exigo.pipeline import run

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
