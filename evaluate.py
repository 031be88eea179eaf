"""PASCAL VOC detection metrics: average precision (AP) per class and mAP.

This is a vectorised numpy re-implementation of the metric computed by Rafael
Padilla's Object-Detection-Metrics toolkit (``pascalvoc.py`` and
``lib/Evaluator.py``, https://github.com/rafaelpadilla/Object-Detection-Metrics),
written to give the same numbers, plus the official VOC2007 protocol in which
"difficult" objects are ignored.

Conventions (all of them are Padilla's; the reason is given where it matters):

* Boxes are ``x1 y1 x2 y2`` (left top right bottom) in absolute pixels.  IoU
  uses the VOC "+1" pixel convention: coordinates are inclusive pixel indices,
  so a box is ``x2 - x1 + 1`` pixels wide (also for the intersection), even for
  float coordinates.  Boxes separated by any gap, even 0.5 px, do not overlap
  at all; boxes that touch (x2 of one == x1 of the other) share a 1-px column.
* Per class, detections are ranked by confidence, highest first, with a
  stable sort: ties keep their input order (for folders: sorted file name,
  then line).  This is what Python's ``sorted(..., reverse=True)`` does.
* Each detection is matched to the ground-truth (GT) box of the same image and
  class with the highest IoU (the first one in input order on ties).  It is a
  true positive (TP) if that IoU >= the threshold and that GT box is not yet
  taken by a higher-ranked detection; otherwise it is a false positive (FP).
  There is no fall-back to the second-best GT box.
* AP is computed with every-point interpolation (VOC2010+, Padilla's
  ``EveryPointInterpolation``) or 11-point interpolation (VOC2007, recall
  points ``np.linspace(0, 1, 11)``).
* mAP is the mean AP over the classes that have ground truth.  A class with
  GT but no detections has AP 0 and counts; a class with detections only is
  left out.

Difficult objects (VOC ``<difficult>1</difficult>``) are handled in one of
three ways (``difficult=``): ``"ignore"`` (VOC2007 devkit: a detection matched
to a difficult box is neither TP nor FP, difficult boxes are not counted in
the number of positives), ``"count"`` (treated like any other box) or
``"drop"`` (removed before matching, as Padilla's ``pascalvoc.py`` XML reader
does).  Without difficult boxes all three give the same result, Padilla's.
The official VOC2007 protocol is ``interp="11", difficult="ignore"``; it keeps
Padilla's IoU and ``>=`` test, which can differ from the VOC devkit only for
boxes on those edges (in the devkit boxes less than a pixel apart still
overlap, and py-faster-rcnn's ``voc_eval.py`` uses ``>``).

Command line: ``python evaluate.py --gt GT_DIR --det DET_DIR`` (see --help);
box_files.py reads the folders and writes the report; box_tables.py validates
the tables of boxes in memory and numbers their labels.  This module imports
only numpy and the standard library, so it starts fast.
"""

import os
import sys

import numpy as np

from box_files import (DET_LINE, GT_LINE, check_output_file, format_report, read_det_dir,  # noqa: F401 (API)
                       read_gt_dir, read_pair, write_json)
from box_tables import as_table, factorize, select
from errors import UserError, one_line

INTERPOLATIONS = ("all", "11")
DIFFICULT_MODES = ("ignore", "count", "drop")
ELEVEN_RECALL_POINTS = np.linspace(0, 1, 11)


# --------------------------------------------------------------------------
# Geometry and average precision
# --------------------------------------------------------------------------

def box_iou(a, b):
    """IoU of box ``a[i]`` with box ``b[i]``; ``a``, ``b`` are (N, 4) x1 y1 x2 y2.

    VOC "+1" convention: a box covers ``x2 - x1 + 1`` by ``y2 - y1 + 1``
    pixels, and so does the intersection.  Boxes with a gap between them
    (``max(x1) > min(x2)`` or ``max(y1) > min(y2)``) have IoU 0; this is
    Padilla's ``_boxesIntersect`` test, which runs before the "+1"
    arithmetic, so a 0.5 px gap is not turned into a 0.5 px overlap.  The
    operations are done in Padilla's order, so results are bit-identical.
    """
    ix1 = np.maximum(a[:, 0], b[:, 0])
    iy1 = np.maximum(a[:, 1], b[:, 1])
    ix2 = np.minimum(a[:, 2], b[:, 2])
    iy2 = np.minimum(a[:, 3], b[:, 3])
    overlap = (ix1 <= ix2) & (iy1 <= iy2)
    inter = np.where(overlap, (ix2 - ix1 + 1) * (iy2 - iy1 + 1), 0.0)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a + area_b - inter)


def _sequential_sum(values):
    """Left-to-right float sum, as Padilla's Python loops do it.

    ``np.sum`` uses pairwise summation, which can differ in the last bit.
    """
    return float(np.cumsum(values)[-1]) if len(values) else 0.0


def average_precision(recall, precision, interp="all"):
    """AP from the precision/recall curve of one class (detections ranked by score).

    ``interp="all"`` (every-point, VOC2010+): the precision envelope
    ``p(r) = max precision at recall >= r`` integrated over recall, with the
    curve padded as recall ``[0, rec..., 1]`` and precision ``[0, prec..., 0]``.
    ``interp="11"`` (VOC2007): the mean of the envelope at the 11 recall points
    0, 0.1, ..., 1 (0 where the recall is never reached).  An empty curve
    (no detections) gives AP 0.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if interp == "all":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.concatenate(([0.0], precision, [0.0]))
        envelope = np.maximum.accumulate(mpre[::-1])[::-1]
        steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
        return _sequential_sum((mrec[steps] - mrec[steps - 1]) * envelope[steps])
    if interp == "11":
        points = eleven_point_precision(recall, precision)
        return _sequential_sum(points[::-1]) / 11  # Padilla sums from r=1 down to r=0
    raise ValueError(f"interp must be one of {INTERPOLATIONS}, got {interp!r}")


def eleven_point_precision(recall, precision):
    """The 11 precisions that 11-point AP averages (VOC2007): at each recall point r of
    0, 0.1, ..., 1 the envelope ``max precision at recall >= r``, 0 where r is never
    reached. ``recall`` is non-decreasing (detections in ranking order)."""
    recall = np.asarray(recall, dtype=np.float64)
    if recall.size == 0:
        return np.zeros(len(ELEVEN_RECALL_POINTS))
    envelope = np.maximum.accumulate(np.asarray(precision, dtype=np.float64)[::-1])[::-1]
    first = np.searchsorted(recall, ELEVEN_RECALL_POINTS, side="left")
    return np.where(first < recall.size, envelope[np.minimum(first, recall.size - 1)], 0.0)


# --------------------------------------------------------------------------
# Matching detections to ground truth
# --------------------------------------------------------------------------

def _best_ground_truth(det_group, det_boxes, gt_group, gt_boxes, n_groups):
    """For each detection, the GT box of its group with the highest IoU.

    A group is one (class, image) pair, numbered below ``n_groups``; ``gt_group``
    must be sorted (stably, so GT boxes of a group stay in input order).  All
    (detection, GT) pairs of the same group are laid out one after another,
    detection by detection, so the IoUs are computed in one vectorised call;
    ``reduceat`` then takes the maximum per detection and the first pair
    reaching it (Padilla's strict ``>`` scan keeps the first GT box on ties).
    Returns ``(best_iou, best_gt)``, with IoU 0 and GT index -1 for detections
    whose image has no GT box of their class.
    """
    lo, count = _group_spans(gt_group, det_group, n_groups)
    best_iou = np.zeros(len(det_group))
    best_gt = np.full(len(det_group), -1)
    n_pairs = int(count.sum())
    if n_pairs == 0:
        return best_iou, best_gt
    first_pair = np.cumsum(count) - count
    pair_det = np.repeat(np.arange(len(det_group)), count)
    pair_gt = np.arange(n_pairs) - np.repeat(first_pair - lo, count)
    iou = box_iou(det_boxes[pair_det], gt_boxes[pair_gt])
    has_gt = count > 0
    starts = first_pair[has_gt]
    best_iou[has_gt] = np.maximum.reduceat(iou, starts)
    is_best = iou == best_iou[pair_det]
    best_gt[has_gt] = pair_gt[np.minimum.reduceat(np.where(is_best, np.arange(n_pairs), n_pairs),
                                                  starts)]
    return best_iou, best_gt


def _group_spans(sorted_group, group, n_groups):
    """Where each value of ``group`` lies in ``sorted_group``: (first index, count).

    A count per group number (bincount) costs O(n_groups) and a lookup per
    value; binary search (searchsorted) is ~10x slower at VOC scale (20 classes
    x 5,000 images), so it is kept for sparse tables, with far more groups
    than rows (many images and classes, few boxes).
    """
    if n_groups <= 4 * (len(sorted_group) + len(group)):
        counts = np.bincount(sorted_group, minlength=n_groups)
        return (np.cumsum(counts) - counts)[group], counts[group]
    lo = np.searchsorted(sorted_group, group, side="left")
    return lo, np.searchsorted(sorted_group, group, side="right") - lo


def _greedy_match(best_iou, best_gt, gt_difficult, iou_threshold):
    """TP / ignored flags for detections in ranking order (highest score first).

    Padilla loops over the ranked detections: a detection whose best GT box
    has IoU >= threshold takes that box if it is still free (TP), else it is
    an FP.  The box is therefore taken by the *first* detection that claims
    it, so the loop is equivalent to: TP = first occurrence of its GT index
    among the claiming detections (``np.unique(..., return_index=True)``
    returns first occurrences).  Detections that claim a difficult box are
    ignored (VOC2007) and never take it.  Everything not TP nor ignored is FP.
    """
    claims = best_iou >= iou_threshold
    ignored = np.zeros(len(best_iou), dtype=bool)
    ignored[claims] = gt_difficult[best_gt[claims]]
    claiming = np.flatnonzero(claims & ~ignored)
    _, first = np.unique(best_gt[claiming], return_index=True)
    tp = np.zeros(len(best_iou), dtype=bool)
    tp[claiming[first]] = True
    return tp, ignored


def _check_options(iou_threshold=0.5, interp="all", difficult="ignore"):
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if interp not in INTERPOLATIONS:
        raise ValueError(f"interp must be one of {INTERPOLATIONS}, got {interp!r}")
    if difficult not in DIFFICULT_MODES:
        raise ValueError(f"difficult must be one of {DIFFICULT_MODES}, got {difficult!r}")


def _rank_and_match(gt, det, iou_threshold):
    """Rank detections per class and mark them TP / ignored (see module doc).

    Returns ``(classes, gt_class, order, det_class_ranked, tp, ignored)``
    where ``order`` ranks the detections: by class, then score descending,
    ties in input order.
    """
    classes, gt_class, det_class = factorize(gt["cls"], det["cls"])
    images, gt_image, det_image = factorize(gt["image"], det["image"], in_runs=True)
    gt_group = gt_class * len(images) + gt_image
    det_group = det_class * len(images) + det_image
    gt_order = np.argsort(gt_group, kind="stable")
    best_iou, best_gt = _best_ground_truth(det_group, det["boxes"], gt_group[gt_order],
                                           gt["boxes"][gt_order], len(classes) * len(images))
    order = _rank(det["score"], det_class, len(classes))
    tp, ignored = _greedy_match(best_iou[order], best_gt[order],
                                gt["difficult"][gt_order], iou_threshold)
    return classes, gt_class, order, det_class[order], tp, ignored


def _rank(score, cls, n_classes):
    """Stable order by class, then score descending: ``np.lexsort((-score, cls))``.

    Done as two stable sorts, the second on the class codes as int16 when they
    fit, which numpy sorts with a radix sort (about 25% faster overall).
    """
    by_score = np.argsort(-score, kind="stable")
    codes = cls[by_score].astype(np.int16 if n_classes < 2**15 else np.int64)
    return by_score[np.argsort(codes, kind="stable")]


def evaluate_detections(gts, dets, iou_threshold=0.5, interp="all", difficult="ignore",
                        return_curves=False):
    """Per-class AP and mAP of detections against ground truth (module doc: conventions).

    ``gts``: dict of arrays, one row per GT box: ``"image"`` (N,) image ids
    (ints or strings), ``"cls"`` (N,) class labels (ints or strings),
    ``"boxes"`` (N, 4) x1 y1 x2 y2 absolute pixels, optional ``"difficult"``
    (N,) bool.  Or an iterable of records ``(image, cls, x1, y1, x2, y2[,
    difficult])``.  Row order breaks IoU ties (first row wins).
    ``dets``: dict with ``"image"``, ``"cls"``, ``"boxes"`` and ``"score"`` (M,),
    or records ``(image, cls, score, x1, y1, x2, y2)``.  Row order breaks
    score ties (earlier row ranks higher).
    ``iou_threshold`` in (0, 1]; ``interp`` "all" or "11"; ``difficult``
    "ignore", "count" or "drop".

    Returns a dict: ``"mAP"`` (float, NaN if no class has GT), ``"AP"``
    {class: float} for classes with GT (sorted), ``"npos"``, ``"ndet"``,
    ``"tp"``, ``"fp"`` {class: int} for all classes, and the options.  With
    ``return_curves=True`` also ``"curves"`` {class: {"precision", "recall",
    "score"}}: arrays over the ranked, not ignored detections of the class.

    For several interpolations (or score cut-offs) of the same detections,
    call ``match_detections`` once and ``summarize_matches`` for each: the
    ranking and matching are most of the cost and do not depend on them.
    """
    _check_options(iou_threshold, interp, difficult)
    return summarize_matches(match_detections(gts, dets, iou_threshold, difficult), interp,
                             return_curves=return_curves)


def match_detections(gts, dets, iou_threshold=0.5, difficult="ignore"):
    """Rank the detections per class and match them to ground truth, once.

    Arguments as for ``evaluate_detections``.  Returns a dict for
    ``summarize_matches``: the ranked detections' class codes (``"ranked_class"``,
    into ``"classes"``), ``"score"``, ``"tp"`` and ``"ignored"`` flags; per class
    ``"npos"`` and ``"has_gt"``; and the options.
    """
    _check_options(iou_threshold, difficult=difficult)
    gt, det = as_table(gts, is_gt=True), as_table(dets, is_gt=False)
    if difficult == "drop":
        gt = select(gt, ~gt["difficult"])
    elif difficult == "count":
        gt["difficult"] = np.zeros(len(gt["cls"]), dtype=bool)
    classes, gt_class, order, ranked_class, tp, ignored = _rank_and_match(gt, det, iou_threshold)
    return {"classes": classes.tolist(), "ranked_class": ranked_class, "score": det["score"][order],
            "tp": tp, "ignored": ignored,
            "npos": np.bincount(gt_class[~gt["difficult"]], minlength=len(classes)),
            "has_gt": np.bincount(gt_class, minlength=len(classes)) > 0,
            "iou_threshold": iou_threshold, "difficult": difficult}


def summarize_matches(matches, interp="all", min_score=None, return_curves=False):
    """``evaluate_detections``' result from the output of ``match_detections``.

    ``min_score``: count only the detections scoring at least this much.  They
    rank first in each class, and a detection's match depends only on the
    detections ranked above it, so this gives exactly what evaluating just
    those detections gives (the original YOLO project's fixed-threshold mAP
    without a second matching).
    """
    _check_options(interp=interp)
    ranked_class, score = matches["ranked_class"], matches["score"]
    counted = np.ones(len(score), bool) if min_score is None else score >= min_score
    ndet = np.bincount(ranked_class[counted], minlength=len(matches["classes"]))
    present = matches["has_gt"] | (ndet > 0)  # classes of the counted detections or of GT
    labels = [label for label, keep in zip(matches["classes"], present.tolist()) if keep]
    result = {"mAP": float("nan"), "AP": {},
              "npos": dict(zip(labels, matches["npos"][present].tolist())),
              "ndet": dict(zip(labels, ndet[present].tolist())), "tp": {}, "fp": {},
              "iou_threshold": matches["iou_threshold"], "interp": interp,
              "difficult": matches["difficult"]}
    kept = counted & ~matches["ignored"]
    codes = np.cumsum(present) - 1  # class code -> index into labels
    _add_class_results(result, labels, codes[ranked_class[kept]], matches["tp"][kept],
                       score[kept], return_curves)
    if result["AP"]:
        result["mAP"] = _sequential_sum(list(result["AP"].values())) / len(result["AP"])
    return result


def _add_class_results(result, labels, ranked_class, tp, scores, return_curves):
    """Fill TP/FP counts, AP (classes with GT) and optionally curves, class by class.

    ``ranked_class``, ``tp``, ``scores``: the kept detections in ranking order
    (grouped by class).  Precision and recall use Padilla's formulas:
    recall = cumTP / npos, precision = cumTP / (cumFP + cumTP).
    """
    bounds = np.searchsorted(ranked_class, np.arange(len(labels) + 1))
    if return_curves:
        result["curves"] = {}
    for c, label in enumerate(labels):
        hits = tp[bounds[c]:bounds[c + 1]]
        result["tp"][label], result["fp"][label] = int(hits.sum()), int((~hits).sum())
        npos = result["npos"][label]
        if npos == 0:
            continue
        tp_cum = np.cumsum(hits, dtype=np.float64)
        fp_cum = np.cumsum(~hits, dtype=np.float64)
        recall, precision = tp_cum / npos, tp_cum / (fp_cum + tp_cum)
        result["AP"][label] = average_precision(recall, precision, result["interp"])
        if return_curves:
            result["curves"][label] = {"precision": precision, "recall": recall,
                                       "score": scores[bounds[c]:bounds[c + 1]]}
            if result["interp"] == "11":  # what the AP averaged, for plots.draw_interpolated
                result["curves"][label]["eleven_point"] = (ELEVEN_RECALL_POINTS,
                                                           eleven_point_precision(recall, precision))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _parse_args(argv):
    import argparse

    import argtypes  # standard library only, as this module

    parser = argtypes.ArgumentParser(
        prog="evaluate.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PASCAL VOC average precision per class and mAP; the same numbers as "
                    "Padilla's Object-Detection-Metrics (pascalvoc.py -gtformat xyrb "
                    "-detformat xyrb).",
        epilog="file formats (one file per image, named after the image, absolute pixels):\n"
               f"  GT_DIR/<image>.txt    {GT_LINE} [difficult]\n"
               "                        (difficult: optional 6th value 0, 1 or 'difficult')\n"
               "  GT_DIR/<image>.xml    VOCdevkit Annotations (used if GT_DIR holds .xml files)\n"
               f"  DET_DIR/<image>.txt   {DET_LINE}\n"
               "  A missing or empty detection file means no detections.\n"
               "  DET_DIR/comp4_det_test_<class>.txt  or the VOC server's per-class files\n\n"
               "VOC2007 official protocol: --interp 11 --difficult ignore\n"
               "Padilla's toolkit:         --interp all  (files without difficult flags)")
    parser.add_argument("--gt", required=True, metavar="GT_DIR", help="ground-truth folder")
    parser.add_argument("--det", required=True, metavar="DET_DIR", help="detection folder")
    parser.add_argument("--iou", type=argtypes.fraction(0, 1, lo_open=True), default=0.5,
                        help="IoU threshold for a true positive, IoU >= threshold (default 0.5)")
    parser.add_argument("--interp", choices=INTERPOLATIONS, default="all",
                        help="all: every-point interpolation (VOC2010+, default); "
                             "11: 11-point interpolation (VOC2007)")
    parser.add_argument("--difficult", choices=DIFFICULT_MODES, default="ignore",
                        help="difficult GT boxes: ignore = VOC2007 rule, detections on them are "
                             "neither TP nor FP (default); count = like other boxes; "
                             "drop = removed (Padilla's XML reader)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--plots", metavar="DIR",
                        help="also draw pr_curves.png and ap_per_class.png into DIR (matplotlib)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json file or --plots images (never a file under "
                             "--gt or --det); without it they are refused")
    return parser.parse_args(argv)


def main(argv=None):
    """Command-line entry point; returns the exit status (2 and one line on bad input)."""
    args = _parse_args(argv)
    try:
        _check_outputs(args)
        (gts, (dets,)) = read_pair(args.gt, [args.det])
        result = evaluate_detections(gts, dets, args.iou, args.interp, args.difficult,
                                     return_curves=bool(args.plots))
        print(format_report(result))
        _write_outputs(args, result)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _check_outputs(args):
    """Refuse outputs that cannot be written, or would replace an input file or (without
    --overwrite) any file, before the evaluation, not after it (box_files.check_output_file)."""
    inputs = (("--gt", args.gt), ("--det", args.det))
    if args.json:
        check_output_file(args.json, "--json", inputs, args.overwrite)
    if args.plots:
        if os.path.exists(args.plots) and not os.path.isdir(args.plots):
            raise UserError(f"--plots {args.plots}: is not a folder")
        from plots import PR_FILES  # the standard library only at import

        images = [os.path.join(args.plots, name) for name in PR_FILES]
        if args.json and os.path.realpath(args.json) in map(os.path.realpath, images):
            raise UserError(f"--json {args.json}: is one of the --plots images; choose another path")
        for image in images if os.path.isdir(args.plots) else ():
            check_output_file(image, "--plots", inputs, args.overwrite)


def _write_outputs(args, result):
    """--json and --plots; UserError when they cannot be written."""
    if args.json:
        try:
            write_json(args.json, result)
        except OSError as exc:
            raise UserError(f"--json {args.json}: cannot write it ({exc.strerror})") from None
    if args.plots:
        import plots  # only here: without --plots this module needs numpy alone
        try:
            for path in plots.plot_pr_curves(result, args.plots):
                print(f"wrote {path}")
        except OSError as exc:
            raise UserError(f"--plots {args.plots}: cannot write the plots ({exc.strerror})") from None


if __name__ == "__main__":
    sys.exit(main())
