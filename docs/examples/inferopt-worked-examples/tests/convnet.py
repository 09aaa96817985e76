"""Small models for the tests, also usable as a model spec (``PATH/convnet.py:build``)."""

from __future__ import annotations

import torch
from torch import nn

import inferopt


def build(channels: int = 8, classes: int = 4) -> nn.Module:
    """A seeded CNN with two Conv-BN pairs, non-trivial BN statistics, one conv without bias."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


class Residual(nn.Module):
    """conv1 -> bn1 fuses; conv2's output feeds bn2 and the skip connection, so it must not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        return self.bn2(z) + z


def batches(sizes: tuple[int, ...] = (8, 8, 5), seed: int = 0) -> list[inferopt.Batch]:
    """Image batches; the last one is smaller, as a real data set's last batch often is."""
    generator = torch.Generator().manual_seed(seed)
    return [inferopt.Batch(torch.randn(n, 3, 16, 16, generator=generator),
                           torch.randint(0, 4, (n,), generator=generator)) for n in sizes]


SPEC = f"{__file__}:build"
DATA = "synthetic:shape=8x3x16x16,batches=3,classes=4"
