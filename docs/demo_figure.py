"""The README's first figure: the demo model's detections on held-out images, and its error analysis.

    python train.py                                   # the demo: runs/train/demo/best.pt
    python docs/demo_figure.py runs/train/demo/best.pt    # -> docs/demo_detections.png

It runs what a user runs: detect_txt.py on data/shapes/test.csv (64 images the demo never
trained on), then analyze.py on its folders, and draws six of the test images at twice
their size with the boxes scoring at least 0.2 (detect.py's display threshold), beside
analyze.py's pie. The run's folders stay in runs/demo_figure/ for a look at the numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

import analyze  # noqa: E402
import detect_txt  # noqa: E402
from plots import class_colour  # noqa: E402
from utils import UserError, load_checkpoint, run_cli  # noqa: E402

SHOWN = [f"test_{i:06d}" for i in range(6)]
DISPLAY_THRESHOLD = 0.2


def run_tools(checkpoint: str, out: Path) -> tuple[Path, dict]:
    """detect_txt.py then analyze.py, as in docs/analysis.md; returns the detections folder
    and analysis.json."""
    detect_txt.main([checkpoint, "--data", str(ROOT / "data/shapes/test.csv"), "--project", str(out),
                     "--name", "detect", "--device", "cpu"])
    found = out / "detect"
    analyze.main(["--gt", str(found / "groundtruths"), "--det", str(found / "detections"),
                  "--labels", "demo model, 64 test images", "--out", str(out / "analysis")])
    return found / "detections", json.loads((out / "analysis" / "analysis.json").read_text())


def draw_image(ax, image_id: str, detections: Path, names: list[str]) -> None:
    """One test image with its boxes scoring >= DISPLAY_THRESHOLD, labelled 'name score'."""
    from matplotlib.patches import Rectangle

    with Image.open(ROOT / "data/shapes/images" / f"{image_id}.jpg") as image:
        ax.imshow(image.convert("RGB"), interpolation="nearest")
    for line in (detections / f"{image_id}.txt").read_text().splitlines():
        name, score, x1, y1, x2, y2 = line.split()
        if float(score) < DISPLAY_THRESHOLD:
            continue
        x1, y1, x2, y2 = map(float, (x1, y1, x2, y2))
        colour = tuple(c / 255 for c in class_colour(names.index(name)))
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        ax.text(x1 - 0.5, y1 - 0.5, f"{name} {float(score):.2f}", color="white", fontsize=9, va="bottom",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
    ax.set_axis_off()


def figure(detections: Path, analysis: dict, names: list[str]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 4.4), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=(1.55, 1))
    for ax, image_id in zip(left.subplots(2, 3).ravel(), SHOWN):
        draw_image(ax, image_id, detections, names)
    left.suptitle(f"held-out test images, boxes scoring >= {DISPLAY_THRESHOLD}", fontsize=10)
    detector = analysis["detectors"][0]
    analyze.draw_pie(right.add_subplot(), detector, "error analysis (paper Figure 4)")
    return fig


def save_small_png(fig, path: Path) -> None:
    """PNG with a 256-colour palette: the noisy synthetic backgrounds make a full-colour
    PNG several times larger for no visible gain."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256).save(path, optimize=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the demo's best.pt")
    p.add_argument("--out", default=str(ROOT / "docs/demo_detections.png"))
    p.add_argument("--work", default=str(ROOT / "runs/demo_figure"), help="for the tools' folders (new)")
    args = p.parse_args(argv)
    if Path(args.work).exists():
        raise UserError(f"{args.work}: exists; remove it or choose another --work")
    names = list(load_checkpoint(args.checkpoint).get("class_names") or [])
    detections, analysis = run_tools(args.checkpoint, Path(args.work))
    save_small_png(figure(detections, analysis, names), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
