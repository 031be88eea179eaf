"""ImageNet classification of the Darknet backbone: what the three pretraining scripts
share. darknet_train.py (one device), darknet_train_multigpu.py (nn.DataParallel) and
darknet_train_multigpu_distr.py (DistributedDataParallel under torchrun) take these
arguments, data, model, per-batch step, validation and ``train``; each script is only
its main(), which sets up its device(s) and wraps the model. RECIPE, at the end of each
script's --help, says what the network and its defaults are.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import argtypes
import distributed
import engine
import runs
from darknet_model import Darknet, to_channels_last
from imagenet import build_imagenet, imagenet_transform
from transforms import to_float_images
from utils import UserError

KIND = "darknet"  # checkpoint kind: resuming another kind of checkpoint is refused

RECIPE = """\
The network is the paper's first 20 convolutions (Figure 3), average pooling and a
fully connected layer to the classes, trained at 224 x 224 (Section 2.2); YOLOv1 then
loads the convolutions (model.load_backbone). Top-1 and top-5 accuracy on the
validation set are logged every epoch; best.pt is the epoch with the best top-1.

Defaults follow Darknet, as the paper gives no recipe beyond "about a week": 50 epochs
of batch 128 (extraction.cfg, the released cfg of this very network, runs 500000
batches of 128 images: 50 passes over ImageNet's 1.28 M), SGD with momentum 0.9 and
weight decay 5e-4, and the rate of Darknet's batch-normalised classifiers: 0.1 with
polynomial decay of power 4 (darknet19.cfg, YOLO9000 Section 3) after a warm-up of 0.1
epoch (its burn_in=1000 batches). extraction.cfg, without batch norm, used 0.5 and power 6.

Run folders: runs/darknet/exp, exp2, ... hold config.json, metrics.jsonl, last.pt and
best.pt. --resume RUN continues a run exactly; --auto-resume continues --name's run if
it has a last.pt, so the same command can simply be started again after a crash or a
preemption.
"""


# --------------------------------------------------------------------------- arguments
def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The one parser of the three scripts; each passes its own docstring for --help."""
    p = argtypes.ArgumentParser(description=description, epilog=RECIPE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (ImageNet 2012 layout)")
    d.add_argument("--train-dir", default="data/imagenet/train",
                   help="class folders <wnid>/*.JPEG, or the ImageNet root holding train/ (default "
                        "%(default)s); class ids follow the sorted folder names")
    d.add_argument("--val-dir", help="validation images: class folders, or flat ILSVRC2012_val_*.JPEG "
                                     "with --val-labels (default: val/ beside the training folder)")
    d.add_argument("--val-labels", help="labels of a flat --val-dir: Kaggle's LOC_val_solution.csv or "
                                        "'image wnid' lines (default: LOC_val_solution.csv found in "
                                        "or beside --val-dir)")
    d.add_argument("--img-size", type=argtypes.at_least(32), default=224, help="training crop side (paper: 224)")
    d.add_argument("--no-augment", action="store_true",
                   help="train on the validation transform (resize + centre crop) instead of "
                        "random resized crops and flips: for debugging and exact comparisons")
    m = p.add_argument_group("model")
    m.add_argument("--width", type=argtypes.positive_float, default=1.0, help="filter multiplier (1/16 for CPU tests)")
    m.add_argument("--no-batch-norm", action="store_true",
                   help="no batch norm, as in the paper and extraction.cfg (default: batch norm "
                        "after every convolution, as in Darknet's later cfg files)")
    m.add_argument("--label-smoothing", type=argtypes.fraction(0, 1, hi_open=True), default=0.0,
                   help="cross-entropy label smoothing, e.g. 0.1 (default 0: Darknet has none)")
    engine.add_training_args(p, epochs=50, batch_size=128, lr=0.1, schedule="poly",
                             warmup_epochs=0.1, project="runs/darknet")
    return p


def parse_args(argv, description: str | None = None) -> argparse.Namespace:
    parser = build_parser(description)
    runs.resume_defaults(parser, argv)  # --resume RUN alone: the run's own arguments
    args = parser.parse_args(argv)
    if args.width <= 0:
        raise UserError(f"--width must be positive, got {args.width}")
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32 (the network downsamples by 32), "
                        f"got {args.img_size}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    return args


# --------------------------------------------------------------------------- data and model
def build_datasets(args):
    """(training set, validation set); class ids of both follow the sorted training wnids."""
    # uint8 training batches, made float on the training device (classification_step)
    train_set = build_imagenet(args.train_dir, train=True, img_size=args.img_size, uint8=True)
    if args.no_augment:
        train_set.transform = imagenet_transform(False, args.img_size, uint8=True)
    val_set = build_imagenet(args.train_dir, args.val_dir, args.val_labels, train=False,
                             img_size=args.img_size)
    return train_set, val_set


def build_model(args, num_classes: int, device: torch.device) -> Darknet:
    """The Darknet classifier on ``device``, initialised from --seed (the same on every rank)."""
    runs.seed_everything(args.seed)
    model = Darknet(num_classes, batch_norm=not args.no_batch_norm, width=args.width).to(device)
    if args.channels_last:
        model = to_channels_last(model)
    return engine.compile_model(model, args)


# --------------------------------------------------------------------------- training
def classification_step(label_smoothing: float, channels_last: bool):
    """The per-batch step for engine.train_one_epoch: cross-entropy and training top-1."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    memory_format = torch.channels_last if channels_last else torch.preserve_format

    def step(model, batch, device):
        images, labels = batch
        images = to_float_images(images, None, device, memory_format)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        loss = loss_fn(logits.float(), labels)
        top1 = in_top_k(logits.detach(), labels, 1).float().mean() * 100  # ties as in validation
        return loss, {"loss": loss.detach(), "train_top1": top1}, len(labels)
    return step


def train(args, dist: distributed.Dist, model, train_set, val_set) -> float:
    """Open the run, then the optimiser, schedule, exact resume and the epoch loop: the
    same for all three scripts.

    ``model`` may be wrapped (DataParallel, DDP); ``dist`` says whether this is one of
    several processes, in which case each reads its own shard (distributed.make_loader).
    """
    check_batch_norm_batches(args, len(train_set), dist.world_size)
    state = engine.start_training(model, train_set, args, dist, KIND)
    step = classification_step(args.label_smoothing, args.channels_last)
    evaluate = make_evaluator(val_set, args, dist, state.dtype)
    best = engine.fit(state, step, evaluate, "top1")
    if dist.is_main:
        print(f"done: best validation top-1 {best:.2f}%; checkpoints in {state.run_dir}\n"
              f"YOLOv1 from this backbone: python train.py --backbone {state.run_dir / 'best.pt'} ...", flush=True)
    return best


def check_batch_norm_batches(args, n_images: int, world_size: int) -> None:
    """Below 64 px the last convolution's map is 1 x 1, so its batch norm sees one value
    per channel and image: a micro-batch of one image (on one process) cannot be
    normalised in training. PyTorch raised that as a traceback at that batch, perhaps at the
    end of an epoch (16 images in batches of 15); it is refused before anything is written."""
    if args.no_batch_norm or args.img_size >= 64:
        return
    per_rank = -(-n_images // world_size)                      # distributed.EpochSampler's shares
    micro = max(1, args.batch_size // args.accum_steps // world_size)
    if micro == 1 or per_rank % micro == 1:
        raise UserError(f"--img-size {args.img_size} leaves batch norm a 1 x 1 map, and a micro-batch of one "
                        f"image ({n_images} images in micro-batches of {micro} per process) cannot be "
                        "normalised: use --img-size 64 or more, another --batch-size, or --no-batch-norm")


# --------------------------------------------------------------------------- validation
def in_top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per image: is the label among the k highest scores? Only if at most k scores, its
    own included, are at least its own: a tie across the k-th place is a miss. torch.topk
    orders ties arbitrarily (all-equal logits of 10 classes came out as class 8 first
    where argmax says 0), which made a collapsed network's top-1 depend on the labels'
    class ids, and training's top-1 (argmax) differ from validation's on the same logits.
    Darknet's top_k (utils.c) gives ties to the lowest index; this counts them as misses.
    A row with a NaN score is a miss. With k at least the class count, every label is a hit."""
    own = logits.gather(1, labels[:, None])
    return ((logits >= own).sum(1) <= k) & ~logits.isnan().any(1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many labels are among the k highest scores, for each k (:func:`in_top_k`)."""
    return [int(in_top_k(logits, labels, k).sum()) for k in ks]


def make_evaluator(val_set, args, dist: distributed.Dist, dtype):
    """``evaluate(model, epoch)`` for engine.fit: validation loss, top-1 and top-5 in percent.

    Each rank scores every world_size-th image (a DistributedSampler would pad the last
    batch with repeats and count them twice); the counts are summed over the ranks
    (distributed.gather_results), so every rank returns the same numbers.
    """
    shard = Subset(val_set, range(dist.rank, len(val_set), dist.world_size))
    loader = DataLoader(shard, batch_size=max(1, args.batch_size // dist.world_size),
                        num_workers=args.workers, pin_memory=dist.device.type == "cuda")
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format

    def evaluate(model, epoch):
        # The bare model under DDP: the ranks' shards differ in length, and a DDP forward
        # may communicate. DataParallel keeps its wrapper, to spread the batch over GPUs.
        distributed.sync_buffers(distributed.unwrap(model), dist)
        net = distributed.unwrap(model) if dist.distributed else model
        # gather_results: a bad image in any rank's shard is raised on every rank
        parts = distributed.gather_results(lambda: score(net, loader, dist, dtype, memory_format), dist)
        totals = {k: sum(part[k] for part in parts) for k in parts[0]}
        n = max(1.0, totals["n"])
        return {"val_loss": totals["loss"] / n, "top1": 100 * totals["top1"] / n,
                "top5": 100 * totals["top5"] / n}
    return evaluate


@torch.no_grad()
def score(net: nn.Module, loader, dist: distributed.Dist, dtype, memory_format) -> dict[str, float]:
    """Summed cross-entropy, top-1 and top-5 hits and image count over ``loader``."""
    net.eval()
    sums = {"loss": 0.0, "top1": 0, "top5": 0, "n": 0}
    for images, labels in tqdm(loader, desc="validate", disable=not dist.is_main, leave=False):
        images = images.to(dist.device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(dist.device, non_blocking=True)
        with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(images).float()
        top1, top5 = topk_correct(logits, labels)
        sums["loss"] += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        sums["top1"] += top1
        sums["top5"] += top5
        sums["n"] += len(labels)
    return sums
