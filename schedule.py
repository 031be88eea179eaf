"""The optimiser and its learning-rate schedule, for every training script (engine.py).

SGD with momentum and weight decay on the weights alone (the paper, Darknet), or Adam (the
original project); the rate per optimiser step: a linear warm-up, then the paper's steps at
epochs 75 and 105, cosine, poly (Darknet's ImageNet pretraining) or Darknet's ``policy=steps``
counted in iterations (cfg/yolov1.cfg).
"""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (paper), or Adam (the original project's setting).

    Weight decay applies to weights only, not to biases and batch-norm parameters (as
    Darknet's update_*_layer functions decay ``l.weights`` alone).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # a locally connected layer's bias has a dimension per position
            (decay if p.dim() > 1 and not name.endswith("bias") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def lr_factor(epoch: float, args, step: int = 0) -> float:
    """Learning rate at fractional ``epoch`` (optimiser ``step``) as a fraction of ``--lr``.

    The paper raises the rate from 1e-3 to 1e-2 over the first epochs, then holds 1e-2
    for 75 epochs, 1e-3 for 30 and 1e-4 for 30: 'step' with milestones 75, 105 and
    warm-up from 0.1. Darknet's ImageNet pretraining uses 'poly' (power 4); its
    cfg/yolov1.cfg uses 'steps' (:func:`steps_factor`), counted in iterations.
    """
    if args.schedule == "steps" and epoch >= args.warmup_epochs:
        return steps_factor(step, args.lr_steps, args.lr_scales)
    if epoch < args.warmup_epochs:
        t = epoch / args.warmup_epochs
        return args.warmup_factor + (1.0 - args.warmup_factor) * t
    progress = min(1.0, (epoch - args.warmup_epochs) / max(1e-9, args.epochs - args.warmup_epochs))
    if args.schedule == "step":
        return args.gamma ** sum(epoch >= m for m in args.milestones)
    if args.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if args.schedule == "poly":
        return (1.0 - progress) ** args.poly_power
    return 1.0


def steps_factor(step: int, steps: list[int], scales: list[float]) -> float:
    """Darknet's ``policy=steps`` (get_current_rate, network.c): the product of the scales
    whose step the batch number has reached. Darknet counts the images of an update before
    making it (train_network_datum adds to ``seen`` first), so optimiser step ``step``
    (0-based) runs at batch number ``step + 1``: with steps=200 the 200th update (step 199)
    is the first at the new rate."""
    factor = 1.0
    for at, scale in zip(steps, scales):
        if at > step + 1:
            break
        factor *= scale
    return factor


def build_scheduler(optimizer, args, steps_per_epoch: int):
    """A per-step LambdaLR following :func:`lr_factor` (the rate changes every step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step / steps_per_epoch, args, step))
