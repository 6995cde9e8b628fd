import pytest
import torch

from exigo.engine.training import DivergenceError, evaluate, train_epoch

from conftest import TinyNet


def test_training_learns_and_evaluation_is_consistent(blobs):
    train, held_out = blobs
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = evaluate(model, held_out, batch_size=7)
    for _ in range(5):
        result = train_epoch(model, train, torch.randperm(len(train)), optimizer, batch_size=16)
    after = evaluate(model, held_out, batch_size=7)
    assert result.images == len(train) and result.seconds > 0
    assert after.loss < before.loss and after.accuracy == 1.0
    # rows in dataset order, probabilities normalised, embeddings from the classifier's input
    assert torch.equal(after.targets, held_out.targets)
    assert torch.equal(after.predictions, after.probabilities.argmax(1))
    assert torch.allclose(after.probabilities.sum(1), torch.ones(len(held_out)))
    assert after.embeddings.shape == (len(held_out), 8)
    expected = model.eval()(held_out.images).softmax(1)
    assert torch.allclose(model.classifier(after.embeddings).softmax(1), expected, atol=1e-5)


def test_evaluate_restores_mode_and_removes_hook(blobs):
    model = TinyNet().train()
    evaluate(model, blobs[1])
    assert model.training
    assert not model.classifier._forward_pre_hooks


def test_divergence_is_reported(blobs):
    model = TinyNet()
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DivergenceError, match="--lr"):
        train_epoch(model, blobs[0], torch.arange(len(blobs[0])), optimizer)
