"""Checkpoints: atomic, loadable only as plain data, clear about what is wrong with a file."""

import ast
import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from exigo.config import Config
from exigo.engine.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from exigo.pipeline import run

from conftest import REPO, TinyNet, make_blobs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=save)
    console = Console(file=io.StringIO())
    run(config, TinyNet(), make_blobs(96), make_blobs(30, seed=1), console=console)
    return save


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_checkpoints_load_with_weights_only(run_dir, name):
    payload = torch.load(run_dir / "models" / name, weights_only=True)
    assert payload["format"] == "exigo-checkpoint" and payload["epoch"] == 2
    if name == "last.pt":  # AdamW, OneCycleLR and RNG states survive the safe loader
        assert payload["optimizer"]["state"] and payload["scheduler"]["total_steps"] == 12
        assert payload["rng"]["torch"].dtype == torch.uint8
        assert len(payload["history"]) == 2 and payload["run_name"]


def test_wrong_architecture_names_the_file(run_dir):
    path = run_dir / "models" / "best.pt"
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, TinyNet(classes=5))
    assert str(path) in str(raised.value) and "TinyNet" in str(raised.value)


class Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_torch(path: Path, value) -> None:
    torch.save(value, path)


@pytest.mark.parametrize(
    "content",
    [
        "text",
        "random bytes",
        "empty",
        "truncated",
        "plain dict",
        "tensor",
        "raw pickle",
        "code",
        "folder",
    ],
)
def test_non_checkpoints_name_the_file_and_run_no_code(content, run_dir, tmp_path):
    path = tmp_path / "model.pt"
    marker = tmp_path / "code-ran"
    if content == "text":
        path.write_text("just some notes\n")
    elif content == "random bytes":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "truncated":
        whole = (run_dir / "models" / "best.pt").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif content == "plain dict":
        write_torch(path, {"model": TinyNet().state_dict()})
    elif content == "tensor":
        write_torch(path, torch.zeros(3))
    elif content == "raw pickle":
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    elif content == "code":  # a real checkpoint with a trap inside
        write_torch(path, {"format": "exigo-checkpoint", "model": {}, "x": Payload(marker)})
    else:
        path.mkdir()
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, TinyNet())
    assert str(path) in str(raised.value)
    assert not marker.exists()
    if content == "code":
        assert "not plain tensors" in str(raised.value)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "best.pt"
    model = TinyNet()
    save_checkpoint(path, model, epoch=1)
    before = path.read_bytes()
    with pytest.raises(Exception, match=r"pickle|lambda|Can.t"):
        save_checkpoint(path, model, epoch=2, unpicklable=lambda: None)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_rng_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(4)
    state = capture_rng(generator)
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    first = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(), random.random())
    restore_rng(torch.load(path, weights_only=True), generator)
    again = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_every_torch_load_in_exigo_is_weights_only():
    offenders = []
    for path in sorted((REPO / "exigo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
