"""Darknet ``.weights`` files for the project's networks: which module is which cfg layer, and
the floats in between.

A ``.weights`` file is a header (parser.c ``load_weights_upto``: ``major, minor, revision``
as 32-bit ints, then ``seen``, the images trained on, as a 64-bit size_t when
``major*10 + minor >= 2`` and both are below 1000, else as a 32-bit int) and then, layer
after layer in cfg order, raw little-endian float32s:

* convolutional: biases (n), with ``batch_normalize`` the scales, rolling means and rolling
  variances (n each), then the weights (n, c, size, size): PyTorch's Conv2d layout.
  With batch norm the "biases" are the norm's shift (the convolution has none).
* connected: biases (out), weights (out, in): nn.Linear's layout. A header whose major or
  minor is above 1000 marks files whose connected weights are stored transposed (in, out).
* local: biases (n, out_h, out_w), weights (out_h*out_w, n, c, size, size): the layout of
  :class:`darknet_model.LocallyConnected2d`.
* the other layers hold nothing.

:func:`model_cfg` describes a project network as Darknet layers (it writes the cfg text
and parses it back with darknet_cfg.py, so a description is always a cfg Darknet reads) and
pairs each layer with its modules; :func:`load_weights` and :func:`save_weights` move the
floats. The detection layer's order differs from the project's (model.py): the last
connected layer's rows are permuted on the way in and back on the way out.
"""
from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from darknet_cfg import Cfg, Layer, format_cfg, parse_cfg
from darknet_model import DarknetBatchNorm2d, LocallyConnected2d, variance_from_darknet, variance_to_darknet
from model import GridDetector
from utils import UserError


@dataclass
class Unit:
    """The modules that compute one Darknet layer, and that layer once parsed."""

    kind: str
    params: dict
    modules: dict = field(default_factory=dict)
    layer: Layer | None = None
    next_kind: str = ""  # the Darknet layer after this one ("detection": permute on the way)


# --------------------------------------------------------------------------- model -> layers
def walk(model: nn.Module) -> list[Unit]:
    """The model's leaf modules, in order, grouped into Darknet layers.

    The project's networks are chains registered in forward order (features, extra, head;
    features, classifier): a convolution takes the batch norm and leaky ReLU after it, a
    locally connected or linear layer its leaky ReLU; Flatten is implicit in Darknet.
    """
    units: list[Unit] = []
    for m in (m for m in model.modules() if not list(m.children())):
        last = units[-1] if units else None
        if isinstance(m, nn.Conv2d):
            units.append(conv_unit(m))
        elif isinstance(m, nn.BatchNorm2d) and last and last.kind == "convolutional" \
                and "bn" not in last.modules and last.modules["conv"].bias is None \
                and "act" not in last.modules:
            last.modules["bn"] = m
            last.params["batch_normalize"] = 1
        elif isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 and last \
                and last.kind in ("convolutional", "local", "connected") and "act" not in last.modules:
            last.modules["act"] = m
            last.params["activation"] = "leaky"
        elif isinstance(m, nn.MaxPool2d):
            units.append(maxpool_unit(m))
        elif isinstance(m, LocallyConnected2d):
            units.append(Unit("local", {"filters": m.bias.shape[0], "size": m.kernel, "stride": m.stride,
                                        "pad": m.padding, "activation": "linear"}, {"local": m}))
        elif isinstance(m, nn.Linear):
            units.append(Unit("connected", {"output": m.out_features, "activation": "linear"}, {"linear": m}))
        elif isinstance(m, nn.Dropout):
            if m.p > 0:  # Darknet's dropout with probability 0 would be the identity too
                units.append(Unit("dropout", {"probability": m.p}))
        elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            units.append(Unit("avgpool", {}))
        elif not isinstance(m, nn.Flatten):
            raise UserError(f"{type(m).__name__} ({m}) has no Darknet layer of the yolov1 family; "
                            "this model cannot be written as a cfg")
    return units


def conv_unit(m: nn.Conv2d) -> Unit:
    k, s, p = m.kernel_size[0], m.stride[0], m.padding
    if m.kernel_size != (k, k) or m.stride != (s, s) or not isinstance(p, tuple) or p != (p[0], p[0]) \
            or m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros":
        raise UserError(f"{m} has no Darknet equivalent (square kernel and stride, symmetric zero "
                        "padding, no groups or dilation)")
    return Unit("convolutional", {"filters": m.out_channels, "size": k, "stride": s, "padding": p[0],
                                  "batch_normalize": 0, "activation": "linear"}, {"conv": m})


def maxpool_unit(m: nn.MaxPool2d) -> Unit:
    k, s = m.kernel_size, m.stride
    if not (isinstance(k, int) and isinstance(s, int)) or m.padding != 0 or m.dilation != 1 or m.ceil_mode:
        raise UserError(f"{m} has no Darknet equivalent (square window, no padding, dilation or ceil_mode)")
    return Unit("maxpool", {"size": k, "stride": s})


def tail_layers(model: nn.Module) -> list[Layer]:
    """What ends the cfg: the detection layer of a detector, a softmax after a classifier."""
    if isinstance(model, GridDetector):
        return [Layer("detection", {"classes": model.C, "num": model.B, "side": model.S},
                      extra={"rescore": 1, "jitter": 0.2, "object_scale": 1, "noobject_scale": 0.5,
                             "class_scale": 1, "coord_scale": 5})]  # yolov1.cfg's loss settings
    return [Layer("softmax", {})]


def model_cfg(model: nn.Module, input_size: int | None = None, name: str = "<model>") -> tuple[Cfg, list[Unit]]:
    """The cfg of ``model`` (parsed back, with shapes and weight counts) and its units.

    ``input_size`` is a detector's own (64 * S) unless given; a classifier needs one.
    """
    size = input_size or getattr(model, "input_size", None)
    if not size:
        raise UserError("a classifier's cfg needs an input size")
    units = walk(model)
    layers = [Layer(u.kind, u.params) for u in units] + tail_layers(model)
    cfg = parse_cfg(format_cfg((3, size, size), layers), name)
    for unit, layer, following in zip(units, cfg.layers, cfg.layers[1:]):
        unit.layer, unit.next_kind = layer, following.kind
        check_unit_shapes(unit)
    return cfg, units


def check_unit_shapes(unit: Unit) -> None:
    """The modules fit the shapes Darknet computes (a network that does not would be a bug)."""
    layer, m = unit.layer, unit.modules
    c, h, w = layer.in_shape
    if unit.kind == "convolutional":
        got, want = m["conv"].in_channels, c
    elif unit.kind == "connected":
        got, want = m["linear"].in_features, c * max(h, 1) * max(w, 1)
    elif unit.kind == "local":
        got, want = (m["local"].weight.shape[2], *m["local"].in_size), (c, h, w)
    else:
        return
    if got != want:
        raise UserError(f"{layer.title()}: the module takes {got}, Darknet's layer gets {want}")


# --------------------------------------------------------------------------- tensors in file order
def detection_permutation(S: int, B: int, C: int) -> torch.Tensor:
    """``project = darknet[perm]`` for one image's output (detection_layer.c's indexing).

    Darknet: class c of cell i at ``i*C + c``; confidence of box b at ``S*S*C + i*B + b``;
    its x, y, sqrt w, sqrt h at ``S*S*(C+B) + (i*B + b)*4 + k``. Project: cell i's
    ``C + 5B`` values together, ``[classes | conf, x, y, sqrt_w, sqrt_h per box]``.
    Cells are row-major in both (i = row * S + column; x is offset by the column).
    """
    cells = torch.arange(S * S).view(-1, 1)
    classes = cells * C + torch.arange(C)
    boxes = cells * B + torch.arange(B)                                        # (S*S, B)
    conf = S * S * C + boxes
    coords = S * S * (C + B) + boxes.unsqueeze(-1) * 4 + torch.arange(4)      # (S*S, B, 4)
    per_box = torch.cat((conf.unsqueeze(-1), coords), -1).flatten(1)          # (S*S, 5B)
    return torch.cat((classes, per_box), 1).flatten()


def unit_tensors(unit: Unit) -> list[tuple[str, torch.Tensor]]:
    """The unit's tensors in the order the file holds them, as (role, tensor)."""
    m = unit.modules
    if unit.kind == "convolutional":
        bn = m.get("bn")
        if bn is None:
            return [("bias", m["conv"].bias), ("weight", m["conv"].weight)]
        return [("bias", bn.bias), ("scale", bn.weight), ("mean", bn.running_mean),
                ("variance", bn.running_var), ("weight", m["conv"].weight)]
    if unit.kind == "local":
        return [("bias", m["local"].bias), ("weight", m["local"].weight)]
    if unit.kind == "connected":
        role = "detection" if unit.next_kind == "detection" else ""
        return [(f"{role} bias".strip(), m["linear"].bias), (f"{role} weight".strip(), m["linear"].weight)]
    return []


def pairs(units: list[Unit]):
    """(unit, its tensors) for each unit that holds weights, in file order."""
    for unit in units:
        tensors = unit_tensors(unit)
        if tensors:
            yield unit, tensors


# --------------------------------------------------------------------------- header
@dataclass
class Header:
    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def transposed(self) -> bool:
        return self.major > 1000 or self.minor > 1000

    @property
    def size(self) -> int:  # 64-bit seen from version 0.2 on, as load_weights_upto reads it
        return 20 if self.major * 10 + self.minor >= 2 and not self.transposed else 16


def read_header(path: Path, data: bytes) -> Header:
    if len(data) < 16:
        raise UserError(f"{path}: {len(data)} bytes, shorter than a Darknet weights header (16 or 20)")
    header = Header(*struct.unpack("<3i", data[:12]))
    known = header.transposed or (header.major == 0 and 0 <= header.minor <= 2 and header.revision >= 0)
    if not known:
        raise UserError(f"{path}: weights header version {header.major}.{header.minor}.{header.revision} is "
                        "not one Darknet's loader knows (0.0 to 0.2, or the transposed flag: major or "
                        "minor above 1000); is it a Darknet weights file?")
    if len(data) < header.size:
        raise UserError(f"{path}: {len(data)} bytes, shorter than its {header.size}-byte header")
    header.seen = struct.unpack("<Q" if header.size == 20 else "<i", data[12:header.size])[0]
    return header


# --------------------------------------------------------------------------- reading
def check_count(path, available: int, cfg: Cfg, layers: list[Layer], what: str = "") -> None:
    """One line giving both counts and the layer where the floats run out (or the surplus)."""
    total = sum(layer.n_weights for layer in layers)
    if available == total:
        return
    head = f"{path}: holds {available} floats of weights, {cfg.path}{what} needs {total}"
    if available < total:
        start = 0
        for index, layer in enumerate(layers):
            if start + layer.n_weights > available:
                raise UserError(f"{head}: they run out in layer {index} {layer.title()} "
                                f"({cfg.where(layer)}), which needs floats {start} to {start + layer.n_weights}")
            start += layer.n_weights
    last = [(i, layer) for i, layer in enumerate(layers) if layer.n_weights][-1]
    raise UserError(f"{head}: {available - total} are left over after its last layer with weights, "
                    f"layer {last[0]} ({cfg.where(last[1])}); are they the weights of another cfg?")


def open_weights(path) -> tuple[Header, np.ndarray]:
    """The header and the floats after it (memory-mapped: a 789 MB file is not copied twice)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    with open(path, "rb") as f:
        header = read_header(path, f.read(20))
    body = path.stat().st_size - header.size
    if body % 4:
        raise UserError(f"{path}: {body} bytes after the {header.size}-byte header is not a whole number "
                        "of float32s; truncated?")
    floats = np.memmap(path, dtype="<f4", mode="r", offset=header.size, shape=(body // 4,)) if body else \
        np.zeros(0, dtype="<f4")
    return header, floats


def load_weights(model: nn.Module, units: list[Unit], path, source: Cfg, layers: list[Layer] | None = None,
                 what: str = "") -> Header:
    """Fill the tensors of ``units`` (``model_cfg``'s, or the first of them) from a weights
    file, which must hold exactly the floats of ``layers`` of the cfg it came with
    (``source``; all its layers unless given: the first ones for a file that Darknet's
    ``partial`` cut). Floats after the units' are not read. Returns the header.
    """
    header, floats = open_weights(path)
    layers = source.layers if layers is None else layers
    try:
        check_count(path, len(floats), source, layers, what)
    except UserError as err:
        if abs(len(floats) - sum(layer.n_weights for layer in layers)) != 1:
            raise
        seen = "64-bit" if header.size == 20 else "32-bit"  # one float is the 4 bytes between the two
        raise UserError(f"{err} (exactly one float off: its version {header.major}.{header.minor} header "
                        f"says 'seen' is {seen}; was it written with the other size?)") from None
    S, B, C = (getattr(model, k, 0) for k in "SBC")
    position, filled = 0, set()
    with torch.no_grad():
        for unit, tensors in pairs(units):
            for role, tensor in tensors:
                count = tensor.numel()
                values = torch.from_numpy(np.array(floats[position:position + count]))
                if role == "variance":
                    check_variances(values, path, source, units.index(unit), position)
                position += count
                tensor.copy_(from_file(role, values, tensor, header, unit, (S, B, C)))
                filled.add(id(tensor))
    # Every tensor of these layers now comes from the file (the converter builds the model
    # without initialising it): one the mapping missed would be garbage, so fail loudly.
    for unit in units:
        for module in unit.modules.values():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if name != "num_batches_tracked" and id(tensor) not in filled:
                    raise RuntimeError(f"{unit.layer.title()}: {name} was not read from the file")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    return header


def check_variances(values: torch.Tensor, path, source: Cfg, index: int, position: int) -> None:
    """Rolling variances are never negative (Darknet's normalize_cpu takes their square root:
    a negative one makes every output NaN). Where a file of the right length holds another
    cfg's floats, or is shifted or corrupt, these slots hold weights, about half of them
    negative: refuse it here rather than convert it into a network that outputs NaN."""
    negative = values < 0
    if negative.any():
        layer = source.layers[index]
        raise UserError(f"{path}: layer {index} {layer.title()} ({source.where(layer)}): "
                        f"{int(negative.sum())} of its {values.numel()} rolling variances (floats {position} "
                        f"to {position + values.numel()}) are negative, e.g. {values[negative][0].item():.3g}; "
                        "the file's floats are not this cfg's layers (weights of another cfg with the same "
                        "count?) or the file is corrupt")


def check_outputs(model: nn.Module, units: list[Unit], source: Cfg, path, upto: int | None = None) -> None:
    """Run the network just read (its first ``upto`` units) on one image of random pixels: a file
    whose floats are finite but not this cfg's (another network's of the same length, floats
    shifted) gives NaN or infinite outputs, which would otherwise only show later as a
    detector that finds nothing. Names the first layer whose output is not finite."""
    chosen = units if upto is None else units[:upto]
    modules = [(i, list(u.modules.values())[-1]) for i, u in enumerate(chosen) if u.modules]  # after its activation
    bad: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, i=i: bad.append(i) if not bad and
                                     not torch.isfinite(out).all() else None) for i, m in modules]
    x = torch.rand(1, *source.input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            (model.features if upto is not None else model).eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    if bad:
        layer = source.layers[bad[0]]
        raise UserError(f"{path}: with these weights layer {bad[0]} {layer.title()} ({source.where(layer)}) "
                        "computes NaN or infinite values from an image of random pixels; the file's floats are not "
                        "this cfg's layers (weights of another cfg with the same count?) or the file is corrupt")


def from_file(role: str, values: torch.Tensor, tensor: torch.Tensor, header: Header, unit: Unit, sbc):
    """File floats -> the tensor's values (transposed, permuted or converted where needed)."""
    if role.endswith("weight") and unit.kind == "connected" and header.transposed:
        values = values.view(tensor.shape[1], tensor.shape[0]).t()  # load_connected_weights' transpose
    values = values.reshape(tensor.shape)
    if role.startswith("detection"):
        values = values[detection_permutation(*sbc)]
    if role == "variance" and not isinstance(unit.modules["bn"], DarknetBatchNorm2d):
        values = variance_from_darknet(values, unit.modules["bn"].eps)
    return values


def to_file(role: str, tensor: torch.Tensor, unit: Unit, sbc) -> torch.Tensor:
    """The tensor's values as the file holds them (the inverse of :func:`from_file`)."""
    values = tensor.detach().float().cpu()
    if role.startswith("detection"):
        inverse = torch.argsort(detection_permutation(*sbc))
        values = values[inverse]
    if role == "variance" and not isinstance(unit.modules["bn"], DarknetBatchNorm2d):
        values = variance_to_darknet(values, unit.modules["bn"].eps)
    return values.contiguous()


# --------------------------------------------------------------------------- writing
def save_weights(model: nn.Module, cfg: Cfg, units: list[Unit], f, seen: int = 0) -> int:
    """Write the header (version 0.2, as save_weights does) and every layer's floats to the
    open binary file ``f``; returns the number of floats written."""
    f.write(struct.pack("<3iQ", 0, 2, 0, seen))
    S, B, C = (getattr(model, k, 0) for k in "SBC")
    written = 0
    for unit, tensors in pairs(units):
        for role, tensor in tensors:
            values = to_file(role, tensor, unit, (S, B, C))
            f.write(values.numpy().astype("<f4", copy=False).tobytes())
            written += values.numel()
    if written != cfg.n_weights:  # the description and the modules disagree: a bug, not user input
        raise RuntimeError(f"wrote {written} floats for a cfg of {cfg.n_weights}")
    return written


def write_darknet(model: nn.Module, stem, input_size: int | None = None, seen: int = 0) -> tuple[Path, Path]:
    """``stem.cfg`` and ``stem.weights`` for ``model``; both written to temporary names and
    renamed only once both are complete, so a failure leaves no file behind."""
    stem = Path(stem)
    cfg_path, weights_path = stem.with_name(stem.name + ".cfg"), stem.with_name(stem.name + ".weights")
    cfg, units = model_cfg(model, input_size, str(cfg_path))
    cfg_text = format_cfg(cfg.input_shape, cfg.layers)
    stem.parent.mkdir(parents=True, exist_ok=True)
    temps = []
    try:
        for path, write in ((cfg_path, lambda f: f.write(cfg_text.encode())),
                            (weights_path, lambda f: save_weights(model, cfg, units, f, seen))):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                write(f)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
    return cfg_path, weights_path
