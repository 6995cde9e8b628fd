import pytest
import torch
from torch import nn

from exigo._modes import evaluation_mode, frozen

from conftest import assert_unchanged, snapshot


def mixed_model() -> nn.Sequential:
    """Training mode, except a BatchNorm kept in eval mode; one frozen parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # e.g. fine-tuning with frozen statistics: must stay so
    model[3].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("freeze", [False, True])
def test_every_module_gets_its_own_mode_back_even_after_an_exception(freeze):
    model = mixed_model()
    before = snapshot(model)
    with pytest.raises(KeyError), evaluation_mode(model, freeze_parameters=freeze) as inside:
        assert inside is model
        assert not any(module.training for module in model.modules())
        flags = [p.requires_grad for p in model.parameters()]
        assert flags == ([False] * len(flags) if freeze else before["requires_grad"])
        raise KeyError("boom")
    assert_unchanged(model, before)


def test_frozen_blocks_parameter_gradients_only():
    model = mixed_model()
    before = snapshot(model)
    images = torch.randn(2, 1, 4, 4, requires_grad=True)
    with frozen(model):
        model(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert_unchanged(model, before)  # no parameter .grad appeared
