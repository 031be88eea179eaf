"""Pictures of a run: training curves, precision-recall curves, drawn detections, TensorBoard.

    plot_run("runs/train/exp")            # loss.png, lr.png, metrics.png from metrics.jsonl
    plot_pr_curves(result, "plots/")      # pr_curves.png, ap_per_class.png
    TensorBoardLogger("runs/train/exp")   # scalars and images under runs/train/exp/tensorboard

This module imports only the standard library at the top. matplotlib, torch and
tensorboard are imported inside the functions that need them, so ``evaluate.py``
(numpy only) can offer ``--plots`` without paying for them at every start. Figures are
made with ``matplotlib.figure.Figure`` rather than pyplot: no display and no backend
choice are needed (the PNG writer is Agg), and no global figure list grows epoch after
epoch in a long training run.
"""
from __future__ import annotations

import colorsys
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path

from errors import UserError

# Keys of a metrics.jsonl row that are bookkeeping, not curves.
NOT_PLOTTED = ("epoch", "images", "time_s")
# The loss components train.py logs (loss.py): named so that they land on the loss plot.
LOSS_KEYS = ("loss", "coord", "obj", "noobj", "cls")


def require(module: str, package: str, purpose: str) -> None:
    """A one-line UserError naming the pip package when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{purpose} needs the '{package}' package: pip install {package}")


# --------------------------------------------------------------------------- training curves
def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a line that is not a JSON object is skipped.

    The file grows while training runs, and a run killed in the middle of a write can
    leave half a line at the end: the plots should still show the epochs before it.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def metric_group(key: str) -> str:
    """Which plot (and TensorBoard section) a row key belongs to: loss, lr or metrics."""
    if key.startswith("lr"):
        return "lr"
    if key in LOSS_KEYS or "loss" in key:
        return "loss"
    return "metrics"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_series(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{group: {key: (epochs, values)}}`` of the finite numbers in ``rows``.

    Keys may be missing from some rows (mAP is measured every few epochs; Darknet and
    YOLO runs log different keys): each curve has the epochs where its key has a value.
    """
    groups: dict[str, dict[str, tuple[list, list]]] = {}
    for index, row in enumerate(rows):
        epoch = row.get("epoch", index + 1)
        for key, value in row.items():
            if key in NOT_PLOTTED or not is_number(value) or not is_number(epoch):
                continue
            xs, ys = groups.setdefault(metric_group(key), {}).setdefault(key, ([], []))
            xs.append(epoch)
            ys.append(value)
    return groups


RUN_PLOTS = {  # group -> (file name, title, y label)
    "loss": ("loss.png", "training loss (per image)", "loss"),
    "lr": ("lr.png", "learning rate (at the start of each epoch)", "learning rate"),
    "metrics": ("metrics.png", "validation metrics", "value"),
}


def plot_run(run_dir) -> list[Path]:
    """Write ``loss.png``, ``lr.png`` and ``metrics.png`` of ``run_dir/metrics.jsonl``.

    Each plot is written only when the log has values for it; the files are replaced
    atomically, so a viewer refreshing them during training never reads half a PNG.
    Returns the paths written (none while the log is empty or missing).
    """
    run_dir = Path(run_dir)
    groups = run_series(read_metrics(run_dir / "metrics.jsonl"))
    if groups:
        require("matplotlib", "matplotlib", "plotting")
    written = []
    for group, curves in groups.items():
        name, title, ylabel = RUN_PLOTS[group]
        fig = line_figure(curves, title, ylabel, log=group == "loss")
        written.append(save_figure(fig, run_dir / name))
    return written


def line_figure(curves: dict[str, tuple[list, list]], title: str, ylabel: str, log: bool = False):
    """One axes with a line per curve; markers show the epochs that have a value."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for key, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=key)
    # Loss components differ by orders of magnitude and fall steeply: a log axis shows all.
    if log and all(y > 0 for _, ys in curves.values() for y in ys):
        ax.set_yscale("log")
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def save_figure(fig, path) -> Path:
    """Write ``fig`` as PNG to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- precision-recall
PR_FILES = ("pr_curves.png", "ap_per_class.png")  # what plot_pr_curves writes (evaluate.py checks them first)


def precision_envelope(precision):
    """The interpolated precision that every-point AP integrates: max precision at recall >= r."""
    import numpy as np

    return np.maximum.accumulate(np.asarray(precision, dtype=float)[::-1])[::-1]


def plot_pr_curves(result: dict, out_dir) -> list[Path]:
    """Write ``pr_curves.png`` (one panel per class) and ``ap_per_class.png`` into ``out_dir``.

    ``result`` is what ``evaluate.evaluate_detections(..., return_curves=True)`` returns.
    Only classes with ground truth have an AP and a panel, as in the mAP. Returns the
    paths written (none when no class has ground truth).
    """
    if "curves" not in result:
        raise ValueError("plot_pr_curves needs evaluate_detections(..., return_curves=True)")
    if not result["AP"]:
        return []
    require("matplotlib", "matplotlib", "plotting")
    out_dir = Path(out_dir)
    return [save_figure(figure(result), out_dir / name) for figure, name in zip((pr_figure, ap_figure), PR_FILES)]


def pr_figure(result: dict):
    """A grid of precision-recall panels: raw precision (thin) and the interpolated
    precision that the AP was computed from (thick, :func:`draw_interpolated`)."""
    from matplotlib.figure import Figure

    labels = list(result["AP"])
    cols = min(5, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, label in zip(axes, labels):
        curve = result["curves"][label]
        if len(curve["recall"]):
            ax.plot(curve["recall"], curve["precision"], linewidth=0.8, alpha=0.6, label="precision")
            draw_interpolated(ax, curve, result["interp"])
        else:
            ax.text(0.5, 0.5, "no detections", ha="center", va="center")
        ax.set(title=f"{label}  {'11-pt ' if result['interp'] == '11' else ''}AP {result['AP'][label]:.3f}",
               xlim=(0, 1), ylim=(0, 1.02),
               xlabel="recall", ylabel="precision")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(labels):]:
        ax.set_axis_off()
    if axes[0].lines:
        axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"precision-recall at IoU {result['iou_threshold']:g}, mAP {result['mAP']:.4f}")
    return fig


def draw_interpolated(ax, curve: dict, interp: str) -> None:
    """The curve the AP was scored on, so that the picture and the title's AP agree.

    Every-point AP ("all") is the area under the envelope's step: envelope[i] over
    (recall[i-1], recall[i]]. 11-point AP (VOC2007) is the mean of the envelope at the 11
    recall points 0, 0.1, ..., 1 (the curve's ``eleven_point``: the recall points and the
    precisions evaluate.eleven_point_precision gave the AP): drawn as those points, each
    held until the next one (the every-point step under an 11-point title misdrew it).
    """
    if interp == "11":
        recall_points, points = curve["eleven_point"]
        ax.step(recall_points, points, where="post", linewidth=2, marker="o", markersize=3,
                label="11-point interpolated")
        return
    envelope = precision_envelope(curve["precision"])
    ax.step([0, *curve["recall"]], [envelope[0], *envelope], where="pre", linewidth=2,
            label="interpolated")


def ap_figure(result: dict):
    """Horizontal bars of AP per class, with the mAP as a dashed line."""
    from matplotlib.figure import Figure

    labels = [str(label) for label in result["AP"]]
    values = list(result["AP"].values())
    fig = Figure(figsize=(7, 1.5 + 0.3 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(labels, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
    ax.axvline(result["mAP"], color="black", linestyle="--", label=f"mAP {result['mAP']:.4f}")
    ax.invert_yaxis()  # first class at the top, as in evaluate.py's table
    method = "every-point" if result["interp"] == "all" else "11-point"
    ax.set(xlim=(0, 1.1), xlabel=f"AP (IoU {result['iou_threshold']:g}, {method} interpolation)",
           title="average precision per class")
    ax.legend(loc="lower right")
    return fig


# --------------------------------------------------------------------------- drawing boxes
def class_colour(index: int) -> tuple[int, int, int]:
    """A fixed, distinct RGB colour for class ``index``, for any number of classes.

    Hues step by the golden ratio of a turn, so neighbouring class ids get far-apart hues
    and the colour of a class never depends on how many classes there are.
    """
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def label_font() -> str | None:
    """matplotlib's DejaVu Sans: a scalable font at a known path (Pillow's default is 10 px)."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def draw_detections(image, dets, names, line_width: int | None = None, font_size: int | None = None):
    """``image`` (3, H, W) uint8 with ``dets`` drawn: rows ``class, score, x1, y1, x2, y2`` in pixels.

    Each box has its class colour (torchvision's ``draw_bounding_boxes``) and a ``name score``
    label on a filled background inside its top-left corner, moved left or up where it would
    leave the picture (:func:`draw_labels`). Line width and font size follow the image size
    unless given.
    """
    from torchvision.utils import draw_bounding_boxes

    if len(dets) == 0:
        return image
    height, width = image.shape[-2:]
    line_width = line_width or max(1, round(0.003 * (height + width)))
    classes = dets[:, 0].long().tolist()
    colours = [class_colour(c) for c in classes]
    labels = [f"{names[c] if c < len(names) else c} {s:.2f}" for c, s in zip(classes, dets[:, 1].tolist())]
    drawn = draw_bounding_boxes(image, dets[:, 2:6], width=line_width, colors=colours)
    return draw_labels(drawn, dets[:, 2:4].tolist(), labels, colours, line_width,
                       font_size or max(10, round(0.012 * (height + width))))


def draw_labels(image, corners, labels, colours, margin: int, font_size: int):
    """Each label at its box's top-left corner ``(x1, y1)`` plus ``margin`` (where torchvision
    puts it), shifted left and up as far as needed to stay inside the picture: torchvision
    clips a label that runs past the right or bottom edge, so a box at the right edge
    showed a letter or two of its class name."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    font = label_font()
    font = ImageFont.truetype(font, font_size) if font else ImageFont.load_default()
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    for (x1, y1), label, colour in zip(corners, labels, colours):
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        w, h = right - left + 2, bottom - top + 2  # one pixel of background around the text
        x = max(0, min(round(x1) + margin, picture.width - w))
        y = max(0, min(round(y1) + margin, picture.height - h))
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
        draw.text((x + 1 - left, y + 1 - top), label, fill=text_colour(colour), font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------- TensorBoard
class TensorBoardLogger:
    """Scalars and drawn detections of a run, in ``run_dir/tensorboard``.

    ``purge_step``: on resume, the first epoch being re-run, so that TensorBoard drops the
    events that the checkpoint does not include (as MetricsLog drops their lines).
    """

    def __init__(self, run_dir, purge_step: int | None = None):
        require("tensorboard", "tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log_scalars(self, row: dict, epoch: int) -> None:
        """One metrics.jsonl row: ``loss/coord``, ``lr/lr``, ``metrics/mAP``, ... at ``epoch``."""
        for key, value in row.items():
            if key not in NOT_PLOTTED and is_number(value):
                self.writer.add_scalar(f"{metric_group(key)}/{key}", value, epoch)
        self.writer.flush()

    def log_images(self, images, detections, names, epoch: int, tag: str = "detections") -> None:
        """``images`` (N, 3, H, W), float in [0, 1] or uint8, with their detections drawn.

        ``detections`` is what ``utils.decode_predictions`` returns for them: per image an
        ``(M, 6)`` tensor ``class, score, x1, y1, x2, y2`` with image-relative boxes.
        """
        import torch

        if images.is_floating_point():
            images = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
        images = images.cpu()
        drawn = []
        for image, dets in zip(images, detections):
            dets = dets.detach().float().cpu().clone()
            dets[:, 2:6] *= torch.tensor([image.shape[2], image.shape[1]] * 2, dtype=dets.dtype)
            drawn.append(draw_detections(image, dets, names))
        self.writer.add_images(tag, torch.stack(drawn), epoch, dataformats="NCHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
