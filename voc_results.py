"""The PASCAL VOC evaluation server's detection results: one ``comp4_det_test_<class>.txt`` per class.

    write_results("results/", detections, class_names)     # what detect_txt.py --format voc does
    read_results_dir("results/")                            # what evaluate.py and analyze.py read

The format is the VOC devkit's (devkit_doc.pdf, "Detection task results format", and
``VOCopts.detrespath = '%s_det_<testset>_%s.txt'`` in VOCinit.m): a file per class, named
``<competition>_det_<image set>_<class>.txt``, one line per detection::

    <image id> <confidence> <left> <top> <right> <bottom>
    000004 0.702732 89.00 112.00 516.00 466.00

Competition 4 ("trained on any data", the ImageNet-pretrained YOLO's category) on the
test set is what Darknet's ``yolo valid`` writes (``validate_yolo`` in examples/yolo.c:
``results/comp4_det_test_<class>.txt``) and what the server takes, in
``results/VOC2012/Main/`` of the archive uploaded. py-faster-rcnn adds a salt
(``comp4_<salt>_det_test_<class>.txt``); both names are read.

Pixels: the devkit numbers the pixels of an image from 1, and a box gives its first and
last pixel (inclusive), as the annotations' ``bndbox`` does. This project's boxes are
continuous extents from 0 (a box over a whole 500-pixel-wide image spans 0..500, see
``dataset.read_voc_xml``), so the writer adds 1 to left and top only, the exact inverse
of how ``read_voc_xml`` reads an annotation; the reader undoes it, so a box goes through
a results file unchanged and a box taken from an annotation is written back with the
annotation's numbers. Others differ: Darknet's detector.c (``print_detector_detections``,
YOLOv2 and later) adds 1 to all four, as py-faster-rcnn does, because their boxes are
0-based pixel indices; Darknet's YOLOv1 (``print_yolo_detections`` in yolo.c) adds
nothing, so its left and top read here come out one pixel further left and up (and a
0 stays 0, as ``read_voc_xml`` keeps a 0).

This module imports only numpy and the standard library (evaluate.py reads through it).
Errors are :class:`UserError`, one line naming the file and line.
"""
from __future__ import annotations

import os
import re
import unicodedata
from decimal import Decimal

import numpy as np

from box_tables import MAX_COORDINATE
from errors import UserError, finite_number

# VOCopts.detrespath: '<competition>_det_<image set>_<class>.txt'; the competition id may carry
# py-faster-rcnn's salt (comp4_<uuid>); image sets (test, val, trainval) have no underscore.
# The extension matches in any case, as box_files.py's per-image files do (comp4_det_test_dog.TXT).
RESULTS_NAME = re.compile(r"(?P<comp>comp\d+(?:_[^_]+)?)_det_(?P<set>[^_]+)_(?P<cls>.+)\.(?i:txt)")
RESULTS_LINE = "image_id confidence left top right bottom"




def results_file_name(class_name: str, comp: str = "comp4", image_set: str = "test") -> str:
    """``comp4_det_test_<class>.txt``: the devkit's name of one class's results file."""
    return f"{comp}_det_{image_set}_{class_name}.txt"


def unwritable(class_names, image_ids) -> str | None:
    """Why these classes or image ids cannot be written in results files, or None: a class
    name must be usable in a file name (no path separator, whitespace or leading dot), an
    image id must be one word (the line's fields are split on whitespace)."""
    for name in map(str, class_names):
        if not name or name.startswith(".") or "/" in name or "\\" in name or name.split() != [name]:
            return f"class name {name!r} cannot be part of a VOC results file name"
    for image_id in map(str, image_ids):
        if image_id.split() != [image_id]:
            return f"image id {image_id!r} cannot be written in a VOC results file: it must be one word"
    return None


# --------------------------------------------------------------------------- writing
def devkit_number(value: float, offset: int = 0) -> str:
    """``value`` to two decimals plus ``offset``, added in decimal: 12.35 -> '13.35' exactly,
    so the reader's subtraction gives back what a Padilla-format file (detect_txt.py, two
    decimals) holds for the same box."""
    return f"{Decimal(f'{value:.2f}') + offset}" if offset else f"{value:.2f}"


def result_lines(image_id: str, dets, class_index: int) -> str:
    """The lines of one image's detections of one class: ``dets`` rows ``class, score,
    x1, y1, x2, y2`` in this project's pixels (an (M, 6) array, as engine.predict_dataset gives)."""
    lines = []
    for c, score, x1, y1, x2, y2 in np.asarray(dets, dtype=np.float64).reshape(-1, 6).tolist():
        if int(c) == class_index:
            lines.append(f"{image_id} {score:.6f} {devkit_number(x1, 1)} {devkit_number(y1, 1)} "
                         f"{devkit_number(x2)} {devkit_number(y2)}\n")
    return "".join(lines)


def write_results(directory, detections, class_names, comp: str = "comp4", image_set: str = "test"):
    """Write one results file per class (every class, empty when it has no detection, as
    Darknet does) into ``directory``; ``detections`` is a list of ``(image_id, dets)``.

    Lines follow the order of ``detections``, then of each image's rows. Returns the paths.
    Raises UserError for a class name or image id that the format cannot hold.
    """
    problem = unwritable(class_names, [image_id for image_id, _ in detections])
    if problem:
        raise UserError(problem)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, name in enumerate(class_names):
        path = os.path.join(directory, results_file_name(name, comp, image_set))
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(result_lines(image_id, dets, k) for image_id, dets in detections)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- reading
def results_files(directory) -> tuple[list[tuple[str, re.Match]], list[str]]:
    """The results files of ``directory`` (``(file name, name match)``, sorted by name)
    and its other ``.txt`` files."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.lower().endswith(".txt") and not n.startswith("."))
    except OSError as err:
        raise UserError(f"{directory}: cannot list the folder ({err.strerror})") from None
    matches = [(n, RESULTS_NAME.fullmatch(n)) for n in names]
    return [(n, m) for n, m in matches if m], [n for n, m in matches if not m]


def is_results_dir(directory) -> bool:
    """Whether ``directory`` holds VOC results files (``comp*_det_*_<class>.txt``)."""
    try:
        return any(RESULTS_NAME.fullmatch(n) for n in os.listdir(directory))
    except OSError:
        return False


def _check_folder(directory, found, others) -> None:
    """One competition (hence one file per class) and image set, no per-image files beside them."""
    if others:
        raise UserError(f"{directory}: holds VOC results files ({found[0][0]}) and other .txt files "
                           f"({others[0]}); keep one kind in a folder")
    kinds = sorted({(m["comp"], m["set"]) for _, m in found})
    if len(kinds) > 1:
        raise UserError(f"{directory}: results of several runs or image sets "
                           f"({', '.join(f'{c}_det_{s}' for c, s in kinds)}); keep one in a folder")
    seen = {}
    for name, match in found:  # a.txt and a.TXT: one class read twice would double its detections
        first = seen.setdefault(match["cls"], name)
        if first != name:
            raise UserError(f"{directory}: {first} and {name} are the results files of one class; keep one")


def _parse_line(fields: list[str], where: str) -> tuple[float, ...]:
    if len(fields) != 6:
        raise UserError(f"{where}: expected 6 values '{RESULTS_LINE}', got {len(fields)}")
    values = [finite_number(field, name, where) for field, name in zip(fields[1:], RESULTS_LINE.split()[1:])]
    score, left, top, right, bottom = values
    for value, name in zip(values[1:], RESULTS_LINE.split()[2:]):
        if abs(value) > MAX_COORDINATE:
            raise UserError(f"{where}: {name} {value:g} is not a pixel coordinate (beyond "
                            f"+-{MAX_COORDINATE:.4g}, where box areas and IoU stop being numbers)")
    # Back to continuous extents: the devkit's first pixel 1 is the extent's start 0.
    x1, y1 = (max(minus_one(text, value), 0.0) for text, value in ((fields[2], left), (fields[3], top)))
    if right < x1 or bottom < y1:
        raise UserError(f"{where}: box left {left:g} top {top:g} right {right:g} bottom {bottom:g} "
                           "is inverted (right < left - 1 or bottom < top - 1)")
    return score, x1, y1, right, bottom


def minus_one(text: str, value: float) -> float:
    """``text`` - 1 in decimal, then rounded once: '4.35' -> 3.35 exactly, which float
    arithmetic misses (4.35 - 1 = 3.3499999999999996); so a box read back equals the same
    box read from a per-image file, and '1.01' as top with '0.01' as bottom stays a flat
    box, not an inverted one (1.01 - 1 = 0.010000000000000009)."""
    try:
        return float(Decimal(text) - 1)
    except ArithmeticError:  # decimal.InvalidOperation: a form float() reads and Decimal not
        return value - 1


def read_results_file(path: str) -> tuple[list[str], list[tuple[float, ...]]]:
    """Image ids and ``(score, x1, y1, x2, y2)`` rows (this project's pixels) of one file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    ids, rows = [], []
    # "\n", "\r\n" or a lone "\r" end a line (bytes.splitlines; str.splitlines would also
    # split at form feeds and Unicode separators); a byte-order mark is not part of an id
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        try:
            fields = raw.decode("utf-8").split()
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number}: not UTF-8 text") from None
        if fields:
            rows.append(_parse_line(fields, f"{path}:{number}"))
            ids.append(unicodedata.normalize("NFC", fields[0]))  # as box_files.image_name
    return ids, rows


def read_results_dir(directory) -> dict:
    """The detections of a folder of results files, as ``evaluate.read_det_dir`` returns
    them: ``image``, ``cls`` (the class of the file name), ``score``, ``boxes`` (N, 4)
    x1 y1 x2 y2 in this project's pixels.

    Rows are in the order ``read_det_dir`` gives the same detections written one file per
    image: by ``<image id>.txt``, then as they come (files by name, lines in order), so
    score ties break the same way in evaluate.py either way. Raises UserError.
    """
    found, others = results_files(directory)
    _check_folder(directory, found, others)
    images, labels, rows = [], [], []
    for name, match in found:
        ids, part = read_results_file(os.path.join(directory, name))
        images += ids
        labels += [match["cls"]] * len(ids)
        rows += part
    order = np.argsort(np.array([f"{i}.txt" for i in images], dtype=str), kind="stable")
    table = np.array(rows, dtype=np.float64).reshape(-1, 5)[order]
    return {"image": np.array(images, dtype=str)[order], "cls": np.array(labels, dtype=str)[order],
            "score": table[:, 0], "boxes": table[:, 1:5]}
