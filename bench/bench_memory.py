"""Peak memory of one YOLOv1 training step on the CPU, and the largest batch for a RAM size.

    python bench/bench_memory.py [--batches 1,2,4] [--check 8] [--ram-gb 24]

Each batch size runs in a fresh process (one step: forward + loss + backward + SGD step,
as bench_train.py), whose peak resident memory is the measurement. On Linux the peak is reset
(``/proc/self/clear_refs``) once the network and batch are built, so that the transient peak
of importing torch, which can exceed a small network's whole step, does not hide the step;
elsewhere it is ``ru_maxrss``, the whole process's peak. A
straight line through the ``--batches`` points (weights, gradients and momentum are the
intercept, activations the slope) predicts the largest batch whose step fits in
``--ram-gb``; ``--check`` runs one more batch size and compares it with the prediction.
The GPU figure (peak memory at batch 64) is bench_train.py's ``peak GiB`` column.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

from machine import load_average, machine  # noqa: E402

STEP = """
import re, resource, sys, torch
sys.path[:0] = [{root!r}, {bench!r}]
from bench_train import yolo_case
from schedule import build_optimizer
from types import SimpleNamespace
model, x, y, loss_fn = yolo_case({batch}, {width}, torch.device("cpu"))
opt = build_optimizer(model, SimpleNamespace(optimizer="sgd", lr=1e-4, momentum=0.9, weight_decay=5e-4))
try:  # reset the high-water mark to the current RSS (Linux >= 4.0), then read it back as VmHWM
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
loss_fn(model(x), y).backward()
opt.step()
try:
    with open("/proc/self/status") as f:
        print(int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024)
except (OSError, AttributeError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(batch: int, width: float) -> int:
    """Peak resident bytes of a fresh process that runs one training step."""
    code = STEP.format(root=str(ROOT), bench=str(ROOT / "bench"), batch=batch, width=width)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,4", help="batch sizes for the fit")
    parser.add_argument("--check", type=int, default=8, help="a batch size to compare with the fit (0: none)")
    parser.add_argument("--ram-gb", type=float, default=24.0, help="RAM of the machine to size for (GB, 1e9)")
    parser.add_argument("--width", type=float, default=1.0, help="channel width (1/16 for a smoke test)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    peaks = [peak_rss(b, args.width) for b in batches]
    slope, intercept = np.polyfit(batches, peaks, 1)
    # A batch's activations must cost something: a flat or falling line (under 100 kB per
    # image, below the noise of RSS pages) means the points are too close to tell apart, and
    # no largest batch follows from them.
    largest = int((args.ram_gb * 1e9 - intercept) // slope) if slope > 1e5 else None
    report = {"machine": machine(), "load_average": load_average(), "width": args.width,
              "points": dict(zip(batches, peaks)), "bytes_per_image": slope, "fixed_bytes": intercept,
              "ram_gb": args.ram_gb, "largest_batch": largest}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; YOLOv1 @448 width {args.width:g}")
    for b, p in zip(batches, peaks):
        print(f"batch {b:>4}: peak RSS {p / 1e9:6.2f} GB")
    print(f"fit: {intercept / 1e9:.2f} GB + {slope / 1e9:.4f} GB per image -> largest batch in "
          f"{args.ram_gb:g} GB: " + (str(largest) if largest is not None else
                                     "unknown (peaks do not grow with the batch: use larger batches)"))
    if args.check:
        measured = peak_rss(args.check, args.width)
        predicted = intercept + slope * args.check
        report["check"] = {"batch": args.check, "measured": measured, "predicted": predicted}
        print(f"check, batch {args.check}: measured {measured / 1e9:.2f} GB, fit {predicted / 1e9:.2f} GB "
              f"({100 * (measured / predicted - 1):+.1f}%)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
