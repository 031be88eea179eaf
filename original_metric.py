"""The original project's "mAP", reproduced exactly: the first number test.py prints.

The PyTorch project whose layout this one follows (Aladdin Persson's YOLOv1: ``get_bboxes``,
``convert_cellboxes``, ``non_max_suppression`` and ``mean_average_precision`` in its utils.py)
reported a number that is not the paper's or VOC's mAP, and is not comparable with them:

* each cell gives one box: the predictor with the larger confidence (the first on ties),
  scored by that confidence alone (no class probability), labelled with the cell's most likely
  class; so at most S*S boxes per image (49), raw outputs, no clamping or clipping;
* boxes scoring more than 0.4 are kept, then a greedy NMS per class drops a box whose IoU
  with a kept box of its class is at least 0.5 (kept only when ``iou < 0.5``);
* ground truth: the cells of the encoded target holding an object (one object per cell, the
  others lost; difficult objects dropped by the dataset);
* per class with ground truth: detections ranked by score (stable), each matched to the
  ground-truth box of its image with the highest IoU (the first on ties); a true positive if
  that IoU is more than 0.5 and the box is not taken yet; precision = TP / (TP + FP + 1e-6),
  recall = TP / (npos + 1e-6); AP = the trapezoid rule over the points, starting at
  (recall 0, precision 1), with no precision envelope (``torch.trapz``); mAP = the mean over
  the classes with ground truth. IoUs add 1e-6 to the union.

The boxes follow this project's parametrisation (``w = sqrt_w ** 2``; the original regressed w
directly). The original computed in float32, this in float64: numbers agree to ~1e-6.
"""
from __future__ import annotations

import numpy as np
import torch

from utils import split_predictions

THRESHOLD = 0.4  # objectness, strict ">"
NMS_IOU = 0.5    # suppress at IoU >= this, same class
IOU = 0.5        # true positive at IoU > this
DESCRIPTION = ("original project's fixed-threshold mAP (best box of each cell, objectness > 0.4, "
               "NMS 0.5, trapezoid AP at IoU 0.5; not comparable with published results)")


def _rows(class_scores: torch.Tensor, conf: torch.Tensor, box: torch.Tensor) -> np.ndarray:
    """``(N, S, S, ...)`` class scores, a confidence and ``x, y`` (cell), ``w, h`` (image) per
    cell -> ``(N, S*S, 6)`` float64 rows ``class, score, cx, cy, w, h`` (image-relative)."""
    S = box.shape[1]
    offset = torch.arange(S, dtype=box.dtype)
    cx, cy = (box[..., 0] + offset.view(1, 1, S)) / S, (box[..., 1] + offset.view(1, S, 1)) / S
    rows = torch.stack((class_scores.argmax(-1).to(box.dtype), conf, cx, cy, box[..., 2], box[..., 3]), -1)
    return rows.reshape(len(rows), S * S, 6).numpy()


def cell_boxes(outputs: torch.Tensor, S: int, B: int, C: int) -> np.ndarray:
    """The best box of each cell (``convert_cellboxes``): the predictor with the larger
    confidence (first on ties), scored by it, with the cell's most likely class."""
    cls_scores, box_pred = split_predictions(outputs.detach().double().cpu(), S, B, C)
    best = box_pred[..., 0].argmax(-1, keepdim=True)                               # (N,S,S,1)
    box = box_pred.gather(3, best[..., None].expand(-1, -1, -1, 1, 5))[..., 0, :]   # (N,S,S,5)
    return _rows(cls_scores, box[..., 0], torch.cat((box[..., 1:3], box[..., 3:5].square()), -1))


def truth_boxes(targets: torch.Tensor, C: int) -> np.ndarray:
    """Encoded targets ``(N, S, S, C+5)`` as rows, objectness as score (the original decoded
    the targets like the outputs and kept the rows scoring > 0.4: the cells with an object)."""
    t = targets.detach().double().cpu()
    return _rows(t[..., :C], t[..., C], t[..., C + 1:C + 5])


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``cx, cy, w, h`` box with each of ``boxes``, as the original computes it
    (corners, intersection clamped at 0, absolute areas, 1e-6 added to the union)."""
    a = np.concatenate((box[:2] - box[2:] / 2, box[:2] + box[2:] / 2))
    b = np.concatenate((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1)
    wh = (np.minimum(a[2:], b[:, 2:]) - np.maximum(a[:2], b[:, :2])).clip(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = abs((a[2] - a[0]) * (a[3] - a[1]))
    area_b = np.abs((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return inter / (area_a + area_b - inter + 1e-6)


def nms(rows: np.ndarray, threshold: float, nms_iou: float) -> np.ndarray:
    """``non_max_suppression``: rows scoring > threshold, by score (stable), greedy per class."""
    rows = rows[rows[:, 1] > threshold]
    rows = rows[np.argsort(-rows[:, 1], kind="stable")]
    kept = []
    while len(rows):
        chosen, rows = rows[0], rows[1:]
        kept.append(chosen)
        rows = rows[(rows[:, 0] != chosen[0]) | (iou(chosen[2:], rows[:, 2:]) < nms_iou)]
    return np.array(kept).reshape(-1, 6)


def trapezoid_ap(tp: np.ndarray, npos: int) -> float:
    """Area under the raw precision-recall points, (0, 1) first, without envelope."""
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(~tp)
    recall = np.concatenate(([0.0], tp_cum / (npos + 1e-6)))
    precision = np.concatenate(([1.0], tp_cum / (tp_cum + fp_cum + 1e-6)))
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def original_project_metric(outputs: torch.Tensor, targets: torch.Tensor, S: int, B: int, C: int,
                            threshold: float = THRESHOLD, nms_iou: float = NMS_IOU,
                            iou_threshold: float = IOU) -> dict:
    """The original project's mAP of raw network outputs ``(N, S*S*(C+5B))`` against encoded
    targets ``(N, S, S, C+5)``: ``{"mAP", "AP": {class index: AP}}`` (mAP NaN without any
    ground truth, where the original divided by zero)."""
    dets = [nms(rows, threshold, nms_iou) for rows in cell_boxes(outputs, S, B, C)]
    truths = [rows[rows[:, 1] > threshold] for rows in truth_boxes(targets, C)]
    aps = {}
    for c in range(C):
        gt = [t[t[:, 0] == c, 2:] for t in truths]
        npos = sum(len(g) for g in gt)
        if npos == 0:
            continue
        ranked = [(d[1], n, d[2:]) for n, image in enumerate(dets) for d in image if d[0] == c]
        ranked = [ranked[k] for k in np.argsort([-r[0] for r in ranked], kind="stable")]
        taken = [np.zeros(len(g), bool) for g in gt]
        tp = np.zeros(len(ranked), bool)
        for k, (_, n, box) in enumerate(ranked):
            if len(gt[n]) == 0:
                continue
            overlaps = iou(box, gt[n])
            best = int(np.argmax(overlaps))  # first of equal ones; the original's 0 start
            if overlaps[best] > iou_threshold and not taken[n][best]:
                tp[k] = taken[n][best] = True
        aps[c] = trapezoid_ap(tp, npos)
    mean = float(np.mean(list(aps.values()))) if aps else float("nan")
    return {"mAP": mean, "AP": aps}
