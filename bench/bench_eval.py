"""test.py end to end on a VOC2007-test-sized set: JPEG files to both metrics, in seconds.

    python bench/bench_eval.py --device cuda                    # 4,952 images, YOLOv1 @448
    python bench/bench_eval.py --quick                          # 64 tiny images: a smoke test

What is timed is ``test.evaluate_checkpoint``, the whole of test.py's work: reading the
files (``--workers`` processes), decoding and resizing (on the host, or on the device a
batch at a time: encoded_images.py), the network (inference.py's backend for the flags),
decoding with per-class NMS, the VOC mAP and the original project's fixed-threshold
metric. The variants run round-robin, ``--runs`` times each (2); the first run's extra time
is the start-up of a compiled backend (compilation, cuDNN's choices), the median of the
others what an evaluation costs (``--backend auto`` and ``onnx`` export the network in
every run: their runs include it). Every variant's boxes on the
first 256 images are compared with the first variant's (host decode, float32), as
bench_detect.py compares its variants: nvJPEG's and the GPU resize's rounding, and
float16's, move boxes a little, and a box scoring near the 0.005 threshold may cross it.

The images are 64 synthetic 500 x 375 JPEGs (the size of a VOC photo) repeated to
``--images`` rows: the files are in the page cache, as a VOC set is after its first pass.
The network is randomly initialised (seeded), with random batch-norm statistics and its
last layer's biases set so that a box scores like a trained network's (each cell sure of
one class, confidences up to 0.5), and its weights scaled down so that the image moves
the outputs a little: about 190 boxes per image pass test.py's 0.005 threshold and NMS
(``boxes_per_image`` in the report; a trained YOLOv1 gives 56 on VOC2007 test), so the
post-processing's share is if anything overstated.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, bench_detect.py

import synthetic  # noqa: E402
import test as test_script  # noqa: E402
import utils  # noqa: E402
import predict  # noqa: E402
from bench_detect import box_difference, describe_check, make_model  # noqa: E402
from dataset import build_voc_dataset, load_class_names  # noqa: E402
from machine import load_average, machine  # noqa: E402

CHECKED = 256  # images whose boxes are compared with the reference variant's
# name -> test.py flags (and the devices it runs on); the first is the reference.
VARIANTS = {
    "host decode, float32": (["--decode", "host", "--backend", "torch"], ("cpu", "cuda")),
    "device decode, float32": (["--decode", "device", "--backend", "torch"], ("cpu", "cuda")),
    "host decode, auto": (["--decode", "host"], ("cpu",)),  # the default: onnxruntime for a large set
    "host decode, onnx": (["--decode", "host", "--backend", "onnx"], ("cpu",)),  # whatever the set's size
    "device decode, float16": (["--decode", "device", "--half"], ("cuda",)),
    "device decode, float16 + compile": (["--decode", "device", "--half", "--compile"], ("cuda",)),
}


def write_data(root: Path, images: int, size) -> Path:
    """64 synthetic JPEGs and a csv that lists them ``images`` times in all."""
    csv = synthetic.write_voc_txt_tree(root, min(64, images), size=size, seed=0)
    header, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join([header] + [rows[i % len(rows)] for i in range(images)]) + "\n")
    return csv


def write_checkpoint(path: Path, name: str, quick: bool) -> Path:
    """A seeded network whose scores look like a trained one's (see the module docstring)."""
    model = make_model(name, quick)
    S, B, C = model.S, model.B, model.C
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        last = model.head[-1]
        last.weight.mul_(0.01)
        bias = torch.rand(S * S, C + 5 * B, generator=g) * 0.005          # classes: too low to pass ...
        bias[torch.arange(S * S), torch.randint(C, (S * S,), generator=g)] = 0.9  # ... but one
        boxes = bias[:, C:].view(S * S, B, 5)
        boxes[..., 0] = torch.rand(S * S, B, generator=g) * 0.5                 # confidence
        boxes[..., 1:] = torch.rand(S * S, B, 4, generator=g) * 0.6 + 0.2      # x, y, sqrt w, h
        last.bias.copy_(bias.reshape(-1))
    utils.save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": model.config,
                           "class_names": list(load_class_names())}, path)
    return path


def evaluate_once(flags: list[str], common: list[str]) -> tuple[float, dict, argparse.Namespace]:
    """Seconds of one test.py evaluation (its backend's start-up included), its result and arguments."""
    args = test_script.build_parser().parse_args(common + flags)
    start = time.perf_counter()
    result = test_script.evaluate_checkpoint(args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result, args


def variant_row(times: list[float], result: dict, args) -> tuple[dict, list]:
    """A variant's row (its first run, and the median of the others: what an evaluation costs
    once compiled; an automatic choice pays its start-up in every run) and its boxes on the
    first CHECKED images, from the backend the evaluation ran on."""
    paths = [r.path for r in build_voc_dataset(args.data, img_size=8).records[:CHECKED]]
    runner = predict.for_job(predict.open_runner(args), result["images"], args)  # the evaluation's backend
    dets, _ = predict.predict_files(runner, paths, args)
    seconds = statistics.median(times[1:] or times)
    row = {"first_s": times[0], "seconds": seconds, "runs_s": times, "images_per_s": result["images"] / seconds,
           "boxes_per_image": sum(map(len, dets.values())) / max(1, len(dets)),
           "mAP": result["voc"]["mAP"], "fixed_mAP": result["fixed"]["mAP"], "backend": result["backend"]}
    return row, [torch.from_numpy(dets[i]) for i in range(len(paths))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--images", type=int, default=4952, help="rows of the evaluation set (VOC2007 test: 4,952)")
    p.add_argument("--model", default="yolov1", choices=("yolov1", "fast"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=2, help="evaluations per variant (the first one's extra time: start-up)")
    p.add_argument("--workers", type=int, help="test.py --workers (default: its own)")
    p.add_argument("--variants", help="comma-separated names of VARIANTS (default: all for the device)")
    p.add_argument("--quick", action="store_true", help="64 tiny images, the tiny network: a smoke test")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    # names hold ", " (a comma and a space): split on the commas without one
    names = re.split(r",(?! )", args.variants) if args.variants else [n for n, (_, on) in VARIANTS.items() if device in on]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = 64 if args.quick else args.images
        csv = write_data(tmp / "voc", images, (160, 120) if args.quick else (500, 375))
        ckpt = write_checkpoint(tmp / "model.pt", args.model, args.quick)
        common = [str(ckpt), "--data", str(csv), "--device", device, "--batch-size", str(args.batch_size)]
        common += ["--workers", str(args.workers)] if args.workers is not None else []
        times, results = {name: [] for name in names}, {}
        for _ in range(args.runs):  # round-robin: a shared machine's load falls on every variant alike
            for name in names:
                seconds, *results[name] = evaluate_once(VARIANTS[name][0], common)
                times[name].append(seconds)
        rows, boxes = {}, {}
        for name in names:
            rows[name], boxes[name] = variant_row(times[name], *results[name])
            r = rows[name]
            r["check"] = box_difference(boxes[name], boxes[names[0]])
            print(f"{name:34s} {r['seconds']:7.2f} s  {r['images_per_s']:8.0f} img/s  (first run "
                  f"{r['first_s']:6.2f} s)  [{r['backend']}]  vs {names[0]}: {describe_check(r['check'])}", flush=True)
    report = {"machine": machine(), "load_average": load_average(), "device": device, "images": images,
              "model": args.model, "batch_size": args.batch_size, "rows": rows}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
