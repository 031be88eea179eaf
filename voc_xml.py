"""VOC annotation XML (a VOCdevkit ``Annotations/<image>.xml``): the project's one reader.

Used by ``dataset.py`` (training and test data read from a VOCdevkit tree) and by
``evaluate.py`` (ground truth given as XML). It imports numpy and the standard library only,
so ``evaluate.py`` stays free of torch.

Pixel convention, in one place. :func:`read_annotation` returns each box as the file writes
it: VOCdevkit pixel indices, the first and the last pixel the object covers, 1-based and
inclusive (an object over the whole of a 500-pixel-wide image is ``xmin 1 ... xmax 500``).

Every reader converts them once, with :func:`to_continuous`, to the project's one pixel
convention: 0-based continuous extents (``xmin - 1, ymin - 1, xmax, ymax``), the pixels of
every file the project writes (detect_txt.py, detect.py, voc_results.py) and reads. So
``evaluate.py`` scores detect_txt.py's detections against an ``Annotations`` folder and
against detect_txt.py's own ``groundtruths`` alike (#14: the XML was kept 1-based there,
one pixel off). evaluate.py's IoU still counts ``x2 - x1 + 1`` pixels: that is the
metric's convention (Padilla's toolkit, the devkit), applied to whatever numbers it gets.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from errors import UserError, finite_number, one_line

BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class Annotation:
    """The objects of one image, in file order."""
    names: list[str]                     # class name of each object, as written
    boxes: np.ndarray                    # (K, 4) float64 xmin ymin xmax ymax: 1-based, inclusive pixels
    difficult: np.ndarray                # (K,) bool: <difficult>1</difficult>
    size: tuple[float, float] | None     # (width, height) from <size>, read when asked for


def object_place(path, k: int, name: str) -> str:
    """How an error names object ``k`` (1-based) of a file: ``path: object 3 (dog)``."""
    return f"{path}: object {k} ({name or 'no name'})"


def read_annotation(path, with_size: bool = False) -> Annotation:
    """The objects (``<name>``, ``<bndbox>``, ``<difficult>``) of a VOC XML file.

    ``with_size``: the file must give the image's ``<size>`` (positive width and height),
    and every box must lie inside it. A 0 from tools that count pixels from 0 is accepted.
    Any mistake is a one-line :class:`UserError` naming the file (and the object).
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise UserError(f"{path}: annotation file not found") from None
    except (ET.ParseError, OSError) as err:
        raise UserError(f"{path}: not a readable XML file ({one_line(err)})") from None
    _drop_namespaces(root)
    size = _read_size(root, path) if with_size else None
    names, boxes, difficult = [], [], []
    # every <object>, at any depth: one inside a wrapper (<objects>) was skipped without a word
    for k, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        where = object_place(path, k, name)
        if not name:
            raise UserError(f"{where}: missing <name>")
        names.append(name)
        boxes.append(_read_box(obj, where, size))
        difficult.append(_read_difficult(obj, where))
    return Annotation(names, np.array(boxes, dtype=np.float64).reshape(-1, 4),
                      np.array(difficult, dtype=bool), size)


def _drop_namespaces(root: ET.Element) -> None:
    """``{http://...}object`` -> ``object``, in place. A tool that writes the annotation
    with an XML namespace (``<annotation xmlns="...">``) names every tag that way, and no
    ``<object>`` was found: the image read as having no objects (evaluate.py's ground
    truth lost every object of the file, silently)."""
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith("{"):
            element.tag = element.tag.split("}", 1)[1]


def to_continuous(boxes: np.ndarray) -> np.ndarray:
    """Devkit pixel indices (1-based, inclusive) -> the box's extent in 0-based continuous
    coordinates: ``(xmin - 1, ymin - 1, xmax, ymax)``, so an object over a whole 500-wide
    image spans 0..500. A 0 (tools that count from 0) stays 0.

    Degenerate boxes, the one rule of every reader: pixel boxes are inclusive, so a box
    with ``xmin = xmax`` covers one pixel column and is 1 pixel wide, and it stays 1 pixel
    wide when its first pixel is the 0 of a tool counting from 0 (``xmin = xmax = 0`` became
    0..0, width 0: voc_convert.py wrote a label file its own reader refuses, and the
    VOCdevkit reader trained a w = 0 target). Relative label files have no pixels: a width
    of 0 is refused there (voc_txt.py). Darknet's ``voc_label.py`` (``convert()``) takes
    ``w = xmax - xmin`` and the centre 1 pixel left, so its boxes are 1 pixel narrower
    and ``xmin = xmax`` is written as w = 0 (which Darknet's training then drops, under 1 %)."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, :2] = np.maximum(out[:, :2] - 1, 0)
    # at least one pixel: xmin <= the image size, so xmin - 1 + 1 stays inside the image
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    return out


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = (node.findtext(tag) or "").strip()
    if not text:
        raise UserError(f"{where}: missing <{tag.split('/')[-1]}>")
    return finite_number(text, f"<{tag.split('/')[-1]}>", where)


def _read_size(root: ET.Element, path) -> tuple[float, float]:
    if root.find("size") is None:
        raise UserError(f"{path}: no <size> element (image width and height are needed)")
    width, height = (_number(root, f"size/{tag}", str(path)) for tag in ("width", "height"))
    if width <= 0 or height <= 0:
        raise UserError(f"{path}: <size> must give a positive width and height, got {width:g} x {height:g}")
    return width, height


def _read_box(obj: ET.Element, where: str, size: tuple[float, float] | None) -> list[float]:
    if obj.find("bndbox") is None:
        raise UserError(f"{where}: missing <bndbox>")
    x1, y1, x2, y2 = (_number(obj, f"bndbox/{tag}", where) for tag in BOX_TAGS)
    box = f"box xmin {x1:g} ymin {y1:g} xmax {x2:g} ymax {y2:g}"
    if size is not None and not (0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]):
        raise UserError(f"{where}: {box} is inverted or outside the {size[0]:g} x {size[1]:g} image")
    if x2 < x1 or y2 < y1:
        raise UserError(f"{where}: {box} is inverted (xmax < xmin or ymax < ymin)")
    return [x1, y1, x2, y2]


def _read_difficult(obj: ET.Element, where: str) -> bool:
    flag = (obj.findtext("difficult") or "0").strip() or "0"
    if flag not in ("0", "1"):
        raise UserError(f"{where}: <difficult> must be 0 or 1, got {flag!r}")
    return flag == "1"

