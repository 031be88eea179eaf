"""Benchmark evaluate.py on a VOC2007-test-sized folder pair.

Generates (seeded) 5,000 images' worth of files in a temporary folder: ground
truth with ~2.4 objects per image over the 20 VOC classes, and 25 detections
per image (125,000): jittered copies of the objects with high scores plus
background boxes with low scores, scores with 4 decimals (so there are ties).
Then times, as the median of several repetitions:

* reading only: plain ``open().read()`` of all the files, in-process;
* ``python -c "import numpy"`` as a subprocess (interpreter + numpy start-up);
* ``python evaluate.py --gt ... --det ...`` as a subprocess, start-up included, and
  the same before issue #15 (the vectorised tokenizer evaluate.py had, kept below as
  the reference: this script run with ``--before-cli``), in turn, rep after rep;
* ``read_gt_dir`` + ``read_det_dir`` (the plain per-line parser) and the vectorised
  tokenizer, in-process, in turn; ``evaluate_detections`` in-process;
* a straightforward per-box pure-Python reference (written here, Padilla's
  loops, with GT boxes looked up per image), including its file reading;

checks that the parser and the tokenizer give the same tables and that all of
them give identical APs, prints a table and writes JSON.

    python bench/bench_evaluate.py [--reps 5] [--json bench/results/evaluate.json]
    python bench/bench_evaluate.py --quick       # 300 images, 1 repetition: a smoke test
"""

import argparse
import json
import os
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
# Before (#15): the vectorised reader evaluate.py had (numpy over the raw bytes)
# --------------------------------------------------------------------------

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)
DIFFICULT_WORDS = (b"0", b"1", b"difficult")


def before_read_dir(directory, is_gt):
    """``evaluate.read_gt_dir`` / ``read_det_dir`` before #15, for ``.txt`` folders."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".txt") and not n.startswith("."))
    table = _parse_fast(_read_files(directory, names), is_gt)
    if table is None:
        raise ValueError(f"{directory}: the vectorised reader gave up (the plain parser would report the line)")
    stems = np.array([n[:-len(".txt")] for n in names], dtype=str)
    table["image"] = stems[table.pop("file")]
    return table


def before_cli(gt_dir, det_dir, json_path):
    """What ``python evaluate.py --gt --det --json`` did before #15 (its reading; the same metric)."""
    result = evaluate.evaluate_detections(before_read_dir(gt_dir, True), before_read_dir(det_dir, False))
    evaluate.write_json(json_path, result)


def _read_files(directory, names):
    """The bytes of each file ``directory/name``.

    Where the OS allows it, the files are opened relative to the folder's
    descriptor (``dir_fd``): no full path to build and resolve for each file,
    which makes reading 10,000 small files ~30% faster.
    """
    if os.open not in os.supports_dir_fd:
        return [_read_file(os.path.join(directory, name)) for name in names]
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        return [_read_file(name, dir_fd) for name in names]
    finally:
        os.close(dir_fd)


def _read_file(path, dir_fd=None):
    """The bytes of a file (os.read: about half the cost of open().read() per small file)."""
    fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    try:
        blocks = []
        while block := os.read(fd, 1 << 20):
            blocks.append(block)
        return b"".join(blocks)
    finally:
        os.close(fd)


def _tokenize(chunks):
    """Split the concatenated files into whitespace-separated tokens, vectorised.

    Works on the raw bytes with numpy: tokens start where a non-space byte
    follows a space byte and end at the next space byte, so starts and ends
    alternate; the tokens of line i are those between newlines i-1 and i.
    Returns a dict with the byte buffer, token ``start``/``end`` offsets and,
    for every non-empty line, ``first`` (index of its first token), ``count``
    (number of tokens) and ``file`` (index into ``chunks``).
    """
    chunks = [c if c.endswith(b"\n") or not c else c + b"\n" for c in chunks]
    lines_per_file = np.array([c.count(b"\n") for c in chunks], dtype=np.int64)
    file_first_line = np.cumsum(lines_per_file) - lines_per_file
    buf = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    space = np.empty(len(buf) + 1, dtype=bool)
    space[0] = True  # a virtual space before byte 0
    # bytes.split()'s whitespace: 9-13 (\t \n \v \f \r) and 32 (two comparisons are
    # several times faster than looking each byte up in a table)
    space[1:] = (buf == 32) | (buf - np.uint8(9) < 5)
    edges = np.flatnonzero(space[1:] != space[:-1])  # where space <-> non-space
    start, end = edges[0::2], edges[1::2]
    tokens_up_to_line = np.searchsorted(start, np.flatnonzero(buf == ord("\n")))
    first = np.concatenate(([0], tokens_up_to_line[:-1]))
    count = tokens_up_to_line - first
    line = np.flatnonzero(count)
    return {"buf": buf, "start": start, "end": end, "first": first[line], "count": count[line],
            "file": np.searchsorted(file_first_line, line, side="right") - 1}


def _token_chars(tokens, index):
    """The tokens at ``index`` (1-D) as a (width, n) uint8 matrix: token j in column j,
    NUL-padded.  Built one character position (row) at a time: few, long vector ops."""
    start = tokens["start"][index]
    length = tokens["end"][index] - start
    width = max(int(length.max(initial=0)), 1)
    padded = np.concatenate((tokens["buf"], np.zeros(width, dtype=np.uint8)))
    chars = np.empty((width, len(start)), dtype=np.uint8)
    for k in range(width):
        chars[k] = np.where(length > k, padded[start + k], 0)
    return chars


def _token_strings(tokens, index):
    """The tokens at ``index`` (1-D) as a fixed-width numpy bytes array (dtype ``S<width>``)."""
    chars = np.ascontiguousarray(_token_chars(tokens, index).T)
    return chars.view(f"S{chars.shape[1]}")[:, 0]


_POWERS_OF_TEN = 10.0 ** np.arange(16)


def _parse_decimals(chars):
    """Vectorised ``float()`` for plain decimals such as ``-12.375``; returns ``(values, ok)``.

    ``chars`` is (width, n): token j in column j, NUL-padded (``_token_chars``).  ``ok`` is False
    for tokens not of the form ``[-]digits[.digits]`` with 1 to 15 digits;
    those need ``float()``.  The result is exactly ``float(token)``: the digits
    form an integer m < 10**15 < 2**53 and 10**f (f <= 15) is a float, both
    exact, so m / 10**f is one correctly rounded division, as in the fast path
    of every correctly rounded decimal parser (Clinger, 1990).
    """
    digit = chars - np.uint8(ord("0"))
    is_digit = digit < 10
    is_dot = chars == ord(".")
    negative = chars[0] == ord("-")
    allowed = is_digit | is_dot | (chars == 0)
    allowed[0] |= negative
    n_digits = is_digit.sum(0)
    ok = allowed.all(0) & (is_dot.sum(0) <= 1) & (n_digits >= 1) & (n_digits <= 15)
    mantissa = np.zeros(chars.shape[1], dtype=np.int64)
    fraction_digits = np.zeros(chars.shape[1], dtype=np.int64)
    seen_dot = np.zeros(chars.shape[1], dtype=bool)
    for k in range(len(chars)):  # Horner's rule, one character position at a time
        mantissa = np.where(is_digit[k], mantissa * 10 + digit[k], mantissa)
        seen_dot |= is_dot[k]
        fraction_digits += is_digit[k] & seen_dot
    values = mantissa / _POWERS_OF_TEN[np.minimum(fraction_digits, 15)]
    return np.where(negative, -values, values), ok


def _token_floats(tokens, index):
    """The tokens at ``index`` (any shape) parsed as floats; ValueError if one is not a number."""
    chars = _token_chars(tokens, np.ravel(index))
    values, ok = _parse_decimals(chars)
    for i in np.flatnonzero(~ok):  # rare forms such as 1e-05 or nan: ask float()
        values[i] = float(chars[:, i].tobytes().rstrip(b"\0"))
    return values.reshape(np.shape(index))


def _decode_labels(raw):
    """Decode a bytes array of class names as UTF-8 (decoding each distinct name once)."""
    names, codes = np.unique(raw, return_inverse=True)
    return np.array([n.decode("utf-8") for n in names.tolist()], dtype=str)[codes]


def _parse_fast(chunks, is_gt):
    """Parse GT or detection files in bulk; None if anything looks wrong.

    On None evaluate.py re-parsed line by line (the plain parser, now the only one),
    which reports the first bad line; numbers are parsed exactly like ``float()``.
    """
    tokens = _tokenize(chunks)
    first, count = tokens["first"], tokens["count"]
    if not np.isin(count, (5, 6) if is_gt else 6).all() or not tokens["buf"].all():
        return None  # a line with a wrong number of values, or a NUL byte
    n_numbers = 4 if is_gt else 5
    try:
        numbers = _token_floats(tokens, first[:, None] + np.arange(1, n_numbers + 1))
        labels = _decode_labels(_token_strings(tokens, first))
    except (ValueError, UnicodeDecodeError):
        return None
    boxes = numbers[:, -4:]
    if not np.isfinite(numbers).all() or (boxes[:, 2] < boxes[:, 0]).any() \
            or (boxes[:, 3] < boxes[:, 1]).any():
        return None
    table = {"file": tokens["file"], "cls": labels, "boxes": boxes}
    if not is_gt:
        table["score"] = numbers[:, 0]
        return table
    flagged = np.flatnonzero(count == 6)
    flags = np.char.lower(_token_strings(tokens, first[flagged] + 5))
    if not np.isin(flags, DIFFICULT_WORDS).all():
        return None
    table["difficult"] = np.zeros(len(first), dtype=bool)
    table["difficult"][flagged] = flags != b"0"
    return table


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

def median_times(functions, reps):
    """Medians of ``{key: function}`` run in turn, rep after rep (before and after see the
    same load); returns ``({key: median seconds}, {key: last result})``."""
    times, results = {key: [] for key in functions}, {}
    for _ in range(reps):
        for key, function in functions.items():
            start = time.perf_counter()
            results[key] = function()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}, results


def read_all(folders):
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as f:
                f.read()


def same_tables(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype.kind == b[k].dtype.kind and np.array_equal(a[k], b[k]) for k in a)


def run_benchmarks(root, reps, reference_reps):
    gt_dir, det_dir = root / "gt", root / "det"
    folders = ["--gt", str(gt_dir), "--det", str(det_dir)]
    after_cli = [sys.executable, str(ROOT / "evaluate.py"), *folders, "--json", str(root / "after.json")]
    before_cli = [sys.executable, __file__, "--before-cli", str(gt_dir), str(det_dir), str(root / "before.json")]
    run = lambda argv: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)  # noqa: E731
    timings, _ = median_times({"read_files": lambda: read_all([gt_dir, det_dir]),
                               "python_import_numpy": lambda: run([sys.executable, "-c", "import numpy"]),
                               "cli": lambda: run(after_cli), "before_cli": lambda: run(before_cli)}, reps)
    more, tables = median_times({
        "read_dirs": lambda: (evaluate.read_gt_dir(gt_dir), evaluate.read_det_dir(det_dir)),
        "before_read_dirs": lambda: (before_read_dir(gt_dir, True), before_read_dir(det_dir, False))}, reps)
    gts, dets = tables["read_dirs"]
    timings |= more
    more, results = median_times({"evaluate_detections": lambda: evaluate.evaluate_detections(gts, dets)}, reps)
    timings |= more
    more, reference = median_times({"reference": lambda: reference_evaluate(gt_dir, det_dir)}, reference_reps)
    timings |= more
    result, slow = results["evaluate_detections"], reference["reference"]
    outputs = [json.loads((root / f"{name}.json").read_text()) for name in ("after", "before")]
    checks = {"same_tables": all(map(same_tables, tables["read_dirs"], tables["before_read_dirs"])),
              "identical_ap": all(result["AP"] == other["AP"] and result["mAP"] == other["mAP"]
                                  for other in (slow, *outputs))}
    return timings, checks, result, len(gts["cls"]), len(dets["cls"])


def print_table(info, timings):
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
          f"numpy {info['numpy']}; load average {os.getloadavg()[0]:.2f} (1 min)")
    rows = [("read files only (open().read(), in-process)", "read_files"),
            ("python -c 'import numpy' (subprocess)", "python_import_numpy"),
            ("python evaluate.py (subprocess, start-up incl.)", "cli"),
            ("before #15: same, vectorised tokenizer (subprocess)", "before_cli"),
            ("read_gt_dir + read_det_dir (in-process)", "read_dirs"),
            ("before #15: vectorised tokenizer (in-process)", "before_read_dirs"),
            ("evaluate_detections (in-memory)", "evaluate_detections"),
            ("pure-Python per-box reference (read + evaluate)", "reference")]
    base = timings["read_files"]
    print(f"{'what':<54}{'seconds':>9}{'x read':>9}")
    for label, key in rows:
        print(f"{label:<54}{timings[key]:>9.3f}{timings[key] / base:>9.2f}")
    print(f"same run: evaluate.py / before {timings['cli'] / timings['before_cli']:.2f}x; parser / before "
          f"{timings['read_dirs'] / timings['before_read_dirs']:.2f}x; reference / evaluate.py "
          f"{timings['reference'] / timings['cli']:.1f}x")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--before-cli"]:  # the subprocess timed as "before_cli"
        before_cli(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--gt-per-image", type=float, default=2.4)
    parser.add_argument("--dets-per-image", type=int, default=25)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per timing (median)")
    parser.add_argument("--reference-reps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 images, 1 repetition: a smoke test")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "evaluate.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.reps = 300, 1
    with tempfile.TemporaryDirectory() as tmp:
        n_gt, n_det = generate(Path(tmp), args.images, args.gt_per_image, args.dets_per_image,
                               args.seed)
        timings, checks, result, _, _ = run_benchmarks(Path(tmp), args.reps, args.reference_reps)
    info = machine()
    print(f"data: {args.images} images, {n_gt} GT boxes, {n_det} detections, "
          f"{len(result['AP'])} classes, mAP {result['mAP']:.4f}; median of {args.reps}")
    print_table(info, timings)
    print(f"checks: the same tables from the parser and the vectorised tokenizer: {checks['same_tables']}; "
          f"identical APs (evaluate_detections, evaluate.py, before, reference): {checks['identical_ap']}")
    report = {"machine": info, "load_average": list(os.getloadavg()), "quick": args.quick,
              "data": {"images": args.images, "gt_boxes": n_gt, "detections": n_det, "seed": args.seed},
              "reps": args.reps, "timings_s": timings,
              "ratios": {"cli_over_read_files": timings["cli"] / timings["read_files"],
                         "cli_over_before_cli": timings["cli"] / timings["before_cli"],
                         "read_dirs_over_before": timings["read_dirs"] / timings["before_read_dirs"],
                         "reference_over_cli": timings["reference"] / timings["cli"]},
              "checks": checks, "identical_ap": checks["identical_ap"], "mAP": result["mAP"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return 0 if checks["same_tables"] and checks["identical_ap"] else 1


if __name__ == "__main__":
    sys.exit(main())
