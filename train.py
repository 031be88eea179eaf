"""Train YOLOv1 (or Fast YOLO) on Pascal VOC, in either layout dataset.py reads.

    python train.py                              # quick CPU demonstration on data/ (minutes)
    python train.py --recipe paper --data VOCdevkit --split 2007/trainval+2012/trainval \
        --val-data VOCdevkit --val-split 2007/val --backbone runs/darknet/exp/best.pt
    torchrun --nproc_per_node=4 train.py --recipe paper ...   # DistributedDataParallel

Every setting is an argument (``--help``); ``--recipe`` fills in a whole set of defaults:
``paper`` (Section 2.2: SGD, momentum 0.9, weight decay 5e-4, batch 64, 135 epochs,
warm-up 1e-3 -> 1e-2 then 1e-2 / 1e-3 / 1e-4 for 75 / 30 / 30 epochs, dropout 0.5,
augmentation; and --grad-clip 10, which Darknet's bounded update makes unnecessary there),
``darknet`` (Darknet's cfg/yolov1.cfg: its network, steps schedule and update; docs/darknet.md),
``original`` (the original project: Adam, lr 2e-5) and ``demo`` (a tiny network on the bundled
sample; what runs with no arguments at all).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import argtypes
import distributed
import engine
import predict
import resume_policy
import runs
from dataset import VOCSource, build_voc_dataset
from encoded_images import decode_batch, decode_on_device
from loss import DarknetUpdate, YoloLoss
from darknet_model import to_channels_last
from model import MODEL_NAMES, build_model, load_backbone
from plots import TensorBoardLogger, require
from transforms import to_float_images
from utils import UserError, decode_predictions, load_checkpoint, run_cli

RECIPES = {
    # Section 2.2's rates were used in Darknet, which back-propagates half the gradient of
    # equation 3 and clamps each output's delta to [-1, 1] (loss.py). With the exact gradient
    # the randomly initialised fully connected layers are stable only below lr ~1e-4 (largest
    # Hessian eigenvalue ~4e4 at init), so lr 1e-2 diverges within a few steps, with or
    # without --backbone; clipping the gradient norm at 10 bounds each step as Darknet does.
    "paper": {"grad_clip": 10.0},
    # The original project keeps the first object of a shared cell (its dataset's label loop).
    "original": {"optimizer": "adam", "lr": 2e-5, "weight_decay": 0.0, "schedule": "constant",
                 "warmup_epochs": 0.0, "batch_size": 16, "hidden": 496, "cell_winner": "first"},
    # Darknet's cfg/yolov1.cfg, the run behind the released yolov1.weights: its [net] section's
    # learning_rate, policy=steps (the first three steps are its warm-up), momentum, decay and
    # max_batches at batch 64, its network, Darknet's update (loss.DarknetUpdate) instead of the
    # gradient-norm clip, flips, its hue .1 and the shuffled cell winner (docs/darknet.md).
    # jitter .2 and exposure / saturation 1.5 are YoloAugment's defaults.
    "darknet": {"model": "yolov1-darknet", "optimizer": "sgd", "lr": 5e-4, "momentum": 0.9,
                "weight_decay": 5e-4, "batch_size": 64, "schedule": "steps", "warmup_epochs": 0.0,
                "lr_steps": [200, 400, 600, 20000, 30000], "lr_scales": [2.5, 2.0, 2.0, 0.1, 0.1],
                "max_batches": 40000, "epochs": None, "update": "darknet", "grad_clip": 0.0, "flip": True,
                "hue": 0.1, "cell_winner": "random"},
    # A quarter-width Fast YOLO at S = 2 (128-pixel input) on data/shapes/ (one large cross
    # or rectangle per image): about 200 times cheaper than the full YOLOv1, which trains at
    # about 0.25 images/s on a 2-core CPU, and it learns that data in a minute or two.
    # Its classes are named in data/shapes/names.txt, as --names names a user's own classes.
    "demo": {"data": "data/shapes/train.csv", "val_data": "data/shapes/val.csv",
             "names": "data/shapes/names.txt", "model": "fast",
             "width": 0.25, "S": 2, "epochs": 20, "batch_size": 16, "lr": 3e-3, "optimizer": "adam",
             "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 1.0, "eval_every": 5,
             "no_augment": True, "cell_winner": "first", "workers": 2, "name": "demo"},
}


DEMO_NOTE = ("Quick demonstration: a quarter-width Fast YOLO (S=2, 128x128 input) trained for 20 "
             "epochs on the bundled data/shapes/ sample (best.pt on its val.csv), a few minutes on "
             "a CPU. The full YOLOv1 trains at about 0.25 images/s on a 2-core CPU; see docs/training.md "
             "for the paper's run.")


def demo_banner(args) -> str:
    """DEMO_NOTE when the run is the demonstration it describes; otherwise a line naming
    the demo recipe's values that the command overrides (the note would not be true)."""
    # what changes the run's result (resume_policy: workers, the run's name... do not)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in RECIPES["demo"].items()
               if getattr(args, k) != v and resume_policy.decision(k) == resume_policy.MATCH]
    if not changed:
        return DEMO_NOTE
    return f"The demo recipe with {', '.join(changed)} instead of its own values."


def build_parser() -> argparse.ArgumentParser:
    p = argtypes.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=tuple(RECIPES), default="paper",
                   help="a set of defaults: paper, darknet, original or demo (default %(default)s; "
                        "no arguments at all runs the demo)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="data/100examples.csv",
                   help="training data: a csv of image,label pairs or a VOCdevkit folder")
    d.add_argument("--img-dir", help="images folder of the csv layout (default: images/ beside the csv)")
    d.add_argument("--label-dir", help="labels folder of the csv layout (default: labels/ beside the csv)")
    d.add_argument("--split", default="2007/trainval+2012/trainval",
                   help="VOCdevkit year/split list joined by + (default %(default)s)")
    d.add_argument("--val-data", help="validation data (csv or VOCdevkit) that picks best.pt; "
                                      "never the test set")
    d.add_argument("--val-split", default="2007/val", help="VOCdevkit validation split")
    d.add_argument("--names", help="class names file, one per line (default: the 20 VOC classes)")
    d.add_argument("--no-augment", action="store_true", help="turn off the paper's augmentation")
    d.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="flip half the training images horizontally (Darknet's load_data_region; the "
                        "paper does not mention it; default on, as in the run behind its numbers)")
    d.add_argument("--hue", type=argtypes.fraction(0, 0.5), default=0.0,
                   help="shift each training image's hue by up to this fraction of the colour circle "
                        "(Darknet's hue=; the paper does not mention it; default 0, the darknet recipe .1)")
    d.add_argument("--cell-winner", choices=("random", "first"), default="random",
                   help="which object a cell learns when several centres share it: random (Darknet "
                        "shuffles each image's boxes each time it loads it; seeded by seed, epoch and "
                        "image, so --resume stays exact; default) or first in the label file")
    d.add_argument("--decode", choices=("auto", "device", "host"), default="auto",
                   help="where training JPEGs are decoded and augmented: on the training device, a "
                        "batch at a time (nvJPEG on a GPU, then crop, resize and flip there), or in "
                        "the --workers processes; auto: device on a GPU, host on the CPU (the same "
                        "random draws either way: encoded_images.py)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=tuple(MODEL_NAMES), default="yolov1",
                   help="the network (default %(default)s)")
    m.add_argument("--S", type=argtypes.positive_int, default=7, help="grid size; the input is 64*S pixels (paper: 7)")
    # B, hidden, width, dropout and batch norm default to None: only what the user (or the
    # recipe) gives overrides the network's own settings in model.MODELS (yolov1-darknet:
    # B = 3, a locally connected layer and no hidden layer).
    m.add_argument("--B", type=argtypes.positive_int, default=None,
                   help="boxes per cell (default: the model's; paper: 2)")
    m.add_argument("--hidden", type=argtypes.positive_int, default=None,
                   help="hidden fully connected units (default: the model's; paper: 4096)")
    m.add_argument("--width", type=argtypes.positive_float, default=None, help="filter multiplier for small networks")
    m.add_argument("--dropout", type=argtypes.fraction(0, 1, hi_open=True), default=None,
                   help="default: the model's (paper: 0.5)")
    m.add_argument("--no-batch-norm", action="store_true", default=None, help="the paper's network exactly")
    m.add_argument("--backbone", help="Darknet pretraining checkpoint for the first 20 convolutions")
    m.add_argument("--lambda-coord", type=argtypes.nonneg_float, default=5.0, help="paper: 5")
    m.add_argument("--lambda-noobj", type=argtypes.nonneg_float, default=0.5, help="paper: 0.5")
    m.add_argument("--update", choices=("exact", "darknet"), default="exact",
                   help="exact: equation 3's gradient (default); darknet: Darknet's update, half "
                        "that gradient clamped to [-1, 1] per image and output (loss.DarknetUpdate; "
                        "the darknet recipe)")
    m.add_argument("--no-rescore", action="store_true",
                   help="confidence target 1 instead of the IoU (the popular tutorial)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=argtypes.positive_int, default=5, help="validate every N epochs (and the last)")
    e.add_argument("--conf-threshold", type=argtypes.fraction(0, 1, hi_open=True), default=0.005,  # score > it
                   help="for the VOC mAP")
    e.add_argument("--nms-iou", type=argtypes.fraction(0, 1), default=0.5, help="per-class NMS IoU")
    e.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard in <run>/tensorboard: the metrics and, with "
                        "--val-data, boxes on the first 8 validation images (pip install tensorboard)")
    p.add_argument("--max-batches", type=argtypes.nonneg_int, default=0,
                   help="without --epochs (the darknet recipe): train for this many optimiser steps, "
                        "rounded up to whole epochs (Darknet's max_batches)")
    engine.add_training_args(p, epochs=135, batch_size=64, lr=1e-2, schedule="step",
                             warmup_epochs=2.0, project="runs/train")
    return p


def parse_args(argv):
    """Parse twice: the recipe's values replace the defaults, explicit arguments win."""
    parser = build_parser()
    if not argv:
        argv = ["--recipe", "demo"]
    recipe = parser.parse_known_args(argv)[0].recipe
    parser.set_defaults(**RECIPES[recipe])
    runs.resume_defaults(parser, argv)  # --resume RUN alone: the run's own arguments
    return parser.parse_args(argv)


def model_options(args, num_classes: int) -> dict:
    """build_model's options: S and C always, the others only where given (None: the
    registry entry's own default, model.MODELS)."""
    given = {"B": args.B, "hidden": args.hidden, "width": args.width, "dropout": args.dropout,
             "batch_norm": False if args.no_batch_norm else None}
    return {"S": args.S, "C": num_classes} | {k: v for k, v in given.items() if v is not None}


def record_model_options(args, model) -> None:
    """The network's own values for the model options left to it (None), so that
    config.json records what was built and a resume compares what was built: no --B and
    ``--B 2`` are the same YOLOv1 run (a resume with the default spelled out was refused)."""
    config = model.config
    for name in ("B", "hidden", "width", "dropout"):
        if getattr(args, name) is None and name in config:
            setattr(args, name, config[name])
    if args.no_batch_norm is None:
        args.no_batch_norm = not config["batch_norm"]


def make_model(args, num_classes: int, dist: distributed.Dist):
    model = build_model(args.model, **model_options(args, num_classes))
    record_model_options(args, model)
    if args.backbone:
        load_backbone(model, load_checkpoint(args.backbone), args.backbone)
    model = model.to(dist.device)
    if args.channels_last:
        model = to_channels_last(model)
    engine.compile_model(model, args)
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


def yolo_step(loss_fn, channels_last: bool, img_size: int):
    """The per-batch step for engine.train_one_epoch: loss and its four components.

    The loader's batches are uint8 images (or, with --decode device, a list of
    images.EncodedImage to decode and augment here), targets and photometric factors: the
    images become float, with their exposure and saturation scaled, on the training device."""
    memory_format = torch.channels_last if channels_last else torch.preserve_format

    def step(model, batch, device):
        images, targets, factors = batch
        if isinstance(images, list):
            images = decode_batch(images, img_size, device)
        images = to_float_images(images, factors, device, memory_format)
        targets = targets.to(device, non_blocking=True)
        loss, parts = loss_fn(model(images), targets, components=True)
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}, len(images)
    return step


def tensorboard_callback(logger, val_set, args):
    """``on_epoch_end`` for engine.fit: the epoch's row, and the boxes (score > 0.2) that
    the model finds on the first 8 validation images, drawn."""
    images = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))]) if val_set else None

    @torch.no_grad()
    def on_epoch_end(row, model):
        logger.log_scalars(row, row["epoch"])
        if images is None:
            return
        bare = distributed.unwrap(model)
        was_training = bare.training
        out = bare.eval()(images.to(next(bare.parameters()).device))
        bare.train(was_training)
        dets = decode_predictions(out, bare.S, bare.B, bare.C, 0.2, args.nms_iou)
        logger.log_images(images, dets, val_set.class_names, row["epoch"])
    return on_epoch_end


def build_datasets(args, device: torch.device):
    """``(training set, validation set or None)`` at the network's input side."""
    # 64 * S is the model's input_size (model.GridDetector); the model itself is built
    # once the data has named the classes.
    size = 64 * args.S
    train_set = build_voc_dataset(VOCSource.of(args), args.names, S=args.S, img_size=size,
                                  train=not args.no_augment, uint8=True)
    train_set.encoded = decode_on_device(args.decode, device)
    train_set.shuffle_boxes = args.cell_winner == "random"
    if train_set.augment is not None:
        train_set.augment.flip = 0.5 if args.flip else 0.0
        train_set.augment.hue = args.hue
    val_set = (build_voc_dataset(VOCSource(args.val_data, split=args.val_split), args.names,
                                 S=args.S, img_size=size) if args.val_data else None)
    return train_set, val_set


def epochs_from_max_batches(args, n_images: int, dist: distributed.Dist) -> None:
    """The darknet recipe gives max_batches, not epochs: --max-batches optimiser steps
    become whole epochs (the loop, its checkpoints and --resume count in epochs)."""
    if args.epochs is not None:
        if args.max_batches > 0 and dist.is_main:
            print(f"warning: --max-batches ignored: --epochs {args.epochs} decides", file=sys.stderr)
        return
    if args.max_batches <= 0:
        raise UserError(f"--max-batches must be positive without --epochs, got {args.max_batches}")
    args.epochs = math.ceil(args.max_batches / math.ceil(n_images / args.batch_size))


def tensorboard_logger(state: engine.TrainState, val_set):
    """``(logger, on_epoch_end)`` with --tensorboard on rank 0, else ``(None, None)``."""
    if not (state.args.tensorboard and state.dist.is_main):
        return None, None
    # purge_step: on resume TensorBoard drops the events of epochs the checkpoint lacks.
    start = state.resume["epoch"] if state.resume else 0
    logger = TensorBoardLogger(state.run_dir, purge_step=start + 1)
    return logger, tensorboard_callback(logger, val_set, state.args)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.tensorboard:  # before the run folder exists: a missing package leaves nothing behind
        require("tensorboard", "tensorboard", "--tensorboard")
    dist = distributed.setup_distributed(args.device)
    if args.recipe == "demo" and dist.is_main:
        print(demo_banner(args), flush=True)
    runs.seed_everything(args.seed)
    train_set, val_set = build_datasets(args, dist.device)
    epochs_from_max_batches(args, len(train_set), dist)
    names = list(train_set.class_names)
    # The model (and --backbone) before the run folder: a bad backbone writes nothing.
    model = make_model(args, len(names), dist)
    state = engine.start_training(model, train_set, args, dist, "yolo", extra={"class_names": names})
    loss_fn = YoloLoss(args.S, distributed.unwrap(model).B, len(names), args.lambda_coord, args.lambda_noobj,
                       rescore=not args.no_rescore)
    if args.update == "darknet":
        loss_fn = DarknetUpdate(loss_fn)
    evaluate_fn = predict.detection_evaluator(val_set, args, dist) if val_set else None
    logger, on_epoch_end = tensorboard_logger(state, val_set)
    best = engine.fit(state, yolo_step(loss_fn, args.channels_last, train_set.img_size), evaluate_fn, "mAP", on_epoch_end)
    if logger is not None:
        logger.close()
    if dist.is_main:
        print(f"done: best validation mAP {best:.4f}; checkpoints in {state.run_dir}" if val_set else
              f"done: no validation data (--val-data), so no best.pt: last.pt in {state.run_dir}")
    distributed.cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
