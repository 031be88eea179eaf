"""Detection speed: frames per second and latency from a JPEG file to boxes, and of the network alone.

    python bench/bench_detect.py                          # CPU: Fast YOLO and YOLOv1, batch 1 and 8
    python bench/bench_detect.py --models fast --batches 1 --variants eager,default,compile
    python bench/bench_detect.py --quick                  # tiny networks, 3 rounds: a smoke test
    python bench/bench_detect.py --device cuda            # + float16, bfloat16, CUDA graphs, onnxruntime-gpu

For every model (``MODELS``: one line each), variant (``VARIANTS``: an inference.Backend, or
the exported ONNX file under onnxruntime) and batch size, two timings:

* ``file``: what detect.py does per batch of images, from the encoded files: decode
  (``images.load_image``: Pillow, EXIF orientation), then ``predict.predict_images`` (antialiased
  resize of the uint8 pixels, [0, 1] floats, the network, ``utils.decode_predictions``
  with per-class NMS at detect.py's defaults, boxes scaled to pixels). The files are the
  four bundled photographs (``data/images``: astronaut, camera, chelsea, coffee; 300-600
  px, one greyscale), cycled.
* ``network``: the runner alone on a ready float batch (on the device).

Variants are timed round-robin (at batch 1 three consecutive calls each per round), so
that a shared machine's load falls on all of them alike: compare same-run ratios. Reported: median and 99th-percentile
(nearest rank) latency per call, the fastest call (on a shared machine, the closest to
an idle one), frames per second (batch / median), for the network its
GFLOP/s and percentage of the float32 matrix-multiply rate (a ``torch.mm`` timed in the
same rounds), each variant's start-up (its first call: compilation), and the largest
difference of its boxes from eager float32's on the same photos (a low threshold, 0.005,
so that many boxes are compared): boxes matched by class and corners, their largest
coordinate difference in pixels and score difference, and any box in one list only,
counted as a threshold crossing when it scores within 1e-3 of 0.005 (float rounding moved
it across) and as a real difference otherwise. Networks are randomly initialised (seeded) with
random batch-norm statistics, so that folding batch norm is exercised as with trained weights.
On a GPU ``cudnn.benchmark`` is on, and the timings synchronise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torchvision.transforms.v2 import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

import inference  # noqa: E402
from images import load_image  # noqa: E402
from predict import predict_images  # noqa: E402
from inference import Backend  # noqa: E402
from machine import load_average, machine  # noqa: E402
from model import build_model  # noqa: E402
from utils import UserError  # noqa: E402

TINY = {"S": 2, "width": 1 / 16}  # --quick: 128 x 128 input
# One line per model: name -> builder (quick: a tiny network of the same structure).
MODELS = {
    "fast": lambda quick: build_model("fast", **(TINY if quick else {})),
    "yolov1": lambda quick: build_model("yolov1", **(TINY | {"hidden": 64} if quick else {})),
    # Darknet's released networks (model.MODELS; darknet_convert.py loads their weights)
    "yolov1-tiny": lambda quick: build_model("yolov1-tiny", **(TINY if quick else {})),
    "yolov1-darknet": lambda quick: build_model("yolov1-darknet", **(TINY if quick else {})),
}
# One line per variant: name -> (inference.Backend, or "onnx"; devices it runs on).
VARIANTS = {
    "eager": (inference.EAGER, ("cpu", "cuda")),
    "channels_last": (Backend(fold_bn=False), ("cpu", "cuda")),
    "default": (Backend(), ("cpu", "cuda")),                     # batch norm folded + channels_last
    "compile": (Backend(compile=True), ("cpu", "cuda")),          # CPU: freezing; GPU: CUDA graphs
    "compile-max-autotune": (Backend(compile=True, compile_mode="max-autotune-no-cudagraphs"), ("cpu",)),
    "onnx": ("onnx", ("cpu", "cuda")),
    "float16": (Backend(dtype=torch.float16), ("cuda",)),
    "bfloat16": (Backend(dtype=torch.bfloat16), ("cuda",)),
    "float16-compile": (Backend(dtype=torch.float16, compile=True), ("cuda",)),
}
CHECK = SimpleNamespace(conf_threshold=0.005, nms_iou=0.5, max_det=None)   # the box comparison
DETECT = SimpleNamespace(conf_threshold=0.2, nms_iou=0.5, max_det=100)     # detect.py's defaults
MATMUL = "float32 matmul"
PHOTOS = ("astronaut", "camera", "chelsea", "coffee")  # data/images: the real photographs


# --------------------------------------------------------------------------- set-up
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_call(device: torch.device, size: int):
    """One float32 ``torch.mm`` of two ``size`` squares (2 size^3 FLOPs), synchronised. It is
    timed in the same rounds as the variants: its rate is the machine's under the same load."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    out = torch.empty(size, size, device=device)

    def call():
        torch.mm(a, b, out=out)
        sync(device)
    return call


def make_model(name: str, quick: bool) -> torch.nn.Module:
    """A seeded network with random batch-norm statistics (trained ones are far from the
    fresh 0 / 1, and folding them must be checked as they will be)."""
    torch.manual_seed(0)
    model = MODELS[name](quick).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def count_flops(model: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, model.input_size, model.input_size))
    return counter.get_total_flops()


def make_runner(variant: str, model, device: torch.device, onnx_dir: Path):
    """The variant's runner, or the one-line reason it cannot run here."""
    spec, devices = VARIANTS[variant]
    if device.type not in devices:
        return f"not on {device.type}"
    names = [str(i) for i in range(model.C)]
    try:
        if spec == "onnx":
            import export

            inference.onnx_providers(device)  # before the export: onnxruntime-gpu may be missing
            path = onnx_dir / "model.onnx"
            if not path.exists():
                with contextlib.redirect_stdout(io.StringIO()):  # export's "onnx: path" line
                    export.export(copy.deepcopy(model).cpu(), names, onnx_dir, ["onnx"], raw=True, check=False)
            return inference.load(path, device)
        return inference.torch_runner(model.to(device), names, device, spec)
    except UserError as err:
        return str(err)


# --------------------------------------------------------------------------- timing
def file_batch(runner, paths, args_like):
    """detect.py's work for one batch of files: decode, then predict (resize ... NMS)."""
    images = [F.pil_to_tensor(load_image(p)) for p in paths]
    return predict_images(runner, images, args_like)


def network_call(runner, x, device):
    out = runner(x)
    sync(device)
    return out


def percentile(times: list[float], q: float) -> float:
    """Nearest-rank percentile (with 20 samples, p99 is the largest)."""
    ordered = sorted(times)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def time_round_robin(calls: dict, rounds: int, warmup: int, budget: float, per_turn: int = 1) -> dict:
    """``{name: [seconds per call]}``: ``warmup`` untimed calls each (the first timed as
    start-up), then ``per_turn`` consecutive calls of each per round until ``rounds`` or
    ``budget`` seconds. Consecutive calls are what a program using one backend sees: the
    first after another backend's can find the cores still held by that one's spinning
    threads (OpenMP's, onnxruntime's)."""
    startup = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        startup[name] = time.perf_counter() - start
        for _ in range(warmup - 1):
            call()
    times = {name: [] for name in calls}
    began = time.perf_counter()
    for r in range(rounds):
        for name, call in calls.items():
            for _ in range(per_turn):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        if time.perf_counter() - began > budget and r >= 2:
            break
    return {"startup": startup, "times": times}


# --------------------------------------------------------------------------- box check
def match_boxes(got: torch.Tensor, want: torch.Tensor, tolerance_px: float = 1.0):
    """Pairs ``(i, j)`` of one image's detections (``class, score, x1, y1, x2, y2``) of the
    same class whose corners are within ``tolerance_px``, closest first (corners, then
    score: boxes clipped to a corner of the image can share all four), each box once."""
    if not len(got) or not len(want):
        return []
    gap = (got[:, None, 2:] - want[None, :, 2:]).abs().amax(-1)
    gap[got[:, None, 0] != want[None, :, 0]] = math.inf
    cost = gap + (got[:, None, 1] - want[None, :, 1]).abs()
    pairs, used_g, used_w = [], set(), set()
    for flat in torch.argsort(cost.flatten(), stable=True).tolist():
        i, j = divmod(flat, len(want))
        if cost.flatten()[flat] > tolerance_px + 1:  # scores differ by at most 1: no gap left within
            break
        if gap[i, j] > tolerance_px:
            continue
        if i not in used_g and j not in used_w:
            pairs.append((i, j))
            used_g.add(i)
            used_w.add(j)
    return pairs


def box_difference(got: list, want: list, threshold: float | None = None) -> dict:
    """One variant's detections against the reference's, image by image: the boxes matched
    (same class, corners within a pixel) and their largest coordinate and score differences;
    the unmatched ones that score within 1e-3 of ``threshold`` (rounding moved them across
    it: ``crossings``), and any other unmatched box (``unexplained``: a real difference)."""
    threshold = CHECK.conf_threshold if threshold is None else threshold
    report = {"boxes": sum(len(w) for w in want), "matched": 0, "crossings": 0, "unexplained": 0,
              "images_differing": 0, "max_box_px": 0.0, "max_score": 0.0}
    for g, w in zip(got, want, strict=True):
        pairs = match_boxes(g, w)
        if pairs:
            i, j = map(list, zip(*pairs))
            report["max_box_px"] = max(report["max_box_px"], (g[i, 2:] - w[j, 2:]).abs().max().item())
            report["max_score"] = max(report["max_score"], (g[i, 1] - w[j, 1]).abs().max().item())
        left = torch.cat([without_rows(g, [p[0] for p in pairs]), without_rows(w, [p[1] for p in pairs])])
        near = (left[:, 1] - threshold).abs() < 1e-3
        report["matched"] += len(pairs)
        report["crossings"] += int(near.sum())
        report["unexplained"] += int((~near).sum())
        report["images_differing"] += bool(len(left))
    report["same_boxes_and_classes"] = report["crossings"] == report["unexplained"] == 0
    return report


def without_rows(boxes: torch.Tensor, rows: list[int]) -> torch.Tensor:
    keep = torch.ones(len(boxes), dtype=torch.bool)
    keep[rows] = False
    return boxes[keep]


def describe_check(c: dict | None) -> str:
    if c is None:
        return "-"
    text = f"{c['matched']} same, max {c['max_box_px']:.2g} px, score {c['max_score']:.2g}"
    text += f"; {c['crossings']} crossed the threshold" if c["crossings"] else ""
    return text + (f"; DIFFER: {c['unexplained']} boxes in {c['images_differing']} images"
                   if c["unexplained"] else "")


# --------------------------------------------------------------------------- one model
def bench_model(name: str, args, device: torch.device, photos: list[Path]) -> list[dict]:
    model = make_model(name, args.quick)
    flops = count_flops(model)
    rows, runners = [], {}
    with tempfile.TemporaryDirectory() as onnx_dir:
        for variant in args.variants:
            runner = make_runner(variant, model, device, Path(onnx_dir))
            if isinstance(runner, str):
                print(f"{name} {variant}: skipped ({runner})")
                rows.append({"model": name, "variant": variant, "skipped": runner})
            else:
                runners[variant] = runner
        timings = []
        for batch in args.batches:
            files = [photos[i % len(photos)] for i in range(batch)]
            x = torch.rand(batch, 3, model.input_size, model.input_size).to(device)
            calls = {v: (lambda r=r: network_call(r, x, device)) for v, r in runners.items()}
            per_turn = 3 if batch == 1 else 1   # large batches: seconds a call on the CPU
            net = time_round_robin(calls | {MATMUL: matmul_call(device, args.mm_size)},
                                   args.rounds, args.warmup, args.budget, per_turn)
            mm_rate = 2 * args.mm_size ** 3 / statistics.median(net["times"][MATMUL])
            end = time_round_robin({v: (lambda r=r: file_batch(r, files, DETECT)) for v, r in runners.items()},
                                   args.rounds, args.warmup, args.budget, per_turn)
            timings.append((batch, net, end, mm_rate))
        # After the timings: a compiled graph is then run at a batch size it already has.
        reference = file_batch(runners["eager"], photos, CHECK) if "eager" in runners else None
        checks = {v: box_difference(file_batch(r, photos, CHECK), reference)
                  for v, r in runners.items() if reference is not None}
    return rows + [result_row(name, v, r, batch, net, end, flops, mm_rate, checks.get(v))
                   for batch, net, end, mm_rate in timings for v, r in runners.items()]


def result_row(name, variant, runner, batch, net, end, flops, mm_rate, check) -> dict:
    net_t, end_t = net["times"][variant], end["times"][variant]
    med_net, med_end = statistics.median(net_t), statistics.median(end_t)
    return {"model": name, "variant": variant, "backend": runner.description, "batch": batch,
            "network": {"median_s": med_net, "p99_s": percentile(net_t, 99), "min_s": min(net_t),
                        "fps": batch / med_net, "samples": len(net_t), "startup_s": net["startup"][variant]},
            "file_to_boxes": {"median_s": med_end, "p99_s": percentile(end_t, 99), "min_s": min(end_t),
                              "fps": batch / med_end, "samples": len(end_t)},
            "flops_per_image": flops, "gflop_per_s": flops * batch / med_net / 1e9,
            "matmul_flops_per_s": mm_rate, "fraction_of_matmul": flops * batch / med_net / mm_rate,
            "check": check}


# --------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--variants", default=None, help="comma-separated (default: all for the device): "
                   + ", ".join(VARIANTS))
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8 on the CPU, 1,256 on a GPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of timed calls (default 20 CPU, 100 GPU; batch 1: 3 calls a round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first one is the start-up)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per timing before fewer rounds")
    p.add_argument("--images", default=None, help="a folder of JPEGs to use (its first 8) instead of "
                   "the bundled photographs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--mm-size", type=int, default=None, help="default 2048 (CPU), 8192 (GPU)")
    p.add_argument("--quick", action="store_true", help="tiny networks, batches 1 and 2, 3 rounds")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "detect.json"))
    args = p.parse_args(argv)
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                               ("cpu" if args.device == "auto" else args.device))
    gpu = args.device.type == "cuda"
    args.models = args.models.split(",")
    args.variants = args.variants.split(",") if args.variants else [
        v for v, (_, devices) in VARIANTS.items() if args.device.type in devices]
    unknown = [m for m in args.models if m not in MODELS] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown model or variant: {', '.join(unknown)}")
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,256" if gpu else "1,8")).split(",")]
    args.rounds = args.rounds or (3 if args.quick else 100 if gpu else 20)
    args.mm_size = args.mm_size or (512 if args.quick else 8192 if gpu else 2048)
    if args.quick:
        args.warmup = 1
    return args


def print_report(report: dict) -> None:
    info = report["machine"]
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
    print(f"machine: {where}, torch {info['torch']} ({info['torch_threads']} threads), load average "
          f"before {report['load_average_before']} after {report['load_average_after']}")
    rates = sorted({round(r["matmul_flops_per_s"] / 1e9, 1) for r in report["rows"] if "skipped" not in r})
    print(f"float32 matmul ({report['mm_size']}^2, timed in the network rounds): {rates} GFLOP/s; medians "
          f"of up to {report['rounds']} round-robin calls; boxes vs eager float32 at conf > {CHECK.conf_threshold}")
    print(f"{'model':<15}{'variant':<22}{'batch':>6}{'file FPS':>10}{'med ms':>9}{'p99 ms':>9}{'min ms':>9}"
          f"{'net FPS':>10}{'med ms':>9}{'p99 ms':>9}{'min ms':>9}{'GFLOP/s':>9}{'% mm':>7}{'start s':>9}"
          "  boxes vs eager")
    for r in report["rows"]:
        if "skipped" in r:
            continue
        n, e, c = r["network"], r["file_to_boxes"], r["check"]
        boxes = describe_check(c)
        print(f"{r['model']:<15}{r['variant']:<22}{r['batch']:>6}{e['fps']:>10.1f}{1e3 * e['median_s']:>9.1f}"
              f"{1e3 * e['p99_s']:>9.1f}{1e3 * e['min_s']:>9.1f}{n['fps']:>10.1f}{1e3 * n['median_s']:>9.1f}"
              f"{1e3 * n['p99_s']:>9.1f}{1e3 * n['min_s']:>9.1f}"
              f"{r['gflop_per_s']:>9.1f}{100 * r['fraction_of_matmul']:>6.0f}%{n['startup_s']:>9.1f}  {boxes}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("bench_detect: skipped, --device cuda but torch.cuda.is_available() is False")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    photos = (sorted(Path(args.images).glob("*.jpg"))[:8] if args.images else
              [ROOT / "data" / "images" / f"{name}.jpg" for name in PHOTOS])
    if not photos:
        raise SystemExit(f"{args.images}: no .jpg files")
    report = {"machine": machine(args.device), "device": str(args.device), "quick": args.quick,
              "load_average_before": load_average(), "mm_size": args.mm_size, "rounds": args.rounds,
              "photos": [p.name for p in photos], "rows": []}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:  # table and JSON after each model: a time limit keeps what was measured
        rows = bench_model(name, args, args.device, photos)
        report["rows"] += rows
        report["load_average_after"] = load_average()
        out.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report | {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
