"""The real pipeline on the real (offline) MNIST: what `python runner.py` produces."""

import json

import pytest
import torch

from exigo.cli import main
from exigo.data import load_mnist
from exigo.engine.checkpoint import load_checkpoint
from exigo.engine.training import evaluate
from exigo.models import MnistCNN


@pytest.mark.slow
def test_runner_on_real_mnist(mnist_root, tmp_path):
    save = tmp_path / "save"
    code = main(["--data-dir", str(mnist_root), "--save-dir", str(save), "--run-name", "e2e"])
    assert code == 0
    rows = json.loads((save / "metrics.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[1]["eval_accuracy"] >= 0.98
    assert (save / "run.json").exists()
    assert any((save / "logs" / "e2e").glob("events.out.tfevents.*"))

    # the best checkpoint loads safely and reproduces the accuracy it was saved with
    payload = torch.load(save / "models" / "best.pt", weights_only=True)
    model = MnistCNN()
    checkpoint = load_checkpoint(save / "models" / "best.pt", model)
    assert checkpoint["epoch"] == payload["epoch"] == 2
    _, held_out = load_mnist(mnist_root, download=False)
    assert evaluate(model, held_out).accuracy == pytest.approx(checkpoint["eval_accuracy"])
