import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from exigo.analyses import default_analyses
from exigo.analyses.attributions import (
    AttributionAnalysis,
    AttributionSettings,
    attribution_maps,
    default_methods,
    grad_cam,
    input_x_gradient,
    integrated_gradients,
    last_conv_layer,
    occlusion,
    saliency,
    settled_after,
    smoothgrad,
)
from exigo.analysis import Probe
from exigo.config import Config
from exigo.data import Normalization
from exigo.models import MnistCNN
from exigo.pipeline import run

from conftest import TinyNet, assert_unchanged, epoch_context, snapshot

NORMALIZATION = Normalization(mean=(0.5,), std=(0.25,))


def linear_model(classes: int = 3, size: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, classes)).eval()


def weight_rows(model: nn.Module, targets: torch.Tensor, size: int = 6) -> torch.Tensor:
    return model[1].weight.detach()[targets].view(-1, 1, size, size)


@pytest.fixture
def linear_case():
    model = linear_model()
    images = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 1])
    baseline = torch.full((1, 1, 6, 6), -2.0)
    return model, images, targets, baseline


def test_gradient_methods_match_the_closed_forms_of_a_linear_model(linear_case):
    model, images, targets, baseline = linear_case
    w = weight_rows(model, targets)  # the input gradient of a linear model is its weight row
    assert torch.allclose(saliency(model, images, targets), w.abs())
    assert torch.allclose(input_x_gradient(model, images, targets), images * w)
    assert torch.allclose(
        integrated_gradients(model, images, targets, baseline=baseline, steps=4),
        (images - baseline) * w,
        atol=1e-5,
    )
    assert torch.allclose(
        smoothgrad(model, images, targets, samples=3), w.abs(), atol=1e-6
    )  # the gradient does not depend on the noise
    # a 1-pixel occluder measures each pixel's own share of the logit
    assert torch.allclose(
        occlusion(model, images, targets, baseline=baseline, window=1, stride=1),
        (images - baseline) * w,
        atol=1e-5,
    )


def test_smoothgrad_is_reproducible_and_leaves_the_global_random_state_alone():
    model = TinyNet(classes=3, size=8).eval()
    images, targets = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    state = torch.random.get_rng_state()
    first = smoothgrad(model, images, targets, samples=4, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(first, smoothgrad(model, images, targets, samples=4, seed=5))
    assert not torch.equal(first, smoothgrad(model, images, targets, samples=4, seed=6))


def test_grad_cam_uses_the_last_conv_layer_and_the_image_size():
    model = MnistCNN().eval()
    assert last_conv_layer(model) is model.features[4]
    assert last_conv_layer(linear_model()) is None
    cam = grad_cam(model, torch.randn(2, 1, 28, 28), torch.tensor([3, 7]))
    assert cam.shape == (2, 1, 28, 28)
    assert (cam >= 0).all()
    with pytest.raises(ValueError, match=r"no nn\.Conv2d"):
        grad_cam(linear_model(), torch.randn(2, 1, 6, 6), torch.tensor([0, 1]))


def test_attribution_maps_batching_shape_and_no_side_effects():
    model = TinyNet(classes=3, size=8)
    model.train()  # every method must run it in eval mode and give the mode back
    model.classifier.bias.requires_grad_(False)
    images, targets = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    original_images = images.clone()
    before = snapshot(model)
    methods = default_methods(torch.zeros(1, 1, 8, 8), AttributionSettings(batch_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Captum's 'did not require gradients' warning
        whole = attribution_maps(model, images, targets, methods, batch_size=64)
    split = attribution_maps(model, images, targets, methods, batch_size=2)
    assert whole.shape == (6, 5, 8, 8)
    deterministic = [0, 1, 2, 4, 5]  # SmoothGrad's noise is shared out over each chunk
    assert torch.allclose(whole[deterministic], split[deterministic], atol=1e-5)
    assert torch.isfinite(whole).all()
    assert torch.equal(images, original_images)
    assert_unchanged(model, before)


def test_settled_after():
    epochs = [2, 3, 4, 5]
    drift = torch.tensor([[0.5, 0.9], [0.9, 0.95], [0.3, 0.9], [0.85, 0.9]])
    assert settled_after(epochs, drift, 0.8) == 4  # stable from epoch 5's comparison with 4
    assert settled_after(epochs, drift[:3], 0.8) is None  # last comparison moved
    assert settled_after(epochs[:2], drift[:2], 0.8) == 2
    assert settled_after([2, 3], torch.tensor([[0.9], [0.9]]), 0.8) == 1
    assert settled_after([], torch.zeros(0, 2), 0.8) is None


def make_context(model, epoch, tmp_path, normalization=NORMALIZATION, probe_size=4, size=8):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(probe_size, 1, size, size, generator=generator)
    images = pixels if normalization is None else normalization.normalize(pixels)
    messages = []
    ctx = epoch_context(
        tmp_path,
        AttributionAnalysis,
        epoch=epoch,
        model=model,
        probe=Probe(images, torch.arange(probe_size) % 3, pixels, torch.arange(probe_size)),
        normalization=normalization,
        plots_dir=tmp_path,
        log=messages.append,
    )
    return ctx, messages


SMALL = AttributionSettings(ig_steps=4, smoothgrad_samples=2, deletion_steps=4)


def test_hook_writes_figures_metrics_and_leaves_the_model_alone(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )
    model.train()
    model(torch.randn(8, 1, 8, 8) * 2).sum().backward()  # running stats and .grad
    model.eval()
    before = snapshot(model)
    analysis = AttributionAnalysis(SMALL, seed=0)
    for epoch in (1, 2):
        ctx, messages = make_context(model, epoch, tmp_path)
        analysis(ctx)
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())
    for name in ("attributions_2.png", "attribution_checks_2.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300
    keys = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"]
    keys += ["occlusion", "grad_cam"]
    metrics = ctx.metrics
    for key in [*keys, "random"]:
        assert 0 <= metrics[f"faithfulness/deletion_auc/{key}"] <= 1
        assert 0 <= metrics[f"faithfulness/insertion_auc/{key}"] <= 1
    for key in keys:
        for name in ("sanity/spearman", "sanity/ssim", "attributions/drift"):
            assert -1 <= metrics[f"{name}/{key}"] <= 1
        assert metrics[f"sanity/unchanged/{key}"] in (0.0, 1.0)
    json.dumps(metrics, allow_nan=False)  # metrics.json rejects NaN
    assert any("explanations settled after epoch 1" in m for m in messages)  # same model twice
    assert any("sanity" in m for m in messages)


def test_hook_without_conv_layer_or_normalization(tmp_path):
    model = linear_model(size=8)
    ctx, _ = make_context(model, 1, tmp_path, normalization=None)
    AttributionAnalysis(SMALL)(ctx)
    assert "sanity/spearman/saliency" in ctx.metrics
    assert not any("grad_cam" in key for key in ctx.metrics)
    assert (tmp_path / "attributions_1.png").exists()


def test_state_dict_restores_scales_and_drift(tmp_path):
    model = TinyNet(classes=3, size=8).eval()
    first = AttributionAnalysis(SMALL)
    first(make_context(model, 1, tmp_path)[0])
    state = first.state_dict()
    assert all(isinstance(v, (torch.Tensor, list, int)) for v in state.values())
    resumed = AttributionAnalysis(SMALL)
    resumed.load_state_dict(torch.load(_save(state, tmp_path), weights_only=True))
    model.classifier.weight.data.mul_(-1)  # the explanations move
    ctx_a, _ = make_context(model, 2, tmp_path)
    ctx_b, _ = make_context(model, 2, tmp_path)
    first(ctx_a)
    resumed(ctx_b)
    drift_keys = [key for key in ctx_a.metrics if key.startswith("attributions/drift/")]
    assert drift_keys
    for key in drift_keys:
        assert ctx_a.metrics[key] == ctx_b.metrics[key]
    assert torch.equal(first.scales, resumed.scales)
    assert first.drift_epochs == resumed.drift_epochs == [2]


def _save(state: dict, tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_registered_only_when_enabled():
    assert any(isinstance(a, AttributionAnalysis) for a in default_analyses(Config()))
    disabled = default_analyses(Config(attribution_checks=False))
    assert not any(isinstance(a, AttributionAnalysis) for a in disabled)


def test_pipeline_run_logs_the_checks(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    analysis = AttributionAnalysis(functools.partial(AttributionSettings, deletion_steps=4)())
    result = run(config, TinyNet(), train, held_out, [analysis])
    assert result.failed_analyses == []
    rows = json.loads((tmp_path / "save" / "metrics.json").read_text())
    assert "faithfulness/deletion_auc/random" in rows[0]
    assert "attributions/drift/saliency" in rows[1]
    assert (tmp_path / "save" / "plots" / "attributions_2.png").exists()
