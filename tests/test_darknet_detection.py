"""Decoding and loss against Darknet's detection layer (src/detection_layer.c), the C code that
produced the paper's numbers, run through the harness tests/darknet/detection.c.

The same network output (and ground truth) goes to both, each in its own layout: the project's
per cell ``[C classes | conf, x, y, sqrt_w, sqrt_h per box]``, Darknet's every cell's classes,
then every cell's confidences, then every cell's boxes. See docs/darknet-parity.md.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from loss import YoloLoss
from utils import decode_predictions, encode_target

# Box corners: Darknet computes them in double from float centres and sizes, the project in
# float32 (box_convert): they differ by one float32 ulp at most (1.2e-7 near 1, measured).
BOX_ATOL = 3e-7
# Delta vs -(N/2) * gradient: the same float32 terms, but Darknet's (truth - output) is
# computed in double where sqrt() is involved and its IoU without the cell offset: 7.2e-7
# measured, about 1.5 ulps of the largest deltas (coord_scale * 1.2 = 6).
DELTA_ATOL = 2e-6


def detection_scales(darknet) -> dict:
    """object/noobject/class/coord scales of cfg/yolov1.cfg's [detection] section."""
    text = (darknet.cfg_dir / "yolov1.cfg").read_text()
    section = text.split("[detection]", 1)[1]
    return {k: float(v) for k, v in re.findall(r"^(\w+_scale)\s*=\s*([\d.]+)", section, re.M)}


def to_darknet(pred: torch.Tensor, S: int, B: int, C: int) -> np.ndarray:
    """Project layout (N, S, S, C+5B) -> Darknet's (N, S*S*(C+5B)) float32."""
    pred = pred.reshape(-1, S, S, C + 5 * B)
    boxes = pred[..., C:].reshape(-1, S * S, B, 5)
    parts = (pred[..., :C].reshape(-1, S * S * C), boxes[..., 0].reshape(-1, S * S * B),
             boxes[..., 1:].reshape(-1, S * S * B * 4))
    return torch.cat(parts, 1).detach().numpy().astype(np.float32)


def from_darknet(flat: np.ndarray, S: int, B: int, C: int) -> torch.Tensor:
    """Inverse of :func:`to_darknet`: Darknet layout -> project (N, S, S, C+5B)."""
    flat = torch.from_numpy(np.asarray(flat, np.float32)).reshape(-1, S * S * (C + 5 * B))
    cls, conf, box = flat.split([S * S * C, S * S * B, S * S * B * 4], 1)
    boxes = torch.cat((conf.reshape(-1, S * S, B, 1), box.reshape(-1, S * S, B, 4)), -1)
    return torch.cat((cls.reshape(-1, S * S, C), boxes.flatten(2)), -1).reshape(-1, S, S, C + 5 * B)


def to_darknet_truth(target: torch.Tensor, C: int) -> np.ndarray:
    """Project target (N, S, S, [classes, obj, x, y, w, h]) -> Darknet's per cell
    ``[is_obj, classes, x, y, w, h]`` (fill_truth_region's layout)."""
    t = torch.cat((target[..., C:C + 1], target[..., :C], target[..., C + 1:]), -1)
    return t.reshape(len(t), -1).numpy().astype(np.float32)


def write(path, array) -> str:
    np.ascontiguousarray(array, np.float32).tofile(path)
    return str(path)


# --------------------------------------------------------------------------- loss
def random_case(seed: int, N: int, S: int, B: int, C: int):
    """Outputs around a trained network's ranges; objects in about half the cells. In a
    third of the cells the boxes and the object are tiny, so that in most of those no box
    overlaps the object (Darknet's smallest-RMSE fallback)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(N, S, S, C + 5 * B, generator=g)
    box = pred[..., C:].view(N, S, S, B, 5)
    box[..., 1:3] = torch.rand(N, S, S, B, 2, generator=g) * 1.4 - 0.2
    box[..., 3:5] = torch.rand(N, S, S, B, 2, generator=g) * 0.9 + 0.05
    tiny = torch.rand(N, S, S, 1, generator=g) < 1 / 3
    box[..., 3:5] = torch.where(tiny[..., None], box[..., 3:5] * 0.1, box[..., 3:5])
    target = torch.zeros(N, S, S, C + 5)
    has = torch.rand(N, S, S, generator=g) < 0.5
    target[..., :C] = torch.nn.functional.one_hot(torch.randint(0, C, (N, S, S), generator=g), C).float()
    target[..., C + 1:C + 3] = torch.rand(N, S, S, 2, generator=g)
    target[..., C + 3:C + 5] = torch.rand(N, S, S, 2, generator=g) * torch.where(tiny, 0.02, 0.5) + 0.01
    target = target * has[..., None]
    target[..., C] = has.float()
    return pred, target


def darknet_delta(darknet, tmp_path, pred, target, S, B, C, scales):
    exe = darknet.compile("detection.c", tmp_path)
    out = tmp_path / "delta.bin"
    darknet.run(exe, "loss", S, B, C, len(pred), scales["object_scale"], scales["noobject_scale"],
                scales["class_scale"], scales["coord_scale"],
                write(tmp_path / "out.bin", to_darknet(pred, S, B, C)),
                write(tmp_path / "truth.bin", to_darknet_truth(target, C)), out)
    values = np.fromfile(out, np.float32)
    return values[:-1].reshape(len(pred), -1), float(values[-1])


def project_gradient(pred, target, S, B, C, scales):
    x = pred.clone().requires_grad_(True)
    fn = YoloLoss(S, B, C, lambda_coord=scales["coord_scale"], lambda_noobj=scales["noobject_scale"])
    fn(x, target).backward()
    return x.grad


@pytest.mark.parametrize("B", [3, 2])   # yolov1.cfg (num=3) and yolov1-tiny.cfg (num=2)
@pytest.mark.parametrize("seed", range(3))
def test_loss_gradient_is_minus_twice_darknets_delta_over_n(darknet, tmp_path, seed, B):
    """On the same outputs and truth, Darknet's detection-layer delta equals -(N/2) times the
    gradient of the project's equation 3 (a mean over the N images; Darknet's delta is
    scale * (truth - output), half the gradient of one image's sum of squares): every
    term, the responsible predictor (highest IoU, smallest RMSE when none overlaps: guards
    the first-predictor rule the project had), rescore (the confidence target is the IoU),
    noobject for the other boxes of an object cell, the class term and coord_scale."""
    S, C, N = 7, 20, 3
    scales = detection_scales(darknet)
    # equation 3 has no object or class weight: yolov1.cfg's are 1
    assert scales["object_scale"] == 1 and scales["class_scale"] == 1
    pred, target = random_case(seed, N, S, B, C)
    delta, cost = darknet_delta(darknet, tmp_path, pred, target, S, B, C, scales)
    ours = -(N / 2) * to_darknet(project_gradient(pred, target, S, B, C, scales), S, B, C)
    np.testing.assert_allclose(ours, delta, atol=DELTA_ATOL, rtol=0)
    # Darknet's reported cost is not equation 3 but the sum of the squared deltas (mag_array)
    assert cost == pytest.approx(float((delta.astype(np.float64) ** 2).sum()), rel=1e-5)

    # the cases that tell the responsible-box rules apart are there: object cells where no
    # box overlaps and the closest is not the first (the first-predictor rule fails on them)
    resp, iou = YoloLoss(S, B, C).responsible(pred[..., C:].reshape(N, S, S, B, 5), target)
    obj = target[..., C] > 0
    fallback = obj & (iou.amax(-1) == 0)
    assert (resp[fallback].argmax(-1) > 0).sum() >= 3, "no RMSE fallback to a later predictor"
    assert (resp[obj & ~fallback].argmax(-1) > 0).sum() >= 3


def test_loss_responsible_box_hand_case_against_darknet(darknet, tmp_path):
    """The hand-worked no-overlap case of test_loss.py: Darknet also makes predictor 1 (the
    smaller RMSE) responsible, so its coordinates get the coord delta and predictor 0 the
    noobject one."""
    from test_loss import no_overlap_case

    pred, target = no_overlap_case()
    S, B, C = 2, 2, 1
    scales = detection_scales(darknet)
    delta, _ = darknet_delta(darknet, tmp_path, pred, target, S, B, C, scales)
    cell = from_darknet(delta, S, B, C)[0, 0, 0]
    # predictor 0: noobject 0.5 * (0 - 0.2); predictor 1: rescore, IoU 0 -> 1 * (0 - 0.9)
    assert cell[C].item() == pytest.approx(-0.1) and cell[C + 5].item() == pytest.approx(-0.9)
    assert (cell[C + 1:C + 5] == 0).all()                        # no coord delta for predictor 0
    assert cell[C + 6].item() == pytest.approx(5 * (0.5 - 1.0))  # coord_scale * (x - x^)
    ours = -(1 / 2) * project_gradient(pred, target, S, B, C, scales)
    np.testing.assert_allclose(to_darknet(ours, S, B, C), delta, atol=DELTA_ATOL, rtol=0)


# --------------------------------------------------------------------------- decoding
def random_outputs(seed: int, S: int, B: int, C: int) -> torch.Tensor:
    """One image's outputs with class probabilities and confidences in [0, 1] and boxes
    inside the image (see the two tests below for why)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(1, S, S, C + 5 * B, generator=g)
    pred[..., :C] = pred[..., :C] ** 3                 # a few likely classes per cell
    box = pred[..., C:].view(1, S, S, B, 5)
    offset = torch.arange(S, dtype=torch.float32)
    cx = (box[..., 1] + offset.view(1, 1, S, 1)) / S
    cy = (box[..., 2] + offset.view(1, S, 1, 1)) / S
    room_w, room_h = 2 * torch.minimum(cx, 1 - cx), 2 * torch.minimum(cy, 1 - cy)
    box[..., 3] = (torch.rand(1, S, S, B, generator=g) * 0.95 * room_w).sqrt()
    box[..., 4] = (torch.rand(1, S, S, B, generator=g) * 0.95 * room_h).sqrt()
    return pred


def darknet_detections(darknet, tmp_path, pred, S, B, C, thresh, nms) -> np.ndarray:
    exe = darknet.compile("detection.c", tmp_path)
    text = darknet.run(exe, "decode", S, B, C, thresh, nms, write(tmp_path / "out.bin", to_darknet(pred, S, B, C)))
    return np.array([line.split() for line in text.splitlines()], np.float64).reshape(-1, 6)


def canonical(dets) -> np.ndarray:
    """Rows ``class, score, x1, y1, x2, y2`` by class, then score (high first)."""
    dets = np.asarray(dets, np.float64)
    return dets[np.lexsort((-dets[:, 1], dets[:, 0]))]


# `darknet yolo valid` (validate_yolo: thresh .001, NMS .5) and `darknet yolo test` (test_yolo:
# thresh .2, NMS .4), both with do_nms_sort, Darknet's per-class NMS.
@pytest.mark.parametrize("thresh, nms", [(0.001, 0.5), (0.2, 0.4)])
@pytest.mark.parametrize("B, seed", [(3, 0), (3, 1), (2, 2), (2, 3)])
def test_decoding_gives_darknets_detections(darknet, tmp_path, thresh, nms, B, seed):
    """The same output decoded by Darknet (get_network_boxes -> get_detection_detections,
    do_nms_sort, corners clipped as print_yolo_detections does) and by decode_predictions:
    the same (box, class) pairs, with scores identical bit for bit (one float32 product in
    both) and corners within a few float32 ulps. Guards the all-class scoring: the top-class
    decoding the project had keeps fewer pairs (checked to differ here)."""
    S, C = 7, 20
    pred = random_outputs(seed, S, B, C)
    want = canonical(darknet_detections(darknet, tmp_path, pred, S, B, C, thresh, nms))
    (got,) = decode_predictions(pred, S, B, C, conf_threshold=thresh, nms_iou=nms)
    got = canonical(got.numpy())
    assert len(want) > 20 and got.shape == want.shape
    assert np.array_equal(got[:, :2], want[:, :2].astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], atol=BOX_ATOL, rtol=0)
    (top,) = decode_predictions(pred, S, B, C, conf_threshold=thresh, nms_iou=nms, all_classes=False)
    assert len(top) < len(want)


def test_decoding_clips_boxes_as_darknet_writes_them(darknet, tmp_path):
    """Boxes crossing the image's border: Darknet clips the corners when it writes them
    (print_yolo_detections), after its NMS; the project clips them before its NMS (intended:
    a clipped box is what is reported). Without suppression (NMS IoU 1) the two agree."""
    S, B, C = 7, 2, 20
    pred = torch.rand(1, S, S, C + 5 * B, generator=torch.Generator().manual_seed(5))
    pred[..., C:].view(1, S, S, B, 5)[..., 3:5] *= 1.2            # up to 1.44 of the image
    want = canonical(darknet_detections(darknet, tmp_path, pred, S, B, C, 0.05, 1.0))
    (got,) = decode_predictions(pred, S, B, C, conf_threshold=0.05, nms_iou=1.0)
    got = canonical(got.numpy())
    assert ((want[:, 2:] == 0) | (want[:, 2:] == 1)).any(axis=1).sum() > 50   # many clipped
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], atol=BOX_ATOL, rtol=0)


def test_decoding_differs_from_darknet_outside_0_1(darknet, tmp_path):
    """What differs on purpose: Darknet multiplies the raw outputs, the project clamps the
    class probability and the confidence to [0, 1] first. A box with confidence -0.5 and
    class output -0.8 is a Darknet detection scoring 0.4; the project drops it (confidence
    clamped to 0), and a confidence of 1.4 scores at most 1."""
    S, B, C = 2, 1, 2
    pred = torch.zeros(1, S, S, C + 5 * B)
    pred[0, 0, 0] = torch.tensor([-0.8, 0.0, -0.5, 0.5, 0.5, 0.5, 0.5])
    pred[0, 1, 1] = torch.tensor([0.5, 0.0, 1.4, 0.5, 0.5, 0.5, 0.5])
    want = canonical(darknet_detections(darknet, tmp_path, pred, S, B, C, 0.1, 0.5))
    np.testing.assert_allclose(want[:, :2], [[0, 0.7], [0, 0.4]], rtol=1e-6)
    (got,) = decode_predictions(pred, S, B, C, conf_threshold=0.1, nms_iou=0.5)
    np.testing.assert_allclose(got[:, :2].numpy(), [[0, 0.5]], rtol=1e-6)


# --------------------------------------------------------------------------- ground truth
def test_target_encoding_matches_fill_truth_region(darknet, tmp_path):
    """The project's encode_target and Darknet's fill_truth_region (no flip or crop) put the
    same objects in the same cells with the same cell-relative centres and sizes. Where they
    differ on purpose (not exercised here, one object per cell): Darknet shuffles the label
    file's boxes and keeps the first written to a cell (the project keeps the first in file
    order), and it skips boxes under 0.005 of the image wide or high."""
    S, C = 7, 20
    g = torch.Generator().manual_seed(11)
    cells = torch.randperm(S * S, generator=g)[:15]
    centres = (torch.stack((cells % S, cells // S), 1) + torch.rand(15, 2, generator=g) * 0.98 + 0.01) / S
    sizes = torch.rand(15, 2, generator=g) * 0.3 + 0.01
    half = torch.minimum(centres, 1 - centres) * 2            # inside the image: no clipping
    boxes = torch.cat((centres, torch.minimum(sizes, half * 0.99)), 1)
    labels = torch.randint(0, C, (15,), generator=g)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    lines = [f"{int(c)} {' '.join(f'{float(v):.9g}' for v in b)}" for c, b in zip(labels, boxes)]
    (tmp_path / "labels" / "a.txt").write_text("\n".join(lines) + "\n")
    exe = darknet.compile("detection.c", tmp_path)
    text = darknet.run(exe, "truth", S, C, 0, tmp_path / "images" / "a.jpg")
    want = torch.tensor([float(v) for v in text.split()]).reshape(S, S, 5 + C)
    target = encode_target(boxes, labels, S=S, C=C)
    got = torch.cat((target[..., C:C + 1], target[..., :C], target[..., C + 1:]), -1)
    assert int(want[..., 0].sum()) == 15
    assert torch.equal(got[..., :1 + C], want[..., :1 + C])
    # correct_boxes recomputes the centre from the corners: 2.4e-7 measured
    torch.testing.assert_close(got[..., 1 + C:], want[..., 1 + C:], atol=1e-6, rtol=0)
