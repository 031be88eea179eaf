"""The files of evaluate.py: folders of per-image box files in, the report and JSON out.

Text files, Padilla's Object-Detection-Metrics format (``pascalvoc.py -gtformat xyrb
-detformat xyrb``, what detect_txt.py writes): one file per image, named after the image,
one box per line, absolute pixels::

    ground truth   class left top right bottom [difficult]    (difficult: 0, 1 or 'difficult')
    detections     class confidence left top right bottom

Ground truth can also be a VOCdevkit ``Annotations`` folder of XML files (voc_xml.py; boxes
converted from the devkit's 1-based inclusive pixels to the 0-based continuous pixels of
every file this project writes). A ``.txt`` or ``.xml`` extension matches in any case; a
UTF-8 byte-order mark is skipped; :func:`check_pair` refuses relative coordinates and
folders without a file name in common.
Files are read in sorted name order and lines in file order: evaluate.py breaks ties in
that order. Every line is parsed on its own (``bytes.split`` and ``float``); a mistake is a
one-line UserError ``path:line: what is wrong``. numpy and the standard library only.
"""
import json
import math
import os
import sys
import unicodedata

import numpy as np

import voc_results  # numpy only: the VOC server's comp4_det_test_<class>.txt files
from box_tables import MAX_COORDINATE
from errors import UserError, finite_number
from voc_xml import read_annotation, to_continuous

GT_LINE = "class left top right bottom"
DET_LINE = "class confidence left top right bottom"
DIFFICULT_WORDS = (b"0", b"1", b"difficult")
BOM = b"\xef\xbb\xbf"
RELATIVE_RANGE = (-0.5, 1.5)  # coordinates relative to the image (0-1), rounding and unclipped boxes included
GT_FIELDS, DET_FIELDS = GT_LINE.split()[1:], DET_LINE.split()[1:]


def read_gt_dir(directory):
    """Read ground truth: ``*.txt`` files (Padilla's format) or VOC ``*.xml`` annotations.

    XML is used when the folder holds ``.xml`` files. Returns a GT table for
    ``evaluate.evaluate_detections`` with ``"image"`` = file name without extension,
    rows in sorted file-name order then line (object) order.
    """
    xml_names, txt_names = _list_files(directory, ".xml", ".txt")
    if xml_names and txt_names:
        raise UserError(f"{directory}: holds both .txt and .xml files; keep one kind")
    if xml_names:
        return _read_xml_dir(directory, xml_names)
    return _read_txt_dir(directory, txt_names, is_gt=True)


def read_det_dir(directory):
    """Read detections: one ``*.txt`` file per image.

    Images without a file (or with an empty one) have no detections; a file for an image
    without GT is read too (its detections are all FPs, as in Padilla's toolkit). Returns a
    detection table for ``evaluate.evaluate_detections``, rows in sorted file-name order
    then line order (this order breaks score ties). A folder of the VOC server's per-class
    results files (``comp4_det_test_<class>.txt``, Darknet's ``yolo valid`` output) is read
    by voc_results.py, in the same order.
    """
    if voc_results.is_results_dir(directory):
        return voc_results.read_results_dir(directory)
    names = _list_files(directory, ".txt")
    if not names:  # a detector that found nothing writes empty files; no file at all is a wrong folder
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        raise UserError(f"{directory}: no detection files (<image>.txt or comp4_det_test_<class>.txt)"
                        + (f"; its folders: {', '.join(folders[:3])}{' ...' if len(folders) > 3 else ''}"
                           if folders else ""))
    return _read_txt_dir(directory, names, is_gt=False)


def read_pair(gt_dir, det_dirs):
    """Ground truth and the detections of each folder of ``det_dirs``, with every check of
    a pair (:func:`check_pair`): what evaluate.py and analyze.py read. Raises UserError."""
    gts = read_gt_dir(gt_dir)
    if len(gts["cls"]) == 0:
        raise UserError(f"{gt_dir}: no ground-truth boxes found (*.txt or *.xml)")
    dets = [read_det_dir(det_dir) for det_dir in det_dirs]
    for det, det_dir in zip(dets, det_dirs):
        check_pair(gts, det, gt_dir, det_dir)
    return gts, dets


def check_pair(gts, dets, gt_dir, det_dir):
    """Refuse a ground-truth / detection pair that would score 0 (or a wrong number) silently.

    * Relative coordinates: when every ground-truth coordinate lies in [-0.5, 1.5] the files
      hold YOLO-style relative boxes, not pixels (a real pixel box there is at most 3 pixels
      wide), and the "+1" pixel IoU counts a box with true IoU 0.14 as a hit. The same holds
      for detections against ground truth in pixels. The margin takes in rounding and boxes
      not clipped to the image (1.0000001, -0.02: with [0, 1] exactly they scored 0 silently).
    * No file name in common: nothing can match (``a.jpg.txt`` against ``a.txt`` says so).
    Detection files without a ground-truth file are allowed (Padilla's toolkit counts their
    boxes as false positives) but named in one warning.
    """
    gt_boxes, det_boxes = gts["boxes"], dets["boxes"]
    low, high = RELATIVE_RANGE
    if gt_boxes.size and gt_boxes.min() >= low and gt_boxes.max() <= high:
        raise UserError(f"{gt_dir}: every ground-truth coordinate is between 0 and 1 (give or take 0.5); evaluate.py "
                        "needs absolute pixels (left top right bottom), not coordinates relative to the image")
    if det_boxes.size and det_boxes.min() >= low and det_boxes.max() <= high:
        raise UserError(f"{det_dir}: every detection coordinate is between 0 and 1 (give or take 0.5) while the "
                        "ground truth is in pixels; evaluate.py needs absolute pixels, not relative coordinates")
    gt_files = {image_name(name) for kind in _list_files(gt_dir, ".xml", ".txt") for name in kind}
    det_files = (set(map(str, dets["image"])) if voc_results.is_results_dir(det_dir)
                 else {image_name(name) for name in _list_files(det_dir, ".txt")})
    alone = sorted(det_files - gt_files)
    if det_files and len(alone) == len(det_files):
        raise UserError(f"{gt_dir} and {det_dir} have no file name in common (ground truth "
                        f"{_example(gt_files)}, detections {_example(det_files)}){_hint(gt_files, det_files)}")
    if alone:
        print(f"warning: {len(alone)} of {len(det_files)} images with detections in {det_dir} have no "
              f"ground-truth file in {gt_dir} (the first: {alone[0]}); their boxes count as false positives",
              file=sys.stderr, flush=True)


def _example(names):
    return f"{sorted(names)[0]}.txt ..." if names else "none"


def _hint(gt_files, det_files):
    """Why two folders share no name, when it is the image's extension kept in the name."""
    for files, other, what in ((det_files, gt_files, "detection"), (gt_files, det_files, "ground-truth")):
        if {image_name(name) for name in files} & other:
            return f": the {what} files keep the image's extension (a.jpg.txt); name them a.txt"
    return ""


def refuse_name_clashes(outputs):
    """``(output file name, source)`` pairs -> UserError if two sources would write one file.

    Outputs are named after their image (``a.jpg`` -> ``a.txt``), so ``a.jpg`` and ``a.png``
    in one folder would write one ``a.txt`` and lose one image's boxes. Names are compared
    ignoring case, as macOS and Windows file systems do. Called before anything is written.
    """
    seen = {}
    for name, source in outputs:
        key = str(name).casefold()
        if key not in seen:
            seen[key] = source
        elif str(seen[key]) == str(source):
            raise UserError(f"{source} is listed twice (its output {name} would be written twice)")
        else:
            raise UserError(f"{seen[key]} and {source} would both write {name} (outputs are named "
                            "after the image): rename one; nothing was written")


def check_output_file(path, option, inputs=(), overwrite=False):
    """Refuse an output file before any work: a folder, a missing parent folder, an input
    file, or (without ``--overwrite``) any existing file. UserError, one line.

    ``inputs``: ``(option, path)`` of what the command reads, files or folders; an existing
    output that is one of them, or lies under one, compared by real path (links resolved),
    is refused even with ``--overwrite``: ``--json det/a.txt`` replaced a detection file
    with JSON, and ``test.py best.pt --json best.pt`` the checkpoint itself; so is a new
    file under an input folder (``--json det/new.txt`` was read as a box file next time). Other existing
    files were silently replaced too; as analyze.py's --out and voc_convert.py's --overwrite
    do, replacing one now takes ``--overwrite``."""
    path = str(path)
    parent = os.path.dirname(path) or "."
    if os.path.isdir(path) or not os.path.isdir(parent):
        raise UserError(f"{option} {path}: " + ("is a folder" if os.path.isdir(path) else f"{parent} is not a folder"))
    real, exists = os.path.realpath(path), os.path.lexists(path)
    for source_option, source in inputs:
        source_real = os.path.realpath(source)
        if real == source_real or real.startswith(os.path.join(source_real, "")):
            # a new file there too: --json det/new.txt became a box file the next evaluation failed on
            what = "is an input file" if exists else "lies in an input folder"
            raise UserError(f"{option} {path}: {what} ({'' if real == source_real else 'under '}"
                            f"{source_option} {source}); write the output elsewhere, nothing was written")
    if not exists:
        return
    if not overwrite:
        raise UserError(f"{option} {path}: already exists; choose another path, or --overwrite to replace it")


def format_report(result):
    """The per-class table (class, npos, ndet, TP, FP, AP) and the mAP line.

    The class column is as wide as the longest name (at least 16): a longer name pushed
    its row's numbers out of their columns."""
    width = max([16, *(len(str(label)) + 2 for label in result["ndet"])])
    rows = [f"{'class':<{width}}{'npos':>7}{'ndet':>8}{'TP':>7}{'FP':>8}{'AP':>9}"]
    for label, ndet in result["ndet"].items():
        ap = result["AP"].get(label)
        ap_text = f"{ap:9.4f}" if ap is not None else f"{'-':>9}  (no GT: not in mAP)"
        rows.append(f"{str(label):<{width}}{result['npos'][label]:>7}{ndet:>8}"
                    f"{result['tp'][label]:>7}{result['fp'][label]:>8}{ap_text}")
    method = "every-point" if result["interp"] == "all" else "11-point"
    n = len(result["AP"])
    rows.append(f"mAP = {result['mAP']:.4f}  ({n} class{'' if n == 1 else 'es'}, IoU >= "
                f"{result['iou_threshold']:g}, {method} interpolation, "
                f"difficult: {result['difficult']})")
    return "\n".join(rows)


def write_json(path, result):
    """Write ``{"mAP", "AP", "npos", "ndet", ...}`` atomically (temp file + os.replace)."""
    keys = ("mAP", "AP", "npos", "ndet", "tp", "fp", "iou_threshold", "interp", "difficult")
    data = {k: result[k] for k in keys}
    if data["mAP"] != data["mAP"]:
        data["mAP"] = None  # NaN is not valid JSON
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _list_files(directory, *extensions):
    """Sorted names of the ``*extension`` files in ``directory`` (like Padilla's glob + sort),
    one list per extension, from one scan of the folder. Extensions match in any case
    (``a.TXT`` is the box file of image ``a``); two files of one image (``a.txt`` and
    ``a.TXT``, or one name in NFC and NFD) and a folder named like a box file are refused."""
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: {'not a folder' if os.path.exists(directory) else 'no such directory'}")
    with os.scandir(directory) as entries:
        # a link to a missing file is listed (reading it says so): skipped, it silently took
        # an image's boxes out of the metric; so did a folder named like a box file
        found = [e for e in entries if e.name.lower().endswith(extensions) and not e.name.startswith(".")]
    odd = sorted((e.name, e.is_dir()) for e in found if not e.is_file() and not (e.is_symlink() and not e.is_dir()))
    if odd:  # a folder (or a pipe, which would block the read) named like a box file
        raise UserError(f"{os.path.join(directory, odd[0][0])}: is a {'folder' if odd[0][1] else 'special file'}, "
                        "not a box file (its image would have no boxes); move it out of the folder")
    names = sorted(e.name for e in found)
    seen = {}
    for name in names:  # a.txt and a.TXT, or cafe.txt in NFC and NFD (image_name): one image
        first = seen.setdefault(unicodedata.normalize("NFC", name).lower(), name)
        if first != name:
            raise UserError(f"{directory}: {first} and {name} are the files of one image; keep one"
                            + ("" if first.lower() == name.lower() else
                               " (their names differ only in Unicode normalisation, NFC and NFD)"))
    if len(extensions) == 1:
        return names
    return [[n for n in names if n.lower().endswith(extension)] for extension in extensions]


def image_name(file_name):
    """``a.txt``, ``a.TXT``, ``a.xml`` -> ``a``: the image a box file belongs to.

    In Unicode normal form C: macOS writes file names decomposed (NFD: ``e`` + combining
    accent), Linux and Windows keep what they are given (usually NFC), so the files of one
    image ``café`` copied from both differed and matched nothing (every detection a false
    positive, or 'no file name in common'). Names that differ only so are one image."""
    return unicodedata.normalize("NFC", os.path.splitext(file_name)[0])


def _read_txt_dir(directory, names, is_gt):
    """Parse every line of the files ``names`` into one table; ``image`` is the file stem."""
    rows, images = [], []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror})") from None
        data = data.removeprefix(BOM)  # a UTF-8 byte-order mark made the first class '\ufeffdog'
        image = image_name(name)
        # "\n", "\r\n" and a lone "\r" (classic Mac OS) end a line, as in Python's text mode
        # and so in Padilla's reader; bytes.split: ASCII whitespace only
        for lineno, line in enumerate(data.splitlines(), start=1):
            tokens = line.split()
            if tokens:
                rows.append(_parse_line(tokens, is_gt, path, lineno))
                images.append(image)
    columns = list(zip(*rows)) or [()] * 6
    table = {"image": np.array(images, dtype=str), "cls": np.array(columns[0], dtype=str),
             "boxes": np.array(columns[2:], dtype=np.float64).T}
    table["difficult" if is_gt else "score"] = np.array(columns[1], dtype=bool if is_gt else np.float64)
    return table


def _parse_line(tokens, is_gt, path, lineno):
    """One non-empty line -> (cls, difficult or score, x1, y1, x2, y2); UserError if bad.

    A well-formed line takes the first branch; anything unusual goes through
    :func:`_checked_line`, which says what is wrong (or, for a line the quick test merely
    doubted, parses it). The quick path made evaluate.py 2x faster on 5,000 files."""
    if ((len(tokens) == (5 if is_gt else 6) or (is_gt and len(tokens) == 6 and tokens[5] in DIFFICULT_WORDS))
            and b"_" not in b"".join(tokens[1:])):  # float() reads "1_0" as 10: the careful path refuses it
        try:
            label, values = tokens[0].decode("utf-8"), [float(t) for t in tokens[1:5 if is_gt else 6]]
        except (UnicodeDecodeError, ValueError):
            values = None
        # NaN and infinities make the sum non-finite (so may finite numbers near the float
        # limit: then the careful path accepts them)
        if (values and math.isfinite(sum(values)) and values[-2] >= values[-4] and values[-1] >= values[-3]
                and -MAX_COORDINATE <= min(values[-4:-2]) and max(values[-2:]) <= MAX_COORDINATE):
            if not is_gt:
                return (label, *values)
            return (label, len(tokens) == 6 and tokens[5] != b"0", *values)
    return _checked_line(tokens, is_gt, f"{path}:{lineno}")


def _checked_line(tokens, is_gt, where):
    """:func:`_parse_line` field by field, with a one-line UserError for what is wrong."""
    if is_gt and len(tokens) not in (5, 6):
        raise UserError(f"{where}: expected 5 values '{GT_LINE}' (and optionally a 6th, "
                        f"difficult: 0, 1 or 'difficult'), got {len(tokens)}")
    if not is_gt and len(tokens) != 6:
        raise UserError(f"{where}: expected 6 values '{DET_LINE}', got {len(tokens)}")
    try:
        label = tokens[0].decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: class name is not valid UTF-8") from None
    values = [finite_number(t, f, where) for t, f in zip(tokens[1:], GT_FIELDS if is_gt else DET_FIELDS)]
    x1, y1, x2, y2 = values[-4:]
    for value, name in zip(values[-4:], GT_FIELDS[-4:]):
        if abs(value) > MAX_COORDINATE:
            raise UserError(f"{where}: {name} {value:g} is not a pixel coordinate (beyond "
                            f"+-{MAX_COORDINATE:.4g}, where box areas and IoU stop being numbers)")
    if x2 < x1:
        raise UserError(f"{where}: right ({x2:g}) is smaller than left ({x1:g})")
    if y2 < y1:
        raise UserError(f"{where}: bottom ({y2:g}) is smaller than top ({y1:g})")
    if not is_gt:
        return label, values[0], x1, y1, x2, y2
    flag = tokens[5].lower() if len(tokens) == 6 else b"0"
    if flag not in DIFFICULT_WORDS:
        raise UserError(f"{where}: 6th value (difficult) must be 0, 1 or 'difficult', "
                        f"got {flag.decode(errors='replace')!r}")
    return label, flag != b"0", x1, y1, x2, y2


def _read_xml_dir(directory, names):
    """VOCdevkit ``Annotations/*.xml`` -> a GT table (name, bndbox, difficult of each object)."""
    images, classes, boxes, difficult = [], [], [np.zeros((0, 4))], [np.zeros(0, bool)]
    for name in names:
        ann = read_annotation(os.path.join(directory, name))
        images += [image_name(name)] * len(ann.names)
        classes += ann.names
        boxes.append(to_continuous(ann.boxes))
        difficult.append(ann.difficult)
    return {"image": np.array(images, dtype=str), "cls": np.array(classes, dtype=str),
            "boxes": np.concatenate(boxes), "difficult": np.concatenate(difficult)}
