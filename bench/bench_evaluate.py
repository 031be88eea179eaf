"""Benchmark evaluate.py on a VOC2007-test-sized folder pair.

Generates (seeded) 5,000 images' worth of files in a temporary folder: ground
truth with ~2.4 objects per image over the 20 VOC classes, and 25 detections
per image (125,000): jittered copies of the objects with high scores plus
background boxes with low scores, scores with 4 decimals (so there are ties).
Then times, as the median of several repetitions:

* reading only: plain ``open().read()`` of all the files, in-process;
* ``python -c "import numpy"`` as a subprocess (interpreter + numpy start-up);
* ``python evaluate.py --gt ... --det ...`` as a subprocess, start-up included;
* ``read_gt_dir`` + ``read_det_dir`` and ``evaluate_detections`` in-process;
* a straightforward per-box pure-Python reference (written here, Padilla's
  loops, with GT boxes looked up per image), including its file reading;

checks that the three give identical APs, prints a table and writes JSON.

    python bench/bench_evaluate.py [--reps 5] [--json bench/results/evaluate.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

import evaluate  # noqa: E402
from machine import machine  # noqa: E402

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
           "train", "tvmonitor"]
CLASS_FREQUENCY = np.array([3, 3, 4, 4, 5, 2, 12, 3, 8, 3, 2, 4, 3, 3, 35, 5, 3, 2, 2, 3], float)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def random_boxes(rng, n, width=500, height=375):
    w, h = rng.uniform(16, 300, n), rng.uniform(16, 300, n)
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def generate(root, n_images, gt_per_image, dets_per_image, seed):
    """Write root/gt/*.txt and root/det/*.txt; returns (number of GT boxes, detections)."""
    rng = np.random.default_rng(seed)
    p = CLASS_FREQUENCY / CLASS_FREQUENCY.sum()
    n_gt = rng.poisson(gt_per_image - 1, n_images) + 1
    gt_image = np.repeat(np.arange(n_images), n_gt)
    gt_class = rng.choice(len(CLASSES), len(gt_image), p=p)
    gt_boxes = np.floor(random_boxes(rng, len(gt_image)))
    # Detections of objects: 0, 1 or 2 per object (duplicates are FPs), jittered by ~5%.
    copies = rng.choice(3, len(gt_image), p=[0.25, 0.55, 0.20])
    src = np.repeat(np.arange(len(gt_image)), copies)
    size = (gt_boxes[src, 2:] - gt_boxes[src, :2]).repeat(2, axis=1)
    hit_boxes = gt_boxes[src] + rng.normal(0, 0.05, (len(src), 4)) * size
    hit = (gt_image[src], gt_class[src], rng.beta(5, 2, len(src)), hit_boxes)
    # Background detections fill every image up to dets_per_image.
    fill = np.maximum(dets_per_image - np.bincount(hit[0], minlength=n_images), 0)
    bg_image = np.repeat(np.arange(n_images), fill)
    bg = (bg_image, rng.choice(len(CLASSES), len(bg_image), p=p), rng.beta(1, 6, len(bg_image)),
          random_boxes(rng, len(bg_image)))
    det = [np.concatenate(parts) for parts in zip(hit, bg)]
    det[3][:, 2:] = np.maximum(det[3][:, 2:], det[3][:, :2])
    shuffled = rng.permutation(len(det[0]))
    order = shuffled[np.argsort(det[0][shuffled], kind="stable")]  # by image, random within
    write_folder(root / "gt", n_images, gt_image, ["%s %d %d %d %d" % (CLASSES[c], *b)
                                                   for c, b in zip(gt_class, gt_boxes)])
    write_folder(root / "det", n_images, det[0][order],
                 ["%s %.4f %.1f %.1f %.1f %.1f" % (CLASSES[c], s, *b)
                  for c, s, b in zip(det[1][order], det[2][order], det[3][order])])
    return len(gt_image), len(order)


def write_folder(folder, n_images, image_of_line, lines):
    folder.mkdir(parents=True)
    bounds = np.searchsorted(image_of_line, np.arange(n_images + 1))
    for i in range(n_images):
        text = "".join(line + "\n" for line in lines[bounds[i]:bounds[i + 1]])
        (folder / f"{2 * i + 1:06d}.txt").write_text(text)


# --------------------------------------------------------------------------
# Per-box pure-Python reference (Padilla's loops)
# --------------------------------------------------------------------------

def reference_read(folder, is_gt):
    boxes = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                v = line.split()
                if v:
                    boxes.append((name[:-4], v[0], *map(float, v[1:])))
    return boxes


def reference_iou(a, b):
    if a[0] > b[2] or b[0] > a[2] or a[3] < b[1] or a[1] > b[3]:
        return 0.0
    inter = (min(a[2], b[2]) - max(a[0], b[0]) + 1) * (min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def reference_class_ap(gts, dets, threshold):
    """Every-point AP of one class, one detection at a time."""
    per_image = {}
    for g in gts:
        per_image.setdefault(g[0], []).append([g[2:6], False])
    tp = fp = 0
    rec, prec = [0.0], [0.0]
    for d in sorted(dets, key=lambda d: d[2], reverse=True):
        best, best_gt = 0.0, None
        for gt in per_image.get(d[0], []):
            overlap = reference_iou(d[3:7], gt[0])
            if overlap > best:
                best, best_gt = overlap, gt
        if best_gt is not None and best >= threshold and not best_gt[1]:
            best_gt[1] = True
            tp += 1
        else:
            fp += 1
        rec.append(tp / len(gts))
        prec.append(tp / (fp + tp))
    rec.append(1.0)
    prec.append(0.0)
    for i in range(len(prec) - 1, 0, -1):
        prec[i - 1] = max(prec[i - 1], prec[i])
    ap = 0.0
    for i in range(1, len(rec)):
        if rec[i] != rec[i - 1]:
            ap += (rec[i] - rec[i - 1]) * prec[i]
    return ap


def reference_evaluate(gt_dir, det_dir, threshold=0.5):
    gts, dets = reference_read(gt_dir, True), reference_read(det_dir, False)
    aps = {}
    for c in sorted({g[1] for g in gts}):
        aps[c] = reference_class_ap([g for g in gts if g[1] == c],
                                    [d for d in dets if d[1] == c], threshold)
    total = 0.0
    for ap in aps.values():
        total += ap
    return {"mAP": total / len(aps), "AP": aps}


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

def median_time(function, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def read_all(folders):
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as f:
                f.read()


def run_benchmarks(root, reps, reference_reps):
    gt_dir, det_dir, out_json = root / "gt", root / "det", root / "cli.json"
    cli = [sys.executable, str(ROOT / "evaluate.py"), "--gt", str(gt_dir), "--det", str(det_dir),
           "--json", str(out_json)]
    timings = {}
    timings["read_files"], _ = median_time(lambda: read_all([gt_dir, det_dir]), reps)
    timings["python_import_numpy"], _ = median_time(
        lambda: subprocess.run([sys.executable, "-c", "import numpy"], check=True), reps)
    timings["cli"], _ = median_time(
        lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL), reps)
    timings["read_dirs"], (gts, dets) = median_time(
        lambda: (evaluate.read_gt_dir(gt_dir), evaluate.read_det_dir(det_dir)), reps)
    timings["evaluate_detections"], fast = median_time(
        lambda: evaluate.evaluate_detections(gts, dets), reps)
    timings["reference"], slow = median_time(
        lambda: reference_evaluate(gt_dir, det_dir), reference_reps)
    cli_result = json.loads(out_json.read_text())
    identical = (fast["AP"] == slow["AP"] == cli_result["AP"]
                 and fast["mAP"] == slow["mAP"] == cli_result["mAP"])
    return timings, identical, fast, len(gts["cls"]), len(dets["cls"])


def print_table(info, timings):
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
          f"numpy {info['numpy']}")
    rows = [("read files only (open().read(), in-process)", "read_files"),
            ("python -c 'import numpy' (subprocess)", "python_import_numpy"),
            ("python evaluate.py (subprocess, start-up incl.)", "cli"),
            ("read_gt_dir + read_det_dir (in-process)", "read_dirs"),
            ("evaluate_detections (in-memory)", "evaluate_detections"),
            ("pure-Python per-box reference (read + evaluate)", "reference")]
    base = timings["read_files"]
    print(f"{'what':<50}{'seconds':>9}{'x read':>9}")
    for label, key in rows:
        print(f"{label:<50}{timings[key]:>9.3f}{timings[key] / base:>9.2f}")
    reference = timings["reference"]
    in_process = timings["read_dirs"] + timings["evaluate_detections"]
    print(f"reference (in-process) / evaluate.py (subprocess): {reference / timings['cli']:.1f}x; "
          f"reference / (read_dirs + evaluate_detections): {reference / in_process:.1f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--gt-per-image", type=float, default=2.4)
    parser.add_argument("--dets-per-image", type=int, default=25)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per timing (median)")
    parser.add_argument("--reference-reps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "evaluate.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        n_gt, n_det = generate(Path(tmp), args.images, args.gt_per_image, args.dets_per_image,
                               args.seed)
        timings, identical, result, _, _ = run_benchmarks(Path(tmp), args.reps, args.reference_reps)
    info = machine()
    print(f"data: {args.images} images, {n_gt} GT boxes, {n_det} detections, "
          f"{len(result['AP'])} classes, mAP {result['mAP']:.4f}")
    print_table(info, timings)
    print("identical APs (evaluate_detections, evaluate.py, reference):", identical)
    report = {"machine": info, "data": {"images": args.images, "gt_boxes": n_gt,
                                        "detections": n_det, "seed": args.seed},
              "reps": args.reps, "timings_s": timings,
              "ratios": {"cli_over_read_files": timings["cli"] / timings["read_files"],
                         "reference_over_cli": timings["reference"] / timings["cli"],
                         "reference_over_in_process": timings["reference"] / (
                             timings["read_dirs"] + timings["evaluate_detections"])},
              "identical_ap": identical, "mAP": result["mAP"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
