import torch
from torch import nn

from exigo.models import MnistCNN, embedding_module


def test_shapes_and_embedding():
    model = MnistCNN().eval()
    images = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    logits = model(images)
    assert logits.shape == (5, 10)
    embedding = model.embed(images)
    assert embedding.shape == (5, 128)
    assert torch.allclose(model.classifier(embedding), logits, atol=1e-6)
    assert embedding_module(model) is model.classifier


def test_embedding_module_of_a_plain_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert embedding_module(model) is model[3]
