import json

import torch

from exigo.checkpoint import load_checkpoint
from exigo.config import Config
from exigo.pipeline import EpochContext, run, select_probe

from conftest import TinyNet


class Recorder:
    name = "recorder"
    before_training = True

    def __init__(self):
        self.epochs = []

    def __call__(self, ctx: EpochContext) -> None:
        self.epochs.append(ctx.epoch)
        assert ctx.probe.images.shape[0] == min(ctx.config.probe_size, 30)
        if ctx.eval is not None:
            ctx.metrics["recorder/accuracy_again"] = ctx.eval.accuracy


class Broken:
    name = "broken"

    def __call__(self, ctx):
        raise RuntimeError("plotting backend exploded")


def test_select_probe_one_per_class_first_occurrence():
    targets = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    assert select_probe(targets, 3, 3).tolist() == [1, 3, 0]
    assert select_probe(targets, 5, 3).tolist() == [1, 3, 0, 2, 5]
    assert select_probe(targets, 50, 4).tolist() == [1, 3, 0, 2, 5, 4, 6]


def test_run_writes_outputs_and_isolates_failing_analyses(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    recorder = Recorder()
    config = Config(epochs=3, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=4)
    result = run(config, TinyNet(), train, held_out, [recorder, Broken()])
    assert recorder.epochs == [0, 1, 2, 3]
    assert [(e, n) for e, n, _ in result.failed_analyses] == [
        (1, "broken"),
        (2, "broken"),
        (3, "broken"),
    ]
    rows = json.loads((tmp_path / "save" / "metrics.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[-1]["recorder/accuracy_again"] == rows[-1]["eval_accuracy"]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    run_info = json.loads((tmp_path / "save" / "run.json").read_text())
    assert run_info["config"]["epochs"] == 3 and run_info["seed"] == 0
    checkpoint = load_checkpoint(tmp_path / "save" / "models" / "best.pt", TinyNet())
    assert checkpoint["epoch"] == result.best_epoch
    assert any(result.log_dir.glob("events.out.tfevents.*"))


def test_same_seed_same_metrics_and_new_run_replaces_old(blobs, tmp_path):
    train, held_out = blobs
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", run_name="a")
    torch.manual_seed(0)
    first = run(config, TinyNet(), train, held_out).history
    stale = tmp_path / "save" / "plots" / "stale_9.png"
    stale.write_bytes(b"old")
    torch.manual_seed(0)
    second = run(config, TinyNet(), train, held_out).history
    keys = ["train_loss", "eval_loss", "eval_accuracy"]
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    assert not stale.exists()


def test_cpu_models_train_in_channels_last_with_the_same_function(tmp_path):
    from exigo.pipeline import _placed

    torch.manual_seed(0)
    model = TinyNet(channels=3)  # with 1 input channel both formats have the same strides
    images = torch.randn(4, 3, 8, 8)
    before = model(images)
    placed = _placed(model, torch.device("cpu"))
    conv = placed.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.allclose(placed(images), before, atol=1e-6)
    torch.save(placed.state_dict(), tmp_path / "weights.pt")  # loads into a plain model
    plain = TinyNet(channels=3)
    plain.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert plain.features[0].weight.is_contiguous()
    assert torch.allclose(plain(images), before, atol=1e-6)
