"""Export a trained detector to ONNX and TorchScript, to run it without this repository.

    python export.py runs/train/demo/best.pt                    # model.onnx + model.torchscript.pt
    python export.py best.pt --include onnx --raw               # the bare network output

Files go to a new folder, runs/export/exp (then exp2, exp3 ...).

Input ``images``: float32 (N, 3, 64*S, 64*S) (448 x 448 for S = 7), RGB in [0, 1], no
mean/std normalisation, the whole picture squashed to the square (aspect ratio not
kept), as in training. N is free (a dynamic axis).

Outputs (default, decoded in the graph), with K = S*S*B boxes per image:
  boxes   (N, K, 4)  x1 y1 x2 y2 relative to the image (0..1; multiply by its width and
                     height for pixels), clipped to the image
  scores  (N, K, C)  class-specific confidence Pr(class | object) * confidence (paper
                     Section 2), each factor clamped to [0, 1] as utils.decode_predictions
Box k comes from cell k // B (row-major: row = cell // S, column = cell % S), predictor k % B.
Non-maximum suppression is NOT in the graph: it is the caller's job. As in
utils.decode_predictions (and Darknet), every (box, class) pair scoring above a threshold
is a detection, then NMS runs per class; ``postprocess`` below does exactly that on
onnxruntime's numpy outputs, with the same NMS code (``all_classes=False``: each box's
best class only, decode_predictions' option of the same name).

With ``--raw`` the single output ``output`` is the network's (N, S*S*(C+5B)); per cell
``[C class scores | conf, x, y, sqrt_w, sqrt_h for each of the B predictors]`` (model.py).
This is the file detect.py runs in place of a checkpoint (``python detect.py model.onnx
photos/``: onnxruntime with every graph optimisation, inference.py), with the same boxes.

Both files carry the class names, S, B, C and the input size: the ONNX file in its
metadata (onnxruntime: ``session.get_modelmeta().custom_metadata_map``), the TorchScript
file as the extra file ``config.json`` (``torch.jit.load(path, _extra_files=...)``).
ONNX export needs ``pip install onnx onnxscript``; the check against PyTorch after the
export needs ``onnxruntime`` (skipped with a note when it is missing).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

import argtypes
import runs
from model import load_detector
from plots import require
from utils import UserError, cell_to_image_boxes, nms_per_image, run_cli, split_predictions

FORMATS = ("onnx", "torchscript")
# Largest |PyTorch - exported| difference accepted by the check after the export, relative to
# each output's largest magnitude. The graphs compute the same float32 operations, but
# onnxruntime may fuse or reorder them: measured 2e-6 to 2.1e-5 of it (yolov1, fast,
# yolov1-tiny, raw and decoded). An absolute 1e-4 passed a 10% error on outputs near 1e-3
# (a random yolov1-darknet's scores).
RTOL = 2e-4


def build_parser() -> argparse.ArgumentParser:
    p = argtypes.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a train.py checkpoint (best.pt or last.pt)")
    p.add_argument("--include", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="formats to write (default: both)")
    p.add_argument("--raw", action="store_true",
                   help="export the bare network output instead of decoded boxes and scores")
    p.add_argument("--opset", type=argtypes.at_least(7), default=18, help="ONNX opset version (default %(default)s)")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the exported files against PyTorch after the export")
    p.add_argument("--project", default="runs/export", help="parent of the output folder")
    p.add_argument("--name", default="exp", help="output folder name; exp2, exp3 ... if taken")
    return p


class DecodedYOLO(nn.Module):
    """The detector followed by utils.decode_predictions' decoding, without thresholds or NMS."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.S, self.B, self.C = model, model.S, model.B, model.C

    def forward(self, images: torch.Tensor):
        cls_scores, box_pred = split_predictions(self.model(images), self.S, self.B, self.C)
        conf = box_pred[..., 0].clamp(0, 1)                                    # (N,S,S,B)
        scores = conf.unsqueeze(-1) * cls_scores.clamp(0, 1).unsqueeze(-2)     # (N,S,S,B,C)
        boxes = cell_to_image_boxes(box_pred[..., 1:3], box_pred[..., 3:5].square()).clamp(0, 1)
        return boxes.flatten(1, 3), scores.flatten(1, 3)


def export_metadata(model: nn.Module, names, raw: bool) -> dict:
    """What a caller needs besides the weights."""
    return {"class_names": list(names), "S": model.S, "B": model.B, "C": model.C,
            "input_size": model.input_size,
            "input": "images: float32 (N, 3, input_size, input_size), RGB in [0, 1], squashed",
            "outputs": "output: (N, S*S*(C+5B)) raw network output" if raw else
                       "boxes: (N, S*S*B, 4) x1 y1 x2 y2 in 0..1; scores: (N, S*S*B, C); no NMS",
            "model_config": dict(model.config)}


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_names, metadata,
                opset: int) -> None:
    """torch.onnx's exporter (torch.export based) with a dynamic batch axis; metadata added."""
    require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnxscript", "ONNX export (torch.onnx's exporter)")
    import onnx

    batch = torch.export.Dim("batch")
    # The exporter writes opset 18 and up itself and converts the graph to an older one;
    # where the conversion fails it prints the converter's traceback and writes opset 18
    # anyway (--opset 7 gave an opset 18 file, exit 0). The output is checked below.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            quiet_loggers("onnxscript", "torch.onnx"):
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=output_names,
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)
    proto = onnx.load(str(path))
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        path.unlink()
        raise UserError(f"--opset {opset}: torch.onnx could not write this model in opset {opset} "
                        f"(it wrote opset {written}); use --opset 18, its own, or another")
    for key, value in metadata.items():  # ONNX metadata values are strings: JSON for the others
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(proto, str(path))


@contextmanager
def quiet_loggers(*names):
    """Loggers silenced for a block: torch.onnx and onnxscript log their conversion
    attempts (with tracebacks) through handlers of their own, past redirect_stderr."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def jit_quietly():
    """torch.jit is deprecated upstream (FutureWarning) but still the format C++ libtorch
    loads. Tracing also warns that model.check_input's shape test is frozen: it holds
    for every batch size, the only size that may change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, metadata) -> None:
    """A traced TorchScript file (loads in C++ libtorch and in Python without this code)."""
    with jit_quietly():
        # check_trace would run the model twice more on the same batch; check_export
        # compares the saved file instead, on another batch size.
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"config.json": json.dumps(metadata)})


def reference_outputs(module: nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(images)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def check_export(path: Path, fmt: str, module: nn.Module, size: int) -> float | None:
    """Largest difference between the exported file and PyTorch on a random batch of 3
    (not the 2 images traced: the batch axis must really be dynamic); None if skipped."""
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = reference_outputs(module, images)
    if fmt == "onnx":
        try:
            require("onnxruntime", "onnxruntime", "checking the ONNX file")
        except UserError as err:
            print(f"note: {err}; skipped the check")
            return None
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": images.numpy()})
    else:
        with jit_quietly():
            got = reference_outputs(torch.jit.load(str(path)), images)
    diff = max(float(np.abs(g - e).max() / max(float(np.abs(e).max()), 1e-30)) for g, e in zip(got, expected))
    if not diff <= RTOL:  # NaN compares false both ways: an output of NaN is a failure, not a match
        raise UserError(f"{path}: outputs differ from PyTorch by up to {diff:.3g} of their largest value "
                        f"(more than {RTOL})")
    return diff


def export(model: nn.Module, names, out_dir: Path, formats, raw: bool = False, opset: int = 18,
           check: bool = True) -> dict[str, Path]:
    """Write the requested formats into ``out_dir``; returns ``{format: path}``."""
    module = (model if raw else DecodedYOLO(model)).eval()
    example = torch.rand(2, 3, model.input_size, model.input_size)
    metadata = export_metadata(model, names, raw)
    written = {}
    for fmt in formats:
        path = out_dir / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
        if fmt == "onnx":
            export_onnx(module, example, path, ["output"] if raw else ["boxes", "scores"], metadata, opset)
        else:
            export_torchscript(module, example, path, metadata)
        diff = check_export(path, fmt, module, model.input_size) if check else None
        checked = f" (max |diff| vs PyTorch {diff:.2g} of the largest output)" if diff is not None else ""
        print(f"{fmt}: {path}{checked}")
        written[fmt] = path
    return written


# --------------------------------------------------------------------------- using the ONNX file
def postprocess(boxes: np.ndarray, scores: np.ndarray, conf_threshold: float = 0.2,
                nms_iou: float = 0.5, all_classes: bool = True) -> list[np.ndarray]:
    """The exported outputs -> per image ``(M, 6)``: ``class, score, x1, y1, x2, y2`` (0..1),
    best first, as numpy arrays: utils.decode_predictions' thresholding and its NMS
    (:func:`utils.nms_per_image`, torchvision's ``batched_nms``) on onnxruntime's outputs.
    Every class of a box scoring above ``conf_threshold`` is a detection, as in
    decode_predictions and Darknet (this once kept each box's best class only, so an ONNX
    user got fewer detections than detect.py from the same network); ``all_classes=False``
    keeps that."""
    boxes, scores = torch.from_numpy(np.asarray(boxes, np.float32)), torch.from_numpy(np.asarray(scores, np.float32))
    n, k, c = scores.shape
    keep = scores > conf_threshold                                          # (N, K, C)
    if not all_classes:  # each box's best class only (the first of equal ones, as decode_predictions)
        keep &= nn.functional.one_hot(scores.argmax(-1), c).bool()
    image, box, label = keep.nonzero(as_tuple=True)
    return [d.numpy() for d in nms_per_image(boxes[image, box], scores[keep], label, image, n, nms_iou)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    formats = list(dict.fromkeys(args.include))
    if "onnx" in formats:  # before any work: a missing package is an error, not a half-done export
        require("onnx", "onnx", "ONNX export")
        require("onnxscript", "onnxscript", "ONNX export (torch.onnx's exporter)")
        import onnx

        if args.opset > onnx.defs.onnx_opset_version():
            raise UserError(f"--opset {args.opset}: the installed onnx package knows opsets up to "
                            f"{onnx.defs.onnx_opset_version()}")
    model, names = load_detector(args.checkpoint, "cpu")
    out_dir = runs.make_run_dir(args.project, args.name)
    try:
        export(model, names, out_dir, formats, args.raw, args.opset, check=not args.no_check)
    except UserError:
        if not any(out_dir.iterdir()):
            out_dir.rmdir()  # made by this run, with nothing in it: leave no trace
        raise
    print(f"input: images (N, 3, {model.input_size}, {model.input_size}) RGB in [0, 1]; "
          + ("output: (N, S*S*(C+5B)) raw" if args.raw else
             f"outputs: boxes (N, {model.S ** 2 * model.B}, 4), scores (N, {model.S ** 2 * model.B}, "
             f"{model.C}); NMS is the caller's job (export.postprocess)"))
    if args.raw and "onnx" in formats:
        print(f"detect.py runs it with onnxruntime: python detect.py {out_dir / 'model.onnx'} IMAGES")


if __name__ == "__main__":
    run_cli(main)
