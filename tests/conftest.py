"""Shared fixtures: tiny seeded data, and the offline MNIST root beside the checkout."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from exigo.analysis import Analysis, EpochContext, FigureInfo
from exigo.data import TensorImageDataset
from exigo.figures.pool import FigurePool

from browser import browser, chromium  # noqa: F401  (fixtures for the page tests)

REPO = Path(__file__).resolve().parents[1]

# A job started in the background of a non-interactive shell (a CI runner may start the tests
# so) inherits SIGINT ignored, and exigo leaves an ignored signal ignored: the tests that stop a
# run with Ctrl-C's signal need its usual handler, here and in the processes they start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
SHARED_MNIST = REPO.parent / "shared" / "mnist"


@pytest.fixture
def mnist_root() -> Path:
    """The real MNIST root (8,000 / 2,000 images); skip when it is not beside the checkout."""
    if not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"offline MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture
def mnist_copy(mnist_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the MNIST root, for tests that damage or remove files."""
    target = tmp_path / "mnist"
    shutil.copytree(mnist_root / "MNIST", target / "MNIST")
    return target


def make_blobs(n: int = 64, classes: int = 3, size: int = 8, seed: int = 0) -> TensorImageDataset:
    """Separable toy images: class c lights up a band of rows, plus noise. [n, 1, size, size]."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % classes
    images = 0.3 * torch.randn(n, 1, size, size, generator=generator)
    band = size // classes
    for c in range(classes):
        images[targets == c, :, c * band : (c + 1) * band, :] += 2.0
    return TensorImageDataset(images, targets, [f"class {c}" for c in range(classes)])


def batch_norm_net(classes: int = 3) -> torch.nn.Sequential:
    """Conv, BatchNorm, linear for [N, 1, 4, 4] images: mode and running statistics to keep."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1),
        torch.nn.BatchNorm2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, classes),
    )


def snapshot(model: torch.nn.Module) -> dict:
    """What an analysis must leave as it found it: state, each module's mode, flags, `.grad`."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    for old, new in zip(before["grad"], after["grad"], strict=True):
        assert (old is None and new is None) or torch.equal(old, new)


class TinyNet(torch.nn.Module):
    """A conv layer, an 8-unit embedding and a classifier: small enough for milliseconds."""

    def __init__(self, classes: int = 3, size: int = 8, channels: int = 1) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * size * size, 8),
            torch.nn.ReLU(),
        )
        self.classifier = torch.nn.Linear(8, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


@pytest.fixture
def blobs() -> tuple[TensorImageDataset, TensorImageDataset]:
    return make_blobs(96, seed=0), make_blobs(30, seed=1)


def epoch_context(tmp_path: Path, analysis: object, **fields: object) -> EpochContext:
    """An `EpochContext` for calling `analysis` by hand, its figures drawn at once, in process.

    `fields` override the defaults (epoch 1, an identity model, no evaluation, no probe, three
    classes, CPU); `ctx.figures.collect()` lists what the analysis drew.
    """
    plots = Path(fields.pop("plots_dir", tmp_path / "plots"))
    plots.mkdir(parents=True, exist_ok=True)
    values = {
        "epoch": 1,
        "model": torch.nn.Identity(),
        "eval": None,
        "probe": None,
        "class_names": ["a", "b", "c"],
        "normalization": None,
        "val_data": None,
        "device": torch.device("cpu"),
        "log_dir": tmp_path / "logs",
        "plots_dir": plots,
        "save_dir": tmp_path,
        "figures": FigurePool(workers=0),
        "declared": frozenset(info.name for info in analysis.figures),
        **fields,
    }
    return EpochContext(**values)


def draw_card(text: str):
    """A figure that shows `text` in large letters (module level: the figure worker imports it)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2))
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=20)
    return figure


class EpochCard(Analysis):
    """Draws a card saying which epoch it is: each epoch's figure looks different."""

    before_training = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.figures = (FigureInfo(name, name.capitalize(), f"A card for {name}."),)

    def __call__(self, ctx: EpochContext) -> None:
        ctx.draw_figure(self.name, draw_card, f"{self.name}\n{ctx.tag}", dpi=50)
