"""Post-processing + evaluation at VOC2007-test scale: production code, the code before, per-box Python.

    python bench/bench_postprocess.py [--images 4952] [--reference-images 500] [--reps 3]
    python bench/bench_postprocess.py --quick      # 120 images, for a smoke test

Generates (seeded) raw YOLOv1 outputs for ``--images`` images (S=7, B=2, C=20: 98 boxes
each) and ground truth with ~2.4 objects per image over the 20 VOC classes. Raw class
scores and confidences are mostly near zero (Beta distributions), so the decoded scores
``Pr(class|object) * conf`` are spread with most near zero; for 80% of the objects the
responsible cell gets the object's class, a high confidence and the object's box with
noise, so the APs are not trivial. Then times (median of ``--reps``, fewer once a timing
has used ``--budget`` seconds) the production code, at full scale:

* ``utils.decode_predictions`` (conf > ``--conf`` = 0.005, NMS IoU 0.5; torchvision's
  ``batched_nms`` image by image) on the whole batch, and in ``--chunk``-image batches as
  ``predict.predict_dataset`` calls it;
* before: the same decoding with the batch-wide greedy float32 NMS that utils.py had until
  the layout issue (#15), kept here as the reference, on the whole batch and in chunks;
* ``predict.scale_to_pixels`` + ``predict.detection_table`` (what ``predict_dataset`` and
  ``test.py`` do with the detections);
* the evaluation at both interpolations ("all" and "11") from one ranking and matching
  (``evaluate.match_detections`` + ``summarize_matches``), and, for comparison,
  ``evaluate.evaluate_detections`` once per interpolation (a matching each);
* the production path: whole-batch decode + table + the single-matching evaluation (and
  the same with the decode before);
* on the first ``--reference-images`` (500) images: the production path and a straightforward
  per-box pure-Python implementation: per image, loops over cells and boxes to decode,
  per-class greedy NMS in Python loops, then Padilla's per-detection matching loop for AP
  (both interpolations). The ratio is per image, measured in the same run.

Checks that the production path and the reference give the same detections (same count
per image, allclose boxes and scores) and the same APs on the subset; that the whole-batch,
chunked and before decodes give identical tensors; and that the single matching gives
exactly ``evaluate_detections``' APs. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

import evaluate  # noqa: E402
from machine import load_average, machine  # noqa: E402
from predict import detection_table, scale_to_pixels  # noqa: E402
from utils import VOC_CLASSES, cell_to_image_boxes, decode_predictions, split_predictions  # noqa: E402

S, B, C = 7, 2, 20
CLASS_FREQUENCY = np.array([3, 3, 4, 4, 5, 2, 12, 3, 8, 3, 2, 4, 3, 3, 35, 5, 3, 2, 2, 3], float)


# --------------------------------------------------------------------------- data
def generate(n_images: int, gt_per_image: float, seed: int, hit_rate: float = 0.8):
    """Raw outputs ``(N, S*S*(C+5B))`` float32, image sizes ``(N, 2)`` (w, h) and the GT table."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(300, 501, n_images), rng.integers(250, 501, n_images)], 1)
    n_gt = rng.poisson(gt_per_image - 1, n_images) + 1
    gt_image = np.repeat(np.arange(n_images), n_gt)
    gt_class = rng.choice(C, len(gt_image), p=CLASS_FREQUENCY / CLASS_FREQUENCY.sum())
    wh = rng.uniform(0.05, 0.7, (len(gt_image), 2))
    cxcy = rng.uniform(0.0, 1.0, (len(gt_image), 2)) * (1 - wh) + wh / 2
    pred = np.empty((n_images, S, S, C + 5 * B), np.float64)
    pred[..., :C] = rng.beta(0.4, 6.0, (n_images, S, S, C)) + rng.normal(0, 0.01, (n_images, S, S, C))
    boxes = pred[..., C:].reshape(n_images, S, S, B, 5)
    boxes[..., 0] = rng.beta(0.5, 10.0, (n_images, S, S, B)) + rng.normal(0, 0.01, (n_images, S, S, B))
    boxes[..., 1:3] = rng.uniform(0, 1, (n_images, S, S, B, 2))
    boxes[..., 3:5] = rng.uniform(0.15, 0.85, (n_images, S, S, B, 2))
    hits = np.flatnonzero(rng.random(len(gt_image)) < hit_rate)
    col = np.minimum((cxcy[hits, 0] * S).astype(int), S - 1)
    row = np.minimum((cxcy[hits, 1] * S).astype(int), S - 1)
    img, k = gt_image[hits], rng.integers(0, B, len(hits))
    pred[img, row, col, gt_class[hits]] = rng.uniform(0.5, 1.05, len(hits))
    boxes[img, row, col, k, 0] = rng.uniform(0.3, 1.0, len(hits))
    boxes[img, row, col, k, 1] = cxcy[hits, 0] * S - col + rng.normal(0, 0.06, len(hits))
    boxes[img, row, col, k, 2] = cxcy[hits, 1] * S - row + rng.normal(0, 0.06, len(hits))
    boxes[img, row, col, k, 3:5] = np.sqrt(wh[hits]) + rng.normal(0, 0.03, (len(hits), 2))
    pred[..., C:] = boxes.reshape(n_images, S, S, 5 * B)
    scale = np.tile(sizes[gt_image], (1, 2)).astype(np.float64)
    xyxy = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], 1) * scale
    gt = {"image": gt_image.astype(np.int64), "cls": np.asarray(VOC_CLASSES, object)[gt_class],
          "boxes": np.round(xyxy), "difficult": np.zeros(len(gt_image), bool)}
    return pred.reshape(n_images, -1).astype(np.float32), sizes, gt


def subset_gt(gt: dict, n: int) -> dict:
    keep = gt["image"] < n
    return {k: v[keep] for k, v in gt.items()}


# --------------------------------------------------------------------------- production path
def decode(pred: torch.Tensor, conf: float, nms_iou: float, chunk: int | None = None, function=None) -> list:
    """``utils.decode_predictions`` (or ``function``) on the whole batch, or ``chunk`` images at a
    time; each box with its top class only (``all_classes=False``), as the decode before #15 and
    the per-box reference here score them."""
    function = function or functools.partial(decode_predictions, all_classes=False)
    if chunk is None:
        return function(pred, S, B, C, conf, nms_iou)
    return [d for start in range(0, len(pred), chunk)
            for d in function(pred[start:start + chunk], S, B, C, conf, nms_iou)]


def to_table(dets: list, sizes: np.ndarray) -> dict:
    """What ``predict.predict_dataset`` (to pixels) and ``test.py`` (the table) do."""
    return detection_table(dict(enumerate(scale_to_pixels(dets, sizes))), VOC_CLASSES)


def evaluate_both(gt: dict, table: dict) -> dict:
    """Every-point and 11-point APs from one ranking and matching."""
    matches = evaluate.match_detections(gt, table)
    return {interp: evaluate.summarize_matches(matches, interp) for interp in ("all", "11")}


def production_path(pred: torch.Tensor, sizes: np.ndarray, gt: dict, conf: float, nms_iou: float):
    dets = decode(pred, conf, nms_iou)
    return dets, evaluate_both(gt, to_table(dets, sizes))


# --------------------------------------------------------------------------- before (#15)
def before_decode(pred: torch.Tensor, S: int, B: int, C: int, conf_threshold: float, nms_iou: float) -> list:
    """``utils.decode_predictions`` before issue #15: the same scoring, then one greedy NMS
    for all (image, class) groups of the batch at once, in torchvision's float32 arithmetic."""
    cls_scores, box_pred = split_predictions(pred.detach().float(), S, B, C)
    N, M = cls_scores.shape[0], S * S * B
    cls_prob, cls_id = cls_scores.clamp(0, 1).max(-1)
    score = (box_pred[..., 0].clamp(0, 1) * cls_prob.unsqueeze(-1)).reshape(N * M)
    labels = cls_id.unsqueeze(-1).expand(-1, -1, -1, B).reshape(N * M)
    boxes = cell_to_image_boxes(box_pred[..., 1:3], box_pred[..., 3:5].square()).clamp(0, 1).reshape(N * M, 4)
    candidate = (score > conf_threshold).nonzero().squeeze(1)
    image = torch.div(candidate, M, rounding_mode="floor")
    order = _by_image_then_score(image, score.index_select(0, candidate))
    candidate, image = candidate.index_select(0, order), image.index_select(0, order)
    score, labels, boxes = (t.index_select(0, candidate) for t in (score, labels, boxes))
    kept = greedy_nms(_class_offset_boxes(boxes, labels, image, N), image * C + labels, nms_iou)
    dets = torch.cat((labels[kept, None].float(), score[kept, None], boxes[kept]), dim=1)
    return list(dets.split(torch.bincount(image[kept], minlength=N).tolist())) if N else []


def _by_image_then_score(image: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Stable order by image, then score descending: one sort of an integer key (the int32
    bits of a float >= 0 grow with it)."""
    bits = score.abs().view(torch.int32).long()
    return (image * 2**31 + (2**31 - 1 - bits)).sort(stable=True).indices


def _class_offset_boxes(boxes, labels, image, n_images):
    """The class-shifted coordinates torchvision's ``batched_nms`` hands its kernel, per image."""
    largest = boxes.new_zeros(n_images).scatter_reduce(0, image, boxes.amax(1), "amax", include_self=False)
    return boxes + (labels.to(boxes) * (largest.index_select(0, image) + 1))[:, None]


MAX_NMS_PAIRS = 2**21  # pairs compared at a time: bounds the memory


def greedy_nms(boxes: torch.Tensor, group: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS within every group at once (boxes by descending score within a group): the
    pairs inside each group and their IoUs in one go, then one pass per rank. A kept mask."""
    kept = torch.ones(len(group), dtype=torch.bool, device=group.device)
    if len(group) == 0:
        return kept
    by_group = group.sort(stable=True).indices
    sizes = torch.unique_consecutive(group.index_select(0, by_group), return_counts=True)[1]
    pairs = sizes * (sizes - 1) // 2
    chunk = torch.div(pairs.cumsum(0) - pairs, MAX_NMS_PAIRS, rounding_mode="floor")
    start = 0
    for chunk_sizes in sizes.split(torch.unique_consecutive(chunk, return_counts=True)[1].tolist()):
        members = by_group[start:start + int(chunk_sizes.sum())]
        kept[members] = _nms_within_groups(boxes.index_select(0, members), chunk_sizes, iou_threshold)
        start += len(members)
    return kept


def _nms_within_groups(boxes: torch.Tensor, sizes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    first, second, rank = _pairs_within_groups(sizes)
    over = _pair_iou(boxes, first, second) > _largest_float32_at_most(iou_threshold)
    rank, by_rank = rank[over].sort()
    first, second = first[over].index_select(0, by_rank), second[over].index_select(0, by_rank)
    kept = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    ends = torch.bincount(rank).cumsum(0).tolist()
    for begin, end in zip([0] + ends[:-1], ends):  # pass r: boxes of rank r are settled
        i, j = first[begin:end], second[begin:end]
        kept[j[kept[i]]] = False
    return kept


def _pairs_within_groups(sizes: torch.Tensor):
    position = torch.arange(int(sizes.sum()), device=sizes.device)
    rank = position - (sizes.cumsum(0) - sizes).repeat_interleave(sizes)
    later = sizes.repeat_interleave(sizes) - 1 - rank
    first = position.repeat_interleave(later)
    pair_start = (later.cumsum(0) - later).repeat_interleave(later)
    second = first + 1 + torch.arange(len(first), device=sizes.device) - pair_start
    return first, second, rank.index_select(0, first)


def _pair_iou(boxes: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    a, b = boxes.index_select(0, first), boxes.index_select(0, second)
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area.index_select(0, first) + area.index_select(0, second) - inter)


def _largest_float32_at_most(x: float) -> float:
    """``iou > it`` on float32 equals torchvision's comparison of the float32 IoU with ``x`` as a double."""
    value = torch.tensor(x, dtype=torch.float64)
    below = value.float()
    if below.double() > value:
        below = torch.nextafter(below, torch.tensor(float("-inf")))
    return below.item()


# --------------------------------------------------------------------------- reference
def f32(value: float) -> float:
    return float(np.float32(value))


def reference_decode_image(p: list, conf_threshold: float, nms_iou: float) -> list:
    """One image, per box: ``[(class, score, x1, y1, x2, y2)]`` image-relative, by score."""
    candidates = []
    for i in range(S):
        for j in range(S):
            cell = p[(i * S + j) * (C + 5 * B):(i * S + j + 1) * (C + 5 * B)]
            best, best_class = -1.0, 0
            for c in range(C):
                v = min(max(cell[c], 0.0), 1.0)
                if v > best:
                    best, best_class = v, c
            for b in range(B):
                conf, x, y, sw, sh = cell[C + 5 * b:C + 5 * b + 5]
                score = f32(min(max(conf, 0.0), 1.0) * best)  # the network's float32 product
                if score <= conf_threshold:
                    continue
                cx, cy, w, h = (x + j) / S, (y + i) / S, sw * sw, sh * sh
                box = [min(max(v, 0.0), 1.0) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)]
                candidates.append((best_class, score, *box))
    kept = []
    for c in range(C):
        mine = sorted((d for d in candidates if d[0] == c), key=lambda d: d[1], reverse=True)
        chosen = []
        for d in mine:
            if all(reference_iou(d[2:], k[2:]) <= nms_iou for k in chosen):
                chosen.append(d)
        kept += chosen
    return sorted(kept, key=lambda d: d[1], reverse=True)


def reference_iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def padilla_iou(a, b) -> float:
    if a[0] > b[2] or b[0] > a[2] or a[3] < b[1] or a[1] > b[3]:
        return 0.0
    inter = (min(a[2], b[2]) - max(a[0], b[0]) + 1) * (min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def reference_class_ap(gts: list, dets: list, threshold: float) -> dict:
    """Padilla's per-detection loop for one class; AP at both interpolations."""
    per_image = {}
    for g in gts:
        per_image.setdefault(g[0], []).append([g[1], False])
    tp = fp = 0
    rec, prec = [], []
    for d in sorted(dets, key=lambda d: d[1], reverse=True):
        best, best_gt = 0.0, None
        for gt in per_image.get(d[0], []):
            overlap = padilla_iou(d[2], gt[0])
            if overlap > best:
                best, best_gt = overlap, gt
        if best_gt is not None and best >= threshold and not best_gt[1]:
            best_gt[1] = True
            tp += 1
        else:
            fp += 1
        rec.append(tp / len(gts))
        prec.append(tp / (fp + tp))
    mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    every = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            every += (mrec[i] - mrec[i - 1]) * mpre[i]
    eleven = 0.0
    for r in np.linspace(0, 1, 11)[::-1].tolist():  # Padilla's points (0.30000000000000004...), r=1 first
        above = [prec[i] for i in range(len(rec)) if rec[i] >= r]
        eleven += max(above) if above else 0.0
    return {"all": every, "11": eleven / 11}


def reference_pipeline(pred: np.ndarray, sizes: np.ndarray, gt: dict, conf: float, nms_iou: float):
    detections = []  # (image, class, score, [x1, y1, x2, y2] pixels), by image then score
    for n in range(len(pred)):
        w, h = float(sizes[n, 0]), float(sizes[n, 1])
        for d in reference_decode_image(pred[n].tolist(), conf, nms_iou):
            detections.append((n, d[0], d[1], [d[2] * w, d[3] * h, d[4] * w, d[5] * h]))
    gts = [(int(i), c, b.tolist()) for i, c, b in zip(gt["image"], gt["cls"], gt["boxes"])]
    aps = {"all": {}, "11": {}}
    for c in sorted({g[1] for g in gts}):
        class_id = VOC_CLASSES.index(c)
        ap = reference_class_ap([(g[0], g[2]) for g in gts if g[1] == c],
                                [(d[0], d[2], d[3]) for d in detections if d[1] == class_id], 0.5)
        for interp in aps:
            aps[interp][c] = ap[interp]
    result = {interp: {"AP": a, "mAP": sum(a.values()) / len(a)} for interp, a in aps.items()}
    return detections, result


# --------------------------------------------------------------------------- checks, timing
def same_detections(dets: list, sizes: np.ndarray, reference: list) -> tuple[bool, str]:
    pixels = dict(enumerate(scale_to_pixels(dets, sizes)))
    by_image = {}
    for d in reference:
        by_image.setdefault(d[0], []).append([d[1], d[2], *d[3]])
    for n, d in pixels.items():
        ref = np.asarray(by_image.get(n, []), np.float64).reshape(-1, 6)
        if len(ref) != len(d):
            return False, f"image {n}: {len(d)} production vs {len(ref)} reference detections"
        key = lambda a: np.lexsort((a[:, 2], a[:, 1], a[:, 0]))  # noqa: E731
        a, b = d[key(d)].astype(np.float64), ref[key(ref)]
        if not (np.array_equal(a[:, 0], b[:, 0]) and np.allclose(a[:, 1:], b[:, 1:], rtol=1e-5, atol=1e-4)):
            return False, f"image {n}: detections differ"
    return True, f"{sum(len(d) for d in pixels.values())} detections"


def same_aps(production: dict, reference: dict, tol: float = 1e-9) -> tuple[bool, float]:
    worst = 0.0
    for interp in ("all", "11"):
        for c, ap in reference[interp]["AP"].items():
            worst = max(worst, abs(production[interp]["AP"][c] - ap))
        worst = max(worst, abs(production[interp]["mAP"] - reference[interp]["mAP"]))
    return worst <= tol, worst


def median_time(function, reps: int, budget: float = math.inf):
    """Median of up to ``reps`` runs; stops repeating once ``budget`` seconds are spent.
    Returns (median seconds, last result, runs)."""
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
        if sum(times) > budget:
            break
    return statistics.median(times), result, len(times)


def identical(a: list, b: list) -> bool:
    """Detections per image: the same tensors, bit for bit."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def same_results(a: dict, b: dict) -> bool:
    keys = ("AP", "npos", "ndet", "tp", "fp")
    return all(a[k] == b[k] for k in keys) and (a["mAP"] == b["mAP"] or math.isnan(a["mAP"]) and math.isnan(b["mAP"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4952)
    parser.add_argument("--reference-images", type=int, default=500)
    parser.add_argument("--gt-per-image", type=float, default=2.4)
    parser.add_argument("--conf", type=float, default=0.005)
    parser.add_argument("--nms-iou", type=float, default=0.5)
    parser.add_argument("--chunk", type=int, default=64, help="batch size of the chunked decode")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=15.0,
                        help="stop repeating a timing once it has taken this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="120 images, 40 for the reference, 1 rep")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "postprocess.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.reference_images, args.reps = 120, 40, 1
    args.reference_images = min(args.reference_images, args.images)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    raw, sizes, gt = generate(args.images, args.gt_per_image, args.seed)
    pred = torch.from_numpy(raw)
    conf, iou = args.conf, args.nms_iou

    t, runs = {}, {}

    def timed(key, function, reps=args.reps):
        t[key], result, runs[key] = median_time(function, reps, args.budget)
        return result

    def timed_together(functions: dict):
        """Medians of functions run in turn, rep after rep: before and after see the same load."""
        times, results = {key: [] for key in functions}, {}
        for _ in range(args.reps):
            for key, function in functions.items():
                start = time.perf_counter()
                results[key] = function()
                times[key].append(time.perf_counter() - start)
            if sum(map(sum, times.values())) > args.budget * len(functions):
                break
        for key, values in times.items():
            t[key], runs[key] = statistics.median(values), len(values)
        return [results[key] for key in functions]

    # Full scale: the production decode (whole batch, and in --chunk batches as
    # predict.predict_dataset calls it) and the decode before #15, interleaved; the table; the
    # evaluation.
    dets, dets_chunked, dets_before, dets_before_chunked = timed_together({
        "decode_batch": lambda: decode(pred, conf, iou),
        "decode_chunked": lambda: decode(pred, conf, iou, args.chunk),
        "before_decode_batch": lambda: decode(pred, conf, iou, function=before_decode),
        "before_decode_chunked": lambda: decode(pred, conf, iou, args.chunk, function=before_decode)})
    table = timed("to_table", lambda: to_table(dets, sizes))
    res = timed("evaluate_single_matching", lambda: evaluate_both(gt, table))
    res_all = timed("evaluate_all", lambda: evaluate.evaluate_detections(gt, table, interp="all"))
    res_11 = timed("evaluate_11", lambda: evaluate.evaluate_detections(gt, table, interp="11"))
    for prefix in ("", "before_"):
        rest = t["to_table"] + t["evaluate_single_matching"]
        t[f"{prefix}total"] = t[f"{prefix}decode_batch"] + rest
        t[f"{prefix}total_chunked"] = t[f"{prefix}decode_chunked"] + rest
    batch_same = identical(dets, dets_chunked)
    before_same = identical(dets, dets_before) and identical(dets, dets_before_chunked)
    matching_same = same_results(res["all"], res_all) and same_results(res["11"], res_11)

    # The subset: the production path and the per-box Python reference.
    m = args.reference_images
    gt_m, pred_m, sizes_m = subset_gt(gt, m), pred[:m], sizes[:m]
    dets_m, prod_m = timed("production_subset", lambda: production_path(pred_m, sizes_m, gt_m, conf, iou))
    ref_dets, ref_m = timed("reference_subset", lambda: reference_pipeline(raw[:m], sizes_m, gt_m, conf, iou), 1)
    boxes_same, boxes_note = same_detections(dets_m, sizes_m, ref_dets)
    aps_same, ap_diff = same_aps(prod_m, ref_m)
    load_after = load_average()

    info = machine()
    n_det = len(table["cls"])
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), numpy {info['numpy']}; "
          f"load average before {load_before} after {load_after}")
    print(f"data: {args.images} images x {S * S * B} boxes, {len(gt['cls'])} GT boxes, conf > {conf}, "
          f"NMS IoU {iou}: {n_det} detections ({n_det / args.images:.1f}/image); "
          f"mAP all-point {res['all']['mAP']:.4f}, 11-point {res['11']['mAP']:.4f}; median of {args.reps}")

    def line(label, key, n):
        note = f"  ({runs[key]} run{'s' if runs[key] > 1 else ''})" if runs.get(key, args.reps) != args.reps else ""
        print(f"{label:<64}{t[key]:>9.3f}{1000 * t[key] / n:>10.3f}{note}")

    print(f"{'what (' + str(args.images) + ' images)':<64}{'seconds':>9}{'ms/image':>10}")
    line("decode_predictions (batched_nms per image), whole batch", "decode_batch", args.images)
    line(f"decode_predictions, {args.chunk}-image chunks (predict_dataset)", "decode_chunked", args.images)
    line("before #15: batch-wide greedy float32 NMS, whole batch", "before_decode_batch", args.images)
    line(f"before #15: same, {args.chunk}-image chunks", "before_decode_chunked", args.images)
    line("scale_to_pixels + detection_table", "to_table", args.images)
    line("evaluation, both interpolations, one matching", "evaluate_single_matching", args.images)
    line("evaluate_detections, every-point (own matching)", "evaluate_all", args.images)
    line("evaluate_detections, 11-point (own matching)", "evaluate_11", args.images)
    line("production total (whole-batch decode + table + evaluation)", "total", args.images)
    line("same, with the chunked decode", "total_chunked", args.images)
    line("before #15: total (whole-batch decode + table + evaluation)", "before_total", args.images)
    line("before #15: same, with the chunked decode", "before_total_chunked", args.images)
    print(f"{'what (first ' + str(m) + ' images)':<64}")
    line("production path", "production_subset", m)
    line("per-box pure-Python reference (decode, NMS, AP x2)", "reference_subset", m)
    ratios = {"reference_over_production_per_image": t["reference_subset"] / t["production_subset"],
              "production_over_before_decode": t["decode_batch"] / t["before_decode_batch"],
              "production_over_before_decode_chunked": t["decode_chunked"] / t["before_decode_chunked"],
              "two_evaluations_over_single_matching":
                  (t["evaluate_all"] + t["evaluate_11"]) / t["evaluate_single_matching"]}
    print(f"same run: production decode / before #15: {ratios['production_over_before_decode']:.1f}x whole batch, "
          f"{ratios['production_over_before_decode_chunked']:.1f}x chunked; reference / production per image "
          f"({m} images) {ratios['reference_over_production_per_image']:.2f}x; two evaluate_detections / "
          f"one matching {ratios['two_evaluations_over_single_matching']:.1f}x; production total at "
          f"{args.images} images under 1 s: {t['total'] < 1.0} (chunked: {t['total_chunked'] < 1.0})")
    print(f"checks: production vs reference same detections: {boxes_same} ({boxes_note}), same APs: "
          f"{aps_same} (max |dAP| {ap_diff:.1e}); whole-batch == chunked: {batch_same}; production == "
          f"before #15 (bit for bit): {before_same}; one matching == two evaluate_detections: {matching_same}")
    report = {"machine": info, "load_average_before": load_before, "load_average_after": load_after,
              "quick": args.quick,
              "data": {"images": args.images, "gt_boxes": len(gt["cls"]), "detections": n_det,
                       "conf_threshold": conf, "nms_iou": iou, "seed": args.seed,
                       "reference_images": m},
              "reps": args.reps, "runs": runs, "chunk": args.chunk, "timings_s": t,
              "mAP": {"all": res["all"]["mAP"], "11": res["11"]["mAP"]}, "ratios": ratios,
              "under_1s": t["total"] < 1.0, "chunked_under_1s": t["total_chunked"] < 1.0,
              "checks": {"same_detections": boxes_same, "same_aps": aps_same, "max_ap_diff": ap_diff,
                         "whole_batch_same": batch_same, "before_same": before_same,
                         "single_matching_same": matching_same}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    ok = (boxes_same and aps_same and batch_same and before_same and matching_same
          and not math.isnan(res["all"]["mAP"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
