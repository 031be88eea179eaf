"""The Darknet backbone of YOLOv1 (paper Figure 3) with its ImageNet classifier head.

The network is written down as data: each row of a layer table is one convolution
``("conv", kernel, filters, stride)`` or one ``("maxpool",)`` (2x2, stride 2), and a
single function, :func:`build_layers`, turns any table into modules. YOLOv1, Fast YOLO
and the pretraining network are all built from such tables.
"""
from __future__ import annotations

import torch
from torch import nn

MAXPOOL = ("maxpool",)


def conv(kernel: int, filters: int, stride: int = 1) -> tuple:
    return ("conv", kernel, filters, stride)


# The first 20 convolutional layers of Figure 3: blocks 1-4 and the two 1x1/3x3 pairs of
# block 5. This is the part pretrained on ImageNet at 224x224 (paper Section 2.2).
DARKNET_FEATURES = [
    conv(7, 64, 2), MAXPOOL,                                               # block 1
    conv(3, 192), MAXPOOL,                                                 # block 2
    conv(1, 128), conv(3, 256), conv(1, 256), conv(3, 512), MAXPOOL,       # block 3
    *[conv(1, 256), conv(3, 512)] * 4, conv(1, 512), conv(3, 1024), MAXPOOL,  # block 4
    *[conv(1, 512), conv(3, 1024)] * 2,                                    # block 5 (first part)
]


def scaled(filters: int, width: float) -> int:
    """Filters after the width multiplier (tiny networks for tests and CPU demos)."""
    return max(1, int(round(filters * width)))


def conv_block(in_ch: int, out_ch: int, kernel: int, stride: int, batch_norm: bool) -> nn.Sequential:
    """Convolution, optional batch norm, leaky ReLU 0.1 (the paper's activation).

    With batch norm the convolution carries no bias (the norm's shift replaces it), as in
    Darknet's cfg files; without it, as in the paper's network, it does.
    """
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


def build_layers(table, in_channels: int = 3, batch_norm: bool = True,
                 width: float = 1.0) -> tuple[nn.Sequential, int]:
    """Build a layer table into an ``nn.Sequential``; returns it and its output channels."""
    layers, ch = [], in_channels
    for row in table:
        if row[0] == "maxpool":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        _, kernel, filters, stride = row
        out = scaled(filters, width)
        layers.append(conv_block(ch, out, kernel, stride, batch_norm))
        ch = out
    return nn.Sequential(*layers), ch


def init_weights(module: nn.Module) -> None:
    """Kaiming init for leaky-ReLU convolutions and linears, unit batch norm."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Darknet(nn.Module):
    """The 20-convolution feature extractor, global average pooling and a 1000-way classifier.

    ``features`` is a named submodule: its ``state_dict`` is what YOLOv1 loads
    (``model.YOLOv1.features`` is built from the same table with the same names).
    """

    def __init__(self, num_classes: int = 1000, batch_norm: bool = True, width: float = 1.0):
        super().__init__()
        self.config = {"num_classes": num_classes, "batch_norm": batch_norm, "width": width}
        self.features, ch = build_layers(DARKNET_FEATURES, 3, batch_norm, width)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes))
        init_weights(self)
        nn.init.normal_(self.classifier[-1].weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
