import json

import pytest
import torch
from torch import nn

from exigo.analyses.class_models import ClassModelAnalysis
from exigo.analyses.errors import ErrorAnalysis
from exigo.analyses.saliency import SaliencyAnalysis
from exigo.config import Config
from exigo.engine.checkpoint import load_checkpoint
from exigo.engine.training import evaluate
from exigo.models import (
    AsClassifier,
    MnistCNN,
    ModelError,
    SmallResNet,
    check_model,
    default_model,
    embedding_module,
    torchvision_model,
)
from exigo.pipeline import run

from conftest import TinyNet, make_blobs


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


class Backbone(nn.Module):
    """Features and a `head` Sequential; subclasses choose what forward returns."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(256, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, classes)
        )

    def parts(self, images):
        features = self.features(images)
        return self.head(features), features


class TensorNet(Backbone):
    def forward(self, images):
        return self.parts(images)[0]


class TupleNet(Backbone):
    def forward(self, images):
        return self.parts(images)  # (logits, features)


class ListNet(Backbone):
    def forward(self, images):
        return list(self.parts(images))


class DictNet(Backbone):
    def forward(self, images):
        logits, features = self.parts(images)
        return {"features": features, "logits": logits}


class NestedNet(Backbone):
    def forward(self, images):
        logits, features = self.parts(images)
        return {"out": (features, logits)}


def quick_analyses():
    return [SaliencyAnalysis(), ErrorAnalysis(), ClassModelAnalysis(steps=3)]


@pytest.mark.parametrize("model_class", [TensorNet, TupleNet, ListNet, DictNet])
def test_models_with_any_output_train_and_save_their_own_weights(model_class, tmp_path):
    train, held_out = make_blobs(48, size=8, seed=0), make_blobs(24, size=8, seed=1)
    model = model_class()
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    result = run(config, model, train, held_out, quick_analyses())
    assert not result.failed_analyses and result.history[-1]["eval_accuracy"] > 0.9
    checkpoint = load_checkpoint(tmp_path / "save" / "models" / "best.pt")
    assert checkpoint["model_class"] == model_class.__name__
    assert set(checkpoint["model"]) == set(model.state_dict())  # no "model." prefix
    fresh = model_class()
    fresh.load_state_dict(checkpoint["model"])
    info = json.loads((tmp_path / "save" / "run.json").read_text())
    assert info["model"] == model_class.__name__
    assert info["data"]["source"] == "given from Python (TensorImageDataset)"
    assert info["data"]["image_shape"] == [1, 8, 8] and info["data"]["normalization"] is None


def test_output_fn_reads_any_structure(tmp_path):
    train, held_out = make_blobs(48, size=8, seed=0), make_blobs(24, size=8, seed=1)
    config = Config(epochs=1, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    result = run(
        config, NestedNet(), train, held_out, quick_analyses(), output_fn=lambda o: o["out"][1]
    )
    assert not result.failed_analyses and result.history


@pytest.mark.parametrize(
    ("model", "output_fn", "expected"),
    [
        (NestedNet(), None, "a dict {'out': tuple (tensor [2, 256], tensor [2, 3])}"),
        (NestedNet(), lambda o: o["out"][0], "256 outputs but the data has 3 classes"),
        (NestedNet(), lambda o: o["out"], "output_fn returned a tuple"),
        (TupleNet(), lambda o: o[0][:, 0], "logits for 2 images are a tensor [2]"),
    ],
)
def test_output_that_is_not_logits_stops_before_writing(model, output_fn, expected, tmp_path):
    train, held_out = make_blobs(48, size=8, seed=0), make_blobs(24, size=8, seed=1)
    config = Config(epochs=1, save_dir=tmp_path / "save")
    with pytest.raises(ModelError) as raised:
        run(config, model, train, held_out, quick_analyses(), output_fn=output_fn)
    assert expected in str(raised.value) and "output_fn" in str(raised.value)
    assert not (tmp_path / "save").exists()


def test_embedding_layer_by_name_and_a_wrong_name_lists_the_modules(tmp_path):
    held_out = make_blobs(24, size=8, seed=1)
    model = DictNet()
    wrapped = AsClassifier(model, embedding_layer="head.1")
    assert embedding_module(wrapped) is model.head[1]
    assert evaluate(wrapped, held_out).embeddings.shape == (24, 16)
    assert evaluate(AsClassifier(model), held_out).embeddings.shape == (24, 16)  # last Linear
    assert evaluate(AsClassifier(model, embedding_layer="head.0"), held_out).embeddings.shape == (
        24,
        256,
    )
    with pytest.raises(ModelError) as raised:
        run(
            Config(epochs=1, save_dir=tmp_path / "save", embedding_layer="head.9"),
            model,
            make_blobs(48, size=8),
            held_out,
        )
    message = str(raised.value)
    assert "head.9" in message and "head.0, head.1, head.2, head.3" in message
    assert not (tmp_path / "save").exists()


def test_channels_mismatch_is_named(tmp_path):

    with pytest.raises(ModelError, match=r"\(features.0\) takes 3-channel images but the data"):
        run(
            Config(epochs=1, save_dir=tmp_path / "save"),
            TinyNet(channels=3),
            make_blobs(),
            make_blobs(),
        )
    assert not (tmp_path / "save").exists()


def test_check_model_leaves_batch_norm_statistics_alone():
    model = SmallResNet(num_classes=4, in_channels=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_model(model, torch.randn(2, 3, 32, 32), 4)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_default_model_per_input_shape():
    assert isinstance(default_model((1, 28, 28), 10), MnistCNN)
    assert isinstance(default_model((3, 28, 28), 10), MnistCNN)
    colour = default_model((3, 32, 32), 100)
    assert isinstance(colour, SmallResNet) and colour(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert embedding_module(colour) is colour.classifier and colour.classifier.in_features == 256
    large = default_model((3, 96, 96), 4)
    assert type(large).__name__ == "ResNet" and large.fc.out_features == 4


def test_torchvision_models_take_the_data_channels_and_classes():
    model = torchvision_model("mobilenet_v3_small", 1, 4).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)
    with pytest.raises(ModelError, match=r"did you mean resnet18") as raised:
        torchvision_model("resnet19", 3, 4)
    assert "alexnet" in str(raised.value)


def test_pretrained_weights_that_cannot_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights
    for name in ("https_proxy", "HTTPS_PROXY"):  # a closed port: refused at once, offline
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    with pytest.raises(ModelError) as raised:
        torchvision_model("resnet18", 3, 4, pretrained=True)
    message = str(raised.value)
    assert message.startswith("--pretrained: torchvision's weights for resnet18")
    assert "could not be downloaded" in message and "drop --pretrained" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message


def test_only_models_that_need_it_are_wrapped():
    images = make_blobs(4, size=8).images[:2]
    plain = TensorNet()
    assert check_model(plain, images, 3) is plain  # analyses see its own attributes
    assert isinstance(check_model(TupleNet(), images, 3), AsClassifier)
    named = check_model(plain, images, 3, embedding_layer="head.0")
    assert isinstance(named, AsClassifier) and embedding_module(named) is plain.head[0]


class AuxHeads(torch.nn.Module):
    """As torchvision's GoogLeNet with aux_logits: a tuple in train mode, a tensor in eval."""

    aux_logits = True

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
        self.fc = torch.nn.Linear(8, 4)
        self.aux = torch.nn.Linear(8, 4)

    def forward(self, images):
        features = self.body(images)
        logits = self.fc(features)
        return (logits, self.aux(features)) if self.training else logits


def test_a_model_whose_train_mode_output_is_a_tuple_is_wrapped():
    model = AuxHeads()
    checked = check_model(model, torch.randn(2, 3, 2, 2), 4)
    checked.train()
    assert isinstance(checked(torch.randn(5, 3, 2, 2)), torch.Tensor)  # training gets logits


@pytest.mark.parametrize("pretrained", [True, False])
def test_the_first_convolution_for_other_channels(pretrained):
    from torchvision.models import resnet18

    from exigo.models import _adapt_first_convolution

    torch.manual_seed(0)
    model = resnet18(num_classes=4)
    old = model.conv1.weight.detach().clone()
    _adapt_first_convolution(model, "resnet18", 2, pretrained=pretrained)
    new = model.conv1.weight.detach()
    assert new.shape == (64, 2, 7, 7)
    averaged = old.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1) * 1.5  # 3 / 2 channels
    if pretrained:  # the RGB filters' luminance response, kept across the 2 channels
        assert torch.allclose(new, averaged)
    else:  # a fresh layer: its two channels' filters differ
        assert not torch.equal(new[:, 0], new[:, 1])
