import functools
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from exigo.analyses import default_analyses
from exigo.analyses.attributions import (
    AttributionAnalysis,
    AttributionSettings,
    attribution_maps,
    channels_last_copy,
    choose_check_set,
    default_methods,
    grad_cam,
    input_x_gradient,
    integrated_gradients,
    last_conv_layer,
    occlusion,
    saliency,
    smoothgrad,
)
from exigo.analyses.sanity import DEPENDS, FLAGGED, INCONCLUSIVE
from exigo.analysis import Probe
from exigo.config import Config
from exigo.data import Normalization, TensorImageDataset
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


def test_smoothgrad_is_reproducible_and_never_touches_the_global_random_state():
    model = TinyNet(classes=3, size=8).eval()
    images, targets = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    state = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    expected_next = torch.rand(4)
    torch.random.set_rng_state(state)
    first = smoothgrad(model, images, targets, samples=4, seed=5)
    assert torch.equal(torch.rand(4), expected_next)  # not read, not forked: untouched
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


def test_a_method_that_fails_on_one_batch_is_reported_and_the_others_go_on():
    model = TinyNet(classes=3, size=8).eval()
    images, targets = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])

    def fragile(model, images, targets):
        if images.shape[0] < 2:  # the last, short batch
            raise RuntimeError("out of memory")
        return saliency(model, images, targets)

    errors: dict[str, str] = {}
    maps = attribution_maps(
        model,
        images,
        targets,
        {"fragile": fragile, "saliency": saliency},
        batch_size=2,
        errors=errors,
    )
    assert errors == {"fragile": "RuntimeError: out of memory (check images 4-4)"}
    assert maps[0, :4].isfinite().all() and maps[0, 4].isnan().all()
    assert maps[1].isfinite().all()
    with pytest.raises(RuntimeError, match="out of memory"):
        attribution_maps(model, images, targets, {"fragile": fragile}, batch_size=2)


def test_check_set_is_stratified_seeded_and_leaves_the_probes_out():
    targets = torch.arange(200) % 4
    probes = torch.tensor([0, 1, 2, 3])
    chosen = choose_check_set(targets, 40, seed=0, exclude=probes)
    assert chosen.numel() == 40 and not set(chosen.tolist()) & set(probes.tolist())
    assert torch.bincount(targets[chosen]).tolist() == [10, 10, 10, 10]
    assert torch.equal(chosen, choose_check_set(targets, 40, seed=0, exclude=probes))
    assert not torch.equal(chosen, choose_check_set(targets, 40, seed=1, exclude=probes))
    assert choose_check_set(targets, 500, seed=0, exclude=probes).numel() == 196


def test_channels_last_copy_matches_the_model_or_is_refused():
    model = TinyNet(classes=3, size=8).eval()
    images = torch.randn(4, 1, 8, 8)
    copied = channels_last_copy(model, images)
    assert copied is not None and copied is not model
    with torch.no_grad():
        assert torch.allclose(copied(images), model(images), atol=1e-5)

    class Viewing(nn.Module):  # `.view` of a channels-last activation fails
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.linear = nn.Linear(2 * 64, 3)

        def forward(self, x):
            h = self.conv(x)
            return self.linear(h.view(h.shape[0], -1))

    assert channels_last_copy(Viewing().eval(), images) is None


def make_context(
    model,
    epoch,
    tmp_path,
    normalization=NORMALIZATION,
    probe_size=4,
    size=8,
    val_data=None,
    accuracy=0.5,
):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(probe_size, 1, size, size, generator=generator)
    images = pixels if normalization is None else normalization.normalize(pixels)
    if val_data is None:
        val_pixels = torch.rand(30, 1, size, size, generator=generator)
        val_pixels[val_pixels < 0.5] = 0.0  # blank background, like MNIST's
        val_images = val_pixels if normalization is None else normalization.normalize(val_pixels)
        val_data = TensorImageDataset(val_images, torch.arange(30) % 3, ["a", "b", "c"])
    messages = []
    ctx = epoch_context(
        tmp_path,
        AttributionAnalysis,
        epoch=epoch,
        model=model,
        eval=SimpleNamespace(targets=val_data.targets, accuracy=accuracy),
        probe=Probe(images, torch.arange(probe_size) % 3, pixels, torch.arange(probe_size)),
        normalization=normalization,
        val_data=val_data,
        plots_dir=tmp_path,
        log=messages.append,
    )
    return ctx, messages


SMALL = AttributionSettings(
    check_size=12,
    ig_steps=4,
    smoothgrad_samples=2,
    deletion_steps=8,
    road_fractions=(0.0, 0.5),
    bootstrap_resamples=200,
    randomisation_draws=3,
)


def conv_bn_model() -> nn.Module:
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
    return model.eval()


def test_hook_writes_figures_metrics_and_leaves_the_model_alone(tmp_path):
    model = conv_bn_model()
    before = snapshot(model)
    rng = torch.random.get_rng_state()
    analysis = AttributionAnalysis(SMALL, seed=0)
    for epoch in (1, 2):
        ctx, messages = make_context(model, epoch, tmp_path, accuracy=0.5 + epoch / 10)
        analysis(ctx)
    assert_unchanged(model, before)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.requires_grad for p in model.parameters())
    for name in (
        "attributions",
        "attribution_faithfulness",
        "attribution_randomisation",
        "attribution_drift",
    ):
        with Image.open(tmp_path / f"{name}_2.png") as image:
            assert image.size[0] > 300
    keys = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"]
    keys += ["occlusion", "grad_cam"]
    metrics = ctx.metrics

    def interval(name: str) -> tuple[float, float, float]:
        low, mean, high = (metrics[f"{name}/{p}"] for p in ("ci_low", "mean", "ci_high"))
        assert low <= mean + 1e-6 and mean <= high + 1e-6, name
        return low, mean, high

    for key in [*keys, "random"]:
        for part in ("deletion", "insertion", "road_morf", "road_lerf"):
            assert 0 <= interval(f"faithfulness/{part}_auc/{key}")[1] <= 1
    for key in keys:
        assert 0 <= metrics[f"faithfulness/deletion_p/{key}"] <= 1
        assert metrics[f"faithfulness/rank/{key}"] in range(1, 7)
        for depth in (1, 2, 3):  # conv, BatchNorm, linear
            interval(f"sanity/spearman/{key}/depth_{depth}")
            interval(f"sanity/spearman_independent/{key}/depth_{depth}")
        for name in (
            "sanity/ssim",
            "sanity/control_image",
            "sanity/control_seed",
            "sanity/excess_over_image",
            "attributions/drift",
        ):
            assert -1 <= interval(f"{name}/{key}")[1] <= 1
        assert metrics[f"sanity/verdict/{key}"] in (FLAGGED, INCONCLUSIVE, DEPENDS)
        assert metrics[f"attributions/settled_after/{key}"] == 1.0  # the same model twice
    interval("faithfulness/ranking_tau")
    json.dumps(metrics, allow_nan=False)  # metrics.json rejects NaN
    assert any(m.startswith("attributions, randomisation") for m in messages)
    assert any("Kendall τ with epoch 1 1.00" in m for m in messages)


def image_method(model, images, targets):
    """A fake 'attribution' hard-wired to return the image: it ignores the model."""
    return images.detach().clone()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_map_that_is_the_input_is_never_called_weight_dependent(tmp_path, seed):
    # control: the image's distance from a zero baseline, |x|; the map: x itself. The
    # randomised maps equal the trained ones exactly as the control does: d = 0 exactly
    model = conv_bn_model()
    methods = {"image": image_method}
    analysis = AttributionAnalysis(SMALL, seed=seed, methods=methods)
    ctx, _ = make_context(model, 1, tmp_path, normalization=None)
    analysis(ctx)
    assert ctx.metrics["sanity/excess_over_image/image/mean"] == 0.0
    assert ctx.metrics["sanity/verdict/image"] == INCONCLUSIVE
    assert ctx.metrics["sanity/verdict/image"] != DEPENDS


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_method_hard_wired_to_return_the_image_is_flagged_on_every_seed(tmp_path, seed):
    # normalised data: the blank image is -2, so the image x and the image control |x - x'|
    # rank the pixels differently, while the randomised maps stay x exactly
    model = conv_bn_model()
    methods = {"image": image_method}
    analysis = AttributionAnalysis(SMALL, seed=seed, methods=methods)
    ctx, messages = make_context(model, 1, tmp_path)
    analysis(ctx)
    assert ctx.metrics["sanity/verdict/image"] == FLAGGED
    assert ctx.metrics["sanity/spearman/image/depth_3/mean"] == pytest.approx(1.0)
    assert any("FLAGGED" in m and "image" in m for m in messages)


def test_bad_input_is_reported_once_and_the_rest_goes_on(tmp_path):
    # more check images than the held-out set has: all of them, said once
    model = conv_bn_model()
    analysis = AttributionAnalysis(
        functools.partial(AttributionSettings, **{**SMALL.__dict__, "check_size": 1000})(), seed=0
    )
    logged = []
    for epoch in (1, 2):
        ctx, messages = make_context(model, epoch, tmp_path)
        analysis(ctx)
        logged += messages
    assert sum("checking all of them" in m for m in logged) == 1
    assert analysis.check_indices.numel() == 26  # 30 held out, 4 probes
    # a model with no randomisable layer: the checks skip randomisation in one line
    flat = nn.Sequential(nn.Flatten(), nn.Softplus(), nn.AdaptiveAvgPool1d(3)).eval()
    ctx, messages = make_context(flat, 1, tmp_path)
    AttributionAnalysis(SMALL, methods={"image": image_method})(ctx)
    assert sum("randomisation: skipped" in m for m in messages) == 1
    assert "faithfulness/deletion_auc/image/mean" in ctx.metrics
    # a method that fails: reported with its error, the others checked
    broken = {"broken": lambda m, x, t: torch.zeros(2), "saliency": saliency}
    ctx, messages = make_context(conv_bn_model(), 1, tmp_path)
    AttributionAnalysis(SMALL, methods=broken)(ctx)
    assert any(m.startswith("attributions: broken failed") for m in messages)
    assert "sanity/verdict/saliency" in ctx.metrics
    assert not any("/broken" in key for key in ctx.metrics)


def test_hook_without_conv_layer_or_normalization(tmp_path):
    model = linear_model(size=8)
    ctx, _ = make_context(model, 1, tmp_path, normalization=None)
    AttributionAnalysis(SMALL)(ctx)
    assert "sanity/spearman/saliency/depth_1/mean" in ctx.metrics
    assert not any("grad_cam" in key for key in ctx.metrics)
    assert (tmp_path / "attributions_1.png").exists()


def test_state_dict_restores_the_check_set_scales_and_history(tmp_path):
    model = TinyNet(classes=3, size=8).eval()
    first = AttributionAnalysis(SMALL)
    first(make_context(model, 1, tmp_path)[0])
    state = first.state_dict()
    resumed = AttributionAnalysis(SMALL)
    resumed.load_state_dict(torch.load(_save(state, tmp_path), weights_only=True))
    assert torch.equal(resumed.check_indices, first.check_indices)
    model.classifier.weight.data.mul_(-1)  # the explanations move
    ctx_a, _ = make_context(model, 2, tmp_path)
    ctx_b, _ = make_context(model, 2, tmp_path)
    first(ctx_a)
    resumed(ctx_b)
    drift_keys = [key for key in ctx_a.metrics if key.startswith("attributions/drift/")]
    assert drift_keys
    for key in ctx_a.metrics:
        if "/seconds/" not in key:
            assert ctx_a.metrics[key] == ctx_b.metrics[key], key
    assert torch.equal(first.scales, resumed.scales)
    assert first.drift == resumed.drift and first.taus == resumed.taus


def _save(state: dict, tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_registered_only_when_enabled_with_the_configured_check_size():
    analyses = default_analyses(Config(check_size=37))
    attribution = [a for a in analyses if isinstance(a, AttributionAnalysis)]
    assert len(attribution) == 1 and attribution[0].settings.check_size == 37
    disabled = default_analyses(Config(attribution_checks=False))
    assert not any(isinstance(a, AttributionAnalysis) for a in disabled)
    with pytest.raises(ValueError, match=r"check_size \(--check-size\) must be at least 1"):
        Config(check_size=0)
    from exigo.cli import build_parser, config_from_args

    parsed = build_parser().parse_args(["--check-size", "20"])
    assert config_from_args(parsed).check_size == 20


def test_pipeline_run_logs_the_checks(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    result = run(config, TinyNet(), train, held_out, [AttributionAnalysis(SMALL)])
    assert result.failed_analyses == []
    rows = json.loads((tmp_path / "save" / "metrics.json").read_text())
    assert "faithfulness/deletion_auc/random/mean" in rows[0]
    assert "attributions/drift/saliency/ci_low" in rows[1]
    assert (tmp_path / "save" / "plots" / "attribution_randomisation_2.png").exists()
