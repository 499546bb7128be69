"""A small torchvision ResNet on random images for ``hesse analyze`` (no download).

Run it with::

    hesse analyze --model examples/resnet_factory.py:factory --quick

A ResNet-18 layout with narrow stages (torchvision's ``ResNet`` with ``BasicBlock``)
classifies 16x16 random images into 10 classes; BatchNorm is in eval mode, so the
loss of a batch is the mean of its samples' losses. Needs ``torchvision``.
"""

from __future__ import annotations

import torch
from torch import nn

from hesse.testing import torchvision_cpu_shim


def small_resnet(num_classes: int = 10, width: int = 8) -> nn.Module:
    """torchvision's ResNet with ``BasicBlock`` and stage widths ``width * (1, 2, 4, 8)``."""
    torchvision_cpu_shim()
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    # Narrow every stage: rebuild with torchvision's own blocks at the given width.
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(BasicBlock, width, 1)
    model.layer2 = model._make_layer(BasicBlock, 2 * width, 1, stride=2)
    model.layer3 = model._make_layer(BasicBlock, 4 * width, 1, stride=2)
    model.layer4 = model._make_layer(BasicBlock, 8 * width, 1, stride=2)
    model.fc = nn.Linear(8 * width, num_classes)
    return model


def factory(
    *, width: int = 4, batches: int = 2, batch_size: int = 8, size: int = 16, seed: int = 0
):
    """``(model, loss_fn, data)``: a narrow ResNet in eval mode and random labelled images."""
    torch.manual_seed(seed)
    model = small_resnet(width=width).eval()
    g = torch.Generator().manual_seed(seed)
    data = [
        (
            torch.randn(batch_size, 3, size, size, generator=g),
            torch.randint(0, 10, (batch_size,), generator=g),
        )
        for _ in range(batches)
    ]
    return model, nn.CrossEntropyLoss(), data
