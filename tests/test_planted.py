"""Fast tests for bugs that were planted one at a time and passed the whole suite (#14).

Each test names in its docstring the planted bug it guards against; each was checked to
fail with that bug planted. Everything here runs in-process on tiny tensors (well under
a second a test), except the torchrun test of train.py at the end of the file.
"""
from __future__ import annotations

import argparse
import threading

import pytest
import torch
from PIL import Image

import distributed
import engine
import schedule
import transforms
from images import image_size, load_image
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
        assert schedule.lr_factor(step / steps_per_epoch, args) == pytest.approx(factor, abs=1e-12), step
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = schedule.build_scheduler(optimizer, args, steps_per_epoch)
    rates = []
    for _ in range(33):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step, factor in expected.items():
        assert rates[step] == pytest.approx(lr * factor, abs=1e-12), f"rate at step {step}"
    # a fractional warm-up (Darknet's 0.1 epoch) ends at its own step too: 10 steps an epoch
    short = schedule_args(warmup_epochs=0.5, schedule="constant")
    assert schedule.lr_factor(4 / 10, short) == pytest.approx(0.1 + 0.9 * 0.8)
    assert schedule.lr_factor(5 / 10, short) == 1.0


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
    quarter turn) do not swap width and height in images.image_size, so every box of such
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


# --------------------------------------------------------------------------- 5. Darknet validation under DDP
class _ThreadWorld:
    """torch.distributed for ranks that are threads of this process: all_reduce sums (or
    takes the min / max of) the tensors of every rank, in place; broadcast copies rank 0's.
    A fake 2-rank world for code that calls torch.distributed directly (distributed.py)."""

    class ReduceOp:
        SUM, MIN, MAX = "sum", "min", "max"

    def __init__(self, world_size: int):
        self.world_size, self.local = world_size, threading.local()
        self.barrier, self.slots = threading.Barrier(world_size), [None] * world_size

    def exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self.exchange_objects(tensor.clone())

    def exchange_objects(self, obj) -> list:
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # every rank has read the slots before any writes again
        return values

    def all_reduce(self, tensor, op="sum"):
        stacked = torch.stack(self.exchange(tensor))
        tensor.copy_({"sum": stacked.sum(0), "min": stacked.min(0).values,
                      "max": stacked.max(0).values}[op])

    def broadcast(self, tensor, src=0):
        tensor.copy_(self.exchange(tensor)[src])

    def all_gather_object(self, gathered: list, obj):  # distributed.gather_objects (gather_results)
        gathered[:] = self.exchange_objects(obj)

    def get_world_size(self):
        return self.world_size

    def run(self, fn):
        """fn(rank) on every rank, each in its own thread: the results in rank order."""
        results, errors = [None] * self.world_size, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results


class _ReadsItsAnswer(torch.nn.Module):
    """A 'classifier' whose logits are 4 x one-hot of the class written in pixel (0, 0, 0)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return 4.0 * torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 3).float() + 0 * self.unused


def test_darknet_validation_counts_are_summed_over_the_ranks(monkeypatch):
    """Planted bug: the Darknet scripts' validation counts (loss, top-1, top-5, images) are
    not reduced over the DDP ranks, so rank 0 logs the accuracy of its own shard only.

    7 validation images in a fake 2-rank world (threads, distributed.torch_dist replaced):
    rank 0 scores images 0, 2, 4, 6, all right; rank 1 scores 1, 3, 5, all wrong. Both ranks
    must report 4 of 7 right (57.1 %) and the one-process validation loss."""
    import classification

    answers = [0, 1, 2, 0, 1, 2, 0]
    labels = [a if i % 2 == 0 else (a + 1) % 3 for i, a in enumerate(answers)]
    val_set = [(torch.full((3, 2, 2), float(a)), torch.tensor(y)) for a, y in zip(answers, labels)]
    args = argparse.Namespace(batch_size=4, workers=0, channels_last=False)
    alone = classification.make_evaluator(val_set, args, Dist(), None)(_ReadsItsAnswer(), 0)
    assert alone["top1"] == pytest.approx(100 * 4 / 7)

    world = _ThreadWorld(2)
    monkeypatch.setattr(distributed, "torch_dist", world)
    evaluators = [classification.make_evaluator(val_set, args, Dist(rank, 2), None) for rank in (0, 1)]
    rows = world.run(lambda rank: evaluators[rank](_ReadsItsAnswer(), 0))
    for rank, row in enumerate(rows):
        assert row["top1"] == pytest.approx(100 * 4 / 7), f"rank {rank}: {row}"
        assert row["top5"] == pytest.approx(100.0) and row["val_loss"] == pytest.approx(alone["val_loss"])


# --------------------------------------------------------------------------- 6. gradient accumulation
class _Points(torch.utils.data.Dataset):
    """16 fixed (x, y, index) samples for a linear regression."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class _Linear(torch.nn.Linear):
    config = {"in_features": 4, "out_features": 1}  # what TrainState.checkpoint records


def regression_step(seen: list | None = None, interrupt_after: int | None = None):
    """engine's step_fn for _Linear on _Points; records the indices of each batch in
    ``seen`` and sends this process SIGTERM during batch number ``interrupt_after``."""
    import os
    import signal

    def step(model, batch, device):
        x, y, index = batch
        if seen is not None:
            seen.append(index.tolist())
            if interrupt_after is not None and len(seen) == interrupt_after:
                os.kill(os.getpid(), signal.SIGTERM)  # engine.GracefulStop: stop after this step
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"loss": loss.detach()}, len(x)
    return step


def training_args(tmp_path, name: str, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine.add_training_args(parser, epochs=1, batch_size=4, lr=0.2, schedule="constant",
                             warmup_epochs=0.0, project=str(tmp_path))
    return parser.parse_args(["--workers", "0", "--device", "cpu", "--momentum", "0",
                              "--weight-decay", "0", "--name", name, *map(str, extra)])


def start(tmp_path, name: str, *extra) -> engine.TrainState:
    torch.manual_seed(0)
    return engine.start_training(_Linear(4, 1), _Points(), training_args(tmp_path, name, *extra), Dist(),
                                 "test")


def test_accumulated_micro_batches_step_like_one_batch_of_their_images(tmp_path):
    """Planted bug: gradient accumulation sums the micro-batches' losses instead of
    averaging them, so --accum-steps k takes k times the step.

    Stated so that it holds whichever way --accum-steps divides the work (k micro-batches
    of --batch-size each, or --batch-size split into k micro-batches; harden-runs is moving
    it to the second): an epoch with --accum-steps 2 takes some number of optimiser steps,
    each over 16 / steps images, and must give the same weights as an epoch of plain steps
    over batches of that many images, which are the same images in the same order."""
    accumulated = start(tmp_path, "accum", "--batch-size", 4, "--accum-steps", 2)
    set_epoch(accumulated.loader, 0)
    engine.train_one_epoch(accumulated, regression_step(), 0)
    steps = accumulated.scheduler.last_epoch
    assert steps in (2, 4)  # 2 x 4 images a step, or 4 images a step split into 2 x 2
    plain = start(tmp_path, "plain", "--batch-size", 16 // steps, "--accum-steps", 1)
    initial = {k: v.clone() for k, v in plain.model.state_dict().items()}
    set_epoch(plain.loader, 0)
    engine.train_one_epoch(plain, regression_step(), 0)
    assert plain.scheduler.last_epoch == steps
    for key, value in plain.model.state_dict().items():
        assert (value - initial[key]).abs().max() > 1e-2  # a wrong step size could not pass
        torch.testing.assert_close(accumulated.model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_an_epochs_short_last_step_is_averaged_over_its_own_micro_batches(tmp_path):
    """Bug found while writing the test above: when an epoch's last optimiser step has fewer
    micro-batches than --accum-steps, its gradient was still divided by --accum-steps, so
    that step was too small. 16 points, --batch-size 12 --accum-steps 3: micro-batches of 4,
    steps of 3 micro-batches and then 1; plain batches of 12 then 4 give the same weights."""
    accumulated = start(tmp_path, "accum", "--batch-size", 12, "--accum-steps", 3)
    set_epoch(accumulated.loader, 0)
    engine.train_one_epoch(accumulated, regression_step(), 0)
    plain = start(tmp_path, "plain", "--batch-size", 12, "--accum-steps", 1)
    set_epoch(plain.loader, 0)
    engine.train_one_epoch(plain, regression_step(), 0)
    assert accumulated.scheduler.last_epoch == plain.scheduler.last_epoch == 2
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[key], value, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- 8. resume position
def test_resume_continues_at_the_saved_batch_of_the_epoch(tmp_path, monkeypatch):
    """Planted bug: a run resumed in the middle of an epoch starts again at batch 0 of that
    epoch (the saved batch not passed on, or not used by the sampler), training some
    images twice; only a slow end-to-end test caught it.

    engine.fit over 2 epochs of 4 batches, stopped by SIGTERM during the 6th batch (epoch
    2, batch 2): the saved state says batch 2, the resumed run trains exactly batches 3 and
    4 of epoch 2, and ends with the weights of the run that was never stopped."""
    from runs import RunInterrupted

    monkeypatch.setattr(engine, "refresh_plots", lambda run_dir: None)  # matplotlib: seconds, beside the point
    straight_seen, cut_seen, resumed_seen = [], [], []
    straight = start(tmp_path, "straight", "--epochs", 2)
    engine.fit(straight, regression_step(straight_seen), None, "loss")
    assert len(straight_seen) == 8

    cut = start(tmp_path, "cut", "--epochs", 2)
    with pytest.raises(RunInterrupted):
        engine.fit(cut, regression_step(cut_seen, interrupt_after=6), None, "loss")
    assert cut_seen == straight_seen[:6]
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 2, 6)

    resumed = start(tmp_path, "cut", "--epochs", 2, "--resume", tmp_path / "cut")
    engine.fit(resumed, regression_step(resumed_seen), None, "loss")
    assert resumed_seen == straight_seen[6:], "the resumed epoch did not start at its saved batch"
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


# --------------------------------------------------------------------------- 7. train.py under DDP
QUADRANT_HEAD = """
import torch
import distributed, train, utils

real_make_model = train.make_model


def make_model(args, num_classes, dist):
    # The output layer's bias says, in every cell: class 0, confidence 0.9 (second box 0.5),
    # a box centred in the cell and as large as it; its weights, scaled by 0.05, vary that
    # by a few hundredths from image to image. At S = 2 the boxes are the image's quadrants.
    model = real_make_model(args, num_classes, dist)
    net = distributed.unwrap(model)
    head, C, S, B = net.head[-1], num_classes, net.S, net.B
    bias = torch.zeros(S, S, C + 5 * B)
    bias[..., 0] = 0.9
    for b in range(B):
        bias[..., C + 5 * b:C + 5 * b + 5] = torch.tensor([0.9 - 0.4 * b, 0.5, 0.5, 0.5 ** 0.5, 0.5 ** 0.5])
    with torch.no_grad():
        head.weight.mul_(0.05)
        head.bias.copy_(bias.flatten())
    return model


train.make_model = make_model
utils.run_cli(train.main)
"""


def test_train_py_under_torchrun_validates_on_every_process_s_detections(tmp_path):
    """Planted bug: under DDP, train.py's validation scores only the images of its own
    process (the detections not gathered from every rank), so the logged mAP and best.pt
    follow a fraction of the validation set. No test ran train.py under DDP at all.

    torchrun (gloo, 2 CPU processes) runs train.py, unchanged but for the output layer's
    starting weights (QUADRANT_HEAD: quadrant boxes of class 0, so that a one-epoch model
    finds objects), for one epoch at a small rate, with 5 validation images, each with one
    class-0 object filling its top-left quadrant: rank 0 predicts images 0, 2, 4 and rank 1
    images 1, 3. The logged mAP must be that of the saved checkpoint evaluated by one
    process on all 5 images, which differs from the mAP of rank 0's 3 images alone.
    Batch norm is off: its statistics differ between the ranks until harden-data's sync
    before validation lands, and the checkpoint holds rank 0's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dataset import build_voc_dataset
    from evaluate import evaluate_detections
    from model import load_detector
    from predict import detection_table, ground_truth_table, predict_dataset
    from synthetic import write_voc_txt_tree

    repo = Path(__file__).resolve().parents[1]
    write_voc_txt_tree(tmp_path, 8, size=64, seed=0, csv_name="train.csv", prefix="tr_")
    write_voc_txt_tree(tmp_path, 5, size=64, seed=1, csv_name="val.csv", prefix="va_")
    for label in (tmp_path / "labels").glob("va_*.txt"):
        label.write_text("0 0.25 0.25 0.5 0.5\n")
    (tmp_path / "launch.py").write_text(QUADRANT_HEAD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "launch.py"), "--data", str(tmp_path / "train.csv"), "--val-data",
           str(tmp_path / "val.csv"), "--S", "2", "--width", "0.0625", "--hidden", "16", "--workers", "0",
           "--batch-size", "8", "--epochs", "1", "--lr", "1e-4", "--no-batch-norm", "--device", "cpu",
           "--project", str(tmp_path / "runs"), "--name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run_dir = tmp_path / "runs" / "ddp"
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["images"] == 8 and json.loads((run_dir / "config.json").read_text())["world_size"] == 2

    model, names = load_detector(run_dir / "last.pt")
    val_set = build_voc_dataset(str(tmp_path / "val.csv"), names=None, S=model.S, img_size=model.input_size)
    dets = predict_dataset(model, val_set, 8, Dist(), 0.005, 0.5)
    gt = ground_truth_table(val_set, names)
    alone = evaluate_detections(gt, detection_table(dets, names))["mAP"]
    rank0_only = evaluate_detections(gt, detection_table({i: dets[i] for i in (0, 2, 4)}, names))["mAP"]
    assert alone > rank0_only + 0.05, (alone, rank0_only)
    assert row["mAP"] == pytest.approx(alone, abs=1e-6)
