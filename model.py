"""YOLOv1 (paper Figure 3) and Fast YOLO.

``forward(x)`` returns ``(N, S*S*(C+5B))``; per cell the values are
``[C class scores | conf, x, y, sqrt_w, sqrt_h (for each of the B predictors)]``, raw,
with no sigmoid: the paper's last layer is linear and the loss is sum-squared error.
The input side must be ``64 * S`` (448 for S = 7): the network downsamples by 64.
"""
from __future__ import annotations

import torch
from torch import nn

from darknet_model import DARKNET_FEATURES, MAXPOOL, build_layers, conv, init_weights
from utils import UserError, load_checkpoint, load_state_checked

# Figure 3 after the 20 pretrained layers: the last two convolutions of block 5 (the
# second with stride 2) and the two of block 6. Randomly initialised (Section 2.2).
YOLO_EXTRA = [conv(3, 1024), conv(3, 1024, 2), conv(3, 1024), conv(3, 1024)]

# Fast YOLO (Section 2, "9 convolutional layers instead of 24 ... fewer filters"). The
# released yolov1-tiny.cfg has 3x3 convolutions of 16..512 filters each followed by a
# 2x2 maxpool (448 -> 7), then 3x3x1024 and 3x3x256: eight. A second 3x3x1024 makes the
# paper's nine. As in that cfg, one fully connected layer maps straight to the output.
FAST_YOLO = [
    *[layer for f in (16, 32, 64, 128, 256, 512) for layer in (conv(3, f), MAXPOOL)],
    conv(3, 1024), conv(3, 1024), conv(3, 256),
]

MODEL_NAMES = ("yolov1", "fast")


class GridDetector(nn.Module):
    """What YOLOv1 and Fast YOLO share: an S x S grid, the input side it needs (the
    network downsamples by 64) and ``forward`` = ``head(trunk(x))``."""

    S: int

    @property
    def input_size(self) -> int:
        return 64 * self.S

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_size, self.S)
        return self.head(self.trunk(x))


class YOLOv1(GridDetector):
    """24 convolutions and 2 fully connected layers; defaults are the paper's network
    with batch norm (about 271.7 M parameters without batch norm, hidden 4096)."""

    def __init__(self, S: int = 7, B: int = 2, C: int = 20, hidden: int = 4096,
                 batch_norm: bool = True, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        self.S, self.B, self.C = S, B, C
        self.config = {"name": "yolov1", "S": S, "B": B, "C": C, "hidden": hidden,
                       "batch_norm": batch_norm, "width": width, "dropout": dropout}
        self.features, ch = build_layers(DARKNET_FEATURES, 3, batch_norm, width)
        self.extra, ch = build_layers(YOLO_EXTRA, ch, batch_norm, width)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(S * S * ch, hidden),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, S * S * (C + 5 * B)),  # linear: no activation (Section 2.2)
        )
        init_weights(self)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.features(x))


class FastYOLO(GridDetector):
    """Fast YOLO: nine convolutions, then one linear layer to the S x S x (C + 5B) output."""

    def __init__(self, S: int = 7, B: int = 2, C: int = 20, batch_norm: bool = True,
                 width: float = 1.0):
        super().__init__()
        self.S, self.B, self.C = S, B, C
        self.config = {"name": "fast", "S": S, "B": B, "C": C,
                       "batch_norm": batch_norm, "width": width}
        self.features, ch = build_layers(FAST_YOLO, 3, batch_norm, width)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(S * S * ch, S * S * (C + 5 * B)))
        init_weights(self)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def check_input(x: torch.Tensor, size: int, S: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (size, size):
        raise ValueError(f"input must be (N, 3, {size}, {size}) for S={S} (64*S); got {tuple(x.shape)}")


def build_model(name: str = "yolov1", **config) -> nn.Module:
    """Build a detector by name (``yolov1`` or ``fast``) from keyword options."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name == "fast":
        # yolov1-tiny.cfg maps the features straight to the output: no hidden layer, no dropout.
        config = {k: v for k, v in config.items() if k not in ("hidden", "dropout")}
    return (YOLOv1 if name == "yolov1" else FastYOLO)(**config)


def model_from_config(config: dict) -> nn.Module:
    """Rebuild a model from the ``config`` dict it carried into a checkpoint."""
    config = dict(config)
    return build_model(config.pop("name"), **config)


def load_backbone(model: nn.Module, checkpoint: dict, source: str = "backbone checkpoint") -> None:
    """Copy the 20 pretrained Darknet convolutions from a pretraining checkpoint into YOLOv1.

    ``checkpoint`` is what darknet_train.py saves (its ``"model"`` holds the Darknet
    state dict) or a bare ``features`` state dict.
    """
    if not isinstance(model, YOLOv1):
        raise UserError("only the full YOLOv1 is built on the Darknet backbone; Fast YOLO has none")
    state = checkpoint.get("model", checkpoint)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features and state and all(k.split(".", 1)[0].isdigit() for k in state):
        features = dict(state)  # a bare ``features`` state dict: keys "0.0.weight", ...
    if not features:
        raise UserError(f"{source}: holds no 'features.*' tensors; is it a Darknet pretraining checkpoint?")
    load_state_checked(model.features, features, source)


def load_detector(path, device="cpu") -> tuple[nn.Module, list[str]]:
    """A trained detector from a train.py checkpoint, in eval mode, and its class names."""
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
    if kind != "yolo" or "model_config" not in ckpt:
        raise UserError(f"{path}: not a train.py checkpoint (it holds {kind!r})")
    model = model_from_config(ckpt["model_config"])
    load_state_checked(model, ckpt["model"], str(path))
    names = list(ckpt.get("class_names") or [str(i) for i in range(model.C)])
    return model.to(device).eval(), names
