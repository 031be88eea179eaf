"""Convert between Darknet's files (.cfg + .weights) and the project's checkpoints.

    python darknet_convert.py yolov1.cfg yolov1.weights -o yolov1.pt          # a detector
    python darknet_convert.py yolov1-tiny.cfg yolov1-tiny.weights -o yolov1-tiny.pt
    python darknet_convert.py extraction.cfg extraction.weights -o extraction.pt           # classifier
    python darknet_convert.py extraction.conv.cfg extraction.conv.weights -o backbone.pt   # convolutions
    python darknet_convert.py runs/train/exp/best.pt -o darknet/mymodel   # mymodel.cfg + mymodel.weights

A detector checkpoint (``kind`` "yolo") is what test.py, detect.py, detect_txt.py and
export.py load; a classifier or convolutions-only checkpoint (``kind`` "backbone") is what
``train.py --backbone`` takes. The cfg decides which network of the registry (model.py
``MODELS``) is built; a cfg the project cannot build exactly is refused, naming its line.
The other way, any detector checkpoint of train.py and any Darknet classifier checkpoint
(darknet_train.py, or one made here) become a cfg and weights that Darknet itself loads
and runs (tests/test_darknet_parity.py checks both directions against Darknet's C code).
Every file is written under a temporary name and renamed only when the whole conversion
succeeded.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import argtypes
from darknet_cfg import Cfg, read_cfg
from darknet_model import HEADS, Darknet
from darknet_weights import check_outputs, load_weights, model_cfg, open_weights, write_darknet
from model import MODELS, YOLOv1, build_checked, build_model
from utils import VOC_CLASSES, UserError, check_finite, load_checkpoint, run_cli, save_checkpoint


@dataclass
class Match:
    """The project's network for a cfg: a registry name (detectors) or "darknet" (the
    classifier), its options and, for a classifier whose head the project does not build,
    how many leading layers (the convolutions) it covers."""

    name: str
    config: dict
    upto: int | None = None

    def build(self, device="cpu") -> nn.Module:
        with torch.device(device):
            if self.name == "darknet":
                return Darknet(**self.config)
            return build_model(self.name, **self.config)


# --------------------------------------------------------------------------- which network
def body(cfg: Cfg) -> list:
    """The layers that compute the output: Darknet skips trailing [cost] layers too."""
    layers = list(cfg.layers)
    while layers and layers[-1].kind == "cost":
        layers.pop()
    return layers


def summary(layers) -> list[tuple]:
    return [(layer.kind, layer.params) for layer in layers]


def scaled_filters(model: nn.Module) -> list[int]:
    """The filters of the convolutions that the width multiplier scales, in order (all of a
    detector's; a classifier's features, not its head's 1x1 convolution to the classes)."""
    part = model.features if isinstance(model, Darknet) else model
    return [m.out_channels for m in part.modules() if isinstance(m, nn.Conv2d)]


def width_of(filters: list[int], base: list[int]) -> float:
    """A width multiplier that gives every one of ``filters`` from the width-1 network's
    ``base`` (darknet_model.scaled: ``max(1, round(base * width))``).

    The first convolution alone does not determine it: width 0.3 gives 64 -> 19 and
    192 -> 58, but 19 / 64 gives 192 -> 57, so a network written at width 0.3 was not
    recognised when read back. Each layer allows an open interval of widths; any width in
    all of them builds the same network: the first layer's ratio when it is one of them, else
    the shortest decimal inside (0.3, not 0.300049)."""
    lo, hi = 0.0, float("inf")
    for n, b in zip(filters, base):
        lo, hi = max(lo, (n - 0.5) / b if n > 1 else 0.0), min(hi, (n + 0.5) / b)
    first = filters[0] / base[0]
    if lo < first < hi or not lo < hi:  # no common width: compare() names the first layer that differs
        return first
    middle = (lo + hi) / 2
    return next((r for r in (round(middle, d) for d in range(1, 9)) if lo < r < hi), middle)


def cfg_traits(layers, base: list[int]) -> dict:
    """What the options of a registry entry are read from: batch norm from the first
    convolution, the width from all of them (``base``: the entry's filters at width 1), the
    head's sizes from its local, connected and dropout layers."""
    convs = [layer for layer in layers if layer.kind == "convolutional"]
    connected = [layer.params["output"] for layer in layers if layer.kind == "connected"]
    if not convs:
        raise UserError("has no convolutional layer; the project's networks start with convolutions")
    return {"batch_norm": bool(convs[0].params["batch_normalize"]),
            "width": width_of([layer.params["filters"] for layer in convs], base),
            "local": next((layer.params["filters"] for layer in layers if layer.kind == "local"), 0),
            "hidden": connected[0] if len(connected) >= 2 else 0,
            "dropout": next((layer.params["probability"] for layer in layers if layer.kind == "dropout"), 0.0)}


def detector_candidates(cfg: Cfg, layers) -> list[tuple[Match, int]]:
    """Every registry entry with the options this cfg implies, and how much its defaults agree."""
    det = layers[-1].params
    found = []
    for name, entry in MODELS.items():
        with torch.device("meta"):
            traits = cfg_traits(layers, scaled_filters(entry.cls(**entry.defaults)))
        config = {"S": det["side"], "B": det["num"], "C": det["classes"], "batch_norm": traits["batch_norm"],
                  "width": traits["width"], "darknet_bn": True}
        if entry.cls is YOLOv1:
            config |= {k: traits[k] for k in ("hidden", "local", "dropout")}
        agree = sum(config.get(k) == v for k, v in entry.defaults.items())
        found.append((Match(name, config), agree))
    return found


def classifier_candidates(cfg: Cfg, layers) -> list[tuple[Match, int]]:
    with torch.device("meta"):
        traits = cfg_traits(layers, scaled_filters(Darknet()))
    config = {"num_classes": layers[-1].in_shape[0] * max(layers[-1].in_shape[1], 1) * max(layers[-1].in_shape[2], 1),
              "batch_norm": traits["batch_norm"], "width": traits["width"], "darknet_bn": True}
    return [(Match("darknet", config | {"head": head}), 0) for head in HEADS]


def compare(cfg: Cfg, layers, match: Match) -> tuple[int, str]:
    """How many leading layers the candidate reproduces, and what differs first ("" if none)."""
    try:
        model = match.build("meta")  # a detector's input side is its own (64 * S)
        built, _ = model_cfg(model, cfg.input_shape[1] if match.name == "darknet" else None, match.name)
    except (UserError, ValueError) as err:
        return 0, f"the project's {match.name} cannot be built with these options ({err})"
    ours = body(built)
    for i, (theirs, mine) in enumerate(zip(layers, ours)):
        if summary([theirs]) != summary([mine]):
            return i, (f"{cfg.where(theirs)}: layer {i} {theirs.title()}: the closest network the project "
                       f"builds ({match.name}) has {mine.title()} here")
    if len(layers) != len(ours):
        shorter = layers if len(layers) < len(ours) else ours
        return len(shorter), (f"{cfg.path}: {len(layers)} layers, the closest network the project builds "
                              f"({match.name}) has {len(ours)}")
    if cfg.input_shape != built.input_shape or cfg.input_shape[1] != cfg.input_shape[2]:
        return len(layers), (f"{cfg.path}:{cfg.net_line}: [net] height={cfg.input_shape[1]} "
                             f"width={cfg.input_shape[2]}: the project's {match.name} here takes "
                             f"{built.input_shape[1]}x{built.input_shape[2]} (square, 64 * side for a detector)")
    return len(layers) + 1, ""


def match_cfg(cfg: Cfg) -> Match:
    """The registry network that computes exactly what ``cfg`` computes, or a UserError
    naming the first line where the closest one differs."""
    layers = body(cfg)
    if not layers:
        raise UserError(f"{cfg.path}: only [cost] layers; no network to build")
    last = layers[-1].kind
    if last not in ("detection", "softmax"):
        raise UserError(f"{cfg.where(layers[-1])}: the network ends with [{last}]; the project reads "
                        "detectors (ending with [detection]) and classifiers (ending with [softmax])")
    try:
        candidates = (detector_candidates if last == "detection" else classifier_candidates)(cfg, layers)
    except UserError as err:
        raise UserError(f"{cfg.path}: {err}") from None
    results = [(compare(cfg, layers, match), agree, match) for match, agree in candidates]
    exact = [(agree, -i, match) for i, ((_, why), agree, match) in enumerate(results) if not why]
    if exact:
        return max(exact, key=lambda t: t[:2])[2]
    if last == "softmax":
        return features_match(cfg, layers, candidates[0][0])
    (_, why), _, _ = max(results, key=lambda r: (r[0][0], r[1]))  # the longest agreement, then defaults
    raise UserError(f"{why}; the project cannot build this cfg exactly")


def features_match(cfg: Cfg, layers, match: Match) -> Match:
    """A classifier whose head the project does not build (extraction.conv.cfg's head is a
    leaky fully connected layer): its convolutions alone, as a backbone."""
    model = match.build("meta")
    built, units = model_cfg(model, cfg.input_shape[1], "darknet")
    n = sum(1 for _ in model.features.children())
    for i, (theirs, mine) in enumerate(zip(layers[:n], built.layers[:n])):
        if summary([theirs]) != summary([mine]):
            raise UserError(f"{cfg.where(theirs)}: layer {i} {theirs.title()}: the project's Darknet "
                            f"convolutions have {mine.title()} here; the project cannot build this cfg")
    if len(layers) < n:
        raise UserError(f"{cfg.path}: {len(layers)} layers, fewer than the {n} of the project's Darknet "
                        "convolutions")
    return Match("darknet", match.config, upto=n)


# --------------------------------------------------------------------------- Darknet -> project
def convert_from_darknet(cfg_path, weights_path, out, names=None) -> str:
    cfg = read_cfg(cfg_path)
    match = match_cfg(cfg)
    model = match.build("meta").to_empty(device="cpu")  # every tensor is then read from the file
    _, units = model_cfg(model, cfg.input_shape[1], match.name)
    source = {"cfg": str(cfg_path), "weights": str(weights_path)}
    if match.name == "darknet":
        header, complete = read_classifier(model, units, weights_path, cfg, match)
        contents = "classifier" if complete else "convolutions"
        ckpt = {"kind": "backbone", "contents": contents, "model_config": dict(model.config),
                "input_size": cfg.input_shape[1],
                "model": {k: v for k, v in model.state_dict().items() if complete or k.startswith("features.")}}
        done = (f"the Darknet classifier ({match.config['head']} head)" if complete else
                "the Darknet convolutions") + f", width {model.config['width']:g}, for train.py --backbone"
    else:
        header = load_weights(model, units, weights_path, cfg)
        ckpt = {"kind": "yolo", "model": model.state_dict(), "model_config": dict(model.config),
                "class_names": read_names(names, model.C)}
        done = f"{match.name} (S={model.S}, B={model.B}, C={model.C})"
    ckpt["darknet"] = source | {"seen": int(header.seen)}
    check_finite(ckpt["model"], str(weights_path))  # NaN weights would travel into every later use
    check_outputs(model, units, cfg, weights_path, None if match.name != "darknet" or complete
                  else len(list(model.features.children())))
    save_checkpoint(ckpt, out)
    return f"{cfg_path} + {weights_path} (seen {header.seen}) -> {out}: {done}"


def read_classifier(model, units, weights_path, cfg: Cfg, match: Match):
    """A classifier's weights: the whole cfg (its head skipped where the project does not
    build it), or exactly its convolutions (a file that Darknet's ``partial`` cut, such as
    extraction.conv.weights). Returns the header and whether the head was read."""
    n = len(list(model.features.children()))
    prefix = cfg.layers[:n]
    _, floats = open_weights(weights_path)
    if len(floats) == cfg.n_weights:
        complete = match.upto is None
        return load_weights(model, units if complete else units[:n], weights_path, cfg), complete
    flipped = sum(3 * layer.params["filters"] * (1 - 2 * layer.params["batch_normalize"])
                  for layer in prefix if layer.kind == "convolutional")
    hint = ""
    if len(floats) in (cfg.n_weights + flipped, sum(layer.n_weights for layer in prefix) + flipped):
        bn = "without" if prefix[0].params["batch_normalize"] else "with"
        hint = (f" (it fits these convolutions {bn} batch norm: use the cfg they were trained with; "
                "extraction.conv.cfg has none, extraction.cfg has it)")
    try:
        what = f"'s convolutions (layers 0-{n - 1}; {cfg.n_weights} with its head)"
        return load_weights(model, units[:n], weights_path, cfg, prefix, what), False
    except UserError as err:
        raise UserError(f"{err}{hint}") from None


def read_names(names, C: int) -> list[str]:
    if names is None:
        if C == len(VOC_CLASSES):
            return list(VOC_CLASSES)
        raise UserError(f"the cfg has {C} classes, not VOC's 20: give their names with --names FILE")
    path = Path(names)
    try:
        found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the names file ({err})") from None
    if len(found) != C:
        raise UserError(f"{path}: {len(found)} names, the cfg has {C} classes")
    return found


# --------------------------------------------------------------------------- project -> Darknet
def model_from_checkpoint(path) -> tuple[nn.Module, dict]:
    """A detector (train.py, kind "yolo") or a classifier (darknet_train.py "darknet", or a
    whole classifier converted here, "backbone") from its checkpoint."""
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    config = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if kind not in ("yolo", "darknet", "backbone") or not isinstance(config, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a detector or classifier checkpoint (kind {kind!r}); "
                        "give a .cfg and a .weights file to convert the other way")
    if kind == "backbone" and ckpt.get("contents") != "classifier":
        raise UserError(f"{path}: holds convolutions only; a cfg needs the whole network")
    return build_checked(config, ckpt["model"], str(path), "detector" if kind == "yolo" else "darknet"), ckpt


def convert_to_darknet(path, out, size: int | None) -> str:
    model, ckpt = model_from_checkpoint(path)
    if not isinstance(model, Darknet):
        size = None
    elif size is None:
        size = ckpt.get("input_size", 224)
    seen = int((ckpt.get("darknet") or {}).get("seen", 0))
    cfg_path, weights_path = write_darknet(model, darknet_stem(out), size, seen)
    return f"{path} -> {cfg_path} + {weights_path}"


# --------------------------------------------------------------------------- command line
def parse_args(argv):
    p = argtypes.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE",
                   help="CFG WEIGHTS (Darknet -> checkpoint) or CHECKPOINT (checkpoint -> Darknet)")
    p.add_argument("-o", "--output", required=True,
                   help="the checkpoint to write, or the Darknet files' path without suffix")
    p.add_argument("--names", help="class names, one per line (default: VOC's 20 when the cfg has 20)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that exist (refused otherwise: they may be a trained checkpoint)")
    p.add_argument("--size", type=argtypes.at_least(32), help="a classifier's input side in its cfg (default: as converted, "
                                            "or 224 as extraction.cfg)")
    args = p.parse_args(argv)
    if len(args.inputs) > 2:
        p.error("give CFG WEIGHTS or one CHECKPOINT")
    if args.size is not None and (args.size < 32 or args.size % 32):
        p.error(f"--size {args.size}: must be a positive multiple of 32 (the classifier downsamples by 32)")
    return args


def darknet_stem(out) -> Path:
    """``-o`` for Darknet files: their path without suffix (``mine`` or ``mine.weights``)."""
    stem = Path(out)
    return stem.with_suffix("") if stem.suffix in (".cfg", ".weights") else stem


def refuse_existing(outputs, inputs, overwrite: bool) -> None:
    """Nothing already there is replaced unless ``--overwrite`` says so (``-o best.pt`` once
    replaced a trained checkpoint without a word), and never an input file."""
    for out in outputs:
        if any(out.resolve() == Path(i).resolve() for i in inputs):
            raise UserError(f"-o {out}: is one of the input files; choose another output")
        if out.exists() and not overwrite:
            raise UserError(f"-o {out}: exists; choose another output, or --overwrite to replace it")


def main(argv=None):
    args = parse_args(argv)
    if len(args.inputs) == 2:
        cfg_path, weights_path = map(Path, args.inputs)
        if cfg_path.suffix != ".cfg" and weights_path.suffix == ".cfg":
            cfg_path, weights_path = weights_path, cfg_path
        refuse_existing([Path(args.output)], args.inputs, args.overwrite)
        print(convert_from_darknet(cfg_path, weights_path, args.output, args.names))
    elif Path(args.inputs[0]).suffix in (".cfg", ".weights"):
        raise UserError(f"{args.inputs[0]}: a Darknet file; give both, CFG WEIGHTS, to make a checkpoint of them")
    else:
        stem = darknet_stem(args.output)
        refuse_existing([stem.with_name(stem.name + ".cfg"), stem.with_name(stem.name + ".weights")],
                        args.inputs, args.overwrite)
        print(convert_to_darknet(args.inputs[0], args.output, args.size))


if __name__ == "__main__":
    run_cli(main)
