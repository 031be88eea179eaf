"""Pretrain the Darknet backbone on ImageNet: one GPU, or the CPU.

    python darknet_train.py --width 0.125 --img-size 96 --batch-size 16 --epochs 10
                                   # a one-minute CPU run on the bundled sample (data/imagenet)
    python darknet_train.py --train-dir /data/imagenet/train --val-dir /data/imagenet/val \\
        --val-labels /data/imagenet/LOC_val_solution.csv --workers 8
    python train.py --backbone runs/darknet/exp/best.pt ...   # then YOLOv1 on VOC

One process trains on one device, the model as it is. darknet_train_multigpu.py
(nn.DataParallel) and darknet_train_multigpu_distr.py (DistributedDataParallel under
torchrun) train the same network with the same arguments and checkpoints: what the
three share is in classification.py, so each differs from this script only in main()
(``diff darknet_train.py darknet_train_multigpu_distr.py``).
"""
from __future__ import annotations

import distributed
from classification import build_datasets, build_model, parse_args, train
from utils import run_cli


def main(argv=None):
    args = parse_args(argv, __doc__)
    dist = distributed.Dist(device=distributed.resolve_device(args.device))  # one process, one device
    train_set, val_set = build_datasets(args)
    model = build_model(args, len(train_set.classes), dist.device)
    # No wrapping: the model and the data loader stay as they are.
    train(args, dist, model, train_set, val_set)


if __name__ == "__main__":
    run_cli(main)
