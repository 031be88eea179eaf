"""Error analysis of a detector: the paper's Section 4.2 and Figure 4, after Hoiem et al.

    python analyze.py --gt GT_DIR --det DET_DIR --out runs/analyze
    python analyze.py --gt GT_DIR --det FRCNN_DIR --det2 YOLO_DIR --labels "Fast R-CNN" YOLO --out DIR

The same folders as evaluate.py (its readers: one txt per image, VOC XML annotations, or
the VOC server's comp4_det_test_<class>.txt files). For each class, its top N detections
(N = its number of objects that are not difficult) are each put in one category:

  Correct       the right class, IoU >= .5 with an object of the class not yet taken
  Localization  the right class, .1 <= IoU < .5, or a duplicate (IoU >= .1 with an object
                of the class that a higher-scoring detection took)
  Similar       IoU >= .1 with an object of a similar class (the class overlapped most)
  Other         IoU >= .1 with an object of another class (idem)
  Background    IoU < .1 with every object

The paper writes IoU > .5 and .1 < IoU < .5; it says it uses "the methodology and tools
of Hoiem et al.", whose code (detectionAnalysis, D. Hoiem's release for "Diagnosing Error
in Object Detectors", ECCV 2012; src/matchDetectionsWithGroundTruth.m and
src/analyzeFalsePositives.m, e.g. in github.com/weiliu89/detectionAnalysis) tests
``>=`` at both thresholds, as the VOC devkit does at .5: exactly .5 is Correct and
exactly .1 is not Background. Matching follows that code: in score order, a detection
takes the highest-IoU object still free among those at or above the threshold; a
detection above the threshold with only taken objects is a duplicate. Duplicates are
Localization errors (Hoiem's 'weak' matching labels them so), and they also count as
a confusion with another class's object. A detection that takes a difficult object
counts as Correct, as in Hoiem's code (its label 0 is ">= 0"); difficult objects are not
in N; all objects, difficult or not, count for Similar, Other and Background. A class
with fewer than N detections has all of them analysed (the "top" column says how many).
IoU is evaluate.py's (VOC "+1" pixels). Correct differs from evaluate.py's true positive
in one case only: a detection whose best object is taken falls back to the best free
one (Hoiem's matching); evaluate.py, like the VOC devkit, calls it a false positive.

Overall numbers add up the counts of all classes (Hoiem's pie chart: the sum of each
category over the sum of N), which is what Figure 4 shows for Fast R-CNN and YOLO.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import argtypes
from box_files import read_pair
from errors import UserError, one_line
from evaluate import box_iou

CATEGORIES = ("correct", "localization", "similar", "other", "background")
TITLES = {"correct": "Correct", "localization": "Loc", "similar": "Sim", "other": "Other",
          "background": "Background"}
HIGH_IOU, LOW_IOU = 0.5, 0.1  # Hoiem's iuthresh_strong and iuthresh_weak (setDatasetParameters.m)

# Hoiem et al.'s VOC groups of similar classes: dataset_params.similar_classes in their
# src/setDatasetParameters.m ("animals + person", "all vehicles", "bicycle motorcycle",
# "chair, table, sofa", "bird, airplane"). Two classes are similar when a group holds both.
# Their slides agree: dog's "similar objects" are person, cat and horse; aeroplane's are
# bird, boat and car. (Not grouped: bottle, pottedplant, tvmonitor.)
VOC_SIMILAR = (
    ("bird", "cat", "cow", "dog", "horse", "person", "sheep"),
    ("aeroplane", "boat", "bus", "car", "train", "bicycle", "motorbike"),
    ("bicycle", "motorbike"),
    ("chair", "diningtable", "sofa"),
    ("aeroplane", "bird"),
)
# VOC's 20 classes (utils.VOC_CLASSES; not imported from there: utils needs torch, and this
# command, like evaluate.py, starts with numpy alone).
VOC_NAMES = frozenset(c for group in VOC_SIMILAR for c in group) | {"bottle", "pottedplant", "tvmonitor"}


@dataclass
class ClassObjects:
    """The objects of one class: boxes, difficult flags, and per image their row numbers."""
    boxes: np.ndarray
    difficult: list
    by_image: dict = field(default_factory=dict)


def group_objects(gts: dict) -> dict[str, ClassObjects]:
    """Split an evaluate.py ground-truth table by class, keeping the file and line order
    (the first object wins IoU ties, as in Hoiem's code and evaluate.py)."""
    groups = {}
    for cls in sorted(set(gts["cls"].tolist())):
        rows = np.flatnonzero(gts["cls"] == cls)
        objects = ClassObjects(gts["boxes"][rows], gts["difficult"][rows].tolist())
        for k, image in enumerate(gts["image"][rows].tolist()):
            objects.by_image.setdefault(image, []).append(k)
        groups[cls] = objects
    return groups


def pair_ious(images, boxes, objects: ClassObjects):
    """Per detection, the rows of the objects in its image and their IoUs with it, from
    one vectorised box_iou call over all (detection, object) pairs."""
    rows = [objects.by_image.get(image, []) for image in images]
    counts = [len(r) for r in rows]
    pair_det = np.repeat(np.arange(len(rows)), counts)
    pair_obj = np.array([k for r in rows for k in r], dtype=int)
    ious = box_iou(boxes[pair_det], objects.boxes[pair_obj]).tolist() if len(pair_obj) else []
    ends = np.cumsum(counts).tolist()
    return [(r, ious[end - len(r):end]) for r, end in zip(rows, ends)]


def match(images, boxes, objects: ClassObjects, threshold: float, weak: bool):
    """Hoiem's matchDetectionsWithGroundTruth for detections in ranking order.

    Returns ``(label, iou)`` per detection: label 1 for a taken object, 0 for a taken
    difficult object (and, with ``weak``, for a duplicate), -1 otherwise; iou is that of
    the object taken, else the largest IoU with an object of the class in the image.
    """
    label, best, taken = np.full(len(images), -1, dtype=np.int8), np.zeros(len(images)), set()
    for d, (rows, iou) in enumerate(pair_ious(images, boxes, objects)):
        if not rows:
            continue
        free_iou = [0.0 if row in taken else value for row, value in zip(rows, iou)]
        if max(free_iou) >= threshold:
            k = free_iou.index(max(free_iou))  # the first on ties, as Matlab's max
            taken.add(rows[k])
            label[d], best[d] = (0 if objects.difficult[rows[k]] else 1), iou[k]
        else:
            best[d] = max(iou)
            if weak and best[d] >= threshold:
                label[d] = 0  # a duplicate: 'weak' matching sets its label to 0
    return label, best


def similar_classes(groups) -> dict[str, set]:
    """class -> the classes similar to it (those sharing a group with it)."""
    similar = {}
    for group in groups:
        for cls in group:
            similar.setdefault(cls, set()).update(c for c in group if c != cls)
    return similar


def classify(cls, images, boxes, objects: dict[str, ClassObjects], similar: set):
    """The category of each of ``cls``'s top detections (ranked), and the class each
    confused detection overlaps most (None for the others); Hoiem's analyzeFalsePositives."""
    own = objects.get(cls, ClassObjects(np.zeros((0, 4)), []))
    correct = match(images, boxes, own, HIGH_IOU, weak=False)[0] >= 0
    loc = (match(images, boxes, own, LOW_IOU, weak=True)[0] >= 0) & ~correct
    others = [c for c in objects if c != cls]
    overlap = np.zeros((len(images), len(others)))
    for j, other in enumerate(others):
        label, iou = match(images, boxes, objects[other], LOW_IOU, weak=True)
        overlap[:, j] = np.where((label >= 0) & ~loc & ~correct, iou, 0.0)
    most = overlap.argmax(axis=1) if others else np.zeros(len(images), dtype=int)
    confused = overlap.max(axis=1) > 0 if others else np.zeros(len(images), bool)
    with_class = [others[j] if hit else None for j, hit in zip(most.tolist(), confused.tolist())]
    category = np.where(correct, "correct", np.where(loc, "localization", "background")).astype(object)
    for d, other in enumerate(with_class):
        if other is not None:
            category[d] = "similar" if other in similar else "other"
    return category.tolist(), with_class


def analyze(gts: dict, dets: dict, groups=VOC_SIMILAR) -> dict:
    """Per class and overall counts of the five categories (module doc).

    ``gts`` and ``dets`` are evaluate.py tables (``read_gt_dir``, ``read_det_dir``);
    ``groups``: the similar-class groups. Returns ``{"classes": {cls: row}, "overall": row}``
    where a row has ``objects`` (N), ``detections``, ``analysed`` and a count per
    category, and a class row also ``confused_with`` {class: count}.
    """
    objects = group_objects(gts)
    similar = similar_classes(groups)
    classes, overall = {}, dict.fromkeys(("objects", "detections", "analysed", *CATEGORIES), 0)
    for cls, own in objects.items():
        n = own.difficult.count(False)
        rows = np.flatnonzero(dets["cls"] == cls)
        ranked = rows[np.argsort(-dets["score"][rows], kind="stable")]  # ties: file, then line order
        top = ranked[:n]
        category, with_class = classify(cls, dets["image"][top].tolist(), dets["boxes"][top],
                                        objects, similar.get(cls, set()))
        row = {"objects": n, "detections": len(rows), "analysed": len(top),
               **{c: category.count(c) for c in CATEGORIES}, "confused_with": {}}
        for other in with_class:
            if other is not None:
                row["confused_with"][other] = row["confused_with"].get(other, 0) + 1
        classes[cls] = row
        for key in overall:
            overall[key] += row[key]
    return {"classes": classes, "overall": overall}


def fractions(row: dict) -> dict[str, float]:
    """Each category's share of the analysed detections (0 when there are none)."""
    return {c: row[c] / row["analysed"] if row["analysed"] else 0.0 for c in CATEGORIES}


# --------------------------------------------------------------------------- reports
def format_table(result: dict, label: str) -> str:
    """Counts per class, the overall counts, and the overall percentages."""
    width = max([16, *(len(name) + 2 for name in result["classes"])])  # long names keep the columns
    head = f"{'class':<{width}}{'N':>6}{'top':>6}" + "".join(f"{TITLES[c]:>12}" for c in CATEGORIES)
    lines = [f"{label}: top N detections of each class (N = its objects, difficult ones aside)", head]
    rows = [*result["classes"].items(), ("overall", result["overall"])]
    for name, row in rows:
        lines.append(f"{name:<{width}}{row['objects']:>6}{row['analysed']:>6}"
                     + "".join(f"{row[c]:>12}" for c in CATEGORIES))
    share = fractions(result["overall"])
    lines.append(f"{'overall %':<{width + 12}}" + "".join(f"{100 * share[c]:>11.1f}%" for c in CATEGORIES))
    return "\n".join(lines)


def report_json(results: list[dict], labels, det_dirs, gt_dir, groups) -> dict:
    return {"method": {"categories": list(CATEGORIES), "high_iou": HIGH_IOU, "low_iou": LOW_IOU,
                       "top_n": "per class, N = its objects that are not difficult",
                       "similar_groups": [list(g) for g in groups], "gt": str(gt_dir)},
            "detectors": [{"label": label, "det": str(det), **result, "overall_fractions": fractions(
                result["overall"])} for label, det, result in zip(labels, det_dirs, results)]}


# Hoiem's pie colours (displayFalsePositiveImpactPlot.m): white, blue, red, green, purple.
PIE_COLOURS = ("#ffffff", "#4f81bd", "#c0504d", "#5ce660", "#8064a2")


def draw_pie(ax, result: dict, label: str) -> None:
    """One detector's overall shares as Figure 4 draws them: a pie with labelled wedges."""
    share = fractions(result["overall"])
    if not result["overall"]["analysed"]:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        names = [f"{TITLES[c]}: {100 * share[c]:.1f}%" if share[c] > 0 else "" for c in CATEGORIES]
        ax.pie([share[c] for c in CATEGORIES], labels=names, colors=PIE_COLOURS, startangle=90,
               counterclock=False, wedgeprops={"edgecolor": "black", "linewidth": 0.6},
               textprops={"fontsize": 9})
        ax.set_aspect("equal")
    ax.set_title(f"{label}\n(top {result['overall']['analysed']} detections)", fontsize=10)


def pie_figure(results: list[dict], labels):
    """The pies of one or two detectors side by side (Figure 4 compares Fast R-CNN and YOLO)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(results), 3.6), layout="constrained")
    for ax, result, label in zip(fig.subplots(1, len(results), squeeze=False)[0], results, labels):
        draw_pie(ax, result, label)
    return fig


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argtypes.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", required=True, help="ground-truth folder (as evaluate.py reads it)")
    p.add_argument("--det", required=True, help="detections folder (per-image txt or comp4 files)")
    p.add_argument("--det2", help="a second detector's detections, analysed beside the first")
    p.add_argument("--labels", nargs="+", help="a name for each detector (default: the folders)")
    p.add_argument("--similar", help="JSON list of groups of similar class names, e.g. "
                                     '[["cat", "dog"], ["bus", "car"]] (default: Hoiem\'s VOC groups '
                                     "when every class is a VOC class, else none: Similar stays empty)")
    p.add_argument("--out", help="write analysis.txt, analysis.json and error_pie.png into this folder")
    return p


def load_similar(path, classes) -> list[list[str]]:
    """Groups of class names from a JSON file; every name must be a class of the data."""
    try:
        groups = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(isinstance(c, str) for c in g) for g in groups):
        raise UserError(f'{path}: must be a JSON list of groups of class names, e.g. [["cat", "dog"]]')
    unknown = sorted({c for g in groups for c in g} - set(classes))
    if unknown:
        raise UserError(f"{path}: {unknown[0]!r} is not a class of the ground truth or detections "
                        f"({', '.join(sorted(classes))})")
    return groups


def read_inputs(args) -> tuple[dict, list[dict], list[str]]:
    """Ground truth, each detector's detections and their labels; UserError on bad input."""
    det_dirs = [args.det] + ([args.det2] if args.det2 else [])
    labels = args.labels or det_dirs
    if len(labels) != len(det_dirs):
        raise UserError(f"--labels: {len(labels)} names for {len(det_dirs)} detector(s)")
    gts, dets = read_pair(args.gt, det_dirs)  # evaluate.py's checks: relative boxes, no common name
    return gts, dets, labels


def choose_groups(args, gts, dets) -> tuple[list, str]:
    """The similar-class groups and a note saying where they come from."""
    classes = set(gts["cls"].tolist()).union(*(d["cls"].tolist() for d in dets))
    if args.similar:
        return load_similar(args.similar, classes), f"similar classes: {args.similar}"
    if classes <= VOC_NAMES:
        return [list(g) for g in VOC_SIMILAR], "similar classes: Hoiem et al.'s VOC groups"
    return [], "no similar-class groups for these (non-VOC) classes: Similar is empty; --similar FILE sets them"


OUT_FILES = ("analysis.txt", "analysis.json", "error_pie.png")


def check_out(args) -> None:
    """Refuse an --out that would replace files, or that is an input folder (its
    analysis.txt would then be read as the box file of an image 'analysis'), before the
    analysis is run (it was refused only after the tables were printed)."""
    out = Path(args.out)
    for option, folder in (("--gt", args.gt), ("--det", args.det), ("--det2", args.det2)):
        if folder and out.resolve() == Path(folder).resolve():
            raise UserError(f"--out {out}: is the {option} folder; write the analysis elsewhere")
    taken = [out / name for name in OUT_FILES if (out / name).exists() or (out / name).is_symlink()]
    if taken:
        raise UserError(f"{taken[0]}: already exists; choose another --out")


def write_outputs(out, text: str, data: dict, results, labels) -> list[Path]:
    """analysis.txt, analysis.json and error_pie.png in ``out``; refuses to replace files."""
    from plots import save_figure  # standard library only at import

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--out: the pie charts need the 'matplotlib' package: pip install matplotlib")
    out = Path(out)
    paths = [out / name for name in OUT_FILES]
    taken = [p for p in paths if p.exists() or p.is_symlink()]
    if taken:
        raise UserError(f"{taken[0]}: already exists; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(text + "\n")
        paths[1].write_text(json.dumps(data, indent=2) + "\n")
        save_figure(pie_figure(results, labels), paths[2])
    except OSError as err:
        raise UserError(f"{out}: cannot write ({err.strerror})") from None
    return paths


def run(args) -> None:
    if args.out:
        check_out(args)
    gts, dets, labels = read_inputs(args)
    groups, note = choose_groups(args, gts, dets)
    results = [analyze(gts, d, groups) for d in dets]
    text = "\n\n".join(format_table(r, label) for r, label in zip(results, labels)) + f"\n{note}"
    print(text)
    if args.out:
        data = report_json(results, labels, [args.det, args.det2][:len(dets)], args.gt, groups)
        for path in write_outputs(args.out, text, data, results, labels):
            print(f"wrote {path}")


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status: 2 and one 'error:' line on bad
    input (as evaluate.py, whose readers and UserError it shares)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
