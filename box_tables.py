"""The evaluator's tables of boxes in memory: what evaluate.py scores, validated and numbered.

A ground-truth or detection table is a dict of numpy columns, one row per box (``image``,
``cls``, ``boxes`` (N, 4) x1 y1 x2 y2 in pixels, and ``difficult`` or ``score``), or an
iterable of records; :func:`as_table` checks it, :func:`factorize` numbers its image ids
and class labels for the vectorised matching in evaluate.py. Split from evaluate.py (one
job each: this module turns input into arrays, evaluate.py computes the metric); numpy
and the standard library only, like the modules that read the files (box_files.py,
voc_results.py), which share :data:`MAX_COORDINATE` with it.
"""
import numpy as np

# The largest pixel coordinate (in absolute value) a box may have: 2**53, past which float64
# cannot tell one pixel from the next (the VOC "+1" widths lose their meaning) and well
# before box areas overflow to inf (at ~1e154), which made IoU inf/inf = NaN: a box at 1e200
# ended evaluate.py in a traceback and analyze.py called it Background. Padilla's toolkit
# has no limit (its Python floats overflow the same way: an AssertionError on iou >= 0).
MAX_COORDINATE = 2.0 ** 53


def from_records(records, is_gt):
    """Turn records (tuples) into a table: GT ``(image, cls, x1, y1, x2, y2[, difficult])``,
    detections ``(image, cls, score, x1, y1, x2, y2)``."""
    rows = [tuple(r) for r in records]
    sizes = (6, 7) if is_gt else (7,)
    if any(len(r) not in sizes for r in rows):
        raise ValueError("records must be (image, cls, x1, y1, x2, y2[, difficult]) for ground "
                         "truth and (image, cls, score, x1, y1, x2, y2) for detections")
    if is_gt:
        rows = [r if len(r) == 7 else r + (False,) for r in rows]
    columns = list(zip(*rows)) or [()] * 7
    table = {"image": np.array(columns[0]), "cls": np.array(columns[1]),
             "boxes": np.array(columns[2:6] if is_gt else columns[3:7], dtype=np.float64).T}
    if is_gt:
        table["difficult"] = np.array(columns[6], dtype=bool)
    else:
        table["score"] = np.array(columns[2], dtype=np.float64)
    return table


def as_table(data, is_gt):
    """Validate a GT or detection table (dict of arrays, or records) into arrays."""
    if not hasattr(data, "keys"):
        data = from_records(data, is_gt)
    n = len(data["cls"])
    table = {"image": np.asarray(data["image"]), "cls": np.asarray(data["cls"]),
             "boxes": np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4)}
    if is_gt:
        flags = data.get("difficult")
        table["difficult"] = np.zeros(n, bool) if flags is None else np.asarray(flags, bool)
    else:
        table["score"] = np.asarray(data["score"], dtype=np.float64)
    kind = "ground truth" if is_gt else "detections"
    if any(column.shape[:1] != (n,) for column in table.values()):
        raise ValueError(f"{kind}: every column must have one row per box ({n})")
    boxes = table["boxes"]
    with np.errstate(invalid="ignore"):  # NaN compares False: refused below
        bad = ~(np.abs(boxes) <= MAX_COORDINATE).all(1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if not is_gt:
        bad |= ~np.isfinite(table["score"])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{kind} row {i}: box {boxes[i].tolist()} needs finite values within "
                         f"+-{MAX_COORDINATE:.4g} pixels with x2 >= x1 and y2 >= y1 (and a finite score)")
    return table


def select(table, mask):
    return {key: column[mask] for key, column in table.items()}


def factorize(gt_values, det_values, in_runs=False):
    """Sorted unique labels over both tables and each row's index into them.

    ``in_runs``: the values mostly come in runs of equal values (image ids: one
    run per file or per image), which ``_unique_inverse`` can exploit.
    """
    parts = [v for v in (gt_values, det_values) if len(v)]
    if not parts:
        return np.array([]), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len({v.dtype.kind in "SU" for v in parts}) > 1:  # numpy would turn 1 into "1"
        raise ValueError("ground truth and detections must both use strings, or both "
                         "numbers, for image ids and for class labels")
    labels, codes = _unique_inverse(np.concatenate(parts), in_runs)
    n_gt = len(gt_values)
    return labels, codes[:n_gt], codes[len(codes) - len(det_values):]


def _unique_inverse(values, in_runs):
    """``np.unique(values, return_inverse=True)``, faster for the columns seen here.

    np.unique sorts all the values.  For an object array (class names from
    ``engine.detection_table``) each comparison is a Python call: a dict over the
    few distinct values is about 7x faster and gives the same sorted labels.  For
    values in runs only the first value of each run needs sorting.  Strings with
    few distinct values (class names read from files): ``_few_unique_inverse``.
    """
    if values.dtype == object:
        items = values.tolist()
        labels = sorted(set(items))
        index = {label: i for i, label in enumerate(labels)}
        codes = np.fromiter(map(index.__getitem__, items), dtype=np.int64, count=len(items))
        return np.array(labels, dtype=object), codes
    if not in_runs:
        return _few_unique_inverse(values) if values.dtype.kind == "U" else np.unique(
            values, return_inverse=True)
    starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
    labels, run_codes = np.unique(values[starts], return_inverse=True)
    return labels, np.repeat(run_codes, np.diff(np.append(starts, len(values))))


def _few_unique_inverse(values):
    """``np.unique(values, return_inverse=True)`` for values with few distinct ones.

    The distinct values of a sample are sorted, every value is looked up among
    them by binary search (a few string comparisons each instead of a full
    sort: ~3x faster for 20 class names), and only the values the sample missed
    are added.  Many distinct values: plain np.unique.
    """
    sample = np.unique(values[::max(1, len(values) // 512)])
    if 4 * len(sample) > min(len(values), 512):
        return np.unique(values, return_inverse=True)
    codes = np.searchsorted(sample, values)
    missed = sample[np.minimum(codes, len(sample) - 1)] != values
    if not missed.any():
        return sample, codes
    labels = np.union1d(sample, values[missed])
    return labels, np.searchsorted(labels, values)
