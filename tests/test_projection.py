import io
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exigo.analyses import projection
from exigo.analyses.projection import (
    MIN_TSNE_POINTS,
    ProjectionAnalysis,
    _thumbnail_side,
    effective_perplexity,
    plot_tsne,
    projector_metadata,
    sprite_images,
    sprite_sheet,
    stratified_indices,
    tsne_layout,
)
from exigo.analysis import Analysis
from exigo.config import Config
from exigo.data import MNIST_NORMALIZATION, TensorImageDataset
from exigo.engine.training import EvalResult
from exigo.pipeline import run

from conftest import TinyNet, epoch_context, make_blobs

# ------------------------------------------------------------------ selection of the points


def test_stratified_indices_hand_computed_counts():
    # class 0: 6 points, class 1: 3, class 2: 1 (N = 10), interleaved
    targets = torch.tensor([0, 1, 0, 0, 2, 1, 0, 0, 1, 0])
    chosen = stratified_indices(targets, 5, seed=0)
    # quotas 3.0, 1.5, 0.5: floors 3, 1, 0; the one place left goes to the largest remainder,
    # a tie between classes 1 and 2 that the smaller label wins
    assert torch.bincount(targets[chosen], minlength=3).tolist() == [3, 2, 0]
    assert chosen.tolist() == sorted(set(chosen.tolist()))  # ascending, no repeats
    assert chosen.dtype == torch.long
    # no remainders: the counts are the quotas exactly
    targets = torch.tensor([0] * 4 + [1] * 4 + [2] * 2)
    chosen = stratified_indices(targets, 5, seed=3)
    assert torch.bincount(targets[chosen], minlength=3).tolist() == [2, 2, 1]


def test_stratified_indices_proportional_and_stable():
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 10, (2000,), generator=generator)
    original = targets.clone()
    chosen = stratified_indices(targets, 300, seed=7)
    assert chosen.numel() == 300
    counts = torch.bincount(targets, minlength=10)
    got = torch.bincount(targets[chosen], minlength=10)
    quotas = counts * 300 / 2000
    assert torch.all(got >= quotas.floor()) and torch.all(got <= quotas.ceil())
    assert torch.equal(stratified_indices(targets, 300, seed=7), chosen)  # same seed, same
    assert not torch.equal(stratified_indices(targets, 300, seed=8), chosen)
    assert torch.equal(targets, original)


def test_stratified_indices_limits():
    targets = torch.tensor([1, 0, 1, 2])
    assert stratified_indices(targets, 4, seed=0).tolist() == [0, 1, 2, 3]
    assert stratified_indices(targets, 99, seed=0).tolist() == [0, 1, 2, 3]
    assert stratified_indices(targets, 0, seed=0).numel() == 0
    with pytest.raises(ValueError):
        stratified_indices(targets, -1, seed=0)


# ------------------------------------------------------------------ t-SNE


def test_effective_perplexity():
    assert effective_perplexity(2000, 30) == 30
    assert effective_perplexity(91, 30) == 30  # 3 * 30 neighbours exist
    assert effective_perplexity(10, 30) == 3.0
    assert effective_perplexity(MIN_TSNE_POINTS, 30) == 1.0
    for too_few in (1, 2, 3):
        with pytest.raises(ValueError, match="at least 4 points"):
            effective_perplexity(too_few, 30)
    with pytest.raises(ValueError, match="positive"):
        effective_perplexity(100, 0)


def clusters(per_class: int = 20, classes: int = 3, dims: int = 8, seed: int = 0):
    """Well-separated Gaussian clusters: embeddings [K, dims] and labels [K]."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = 10 * torch.eye(classes, dims)
    embeddings = centres[labels] + torch.randn(labels.numel(), dims, generator=generator)
    return embeddings, labels


def knn_label_accuracy(layout: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    distances = torch.cdist(layout, layout)
    distances.fill_diagonal_(float("inf"))
    neighbours = distances.topk(k, largest=False).indices
    votes = torch.mode(labels[neighbours], dim=1).values
    return (votes == labels).float().mean().item()


def test_tsne_layout_separates_clusters_and_is_deterministic():
    embeddings, labels = clusters()
    original = embeddings.clone()
    layout = tsne_layout(embeddings, seed=0)
    assert layout.shape == (60, 2) and layout.dtype == torch.float32
    assert torch.isfinite(layout).all()
    assert torch.equal(embeddings, original)
    assert knn_label_accuracy(layout, labels) == 1.0
    assert torch.equal(tsne_layout(embeddings, seed=0), layout)
    # Barnes-Hut gradients are computed point by point: the thread count changes nothing
    short = {"early_exaggeration_iter": 20, "n_iter": 20}
    assert torch.equal(
        tsne_layout(embeddings, seed=0, n_jobs=1, **short),
        tsne_layout(embeddings, seed=0, n_jobs=2, **short),
    )


def test_tsne_layout_passes_the_barnes_hut_angle_to_opentsne():
    import openTSNE

    embeddings, labels = clusters()
    seen = []
    real = openTSNE.TSNEEmbedding

    def spy(*args, **kwargs):
        seen.append(kwargs.get("theta"))
        return real(*args, **kwargs)

    short = {"early_exaggeration_iter": 20, "n_iter": 20}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openTSNE, "TSNEEmbedding", spy)
        default = tsne_layout(embeddings, seed=0, **short)
        exact = tsne_layout(embeddings, seed=0, theta=0.0, **short)
    assert seen == [0.65, 0.0]  # the default, then exact repulsion
    assert not torch.equal(default, exact)
    assert knn_label_accuracy(exact, labels) == knn_label_accuracy(default, labels) == 1.0


def test_tsne_layout_schedules(monkeypatch):
    """A fresh layout: 100 exaggerated + 150 plain iterations at openTSNE's rate K; a
    continued one: 100 plain iterations at 2 K (a third less CPU than 150 at K, the same KL
    divergence on MNIST, `bench/tsne.py --only warm`)."""
    import openTSNE

    embeddings, _ = clusters()
    calls = []
    real = openTSNE.TSNEEmbedding.optimize

    def spy(self, n_iter, *args, **kwargs):
        calls.append((n_iter, kwargs.get("exaggeration"), kwargs.get("learning_rate")))
        return real(self, n_iter, *args, **kwargs)

    monkeypatch.setattr(openTSNE.TSNEEmbedding, "optimize", spy)
    start = tsne_layout(embeddings, seed=0)
    assert calls == [(100, 12, None), (150, None, 60.0)]  # None: openTSNE's K / 12
    calls.clear()
    tsne_layout(embeddings, start, seed=0)
    assert calls == [(100, None, 120.0)]
    calls.clear()
    tsne_layout(embeddings, start, seed=0, n_iter=7, learning_rate=5.0)
    assert calls == [(7, None, 5.0)]


def test_tsne_layout_small_inputs():
    generator = torch.Generator().manual_seed(0)
    for count in (4, 5, 9):  # perplexity 30 lowered to (count - 1) / 3
        layout = tsne_layout(torch.randn(count, 6, generator=generator), perplexity=30)
        assert layout.shape == (count, 2) and torch.isfinite(layout).all()
    with pytest.raises(ValueError, match="at least 4 points"):
        tsne_layout(torch.randn(3, 6, generator=generator))
    # identical embeddings (a collapsed layer) have no principal direction: no NaN
    assert torch.isfinite(tsne_layout(torch.zeros(20, 6))).all()


def test_tsne_layout_starts_from_the_initialization():
    embeddings, _ = clusters()
    start = tsne_layout(embeddings, seed=0)
    # no iterations: the layout is the initialization itself
    same = tsne_layout(embeddings, start, n_iter=0)
    assert torch.equal(same, start)
    # the default continuation stays close to its start; a fresh PCA start does not
    noisy = embeddings + 0.05 * torch.randn(embeddings.shape, generator=torch.Generator())
    continued = tsne_layout(noisy, start, seed=0)
    radius = start.norm(dim=1).mean()
    assert (continued - start).norm(dim=1).median() < 0.3 * radius
    with pytest.raises(ValueError, match="initialization must be"):
        tsne_layout(embeddings, start[:10])


# ------------------------------------------------------------------ projector data


def test_projector_metadata_and_sprites(monkeypatch):
    rows = projector_metadata(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]), ["a", "b", "c"])
    assert rows == [["a", "a", "yes"], ["c", "b", "no"], ["b", "b", "yes"]]
    pixels = torch.rand(5, 2, 6, 4)  # 2 channels, not square
    sprites = sprite_images(pixels)
    assert sprites.shape == (5, 1, 6, 6)
    assert torch.allclose(sprites[:, :, :, :4], pixels.mean(1, keepdim=True))
    assert torch.all(sprites[:, :, :, 4:] == 0)
    # 400 thumbnails of 500 px would make a 10,000 px sprite: shrunk to 8192 // 20 = 409 px
    assert _thumbnail_side(400, 500) == 409
    assert _thumbnail_side(2000, 28) == 28  # MNIST: 45 x 28 = 1,260 px

    monkeypatch.setattr(projection, "_MAX_SPRITE_SIDE", 20)  # 5 thumbnails: 3 per row
    shrunk = sprite_images(torch.ones(5, 3, 16, 16))
    assert shrunk.shape == (5, 3, 6, 6) and torch.all(shrunk == 1)


def test_sprite_sheet_tiles_row_major_in_a_square():
    thumbnails = torch.stack([torch.full((1, 2, 2), value) for value in (0.2, 0.6, 1.0)])
    sheet = sprite_sheet(thumbnails)  # 3 thumbnails: 2 a side, the last place black
    assert sheet.shape == (4, 4, 3) and sheet.dtype == np.uint8
    assert sheet[:, :, 0].tolist() == [[51, 51, 153, 153]] * 2 + [[255, 255, 0, 0]] * 2
    assert np.array_equal(sheet[..., 0], sheet[..., 2])  # grey thumbnails: equal channels


def hand_tiled_sprite_sheet(thumbnails: torch.Tensor) -> np.ndarray:
    """exigo's own tiling before torchvision's make_grid (commit 191dc7d): the reference."""
    count, side = thumbnails.shape[0], thumbnails.shape[-1]
    per_row = math.ceil(math.sqrt(max(count, 1)))
    padded = torch.zeros(per_row * per_row, 3, side, side)
    padded[:count] = thumbnails.detach().float().cpu().expand(-1, 3, -1, -1)
    grid = padded.view(per_row, per_row, 3, side, side).permute(0, 3, 1, 4, 2)
    return (grid.reshape(per_row * side, per_row * side, 3) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("channels", [1, 3])
def test_sprite_sheet_is_byte_identical_to_the_hand_tiling(channels):
    generator = torch.Generator().manual_seed(channels)
    for count in (0, 1, 2, 3, 5, 16, 17, 50):
        thumbnails = torch.rand(count, channels, 7, 7, generator=generator)
        sheet = sprite_sheet(thumbnails)
        expected = hand_tiled_sprite_sheet(thumbnails)
        assert sheet.dtype == expected.dtype and sheet.shape == expected.shape, count
        assert sheet.tobytes() == expected.tobytes(), count


def test_sprite_written_once_tensors_exact(tmp_path, monkeypatch):
    embeddings, labels = clusters()
    written = []
    monkeypatch.setattr(
        projection, "write_sprite", lambda *args: written.append(args) or "validation_sprite.png"
    )
    analysis = ProjectionAnalysis(limit=30)
    writer = tmp_path / "logs"
    for epoch in (1, 2):
        analysis(make_context(tmp_path, writer, epoch, embeddings, labels, labels, print))
    assert len(written) == 1
    saved = np.loadtxt(tmp_path / "logs" / "00002" / "validation" / "tensors.tsv", dtype=np.float32)
    assert np.array_equal(saved, embeddings[analysis.indices].numpy())  # %.9g: float32 exact
    config = (tmp_path / "logs" / "projector_config.pbtxt").read_text()
    assert config.count('image_path: "validation_sprite.png"') == 2


# ------------------------------------------------------------------ the analysis


def make_context(tmp_path, log_dir, epoch, embeddings, labels, predictions, log):
    images = torch.randn(labels.numel(), 1, 4, 4, generator=torch.Generator().manual_seed(0))
    val_data = TensorImageDataset(images, labels, [f"c{i}" for i in range(3)])
    evaluation = EvalResult(
        loss=0.1,
        accuracy=(predictions == labels).float().mean().item(),
        predictions=predictions,
        targets=labels,
        probabilities=torch.full((labels.numel(), 3), 1 / 3),
        embeddings=embeddings,
        seconds=0.0,
    )
    plots = tmp_path / "plots"
    plots.mkdir(exist_ok=True)
    return epoch_context(
        tmp_path,
        ProjectionAnalysis,
        epoch=epoch,
        model=TinyNet(),
        eval=evaluation,
        class_names=[f"c{i}" for i in range(3)],
        val_data=val_data,
        log_dir=log_dir,
        plots_dir=plots,
        log=log,
    )


def test_analysis_writes_figures_keeps_points_and_carries_the_layout(tmp_path):
    embeddings, labels = clusters()
    predictions = labels.clone()
    predictions[[0, 25]] = 2
    second_embeddings = embeddings + 0.3 * torch.randn(60, 8, generator=torch.Generator())
    lines = []
    analysis = ProjectionAnalysis(limit=45)
    writer = tmp_path / "logs"
    for epoch, values in ((1, embeddings), (2, second_embeddings)):
        ctx = make_context(tmp_path, writer, epoch, values, labels, predictions, lines.append)
        analysis(ctx)
        if epoch == 1:
            after_first = analysis.state_dict()
    assert torch.bincount(labels[analysis.indices]).tolist() == [15, 15, 15]
    assert torch.equal(after_first["indices"], analysis.indices)  # the same points each epoch
    assert lines == [
        "projection: t-SNE perplexity lowered from 30 to 14.7, the most 45 points allow "
        "((points - 1) / 3)"
    ]  # once, not every epoch
    sizes = []
    for epoch in (1, 2):
        with Image.open(tmp_path / "plots" / f"tsne_{epoch}.png") as png:
            sizes.append(png.size)
    assert sizes[0] == sizes[1]  # same size every epoch: frames of the report's GIF
    # about 9 x 7.25 inches at 100 dpi; the tight box moves a pixel between matplotlib versions
    assert abs(sizes[0][0] - 902) <= 3 and abs(sizes[0][1] - 726) <= 3, sizes

    # resuming from the state after epoch 1 gives epoch 2's layout exactly
    resumed = ProjectionAnalysis(limit=45)
    resumed.load_state_dict(after_first)
    writer = tmp_path / "logs-resumed"
    resumed(make_context(tmp_path, writer, 2, second_embeddings, labels, predictions, print))
    assert torch.equal(resumed.layout, analysis.layout)
    # ... and starting afresh does not: the layout was carried, not recomputed
    fresh = ProjectionAnalysis(limit=45)
    writer = tmp_path / "logs-fresh"
    fresh(make_context(tmp_path, writer, 2, second_embeddings, labels, predictions, print))
    assert torch.equal(fresh.indices, analysis.indices)
    assert not torch.allclose(fresh.layout, analysis.layout, atol=1e-3)


def test_analysis_small_inputs_say_so_once_and_never_crash(tmp_path):
    embeddings, labels = clusters(per_class=4)  # 12 points
    lines = []
    analysis = ProjectionAnalysis(limit=10)
    writer = tmp_path / "logs"
    for epoch in (1, 2):
        analysis(make_context(tmp_path, writer, epoch, embeddings, labels, labels, lines.append))
    assert len(lines) == 1 and "perplexity lowered from 30 to 3" in lines[0]
    assert (tmp_path / "plots" / "tsne_2.png").exists()

    lines.clear()
    analysis = ProjectionAnalysis(limit=3)
    writer = tmp_path / "logs-three"
    for epoch in (1, 2):
        analysis(make_context(tmp_path, writer, epoch, embeddings, labels, labels, lines.append))
    assert len(lines) == 1 and "t-SNE skipped, 3 point(s)" in lines[0]
    assert analysis.layout is None
    assert (tmp_path / "logs-three" / "00002" / "validation" / "tensors.tsv").exists()


def test_analysis_off_when_limit_is_zero(tmp_path):
    embeddings, labels = clusters()
    analysis = ProjectionAnalysis(limit=0)
    writer = tmp_path / "logs"
    analysis(make_context(tmp_path, writer, 1, embeddings, labels, labels, print))
    assert analysis.indices is None
    assert not (tmp_path / "plots" / "tsne_1.png").exists()
    assert not (tmp_path / "logs" / "projector_config.pbtxt").exists()


def test_a_new_writer_keeps_the_earlier_epochs_in_the_projector(tmp_path):
    embeddings, labels = clusters()
    analysis = ProjectionAnalysis(limit=30)
    for epoch in (1, 2, 2):  # a new writer per epoch, as after --resume; epoch 2 run twice
        writer = tmp_path / "logs"
        analysis(make_context(tmp_path, writer, epoch, embeddings, labels, labels, print))
    config = (tmp_path / "logs" / "projector_config.pbtxt").read_text()
    assert config.count('tensor_name: "validation:00001"') == 1
    assert config.count('tensor_name: "validation:00002"') == 1


def test_plot_tsne_draws_every_class_and_the_errors():
    layout = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    figure = plot_tsne(
        layout,
        torch.tensor([0, 0, 1, 2]),
        torch.tensor([0, 1, 1, 2]),
        ["zero", "one", "two"],
        epoch=3,
        perplexity=1.0,
    )
    axes = figure.axes[0]
    assert "epoch 3" in axes.get_title() and "1 misclassified" in axes.get_title()
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend[:3] == ["zero", "one", "two"] and legend[3].startswith("misclassified")
    assert axes.get_xticks().size == 0 and axes.get_yticks().size == 0


# ------------------------------------------------------------------ TensorBoard, for real


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(base: str, route: str, **query: str) -> bytes:
    url = f"{base}/data/plugin/projector/{route}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


class Keep(Analysis):
    name = "keep"

    def __init__(self):
        self.epochs = {}

    def __call__(self, ctx):
        self.epochs[ctx.epoch] = ctx.eval


@pytest.mark.slow
def test_tensorboard_serves_the_projector(tmp_path):
    train, held_out = make_blobs(96, seed=0), make_blobs(30, seed=1)  # 10 per class
    keep, projection = Keep(), ProjectionAnalysis(limit=24)
    config = Config(
        epochs=2,
        batch_size=16,
        lr=1e-2,
        save_dir=tmp_path / "save",
        run_name="tiny",
        projection_limit=24,
    )
    torch.manual_seed(0)
    result = run(config, TinyNet(), train, held_out, [keep, projection])
    assert not result.failed_analyses
    chosen = projection.indices
    assert torch.bincount(held_out.targets[chosen]).tolist() == [8, 8, 8]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = (tmp_path / "tensorboard.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path / "save" / "logs"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        runs, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            try:
                runs = json.loads(fetch(base, "runs"))
                if runs:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert runs == ["tiny"], (tmp_path / "tensorboard.log").read_text()

        info = json.loads(fetch(base, "info", run="tiny"))
        names = [entry["tensorName"] for entry in info["embeddings"]]
        assert names == ["validation:00001", "validation:00002"]
        for entry, epoch in zip(info["embeddings"], (1, 2), strict=True):
            assert entry["tensorShape"] == ["24", "8"] or entry["tensorShape"] == [24, 8]
            assert [int(side) for side in entry["sprite"]["singleImageDim"]] == [8, 8]
            name = entry["tensorName"]
            evaluation = keep.epochs[epoch]

            tensor = np.frombuffer(fetch(base, "tensor", run="tiny", name=name), np.float32)
            expected = evaluation.embeddings[chosen].numpy()
            assert np.array_equal(tensor.reshape(24, 8), expected)

            table = fetch(base, "metadata", run="tiny", name=name).decode().splitlines()
            assert table[0] == "label\tpredicted\tcorrect"
            rows = [line.split("\t") for line in table[1:]]
            names_of = held_out.classes
            assert [row[0] for row in rows] == [names_of[t] for t in evaluation.targets[chosen]]
            assert [row[1] for row in rows] == [names_of[p] for p in evaluation.predictions[chosen]]
            assert all(row[2] == ("yes" if row[0] == row[1] else "no") for row in rows)

            png = fetch(base, "sprite_image", run="tiny", name=name)
            with Image.open(io.BytesIO(png)) as sprite:
                side = math.ceil(math.sqrt(24)) * 8
                assert sprite.size == (side, side)
                first = np.asarray(sprite.convert("L"))[:8, :8].astype(float) / 255
            image = held_out.images[chosen[0], 0]  # no normalisation known: stretched to [0, 1]
            stretched = (image - image.min()) / (image.max() - image.min())
            assert np.abs(first - stretched.numpy()).max() <= 1 / 255 + 1e-6
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log_file.close()


@pytest.mark.slow
def test_mnist_layout_separates_the_digits(mnist_root, tmp_path):
    from exigo.data import load_mnist
    from exigo.models import MnistCNN

    train, held_out = load_mnist(mnist_root, download=False)
    assert held_out.normalization == MNIST_NORMALIZATION
    keep, projection = Keep(), ProjectionAnalysis(limit=500)
    config = Config(epochs=1, save_dir=tmp_path / "save", run_name="m", projection_limit=500)
    torch.manual_seed(0)
    run(config, MnistCNN(), train, held_out, [keep, projection])
    targets = held_out.targets[projection.indices]
    assert torch.bincount(targets).min() >= 40  # every digit present, ~50 each
    assert keep.epochs[1].accuracy > 0.95
    # a trained embedding separates the digits, and the 2-D layout keeps that
    assert knn_label_accuracy(projection.layout, targets) > 0.9
    assert Path(tmp_path / "save" / "plots" / "tsne_1.png").exists()


def test_the_layout_computed_in_the_helper_reaches_last_pt(tmp_path, monkeypatch):
    from exigo import _system
    from exigo.engine.checkpoint import load_checkpoint

    monkeypatch.setattr(_system, "available_cpus", lambda: 2)  # a figure worker, always
    train, held_out = make_blobs(96, seed=0), make_blobs(30, seed=1)
    projection = ProjectionAnalysis()
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save")
    torch.manual_seed(0)
    result = run(config, TinyNet(), train, held_out, [projection])
    assert not result.failed_analyses and projection.layout is not None
    saved = load_checkpoint(tmp_path / "save" / "models" / "last.pt")["analyses"]["projection"]
    assert torch.equal(saved["layout"], projection.layout)  # epoch 2's, not epoch 1's
