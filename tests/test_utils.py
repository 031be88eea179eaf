"""Target encoding, prediction decoding, NMS, IoU and checkpoint safety."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_convert, box_iou
from torchvision.ops.boxes import _batched_nms_coordinate_trick

import utils
from utils import (UserError, decode_predictions, elementwise_iou, encode_target,
                   load_checkpoint, load_state_checked, save_checkpoint, target_to_boxes)


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize("seed", range(5))
def test_encode_decode_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    S, C = 7, 20
    K = 12
    cells = torch.randperm(S * S, generator=g)[:K]            # distinct cells
    row, col = cells // S, cells % S
    off = torch.rand(K, 2, generator=g)
    cx, cy = (col + off[:, 0]) / S, (row + off[:, 1]) / S
    wh = torch.rand(K, 2, generator=g) * 0.9 + 0.05
    boxes = torch.stack([cx, cy, wh[:, 0], wh[:, 1]], 1)
    labels = torch.randint(0, C, (K,), generator=g)

    target = encode_target(boxes, labels, S=S, C=C)
    assert target.shape == (S, S, C + 5)
    assert int(target[..., C].sum()) == K
    assert torch.equal(target[..., :C].sum(-1), target[..., C])   # one-hot where objects are
    got_labels, got_xyxy = target_to_boxes(target)
    order = torch.argsort(cells)                                 # decode is row-major
    assert torch.equal(got_labels, labels[order])
    torch.testing.assert_close(got_xyxy, box_convert(boxes[order], "cxcywh", "xyxy"),
                               atol=1e-6, rtol=0)


def test_encode_target_by_hand():
    # S=4, C=3. Box centre (0.6, 0.3): column floor(2.4) = 2, row floor(1.2) = 1,
    # x = 2.4 - 2 = 0.4, y = 1.2 - 1 = 0.2 (cell-relative); w, h stay image-relative.
    t = encode_target(torch.tensor([[0.6, 0.3, 0.5, 0.25]]), torch.tensor([2]), S=4, C=3)
    assert t[1, 2].tolist() == pytest.approx([0, 0, 1, 1, 0.4, 0.2, 0.5, 0.25], abs=1e-6)
    t[1, 2] = 0
    assert not t.any()


def test_two_objects_in_one_cell_first_keeps_it():
    S, C = 4, 5
    # Objects 0 and 2 both centre in cell (row 1, col 2); object 1 in cell (row 0, col 0).
    boxes = torch.tensor([[0.60, 0.30, 0.2, 0.2],
                          [0.10, 0.10, 0.1, 0.1],
                          [0.70, 0.40, 0.5, 0.5]])
    labels = torch.tensor([3, 1, 4])
    t = encode_target(boxes, labels, S=S, C=C)
    assert int(t[..., C].sum()) == 2
    assert t[1, 2, :C].argmax() == 3 and t[1, 2, 4] == 0          # object 0's class, not 4
    assert t[1, 2, C + 1:].tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2], abs=1e-6)
    assert t[0, 0, 1] == 1
    # order in the file decides, not which cell comes first in the grid
    t2 = encode_target(boxes[[2, 1, 0]], labels[[2, 1, 0]], S=S, C=C)
    assert t2[1, 2, :C].argmax() == 4
    assert t2[1, 2, C + 1:].tolist() == pytest.approx([0.8, 0.6, 0.5, 0.5], abs=1e-6)


def test_boxes_on_the_far_edge_go_in_the_last_cell():
    S, C = 7, 2
    boxes = torch.tensor([[1.0, 1.0, 0.2, 0.2], [1.0, 0.0, 0.1, 0.1], [0.0, 1.0, 0.3, 0.3]])
    t = encode_target(boxes, torch.tensor([0, 1, 0]), S=S, C=C)
    # cx = 1.0: 1.0*7 = 7 -> clamped to column 6, x = 7 - 6 = 1.0
    assert t[6, 6, C:].tolist() == pytest.approx([1, 1.0, 1.0, 0.2, 0.2])
    assert t[0, 6, C:].tolist() == pytest.approx([1, 1.0, 0.0, 0.1, 0.1])
    assert t[6, 0, C:].tolist() == pytest.approx([1, 0.0, 1.0, 0.3, 0.3])
    labels, xyxy = target_to_boxes(t)
    assert len(labels) == 3
    assert xyxy[-1].tolist() == pytest.approx([0.9, 0.9, 1.1, 1.1])   # centre (1, 1) recovered


def test_empty_target():
    t = encode_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), S=3, C=4)
    assert t.shape == (3, 3, 9) and not t.any()
    labels, xyxy = target_to_boxes(t)
    assert labels.shape == (0,) and xyxy.shape == (0, 4)


# --------------------------------------------------------------------------- decoding
def hand_prediction():
    """S=2, B=2, C=3, one image. Everything else zero (conf 0 -> score 0 -> dropped).

    Cell (row 0, col 1): class scores [0.1, 0.9, 1.3] -> clamp -> class 2, prob 1.0
      predictor 0: conf 0.5, x 0.5, y 0.5, sqrt_w 0.4, sqrt_h 0.6 -> w 0.16, h 0.36
        centre ((0.5+1)/2, 0.5/2) = (0.75, 0.25) -> [0.67, 0.07, 0.83, 0.43], score 1.0*0.5
      predictor 1: conf 1.4 -> clamp 1.0, x 0.1, y 0.9, sqrt 0.2 -> w = h = 0.04
        centre (0.55, 0.45) -> [0.53, 0.43, 0.57, 0.47], score 1.0 (touches box above: IoU 0)
    Cell (row 1, col 0): class scores [0.8, -0.2, 0.3] -> class 0, prob 0.8
      predictor 0: conf 0.25, x 0.2, y 0.5, sqrt_w 0.8, sqrt_h 0.5 -> w 0.64, h 0.25
        centre (0.1, 0.75) -> [-0.22, 0.625, 0.42, 0.875] clipped to [0, 0.625, 0.42, 0.875]
        score 0.8*0.25 = 0.2
      predictor 1: conf -0.3 -> clamp 0 -> score 0, dropped
    Every class is scored (paper Section 2, Darknet): the two boxes of cell (0, 1) are also
    detections of classes 0 and 1, and the box of cell (1, 0) of class 2 (0.25 * 0.3 = 0.075);
    with ``all_classes=False`` each box keeps only its top class (HAND_DETS_TOP).
    """
    S, B, C = 2, 2, 3
    p = torch.zeros(1, S, S, C + 5 * B)
    p[0, 0, 1, :C] = torch.tensor([0.1, 0.9, 1.3])
    p[0, 0, 1, C:C + 5] = torch.tensor([0.5, 0.5, 0.5, 0.4, 0.6])
    p[0, 0, 1, C + 5:] = torch.tensor([1.4, 0.1, 0.9, 0.2, 0.2])
    p[0, 1, 0, :C] = torch.tensor([0.8, -0.2, 0.3])
    p[0, 1, 0, C:C + 5] = torch.tensor([0.25, 0.2, 0.5, 0.8, 0.5])
    p[0, 1, 0, C + 5:] = torch.tensor([-0.3, 0.5, 0.5, 0.5, 0.5])
    p[0, 1, 1, :C] = 1.0          # confident class but zero confidence: score 0
    return p.reshape(1, -1)


BOX_A, BOX_B, BOX_C = [0.67, 0.07, 0.83, 0.43], [0.53, 0.43, 0.57, 0.47], [0.0, 0.625, 0.42, 0.875]
HAND_DETS = [[2, 1.0, *BOX_B], [1, 0.9, *BOX_B], [2, 0.5, *BOX_A], [1, 0.45, *BOX_A],
             [0, 0.2, *BOX_C], [0, 0.1, *BOX_B], [2, 0.075, *BOX_C], [0, 0.05, *BOX_A]]
HAND_DETS_TOP = [[2, 1.0, *BOX_B], [2, 0.5, *BOX_A], [0, 0.2, *BOX_C]]


def test_decode_hand_built_prediction():
    """Guards the all-class scoring of the paper and Darknet: the project once kept only each
    box's top class (3 detections here instead of 8), losing recall at low thresholds."""
    (dets,) = decode_predictions(hand_prediction(), S=2, B=2, C=3, conf_threshold=0.01)
    assert dets.shape == (8, 6)
    torch.testing.assert_close(dets, torch.tensor(HAND_DETS), atol=1e-6, rtol=0)
    # the (N, S, S, C+5B) layout decodes the same
    (dets2,) = decode_predictions(hand_prediction().reshape(1, 2, 2, 13), S=2, B=2, C=3)
    torch.testing.assert_close(dets2, dets)
    (top,) = decode_predictions(hand_prediction(), S=2, B=2, C=3, conf_threshold=0.01, all_classes=False)
    torch.testing.assert_close(top, torch.tensor(HAND_DETS_TOP), atol=1e-6, rtol=0)


def test_confidence_threshold():
    (dets,) = decode_predictions(hand_prediction(), S=2, B=2, C=3, conf_threshold=0.3)
    torch.testing.assert_close(dets, torch.tensor(HAND_DETS[:4]), atol=1e-6, rtol=0)
    (dets,) = decode_predictions(hand_prediction(), S=2, B=2, C=3, conf_threshold=0.9)
    torch.testing.assert_close(dets, torch.tensor(HAND_DETS[:1]), atol=1e-6, rtol=0)
    (dets,) = decode_predictions(hand_prediction(), S=2, B=2, C=3, conf_threshold=0.3, all_classes=False)
    torch.testing.assert_close(dets, torch.tensor(HAND_DETS_TOP[:2]), atol=1e-6, rtol=0)


def overlapping_pair(cls_a, cls_b, conf_a=0.9, conf_b=0.6):
    """S=2, B=1, C=2: cell (0,0) box centre x = 0.99/2 = 0.495, cell (0,1) centre (1.01)/2 = 0.505,
    both y 0.25, w = h = 0.25: IoU = 0.24*0.25 / (2*0.0625 - 0.06) = 0.06/0.065 = 0.923."""
    S, B, C = 2, 1, 2
    p = torch.zeros(1, S, S, C + 5 * B)
    p[0, 0, 0, cls_a] = 1.0
    p[0, 0, 0, C:] = torch.tensor([conf_a, 0.99, 0.5, 0.5, 0.5])
    p[0, 0, 1, cls_b] = 1.0
    p[0, 0, 1, C:] = torch.tensor([conf_b, 0.01, 0.5, 0.5, 0.5])
    return p


def test_nms_suppresses_lower_scored_same_class_box():
    (dets,) = decode_predictions(overlapping_pair(1, 1), S=2, B=1, C=2, nms_iou=0.5)
    assert dets.shape[0] == 1
    assert dets[0, 1] == pytest.approx(0.9)
    assert dets[0, 2:].tolist() == pytest.approx([0.37, 0.125, 0.62, 0.375])
    # with the scores swapped the other box survives
    (dets,) = decode_predictions(overlapping_pair(1, 1, 0.6, 0.9), S=2, B=1, C=2)
    assert dets.shape[0] == 1 and dets[0, 2:].tolist() == pytest.approx([0.38, 0.125, 0.63, 0.375])
    # IoU 0.923 is below a 0.95 threshold: both kept
    (dets,) = decode_predictions(overlapping_pair(1, 1), S=2, B=1, C=2, nms_iou=0.95)
    assert dets.shape[0] == 2


def test_nms_keeps_overlapping_boxes_of_different_classes():
    (dets,) = decode_predictions(overlapping_pair(0, 1), S=2, B=1, C=2)
    assert dets.shape[0] == 2
    assert dets[:, 0].tolist() == [0, 1] and dets[:, 1].tolist() == pytest.approx([0.9, 0.6])


def test_nms_never_crosses_images():
    p = overlapping_pair(1, 1)
    a, b = p.clone(), p.clone()
    a[0, 0, 1, 2] = 0          # image 0 keeps only the first box, image 1 only the second
    b[0, 0, 0, 2] = 0
    out = decode_predictions(torch.cat([a, b]), S=2, B=1, C=2)
    assert [len(d) for d in out] == [1, 1]
    assert out[0][0, 1] == pytest.approx(0.9) and out[1][0, 1] == pytest.approx(0.6)


def random_predictions(seed, N=4, S=5, B=2, C=6):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(N, S, S, C + 5 * B, generator=g)
    return p.reshape(N, -1), S, B, C


@pytest.mark.parametrize("seed", range(3))
def test_batch_decode_equals_per_image(seed):
    p, S, B, C = random_predictions(seed)
    batch = decode_predictions(p, S=S, B=B, C=C, conf_threshold=0.05, nms_iou=0.4)
    assert len(batch) == p.shape[0]
    assert sum(len(d) for d in batch) > 10
    for n in range(p.shape[0]):
        (single,) = decode_predictions(p[n:n + 1], S=S, B=B, C=C, conf_threshold=0.05, nms_iou=0.4)
        torch.testing.assert_close(batch[n], single)
        assert (batch[n][:-1, 1] >= batch[n][1:, 1]).all()       # sorted by score
        assert ((batch[n][:, 2:] >= 0) & (batch[n][:, 2:] <= 1)).all()   # clipped


def test_nms_result_has_no_same_class_overlap():
    p, S, B, C = random_predictions(7, N=2)
    for d in decode_predictions(p, S=S, B=B, C=C, conf_threshold=0.0, nms_iou=0.3):
        for c in d[:, 0].unique():
            boxes = d[d[:, 0] == c, 2:]
            iou = box_iou(boxes, boxes)
            iou.fill_diagonal_(0)
            assert (iou <= 0.3).all()


def test_max_det():
    p, S, B, C = random_predictions(3)
    full = decode_predictions(p, S=S, B=B, C=C)
    capped = decode_predictions(p, S=S, B=B, C=C, max_det=3)
    for f, c in zip(full, capped):
        assert len(f) > 3 and len(c) == 3
        torch.testing.assert_close(c, f[:3])          # the three best


def torchvision_per_image(pred, S, B, C, conf_threshold, nms_iou, max_det=None, all_classes=True):
    """Independent reference for decode_predictions' NMS: one image at a time, torchvision's
    batched_nms over the classes of the image (the decoding itself as in utils)."""
    out = []
    for p in pred.reshape(len(pred), S, S, C + 5 * B):
        cls_scores, box_pred = utils.split_predictions(p[None], S, B, C)
        boxes = utils.cell_to_image_boxes(box_pred[..., 1:3], box_pred[..., 3:5].square())
        boxes = boxes.clamp(0, 1).reshape(-1, 4)
        if all_classes:  # every (box, class) pair, box by box
            prob = cls_scores[0].clamp(0, 1)[:, :, None, :]
            score = (box_pred[0, ..., 0].clamp(0, 1)[..., None] * prob).flatten()
            label = torch.arange(C).repeat(S * S * B)
            boxes = boxes.repeat_interleave(C, dim=0)
        else:
            prob, label = cls_scores[0].clamp(0, 1).max(-1)
            score = (box_pred[0, ..., 0].clamp(0, 1) * prob[..., None]).flatten()
            label = label[..., None].expand(-1, -1, B).flatten()
        c = score > conf_threshold
        # batched_nms itself, below 4000 coordinates on the CPU; above (all-class scoring of
        # a 7x7x2x20 image) it loops over the classes and sorts the result unstably (tie order)
        kept = _batched_nms_coordinate_trick(boxes[c], score[c], label[c], nms_iou)[:max_det]
        out.append(torch.cat((label[c][kept, None].float(), score[c][kept, None], boxes[c][kept]), 1))
    return out


def tie_heavy_predictions(seed, N, S, B, C):
    """Raw outputs with many ties and near-duplicates: class scores and confidences on a
    coarse grid (equal scores), in a few classes; in every cell box 1 copies box 0 and box 2
    is box 0 at half its width with the same left edge, so its IoU with box 0 is 0.5 up to
    float32 rounding (which torchvision's class offsets change)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(N, S, S, C + 5 * B, generator=g) * 1.2 - 0.1
    p[..., :C] = (p[..., :C] * 4).round() / 4
    box = p[..., C:].reshape(N, S, S, B, 5)
    box[..., 0] = (box[..., 0] * 4).round() / 4
    if B >= 3:
        box[..., 1, :] = box[..., 0, :]
        w = box[..., 0, 3].square()
        box[..., 2, :] = box[..., 0, :]
        box[..., 2, 3] = (w / 2).sqrt()
        box[..., 2, 1] = box[..., 0, 1] - (w - w / 2) / 2 * S
    p[..., C:] = box.reshape(N, S, S, 5 * B)
    return p.reshape(N, S * S * (C + 5 * B))


@pytest.mark.parametrize("seed", range(3))
def test_batch_nms_equals_torchvision_per_image(seed):
    """Same boxes in the same order as torchvision's batched_nms image by image, with
    ties, near-duplicates, thresholds not representable in float32 (0.4, 0.45, 0.7), any
    batch size (0 too), images without any box, and max_det."""
    for k, (N, S, B, C) in enumerate([(0, 2, 3, 2), (1, 2, 3, 1), (3, 3, 3, 2), (6, 4, 3, 3),
                                      (5, 3, 1, 2), (8, 7, 2, 20), (4, 5, 3, 2)]):
        pred = tie_heavy_predictions(100 * seed + k, N, S, B, C)
        if N > 1:
            pred[1] = -1.0  # an image without any box above the threshold
        for nms_iou in (0.5, 0.4, 0.45, 0.7, 0.0, 1.0):
            for conf_threshold, max_det in ((0.01, None), (0.3, 2), (-1.0, None), (0.0, 1)):
                # each box's best class only, half of the time and with tiny chunks (all-class
                # scoring makes ~20x more pairs: thousands of chunks of 5)
                top = bool((k + seed) % 2) or seed % 3 == 2
                got = decode_predictions(pred, S, B, C, conf_threshold, nms_iou, max_det, all_classes=not top)
                want = torchvision_per_image(pred, S, B, C, conf_threshold, nms_iou, max_det, not top)
                assert len(got) == N
                for n, (g, w) in enumerate(zip(got, want)):
                    assert torch.equal(g, w), (N, S, B, C, nms_iou, conf_threshold, max_det, n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda_equals_cpu():
    pred = tie_heavy_predictions(0, 64, 7, 3, 20)
    for nms_iou in (0.5, 0.4):
        cpu = decode_predictions(pred, 7, 3, 20, 0.005, nms_iou)
        cuda = decode_predictions(pred.cuda(), 7, 3, 20, 0.005, nms_iou)
        assert all(d.is_cuda for d in cuda)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, cuda))


def test_scale_to_pixels_and_detection_table():
    """predict.scale_to_pixels (one multiply per batch) gives each image's detections in its
    own pixels, and detection_table lists them image by image, with min_score."""
    import predict
    dets = [torch.tensor([[1, 0.9, 0.1, 0.2, 0.5, 0.6]]), torch.zeros(0, 6),
            torch.tensor([[0, 0.3, 0.0, 0.0, 1.0, 1.0], [1, 0.5, 0.5, 0.5, 0.75, 1.0]])]
    pixels = predict.scale_to_pixels(dets, [(100, 50), (7, 7), (20, 40)])
    assert [p.shape for p in pixels] == [(1, 6), (0, 6), (2, 6)]
    np.testing.assert_allclose(pixels[0], [[1, 0.9, 10, 10, 50, 30]], rtol=1e-6)
    np.testing.assert_allclose(pixels[2], [[0, 0.3, 0, 0, 20, 40], [1, 0.5, 10, 20, 15, 40]], rtol=1e-6)
    table = predict.detection_table(dict(zip([5, 3, 9], pixels)), ["a", "b"], min_score=0.4)
    assert table["image"].tolist() == [5, 9] and table["cls"].tolist() == ["b", "b"]
    np.testing.assert_allclose(table["score"], [0.9, 0.5], rtol=1e-6)
    assert predict.detection_table({}, ["a"])["boxes"].shape == (0, 4)


# --------------------------------------------------------------------------- IoU
def random_xyxy(g, n):
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.6
    return torch.cat([xy, xy + wh], 1)


def test_elementwise_iou_matches_torchvision_diagonal():
    g = torch.Generator().manual_seed(0)
    a, b = random_xyxy(g, 200), random_xyxy(g, 200)
    b[:20] = a[:20]                                     # identical pairs: IoU 1
    mine = elementwise_iou(a, b)
    torch.testing.assert_close(mine, box_iou(a, b).diagonal(), atol=1e-6, rtol=1e-5)
    assert torch.allclose(mine[:20], torch.ones(20))
    assert (mine == 0).any() and ((mine > 0) & (mine < 1)).any()


def test_elementwise_iou_by_hand_and_broadcast():
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7
    a = torch.tensor([0.0, 0, 2, 2])
    b = torch.tensor([[1.0, 1, 3, 3], [2.0, 2, 3, 3], [0.5, 0.5, 1.5, 1.5]])
    iou = elementwise_iou(a, b)                         # broadcast (4,) against (3, 4)
    torch.testing.assert_close(iou, torch.tensor([1 / 7, 0.0, 1 / 4]))


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_leaves_no_temp_files(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 4, "config": {"S": 7, "name": "yolov1"},
           "history": [0.5, 0.25], "note": None}
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(obj, path)
    save_checkpoint(obj, path)                          # overwrite in place
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], obj["model"]["w"])
    assert {k: v for k, v in back.items() if k != "model"} == {k: v for k, v in obj.items() if k != "model"}


def test_failed_save_leaves_no_temp_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(Exception):
        save_checkpoint({"f": lambda: 0}, path)         # lambdas cannot be pickled
    assert os.listdir(tmp_path) == []


class Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_that_would_run_a_command_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil(f"touch '{sentinel}'")}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "refused" in str(err.value)
    assert not sentinel.exists()
    # the payload is live: an unsafe load really runs it (so the check above can fail)
    torch.load(path, weights_only=False)
    assert sentinel.exists()


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    for frac in (0.1, 0.5, 0.95):
        bad = tmp_path / f"bad{int(frac * 100)}.pt"
        bad.write_bytes(data[:int(len(data) * frac)])
        with pytest.raises(UserError) as err:
            load_checkpoint(bad)
        assert str(bad) in str(err.value)
        assert "refused" not in str(err.value)           # not mistaken for a malicious file


def test_missing_checkpoint_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="not found") as err:
        load_checkpoint(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(UserError):
        load_checkpoint(tmp_path)                       # a directory is not a checkpoint


def test_load_state_checked_names_the_differing_tensor():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
    with pytest.raises(UserError) as err:
        load_state_checked(net, other.state_dict(), "other.pt")
    msg = str(err.value)
    assert "other.pt" in msg and "'2.weight'" in msg and "(5, 4)" in msg and "(2, 4)" in msg
    assert "'0.weight'" not in msg

    state = net.state_dict()
    del state["2.bias"]
    with pytest.raises(UserError, match=r"missing '2.bias'"):
        load_state_checked(net, state, "x.pt")
    state = dict(net.state_dict(), extra=torch.zeros(1))
    with pytest.raises(UserError, match=r"unexpected 'extra'"):
        load_state_checked(net, state, "x.pt")

    # a fitting state dict loads
    good = {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}
    load_state_checked(net, good, "good.pt")
    assert all((p == 0.5).all() for p in net.parameters())


def test_run_cli_turns_user_error_into_exit_2(capsys):
    def main(argv):
        raise UserError("bad thing")
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(main, [])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: bad thing"


def test_run_cli_reports_an_error_from_a_dataloader_worker_on_one_line(capsys):
    """A UserError raised in a worker process comes back with a traceback in its message."""
    from torch.utils.data import DataLoader, Dataset

    class Bad(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise utils.UserError("labels/x.txt:3: class id 25 out of range [0, 20)")

    def main(argv):
        list(DataLoader(Bad(), num_workers=1))

    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "error: labels/x.txt:3: class id 25 out of range [0, 20)\n"


def test_run_cli_turns_ctrl_c_outside_training_into_one_line_and_exit_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted: Ctrl-C\n"


def test_one_line_folds_whitespace_and_names_an_empty_error():
    """The one one-line helper (errors.one_line, used by run_cli, dataset.py and evaluate.py):
    a multi-line message becomes one line, and an error without a message (``OSError()``)
    is named by its type instead of leaving an empty ``()`` in the report."""
    assert utils.one_line(ValueError("bad\n  value\tthere ")) == "bad value there"
    assert utils.one_line(OSError()) == "OSError"
    assert utils.UserError is __import__("errors").UserError  # one class, re-exported
