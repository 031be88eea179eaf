"""The YOLO txt layout (the tutorial's and the Kaggle VOC copy's, and what voc_convert.py and
Darknet's ``voc_label.py`` write): one label file per image of lines ``class_id x_center
y_center width height``, relative to the image, and csv files listing ``image,label`` pairs;
read (with a one-line error naming the file and line) and written.

voc_xml.py reads the VOCdevkit's XML annotations; dataset.py builds datasets from both.
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np

from errors import UserError, one_line

LABEL_FIELDS = ("class_id", "x_center", "y_center", "width", "height")


def _parse_label_line(fields: list[str], num_classes: int, where: str) -> list[float]:
    if len(fields) != 5:
        raise UserError(f"{where}: expected 5 values 'class_id x y w h', got {len(fields)}")
    values = []
    for name, field in zip(LABEL_FIELDS, fields):
        try:
            # Python's float() also reads "0_5" as 5 and "1_0" as 10 (PEP 515 digit
            # grouping): no label tool writes that, and a mistyped "0_5" became a box 5
            # image widths wide or class 10, silently. Darknet's atof stops at the "_".
            if "_" in field:
                raise ValueError
            values.append(float(field))
        except ValueError:
            raise UserError(f"{where}: {name} {field!r} is not a number") from None
    if not (values[0].is_integer() and 0 <= values[0] < num_classes):
        raise UserError(f"{where}: class id {fields[0]} out of range: expected an integer "
                        f"0..{num_classes - 1} ({num_classes} class names)")
    # the fields as written: 1.0000001 printed with :g read "width 1 outside [0, 1]"
    for name, field, value in zip(LABEL_FIELDS[1:], fields[1:], values[1:]):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{where}: {name} {field} outside [0, 1] "
                            "(coordinates are relative to the image size)")
    if values[3] <= 0 or values[4] <= 0:
        raise UserError(f"{where}: box size {fields[3]} x {fields[4]} must be positive")
    return values


def read_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A label file of lines ``class_id x_center y_center width height`` (relative) ->
    relative xyxy boxes ``(K, 4)`` and class ids ``(K,)``. An empty file means no objects.

    Box edges beyond the image are clipped, as Darknet's ``correct_boxes`` does.
    """
    try:  # -sig: a byte-order mark (Windows editors) is not part of the first class id
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read label file ({one_line(err)})") from None
    rows = [_parse_label_line(line.split(), num_classes, f"{path}:{n}")
            for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    values = np.array(rows, dtype=np.float64).reshape(-1, 5)
    centre, half = values[:, 1:3], values[:, 3:5] / 2
    boxes = np.concatenate((centre - half, centre + half), axis=1).clip(0.0, 1.0)
    return boxes.astype(np.float32), values[:, 0].astype(np.int64)


def is_header(fields: list[str], img_dir: Path, label_dir: Path) -> bool:
    """Whether a csv's first row is a header (``img,label``) rather than an image and its label.

    A header names no existing file and neither of its fields has a file extension. So
    a row naming an existing image or label file is always data (label files named
    ``000001`` without ``.txt`` lost their first row to the old "no dot" guess), and a
    row of missing files named like files is data too, and fails as "not found".
    """
    return (len(fields) == 2 and not any(os.path.splitext(field)[1] for field in fields)
            and not (img_dir / fields[0]).is_file() and not (label_dir / fields[1]).is_file())


def read_csv_pairs(csv_path: Path, img_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    """Rows ``image,label`` of a csv -> existing (image, label file) paths.

    The first row may be a header (:func:`is_header`).
    Every file is checked here so that a missing one fails before training starts.
    """
    for folder, what in ((img_dir, "images"), (label_dir, "labels")):
        if not folder.is_dir():
            raise UserError(f"{folder}: {what} folder not found (needed by {csv_path})")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1) if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{csv_path}: cannot read csv file ({one_line(err)})") from None
    listed = {folder: set(os.listdir(folder)) for folder in (img_dir, label_dir)}
    if rows and is_header(rows[0][1], img_dir, label_dir):
        rows = rows[1:]
    pairs = []
    for n, fields in rows:
        if any(ch in field for field in fields for ch in "\r\n"):
            raise UserError(f"{csv_path}:{n}: a field holds a line break (an unclosed quote?)")
        if len(fields) != 2:
            raise UserError(f"{csv_path}:{n}: expected 2 fields 'image,label', got {len(fields)}")
        if not all(fields):
            raise UserError(f"{csv_path}:{n}: expected 2 fields 'image,label', the "
                            f"{'image' if not fields[0] else 'label'} field is empty")
        for name, folder, what in zip(fields, (img_dir, label_dir), ("image", "label file")):
            if name not in listed[folder] and not (folder / name).is_file():
                raise UserError(f"{csv_path}:{n}: {what} {folder / name} not found")
        pairs.append((img_dir / fields[0], label_dir / fields[1]))
    if not pairs:
        raise UserError(f"{csv_path}: lists no images")
    warn_repeated_images(csv_path, [n for n, _ in rows], pairs)
    return pairs


def warn_repeated_images(csv_path: Path, line_numbers: list[int], pairs: list[tuple[Path, Path]]) -> None:
    """One warning line when an image is listed more than once (it was trained, or scored,
    as often as listed, without a word).

    A warning, not a refusal: repeating rows is how a Darknet-style list oversamples rare
    classes on purpose, and the run is still what the list says. But a list concatenated
    twice by mistake looks the same, so it is said, naming the first repeat's lines."""
    first, repeats = {}, []
    for n, (image, _) in zip(line_numbers, pairs):
        if image in first:
            repeats.append((n, first[image], image))
        first.setdefault(image, n)
    if repeats:
        n, was, image = repeats[0]
        print(f"warning: {csv_path}: {len(repeats)} row(s) repeat an image listed before (the first: line {n} "
              f"repeats line {was}, {image.name}); each is used as often as it is listed",
              file=sys.stderr, flush=True)


def write_label_file(path: Path, boxes: np.ndarray, labels: np.ndarray, width: float, height: float) -> None:
    """Absolute xyxy boxes of an image ``width`` x ``height`` -> a YOLO label file."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / [width, height, width, height]
    centres, sizes = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n"
             for c, (x, y), (w, h) in zip(labels, centres, sizes)]
    Path(path).write_text("".join(lines), encoding="utf-8")


def write_csv(path: Path, pairs, header: bool = True) -> None:
    """``(image, label)`` file-name pairs -> csv, with the ``img,label`` header of the
    Kaggle copy (which the tutorial reads with pandas)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        if header:
            writer.writerow(["img", "label"])
        writer.writerows(pairs)
