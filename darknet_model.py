"""The Darknet backbone of YOLOv1 (paper Figure 3) with its ImageNet classifier head.

The network is written down as data: each row of a layer table is one convolution
``("conv", kernel, filters, stride)`` or one ``("maxpool",)`` (2x2, stride 2), and a
single function, :func:`build_layers`, turns any table into modules. YOLOv1, Fast YOLO
and the pretraining network are all built from such tables.

Two building blocks exist for Darknet's released networks (darknet_cfg.py reads them):
:class:`DarknetBatchNorm2d`, batch norm as Darknet computes it, and
:class:`LocallyConnected2d`, the unshared 3x3 layer of ``cfg/yolov1.cfg``.
"""
from __future__ import annotations

import copy

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


class DarknetBatchNorm2d(nn.BatchNorm2d):
    """Batch norm as Darknet computes it, so that its released weights give its numbers.

    Darknet divides by ``sqrt(var) + 1e-6`` (blas.c ``normalize_cpu``), PyTorch by
    ``sqrt(var + eps)`` with eps = 1e-5: for a channel of running variance 1e-6 the two
    differ threefold, and no float32 variance turns one into the other exactly. In eval
    mode this module follows Darknet exactly (the same formula, in Darknet's order: subtract
    the mean, divide, scale, shift); its state dict is BatchNorm2d's, holding Darknet's
    numbers unchanged. In training it is PyTorch's batch norm with eps = 1e-12 (so
    ``sqrt(var + 1e-12)`` equals Darknet's divisor at var = 0 and within 1e-6 / sqrt(var)
    relatively elsewhere) and momentum 0.01 (Darknet's rolling averages, batchnorm_layer.c);
    unlike Darknet, PyTorch normalises a batch by its biased variance.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=1e-12, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        shape = (1, -1, 1, 1)
        x = (x - self.running_mean.view(shape)) / (self.running_var.sqrt().view(shape) + 1e-6)
        return x * self.weight.view(shape) + self.bias.view(shape)


def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution computing ``bn(conv(x))`` in eval mode (inference.fold_batch_norm).

    ``torch.nn.utils.fusion`` folds PyTorch's divisor ``sqrt(var + eps)``; a
    :class:`DarknetBatchNorm2d` divides by ``sqrt(var) + 1e-6``, so it is folded with that
    divisor squared as the variance and no eps (with its eps of 1e-12 the two divisors differ
    by 0.1% at variance 1e-6 and 10% at 1e-10, which the released weights hold)."""
    if not isinstance(bn, DarknetBatchNorm2d):
        return torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    fused = copy.deepcopy(conv)
    var = (bn.running_var.sqrt() + 1e-6).square()
    fused.weight, fused.bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, var, 0.0, bn.weight, bn.bias)
    return fused


def to_channels_last(model: nn.Module) -> nn.Module:
    """Every convolution's weight in the NHWC layout cuDNN and oneDNN prefer, in place.
    ``model.to(memory_format=torch.channels_last)`` would also try the locally connected
    layer's 5-D weight, and fail (yolov1-darknet)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return model


# Converting running variances between the two batch norms (darknet_weights.py when it
# writes a PyTorch-normed model, model.load_backbone when a Darknet backbone goes into one):
# both divide by the same number, ``sqrt(var_torch + eps) == sqrt(var_darknet) + 1e-6``.
def variance_to_darknet(var: torch.Tensor, eps: float) -> torch.Tensor:
    return ((var.double() + eps).sqrt() - 1e-6).square().to(var.dtype)


def variance_from_darknet(var: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact to float rounding where Darknet's divisor is at least sqrt(eps) (variance
    >= ~1e-5 for eps = 1e-5); below, PyTorch's divisor cannot get that small: clamped."""
    return ((var.double().sqrt() + 1e-6).square() - eps).clamp_min(0).to(var.dtype)


class LocallyConnected2d(nn.Module):
    """A convolution whose filters are not shared: each output position has its own.

    ``cfg/yolov1.cfg`` puts one (3x3, 256 filters, stride 1, pad 1) between the last
    convolution and the fully connected layer. The weights are stored as Darknet's
    local_layer.c keeps them, so its ``.weights`` load by a reshape: ``weight`` is
    ``(out_h * out_w, out, in, k, k)`` (one filter bank per position, positions row-major)
    and ``bias`` is ``(out, out_h, out_w)``, one per output value. The forward pass is
    Darknet's: im2col (``F.unfold``: rows ordered channel, kernel row, kernel column, as
    im2col_cpu) and one matrix product per position.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, in_size: tuple[int, int],
                 stride: int = 1, padding: int = 0):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.in_size = tuple(in_size)
        self.out_size = tuple((n + 2 * padding - kernel) // stride + 1 for n in self.in_size)
        positions = self.out_size[0] * self.out_size[1]
        self.weight = nn.Parameter(torch.empty(positions, out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels, *self.out_size))
        nn.init.kaiming_normal_(self.weight.view(positions * out_channels, -1), a=0.1,
                                nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.in_size:
            raise ValueError(f"LocallyConnected2d was built for {self.in_size} inputs, got {tuple(x.shape[-2:])}")
        cols = nn.functional.unfold(x, self.kernel, padding=self.padding, stride=self.stride)
        out = torch.einsum("nkl,lok->nol", cols, self.weight.flatten(2))
        return out.view(x.shape[0], -1, *self.out_size) + self.bias


def conv_block(in_ch: int, out_ch: int, kernel: int, stride: int, batch_norm: bool,
               darknet_bn: bool = False) -> nn.Sequential:
    """Convolution, optional batch norm, leaky ReLU 0.1 (the paper's activation).

    With batch norm the convolution carries no bias (the norm's shift replaces it), as in
    Darknet's cfg files; without it, as in the paper's network, it does. ``darknet_bn``
    makes the norm a :class:`DarknetBatchNorm2d`.
    """
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(DarknetBatchNorm2d(out_ch) if darknet_bn else nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


def build_layers(table, in_channels: int = 3, batch_norm: bool = True,
                 width: float = 1.0, darknet_bn: bool = False) -> tuple[nn.Sequential, int]:
    """Build a layer table into an ``nn.Sequential``; returns it and its output channels."""
    layers, ch = [], in_channels
    for row in table:
        if row[0] == "maxpool":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        _, kernel, filters, stride = row
        out = scaled(filters, width)
        layers.append(conv_block(ch, out, kernel, stride, batch_norm, darknet_bn))
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


HEADS = ("linear", "conv")


class Darknet(nn.Module):
    """The 20-convolution feature extractor, global average pooling and a 1000-way classifier.

    ``features`` is a named submodule: its ``state_dict`` is what YOLOv1 loads
    (``model.YOLOv1.features`` is built from the same table with the same names).
    ``head="linear"`` is the paper's classifier (Section 2.2: average pooling, then a fully
    connected layer); ``head="conv"`` is the released ``cfg/extraction.cfg``'s: a 1x1
    convolution to ``num_classes`` with bias and leaky activation, then average pooling
    (its softmax is left to the loss, as for the linear head). ``forward`` returns scores
    before the softmax.
    """

    def __init__(self, num_classes: int = 1000, batch_norm: bool = True, width: float = 1.0,
                 head: str = "linear", darknet_bn: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.config = {"num_classes": num_classes, "batch_norm": batch_norm, "width": width,
                       "head": head, "darknet_bn": darknet_bn}
        self.features, ch = build_layers(DARKNET_FEATURES, 3, batch_norm, width, darknet_bn)
        if head == "linear":
            last = nn.Linear(ch, num_classes)
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), last)
        else:
            block = conv_block(ch, num_classes, 1, 1, batch_norm=False)
            last = block[0]
            self.classifier = nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        init_weights(self)
        nn.init.normal_(last.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
