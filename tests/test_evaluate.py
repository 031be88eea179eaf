"""Tests for evaluate.py: VOC AP / mAP with Padilla's Object-Detection-Metrics conventions.

The small cases are computed by hand in the comments; the random cases are
checked against ``naive_evaluate`` below, an independent per-box, loop-by-loop
implementation written the way Padilla's ``Evaluator.GetPascalVOCMetrics`` works.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import evaluate as ev
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# IoU conventions
# --------------------------------------------------------------------------

def iou(a, b):
    return float(ev.box_iou(np.array([a], float), np.array([b], float))[0])


def test_iou_plus_one_convention():
    # (0,0,9,9) is 10 x 10 = 100 px.  (5,0,14,9): intersection x 5..9 -> 9-5+1 = 5 px wide,
    # 10 px high -> 50; union 100 + 100 - 50 = 150 -> 1/3.
    assert iou((0, 0, 9, 9), (5, 0, 14, 9)) == 50 / 150
    assert iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    # float coordinates keep the +1: (0,0,1.5,1.5) is 2.5 x 2.5 = 6.25 px, inside (0,0,3.5,1.5)
    # which is 4.5 x 2.5 = 11.25 -> 6.25 / 11.25
    assert iou((0, 0, 1.5, 1.5), (0, 0, 3.5, 1.5)) == 6.25 / 11.25


def test_touching_boxes_overlap_by_one_pixel():
    # x2 of A == x1 of B = 9: the shared column 9..9 is 9-9+1 = 1 px wide, 10 high -> 10;
    # union 100 + 100 - 10 = 190.
    assert iou((0, 0, 9, 9), (9, 0, 18, 9)) == 10 / 190
    assert iou((0, 0, 9, 9), (0, 9, 9, 18)) == 10 / 190


def test_boxes_with_a_half_pixel_gap_do_not_overlap():
    # max(x1) = 9.5 > min(x2) = 9: Padilla's _boxesIntersect says no; the bare "+1" formula
    # would have claimed a 9-9.5+1 = 0.5 px wide overlap.
    assert iou((0, 0, 9, 9), (9.5, 0, 18.5, 9)) == 0.0
    assert iou((0, 0, 9, 9), (0, 9.5, 9, 18.5)) == 0.0


def test_iou_exactly_at_threshold_is_a_true_positive():
    # GT 10 x 10 = 100 px, detection (0,0,9,4) is 10 x 5 = 50 px inside it: IoU = 50/100 = 0.5.
    gts = [("img", "dog", 0, 0, 9, 9)]
    dets = [("img", "dog", 0.9, 0, 0, 9, 4)]
    assert ev.evaluate_detections(gts, dets, iou_threshold=0.5)["tp"]["dog"] == 1
    assert ev.evaluate_detections(gts, dets, iou_threshold=0.5 + 1e-9)["tp"]["dog"] == 0


# --------------------------------------------------------------------------
# Average precision, both interpolations
# --------------------------------------------------------------------------

# One "dog" per image in images 1..3, detections ranked TP FP TP FP FP TP:
#   TP cumsum 1 1 2 2 2 3, FP cumsum 0 1 1 2 3 3, npos = 3
#   recall    1/3 1/3 2/3 2/3 2/3 1
#   precision 1   1/2 2/3 1/2 2/5 1/2
FAR = (50, 50, 59, 59)
RANKED_GTS = [(f"{i}", "dog", 0, 0, 9, 9) for i in (1, 2, 3)]
RANKED_DETS = [("1", "dog", 0.9, 0, 0, 9, 9), ("1", "dog", 0.8, *FAR),
               ("2", "dog", 0.7, 0, 0, 9, 9), ("2", "dog", 0.6, *FAR),
               ("3", "dog", 0.5, *FAR), ("3", "dog", 0.4, 0, 0, 9, 9)]


def test_every_point_interpolation_by_hand():
    # Precision envelope (max precision at recall >= r): 1 on (0, 1/3], 2/3 on (1/3, 2/3],
    # 1/2 on (2/3, 1]  ->  AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 1/2 = 6/18 + 4/18 + 3/18 = 13/18.
    result = ev.evaluate_detections(RANKED_GTS, RANKED_DETS, interp="all")
    assert result["AP"]["dog"] == pytest.approx(13 / 18, abs=1e-15)
    assert (result["tp"]["dog"], result["fp"]["dog"], result["npos"]["dog"]) == (3, 3, 3)


def test_eleven_point_interpolation_by_hand():
    # r = 0, .1, .2, .3 (all <= 1/3): max precision 1; r = .4, .5, .6 (<= 2/3): 2/3;
    # r = .7, .8, .9, 1: 1/2.  AP = (4 * 1 + 3 * 2/3 + 4 * 1/2) / 11 = 8/11.
    result = ev.evaluate_detections(RANKED_GTS, RANKED_DETS, interp="11")
    assert result["AP"]["dog"] == pytest.approx(8 / 11, abs=1e-15)


def test_average_precision_of_empty_curve_is_zero():
    assert ev.average_precision([], [], "all") == 0.0
    assert ev.average_precision([], [], "11") == 0.0


def test_duplicate_detection_is_a_false_positive():
    # Two GT boxes A, B; detections: 0.9 on A (TP), 0.8 on A again (FP, A is taken), 0.7 on B (TP).
    # recall 1/2 1/2 1, precision 1 1/2 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    gts = [("img", "dog", 0, 0, 9, 9), ("img", "dog", 100, 100, 109, 109)]
    dets = [("img", "dog", 0.9, 0, 0, 9, 9), ("img", "dog", 0.8, 0, 0, 9, 9),
            ("img", "dog", 0.7, 100, 100, 109, 109)]
    result = ev.evaluate_detections(gts, dets)
    assert (result["tp"]["dog"], result["fp"]["dog"]) == (2, 1)
    assert result["AP"]["dog"] == pytest.approx(5 / 6, abs=1e-15)


def test_no_fall_back_to_second_best_ground_truth():
    # GT A (0,0,9,9), GT B (2,0,11,9).  The 0.9 detection is A itself (TP).  The 0.8 detection
    # (0.5,0,9.5,9) has IoU 95/105 with A and 85/115 with B (both >= 0.5); its best GT is A,
    # already taken, so it is an FP even though B is free.  recall 1/2 1/2, precision 1 1/2:
    # AP = 1/2 * 1 + 1/2 * 0 = 1/2.
    gts = [("img", "dog", 0, 0, 9, 9), ("img", "dog", 2, 0, 11, 9)]
    dets = [("img", "dog", 0.9, 0, 0, 9, 9), ("img", "dog", 0.8, 0.5, 0, 9.5, 9)]
    result = ev.evaluate_detections(gts, dets)
    assert (result["tp"]["dog"], result["fp"]["dog"]) == (1, 1)
    assert result["AP"]["dog"] == 0.5


def test_iou_tie_between_ground_truths_goes_to_the_first():
    # A (0,0,9,9) and B (2,0,11,9); detection (1,0,10,9) overlaps both by 9 x 10 = 90 px,
    # union 110: a tie.  It takes the first GT in input order; the 0.8 detection equal to B
    # then finds B free (TP, AP 1) -- or taken, if B comes first (FP, AP 1/2 as above).
    dets = [("img", "dog", 0.9, 1, 0, 10, 9), ("img", "dog", 0.8, 2, 0, 11, 9)]
    a, b = ("img", "dog", 0, 0, 9, 9), ("img", "dog", 2, 0, 11, 9)
    assert ev.evaluate_detections([a, b], dets)["AP"]["dog"] == 1.0
    assert ev.evaluate_detections([b, a], dets)["AP"]["dog"] == 0.5


def test_class_without_detections_counts_and_class_without_gt_is_left_out():
    # dog: one GT, one perfect detection -> AP 1.  cat: GT but no detections -> AP 0, counts.
    # bird: detections only -> not in AP, not in the mAP.  mAP = (1 + 0) / 2.
    gts = [("img", "dog", 0, 0, 9, 9), ("img", "cat", 20, 20, 29, 29)]
    dets = [("img", "dog", 0.9, 0, 0, 9, 9), ("img", "bird", 0.8, 20, 20, 29, 29)]
    result = ev.evaluate_detections(gts, dets)
    assert result["AP"] == {"cat": 0.0, "dog": 1.0}
    assert result["mAP"] == 0.5
    assert result["ndet"] == {"bird": 1, "cat": 0, "dog": 1}
    assert result["npos"]["bird"] == 0


def test_score_ties_keep_input_order():
    # One GT; two detections with the same score: an FP first, then the TP.  Stable ranking
    # keeps that order: recall 0 1, precision 0 1/2 -> AP = 1 * 1/2.  Swapped: AP 1.
    gts = [("img", "dog", 0, 0, 9, 9)]
    fp, tp = ("img", "dog", 0.5, *FAR), ("img", "dog", 0.5, 0, 0, 9, 9)
    assert ev.evaluate_detections(gts, [fp, tp])["AP"]["dog"] == 0.5
    assert ev.evaluate_detections(gts, [tp, fp])["AP"]["dog"] == 1.0


def test_detection_in_image_without_ground_truth_is_false_positive():
    gts = [("a", "dog", 0, 0, 9, 9)]
    dets = [("b", "dog", 0.9, 0, 0, 9, 9), ("a", "dog", 0.8, 0, 0, 9, 9)]
    # ranked FP (image b has no GT) then TP -> AP 1/2
    assert ev.evaluate_detections(gts, dets)["AP"]["dog"] == 0.5


# --------------------------------------------------------------------------
# Difficult objects
# --------------------------------------------------------------------------

# Image with a normal dog N (0,0,9,9) and a difficult dog D (20,20,29,29).
# Detections: 0.9 on D, 0.8 far away (FP), 0.7 on N.
DIFFICULT_GTS = [("img", "dog", 0, 0, 9, 9, False), ("img", "dog", 20, 20, 29, 29, True)]
DIFFICULT_DETS = [("img", "dog", 0.9, 20, 20, 29, 29), ("img", "dog", 0.8, *FAR),
                  ("img", "dog", 0.7, 0, 0, 9, 9)]


def test_difficult_ignored_voc2007():
    # ignore: the 0.9 detection is neither TP nor FP, npos = 1.  Remaining FP, TP:
    # recall 0 1, precision 0 1/2.  11-point: every r has max precision 1/2 -> AP 1/2.
    result = ev.evaluate_detections(DIFFICULT_GTS, DIFFICULT_DETS, interp="11", difficult="ignore")
    assert result["npos"]["dog"] == 1
    assert (result["tp"]["dog"], result["fp"]["dog"], result["ndet"]["dog"]) == (1, 1, 3)
    assert result["AP"]["dog"] == pytest.approx(0.5, abs=1e-15)


def test_difficult_counted():
    # count: npos = 2, ranked TP FP TP: recall 1/2 1/2 1, precision 1 1/2 2/3.  11-point:
    # r = 0 .. 0.5 (6 points): 1; r = 0.6 .. 1 (5 points): 2/3 -> (6 + 10/3) / 11 = 28/33.
    result = ev.evaluate_detections(DIFFICULT_GTS, DIFFICULT_DETS, interp="11", difficult="count")
    assert result["AP"]["dog"] == pytest.approx(28 / 33, abs=1e-15)


def test_difficult_dropped():
    # drop: D is removed, so the 0.9 detection is an FP: FP FP TP, npos 1 ->
    # recall 0 0 1, precision 0 0 1/3 -> AP 1/3 (both interpolations).
    for interp in ("11", "all"):
        result = ev.evaluate_detections(DIFFICULT_GTS, DIFFICULT_DETS, interp=interp,
                                        difficult="drop")
        assert result["AP"]["dog"] == pytest.approx(1 / 3, abs=1e-15)


def test_detection_best_matching_difficult_box_is_ignored_not_reassigned():
    # Difficult D (0,0,9,9) first, normal N (2,0,11,9).  A detection equal to D has IoU 1 with
    # D and 80/120 with N: best is D -> ignored (not given to N).  N stays missed: AP 0.
    gts = [("img", "dog", 0, 0, 9, 9, True), ("img", "dog", 2, 0, 11, 9, False)]
    result = ev.evaluate_detections(gts, [("img", "dog", 0.9, 0, 0, 9, 9)], difficult="ignore")
    assert (result["tp"]["dog"], result["fp"]["dog"], result["AP"]["dog"]) == (0, 0, 0.0)


def test_class_with_only_difficult_boxes_is_left_out_when_ignored():
    gts = [("img", "dog", 0, 0, 9, 9), ("img", "cat", 20, 20, 29, 29, True)]
    dets = [("img", "dog", 0.9, 0, 0, 9, 9), ("img", "cat", 0.9, 20, 20, 29, 29)]
    result = ev.evaluate_detections(gts, dets, difficult="ignore")
    assert result["AP"] == {"dog": 1.0} and result["mAP"] == 1.0
    assert ev.evaluate_detections(gts, dets, difficult="count")["AP"] == {"cat": 1.0, "dog": 1.0}


# --------------------------------------------------------------------------
# Padilla's own sample and its published result
# --------------------------------------------------------------------------

# groundtruths/ and detections/ of github.com/rafaelpadilla/Object-Detection-Metrics (MIT),
# in that toolkit's x y width height format; results/results.txt there, produced with
# pascalvoc.py at IoU threshold 0.3, reads "AP: 24.57%" and lists the curve below.
PADILLA_GT = {
    "00001": "25 16 38 56, 129 123 41 62", "00002": "123 11 43 55, 38 132 59 45",
    "00003": "16 14 35 48, 123 30 49 44, 99 139 47 47", "00004": "53 42 40 52, 154 43 31 34",
    "00005": "59 31 44 51, 48 128 34 52", "00006": "36 89 52 76, 62 58 44 67",
    "00007": "28 31 55 63, 58 67 50 58"}
PADILLA_DET = {
    "00001": ".88 5 67 31 48, .70 119 111 40 67, .80 124 9 49 67",
    "00002": ".71 64 111 64 58, .54 26 140 60 47, .74 19 18 43 35",
    "00003": ".18 109 15 77 39, .67 86 63 46 45, .38 160 62 36 53, .91 105 131 47 47, "
             ".44 18 148 40 44",
    "00004": ".35 83 28 28 26, .78 28 68 42 67, .45 87 89 25 39, .14 10 155 60 26",
    "00005": ".62 50 38 28 46, .44 95 11 53 28, .95 29 131 72 29, .23 29 163 72 29",
    "00006": ".45 43 48 74 38, .84 17 155 29 35, .43 95 110 25 42",
    "00007": ".48 16 20 101 88, .95 33 116 37 49"}
PADILLA_PRECISION = ("1.00 0.50 0.67 0.50 0.40 0.33 0.29 0.25 0.22 0.30 0.27 0.33 0.38 0.43 "
                     "0.40 0.38 0.35 0.33 0.32 0.30 0.29 0.27 0.30 0.29")
PADILLA_RECALL = ("0.07 0.07 0.13 0.13 0.13 0.13 0.13 0.13 0.13 0.20 0.20 0.27 0.33 0.40 "
                  "0.40 0.40 0.40 0.40 0.40 0.40 0.40 0.40 0.47 0.47")


def padilla_files(boxes_by_image, with_score):
    """xywh lines -> files in our left top right bottom format (x2 = x + w, as Padilla does)."""
    files = {}
    for image, boxes in boxes_by_image.items():
        lines = []
        for box in boxes.split(", "):
            *score, x, y, w, h = box.split()
            lines.append(" ".join(["person", *score, x, y, repr(float(x) + float(w)),
                                   repr(float(y) + float(h))]))
        files[f"{image}.txt"] = "\n".join(lines) + "\n"
    return files


def test_matches_padilla_published_sample_result(tmp_path):
    # Score ties across files (.95 in 00005 and 00007, .45 and .44 twice) are part of it.
    gt = write_files(tmp_path / "gt", padilla_files(PADILLA_GT, False))
    det = write_files(tmp_path / "det", padilla_files(PADILLA_DET, True))
    result = ev.evaluate_detections(ev.read_gt_dir(gt), ev.read_det_dir(det), iou_threshold=0.3,
                                    return_curves=True)
    assert f"{result['AP']['person'] * 100:.2f}%" == "24.57%"
    curve = result["curves"]["person"]
    assert " ".join(f"{p:.2f}" for p in curve["precision"]) == PADILLA_PRECISION
    assert " ".join(f"{r:.2f}" for r in curve["recall"]) == PADILLA_RECALL


# --------------------------------------------------------------------------
# API details
# --------------------------------------------------------------------------

def test_dict_of_arrays_input_and_curves():
    gts = {"image": np.array([0, 1, 2]), "cls": np.array([7, 7, 7]),
           "boxes": np.array([[0, 0, 9, 9]] * 3, float)}
    dets = {"image": np.array([r[0] for r in RANKED_DETS]).astype(int) - 1,
            "cls": np.full(6, 7), "score": np.array([r[2] for r in RANKED_DETS]),
            "boxes": np.array([r[3:] for r in RANKED_DETS], float)}
    result = ev.evaluate_detections(gts, dets, return_curves=True)
    assert result["AP"] == {7: pytest.approx(13 / 18, abs=1e-15)}
    curve = result["curves"][7]
    np.testing.assert_allclose(curve["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 2 / 3, 1 / 2, 2 / 5, 1 / 2])
    np.testing.assert_array_equal(curve["score"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])


def test_empty_inputs():
    assert np.isnan(ev.evaluate_detections([], [])["mAP"])
    result = ev.evaluate_detections([("a", "dog", 0, 0, 1, 1)], [])
    assert result["AP"] == {"dog": 0.0} and result["mAP"] == 0.0


@pytest.mark.parametrize("kwargs", [{"iou_threshold": 0}, {"iou_threshold": 1.5},
                                    {"interp": "101"}, {"difficult": "maybe"}])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        ev.evaluate_detections([], [], **kwargs)


def test_mixing_string_and_number_ids_raises():
    with pytest.raises(ValueError, match="both use strings"):
        ev.evaluate_detections([(1, "dog", 0, 0, 1, 1)], [("1", "dog", 0.5, 0, 0, 1, 1)])


def test_bad_boxes_raise():
    with pytest.raises(ValueError, match="row 0"):
        ev.evaluate_detections([("a", "dog", 5, 0, 1, 1)], [])
    with pytest.raises(ValueError):
        ev.evaluate_detections([], [("a", "dog", float("nan"), 0, 0, 1, 1)])


# --------------------------------------------------------------------------
# Independent naive implementation (Padilla's loops) on random inputs
# --------------------------------------------------------------------------

def naive_iou(a, b):
    if a[0] > b[2] or b[0] > a[2] or a[3] < b[1] or a[1] > b[3]:
        return 0.0
    inter = (min(a[2], b[2]) - max(a[0], b[0]) + 1) * (min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def naive_ap(rec, prec, interp):
    if interp == "11":
        total = 0.0
        for r in reversed([float(r) for r in np.linspace(0, 1, 11)]):
            total += max([p for rr, p in zip(rec, prec) if rr >= r], default=0.0)
        return total / 11
    mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def naive_class_flags(gts, dets, threshold):
    """Padilla's per-detection loop for one class; 1 TP, 0 FP, None ignored (difficult)."""
    taken = [False] * len(gts)
    flags = []
    for det in sorted(dets, key=lambda d: d[2], reverse=True):  # stable, like Padilla
        best, best_j = 0.0, None
        for j, gt in enumerate(gts):
            if gt[0] == det[0]:
                overlap = naive_iou(det[3:7], gt[2:6])
                if overlap > best:
                    best, best_j = overlap, j
        if best_j is not None and best >= threshold and gts[best_j][6]:
            flags.append(None)
        elif best_j is not None and best >= threshold and not taken[best_j]:
            taken[best_j] = True
            flags.append(1)
        else:
            flags.append(0)
    return [f for f in flags if f is not None]


def naive_evaluate(gts, dets, threshold, interp, difficult):
    if difficult == "drop":
        gts = [g for g in gts if not g[6]]
    elif difficult == "count":
        gts = [g[:6] + (False,) for g in gts]
    aps = {}
    for c in sorted({g[1] for g in gts} | {d[1] for d in dets}):
        class_gts = [g for g in gts if g[1] == c]
        npos = sum(not g[6] for g in class_gts)
        if npos == 0:
            continue
        flags = naive_class_flags(class_gts, [d for d in dets if d[1] == c], threshold)
        tp = fp = 0
        rec, prec = [], []
        for f in flags:
            tp, fp = tp + f, fp + 1 - f
            rec.append(tp / npos)
            prec.append(tp / (fp + tp))
        aps[c] = naive_ap(rec, prec, interp)
    total = 0.0
    for ap in aps.values():
        total += ap
    return aps, (total / len(aps) if aps else float("nan"))


def random_case(rng):
    """A few images and classes, boxes on a half-pixel grid (touching boxes, gaps of 0.5 and
    IoUs exactly at the threshold happen often), scores from a short list (many ties)."""
    classes = ["cat", "dog", "person"][: rng.integers(1, 4)]
    gts, dets = [], []
    for image in range(rng.integers(1, 5)):
        for _ in range(rng.integers(0, 5)):
            x1, y1 = rng.integers(0, 12, 2) / 2
            x2, y2 = x1 + rng.integers(0, 10) / 2, y1 + rng.integers(0, 10) / 2
            gts.append((image, rng.choice(classes), x1, y1, x2, y2, bool(rng.random() < 0.2)))
    for _ in range(rng.integers(0, 15)):
        image = int(rng.integers(0, 6))  # images 4 and 5 may have no GT at all
        if gts and rng.random() < 0.7:
            _, cls, *box, _ = gts[rng.integers(len(gts))]
            box = np.maximum(np.array(box) + rng.integers(-2, 3, 4) / 2, 0)
        else:
            cls, box = rng.choice(classes), np.concatenate([rng.integers(0, 12, 2) / 2] * 2)
        box[2:] = np.maximum(box[2:], box[:2])
        dets.append((image, str(cls), float(rng.choice([0.2, 0.5, 0.5, 0.9])), *map(float, box)))
    return [(g[0], str(g[1]), *map(float, g[2:6]), g[6]) for g in gts], dets


@pytest.mark.parametrize("seed", range(30))
def test_matches_naive_implementation_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        gts, dets = random_case(rng)
        threshold = float(rng.choice([0.1, 0.3, 0.5, 0.5, 0.75]))
        for interp in ("all", "11"):
            for difficult in ("ignore", "count", "drop"):
                expected_aps, expected_map = naive_evaluate(gts, dets, threshold, interp, difficult)
                result = ev.evaluate_detections(gts, dets, threshold, interp, difficult)
                assert result["AP"] == expected_aps  # exact, not approximate
                assert result["mAP"] == expected_map or (np.isnan(expected_map)
                                                         and np.isnan(result["mAP"]))


def as_object_tables(gts, dets):
    """The records as tables with class names in object arrays (as predict.detection_table
    makes them: another factorisation path than numpy string arrays)."""
    g, d = list(zip(*gts)) or [()] * 7, list(zip(*dets)) or [()] * 7
    return ({"image": np.array(g[0], int), "cls": np.array(g[1], object),
             "boxes": np.array(g[2:6], float).T.reshape(-1, 4), "difficult": np.array(g[6], bool)},
            {"image": np.array(d[0], int), "cls": np.array(d[1], object), "score": np.array(d[2], float),
             "boxes": np.array(d[3:7], float).T.reshape(-1, 4)})


@pytest.mark.parametrize("seed", range(10))
def test_one_matching_gives_each_interpolation_and_score_cut_off(seed):
    """summarize_matches on one match_detections equals evaluate_detections for either
    interpolation, and with min_score equals evaluating only the detections scoring at
    least that much (test.py's fixed-threshold number)."""
    rng = np.random.default_rng(1000 + seed)
    for _ in range(10):
        gts, dets = random_case(rng)
        threshold = float(rng.choice([0.1, 0.5, 0.75]))
        for difficult in ev.DIFFICULT_MODES:
            matches = ev.match_detections(*as_object_tables(gts, dets), threshold, difficult)
            for interp in ev.INTERPOLATIONS:
                for min_score in (None, 0.5, 0.9, 1.0):
                    kept = [d for d in dets if min_score is None or d[2] >= min_score]
                    want = ev.evaluate_detections(gts, kept, threshold, interp, difficult,
                                                  return_curves=True)
                    got = ev.summarize_matches(matches, interp, min_score, return_curves=True)
                    assert got.keys() == want.keys()
                    for key in got.keys() - {"mAP", "curves"}:
                        assert got[key] == want[key], key
                    assert got["mAP"] == want["mAP"] or np.isnan(got["mAP"]) and np.isnan(want["mAP"])
                    assert got["curves"].keys() == want["curves"].keys()
                    for label, curve in got["curves"].items():
                        for name, values in curve.items():
                            np.testing.assert_array_equal(values, want["curves"][label][name])


# --------------------------------------------------------------------------
# File reading
# --------------------------------------------------------------------------

def write_files(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_score_ties_across_and_within_files_follow_file_name_then_line_order(tmp_path):
    # One dog per image a, b.  All detections score 0.5.  Files are read in sorted name order
    # (a.txt, b.txt), lines in order; ranking keeps that order: FP (a, far box), TP (a),
    # FP (b, far box), TP (b) -> recall 0 1/2 1/2 1, precision 0 1/2 1/3 1/2.
    # Envelope: 1/2 everywhere -> AP = 1/2 * 1/2 + 1/2 * 1/2 = 1/2.
    gt = write_files(tmp_path / "gt", {"a.txt": "dog 0 0 9 9\n", "b.txt": "dog 0 0 9 9\n"})
    det = write_files(tmp_path / "det", {
        "b.txt": "dog 0.5 50 50 59 59\ndog 0.5 0 0 9 9\n",
        "a.txt": "dog 0.5 50 50 59 59\ndog 0.5 0 0 9 9\n"})
    result = ev.evaluate_detections(ev.read_gt_dir(gt), ev.read_det_dir(det))
    assert result["AP"]["dog"] == 0.5
    # With the TP first in a.txt: TP FP FP TP -> recall 1/2 1/2 1/2 1, precision 1 1/2 1/3 1/2.
    # AP = 1/2 * 1 + 1/2 * 1/2 = 3/4.
    (det / "a.txt").write_text("dog 0.5 0 0 9 9\ndog 0.5 50 50 59 59\n")
    result = ev.evaluate_detections(ev.read_gt_dir(gt), ev.read_det_dir(det))
    assert result["AP"]["dog"] == 0.75


def test_reader_handles_blank_lines_tabs_crlf_and_flags(tmp_path):
    gt = write_files(tmp_path / "gt", {
        "x.txt": "dog 1 2 3 4\r\n\r\n  cat\t5 6 7 8 difficult\ncat 1 1 2 2 0\ndog 0 0 1 1 1",
        "y.txt": ""})
    table = ev.read_gt_dir(gt)
    assert table["image"].tolist() == ["x"] * 4
    assert table["cls"].tolist() == ["dog", "cat", "cat", "dog"]
    assert table["difficult"].tolist() == [False, True, False, True]
    np.testing.assert_array_equal(table["boxes"][1], [5, 6, 7, 8])


def random_text(rng, n_lines, is_gt):
    lines = []
    for _ in range(n_lines):
        x1, y1 = rng.uniform(-5, 300, 2)
        values = [x1, y1, x1 + rng.uniform(0, 100), y1 + rng.uniform(0, 100)]
        if not is_gt:
            values.insert(0, rng.random())
        style = rng.integers(4)
        numbers = [("%.*f" % (int(rng.integers(0, 9)), v) if style == 0 else "%d" % v if style == 1
                    else "%.3e" % v if style == 2 else repr(float(v))) for v in values]
        tokens = [str(rng.choice(["dog", "cat", "pottedplant", "3"]))] + numbers
        if is_gt and rng.random() < 0.3:
            tokens.append(str(rng.choice(["0", "1", "difficult", "Difficult"])))
        sep = " " if rng.random() < 0.8 else "\t "
        lines.append(sep.join(tokens) + ("\n" if rng.random() < 0.9 else "\n\n"))
    return "".join(lines)


def independent_reading(texts, is_gt):
    """The rows of ``{file name: text}`` read with str.split and float(), file by file in
    sorted name order: an independent reference for box_files' parser."""
    rows = []
    for name in sorted(texts):
        for line in texts[name].splitlines():
            tokens = line.split()
            if tokens:
                numbers = [float(t) for t in tokens[1:5 if is_gt else 6]]
                extra = (tokens[5].lower() != "0" if len(tokens) == 6 else False) if is_gt else numbers.pop(0)
                rows.append((name[:-4], tokens[0], extra, *numbers))
    return rows


@pytest.mark.parametrize("is_gt", [True, False])
def test_parser_equals_an_independent_reading(tmp_path, is_gt):
    """Numbers in every form (fixed, integer, exponent, repr), tabs, blank lines, flags:
    the same rows, in file-name then line order, as str.split + float()."""
    rng = np.random.default_rng(1)
    texts = {f"f{i:02d}.txt": random_text(rng, int(rng.integers(0, 30)), is_gt) for i in range(40)}
    folder = write_files(tmp_path / "boxes", texts)
    table = ev.read_gt_dir(folder) if is_gt else ev.read_det_dir(folder)
    rows = independent_reading(texts, is_gt)
    assert len(rows) > 200
    assert table["image"].tolist() == [r[0] for r in rows]
    assert table["cls"].tolist() == [r[1] for r in rows]
    assert table["difficult" if is_gt else "score"].tolist() == [r[2] for r in rows]
    np.testing.assert_array_equal(table["boxes"], np.array([r[3:] for r in rows]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=120) | st.text(alphabet="dog \t\r\n0123456789.-+eE_xnaif", max_size=80)
       .map(str.encode), is_gt=st.booleans())
def test_fuzzed_box_files_give_a_table_or_one_line_error(tmp_path, data, is_gt):
    """Any bytes in a box file: a table whose boxes are finite and not inverted, or a
    one-line UserError naming the file and line. Guards against a traceback (or a NaN box
    that would silently change an AP) from a damaged file."""
    (tmp_path / "a.txt").write_bytes(data)
    try:
        table = ev.read_gt_dir(tmp_path) if is_gt else ev.read_det_dir(tmp_path)
    except UserError as err:
        assert str(err).startswith(f"{tmp_path / 'a.txt'}:") and "\n" not in str(err)
        return
    boxes = table["boxes"]
    assert np.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a leading byte-order mark is no line
    assert len(table["cls"]) == len(boxes) == sum(1 for line in lines if line.split())


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from([b"dog", b"0", b"1", b"5", b"9.5", b"-1", b"1e308", b"nan", b"inf",
                                        b"difficult", b"Difficult", b"2", b"x", b"\xff", b"1_0"]),
                       min_size=1, max_size=7), is_gt=st.booleans())
@example(tokens=[b"dog", b"0", b"0", b"0", b"0", b"1_0"], is_gt=False)  # float() read '1_0' as 10
@example(tokens=[b"dog", b"0", b"0", b"1_0", b"5"], is_gt=True)
def test_quick_line_parser_equals_the_careful_one(tokens, is_gt):
    """box_files' quick path for well-formed lines gives exactly what the field-by-field
    parser gives, and any line it doubts gets the careful parser's answer or error.
    Bug found by this test: the quick path read '1_0' as 10 (PEP 515 grouping) where the
    careful one refuses it."""
    import box_files

    def outcome(parse):
        try:
            return parse()
        except UserError as err:
            return str(err)
    quick = outcome(lambda: box_files._parse_line(tokens, is_gt, "f.txt", 3))
    careful = outcome(lambda: box_files._checked_line(tokens, is_gt, "f.txt:3"))
    assert quick == careful


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def folders(tmp_path):
    gt = write_files(tmp_path / "gt", {"000001.txt": "dog 0 0 9 9\ncat 20 20 29 29\n",
                                       "000002.txt": "dog 0 0 9 9\n"})
    det = write_files(tmp_path / "det", {"000001.txt": "dog 0.9 0 0 9 9\nbird 0.4 1 1 5 5\n"})
    return gt, det  # no det file for 000002: its dog is missed


def test_cli_table_and_json(folders, tmp_path):
    gt, det = folders
    out = tmp_path / "out" / "r.json"
    out.parent.mkdir()
    proc = run_cli("--gt", gt, "--det", det, "--json", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["class", "npos", "ndet", "TP", "FP", "AP"]
    # dog: 2 GT (one in 000002, which has no detection file), 1 TP -> recall 1/2,
    # precision 1 -> AP 1/2.  cat: GT, no detections -> 0.  bird: no GT -> not in the mAP.
    assert lines[1].split()[:2] == ["bird", "0"] and "not in mAP" in lines[1]
    assert lines[2].split() == ["cat", "1", "0", "0", "0", "0.0000"]
    assert lines[3].split() == ["dog", "2", "1", "1", "0", "0.5000"]
    assert lines[-1].startswith("mAP = 0.2500")
    data = json.loads(out.read_text())
    assert data["mAP"] == 0.25 and data["AP"] == {"cat": 0.0, "dog": 0.5}
    assert not [p for p in out.parent.iterdir() if p.name != "r.json"]  # no temp file left


def test_cli_eleven_point_and_iou_options(folders):
    gt, det = folders
    proc = run_cli("--gt", gt, "--det", det, "--interp", "11", "--iou", "0.75")
    # dog: recall 1/2 at precision 1 -> 6 of the 11 points (r <= 0.5) have precision 1.
    assert proc.returncode == 0 and f"{6 / 11 / 2:.4f}" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("gt_text, det_text, message", [
    ("dog 0 0 9\n", "", "gt/a.txt:1: expected 5 values 'class left top right bottom'"),
    ("dog 0 0 9 9\n", "dog 0.9 0 0 9 9\ndog high 0 0 9 9\n",
     "det/a.txt:2: confidence is not a number: 'high'"),
    ("dog 0 0 9 9\n\ndog 5 0 4 9\n", "", "gt/a.txt:3: right (4) is smaller than left (5)"),
    ("dog 0 0 9 9 maybe\n", "", "gt/a.txt:1: 6th value (difficult) must be 0, 1 or"),
    ("dog 0 0 9 9\n", "dog 0.9 0 0 9\n", "det/a.txt:1: expected 6 values"),
])
def test_cli_bad_input_one_line_error(tmp_path, gt_text, det_text, message):
    write_files(tmp_path / "gt", {"a.txt": gt_text})
    write_files(tmp_path / "det", {"a.txt": det_text})
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--gt", "gt", "--det", "det",
                           "--json", "r.json"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: " + message), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_cli_missing_directory(folders, tmp_path):
    proc = run_cli("--gt", tmp_path / "nope", "--det", folders[1])
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nope'}: no such directory\n"


VOC_XML = """<annotation><filename>{name}.jpg</filename>
<size><width>500</width><height>375</height><depth>3</depth></size>
{objects}</annotation>"""
VOC_OBJECT = """<object><name>{cls}</name><pose>Left</pose><truncated>0</truncated>
<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>
<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def voc_xml(name, *objects):
    return VOC_XML.format(name=name, objects="".join(
        VOC_OBJECT.format(cls=c, difficult=d, x1=x1, y1=y1, x2=x2, y2=y2)
        for c, d, x1, y1, x2, y2 in objects))


def test_cli_reads_voc_xml_ground_truth(tmp_path):
    # The DIFFICULT_GTS / DIFFICULT_DETS case from above, as VOC XML + detection text.
    gt = write_files(tmp_path / "Annotations", {
        "000001.xml": voc_xml("000001", ("dog", 0, 0, 0, 9, 9), ("dog", 1, 20, 20, 29, 29))})
    det = write_files(tmp_path / "det", {
        "000001.txt": "dog 0.9 20 20 29 29\ndog 0.8 50 50 59 59\ndog 0.7 0 0 9 9\n"})
    table = ev.read_gt_dir(gt)
    assert table["difficult"].tolist() == [False, True]
    out = tmp_path / "r.json"
    proc = run_cli("--gt", gt, "--det", det, "--interp", "11", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["AP"]["dog"] == pytest.approx(0.5, abs=1e-15)
    for difficult, expected in [("count", 28 / 33), ("drop", 1 / 3)]:  # in-process: faster
        argv = ["--gt", str(gt), "--det", str(det), "--interp", "11", "--difficult", difficult,
                "--json", str(out), "--overwrite"]  # replaces the previous run's r.json
        assert ev.main(argv) == 0
        assert json.loads(out.read_text())["AP"]["dog"] == pytest.approx(expected, abs=1e-15)


def test_bad_xml_is_reported(tmp_path):
    gt = write_files(tmp_path / "gt", {"a.xml": voc_xml("a", ("dog", 0, 0, 0, 9, 9))
                                       .replace("<xmax>9</xmax>", "")})
    with pytest.raises(UserError, match=r"a\.xml: object 1 \(dog\): missing <xmax>"):
        ev.read_gt_dir(gt)
    (gt / "a.xml").write_text("<annotation><object>")
    with pytest.raises(UserError, match=r"a\.xml: not a readable XML file \(.*line 1"):
        ev.read_gt_dir(gt)


def test_one_xml_reader_one_pixel_convention(tmp_path):
    """evaluate.py and dataset.py read a VOC XML file with the same reader (voc_xml.py) and
    both convert the devkit's 1-based inclusive pixels once to the project's one convention,
    0-based continuous extents (xmin - 1, ymin - 1, xmax, ymax; a 0 stays 0), the pixels
    detect_txt.py writes. Guards against the two drifting apart again (they were two
    readers), and against XML ground truth one pixel off detect_txt.py's detections (#14)."""
    import dataset

    gt = write_files(tmp_path / "Annotations", {
        "a.xml": voc_xml("a", ("dog", 0, 1, 1, 500, 375), ("cat", 1, 0, 10, 20.5, 30))})
    table = ev.read_gt_dir(gt)
    np.testing.assert_array_equal(table["boxes"], [[0, 0, 500, 375], [0, 9, 20.5, 30]])
    ann = dataset.read_voc_xml(gt / "a.xml", ["cat", "dog"])
    np.testing.assert_array_equal(ann["boxes"], np.array([[0, 0, 500, 375], [0, 9, 20.5, 30]], np.float32))
    assert (ann["width"], ann["height"]) == (500, 375) and ann["labels"].tolist() == [1, 0]
    assert table["difficult"].tolist() == ann["difficult"].tolist() == [False, True]


XML_VALUES = st.sampled_from(["", "0", "1", "12", "-3", "7.5", "1e3", "nan", "inf", "x", " 9 ", "difficult"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(XML_VALUES, min_size=6, max_size=6), name=st.sampled_from(["dog", "", " cat "]),
       drop=st.sampled_from(["", "<size>", "<bndbox>", "<difficult>", "</annotation>"]),
       with_size=st.booleans())
def test_fuzzed_voc_xml_gives_objects_or_one_line_error(tmp_path, values, name, drop, with_size):
    """Damaged VOC XML (missing elements, non-numbers, NaN, inverted boxes, broken
    structure): objects whose boxes are finite and not inverted (inside the image when
    its size is required), or a one-line UserError naming the file."""
    import voc_xml

    x1, y1, x2, y2, flag, width = values
    text = (f"<annotation><size><width>{width}</width><height>40</height></size><object><name>{name}</name>"
            f"<difficult>{flag}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox></object></annotation>")
    if drop:
        text = text.replace(drop, "", 1)
    path = tmp_path / "a.xml"
    path.write_text(text)
    try:
        ann = voc_xml.read_annotation(path, with_size=with_size)
    except UserError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
        return
    assert ann.names == [name.strip()] and ann.difficult.tolist() == [flag.strip() == "1"]
    assert np.isfinite(ann.boxes).all() and (ann.boxes[:, 2:] >= ann.boxes[:, :2]).all()
    if with_size:
        assert (ann.boxes >= 0).all() and (ann.boxes[:, 2:] <= [ann.size[0], 40]).all()
