"""Pretrain the Darknet backbone on ImageNet with nn.DataParallel over the visible GPUs.

    python darknet_train_multigpu.py --train-dir /data/imagenet/train --workers 16
    CUDA_VISIBLE_DEVICES=0,1 python darknet_train_multigpu.py ...   # choose the GPUs

One process drives every GPU: each step it copies the model to every GPU, splits the
batch between them, runs the copies in threads and gathers their outputs on the first
GPU, where the loss is computed. That is simple (no launcher) but slow to scale: one
Python process (one GIL) feeds all GPUs, the model is copied every step, and the first
GPU does extra work and holds extra memory. Prefer darknet_train_multigpu_distr.py
(DistributedDataParallel under torchrun), which is faster even on one machine.

With fewer than two GPUs it trains on one device, saying so. Batch norm statistics are
those of the first GPU's share of each batch (DataParallel keeps only that copy's).
Arguments, run folders and checkpoints are those of darknet_train.py.
"""
from __future__ import annotations

import torch
from torch import nn

import distributed
from classification import build_datasets, build_model, parse_args, train
from utils import UserError, run_cli


def main(argv=None):
    args = parse_args(argv, __doc__)
    dist = distributed.Dist(device=distributed.resolve_device(args.device))  # one process, every GPU
    train_set, val_set = build_datasets(args)
    model = build_model(args, len(train_set.classes), dist.device)
    gpus = torch.cuda.device_count() if dist.device.type == "cuda" else 0
    if gpus >= 2:
        if dist.device.index not in (None, 0):
            raise UserError("DataParallel runs on all visible GPUs from the first: choose them "
                            "with CUDA_VISIBLE_DEVICES, not --device cuda:N")
        model = nn.DataParallel(model)  # scatters each batch over the GPUs, gathers on cuda:0
    else:
        print(f"note: DataParallel needs two or more GPUs; {gpus} visible, so this trains on "
              f"{dist.device} alone, as darknet_train.py does", flush=True)
    train(args, dist, model, train_set, val_set)


if __name__ == "__main__":
    run_cli(main)
