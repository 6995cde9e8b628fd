r"""Default models per input shape, torchvision's architectures, and how exigo reads any model.

- `MnistCNN`: two 3x3 conv blocks (conv, BatchNorm, ReLU, 2x2 max-pool), a 128-unit hidden
  layer and a linear classifier, for 28x28 images. Its embedding is the 128-unit layer:

  $$ z = \mathrm{ReLU}(W_1 \, \mathrm{flatten}(h) + b_1), \qquad f(x) = W_2 z + b_2 $$

- `SmallResNet`: the ResNet-9 layout of Page (2018, "How to train your ResNet", the DAWNBench
  CIFAR-10 entry) at half width, for small colour images (32x32).
- `torchvision_model`: any torchvision classification architecture by name, its first
  convolution and its classifier adapted to the data's channels and classes.
- `default_model`: which of these fits an input shape.

Any classifier works with the pipeline, whatever its forward returns: `check_model` proves,
at `exigo.pipeline.run`'s door and before anything is written, that two validation images
give [2, K] logits, and wraps a model whose output is not that tensor once in
`AsClassifier`, so that training, evaluation and every analysis see a plain
`[N, C, H, W] -> [N, K]` classifier (`logits_of`). The embedding the projection and the
evaluation read is the input of the model's `classifier` attribute or else of its last
`nn.Linear` (`embedding_module`), or of any module named with `embedding_layer`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AsClassifier",
    "MnistCNN",
    "ModelError",
    "OutputFn",
    "SmallResNet",
    "check_model",
    "check_model_name",
    "default_model",
    "embedding_module",
    "logits_of",
    "torchvision_model",
    "unwrapped",
]

#: Turns whatever a model's forward returns into the logits tensor [N, K].
OutputFn = Callable[[Any], Tensor]


class ModelError(ValueError):
    """The model does not fit the data, or cannot be built; the message says what to change."""


class MnistCNN(nn.Module):
    """Two conv blocks and a 128-unit embedding for [N, C, 28, 28] images.

    Args:
        num_classes: number of logits.
        channels: output channels of the two conv blocks.
        hidden: width of the embedding layer.
        in_channels: image channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, 3, padding=1, bias=False),  # (N, 16, 28, 28)
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (N, 16, 14, 14)
            nn.Conv2d(first, second, 3, padding=1, bias=False),  # (N, 32, 14, 14)
            nn.BatchNorm2d(second),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (N, 32, 7, 7)
        )
        self.embedding = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * 7 * 7, hidden),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, images: Tensor) -> Tensor:
        """The penultimate layer.

        Args:
            images: float tensor [N, C, 28, 28], normalised.

        Returns:
            Float tensor [N, hidden].
        """
        return self.embedding(self.features(images))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits.

        Args:
            images: float tensor [N, C, 28, 28], normalised.

        Returns:
            Float tensor [N, num_classes] (unnormalised log-probabilities).
        """
        return self.classifier(self.embed(images))


def _conv_block(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """$x + g(x)$ with $g$ two conv blocks of the same width (Page's ResNet-9 residual)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_block(channels, channels), _conv_block(channels, channels))

    def forward(self, features: Tensor) -> Tensor:
        return features + self.body(features)


class SmallResNet(nn.Module):
    r"""ResNet-9 (Page 2018) at half width: 1.65 M parameters, 0.19 GFLOP per 32x32 image.

    A stem, three stages that halve the resolution (the first and last with a residual block),
    a global max-pool and a linear classifier; its embedding is the 256-d pooled vector,
    the classifier's input. Any image side from 8 pixels up works (the pool is adaptive);
    the layout is tuned for 32x32 (CIFAR, SVHN).

    Why this one: the full-width ResNet-9 is the network with which Page reached 94% on
    CIFAR-10 in 24 epochs (with augmentation); at half width it keeps the layout, trains 4x
    cheaper, and still has room for the ~85-90% CIFAR-10 accuracy exigo's few epochs without
    augmentation can reach.

    Args:
        num_classes: number of logits.
        in_channels: image channels.
        width: channels of the stem; the stages have 2, 4 and 8 times as many.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width),  # (N, 32, 32, 32)
            _conv_block(width, 2 * width, pool=True),  # (N, 64, 16, 16)
            _Residual(2 * width),
            _conv_block(2 * width, 4 * width, pool=True),  # (N, 128, 8, 8)
            _conv_block(4 * width, 8 * width, pool=True),  # (N, 256, 4, 4)
            _Residual(8 * width),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),  # (N, 256)
        )
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits.

        Args:
            images: float tensor [N, C, H, W], normalised, H and W at least 8.

        Returns:
            Float tensor [N, num_classes].
        """
        return self.classifier(self.features(images))


def default_model(image_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The model exigo trains when none is chosen, by input shape.

    - side 28 (MNIST, Fashion-MNIST, KMNIST; any channels): `MnistCNN`;
    - any other side up to 64 (CIFAR, SVHN, small image folders): `SmallResNet`;
    - larger images: torchvision's `resnet18` (random weights, its first convolution and
      classifier adapted), whose stride-2 stem and adaptive pooling suit ImageNet-like sizes.

    Args:
        image_shape: `(C, H, W)` of one image.
        num_classes: number of logits.

    Returns:
        The model, on the CPU, with freshly initialised weights (seed torch first).
    """
    channels, height, width = (int(size) for size in image_shape)
    if (height, width) == (28, 28):
        return MnistCNN(num_classes=num_classes, in_channels=channels)
    if max(height, width) <= 64:
        return SmallResNet(num_classes=num_classes, in_channels=channels)
    return torchvision_model("resnet18", channels, num_classes)


def torchvision_model(
    name: str, in_channels: int, num_classes: int, *, pretrained: bool = False
) -> nn.Module:
    """A torchvision classification architecture with the data's channels and classes.

    Without `pretrained` the model is built with `num_classes` outputs; with it, torchvision's
    default weights are loaded (downloaded into torch's hub cache unless already there) and
    the last `nn.Linear` is replaced by a fresh one with `num_classes` outputs. When the data
    does not have 3 channels, the first `nn.Conv2d` is replaced by one taking `in_channels`;
    pretrained RGB filters are averaged over their channels and repeated (scaled by
    3 / in_channels, as timm does), so a grey image sees the filters' luminance response.

    Args:
        name: a name in `torchvision.models.list_models(module=torchvision.models)`.
        in_channels: image channels of the data.
        num_classes: number of logits.
        pretrained: load torchvision's default (ImageNet) weights.

    Returns:
        The model, on the CPU.

    Raises:
        ModelError: torchvision has no classification model of that name, its weights cannot
            be downloaded, or it has no convolution or linear layer to adapt.
    """
    from torchvision.models import get_model, get_model_weights

    check_model_name(name)
    if not pretrained:
        model = get_model(name, weights=None, num_classes=num_classes)
    else:
        weights = get_model_weights(name).DEFAULT
        try:
            model = get_model(name, weights=weights)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            reason = " ".join(str(error).split())
            raise ModelError(
                f"--pretrained: torchvision's weights for {name} ({weights}) could not be "
                f"downloaded from {weights.url} ({reason}); put that file into "
                f"{torch.hub.get_dir()}/checkpoints/ on this machine, or drop --pretrained to "
                "train from random weights"
            ) from None
        _replace_last_linear(model, name, num_classes)
    if in_channels != 3:
        _adapt_first_convolution(model, name, in_channels, pretrained=pretrained)
    return model


def check_model_name(name: str) -> None:
    """Raise unless torchvision has a classification model called `name`.

    Args:
        name: the `--model` value.

    Raises:
        ModelError: an unknown name; the message gives the closest names and all of them.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(
            f"--model {name!r} is not a torchvision classification model{hint}; the names are: "
            + ", ".join(known)
        )


def _replace_last_linear(model: nn.Module, name: str, num_classes: int) -> None:
    linears = [key for key, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ModelError(
            f"--model {name} has no nn.Linear classifier to give {num_classes} outputs; "
            "choose another architecture"
        )
    old = model.get_submodule(linears[-1])
    assert isinstance(old, nn.Linear)
    _set_submodule(model, linears[-1], nn.Linear(old.in_features, num_classes))


def _adapt_first_convolution(
    model: nn.Module, name: str, in_channels: int, *, pretrained: bool
) -> None:
    """Replace the first `nn.Conv2d` by one taking `in_channels` (see `torchvision_model`).

    Pretrained RGB filters are averaged over their channels and repeated, scaled by
    3 / in_channels; a randomly initialised model keeps the new layer's own initialisation
    (repeating one averaged filter would give every input channel the same one).
    """
    convolutions = [key for key, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise ModelError(f"--model {name} has no nn.Conv2d to take {in_channels}-channel images")
    old = model.get_submodule(convolutions[0])
    assert isinstance(old, nn.Conv2d)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=old.groups,
        bias=old.bias is not None,
    )
    if pretrained:
        with torch.no_grad():
            mean = old.weight.mean(dim=1, keepdim=True)  # (out, 1, k, k)
            new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3 / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)  # type: ignore[union-attr]
    _set_submodule(model, convolutions[0], new)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------- any model's output


def logits_of(output: Any, output_fn: OutputFn | None = None) -> Tensor:
    """The logits in what a model's forward returned.

    A tensor is the logits; a tuple or list holds them first (`(logits, features)`); a mapping
    under `"logits"` (`{"logits": ..., "features": ...}`, Hugging Face outputs). `output_fn`,
    when given, is applied first and must return the tensor.

    Args:
        output: the model's return value.
        output_fn: turns it into the logits tensor, for any other structure.

    Returns:
        The logits tensor (its shape is `check_model`'s to check).

    Raises:
        ModelError: no logits tensor found where they are looked for.
    """
    if output_fn is not None:
        output = output_fn(output)
        if not isinstance(output, Tensor):
            raise ModelError(f"output_fn returned {_describe(output)}, not the logits tensor")
        return output
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ModelError(
        f"the model returned {_describe(output)}: exigo takes a tensor, a tuple or list whose "
        "first element is the logits, or a mapping with a 'logits' entry; pass "
        "run(..., output_fn=...) that returns the [N, num_classes] logits from it"
    )


def _describe(value: Any, depth: int = 0) -> str:
    """`a tensor [2, 10]`, `a tuple (tensor [2, 10], tensor [2, 64])`, `a dict {...}`."""
    if isinstance(value, Tensor):
        return f"a tensor {list(value.shape)}"
    if depth < 2 and isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(item, depth + 1).removeprefix("a ") for item in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"a {type(value).__name__} ({inner}{more})"
    if depth < 2 and isinstance(value, Mapping):
        inner = ", ".join(
            f"{key!r}: {_describe(item, depth + 1).removeprefix('a ')}"
            for key, item in list(value.items())[:4]
        )
        return f"a {type(value).__name__} {{{inner}}}"
    return f"a {type(value).__name__}"


class AsClassifier(nn.Module):
    """A user's model seen as a plain classifier: images [N, C, H, W] -> logits [N, K].

    `exigo.pipeline.run` wraps a model in one when its output is not the logits tensor
    itself, or when `output_fn` or `embedding_layer` is given (`check_model`), so training,
    evaluation and the analyses never meet tuples or dicts. Checkpoints hold the wrapped
    model's own `state_dict()` (`exigo.engine.session` saves `unwrapped(model)`), so they load
    into the user's model without a prefix.

    Args:
        model: the user's model.
        output_fn: turns its output into the logits tensor (default: `logits_of`'s rules).
        embedding_layer: name of the module whose input is the embedding (as in
            `model.named_modules()`); None: the default of `embedding_module`.

    Attributes:
        model: the user's model.
        output_fn: as given.
        embedding_name: name in `model.named_modules()` of the module whose input the
            evaluation records (kept as a name: a deep copy of the wrapper then points into
            the copied model, and the module is not registered twice).
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: OutputFn | None = None,
        embedding_layer: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn
        self.embedding_name = _embedding_name(model, embedding_layer)

    @property
    def embedding(self) -> nn.Module:
        """The module whose input is the embedding."""
        return self.model.get_submodule(self.embedding_name)

    def forward(self, images: Tensor) -> Tensor:
        """The logits of `images`.

        Args:
            images: float tensor [N, C, H, W], normalised like the data.

        Returns:
            Float tensor [N, K].
        """
        return logits_of(self.model(images), self.output_fn)


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside an `AsClassifier` (any other model as it is).

    Args:
        model: a model, possibly wrapped.

    Returns:
        The model whose `state_dict()` checkpoints hold and whose class name they record.
    """
    return model.model if isinstance(model, AsClassifier) else model


def embedding_module(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module whose input is the model's embedding (penultimate layer).

    For an `AsClassifier`, the module it chose; otherwise the module called `name`, or
    `model.classifier` when the model has one, or else the last `nn.Linear` registered.

    Args:
        model: the classifier.
        name: a module name as in `model.named_modules()` (`"head.3"`); None: the default.

    Returns:
        The submodule whose input, float [N, ...], the embedding analyses read through a hook.

    Raises:
        ModelError: no module of that name (the message lists the names), or no linear
            layer to take the default embedding from.
    """
    if isinstance(model, AsClassifier) and name is None:
        return model.embedding
    model = unwrapped(model)
    return model.get_submodule(_embedding_name(model, name))


def _embedding_name(model: nn.Module, name: str | None) -> str:
    """The name of the embedding module: `name` checked, or the default's name."""
    modules = dict(model.named_modules())
    if name is not None:
        if name and name in modules:
            return name
        names = [key for key in modules if key]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(
            f"embedding_layer {name!r} is not a module of {type(model).__name__}{hint}; its "
            f"modules are: {', '.join(names) or 'none'}"
        )
    if isinstance(modules.get("classifier"), nn.Module):
        return "classifier"
    linears = [key for key, module in modules.items() if isinstance(module, nn.Linear)]
    if not linears:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear layer: exigo takes the embedding from "
            "the input of the last one. Give the model a `classifier` attribute, or name the "
            "module whose input is the embedding with embedding_layer="
        )
    return linears[-1]


def check_model(
    model: nn.Module,
    images: Tensor,
    num_classes: int,
    *,
    output_fn: OutputFn | None = None,
    embedding_layer: str | None = None,
) -> nn.Module:
    """Prove, on two images, that `model` maps them to [2, num_classes] logits; wrap if needed.

    Called by `exigo.pipeline.run` before anything is written: a model that does not fit
    the data stops the run with one sentence saying what to change.

    Args:
        model: the user's model, on the images' device.
        images: float tensor [2, C, H, W], validation images as the model takes them.
        num_classes: K, the number of classes of the data.
        output_fn: turns the model's output into the logits tensor.
        embedding_layer: name of the module whose input is the embedding; None: default.

    Returns:
        What training, evaluation and the analyses use: `model` itself when it returns the
        logits tensor and neither `output_fn` nor `embedding_layer` is given (so a plain
        classifier reaches the analyses as it is, its attributes included), else an
        `AsClassifier` around it.

    Raises:
        ModelError: the first convolution takes another number of channels than the images
            have, the forward pass fails, or its logits are not [2, num_classes]; or the
            embedding layer does not exist.
    """
    from exigo._modes import evaluation_mode

    shape = list(images.shape)
    convolutions = [
        (key, module) for key, module in model.named_modules() if isinstance(module, nn.Conv2d)
    ]
    if convolutions and convolutions[0][1].in_channels != images.shape[1]:
        key, first = convolutions[0]
        raise ModelError(
            f"the model's first convolution ({key}) takes {first.in_channels}-channel images "
            f"but the data has {images.shape[1]} channel(s) (images {shape[1:]}): build the "
            f"model with {images.shape[1]} input channels, or choose data that has "
            f"{first.in_channels}"
        )
    classifier = AsClassifier(model, output_fn, embedding_layer)
    with evaluation_mode(model), torch.no_grad():
        try:
            output = model(images)
        except Exception as error:  # the user's code: any error means it does not fit
            message = " ".join(str(error).split())[:300]
            raise ModelError(
                f"the model fails on two validation images {shape}: {type(error).__name__}: "
                f"{message}"
            ) from None
        logits = logits_of(output, output_fn)
    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise ModelError(
            f"the model's logits for {shape[0]} images are {_describe(logits)} (from "
            f"{_describe(output)}), not [{shape[0]}, {num_classes}]: pass "
            "run(..., output_fn=...) that returns the [N, num_classes] logits tensor from the "
            "model's output"
        )
    if logits.shape[1] != num_classes:
        raise ModelError(
            f"the model has {logits.shape[1]} outputs but the data has {num_classes} classes: "
            f"build it with {num_classes} outputs, or pass run(..., output_fn=...) that returns "
            "the [N, num_classes] logits"
        )
    # torchvision's GoogLeNet and Inception v3 with `aux_logits` return a tensor in eval mode
    # (this check) but a named tuple in train mode: they go through the wrapper too
    plain = (
        isinstance(output, Tensor)
        and output_fn is None
        and embedding_layer is None
        and not getattr(model, "aux_logits", False)
    )
    return model if plain else classifier
