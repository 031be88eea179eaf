"""original_metric: the original project's fixed-threshold mAP, on a case worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from original_metric import nms, original_project_metric, trapezoid_ap

S, B, C = 2, 2, 2
EXACT = (0.5, 0.5, 0.6, 0.6)   # x, y (cell), sqrt_w, sqrt_h: the ground-truth box of its cell
FAR = (0.0, 0.0, 0.2, 0.2)     # centre on the cell's corner, w = h = 0.04: overlaps nothing


def cell(pred, n, i, j, classes, box0, box1):
    pred[n, i, j] = torch.tensor([*classes, *box0, *box1], dtype=torch.float64)


def hand_case():
    """Two images, S=2, B=2, C=2; every object is w = h = 0.36 at the centre of its cell.

    Image 0, objects of class 0 in cells (0,0) G1 and (1,1) G2.
      (0,0): classes [0.2, 0.1]; box 0 conf 0.9 on G1; box 1 conf 0.85 FAR. The cell's box is
             box 0, scored 0.9 (its confidence alone: 0.9 * 0.2 = 0.18 would be cut) -> TP.
             Box 1 is not the cell's best: no detection (were it one, an FP at 0.85).
      (0,1): classes [0.9, 0]; box 0 conf 0.8 at the cell's centre (0.75, 0.25): no object of
             class 0 there -> FP 0.8.
      (1,0): confidences 0.39 and 0.2: below 0.4, nothing.
      (1,1): classes [0.7, 0.3]; box 0 conf 0.35 FAR, box 1 conf 0.7 on G2 -> TP 0.7 (the
             larger confidence picks the box).
    Image 1, objects of class 1 in cells (0,1) G3 [0.57, 0.07, 0.93, 0.43] and (1,0) G4.
      (0,1): classes [0.1, 0.9]; box 0 conf 0.95 on G3 -> TP 0.95.
      (0,0): classes [0.3, 0.6]; box 0 conf 0.85 at x = 1.4: centre (0.7, 0.25), box
             [0.52, 0.07, 0.88, 0.43]; IoU with the 0.95 box = 0.31 * 0.36 / (2 * 0.1296 -
             0.1116) = 0.756 >= 0.5, same class: suppressed (were it kept, an FP at 0.85).
      (1,0): classes [0, 0.9]; box 0 conf 0.45 FAR, box 1 conf 0.5 on G4 -> TP 0.5.
      (1,1): classes [0.8, 0.1]; box 0 conf 0.6 at y = -0.4: centre (0.75, 0.3), overlapping the
             class-1 box at IoU 0.756, but of class 0: kept; no class-0 object here -> FP 0.6.
    """
    pred = torch.zeros(2, S, S, C + 5 * B, dtype=torch.float64)
    cell(pred, 0, 0, 0, (0.2, 0.1), (0.9, *EXACT), (0.85, *FAR))
    cell(pred, 0, 0, 1, (0.9, 0.0), (0.8, *EXACT), (0.1, *EXACT))
    cell(pred, 0, 1, 0, (0.6, 0.4), (0.39, *EXACT), (0.2, *EXACT))
    cell(pred, 0, 1, 1, (0.7, 0.3), (0.35, *FAR), (0.7, *EXACT))
    cell(pred, 1, 0, 1, (0.1, 0.9), (0.95, *EXACT), (0.0, *EXACT))
    cell(pred, 1, 0, 0, (0.3, 0.6), (0.85, 1.4, 0.5, 0.6, 0.6), (0.0, *EXACT))
    cell(pred, 1, 1, 0, (0.0, 0.9), (0.45, *FAR), (0.5, *EXACT))
    cell(pred, 1, 1, 1, (0.8, 0.1), (0.6, 0.5, -0.4, 0.6, 0.6), (0.0, *EXACT))
    target = torch.zeros(2, S, S, C + 5)
    for n, i, j, c in ((0, 0, 0, 0), (0, 1, 1, 0), (1, 0, 1, 1), (1, 1, 0, 1)):
        target[n, i, j, c] = 1
        target[n, i, j, C:] = torch.tensor([1.0, 0.5, 0.5, 0.36, 0.36])
    return pred.reshape(2, -1), target


# Class 0: ranked 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP; 2 objects.
#   precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1; from (0, 1) by trapezoids:
#   1/2 * (1 + 1) / 2 + 0 + 1/2 * (1/2 + 2/3) / 2 + 0 = 1/2 + 7/24 = 19/24 = 0.791667
#   (the precision envelope would give 1/2 + 1/2 * 2/3 = 0.833333)
# Class 1: ranked 0.95 TP, 0.5 TP; 2 objects: precision 1, 1 at recall 1/2, 1: AP 1
#   (with the suppressed box kept: 1/2 + 1/2 * (1/2 + 2/3) / 2 = 0.791667)
AP0, AP1 = 19 / 24, 1.0


def test_hand_worked_case():
    """Guards the metric test.py labels as the original project's: objectness alone as the
    score, one box per cell, NMS per class at IoU >= 0.5, trapezoids without envelope. The
    project used to print conf x class probability >= 0.4 over all boxes with every-point AP
    under that name."""
    pred, target = hand_case()
    result = original_project_metric(pred, target, S, B, C)
    assert result["AP"] == pytest.approx({0: AP0, 1: AP1}, abs=2e-6)   # eps 1e-6 of the original
    assert result["mAP"] == pytest.approx((AP0 + AP1) / 2, abs=2e-6)   # 0.895833


def test_trapezoids_and_eps():
    tp = np.array([True, False, True, False])
    assert trapezoid_ap(tp, 2) == pytest.approx(19 / 24, abs=2e-6)
    assert trapezoid_ap(np.zeros(3, bool), 4) == 0.0
    assert trapezoid_ap(np.zeros(0, bool), 1) == 0.0            # objects, no detection: AP 0
    # one TP out of one: recall r = precision p = 1/(1 + 1e-6); area r * (1 + p) / 2
    r = 1 / (1 + 1e-6)
    assert trapezoid_ap(np.ones(1, bool), 1) == pytest.approx(r * (1 + r) / 2, abs=1e-12)


def test_nms_threshold_and_iou_with_eps():
    """Scores > 0.4 only; a same-class box is suppressed at IoU >= 0.5, the IoU with 1e-6
    added to the union (so a box covering exactly half of another survives); another class
    is never suppressed."""
    rows = np.array([[0, 0.9, 0.5, 0.5, 0.4, 0.4],
                     [0, 0.8, 0.5, 0.5, 0.4, 0.2],      # inside the first, half its area
                     [1, 0.7, 0.5, 0.5, 0.4, 0.4],      # same box as the first, other class
                     [0, 0.4, 0.1, 0.1, 0.1, 0.1]])     # not above 0.4
    kept = nms(rows, 0.4, 0.5)                          # IoU 0.08 / (0.16 + 1e-6) = 0.4999969
    assert kept[:, 1].tolist() == [0.9, 0.8, 0.7]
    rows[1, 5] = 0.2001                                 # IoU 0.08004 / 0.160001 = 0.50024
    assert nms(rows, 0.4, 0.5)[:, 1].tolist() == [0.9, 0.7]
    assert nms(rows, 0.39, 0.5)[:, 1].tolist() == [0.9, 0.7, 0.4]


def test_no_ground_truth_gives_nan():
    pred, target = hand_case()
    result = original_project_metric(pred, torch.zeros_like(target), S, B, C)
    assert result["AP"] == {} and np.isnan(result["mAP"])


class Targets:
    """A dataset's encoded targets (DetectionDataset.target), without images."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def target(self, index):
        return self.targets[index]


def test_test_py_scores_the_same_outputs():
    """test.py's original_project_map takes the raw outputs of its one pass and the
    dataset's targets: the hand-worked APs, and NaN when nothing was predicted."""
    from types import SimpleNamespace

    import test as test_script

    pred, target = hand_case()
    runner = SimpleNamespace(S=S, B=B, C=C)
    result = test_script.original_project_map(pred, Targets(target), runner)
    assert result["mAP"] == pytest.approx((AP0 + AP1) / 2, abs=2e-6)
    assert np.isnan(test_script.original_project_map(None, Targets(target[:0]), runner)["mAP"])
