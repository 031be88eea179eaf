"""plots.py: training curves from metrics.jsonl, precision-recall plots, drawing, TensorBoard."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import plots
from evaluate import evaluate_detections
from utils import UserError

pytest.importorskip("matplotlib")


def write_rows(run_dir: Path, rows, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def yolo_rows(epochs=6):
    """train.py rows: loss components every epoch, mAP only every 3rd epoch."""
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "lr": 1e-3 * e, "loss": 40 / e, "coord": 10 / e, "obj": 3 / e,
               "noobj": 1 / e, "cls": 5 / e, "images": 100, "time_s": 2.5}
        if e % 3 == 0:
            row["mAP"] = 0.1 * e
        rows.append(row)
    return rows


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_plot_run_writes_the_three_plots_from_a_yolo_log(tmp_path):
    # The last line was cut by a kill in the middle of a write: the epochs before it still plot.
    write_rows(tmp_path, yolo_rows(), tail='{"epoch": 7, "lo')
    written = plots.plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "metrics.png"]
    for path in written:
        assert_png(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "lr.png", "metrics.jsonl",
                                                          "metrics.png"]   # no temporary file left


def test_run_series_keeps_each_key_at_the_epochs_that_have_it():
    rows = yolo_rows() + [{"epoch": 7, "loss": float("nan"), "lr": 0.5}]
    series = plots.run_series(rows)
    assert sorted(series) == ["loss", "lr", "metrics"]
    assert sorted(series["loss"]) == ["cls", "coord", "loss", "noobj", "obj"]
    assert series["metrics"]["mAP"] == ([3, 6], [pytest.approx(0.3), pytest.approx(0.6)])
    assert series["loss"]["loss"][0] == [1, 2, 3, 4, 5, 6]   # epoch 7's NaN is left out
    assert series["lr"]["lr"][0] == [1, 2, 3, 4, 5, 6, 7]


def test_darknet_rows_put_top1_top5_on_the_metrics_plot(tmp_path):
    rows = [{"epoch": e, "lr": 0.1, "loss": 6.9 - e, "train_top1": 10.0 * e, "val_loss": 7.0 - e,
             "top1": 9.0 * e, "top5": 20.0 * e, "images": 1000, "time_s": 60.0} for e in (1, 2, 3)]
    series = plots.run_series(rows)
    assert sorted(series["loss"]) == ["loss", "val_loss"]
    assert sorted(series["metrics"]) == ["top1", "top5", "train_top1"]
    write_rows(tmp_path, rows)
    assert sorted(p.name for p in plots.plot_run(tmp_path)) == ["loss.png", "lr.png", "metrics.png"]


def test_plot_run_before_any_epoch_writes_nothing(tmp_path):
    assert plots.plot_run(tmp_path) == []          # no metrics.jsonl yet
    write_rows(tmp_path, [])
    assert plots.plot_run(tmp_path) == []
    write_rows(tmp_path, [{"epoch": 1, "lr": 0.01, "loss": 3.0}])  # no mAP yet: no metrics.png
    assert sorted(p.name for p in plots.plot_run(tmp_path)) == ["loss.png", "lr.png"]


def test_plots_are_replaced_atomically(tmp_path, monkeypatch):
    """A failed write leaves the previous PNG whole and no temporary file behind."""
    write_rows(tmp_path, yolo_rows())
    plots.plot_run(tmp_path)
    before = (tmp_path / "loss.png").read_bytes()
    write_rows(tmp_path, yolo_rows(9))

    def broken_savefig(self, f, **kwargs):
        f.write(b"\x89PNG half a file")
        raise OSError("disk full")
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken_savefig)
    with pytest.raises(OSError):
        plots.plot_run(tmp_path)
    assert (tmp_path / "loss.png").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def voc_result():
    """Two classes with ground truth (one never detected) and one with detections only."""
    gts = [(i, "dog", 10, 10, 50, 50) for i in range(4)] + [(0, "cat", 0, 0, 20, 20)]
    dets = [(0, "dog", 0.9, 10, 10, 50, 50), (1, "dog", 0.8, 200, 200, 250, 250),
            (2, "dog", 0.7, 11, 11, 50, 50), (3, "dog", 0.3, 10, 12, 50, 50),
            (0, "bird", 0.5, 0, 0, 10, 10)]
    return evaluate_detections(gts, dets, return_curves=True)


def test_plot_pr_curves_writes_curves_and_ap_bars(tmp_path):
    written = plots.plot_pr_curves(voc_result(), tmp_path / "plots")
    assert [p.name for p in written] == ["pr_curves.png", "ap_per_class.png"]
    for path in written:
        assert_png(path)


def test_the_plotted_envelope_encloses_exactly_the_ap():
    """The thick step of each panel is the every-point interpolation: its area is the AP."""
    result = voc_result()
    curve = result["curves"]["dog"]
    envelope = plots.precision_envelope(curve["precision"])
    recall = np.concatenate(([0.0], curve["recall"]))
    assert float(np.sum(np.diff(recall) * envelope)) == pytest.approx(result["AP"]["dog"])
    # Ranked: TP, FP, TP, TP of 4 dogs: recall 0.25 at precision 1, then up to 0.75 at 0.75.
    assert result["AP"]["dog"] == pytest.approx(0.25 * 1 + 0.5 * 0.75)


def test_plot_pr_curves_needs_curves_and_skips_no_ground_truth(tmp_path):
    with pytest.raises(ValueError, match="return_curves=True"):
        plots.plot_pr_curves(evaluate_detections([(0, "dog", 0, 0, 9, 9)], []), tmp_path)
    empty = evaluate_detections([], [(0, "dog", 0.5, 0, 0, 9, 9)], return_curves=True)
    assert plots.plot_pr_curves(empty, tmp_path) == []


def test_class_colours_are_fixed_and_distinct():
    colours = [plots.class_colour(i) for i in range(20)]
    assert colours == [plots.class_colour(i) for i in range(20)]
    assert len(set(colours)) == 20
    assert all(0 <= c <= 255 for colour in colours for c in colour)
    # Label text: dark on light colours, light on dark ones.
    assert plots.text_colour((240, 240, 60)) == (0, 0, 0)
    assert plots.text_colour((36, 92, 242)) == (255, 255, 255)


def test_draw_detections_uses_the_class_colour():
    image = torch.zeros(3, 100, 120, dtype=torch.uint8)
    dets = torch.tensor([[2.0, 0.75, 10.0, 20.0, 60.0, 90.0]])
    drawn = plots.draw_detections(image, dets, ["a", "b", "c"], line_width=2)
    assert drawn.shape == image.shape
    assert tuple(drawn[:, 80, 10].tolist()) == plots.class_colour(2)   # left edge, below the label
    assert tuple(drawn[:, 50, 40].tolist()) == (0, 0, 0)                # inside: untouched
    assert plots.draw_detections(image, dets[:0], ["a"]) is image       # nothing to draw


def test_importing_plots_loads_neither_torch_nor_matplotlib():
    """evaluate.py imports plots only for --plots and starts with numpy alone; plots itself
    must not pull in the heavy packages until a function needs them."""
    code = "import sys, plots; print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(plots.__file__).parent,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tensorboard_logger_writes_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with plots.TensorBoardLogger(tmp_path) as logger:
        for row in yolo_rows(3):
            logger.log_scalars(row, row["epoch"])
        images = torch.rand(2, 3, 64, 64)
        dets = [torch.tensor([[1.0, 0.9, 0.1, 0.1, 0.6, 0.7]]), torch.zeros(0, 6)]
        logger.log_images(images, dets, ["cat", "dog"], epoch=3)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = events.Tags()
    assert {"loss/coord", "lr/lr", "metrics/mAP", "loss/loss"} <= set(tags["scalars"])
    assert "loss/images" not in tags["scalars"] and "metrics/images" not in tags["scalars"]
    coord = [(e.step, e.value) for e in events.Scalars("loss/coord")]
    assert coord == [(1, 10.0), (2, 5.0), (3, pytest.approx(10 / 3))]
    assert [(e.step, e.value) for e in events.Scalars("metrics/mAP")] == [(3, pytest.approx(0.3))]
    (logged,) = events.Images("detections")
    assert (logged.step, logged.width, logged.height) == (3, 128, 64)   # the two images side by side
    grid = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB"))
    assert tuple(grid[30, 6]) == plots.class_colour(1)   # the dog box's left edge at x = 0.1 * 64


def test_missing_tensorboard_is_a_one_line_user_error(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="pip install tensorboard"):
        plots.TensorBoardLogger(tmp_path)
    assert not (tmp_path / "tensorboard").exists()
