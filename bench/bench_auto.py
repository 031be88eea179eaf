"""What --backend auto weighs on the CPU: the start-up of the in-process export and the
per-image saving it buys, hence the job size that repays it (inference.AUTO_ONNX_MIN_IMAGES).

    python bench/bench_auto.py --model fast --rounds 4 --batch 16       # test.py's batch size
    python bench/bench_auto.py --model yolov1 --rounds 1 --batch 8      # 1.1 GB: about 30 s a round

Per round: ``inference.for_job`` on the default runner (torch.onnx export into a temporary
folder, onnxruntime's session), its first batch (onnxruntime, and PyTorch for the check),
then two more batches of each backend alternated. Start-up = for_job + the first batch -
an onnxruntime batch; the saving per image = (PyTorch batch - onnxruntime batch) / batch;
break-even = start-up / saving: the images from which the export pays. The network alone:
reading, resizing and NMS cost the same on either backend. Networks as bench_detect.py's
(seeded, random batch-norm statistics).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference  # noqa: E402
from bench_detect import MODELS, make_model  # noqa: E402
from machine import load_average, machine  # noqa: E402


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fast", choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "auto.json"))
    args = p.parse_args(argv)
    model = make_model(args.model, False)
    runner = inference.torch_runner(model, [str(i) for i in range(model.C)], torch.device("cpu"), inference.Backend())
    del model  # as in the scripts: only the default runner's network is left
    x = torch.rand(args.batch, 3, runner.input_size, runner.input_size)
    times = {"for_job": [], "first_batch": [], "torch": [], "onnx": []}
    load_before = load_average()
    for _ in range(args.rounds):
        seconds, fast = timed(lambda: inference.for_job(runner, math.inf))
        assert fast.description.startswith("onnxruntime"), fast.description
        times["for_job"].append(seconds)
        times["first_batch"].append(timed(lambda: fast(x))[0])
        for _ in range(2):
            times["torch"].append(timed(lambda: runner(x))[0])
            times["onnx"].append(timed(lambda: fast(x))[0])
        del fast
    med = {k: statistics.median(v) for k, v in times.items()}
    startup = med["for_job"] + med["first_batch"] - med["onnx"]
    saving = (med["torch"] - med["onnx"]) / args.batch
    report = {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
              "model": args.model, "batch": args.batch, "times_s": times, "startup_s": startup,
              "torch_ms_per_image": 1e3 * med["torch"] / args.batch, "onnx_ms_per_image": 1e3 * med["onnx"] / args.batch,
              "saving_ms_per_image": 1e3 * saving, "break_even_images": startup / saving if saving > 0 else None,
              "threshold_images": inference.auto_onnx_min_images(runner.module),
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "times_s")}, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
