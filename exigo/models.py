r"""A small CNN for 28x28 grey-scale digits, and how exigo finds any model's embedding.

`MnistCNN`: two 3x3 conv blocks (conv, BatchNorm, ReLU, 2x2 max-pool), a 128-unit hidden layer
and a linear classifier. Its embedding is the 128-unit layer, the input of the classifier:

$$ z = \mathrm{ReLU}(W_1 \, \mathrm{flatten}(h) + b_1), \qquad f(x) = W_2 z + b_2 $$

For any other classifier, exigo takes the input of its last `nn.Linear` as the embedding
(`embedding_module`), so a model needs no special method to be analysed.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MnistCNN", "embedding_module"]


class MnistCNN(nn.Module):
    """Two conv blocks and a 128-unit embedding for [N, 1, 28, 28] images.

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
            images: float tensor [N, 1, 28, 28], normalised.

        Returns:
            Float tensor [N, hidden].
        """
        return self.embedding(self.features(images))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits.

        Args:
            images: float tensor [N, 1, 28, 28], normalised.

        Returns:
            Float tensor [N, num_classes] (unnormalised log-probabilities).
        """
        return self.classifier(self.embed(images))


def embedding_module(model: nn.Module) -> nn.Module:
    """The module whose input is the model's embedding (penultimate layer).

    `model.classifier` when the model has one, otherwise the last `nn.Linear` registered.

    Args:
        model: the classifier.

    Returns:
        The submodule whose input, float [N, D], the embedding analyses read through a hook.

    Raises:
        ValueError: the model has no linear layer to take the embedding from.
    """
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        return classifier
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer: exigo takes the embedding from "
            "the input of the last one. Give the model a `classifier` attribute."
        )
    return linears[-1]
