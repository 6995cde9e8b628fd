"""The analyses' budget: declared costs, lowered settings, every k epochs, one line."""

import io
import math

import pytest
from rich.console import Console

from exigo.analyses.attributions import AttributionAnalysis
from exigo.analyses.class_models import ClassModelAnalysis
from exigo.analyses.errors import ErrorAnalysis
from exigo.analyses.projection import ProjectionAnalysis
from exigo.analyses.saliency import SaliencyAnalysis
from exigo.analysis import Analysis, CostShape, EpochContext
from exigo.config import Config
from exigo.engine.budget import MIN_SCALE, plan_budget
from exigo.pipeline import run

from conftest import TinyNet, make_blobs

MNIST_SHAPE = CostShape(probe_images=10, num_classes=10, image_shape=(1, 28, 28))


class Costly(Analysis):
    """Declares `passes` at full settings, proportionally fewer when scaled; records calls."""

    name = "costly"

    def __init__(self, passes: float) -> None:
        self.passes = passes
        self.epochs: list[int] = []

    def cost(self, shape: CostShape) -> float:
        return self.passes * self.scale

    def __call__(self, ctx: EpochContext) -> None:
        self.epochs.append(ctx.epoch)


class Free(Costly):
    name = "free"

    def cost(self, shape: CostShape) -> float:
        return 0.0


def test_analyses_within_budget_keep_their_settings():
    analyses = [Costly(900), Free(0)]
    assert plan_budget(analyses, MNIST_SHAPE, training_passes=1000, budget=1.0) is None
    assert [(a.scale, a.every) for a in analyses] == [(1.0, 1), (1.0, 1)]


def test_over_budget_lowers_settings_then_runs_every_k_epochs():
    costly, free = Costly(4000), Free(0)
    line = plan_budget(
        [costly, free], MNIST_SHAPE, training_passes=1000, budget=2.0, free_pixel_passes=0
    )
    assert costly.scale == 0.5 and costly.every == 1  # 4,000 -> 2,000 = 2 x 1,000
    assert free.scale == 1.0 and free.every == 1
    assert "4,000 model passes per epoch, 4.0x" in line and "lowered to 50%" in line
    assert "costly 4,000 -> 2,000" in line and "every" not in line

    line = plan_budget(
        [costly, free], MNIST_SHAPE, training_passes=100, budget=1.0, free_pixel_passes=0
    )
    assert costly.scale == MIN_SCALE and costly.every == math.ceil(4000 * MIN_SCALE / 100)
    assert "after every 10th epoch and after the last" in line

    assert (
        plan_budget([costly], MNIST_SHAPE, training_passes=100, budget=0, free_pixel_passes=0)
        is None
    )  # no limit
    assert (costly.scale, costly.every) == (1.0, 1)  # a new plan starts from full settings


@pytest.mark.parametrize(("every", "due"), [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (9, [5])])
def test_due_every_k_and_after_the_last_epoch(every, due):
    analysis = Costly(1)
    analysis.every = every
    assert [epoch for epoch in range(1, 6) if analysis.due(epoch, 5)] == due


def test_declared_costs_by_hand():
    assert SaliencyAnalysis().cost(MNIST_SHAPE) == 10 + 10
    assert ErrorAnalysis().cost(MNIST_SHAPE) == 2 * 3 * 5
    assert ProjectionAnalysis().cost(MNIST_SHAPE) == 0
    class_models = ClassModelAnalysis()
    assert class_models.cost(MNIST_SHAPE) == pytest.approx(10 * (60 + 1 / 3))
    class_models.scale = 0.25
    assert class_models.steps == 15

    attributions = AttributionAnalysis()
    # per image: maps m = 3 + 16 + 16 + 64 / 3 (8 x 8 occlusion patches), m again for each of
    # the two randomisation stages, curves 2 * 7 * 9 forward passes / 3
    per_image = 3 * (3 + 16 + 16 + 64 / 3) + 2 * 7 * 9 / 3
    assert attributions.cost(MNIST_SHAPE) == pytest.approx(10 * per_image)
    large = CostShape(probe_images=10, num_classes=4, image_shape=(3, 224, 224))
    settings = attributions.settings_for(large.image_shape)
    assert (settings.occlusion_window, settings.occlusion_stride) == (56, 24)  # 8 x 8 patches
    assert attributions.cost(large) == pytest.approx(10 * per_image)

    attributions.scale = 0.25
    lowered = attributions.settings_for(MNIST_SHAPE.image_shape)
    assert (lowered.ig_steps, lowered.smoothgrad_samples, lowered.deletion_steps) == (4, 4, 5)
    assert lowered.occlusion_stride == 6 and lowered.randomisation_stages == 1  # 4 x 4 patches
    assert attributions.cost(MNIST_SHAPE) == pytest.approx(
        10 * (2 * (3 + 4 + 4 + 16 / 3) + 2 * 7 * 4 / 3)
    )


def test_the_pipeline_says_once_what_it_chose_and_skips_epochs(tmp_path):
    train, held_out = make_blobs(40, size=8, seed=0), make_blobs(12, size=8, seed=1)
    costly, free = Costly(10_000_000), Free(0)
    output = io.StringIO()
    config = Config(epochs=5, batch_size=20, save_dir=tmp_path / "save", analysis_budget=20)
    run(config, TinyNet(), train, held_out, [costly, free], console=Console(file=output, width=400))
    # 10,000,000 x 1/4 = 2,500,000 passes against 20 x 40 = 800 plus the free allowance of
    # 4e7 / 64 pixels = 625,000: every 4th epoch and the last
    assert costly.every == 4 and costly.epochs == [4, 5]
    assert free.epochs == [1, 2, 3, 4, 5]
    assert output.getvalue().count("analysis budget:") == 1
    assert "after every 4th epoch and after the last" in output.getvalue()


def test_a_small_runs_analyses_are_never_lowered():
    costly = Costly(passes=5000)
    # 100 training images would allow 100 passes; the free allowance covers 51,000 at 28x28
    assert plan_budget([costly], MNIST_SHAPE, training_passes=100, budget=1.0) is None
    assert costly.scale == 1.0 and costly.every == 1
    large = CostShape(probe_images=10, num_classes=4, image_shape=(3, 224, 224))
    assert plan_budget([costly], large, training_passes=100, budget=1.0) is not None
