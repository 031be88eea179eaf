"""Fast tests for bugs that were planted one at a time and passed the whole suite (#14).

Each test names in its docstring the planted bug it guards against; each was checked to
fail with that bug planted. Everything here runs in-process on tiny tensors (well under
a second a test), except the torchrun test of train.py at the end of the file.
"""
from __future__ import annotations

import argparse
import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import distributed
import engine
import transforms
from dataset import image_size, load_image
from distributed import Dist, EpochSampler, make_loader, set_epoch


# --------------------------------------------------------------------------- 1. the epoch's shuffle
def test_sampler_order_follows_the_epoch():
    """Planted bug: EpochSampler ignores the epoch (set_epoch not stored, or the generator
    seeded from the seed alone), so every epoch sees the same shuffle.

    Each epoch's order is a permutation of the indices, the same for the same (seed, epoch)
    and different for other epochs; under 2 ranks the two shards of an epoch cover it."""
    n, orders = 24, []
    for epoch in range(4):
        sampler = EpochSampler(n, shuffle=True, seed=3)
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(n))
        again = EpochSampler(n, shuffle=True, seed=3)
        again.set_epoch(epoch)
        assert list(again) == order
        orders.append(tuple(order))
    assert len(set(orders)) == 4, "the same shuffle in two epochs"
    shards = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            shards[epoch, rank] = EpochSampler(n, True, 3, rank, 2)
            shards[epoch, rank].set_epoch(epoch)
        assert sorted(list(shards[epoch, 0]) + list(shards[epoch, 1])) == list(range(n))
    assert list(shards[0, 1]) != list(shards[1, 1]), "rank 1 has the same shard every epoch"


class _Indexed(torch.utils.data.Dataset):
    """Sample i is (i, a random number): the number shows the sample's augmentation draw."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i, torch.rand(())


def test_loader_shuffle_and_augmentation_follow_set_epoch():
    """Planted bug: the training loader gives the same order (and the same augmentation)
    every epoch, because distributed.set_epoch does not reach the sampler (or the dataset).

    make_loader's batches after set_epoch(e) depend on e, and are the same for the same e."""
    loader = make_loader(_Indexed(), 4, True, 0, Dist(), seed=0)

    def epoch_of(e):
        set_epoch(loader, e)
        batches = list(loader)
        return torch.cat([b[0] for b in batches]).tolist(), torch.cat([b[1] for b in batches])

    order0, draws0 = epoch_of(0)
    order1, draws1 = epoch_of(1)
    assert sorted(order0) == sorted(order1) == list(range(12))
    assert order0 != order1, "epoch 1 has epoch 0's shuffle"
    by_index0 = dict(zip(order0, draws0.tolist()))
    by_index1 = dict(zip(order1, draws1.tolist()))
    assert all(by_index0[i] != by_index1[i] for i in range(12)), "epoch 1 has epoch 0's augmentation"
    again, draws_again = epoch_of(0)
    assert again == order0 and torch.equal(draws_again, draws0)


# --------------------------------------------------------------------------- 2. warm-up
def schedule_args(**kw) -> argparse.Namespace:
    base = dict(warmup_epochs=2.0, warmup_factor=0.1, epochs=10, schedule="step", milestones=[6, 8],
                gamma=0.1, poly_power=4.0)
    return argparse.Namespace(**(base | kw))


def test_warmup_reaches_the_full_rate_exactly_at_its_last_epoch():
    """Planted bug: the linear warm-up reaches the full rate one epoch early.

    --warmup-epochs 2 from 0.1 x lr, 4 optimiser steps an epoch: the rate after step k
    (epoch k / 4) is lr * (0.1 + 0.9 * (k / 4) / 2) for k < 8, worked out by hand at the
    step and epoch boundaries, then lr until the milestone at epoch 6, then lr / 10."""
    lr, steps_per_epoch = 0.5, 4
    args = schedule_args()
    expected = {0: 0.1, 1: 0.2125, 2: 0.325, 4: 0.55, 6: 0.775, 7: 0.8875, 8: 1.0, 9: 1.0,
                23: 1.0, 24: 0.1, 31: 0.1, 32: 0.01}
    for step, factor in expected.items():
        assert engine.lr_factor(step / steps_per_epoch, args) == pytest.approx(factor, abs=1e-12), step
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = engine.build_scheduler(optimizer, args, steps_per_epoch)
    rates = []
    for _ in range(33):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step, factor in expected.items():
        assert rates[step] == pytest.approx(lr * factor, abs=1e-12), f"rate at step {step}"
    # a fractional warm-up (Darknet's 0.1 epoch) ends at its own step too: 10 steps an epoch
    short = schedule_args(warmup_epochs=0.5, schedule="constant")
    assert engine.lr_factor(4 / 10, short) == pytest.approx(0.1 + 0.9 * 0.8)
    assert engine.lr_factor(5 / 10, short) == 1.0


# --------------------------------------------------------------------------- 3. photometric jitter
def test_exposure_and_saturation_jitter_go_both_ways_within_1_5():
    """Planted bug: the exposure/saturation jitter never goes below 1 (images only brighten
    and saturate), where the paper (Section 2.2) and Darknet's rand_scale scale by up to
    1.5 either way: a factor in [1, 1.5], inverted half of the time.

    The factors are sampled through YoloAugment.sample and read back from the pixels that
    to_float_images makes of one coloured pixel (value 0.5, saturation 0.2, so no clamping):
    the value and saturation ratios are the exposure and saturation factors."""
    torch.manual_seed(0)
    augment = transforms.YoloAugment(img_size=8, flip=0.0)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    boxes, labels = torch.tensor([[0.2, 0.2, 0.8, 0.8]]), torch.tensor([0])
    factors = torch.stack([augment.sample(image, boxes, labels)[3] for _ in range(400)])
    pixel = torch.tensor([0.5, 0.4, 0.45]).view(1, 3, 1, 1).expand(len(factors), 3, 1, 1).clone()
    out = transforms.to_float_images(pixel, factors).flatten(1).double()
    value = out.max(1).values
    exposure = value / 0.5
    saturation = ((value - out.min(1).values) / value) / 0.2
    for name, f in (("exposure", exposure), ("saturation", saturation)):
        assert f.min() >= 1 / 1.5 - 1e-5 and f.max() <= 1.5 + 1e-5, name
        below = (f < 1).double().mean().item()
        assert 0.35 < below < 0.65, f"{name}: {below:.0%} of the factors below 1"
        assert f.min() < 1 / 1.3 and f.max() > 1.3, name  # both ends of the range are reached


# --------------------------------------------------------------------------- 4. EXIF orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_turns_with_every_exif_orientation(tmp_path, orientation):
    """Planted bug: EXIF orientations 5 and 7 (transpose and transverse: a mirror plus a
    quarter turn) do not swap width and height in dataset.image_size, so every box of such
    a photo is scaled to the wrong sides in evaluation.

    A real 40 x 20 JPEG with each orientation 1-8: 5, 6, 7 and 8 are seen 20 x 40, the
    size that load_image (PIL's exif_transpose) really decodes."""
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, exif=exif)
    turned = orientation in (5, 6, 7, 8)
    assert image_size(path) == ((20, 40) if turned else (40, 20))
    assert image_size(path) == load_image(path).size
