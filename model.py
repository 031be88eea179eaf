"""YOLOv1 (paper Figure 3), Fast YOLO, and Darknet's released variants of both.

``forward(x)`` returns ``(N, S*S*(C+5B))``; per cell the values are
``[C class scores | conf, x, y, sqrt_w, sqrt_h (for each of the B predictors)]``, raw,
with no sigmoid: the paper's last layer is linear and the loss is sum-squared error.
Darknet's detection layer orders the same numbers differently (all cells' class scores,
then all confidences, then all boxes): darknet_weights.py permutes the last layer's rows
when it reads or writes a ``.weights`` file, so nothing downstream sees Darknet's order.
The input side must be ``64 * S`` (448 for S = 7): the network downsamples by 64.

:data:`MODELS` is the registry of networks by name; ``build_model(name, **options)``
builds one, and a checkpoint's ``model_config`` (``model.config``) rebuilds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from darknet_model import (DARKNET_FEATURES, MAXPOOL, LocallyConnected2d, build_layers, conv,
                           init_weights, variance_from_darknet)
from utils import UserError, load_checkpoint, load_state_checked

# Figure 3 after the 20 pretrained layers: the last two convolutions of block 5 (the
# second with stride 2) and the two of block 6. Randomly initialised (Section 2.2).
YOLO_EXTRA = [conv(3, 1024), conv(3, 1024, 2), conv(3, 1024), conv(3, 1024)]


def fast_yolo_table(convs: int = 9) -> list:
    """Fast YOLO (Section 2, "9 convolutional layers instead of 24 ... fewer filters").

    The released ``cfg/yolov1-tiny.cfg`` has 3x3 convolutions of 16..512 filters each
    followed by a 2x2 maxpool (448 -> 7), then 3x3x1024 and 3x3x256: eight (``convs=8``).
    The paper's nine (``convs=9``, the default) are this project's reading: a second
    3x3x1024. As in that cfg, one fully connected layer maps straight to the output.
    """
    if convs not in (8, 9):
        raise ValueError(f"Fast YOLO has 8 (yolov1-tiny.cfg) or 9 (the paper) convolutions, not {convs}")
    pooled = [layer for f in (16, 32, 64, 128, 256, 512) for layer in (conv(3, f), MAXPOOL)]
    return pooled + [conv(3, 1024)] * (convs - 7) + [conv(3, 256)]


FAST_YOLO = fast_yolo_table(9)


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
    with batch norm (about 271.7 M parameters without batch norm, hidden 4096).

    Darknet's released ``cfg/yolov1.cfg`` (registry name ``yolov1-darknet``) replaces the
    hidden fully connected layer with a locally connected one: ``local=256`` (3x3,
    stride 1, leaky, see :class:`darknet_model.LocallyConnected2d`) and ``hidden=0``, with
    B = 3 and ``darknet_bn`` (Darknet's batch norm formula). The head is then
    local -> leaky -> dropout -> fully connected, as in that cfg.
    """

    def __init__(self, S: int = 7, B: int = 2, C: int = 20, hidden: int = 4096,
                 batch_norm: bool = True, width: float = 1.0, dropout: float = 0.5,
                 local: int = 0, darknet_bn: bool = False):
        super().__init__()
        self.S, self.B, self.C = S, B, C
        self.config = {"name": "yolov1", "S": S, "B": B, "C": C, "hidden": hidden,
                       "batch_norm": batch_norm, "width": width, "dropout": dropout,
                       "local": local, "darknet_bn": darknet_bn}
        self.features, ch = build_layers(DARKNET_FEATURES, 3, batch_norm, width, darknet_bn)
        self.extra, ch = build_layers(YOLO_EXTRA, ch, batch_norm, width, darknet_bn)
        self.head = nn.Sequential(*self.head_layers(ch))
        init_weights(self)

    def head_layers(self, ch: int) -> list[nn.Module]:
        """Without ``local`` this is the paper's head, module for module as before (the
        state dict keys of older checkpoints): flatten, [hidden, leaky], dropout, output."""
        S, out = self.S, self.S * self.S * (self.C + 5 * self.B)
        local, hidden, dropout = self.config["local"], self.config["hidden"], self.config["dropout"]
        layers: list[nn.Module] = []
        if local:
            layers += [LocallyConnected2d(ch, local, 3, (S, S), padding=1), nn.LeakyReLU(0.1, inplace=True)]
            ch = local
        layers.append(nn.Flatten())
        features = S * S * ch
        if hidden:
            layers += [nn.Linear(features, hidden), nn.LeakyReLU(0.1, inplace=True)]
            features = hidden
        layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(features, out))  # linear: no activation (Section 2.2)
        return layers

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.features(x))


class FastYOLO(GridDetector):
    """Fast YOLO: nine convolutions (eight with ``convs=8``, Darknet's yolov1-tiny.cfg),
    then one linear layer to the S x S x (C + 5B) output."""

    def __init__(self, S: int = 7, B: int = 2, C: int = 20, batch_norm: bool = True,
                 width: float = 1.0, convs: int = 9, darknet_bn: bool = False):
        super().__init__()
        self.S, self.B, self.C = S, B, C
        self.config = {"name": "fast", "S": S, "B": B, "C": C, "batch_norm": batch_norm,
                       "width": width, "convs": convs, "darknet_bn": darknet_bn}
        self.features, ch = build_layers(fast_yolo_table(convs), 3, batch_norm, width, darknet_bn)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(S * S * ch, S * S * (C + 5 * B)))
        init_weights(self)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@dataclass(frozen=True)
class ModelEntry:
    """One network of the registry: the class that builds it, the options that make it this
    network (explicit options win), its downsampling (input side = stride * S) and what it is."""

    cls: type
    defaults: dict = field(default_factory=dict)
    stride: int = 64
    about: str = ""


# A new network is one entry here (and, to read and write Darknet files of it, nothing
# else: darknet_cfg.py matches a cfg against every entry).
MODELS: dict[str, ModelEntry] = {
    "yolov1": ModelEntry(YOLOv1, {}, about="the paper's YOLOv1 (Figure 3): 24 convolutions, "
                         "fully connected 4096, B=2; batch norm unless batch_norm=False"),
    "fast": ModelEntry(FastYOLO, {}, about="Fast YOLO as the paper describes it: nine 3x3 "
                       "convolutions, one fully connected layer"),
    "yolov1-darknet": ModelEntry(YOLOv1, {"B": 3, "hidden": 0, "local": 256, "darknet_bn": True},
                                 about="Darknet's released cfg/yolov1.cfg exactly: 24 convolutions, "
                                       "a locally connected 3x3x256 layer, B=3"),
    "yolov1-tiny": ModelEntry(FastYOLO, {"convs": 8, "darknet_bn": True},
                              about="Darknet's released cfg/yolov1-tiny.cfg exactly: eight convolutions"),
}
MODEL_NAMES = tuple(MODELS)
# Options that only some classes take: build_model drops them for the others (train.py
# passes the paper network's hidden size and dropout whatever --model is).
_YOLOV1_ONLY = ("hidden", "dropout", "local")


def check_input(x: torch.Tensor, size: int, S: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (size, size):
        raise ValueError(f"input must be (N, 3, {size}, {size}) for S={S} (64*S); got {tuple(x.shape)}")


def build_model(name: str = "yolov1", **config) -> nn.Module:
    """Build a detector of the registry by name from keyword options (``MODELS``)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    entry = MODELS[name]
    if entry.cls is not YOLOv1:
        # yolov1-tiny.cfg maps the features straight to the output: no hidden layer, no dropout.
        config = {k: v for k, v in config.items() if k not in _YOLOV1_ONLY}
    model = entry.cls(**(entry.defaults | config))
    model.config["name"] = name
    return model


def model_from_config(config: dict) -> nn.Module:
    """Rebuild a model from the ``config`` dict it carried into a checkpoint."""
    config = dict(config)
    return build_model(config.pop("name"), **config)


def load_backbone(model: nn.Module, checkpoint: dict, source: str = "backbone checkpoint") -> None:
    """Copy the 20 pretrained Darknet convolutions from a pretraining checkpoint into YOLOv1.

    ``checkpoint`` is what darknet_train.py saves (its ``"model"`` holds the Darknet
    state dict), what ``darknet_convert.py`` makes of ``extraction(.conv).weights``, or a
    bare ``features`` state dict. A backbone in Darknet's batch norm (``darknet_bn`` in its
    ``model_config``) going into a PyTorch-normed YOLOv1 has its running variances converted
    (darknet_model.variance_from_darknet): the same normalisation, to float rounding.
    """
    if not isinstance(model, YOLOv1):
        raise UserError("only the full YOLOv1 is built on the Darknet backbone; Fast YOLO has none")
    state = checkpoint.get("model", checkpoint)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features and state and all(k.split(".", 1)[0].isdigit() for k in state):
        features = dict(state)  # a bare ``features`` state dict: keys "0.0.weight", ...
    if not features:
        raise UserError(f"{source}: holds no 'features.*' tensors; is it a Darknet pretraining checkpoint?")
    config = checkpoint.get("model_config") if isinstance(checkpoint.get("model_config"), dict) else {}
    if config.get("batch_norm") is not None and config["batch_norm"] != model.config["batch_norm"]:
        flag = "without --no-batch-norm" if config["batch_norm"] else "with --no-batch-norm"
        raise UserError(f"{source}: its convolutions were trained {'with' if config['batch_norm'] else 'without'} "
                        f"batch norm; build the detector {flag}")
    eps = next((m.eps for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)), None)
    if eps is not None and config.get("darknet_bn", False) and not model.config.get("darknet_bn", False):
        features = {k: variance_from_darknet(v, eps) if k.endswith("running_var") else v
                    for k, v in features.items()}
    load_state_checked(model.features, features, source)


def load_detector(path, device="cpu") -> tuple[nn.Module, list[str]]:
    """A trained detector from a train.py checkpoint, in eval mode, and its class names."""
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
    if kind != "yolo" or "model_config" not in ckpt:
        raise UserError(f"{path}: not a train.py checkpoint (it holds {kind!r})")
    config = ckpt["model_config"]
    if not isinstance(config, dict) or config.get("name") not in MODELS:
        name = config.get("name") if isinstance(config, dict) else None
        raise UserError(f"{path}: its model_config names no known model ({name!r}); "
                        f"known: {', '.join(MODEL_NAMES)}")
    try:
        model = model_from_config(config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: its model_config cannot be built: {err}") from None
    load_state_checked(model, ckpt["model"], str(path))
    names = list(ckpt.get("class_names") or [str(i) for i in range(model.C)])
    return model.to(device).eval(), names
