"""Models of the training entry: a small CNN and a wide MLP for the 8x8 digits, ResNet-34/50 from torchvision.

torchvision is imported only when a ResNet is built, so the digits path (and
the config and tests) never needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from lookahead_dist.errors import ConfigError

__all__ = ["DigitsCNN", "DigitsMLP", "build_model", "import_torchvision"]


class DigitsCNN(nn.Module):
    """conv 3x3 (1 -> 16), conv 3x3 (16 -> 32), 2x2 max-pool, linear (512 -> classes): about 10k parameters.

    Input: (N, 1, 8, 8) images with values in [0, 1].
    """

    def __init__(self, num_classes: int = 10, batch_norm: bool = True):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2))
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DigitsMLP(nn.Module):
    """flatten (64), then ``layers`` hidden layers of ``width`` units with ReLU, then linear (width -> classes).

    The default, 4 hidden layers of 1600, has 64 x 1600 + 3 x 1600 x 1600 + 1600 x 10 weights plus
    biases: 7,804,810 parameters, 31.2 MB in float32. Its compute per example is small next to the
    bytes a gossip step sends, so the batch size sets how compute and communication compare
    (bench/overlap.py picks it by measuring both).

    Input: (N, 1, 8, 8) images (or (N, 64)).
    """

    def __init__(self, num_classes: int = 10, width: int = 1600, layers: int = 4):
        super().__init__()
        dims = [64] + [width] * layers
        mods: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims, dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        mods.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def import_torchvision(what: str):
    """torchvision, or a ConfigError that says what needed it and how to get it."""
    try:
        import torchvision
    except ImportError as exc:
        raise ConfigError(
            f"{what} needs torchvision, which is not installed ({exc}); install the torchvision build "
            "that matches your torch (pip install torchvision)"
        ) from None
    return torchvision


def build_model(cfg, small_inputs: bool = False) -> nn.Module:
    """The model named by ``cfg`` (a :class:`~lookahead_dist.train.config.ModelConfig`).

    ``small_inputs`` (32x32 images, CIFAR-10): a ResNet gets the usual CIFAR stem, a 3x3 stride-1
    first convolution and no max-pool, instead of the ImageNet stem that shrinks 32x32 to 8x8.
    """
    if cfg.name == "digits_cnn":
        return DigitsCNN(cfg.num_classes, cfg.batch_norm)
    if cfg.name == "digits_mlp":
        return DigitsMLP(cfg.num_classes)
    if cfg.name in ("resnet34", "resnet50"):
        tv = import_torchvision(f"model.name {cfg.name}")
        model = getattr(tv.models, cfg.name)(weights=None, num_classes=cfg.num_classes)
        if small_inputs:
            model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model
    raise ConfigError(f"model.name: unknown model {cfg.name!r} (known: digits_cnn, digits_mlp, resnet34, resnet50)")
