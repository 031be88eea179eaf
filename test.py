"""Evaluate a train.py checkpoint on a csv or a VOCdevkit split.

    python test.py runs/train/demo/best.pt --data data/shapes/test.csv   # the demo on its test set
    python test.py best.pt --data VOCdevkit --split 2007/test --voc07 --json results.json
    python test.py best.pt --data VOCdevkit --voc07 --device cuda --half --compile --batch-size 64
    python test.py model.onnx --data data/test.csv         # an export.py --raw file, onnxruntime
    python test.py best.pt --backend torch                 # PyTorch even for a large set on the CPU

Prints two numbers, because the original project reported the first one:
1. its fixed-threshold "mAP" (original_metric.py): the best box of each cell scored by its
   confidence alone, > 0.4, NMS at 0.5, trapezoid AP at IoU 0.5. Cutting low-confidence
   boxes truncates the precision-recall curve: not comparable with published results;
2. the real VOC mAP: all boxes above a near-zero threshold, per-class NMS, AP per class
   (every-point by default; ``--voc07`` for the official VOC2007 protocol: 11-point,
   difficult objects ignored), as the paper and Padilla's toolkit compute it.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import argtypes
import predict
import runs
from dataset import VOCSource, build_voc_dataset
from evaluate import check_output_file, format_report, match_detections, summarize_matches
from original_metric import DESCRIPTION as ORIGINAL_METRIC, original_project_metric
from utils import UserError, run_cli

def build_parser() -> argparse.ArgumentParser:
    p = argtypes.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_inference_args(p, conf_threshold=0.005, batch_size=16,
                               conf_help="keep boxes scoring above this for the VOC mAP")
    predict.add_dataset_args(p, "csv of image,label pairs or a VOCdevkit folder")
    p.add_argument("--iou", type=argtypes.fraction(0, 1, lo_open=True), default=0.5, help="IoU for a true positive (default %(default)s)")
    p.add_argument("--voc07", action="store_true",
                   help="official VOC2007 protocol: 11-point AP, difficult objects ignored")
    p.add_argument("--json", help="write both metrics and the per-class APs to this file")
    p.add_argument("--overwrite", action="store_true", help="--json may replace an existing file (never an input)")
    return p


def evaluate_checkpoint(args) -> dict:
    """Both metrics from one pass of the network over the data."""
    runner = predict.open_runner(args)
    dataset = build_voc_dataset(VOCSource.of(args), runner.names, S=runner.S, img_size=runner.input_size)
    runner = predict.for_job(runner, len(dataset), args)
    dets, outputs = predict.predict_files(runner, [r.path for r in dataset.records], args, keep_outputs=True)
    gt = predict.ground_truth_table(dataset, runner.names)
    interp, difficult = ("11", "ignore") if args.voc07 else ("all", "ignore")
    matches = match_detections(gt, predict.detection_table(dets, runner.names), args.iou, difficult)
    real = summarize_matches(matches, interp)
    fixed = original_project_map(outputs, dataset, runner)
    return {"images": len(dataset), "fixed": fixed, "voc": real, "backend": runner.description}


def original_project_map(outputs, dataset, runner) -> dict:
    """The original project's metric (original_metric.py) of the same raw outputs."""
    if outputs is None:
        return {"mAP": float("nan"), "AP": {}}
    targets = torch.stack([dataset.target(i) for i in range(len(dataset))])
    return original_project_metric(outputs, targets, runner.S, runner.B, runner.C)


def main(argv=None):
    args = build_parser().parse_args(argv)
    predict.check_inference_args(args)
    if args.json:  # before the evaluation, not after it; never over the checkpoint or the data
        inputs = [("the checkpoint", args.checkpoint), ("--data", args.data), ("--img-dir", args.img_dir),
                  ("--label-dir", args.label_dir)]
        check_output_file(args.json, "--json", [(o, p) for o, p in inputs if p], args.overwrite)
    results = evaluate_checkpoint(args)
    print(f"{results['images']} images from {args.data} ({results['backend']})")
    print(f"{ORIGINAL_METRIC}: {results['fixed']['mAP']:.4f}")
    print(f"VOC mAP (score > {args.conf_threshold}, per-class NMS at {args.nms_iou}):")
    print(format_report(results["voc"]))
    if args.json:
        summary = {"images": results["images"], "mAP": finite(results["voc"]["mAP"]),
                   "AP": results["voc"]["AP"], "fixed_threshold_mAP": finite(results["fixed"]["mAP"]),
                   "interp": results["voc"]["interp"], "iou": args.iou}
        try:
            runs.write_json(Path(args.json), summary)
        except OSError as err:
            raise UserError(f"--json {args.json}: cannot write it ({err.strerror})") from None


def finite(x: float):
    """NaN (no class has ground truth) is not valid JSON: write null."""
    return None if math.isnan(x) else x


if __name__ == "__main__":
    run_cli(main)
