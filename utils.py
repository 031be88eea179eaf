"""Box geometry, target encoding, prediction decoding, NMS and checkpoints.

Conventions used across the project (paper Section 2, Darknet's detection layer):

* An image is split into an S x S grid. Row i, column j is the cell whose top-left
  corner is (j / S, i / S) in image-relative coordinates.
* Predictions per cell: ``[C class scores | conf, x, y, sqrt_w, sqrt_h (x B)]``.
  x, y are the box centre relative to the cell (0..1), sqrt_w and sqrt_h are the
  square roots of width and height relative to the image. The network regresses
  the square roots directly and decoding squares them (Darknet, ``sqrt=1``).
* Targets per cell: ``[one-hot class (C) | objectness | x, y (cell), w, h (image)]``.
* Boxes handed to and returned from this module are image-relative (0..1) unless a
  function says otherwise.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import torch
from torchvision.ops import box_convert, nms

# Re-exported: the rest of the project imports the error class and its helpers from here.
from errors import Interrupted, UserError, one_line, run_cli  # noqa: F401

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


# --------------------------------------------------------------------------- geometry
def cell_to_image_boxes(xy: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
    """Cell-relative centres and image-relative sizes -> image-relative xyxy boxes.

    ``xy`` and ``wh`` have shape ``(N, S, S, K, 2)``: K boxes in each cell (i, j),
    row i, column j. The result has shape ``(N, S, S, K, 4)``.
    """
    S = xy.shape[1]
    offsets = torch.arange(S, device=xy.device, dtype=xy.dtype)
    cx = (xy[..., 0] + offsets.view(1, 1, S, 1)) / S
    cy = (xy[..., 1] + offsets.view(1, S, 1, 1)) / S
    centres = torch.stack((cx, cy), dim=-1)
    return box_convert(torch.cat((centres, wh), dim=-1), "cxcywh", "xyxy")


def elementwise_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of matching xyxy boxes ``a[..., :]`` and ``b[..., :]`` (broadcast, not pairwise).

    torchvision.ops.box_iou is pairwise (N x M); the loss needs box k against box k.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + eps)


def encode_target(boxes: torch.Tensor, labels: torch.Tensor, S: int = 7, C: int = 20) -> torch.Tensor:
    """Ground truth -> the ``(S, S, C + 5)`` target the loss expects.

    ``boxes``: ``(K, 4)`` image-relative ``cx, cy, w, h``; ``labels``: ``(K,)`` class ids.
    An object belongs to the cell that holds its centre. Only one object per cell can be
    learned (paper Section 2.4): when several centres fall in one cell, the first object
    in label-file order keeps the cell and the others are dropped, as Darknet's
    ``fill_truth_region`` does.
    """
    target = torch.zeros(S, S, C + 5)
    if boxes.numel() == 0:
        return target
    boxes = boxes.to(torch.float32)
    col = (boxes[:, 0] * S).floor().clamp(0, S - 1).long()
    row = (boxes[:, 1] * S).floor().clamp(0, S - 1).long()
    cell = row * S + col
    order = torch.arange(len(cell))
    unique_cells, inverse = torch.unique(cell, return_inverse=True)
    first = torch.full((len(unique_cells),), len(cell)).scatter_reduce(0, inverse, order, "amin")
    row, col, boxes, labels = row[first], col[first], boxes[first], labels[first].long()
    target[row, col, labels] = 1.0
    target[row, col, C] = 1.0
    target[row, col, C + 1] = boxes[:, 0] * S - col
    target[row, col, C + 2] = boxes[:, 1] * S - row
    target[row, col, C + 3:C + 5] = boxes[:, 2:4]
    return target


def target_to_boxes(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_target` for one image: ``(labels, xyxy boxes)``."""
    C = target.shape[-1] - 5
    has_obj = target[..., C] > 0
    xyxy = cell_to_image_boxes(target[None, ..., None, C + 1:C + 3], target[None, ..., None, C + 3:C + 5])
    return target[..., :C].argmax(-1)[has_obj], xyxy[0, :, :, 0][has_obj]


# --------------------------------------------------------------------------- decoding
def split_predictions(pred: torch.Tensor, S: int, B: int, C: int):
    """``(N, S*S*(C+5B))`` or ``(N, S, S, C+5B)`` -> class scores ``(N,S,S,C)``, boxes ``(N,S,S,B,5)``.

    Each predictor's 5 values are ``conf, x, y, sqrt_w, sqrt_h``.
    """
    pred = pred.reshape(-1, S, S, C + 5 * B)
    return pred[..., :C], pred[..., C:].reshape(*pred.shape[:3], B, 5)


def decode_predictions(pred: torch.Tensor, S: int = 7, B: int = 2, C: int = 20,
                       conf_threshold: float = 0.01, nms_iou: float = 0.5,
                       max_det: int | None = None, *, all_classes: bool = True,
                       check_finite: bool = True) -> list[torch.Tensor]:
    """Network output -> detections per image, each ``(M, 6)``: ``class, score, x1, y1, x2, y2``.

    Boxes are image-relative and clipped to the image. Following the paper's test-time
    rule (Section 2), a box's class-specific score is ``Pr(class | object) * confidence``,
    for every class: one box can be a detection of several classes, each kept when its
    score is above ``conf_threshold``, as Darknet does (``get_detection_detections`` +
    ``do_nms_sort``; tests/test_darknet_detection.py). ``all_classes=False`` keeps only
    each box's most likely class, which loses recall at low thresholds. The raw outputs
    are regressions towards values in [0, 1], so both factors are clamped there before
    multiplying (Darknet multiplies them raw: they differ only outside [0, 1]); boxes are
    clipped before NMS (Darknet clips them after, when it writes them).
    Non-maximum suppression runs per image and per class (:func:`nms_per_image`,
    torchvision's ``batched_nms``); each image's boxes come sorted by score, ties in input order. At most
    ``max_det`` (>= 0) boxes per image are kept, the best ones. Outputs holding NaN or
    infinity are refused (:func:`check_finite_outputs`) unless ``check_finite=False``
    (validation during training: one DDP rank raising alone would leave the others waiting).
    """
    if max_det is not None and max_det < 0:
        raise ValueError(f"max_det must be >= 0 or None, got {max_det}")
    if check_finite:
        check_finite_outputs(pred)
    cls_scores, box_pred = split_predictions(pred.detach().float(), S, B, C)
    N, M = cls_scores.shape[0], S * S * B * C                              # (box, class) pairs
    cls_prob = cls_scores.clamp(0, 1)                                       # (N,S,S,C)
    conf = box_pred[..., 0].clamp(0, 1)                                     # (N,S,S,B)
    score = (conf.unsqueeze(-1) * cls_prob.unsqueeze(-2)).reshape(N * M)    # (N,S,S,B,C) flat
    scored = score > conf_threshold
    if not all_classes:  # only each box's most likely class (first of equal ones)
        top = torch.nn.functional.one_hot(cls_prob.argmax(-1), C).bool().unsqueeze(-2)
        scored &= top.expand(-1, -1, -1, B, -1).reshape(N * M)
    boxes = cell_to_image_boxes(box_pred[..., 1:3], box_pred[..., 3:5].square()).clamp(0, 1)
    boxes = boxes.reshape(N * S * S * B, 4)
    candidate = scored.nonzero().squeeze(1)                   # by image, cell, box, class
    image = torch.div(candidate, M, rounding_mode="floor")
    box = boxes.index_select(0, torch.div(candidate, C, rounding_mode="floor"))
    return nms_per_image(box, score.index_select(0, candidate), candidate % C, image, N,
                         nms_iou, max_det)


def check_finite_outputs(pred: torch.Tensor) -> None:
    """Refuse network outputs holding NaN or infinity (UserError naming the first image).

    Weights are checked finite when loaded, but outputs can still overflow (``--half``, a
    diverged model): an infinite size decoded into a box with NaN corners (inf - inf) and a
    NaN score fails every ``score > threshold`` test, so such images silently had no boxes
    (mAP 0) or boxes that no metric can score."""
    finite = torch.isfinite(pred.detach().flatten(1)).all(1)
    if not bool(finite.all()):
        image = int((~finite).nonzero()[0])
        raise UserError(f"network outputs for image {image} of the batch are not finite (NaN or "
                        "infinity: an overflow, e.g. with --half, or a diverged model)")


def nms_per_image(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, image: torch.Tensor,
                  n_images: int, iou_threshold: float, max_det: int | None = None) -> list[torch.Tensor]:
    """Per-class NMS in each image: ``(M, 6)`` detections ``class, score, x1, y1, x2, y2`` per
    image, best first (ties in input order), at most ``max_det`` each.

    ``boxes`` (n, 4) xyxy, ``scores``, ``labels`` and ``image`` (n,) are ordered by image.
    torchvision's ``batched_nms`` runs image by image: one call over a whole batch (the image
    in the group id) would take its CPU path that loops over the groups, quadratic in the
    batch (~17 (image, class) groups per VOC image). A box is dropped when a kept, better box
    of its class and image overlaps it with IoU > ``iou_threshold``: the greedy rule of
    Darknet's ``do_nms_sort``, class by class.
    """
    counts = torch.bincount(image, minlength=n_images).tolist()
    out = []
    for b, s, c in zip(boxes.split(counts), scores.split(counts), labels.split(counts)):
        # batched_nms's class-offset path, called directly: above 4,000 coordinates batched_nms
        # loops over the classes instead, which breaks ties between equal scores differently
        # (and all-class scoring gives 7x7x2x20 = 1,960 boxes per image)
        offsets = c.to(b) * (b.max() + 1) if len(b) else c.to(b)
        kept = nms(b + offsets[:, None], s, iou_threshold)[:max_det]
        out.append(torch.cat((c[kept, None].float(), s[kept, None], b[kept]), dim=1))
    return out


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to a temporary file beside ``path``, then rename it into place.

    The rename is atomic, so a run killed mid-save never leaves a broken file under the
    real name. Store only tensors and plain Python types, so that the file loads with
    ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: a file from a stranger cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for bad files; all mean the same here
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UserError(f"{path}: refused: the file holds objects other than tensors and "
                            f"plain Python types, which could run code when loaded") from None
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first_line}") from None


def check_archive(path: Path) -> None:
    """Verify the CRC-32 of every member of a checkpoint's zip archive.

    torch.load does not: a checkpoint with damaged bytes inside a tensor (a bad disk, an
    interrupted copy over an old file) would load, with wrong weights. Files that are not
    zip archives (the legacy format, or no checkpoint at all) are left to torch.load.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.CRC == 0:  # saved with torch.serialization.config.save.compute_crc32 off
                    continue
                with archive.open(member) as f:
                    while f.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): {one_line(err)}") from None


def check_state_dict(state, source: str) -> dict:
    """``state`` must be a state dict: tensors by string name. Returns it."""
    if not isinstance(state, dict) or not state:
        raise UserError(f"{source}: its model state is {type(state).__name__}"
                        f"{' (empty)' if isinstance(state, dict) else ''}, not a dict of named tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{source}: model state entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def check_finite(state: dict, source: str) -> None:
    """Refuse NaN or infinity in any floating tensor of a state dict (weights and batch-norm
    buffers alike): such a model gives NaN outputs, which every later step would turn into
    silently wrong numbers (no boxes, mAP 0, an export "matching" PyTorch with NaN)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = value[~torch.isfinite(value)].flatten()[0].item()
            raise UserError(f"{source}: tensor {key!r} holds non-finite values ({bad}); "
                            "refusing a model with NaN or infinite weights")


def load_state_checked(module: torch.nn.Module, state: dict, source: str, assign: bool = False) -> None:
    """``module.load_state_dict(state)`` with one clear line when the two do not fit.

    A checkpoint of another configuration (other S, B, C, hidden size, width, batch
    norm) would otherwise fail with a page of key and shape lists; a state dict that is
    not one, or that holds NaN or infinite values, is refused (:func:`check_finite`).
    The comparison reads shapes only, so ``module`` may live on the ``meta`` device:
    ``assign=True`` then makes the checked tensors its own, with no second copy (a
    tensor saved in another dtype is converted to the module's).
    """
    check_state_dict(state, source)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise UserError(f"{source}: does not fit this model ({len(missing)} missing and "
                        f"{len(unexpected)} unexpected tensors, first {what}); "
                        "was it saved with another model configuration (batch norm, model name)?")
    for key, value in own.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} but this "
                            f"model needs {tuple(value.shape)}; was it saved with another S, B, C, "
                            "hidden size or width?")
    check_finite(state, source)
    if assign:
        state = {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, assign=assign)
