"""Detection over a dataset: the model's boxes for every image in pixels of the
original image, and the ground truth and detections as the evaluator's tables.

train.py's validation (detection_evaluator), test.py, detect_txt.py and detect.py all
predict through here, so they score the same boxes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader

from distributed import Dist, amp_dtype, unwrap
from evaluate import evaluate_detections
from utils import decode_predictions


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
    results, position = {}, 0
    for images, _ in loader:
        with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
            out = bare(images.to(dist.device, non_blocking=True))
        dets = decode_predictions(out, bare.S, bare.B, bare.C, conf_threshold, nms_iou)
        batch = indices[position:position + len(dets)]
        sizes = [(ann["width"], ann["height"]) for ann in map(dataset.annotation, batch)]
        results.update(zip(batch, scale_to_pixels(dets, sizes)))
        position += len(dets)
    bare.train(was_training)
    if dist.distributed:
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
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
