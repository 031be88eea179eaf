"""YoloLoss against hand-worked numbers and against a naive nested-loop reimplementation."""
from __future__ import annotations

import math
import random

import pytest
import torch

from loss import YoloLoss


def make(S, B, C, N=1):
    return torch.zeros(N, S, S, C + 5 * B), torch.zeros(N, S, S, C + 5)


def set_box(pred, n, i, j, C, b, conf, x, y, sw, sh):
    pred[n, i, j, C + 5 * b:C + 5 * b + 5] = torch.tensor([conf, x, y, sw, sh])


def set_obj(target, n, i, j, C, cls, x, y, w, h):
    target[n, i, j, :C] = 0
    target[n, i, j, cls] = 1
    target[n, i, j, C:C + 5] = torch.tensor([1.0, x, y, w, h])


def hand_case():
    """S=2, B=2, C=2, one object.

    Object in cell (row 0, col 0), class 1: x=y=0.5 (cell), w=h=0.25 (image).
      centre (0.5/2, 0.5/2) = (0.25, 0.25) -> xyxy [0.125, 0.125, 0.375, 0.375], area 0.0625.
    Predictor 0 in that cell: conf 0.3, x 0.4, y 0.6, sqrt_w 0.5, sqrt_h 0.4
      w = 0.25, h = 0.16, centre (0.4/2, 0.6/2) = (0.2, 0.3) -> [0.075, 0.22, 0.325, 0.38]
      intersection x [0.125, 0.325] = 0.2, y [0.22, 0.375] = 0.155 -> 0.031
      area 0.25*0.16 = 0.04; union 0.0625 + 0.04 - 0.031 = 0.0715; IoU = 0.031/0.0715 = 0.43357
    Predictor 1: conf 0.8, x 0.6, y 0.5, sqrt_w 0.6, sqrt_h 0.6
      w = h = 0.36, centre (0.3, 0.25) -> [0.12, 0.07, 0.48, 0.43] contains the object
      IoU = 0.0625 / 0.1296 = 0.48225  > 0.43357  -> predictor 1 is responsible.
    Class scores in the object's cell: [0.2, 0.7] vs one-hot [0, 1].
    Other cells (no object; their class scores must not count):
      (0,1): confs 0.1, 0.2;  (1,0): 0, 0 (class scores 0.9);  (1,1): confs -0.5, 0.
    """
    S, B, C = 2, 2, 2
    pred, target = make(S, B, C)
    set_obj(target, 0, 0, 0, C, 1, 0.5, 0.5, 0.25, 0.25)
    pred[0, 0, 0, :C] = torch.tensor([0.2, 0.7])
    set_box(pred, 0, 0, 0, C, 0, 0.3, 0.4, 0.6, 0.5, 0.4)
    set_box(pred, 0, 0, 0, C, 1, 0.8, 0.6, 0.5, 0.6, 0.6)
    set_box(pred, 0, 0, 1, C, 0, 0.1, 0.3, 0.3, 0.3, 0.3)
    set_box(pred, 0, 0, 1, C, 1, 0.2, 0.7, 0.7, 0.2, 0.2)
    pred[0, 1, 0, :C] = 0.9
    set_box(pred, 0, 1, 1, C, 0, -0.5, 0.5, 0.5, 0.5, 0.5)
    return pred, target


IOU_RESP = 0.0625 / 0.1296                 # 0.482253...
HAND = {
    # 5 * [(0.6-0.5)^2 + (0.5-0.5)^2 + (0.6-sqrt 0.25)^2 + (0.6-sqrt 0.25)^2] = 5 * 0.03
    "coord": 0.15,
    # (0.8 - 0.4822531)^2 = 0.3177469^2 = 0.1009631
    "obj": (0.8 - IOU_RESP) ** 2,
    # 0.5 * [0.3^2 (other predictor of the object's cell) + 0.1^2 + 0.2^2 + (-0.5)^2]
    # = 0.5 * (0.09 + 0.01 + 0.04 + 0.25) = 0.5 * 0.39
    "noobj": 0.195,
    # (0.2 - 0)^2 + (0.7 - 1)^2 = 0.04 + 0.09
    "cls": 0.13,
}


def close(a, b, tol=1e-5):
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=1e-7)


def test_hand_worked_case_components():
    pred, target = hand_case()
    assert math.isclose(IOU_RESP, 0.4822530864, rel_tol=1e-9)
    assert math.isclose(0.031 / 0.0715, 0.4335664336, rel_tol=1e-9)   # predictor 0 loses
    assert math.isclose(HAND["obj"], 0.1009631011, rel_tol=1e-8)
    fn = YoloLoss(S=2, B=2, C=2)
    total, parts = fn(pred, target, components=True)
    assert set(parts) == set(HAND)
    for k, v in HAND.items():
        assert close(parts[k], v), (k, float(parts[k]), v)
    assert close(total, sum(HAND.values()))        # 0.575963...
    assert close(fn(pred, target), total)          # components=False gives the same scalar
    assert close(fn(pred.reshape(1, -1), target), total)


def test_hand_worked_responsible_mask_and_iou():
    pred, target = hand_case()
    fn = YoloLoss(S=2, B=2, C=2)
    box_pred = pred.reshape(1, 2, 2, 2 + 10)[..., 2:].reshape(1, 2, 2, 2, 5)
    resp, iou = fn.responsible(box_pred, target)
    expected = torch.zeros(1, 2, 2, 2)
    expected[0, 0, 0, 1] = 1
    assert torch.equal(resp, expected)
    assert close(iou[0, 0, 0, 0], 0.031 / 0.0715) and close(iou[0, 0, 0, 1], IOU_RESP)


def test_rescore_false_trains_confidence_towards_one():
    pred, target = hand_case()
    _, on = YoloLoss(S=2, B=2, C=2, rescore=True)(pred, target, components=True)
    total, off = YoloLoss(S=2, B=2, C=2, rescore=False)(pred, target, components=True)
    assert close(off["obj"], (0.8 - 1.0) ** 2)      # 0.04
    assert close(on["obj"], HAND["obj"])            # 0.100963
    for k in ("coord", "noobj", "cls"):
        assert close(on[k], off[k])
    assert close(total, 0.15 + 0.04 + 0.195 + 0.13)


def test_lambdas_scale_their_terms():
    pred, target = hand_case()
    _, parts = YoloLoss(S=2, B=2, C=2, lambda_coord=2.0, lambda_noobj=1.0)(pred, target, components=True)
    assert close(parts["coord"], 2 * 0.03) and close(parts["noobj"], 0.39)
    assert close(parts["obj"], HAND["obj"]) and close(parts["cls"], HAND["cls"])


def test_divided_by_batch_size():
    pred, target = hand_case()
    fn = YoloLoss(S=2, B=2, C=2)
    one, p1 = fn(pred, target, components=True)
    two, p2 = fn(pred.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1), components=True)
    assert close(one, two)
    for k in p1:
        assert close(p1[k], p2[k])
    # an empty second image adds nothing but the batch size: half the loss
    pred2 = torch.cat([pred, torch.zeros_like(pred)])
    assert close(fn(pred2, target.repeat(2, 1, 1, 1) * torch.tensor([1.0, 0]).view(2, 1, 1, 1)),
                 float(one) / 2)


@pytest.mark.parametrize("overlap", [True, False])
def test_tie_goes_to_first_predictor(overlap):
    S, B, C = 2, 2, 1
    pred, target = make(S, B, C)
    set_obj(target, 0, 1, 0, C, 0, 0.5, 0.5, 0.4, 0.4)
    # identical boxes: either both overlap the object (equal IoU) or both miss it (IoU 0)
    box = (0.5, 0.5, 0.5, 0.5) if overlap else (0.5, 0.5, 0.0, 0.0)
    set_box(pred, 0, 1, 0, C, 0, 0.2, *box)
    set_box(pred, 0, 1, 0, C, 1, 0.9, *box)
    fn = YoloLoss(S=S, B=B, C=C, rescore=False)
    _, parts = fn(pred, target, components=True)
    # predictor 0 responsible: obj (0.2-1)^2 = 0.64, noobj 0.5*0.9^2 = 0.405
    # (were it predictor 1: obj 0.01, noobj 0.02)
    assert close(parts["obj"], 0.64) and close(parts["noobj"], 0.405)


def no_overlap_case(conf0=0.2, conf1=0.9):
    """S=2, B=2, C=1: object in cell (0, 0), x=y=0.5 (cell), w=h=0.1 -> xyxy [0.2, 0.2, 0.3, 0.3].

    Predictor 0: x=y=0 (cell), sqrt_w=sqrt_h=0.2 -> centre (0, 0), w=h=0.04: IoU 0,
      RMSE^2 = 0.25^2 + 0.25^2 + 0.06^2 + 0.06^2 = 0.1322.
    Predictor 1: x=1, y=0.5 -> centre (0.5, 0.25), w=h=0.04 -> [0.48, 0.23, 0.52, 0.27]: IoU 0,
      RMSE^2 = 0.25^2 + 0 + 0.0072 = 0.0697: the closer one.
    """
    pred, target = make(2, 2, 1)
    set_obj(target, 0, 0, 0, 1, 0, 0.5, 0.5, 0.1, 0.1)
    set_box(pred, 0, 0, 0, 1, 0, conf0, 0.0, 0.0, 0.2, 0.2)
    set_box(pred, 0, 0, 0, 1, 1, conf1, 1.0, 0.5, 0.2, 0.2)
    return pred, target


def test_no_overlap_falls_back_to_smallest_rmse():
    """Guards against the first-predictor rule (the project's before Darknet parity): when
    no box overlaps the object, Darknet's forward_detection_layer makes the box with the
    smallest RMSE responsible, here predictor 1."""
    pred, target = no_overlap_case()
    fn = YoloLoss(S=2, B=2, C=1, rescore=False)
    resp, iou = fn.responsible(pred[..., 1:].reshape(1, 2, 2, 2, 5), target)
    assert (iou == 0).all() and resp[0, 0, 0].tolist() == [0.0, 1.0]
    _, parts = fn(pred, target, components=True)
    # predictor 1: obj (0.9-1)^2 = 0.01, noobj 0.5*0.2^2 = 0.02 (predictor 0 would give 0.64, 0.405)
    assert close(parts["obj"], 0.01) and close(parts["noobj"], 0.02)
    # 5 * [(1-0.5)^2 + 0 + 2 * (0.2 - sqrt 0.1)^2] = 5 * (0.25 + 2 * 0.0135089) = 1.3850890
    assert close(parts["coord"], 5 * (0.25 + 2 * (0.2 - math.sqrt(0.1)) ** 2))
    _, parts = YoloLoss(S=2, B=2, C=1, rescore=True)(pred, target, components=True)
    assert close(parts["obj"], 0.81)          # rescore: the target is the IoU, 0


def test_any_overlap_beats_a_smaller_rmse():
    """A box that overlaps the object wins over a closer one that does not (Darknet compares
    RMSEs only while no IoU so far is positive)."""
    pred, target = no_overlap_case()
    # predictor 0 tiny beside the object: centre (0.33, 0.25), w=h=0.04 -> x from 0.31: no
    # overlap, RMSE^2 = 0.08^2 + 2 * 0.06^2 = 0.0136
    set_box(pred, 0, 0, 0, 1, 0, 0.2, 0.66, 0.5, 0.2, 0.2)
    # predictor 1 large, centre (0.5, 0.5), w=h=0.81: contains the object, IoU 0.01/0.6561
    set_box(pred, 0, 0, 0, 1, 1, 0.9, 1.0, 1.0, 0.9, 0.9)
    resp, iou = YoloLoss(S=2, B=2, C=1).responsible(pred[..., 1:].reshape(1, 2, 2, 2, 5), target)
    assert iou[0, 0, 0, 0] == 0 and close(iou[0, 0, 0, 1], 0.01 / 0.6561)
    assert resp[0, 0, 0].tolist() == [0.0, 1.0]
    swapped = pred.clone()  # the predictors swapped: the rule is not about their order
    swapped[..., 1:6], swapped[..., 6:11] = pred[..., 6:11], pred[..., 1:6]
    resp, _ = YoloLoss(S=2, B=2, C=1).responsible(swapped[..., 1:].reshape(1, 2, 2, 2, 5), target)
    assert resp[0, 0, 0].tolist() == [1.0, 0.0]


def test_gradients_finite_for_zero_size_boxes():
    S, B, C = 2, 2, 3
    pred, target = make(S, B, C, N=1)
    set_obj(target, 0, 0, 0, C, 2, 0.5, 0.5, 0.25, 0.25)   # predictions of size 0 vs real box
    set_obj(target, 0, 1, 1, C, 0, 0.3, 0.7, 0.0, 0.0)     # zero-size target
    pred.requires_grad_(True)                               # all zeros: sqrt_w = sqrt_h = 0
    for rescore in (True, False):
        pred.grad = None
        loss = YoloLoss(S=S, B=B, C=C, rescore=rescore)(pred, target)
        assert torch.isfinite(loss)
        loss.backward()
        g = pred.grad
        assert torch.isfinite(g).all()
        # cell (0,0): both IoUs 0 -> predictor 0; d/d sqrt_w of 5*(sqrt_w - 0.5)^2 at 0 = -5
        assert close(g[0, 0, 0, C + 3], -5.0) and close(g[0, 0, 0, C + 4], -5.0)
        assert g[0, 0, 0, C + 8] == 0                      # predictor 1 has no coord term
        # zero-size target: sqrt(0) = 0 = prediction -> zero gradient, not NaN
        assert g[0, 1, 1, C + 3] == 0 and g[0, 1, 1, C + 4] == 0
        # x: 5 * 2 * (0 - 0.3) = -3, y: 5 * 2 * (0 - 0.7) = -7
        assert close(g[0, 1, 1, C + 1], -3.0) and close(g[0, 1, 1, C + 2], -7.0)


def test_iou_confidence_target_is_a_constant():
    # With lambda_coord = 0 and no class error, box coordinates get no gradient through the
    # IoU used as the confidence target (Darknet's rescore treats it as data).
    pred, target = hand_case()
    pred[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    pred.requires_grad_(True)
    YoloLoss(S=2, B=2, C=2, lambda_coord=0.0)(pred, target).backward()
    boxes = pred.grad[0, ..., 2:].reshape(2, 2, 2, 5)
    assert (boxes[..., 1:] == 0).all()
    assert close(boxes[0, 0, 1, 0], 2 * (0.8 - IOU_RESP))   # d (conf - iou)^2 / d conf


# --------------------------------------------------------------------------- naive reference
def naive_iou(a, b):
    """a, b: (cx, cy, w, h) in plain floats."""
    ax1, ax2, ay1, ay2 = a[0] - a[2] / 2, a[0] + a[2] / 2, a[1] - a[3] / 2, a[1] + a[3] / 2
    bx1, bx2, by1, by2 = b[0] - b[2] / 2, b[0] + b[2] / 2, b[1] - b[3] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def naive_loss(pred, target, S, B, C, lambda_coord, lambda_noobj, rescore):
    N = pred.shape[0]
    p_all = pred.reshape(N, S, S, C + 5 * B).tolist()
    t_all = target.tolist()
    coord = obj = noobj = cls = 0.0
    for n in range(N):
        for i in range(S):
            for j in range(S):
                p, t = p_all[n][i][j], t_all[n][i][j]
                has = t[C] > 0
                tx, ty, tw, th = t[C + 1:C + 5]
                truth = ((tx + j) / S, (ty + i) / S, tw, th)
                if has:
                    for c in range(C):
                        cls += (p[c] - t[c]) ** 2
                ious = []
                for b in range(B):
                    conf, x, y, sw, sh = p[C + 5 * b:C + 5 * b + 5]
                    ious.append(naive_iou(((x + j) / S, (y + i) / S, sw * sw, sh * sh), truth))
                # Darknet's rule: the highest IoU; when no box overlaps, the smallest RMSE
                best = 0
                for b in range(1, B):
                    if ious[b] > ious[best]:
                        best = b
                if ious[best] == 0:
                    rmse = []
                    for b in range(B):
                        x, y, sw, sh = p[C + 5 * b + 1:C + 5 * b + 5]
                        rmse.append(math.sqrt(((x - tx) / S) ** 2 + ((y - ty) / S) ** 2
                                              + (sw * sw - tw) ** 2 + (sh * sh - th) ** 2))
                    best = min(range(B), key=lambda b: rmse[b])   # first of equal ones
                for b in range(B):
                    conf, x, y, sw, sh = p[C + 5 * b:C + 5 * b + 5]
                    if has and b == best:
                        coord += ((x - tx) ** 2 + (y - ty) ** 2
                                  + (sw - math.sqrt(tw)) ** 2 + (sh - math.sqrt(th)) ** 2)
                        obj += (conf - (ious[b] if rescore else 1.0)) ** 2
                    else:
                        noobj += conf ** 2
    return {"coord": lambda_coord * coord / N, "obj": obj / N,
            "noobj": lambda_noobj * noobj / N, "cls": cls / N}


def random_case(seed):
    rng = random.Random(seed)
    S, B, C, N = rng.randint(3, 7), rng.randint(1, 3), rng.randint(1, 20), rng.randint(1, 3)
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(N, S, S, C + 5)
    has = torch.rand(N, S, S, generator=g) < 0.5
    labels = torch.randint(0, C, (N, S, S), generator=g)
    target[..., :C] = torch.nn.functional.one_hot(labels, C).float()
    target[..., C + 1:C + 3] = torch.rand(N, S, S, 2, generator=g)
    target[..., C + 3:C + 5] = torch.rand(N, S, S, 2, generator=g) * 0.8 + 0.02
    target *= has[..., None].float()                 # empty cells are all zeros
    target[..., C] = has.float()
    pred = torch.randn(N, S, S, C + 5 * B, generator=g) * 0.3
    boxes = pred[..., C:].view(N, S, S, B, 5)
    boxes[..., 0] += 0.5                             # confidence around 0.5
    boxes[..., 1:3] = torch.rand(N, S, S, B, 2, generator=g) * 1.4 - 0.2
    boxes[..., 3:5] = torch.rand(N, S, S, B, 2, generator=g) * 1.1 - 0.1   # a few negative sqrt
    return S, B, C, pred, target, rng


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("layout", ["flat", "grid"])
@pytest.mark.parametrize("rescore", [True, False])
def test_agrees_with_naive_loops(seed, layout, rescore):
    S, B, C, pred, target, rng = random_case(seed)
    lc, ln = rng.choice([5.0, 2.0]), rng.choice([0.5, 0.25])
    want = naive_loss(pred, target, S, B, C, lc, ln, rescore)
    x = pred.reshape(pred.shape[0], -1) if layout == "flat" else pred
    if layout == "flat":
        assert x.shape == (pred.shape[0], S * S * (C + 5 * B))
    total, got = YoloLoss(S=S, B=B, C=C, lambda_coord=lc, lambda_noobj=ln,
                          rescore=rescore)(x, target, components=True)
    for k in want:
        assert close(got[k], want[k], tol=1e-4), (k, float(got[k]), want[k])
    assert close(total, sum(want.values()), tol=1e-4)


def test_naive_reference_matches_hand_case():
    # the reference itself is checked against the hand-worked numbers
    pred, target = hand_case()
    want = naive_loss(pred, target, 2, 2, 2, 5.0, 0.5, True)
    for k, v in HAND.items():
        assert close(want[k], v)
