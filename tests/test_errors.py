import pytest
import torch
from PIL import Image
from torch import nn

from exigo.analyses.errors import ErrorAnalysis, error_saliency, frequent_confusions, plot_errors
from exigo.analysis import EpochContext, Probe
from exigo.data import TensorImageDataset
from exigo.engine.training import EvalResult

from conftest import TinyNet, assert_unchanged, epoch_context, snapshot


def linear_model(classes: int = 3, size: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, classes))


# 12 images: pairs (true, predicted) (0, 1) x3, (2, 1) x3, (1, 0) x2, (2, 0) x1, rest right
TARGETS = torch.tensor([0, 0, 2, 0, 2, 1, 2, 1, 2, 0, 1, 2])
PREDICTIONS = torch.tensor([1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 2])


def test_pairs_by_count_ties_by_class_then_images_in_order():
    confusions = frequent_confusions(TARGETS, PREDICTIONS, pairs=3, per_pair=2)
    assert [(c.true, c.predicted, c.count) for c in confusions] == [(0, 1, 3), (2, 1, 3), (1, 0, 2)]
    assert [c.indices.tolist() for c in confusions] == [[0, 1], [2, 4], [5, 7]]


def test_images_ordered_by_confidence_in_the_wrong_class():
    probabilities = torch.full((12, 3), 1 / 3)
    probabilities[[0, 1, 3], 1] = torch.tensor([0.4, 0.9, 0.6])
    confusions = frequent_confusions(TARGETS, PREDICTIONS, probabilities, pairs=1, per_pair=5)
    assert len(confusions) == 1
    assert confusions[0].indices.tolist() == [1, 3, 0]


def test_no_errors_no_pairs():
    assert frequent_confusions(TARGETS, TARGETS.clone()) == []
    everything = frequent_confusions(TARGETS, PREDICTIONS, pairs=10)
    assert [(c.true, c.predicted) for c in everything] == [(0, 1), (2, 1), (1, 0), (2, 0)]


def test_error_saliency_of_a_linear_model_is_both_weight_rows():
    model = linear_model()
    images = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    before = images.clone()
    true, predicted = torch.tensor([0, 2, 1, 0]), torch.tensor([1, 0, 2, 2])
    model.train()
    untouched = snapshot(model)
    saliency = error_saliency(model, images, true, predicted)
    weight = model[1].weight.detach().view(3, 4, 4)
    torch.testing.assert_close(saliency.towards_true, weight[true])
    torch.testing.assert_close(saliency.towards_predicted, weight[predicted])
    assert_unchanged(model, untouched)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.equal(images, before)


def test_plot_has_three_rows_per_pair_and_one_shared_scale():
    confusions = frequent_confusions(TARGETS, PREDICTIONS, pairs=2, per_pair=2)
    model = linear_model()
    images = torch.rand(4, 1, 4, 4)
    true = torch.tensor([0, 0, 2, 2])
    predicted = torch.tensor([1, 1, 1, 1])
    saliency = error_saliency(model, images, true, predicted)
    figure = plot_errors(
        confusions, images, saliency, torch.rand(4), torch.rand(4), ["zero", "one", "two"]
    )
    texts = [text.get_text() for text in figure.texts]
    assert len(figure.axes) == 2  # one picture per confusion
    assert "true zero predicted as one: 3 images, 2 shown" in texts
    assert "true two predicted as one: 3 images, 2 shown" in texts
    assert texts.count("image") == 2
    assert (
        "saliency\ntowards two\n(true)" in texts and "saliency\ntowards one\n(predicted)" in texts
    )
    tops = {t for t in texts if t.startswith("\u2265 ")}
    bottoms = {t for t in texts if t.startswith("\u2264 ")}
    assert len(tops) == 1 and bottoms == {"\u2264 \u2212" + tops.pop()[2:]}  # one symmetric scale
    with pytest.raises(ValueError, match="at least one confusion"):
        plot_errors([], images, saliency, torch.rand(4), torch.rand(4), ["zero", "one", "two"])


def make_context(tmp_path, predictions: torch.Tensor, logged: list[str]) -> EpochContext:
    torch.manual_seed(0)
    images = torch.randn(12, 1, 8, 8)
    data = TensorImageDataset(images, TARGETS, ["a", "b", "c"])
    probabilities = torch.nn.functional.one_hot(predictions, 3).float() * 0.7 + 0.1
    evaluation = EvalResult(
        loss=1.0,
        accuracy=float((predictions == TARGETS).float().mean()),
        predictions=predictions,
        targets=TARGETS,
        probabilities=probabilities,
        embeddings=torch.zeros(12, 8),
        seconds=0.0,
    )
    probe = Probe(images[:3], TARGETS[:3], images[:3], torch.arange(3))
    plots = tmp_path / "plots"
    plots.mkdir(exist_ok=True)
    return epoch_context(
        tmp_path,
        ErrorAnalysis,
        model=TinyNet(),
        eval=evaluation,
        probe=probe,
        class_names=data.classes,
        val_data=data,
        plots_dir=plots,
        log=logged.append,
    )


def test_analysis_writes_the_figure(tmp_path):
    logged: list[str] = []
    ctx = make_context(tmp_path, PREDICTIONS, logged)
    ErrorAnalysis()(ctx)
    with Image.open(tmp_path / "plots" / "errors_1.png") as png:
        assert png.size[0] > 300 and png.size[1] > 300
    assert logged == []


def test_analysis_without_errors_writes_nothing_and_says_so_once(tmp_path):
    logged: list[str] = []
    ctx = make_context(tmp_path, TARGETS.clone(), logged)
    ErrorAnalysis()(ctx)
    assert not list((tmp_path / "plots").iterdir())
    assert len(logged) == 1 and "every held-out image is classified correctly" in logged[0]
