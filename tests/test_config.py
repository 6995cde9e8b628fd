import dataclasses
from pathlib import Path

import pytest

from exigo.config import Config


def test_defaults_and_paths():
    config = Config(save_dir="out")
    assert config.epochs == 2 and config.batch_size == 64
    assert config.save_dir == Path("out")
    assert config.to_dict()["save_dir"] == "out"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -1.0),
        ("lr", float("nan")),
        ("probe_size", 0),
        ("label_smoothing", 1.0),
        ("projection_limit", -1),
        ("rescore_fraction", -0.1),
        ("rescore_fraction", 1.5),
        ("rescore_fraction", float("nan")),
    ],
)
def test_rejects_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})
