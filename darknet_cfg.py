"""Darknet ``.cfg`` files of the YOLOv1 family: read them into a list of layers, write them.

A cfg is ``[section]`` headers, each followed by ``key=value`` lines (Darknet's parser.c
``read_cfg``: every space and tab is removed, ``#`` and ``;`` start comments). The first
section is ``[net]`` (input size and training settings); each later one is a layer. This
module reads the layer types of the yolov1 family (``cfg/extraction.cfg``,
``extraction.conv.cfg``, ``yolov1.cfg``, ``yolov1-tiny.cfg``): convolutional (with or
without ``batch_normalize``), maxpool, local, dropout, connected, avgpool, softmax, cost and
detection. It follows Darknet's defaults (parser.c ``parse_*``) and its shape arithmetic
(``make_*_layer``), and refuses, naming the file and line, whatever the project's networks
cannot compute exactly: another layer type, another activation than leaky or linear,
grouped or binary convolutions, a batch-normed connected layer, a max pooling whose
padding Darknet would use, options that change what a ``.weights`` file holds.

Nothing here knows PyTorch: darknet_weights.py maps these layers onto the project's modules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from utils import UserError

# Darknet's spellings of each section type (parser.c string_to_layer_type).
ALIASES = {"net": "net", "network": "net", "convolutional": "convolutional", "conv": "convolutional",
           "maxpool": "maxpool", "max": "maxpool", "local": "local", "dropout": "dropout",
           "connected": "connected", "conn": "connected", "avgpool": "avgpool", "avg": "avgpool",
           "softmax": "softmax", "soft": "softmax", "cost": "cost", "detection": "detection"}
# Layer types Darknet knows that the yolov1 family does not use.
OTHER_DARKNET = {"shortcut", "crop", "region", "yolo", "iseg", "deconv", "deconvolutional", "activation",
                 "logistic", "l2norm", "crnn", "gru", "lstm", "rnn", "reorg", "lrn", "normalization",
                 "batchnorm", "route", "upsample"}

# Options that only training reads (learning rate schedule, augmentation, loss weights):
# accepted and ignored. Per-layer ones that change what the weights file holds are refused.
NET_TRAINING = {"batch", "subdivisions", "momentum", "decay", "learning_rate", "policy", "power",
                "max_batches", "steps", "scales", "step", "scale", "gamma", "saturation", "exposure",
                "hue", "angle", "aspect", "max_crop", "min_crop", "max_ratio", "min_ratio", "center",
                "burn_in", "random", "adam", "B1", "B2", "eps", "clip", "notruth"}
LAYER_TRAINING = {"onlyforward", "stopbackward", "learning_rate", "smooth", "truth"}
MUST_BE_ZERO = {"dontsave", "dontload", "numload", "dontloadscales"}  # all layers
ACTIVATIONS = ("leaky", "linear")

# Per layer type: option -> (type, Darknet's default), then the options that must keep one value.
OPTIONS = {
    "convolutional": {"filters": (int, 1), "size": (int, 1), "stride": (int, 1), "pad": (int, 0),
                      "padding": (int, 0), "activation": (str, "logistic"), "batch_normalize": (int, 0),
                      "groups": (int, 1), "binary": (int, 0), "xnor": (int, 0), "flipped": (int, 0),
                      "dot": (float, 0.0)},
    "maxpool": {"size": (int, None), "stride": (int, 1), "padding": (int, None)},
    "local": {"filters": (int, 1), "size": (int, 1), "stride": (int, 1), "pad": (int, 0),
              "activation": (str, "logistic")},
    "dropout": {"probability": (float, 0.5)},
    "connected": {"output": (int, 1), "activation": (str, "logistic"), "batch_normalize": (int, 0)},
    "avgpool": {},
    "softmax": {"groups": (int, 1), "temperature": (float, 1.0), "spatial": (int, 0), "noloss": (int, 0),
                "tree": (str, "")},
    "cost": {"type": (str, "sse"), "scale": (float, 1.0), "ratio": (float, 0.0), "noobj": (float, 1.0),
             "thresh": (float, 0.0)},
    "detection": {"classes": (int, 1), "coords": (int, 1), "rescore": (int, 0), "side": (int, 7),
                  "num": (int, 1), "softmax": (int, 0), "sqrt": (int, 0), "max": (int, 90),
                  "coord_scale": (float, 1.0), "forced": (int, 0), "object_scale": (float, 1.0),
                  "noobject_scale": (float, 1.0), "class_scale": (float, 1.0), "jitter": (float, 0.2),
                  "random": (int, 0), "reorg": (int, 0)},
}
FIXED = {  # option -> the one value the project computes, and why
    "convolutional": {"groups": (1, "grouped convolutions"), "binary": (0, "binary weights"),
                      "xnor": (0, "XNOR convolutions"), "flipped": (0, "transposed weights")},
    "connected": {"batch_normalize": (0, "a batch-normed fully connected layer")},
    "softmax": {"groups": (1, "a grouped softmax"), "temperature": (1.0, "a softmax temperature"),
                "spatial": (0, "a spatial softmax"), "tree": ("", "a softmax tree")},
    "detection": {"coords": (4, "boxes of other than 4 numbers"),
                  "softmax": (0, "a softmax over the class scores (the project regresses them)"),
                  "sqrt": (1, "boxes without sqrt=1 (the project regresses sqrt w, sqrt h)"),
                  "reorg": (0, "a reorganised output")},
}


@dataclass
class Layer:
    """One layer: its type, where it is (``line`` 0 when it was described from a model),
    the options that define what it computes, its input and output shapes (c, h, w) and how
    many floats it holds in a ``.weights`` file. ``extra`` keeps options that only training
    reads and that a written cfg should carry (the detection layer's loss scales)."""

    kind: str
    params: dict
    line: int = 0
    in_shape: tuple = (0, 0, 0)
    out_shape: tuple = (0, 0, 0)
    n_weights: int = 0
    extra: dict = field(default_factory=dict)

    def title(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"[{self.kind}]" + (f" {shown}" if shown else "")


@dataclass
class Cfg:
    """A parsed cfg: its path (for messages), input shape (c, h, w) and layers."""

    path: str
    input_shape: tuple
    layers: list[Layer]
    net_line: int = 1

    def where(self, layer: Layer) -> str:
        return f"{self.path}:{layer.line}" if layer.line else self.path

    @property
    def n_weights(self) -> int:
        return sum(layer.n_weights for layer in self.layers)


# --------------------------------------------------------------------------- reading
def read_cfg(path: str | Path) -> Cfg:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: cfg file not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the cfg file: {err}") from None
    return parse_cfg(cfg_text(data, str(path)), str(path))


def cfg_text(data: bytes, path: str) -> str:
    """A cfg file's bytes as text. Darknet reads bytes and only ASCII means anything to it,
    so a comment in Latin-1 (not UTF-8) is no error; a UTF-8 byte order mark (Windows
    editors) is dropped. A NUL byte means a binary file, most likely the ``.weights``."""
    if b"\0" in data:
        raise UserError(f"{path}: a binary file, not a Darknet cfg (text); was the .weights file given "
                        "in the cfg's place?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# Darknet splits lines at "\n" only (utils.c fgetl) and removes spaces, tabs and newlines
# anywhere in a line (utils.c strip). Python's str.splitlines and str.split would also
# break at \v, \f, \x1c-\x1e, \x85 and \u2028, and drop Unicode spaces: another line than
# Darknet's, and wrong line numbers in messages. "\r" is dropped too (Darknet would not
# parse a CRLF file at all; its meaning is plain).
NOT_IN_A_LINE = str.maketrans("", "", " \t\r")


def sections(text: str, path: str) -> list[tuple[str, int, dict]]:
    """``[(type, line, {key: (value, line)})]`` in file order, as Darknet's read_cfg splits them."""
    found: list[tuple[str, int, dict]] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.translate(NOT_IN_A_LINE)  # read_cfg strips every space and tab, anywhere in the line
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise UserError(f"{path}:{number}: {line!r} is not a section header like [convolutional]")
            found.append((line[1:-1], number, {}))
            continue
        key, eq, value = line.partition("=")
        if not eq or not key or not value:
            raise UserError(f"{path}:{number}: expected key=value, got {line!r}")
        if not found:
            raise UserError(f"{path}:{number}: option {key!r} before the first [section]")
        options = found[-1][2]
        if key in options:
            raise UserError(f"{path}:{number}: option {key!r} given twice in this section "
                            f"(first at line {options[key][1]})")
        options[key] = (value, number)
    return found


# The numbers Darknet's atoi / atof read whole, in ASCII. Python's int() and float() also
# take "1_6" (16; atoi reads 1), non-ASCII digits, "nan" and "inf": a different network
# from the one Darknet builds, so such values are refused, as is trailing text.
NUMBER = {int: re.compile(r"[+-]?[0-9]+", re.ASCII),
          float: re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)}


class Options:
    """A section's options, read with their types; remembers which were read."""

    def __init__(self, kind: str, line: int, options: dict, path: str):
        self.kind, self.line, self.options, self.path = kind, line, options, path
        self.used: set[str] = set()

    def get(self, key: str, kind: type, default):
        self.used.add(key)
        if key not in self.options:
            return default
        value, line = self.options[key]
        if kind is str:
            return value
        if not NUMBER[kind].fullmatch(value):
            comment = " (Darknet reads comments only on lines of their own)" if "#" in value or ";" in value else ""
            shown = value if value.isprintable() else repr(value)
            raise UserError(f"{self.path}:{line}: [{self.kind}] {key}={shown}: not "
                            f"{'an integer' if kind is int else 'a finite number'}{comment}")
        return kind(value)

    def fail(self, key: str | None, message: str):
        line = self.options[key][1] if key in self.options else self.line
        raise UserError(f"{self.path}:{line}: [{self.kind}] {message}")

    def check_unknown(self, allowed: set[str]):
        for key, (_, line) in self.options.items():
            if key not in allowed and key not in self.used:
                raise UserError(f"{self.path}:{line}: [{self.kind}] has an option {key!r} that "
                                f"Darknet's yolov1-family layers do not read")


def parse_cfg(text: str, path: str = "<cfg>") -> Cfg:
    """A cfg's text -> :class:`Cfg`; a :class:`UserError` naming the line for anything else."""
    found = sections(text, path)
    if not found:
        raise UserError(f"{path}: no [net] section and no layers: not a Darknet cfg")
    kind, line, options = found[0]
    if ALIASES.get(kind) != "net":
        raise UserError(f"{path}:{line}: the first section must be [net], not [{kind}]")
    shape = input_shape = parse_net(Options("net", line, options, path))
    layers: list[Layer] = []
    for kind, line, options in found[1:]:
        canonical = ALIASES.get(kind)
        if canonical is None or canonical == "net":
            what = ("a Darknet layer outside the yolov1 family" if kind in OTHER_DARKNET
                    else "not a layer type Darknet knows") if canonical is None else "a second [net]"
            raise UserError(f"{path}:{line}: [{kind}] is {what}; the project reads "
                            f"{', '.join(sorted(set(ALIASES.values()) - {'net'}))}")
        layer = parse_layer(Options(canonical, line, options, path), shape)
        layers.append(layer)
        shape = layer.out_shape
    if not layers:
        raise UserError(f"{path}: [net] but no layers")
    return Cfg(path, input_shape, layers, found[0][1])


def parse_net(opt: Options) -> tuple:
    """[net]: channels, height and width (required); training settings are ignored."""
    c, h, w = (opt.get(k, int, 0) for k in ("channels", "height", "width"))
    if min(c, h, w) <= 0:
        opt.fail(None, f"needs channels, height and width above 0 (got {c}, {h}, {w}); "
                       "the project's networks take images")
    if c != 3:
        opt.fail("channels", f"channels={c}: the project's networks take RGB images (3)")
    if opt.get("inputs", int, c * h * w) != c * h * w:
        opt.fail("inputs", "inputs must be channels*height*width")
    if opt.get("time_steps", int, 1) != 1:
        opt.fail("time_steps", "time_steps must be 1 (no recurrent layers in the family)")
    opt.check_unknown(NET_TRAINING)
    return (c, h, w)


def parse_layer(opt: Options, shape: tuple) -> Layer:
    kind = opt.kind
    values = {key: opt.get(key, kind_, default) for key, (kind_, default) in OPTIONS[kind].items()}
    for key, (want, what) in FIXED.get(kind, {}).items():
        if values[key] != want:
            opt.fail(key, f"{key}={values[key]}: the project does not compute {what}")
    for key in MUST_BE_ZERO:
        if opt.get(key, int, 0) != 0:
            opt.fail(key, f"{key}: changes what the weights file holds; the project reads whole layers")
    for key in LAYER_TRAINING:
        opt.get(key, str, "")
    opt.check_unknown(set())
    if "activation" in values and values["activation"] not in ACTIVATIONS:
        opt.fail("activation", f"activation={values['activation']}: the project's networks use "
                               f"{' and '.join(ACTIVATIONS)} only")
    for key in ("filters", "size", "stride", "output", "classes", "num", "side"):
        if values.get(key) is not None and values[key] < 1:
            opt.fail(key, f"{key}={values[key]} must be at least 1")
    return SHAPES[kind](opt, values, shape)


def need_image(opt: Options, shape: tuple):
    if min(shape) <= 0:
        opt.fail(None, "must follow a layer that outputs an image (Darknet: "
                       "\"Layer before ... must output image\")")


def out_side(opt: Options, n: int, size: int, stride: int, padding: int) -> int:
    out = (n + 2 * padding - size) // stride + 1
    if out < 1:
        opt.fail("size", f"size={size} does not fit its {n}-pixel input")
    return out


def conv_shape(opt, v, shape):
    need_image(opt, shape)
    c, h, w = shape
    padding = v["size"] // 2 if v["pad"] else v["padding"]  # parse_convolutional
    if padding < 0:
        opt.fail("padding", "padding must be >= 0")
    oh, ow = (out_side(opt, n, v["size"], v["stride"], padding) for n in (h, w))
    n, bn = v["filters"], int(bool(v["batch_normalize"]))
    params = {"filters": n, "size": v["size"], "stride": v["stride"], "padding": padding,
              "batch_normalize": bn, "activation": v["activation"]}
    return Layer("convolutional", params, opt.line, shape, (n, oh, ow), n * (1 + 3 * bn) + n * c * v["size"] ** 2)


def maxpool_shape(opt, v, shape):
    """Darknet's max pooling pads ``padding`` (default size - 1) at the far side and starts
    at ``-padding/2`` (maxpool_layer.c); PyTorch's MaxPool2d, which the project uses, does
    not pad. They agree when no window starts before the image and the padding adds no
    window at the end: even sides for the family's 2x2, stride 2 pooling."""
    need_image(opt, shape)
    c, h, w = shape
    size = v["size"] if v["size"] is not None else v["stride"]
    padding = v["padding"] if v["padding"] is not None else size - 1
    if size < 1 or v["stride"] < 1 or padding < 0:
        opt.fail(None, "size and stride must be at least 1, padding at least 0")
    darknet = [(n + padding - size) // v["stride"] + 1 for n in (h, w)]
    unpadded = [(n - size) // v["stride"] + 1 for n in (h, w)]
    if int(-padding / 2) != 0 or darknet != unpadded or min(unpadded) < 1:
        opt.fail(None, f"size={size} stride={v['stride']} on a {h}x{w} input: Darknet pads it "
                       f"(output {darknet[0]}x{darknet[1]}), the project's max pooling does not; "
                       "use an input whose side the pooling divides")
    return Layer("maxpool", {"size": size, "stride": v["stride"]}, opt.line, shape, (c, *darknet))


def local_shape(opt, v, shape):
    """local_layer.c sizes its output as if ``pad`` meant size // 2 but pads im2col by
    ``pad`` pixels: the two agree only for size 3 (or pad 0); other layers are refused."""
    need_image(opt, shape)
    c, h, w = shape
    size, stride, pad = v["size"], v["stride"], v["pad"]
    darknet = [((n - 1) if pad else (n - size)) // stride + 1 for n in (h, w)]  # local_out_height
    im2col = [(n + 2 * pad - size) // stride + 1 for n in (h, w)]
    if darknet != im2col or min(darknet) < 1:
        opt.fail("pad", f"size={size} pad={pad}: Darknet's output size ({darknet[0]}x{darknet[1]}) and "
                        f"the positions it computes ({im2col[0]}x{im2col[1]}) disagree")
    n, positions = v["filters"], darknet[0] * darknet[1]
    params = {"filters": n, "size": size, "stride": stride, "pad": pad, "activation": v["activation"]}
    return Layer("local", params, opt.line, shape, (n, *darknet),
                 n * positions + positions * n * c * size * size)


def connected_shape(opt, v, shape):
    inputs = shape[0] * max(shape[1], 1) * max(shape[2], 1)
    n = v["output"]
    return Layer("connected", {"output": n, "activation": v["activation"]}, opt.line, shape, (n, 1, 1),
                 n + n * inputs)


def dropout_shape(opt, v, shape):
    if not 0 <= v["probability"] < 1:
        opt.fail("probability", f"probability={v['probability']} must be in [0, 1)")
    return Layer("dropout", {"probability": v["probability"]}, opt.line, shape, shape)


def avgpool_shape(opt, v, shape):
    need_image(opt, shape)
    return Layer("avgpool", {}, opt.line, shape, (shape[0], 1, 1))


def flat(shape: tuple) -> tuple:
    """A layer that outputs no image (softmax, cost, detection): its values, height 0."""
    return (shape[0] * max(shape[1], 1) * max(shape[2], 1), 0, 0)


def softmax_shape(opt, v, shape):
    return Layer("softmax", {}, opt.line, shape, flat(shape))


def cost_shape(opt, v, shape):
    return Layer("cost", {}, opt.line, shape, shape, extra={"type": v["type"], "scale": v["scale"]})


def detection_shape(opt, v, shape):
    inputs = flat(shape)[0]
    side, num, classes = v["side"], v["num"], v["classes"]
    if side * side * (5 * num + classes) != inputs:  # make_detection_layer's assert
        opt.fail(None, f"side={side}, num={num}, classes={classes} need {side}*{side}*(5*{num}+{classes}) = "
                       f"{side * side * (5 * num + classes)} inputs; the layer before gives {inputs}")
    extra = {k: v[k] for k in ("rescore", "jitter", "object_scale", "noobject_scale", "class_scale",
                               "coord_scale")}
    return Layer("detection", {"classes": classes, "num": num, "side": side}, opt.line, shape,
                 flat(shape), extra=extra)


SHAPES = {"convolutional": conv_shape, "maxpool": maxpool_shape, "local": local_shape,
          "connected": connected_shape, "dropout": dropout_shape, "avgpool": avgpool_shape,
          "softmax": softmax_shape, "cost": cost_shape, "detection": detection_shape}


# --------------------------------------------------------------------------- writing
def format_cfg(input_shape: tuple, layers: list[Layer]) -> str:
    """A cfg Darknet parses into these layers (inference settings only in [net])."""
    c, h, w = input_shape
    lines = ["[net]", "# Testing: one image at a time (Darknet's own cfgs keep the training",
             "# batch and schedule in comments or in these lines)", "batch=1", "subdivisions=1",
             f"height={h}", f"width={w}", f"channels={c}", ""]
    for layer in layers:
        lines.append(f"[{layer.kind}]")
        lines += [f"{k}={v}" for k, v in cfg_options(layer).items()]
        lines.append("")
    return "\n".join(lines)


def cfg_options(layer: Layer) -> dict:
    p = layer.params
    if layer.kind == "convolutional":
        pad = {"pad": 1} if p["padding"] == p["size"] // 2 else {"padding": p["padding"]}
        bn = {"batch_normalize": 1} if p["batch_normalize"] else {}
        return bn | {"filters": p["filters"], "size": p["size"], "stride": p["stride"], **pad,
                     "activation": p["activation"]}
    if layer.kind == "maxpool":
        return {"size": p["size"], "stride": p["stride"]}
    if layer.kind == "detection":
        return {"classes": p["classes"], "coords": 4, "side": p["side"], "num": p["num"],
                "softmax": 0, "sqrt": 1, **layer.extra}
    if layer.kind == "softmax":
        return {"groups": 1}
    return dict(p) | layer.extra
