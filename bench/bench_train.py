"""Training-step throughput (images/s) of YOLOv1 at 448 and Darknet at 224, against a floor.

    python bench/bench_train.py [--steps 3] [--warmup 1] [--batch-yolo 2] [--batch-darknet 4]
    python bench/bench_train.py --quick          # tiny widths, for a smoke test
    python bench/bench_train.py --device cuda    # GPU rows (default: cuda when available)

One step is forward + loss + backward + SGD step + zero_grad (``schedule.build_optimizer``:
momentum 0.9, weight decay 5e-4 on weights, as train.py), on random
inputs (YOLOv1: targets from ``utils.encode_target`` and ``loss.YoloLoss``; Darknet: a
1000-way cross-entropy). Reported per model: the median step time of ``--steps`` timed
steps after ``--warmup`` untimed ones (and, within it, the optimiser step's), images/s, the model's FLOPs per image for one
forward + backward (``torch.utils.flop_counter.FlopCounterMode``, counted once on the
eager model), the floor (those FLOPs at the machine's dense matrix-multiply rate, measured
in the same run as the median of ``torch.mm`` timings) and the achieved fraction of it.

On the CPU the rows are float32. On a GPU (``torch.cuda.is_available()``) the rows are
float32, bf16 autocast, bf16 + channels_last, and bf16 + channels_last + ``torch.compile``;
bf16 rows are compared with the bf16 matmul rate. A ``torch.profiler`` summary of one
YOLOv1 step (top 8 ops by self CPU time, or by self CUDA time on a GPU) is printed and saved
next to the JSON (``train_profile.txt``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

from darknet_model import Darknet  # noqa: E402
from machine import load_average, machine  # noqa: E402
from schedule import build_optimizer  # noqa: E402
from loss import YoloLoss  # noqa: E402
from model import YOLOv1  # noqa: E402
from utils import encode_target  # noqa: E402


# --------------------------------------------------------------------------- machine
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, reps: int) -> float:
    """Dense matrix-multiply rate in FLOP/s: median over ``reps`` timings of one
    ``size`` x ``size`` ``torch.mm`` (2 n^3 FLOPs), after two warm-up products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


# --------------------------------------------------------------------------- models
def yolo_case(batch: int, width: float, device: torch.device):
    model = YOLOv1(width=width, hidden=max(16, int(4096 * width))).to(device)
    size = model.input_size
    x = torch.rand(batch, 3, size, size, device=device)
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        k = 3
        cxcy = torch.rand(k, 2, generator=g) * 0.9 + 0.05
        wh = torch.rand(k, 2, generator=g) * 0.5 + 0.05
        targets.append(encode_target(torch.cat((cxcy, wh), 1), torch.randint(0, 20, (k,), generator=g)))
    y = torch.stack(targets).to(device)
    return model, x, y, YoloLoss()


def darknet_case(batch: int, width: float, device: torch.device):
    model = Darknet(width=width).to(device)
    x = torch.rand(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return model, x, y, nn.CrossEntropyLoss()


CASES = {"yolov1@448": yolo_case, "darknet@224": darknet_case}


def make_step(model, loss_fn, optimizer, x, y, amp_dtype, device, optimizer_times: list):
    """One training step; the time of ``optimizer.step`` + ``zero_grad`` is appended to
    ``optimizer_times`` (synchronised on a GPU)."""
    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        sync(device)
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        optimizer_times.append(time.perf_counter() - start)
        return loss
    return step


def count_flops(model, loss_fn, x, y) -> float:
    """FLOPs of one forward + backward (eager, float32) per image."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def run_case(name, batch, width, device, variant, steps, warmup):
    """Time one configuration; returns a result row (and the step function, for profiling)."""
    torch.manual_seed(0)
    model, x, y, loss_fn = CASES[name](batch, width, device)
    model.train()
    flops = count_flops(model, loss_fn, x, y)
    amp = torch.bfloat16 if variant.get("bf16") else None
    if variant.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    # train.py's optimiser: SGD, momentum 0.9, weight decay 5e-4 on weights only.
    optimizer = build_optimizer(model, SimpleNamespace(optimizer="sgd", lr=1e-4, momentum=0.9,
                                                       weight_decay=5e-4))
    if variant.get("fused_sgd"):  # the same parameter groups and settings, with the fused (one-kernel) update
        optimizer = torch.optim.SGD(optimizer.param_groups, lr=1e-4, momentum=0.9, fused=True)
    runner = torch.compile(model) if variant.get("compile") else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer_times = []
    step = make_step(runner, loss_fn, optimizer, x, y, amp, device, optimizer_times)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    times, optimizer_times[:] = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError(f"{name} {variant}: non-finite loss")
    median = statistics.median(times)
    # Peak GPU memory of the whole training step (weights, gradients, momentum, activations).
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"model": name, "variant": variant_name(variant), "batch": batch, "width": width,
            "peak_memory_bytes": peak,
            "step_s": times, "median_step_s": median, "images_per_s": batch / median,
            "optimizer_s": statistics.median(optimizer_times),
            "warmup_s": warmup_s, "flops_per_image": flops}, step


def variant_name(variant: dict) -> str:
    parts = ["bf16 autocast" if variant.get("bf16") else "float32"]
    parts += ["channels_last"] if variant.get("channels_last") else []
    parts += ["torch.compile"] if variant.get("compile") else []
    parts += ["fused SGD"] if variant.get("fused_sgd") else []
    return " + ".join(parts)


def profile_step(step, device: torch.device, path: Path, top: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=top)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0) for e in events) or 1
    rows = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:top]
    summary = [{"op": e.key, "calls": e.count, "self_s": getattr(e, attr, 0) / 1e6,
                "share": getattr(e, attr, 0) / total} for e in rows]
    path.write_text(table + "\n")
    return {"sorted_by": attr, "total_self_s": total / 1e6, "top": summary, "table_file": str(path)}


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median); default 3 (CPU), 10 (GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 1 (CPU), 3 (GPU)")
    parser.add_argument("--batch-yolo", type=int, default=None, help="default 2 (CPU), 64 (GPU)")
    parser.add_argument("--batch-darknet", type=int, default=None, help="default 4 (CPU), 128 (GPU)")
    parser.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    parser.add_argument("--mm-size", type=int, default=None, help="default 2048 (CPU), 8192 (GPU)")
    parser.add_argument("--mm-reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--fused-sgd", action="store_true",
                        help="also time each model with SGD(fused=True) (train.py: the default SGD)")
    parser.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile rows")
    parser.add_argument("--all-variants", action="store_true",
                        help="the GPU rows (bf16, channels_last, torch.compile) on any device (CPU: a check)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: width 1/16, 2 timed steps, 512 matmul, small GPU batches")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "train.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    if args.quick:
        args.width, args.steps, args.warmup, args.mm_reps = 1 / 16, 2, 1, 5
        args.mm_size = args.mm_size or 512
        args.batch_yolo = args.batch_yolo or (8 if gpu else 2)
        args.batch_darknet = args.batch_darknet or (8 if gpu else 2)
    args.batch_yolo = args.batch_yolo or (64 if gpu else 2)
    args.batch_darknet = args.batch_darknet or (128 if gpu else 4)
    args.mm_size = args.mm_size or (8192 if gpu else 2048)
    # GPU steps are short: more of them for a stable median (and cudnn.benchmark's tuning)
    args.steps = args.steps or (10 if gpu else 3)
    args.warmup = args.warmup or (3 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True

    load_before = load_average()
    info = machine(device)
    rates = {"float32": matmul_rate(device, torch.float32, args.mm_size, args.mm_reps)}
    if gpu or args.all_variants:
        rates["bf16"] = matmul_rate(device, torch.bfloat16, args.mm_size, args.mm_reps)
    variants = [{}]
    if gpu or args.all_variants:
        variants += [{"bf16": True}, {"bf16": True, "channels_last": True}]
        if not args.no_compile:
            variants += [{"bf16": True, "channels_last": True, "compile": True}]
    if args.fused_sgd:  # the fastest eager variant, with the one-kernel SGD update
        variants += [dict(variants[2 if len(variants) > 2 else 0], fused_sgd=True)]

    rows, yolo_step = [], None
    for name, batch in (("yolov1@448", args.batch_yolo), ("darknet@224", args.batch_darknet)):
        for variant in variants:
            row, step = run_case(name, batch, args.width, device, variant, args.steps, args.warmup)
            rate = rates["bf16" if variant.get("bf16") else "float32"]
            row["matmul_flops_per_s"] = rate
            row["floor_images_per_s"] = rate / row["flops_per_image"]
            row["fraction_of_matmul"] = row["images_per_s"] / row["floor_images_per_s"]
            rows.append(row)
            if name == "yolov1@448" and not variant:
                yolo_step = step
            else:
                del step
    profile = None
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_profile and yolo_step is not None:
        profile = profile_step(yolo_step, device, out.with_name(out.stem + "_profile.txt"))
    load_after = load_average()

    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
    print(f"machine: {where}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"load average before {load_before} after {load_after}")
    print("matmul rate: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items())
          + f" (torch.mm {args.mm_size}x{args.mm_size}, median of {args.mm_reps})")
    print(f"width {args.width:g}; median of {args.steps} timed steps after {args.warmup} warm-up; "
          f"SGD as train.py (schedule.build_optimizer) unless 'fused SGD'")
    header = (f"{'model':<12}{'variant':<50}{'batch':>6}{'step s':>9}{'img/s':>9}"
              f"{'optim s':>9}{'GFLOP/img':>11}{'floor img/s':>13}{'% of mm':>9}{'peak GiB':>10}")
    print(header)
    for r in rows:
        peak = f"{r['peak_memory_bytes'] / 2 ** 30:>10.2f}" if r["peak_memory_bytes"] else f"{'-':>10}"
        print(f"{r['model']:<12}{r['variant']:<50}{r['batch']:>6}{r['median_step_s']:>9.3f}"
              f"{r['images_per_s']:>9.3f}{r['optimizer_s']:>9.3f}{r['flops_per_image'] / 1e9:>11.2f}"
              f"{r['floor_images_per_s']:>13.3f}{100 * r['fraction_of_matmul']:>8.1f}%{peak}")
    if profile:
        print(f"profile of one yolov1@448 step (batch {args.batch_yolo}), top 8 by {profile['sorted_by']}, "
              f"total {profile['total_self_s']:.2f} s:")
        for p in profile["top"]:
            print(f"  {p['op']:<45}{p['calls']:>6} calls {p['self_s']:>8.3f} s {100 * p['share']:>6.1f}%")
        print(f"full table: {profile['table_file']}")
    report = {"machine": info, "device": str(device), "load_average_before": load_before,
              "load_average_after": load_after, "quick": args.quick, "steps": args.steps,
              "warmup": args.warmup, "fused_sgd": args.fused_sgd, "matmul": {"size": args.mm_size, "reps": args.mm_reps,
                                                "flops_per_s": rates},
              "rows": rows, "profile": profile}
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
