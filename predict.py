"""Running a trained detector: the arguments every inference script takes, the model's
boxes for a batch of images or a whole dataset in pixels of the original images, and
the ground truth and detections as the evaluator's tables.

train.py's validation (detection_evaluator, the training model as it is), test.py and
detect_txt.py (predict_files: an inference.Runner fed by encoded_images.py) and detect.py
(predict_images) all decode and scale boxes through here, so they score the same boxes.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

import argtypes
import inference
from distributed import Dist, amp_dtype, gather_results, resolve_device, unwrap
from encoded_images import EncodedImages, decode_batch, decode_on_device
from evaluate import evaluate_detections
from utils import UserError, decode_predictions


# --------------------------------------------------------------------------- the scripts' arguments
def add_inference_args(parser: argparse.ArgumentParser, *, conf_threshold: float, conf_help: str,
                       batch_size: int) -> None:
    """The arguments of every script that runs a trained detector (test.py, detect_txt.py,
    detect.py); each passes its own default score threshold and batch size."""
    parser.add_argument("checkpoint", help="a train.py checkpoint (best.pt or last.pt), or an ONNX file "
                                           "from export.py --raw (run by onnxruntime)")
    # [0, 1): boxes are kept when score > threshold and scores are at most 1, so 1 kept nothing (mAP 0)
    parser.add_argument("--conf-threshold", type=argtypes.fraction(0, 1, hi_open=True), default=conf_threshold,
                        help=f"{conf_help} (default %(default)s)")
    parser.add_argument("--nms-iou", type=argtypes.fraction(0, 1), default=0.5,
                        help="per-class non-maximum suppression IoU (default %(default)s)")
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=batch_size,
                        help="images per forward pass (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    (_, small), (_, large) = inference.AUTO_ONNX_MIN_IMAGES
    parser.add_argument("--backend", choices=inference.BACKENDS, default="auto",
                        help="how the network runs. auto (default): on the CPU, a job of enough images "
                             f"(at least {small} for Fast YOLO, {large} for YOLOv1; a video or a stream) runs the network "
                             "exported in-process under onnxruntime, checked against PyTorch on the first "
                             "batch, else PyTorch; on a GPU, PyTorch. torch: PyTorch (batch norm folded + "
                             "channels_last); onnx: onnxruntime whatever the job; compile: as --compile")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (CPU: 20-40 s of start-up the first time; GPU: CUDA graphs)")
    parser.add_argument("--half", action="store_true", help="float16 on a GPU")


def add_dataset_args(parser: argparse.ArgumentParser, data_help: str) -> None:
    """The labelled data that test.py and detect_txt.py run the detector on."""
    parser.add_argument("--data", default="data/test.csv", help=data_help)
    parser.add_argument("--img-dir", help="images folder of the csv layout (default: images/ beside it)")
    parser.add_argument("--label-dir", help="labels folder of the csv layout (default: labels/ beside it)")
    parser.add_argument("--split", default="2007/test", help="VOCdevkit year/split (default %(default)s)")
    parser.add_argument("--workers", type=argtypes.nonneg_int,
                        help="image-reading processes (default: 8 on a GPU, or the cores if fewer; none on the CPU)")
    parser.add_argument("--decode", choices=("auto", "device", "host"), default="auto",
                        help="where JPEGs are decoded and resized: on the network's device, a batch at a "
                             "time (nvJPEG on a GPU), or by the reading processes; auto: device on a GPU, "
                             "host on the CPU (encoded_images.py)")


def check_inference_args(args) -> None:
    """--nms-iou in [0, 1], --conf-threshold in [0, 1) (score > threshold: 1 keeps nothing),
    counts (--batch-size, and --max-det where there is one) at least 1."""
    for name, high_open in (("conf_threshold", True), ("nms_iou", False)):
        value = getattr(args, name)
        if not (0 <= value < 1 if high_open else 0 <= value <= 1):
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1{')' if high_open else ']'}, got {value}")
    for name in ("max_det", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def open_runner(args) -> inference.Runner:
    """--checkpoint (a train.py checkpoint, or an ONNX file from ``export.py --raw``) on
    --device with --backend, --compile and --half; :func:`for_job` then picks the fastest
    correct path for the job under ``--backend auto``."""
    choice = getattr(args, "backend", "auto")
    if args.compile and choice not in ("auto", "compile"):
        raise UserError(f"--compile and --backend {choice} contradict each other (--compile is --backend compile)")
    if args.half and choice == "onnx":
        raise UserError("--half and --backend onnx contradict each other: float16 runs under PyTorch")
    if str(args.checkpoint).lower().endswith(".onnx") and choice in ("torch", "compile"):
        raise UserError(f"--backend {choice}: {args.checkpoint} is an ONNX file, run by onnxruntime")
    backend = inference.Backend(compile=args.compile or choice == "compile",
                                dtype=torch.float16 if args.half else torch.float32)
    return inference.load(args.checkpoint, resolve_device(args.device), backend)


def for_job(runner: inference.Runner, images: float, args) -> inference.Runner:
    """The runner for a job of ``images`` images (``math.inf``: a video or a stream) under
    --backend (inference.for_job: onnxruntime on the CPU when the job repays its start-up)."""
    return inference.for_job(runner, images, getattr(args, "backend", "auto"))


def check_box_file_names(names, checkpoint) -> None:
    """The class names of a model whose boxes go to text files (detect.py --save-txt,
    detect_txt.py): one token each, distinct. Those files separate fields with spaces,
    so a name with a space ("potted plant"), an empty name or two equal names made files
    that evaluate.py misreads or refuses. A checkpoint made elsewhere, or an ONNX file's
    metadata, is not held to dataset.load_class_names' rule: this holds it there."""
    seen = set()
    for index, name in enumerate(names):
        if len(name.split()) != 1 or name != name.strip():
            raise UserError(f"{checkpoint}: class {index} {name!r} is not one word: box files separate "
                            "their fields with spaces (detect.py --save-json keeps any name)")
        if name in seen:
            raise UserError(f"{checkpoint}: class name {name!r} appears twice: box files name classes, "
                            "so both would be one class (detect.py --save-json keeps the class ids)")
        seen.add(name)


# --------------------------------------------------------------------------- detection evaluation
@torch.no_grad()
def predict_dataset(model, dataset, batch_size: int, dist: Dist, conf_threshold: float,
                    nms_iou: float, dtype=None, workers: int = 0) -> dict[int, "np.ndarray"]:
    """Detections for every image of ``dataset``: index -> ``(M, 6)`` array of
    ``class, score, x1, y1, x2, y2`` in absolute pixels of the original image.

    Under DDP each rank predicts every world_size-th image and the results are gathered,
    so every rank returns the whole dictionary (and computes the same metrics).
    """
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                        num_workers=workers, pin_memory=dist.device.type == "cuda")

    def shard():
        results, position = {}, 0
        for images, _ in loader:
            with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
                out = bare(images.to(dist.device, non_blocking=True))
            # check_finite=False: validation scores what the model gives; the training loop
            # checks its losses (and stops or skips a non-finite step) itself
            dets = decode_predictions(out, bare.S, bare.B, bare.C, conf_threshold, nms_iou, check_finite=False)
            batch = indices[position:position + len(dets)]
            sizes = [(ann["width"], ann["height"]) for ann in map(dataset.annotation, batch)]
            results.update(zip(batch, scale_to_pixels(dets, sizes)))
            position += len(dets)
        return results
    try:  # gather_results: a bad image in any rank's shard is raised on every rank (no hang)
        return {k: v for part in gather_results(shard, dist) for k, v in part.items()}
    finally:
        bare.train(was_training)


@torch.no_grad()
def predict_files(runner: inference.Runner, paths, args, keep_outputs: bool = False):
    """test.py's and detect_txt.py's pass over a dataset's images: ``(detections, outputs)``,
    detections as :func:`predict_dataset` gives them (index -> ``(M, 6)`` array in pixels of
    the original image), outputs the raw network outputs ``(N, S*S*(C+5B))`` on the host
    (with ``keep_outputs``, for the original project's metric) or None.

    ``args``: --batch-size, --workers, --decode, --conf-threshold and --nms-iou. Images are
    read by encoded_images.py: on a GPU the JPEGs are decoded there, a batch per call.
    """
    device = runner.input_device or runner.device
    on_device = decode_on_device(args.decode, device)
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    loader = DataLoader(EncodedImages(paths, runner.input_size, on_device), batch_size=args.batch_size,
                        num_workers=workers, collate_fn=list)
    results, outputs = {}, []
    for items in tqdm(loader, desc="detect", unit="batch", leave=False, disable=len(loader) < 2):
        images = decode_batch(items, runner.input_size, device)
        out = runner(F.to_dtype(images, torch.float32, scale=True))
        with inference.intra_op_threads(1):  # small per-box operations: see intra_op_threads
            dets = decode_predictions(out, runner.S, runner.B, runner.C, args.conf_threshold, args.nms_iou)
        results.update(zip([item.index for item in items], scale_to_pixels(dets, [item.size for item in items])))
        if keep_outputs:
            outputs.append(out.cpu())
    return results, (torch.cat(outputs) if outputs else None)


@torch.no_grad()
@inference.intra_op_threads(1)  # resize, NMS: faster on one thread; an inference.Runner keeps its own
def predict_images(model, images: list[torch.Tensor], args) -> list[torch.Tensor]:
    """Detections ``(M, 6)``: ``class, score, x1, y1, x2, y2`` in pixels of each uint8 image
    (detect.py; ``args``: its --conf-threshold, --nms-iou and --max-det).

    Images are squashed to the network's square input the way dataset.py feeds it in
    training and evaluation: an antialiased resize of the uint8 pixels, then [0, 1] floats.
    """
    size = [model.input_size, model.input_size]
    batch = torch.stack([F.resize(image, size, antialias=True) for image in images])
    # a module, or an inference.Runner (which moves the batch to its own device)
    device = getattr(model, "device", None) or next(model.parameters()).device
    batch = F.to_dtype(batch, torch.float32, scale=True).to(device)
    out = model(batch)
    dets = decode_predictions(out, model.S, model.B, model.C, args.conf_threshold, args.nms_iou,
                              args.max_det)
    results = []
    for image, d in zip(images, dets):
        d = d.cpu()
        d[:, 2:] *= torch.tensor([image.shape[2], image.shape[1]] * 2, dtype=d.dtype)
        results.append(d)
    return results


def scale_to_pixels(dets: list[torch.Tensor], sizes) -> list["np.ndarray"]:
    """Image-relative detections (``decode_predictions``) -> arrays in pixels of each image.

    ``sizes``: ``(width, height)`` per image. One copy to the host and one multiply for the
    whole batch, rather than one of each per image.
    """
    counts = [len(d) for d in dets]
    flat = torch.cat(dets).cpu().numpy() if dets else np.zeros((0, 6), np.float32)
    flat[:, 2:] *= np.repeat(np.tile(np.asarray(sizes).reshape(-1, 2), 2), counts, axis=0)
    ends = np.cumsum(counts).tolist()
    return [flat[start:end] for start, end in zip([0] + ends[:-1], ends)]


def ground_truth_table(dataset, class_names) -> dict:
    """All ground-truth boxes of ``dataset`` in the evaluator's table form (absolute pixels)."""
    images, classes, boxes, difficult = [], [], [], []
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        k = len(ann["labels"])
        images += [i] * k
        classes += [class_names[int(c)] for c in ann["labels"]]
        boxes.append(np.asarray(ann["boxes"], dtype=np.float64).reshape(k, 4))
        difficult.append(np.asarray(ann.get("difficult", np.zeros(k)), dtype=bool).reshape(k))
    return {"image": np.asarray(images, dtype=np.int64), "cls": np.asarray(classes, dtype=object),
            "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4)),
            "difficult": np.concatenate(difficult) if difficult else np.zeros(0, bool)}


def detection_table(dets: dict, class_names, min_score: float = 0.0) -> dict:
    """Detections from :func:`predict_dataset` in the evaluator's table form."""
    images = sorted(dets)
    if not images:
        return {"image": np.zeros(0, np.int64), "cls": np.zeros(0, object),
                "score": np.zeros(0), "boxes": np.zeros((0, 4))}
    arr = np.concatenate([dets[i] for i in images])
    image = np.repeat(np.asarray(images, np.int64), [len(dets[i]) for i in images])
    keep = arr[:, 1] >= min_score
    arr, image = arr[keep], image[keep]
    names = np.asarray(class_names, dtype=object)
    return {"image": image, "cls": names[arr[:, 0].astype(int)], "score": arr[:, 1], "boxes": arr[:, 2:6]}


def detection_evaluator(dataset, args, dist: Dist):
    """``evaluate_fn`` for ``engine.fit``: VOC mAP (all-point, IoU 0.5) on ``dataset`` every
    ``args.eval_every`` epochs and after the last one."""
    gt = ground_truth_table(dataset, dataset.class_names)

    def evaluate_fn(model, epoch):
        if (epoch + 1) % max(1, args.eval_every) and epoch + 1 != args.epochs:
            return None
        dets = predict_dataset(model, dataset, max(1, args.batch_size // dist.world_size), dist,
                               args.conf_threshold, args.nms_iou, amp_dtype(args, dist.device))
        result = evaluate_detections(gt, detection_table(dets, dataset.class_names))
        return {"mAP": result["mAP"]}
    return evaluate_fn
