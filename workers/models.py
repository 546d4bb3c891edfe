"""The models psq's trainers and benchmarks train."""

from __future__ import annotations

from torch import nn

from workers.settings import MODEL_NAMES


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def small_resnet(classes: int = 10, width: int = 16, inputs: int = 3) -> nn.Module:
    """A small ResNet for 32x32 inputs: a stem and three stages of two basic blocks (15 BN layers)."""
    stem = nn.Conv2d(inputs, width, 3, 1, 1, bias=False)
    layers: list[nn.Module] = [stem, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    channels = width
    for stage, out in enumerate((width, 2 * width, 4 * width)):
        for block in range(2):
            layers.append(BasicBlock(channels, out, 2 if stage and not block else 1))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def digits_cnn(classes: int = 10, width: int = 32) -> nn.Module:
    """A small 3-conv CNN with batch norm for 1x8x8 digit images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def digits_resnet(classes: int = 10) -> nn.Module:
    """:func:`small_resnet` on the 1x8x8 digits, upsampled to 32x32 inside the model."""
    return nn.Sequential(nn.Upsample(size=32, mode="bilinear", align_corners=False), small_resnet(classes, inputs=1))


MODELS = dict(zip(MODEL_NAMES, (digits_cnn, digits_resnet), strict=True))
