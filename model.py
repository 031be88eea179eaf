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

import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from darknet_model import (DARKNET_FEATURES, HEADS, MAXPOOL, Darknet, LocallyConnected2d, build_layers,
                           conv, init_weights, variance_from_darknet)
from utils import UserError, check_state_dict, load_checkpoint, load_state_checked

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
    """Rebuild a model from the ``config`` dict it carried into a checkpoint (a trusted one:
    a checkpoint's goes through :func:`check_config` first, as in :func:`build_checked`)."""
    config = dict(config)
    return build_model(config.pop("name"), **config)


# --------------------------------------------------------------------------- checkpoint configurations
# What a checkpoint's ``model_config`` may hold, checked before anything is built from it:
# a foreign file whose config said S=400 once made the loader allocate 49 TB, a malformed one
# raised a KeyError. Each option: (type, lowest, highest) or (type, allowed values). The
# bounds are far above any real network (the paper's S=7, B=2, C=20, hidden 4096) and far
# below what would exhaust memory before the state dict's shapes are compared.
OPTION_LIMITS = {
    "S": (int, 1, 64), "B": (int, 1, 64), "C": (int, 1, 100_000), "num_classes": (int, 1, 100_000),
    "hidden": (int, 0, 65_536), "local": (int, 0, 65_536), "width": (float, 1 / 1024, 16.0),
    "dropout": (float, 0.0, 1.0), "convs": (int, (8, 9)), "head": (str, HEADS),
    "batch_norm": (bool, (False, True)), "darknet_bn": (bool, (False, True)), "name": (str, MODEL_NAMES),
}
# The options without which a configuration means nothing (the others take the class's defaults,
# as for checkpoints saved before an option existed).
REQUIRED = {"detector": ("name", "S", "B", "C"), "darknet": ("num_classes",)}


def option_names(cls: type) -> set[str]:
    """The keyword options of a network's constructor: what its ``config`` may hold."""
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def check_option(key: str, value, source: str) -> None:
    kind, *limits = OPTION_LIMITS[key]
    if kind is bool:
        ok_type = isinstance(value, bool)
    else:  # an int is a float here; a bool is no number (True would pass as S=1)
        ok_type = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
    if not ok_type:
        raise UserError(f"{source}: model_config {key}={value!r} is of type {type(value).__name__}, "
                        f"not {kind.__name__}")
    if len(limits) == 1:
        if value not in limits[0]:
            raise UserError(f"{source}: model_config {key}={value!r}: must be one of "
                            f"{', '.join(map(repr, limits[0]))}")
    elif not (math.isfinite(value) and limits[0] <= value <= limits[1]):  # NaN fails both
        raise UserError(f"{source}: model_config {key}={value!r}: must be in [{limits[0]:g}, {limits[1]:g}]")


def check_config(config, source: str, kind: str = "detector") -> dict:
    """A checkpoint's ``model_config``, checked option by option (type, range, no unknown
    key) before anything is built from it; ``kind`` "detector" (the registry, by ``name``)
    or "darknet" (the classifier). Returns a copy."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: its model_config is of type {type(config).__name__}, not a dict of options")
    for key in REQUIRED[kind]:
        if key not in config:
            raise UserError(f"{source}: its model_config has no {key!r}")
    if kind == "detector":
        check_option("name", config["name"], source)
    allowed = ({"name"} | option_names(MODELS[config["name"]].cls)) if kind == "detector" else option_names(Darknet)
    for key, value in config.items():
        if key not in allowed:
            what = f"a {config['name']} model" if kind == "detector" else "the Darknet classifier"
            raise UserError(f"{source}: model_config has an unknown option {key!r} for {what}")
        check_option(key, value, source)
    return dict(config)


def build_checked(config, state, source: str, kind: str = "detector") -> nn.Module:
    """The network a checkpoint describes, with its weights: the configuration is checked
    (:func:`check_config`), the network built on the ``meta`` device (no memory), the state
    dict's names, shapes and values compared with it (utils.load_state_checked: finite
    floats only), and only then does the network take the checked tensors as its own.
    Every loader of a checkpoint's network goes through here. In eval mode."""
    config = check_config(config, source, kind)
    try:
        with torch.device("meta"):
            model = model_from_config(config) if kind == "detector" else Darknet(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: its model_config cannot be built: {err}") from None
    load_state_checked(model, state, source, assign=True)
    return model.eval()


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
    if not isinstance(checkpoint, dict):
        raise UserError(f"{source}: holds a {type(checkpoint).__name__}, not a checkpoint or a state dict")
    state = check_state_dict(checkpoint.get("model", checkpoint), source)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features and state and all(k.split(".", 1)[0].isdigit() for k in state):
        features = dict(state)  # a bare ``features`` state dict: keys "0.0.weight", ...
    if not features:
        raise UserError(f"{source}: holds no 'features.*' tensors; is it a Darknet pretraining checkpoint?")
    config = checkpoint.get("model_config", {}) if "model" in checkpoint else {}
    # a pretraining (or converted) classifier's, or a trained detector's whose features are reused
    config = check_config(config, source, "detector" if isinstance(config, dict) and "name" in config
                          else "darknet") if config else {}
    if config.get("batch_norm") is not None and config["batch_norm"] != model.config["batch_norm"]:
        flag = "without --no-batch-norm" if config["batch_norm"] else "with --no-batch-norm"
        raise UserError(f"{source}: its convolutions were trained {'with' if config['batch_norm'] else 'without'} "
                        f"batch norm; build the detector {flag}")
    eps = next((m.eps for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)), None)
    if eps is not None and config.get("darknet_bn", False) and not model.config.get("darknet_bn", False):
        # Below (sqrt(eps) - 1e-6)^2 no PyTorch variance gives Darknet's divisor: those channels
        # are normalised less than in Darknet until training re-estimates the statistics. Said
        # once, not silently (the released extraction.weights holds variances of 1e-10).
        small = sum(int(((v.double().sqrt() + 1e-6).square() < eps).sum()) for k, v in features.items()
                    if k.endswith("running_var") and v.is_floating_point())
        if small:
            warnings.warn(f"{source}: {small} batch-norm channels have a running variance below "
                          f"{(eps ** 0.5 - 1e-6) ** 2:.2g}, which PyTorch's batch norm (eps {eps:g}) cannot "
                          "reproduce: they differ from Darknet's numbers until training updates them "
                          "(build with darknet_bn for Darknet's formula)", stacklevel=2)
        features = {k: variance_from_darknet(v, eps) if k.endswith("running_var") else v
                    for k, v in features.items()}
    load_state_checked(model.features, features, source)


def load_detector(path, device="cpu") -> tuple[nn.Module, list[str]]:
    """A trained detector from a train.py checkpoint, in eval mode, and its class names."""
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
    if kind != "yolo" or "model_config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not a train.py checkpoint (it holds {kind!r})")
    model = build_checked(ckpt["model_config"], ckpt["model"], str(path))
    names = ckpt.get("class_names") or [str(i) for i in range(model.C)]
    if not isinstance(names, (list, tuple)) or len(names) != model.C or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: its class_names are not {model.C} strings (C={model.C})")
    return model.to(device).eval(), list(names)
