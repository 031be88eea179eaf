"""Checkpoints from strangers and from accidents (issue #14, classes 4 and 10), and fast unit
tests of the checkpoint machinery that only slow end-to-end tests used to catch.

Each test names the bug it guards against. All run in-process on tiny networks (seconds).
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import darknet_convert
import engine
import runs
import utils
from darknet_model import Darknet
from distributed import Dist, make_loader
from model import MODELS, OPTION_LIMITS, YOLOv1, build_checked, build_model, load_backbone, load_detector
from model import option_names
from utils import UserError, check_archive, load_checkpoint, save_checkpoint

TINY = {"S": 2, "width": 0.0625}


def tiny(name: str = "yolov1") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, **TINY, **({"hidden": 16} if MODELS[name].cls is YOLOv1 else {}))
    for m in model.modules():  # batch-norm buffers other than 0 and 1, so that a mix-up shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def detector_file(path: Path, net: nn.Module | None = None, **changes) -> Path:
    """A train.py-like checkpoint of ``net`` (tiny YOLOv1), with entries replaced."""
    model = net or tiny()
    ckpt = {"kind": "yolo", "epoch": 1, "model": model.state_dict(), "model_config": dict(model.config),
            "class_names": [f"c{i}" for i in range(model.C)]}
    save_checkpoint(ckpt | changes, path)
    return path


def refused(call, *fragments: str) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- class 10: configurations
def test_a_config_asking_for_a_huge_network_is_refused_before_anything_is_built(tmp_path):
    """Bug: a weights-only file whose model_config said S=400 made the loader allocate 49 TB
    (the model was built from the configuration before anything was compared)."""
    path = detector_file(tmp_path / "huge.pt", model_config=dict(tiny().config, S=400))
    start = time.perf_counter()
    refused(lambda: load_detector(path), str(path), "S=400", "[1, 64]")
    assert time.perf_counter() - start < 5


def test_the_largest_allowed_config_is_compared_on_the_meta_device_without_allocating(tmp_path):
    """Bug: a configuration inside the limits but naming a terabyte network (S=64, hidden
    65536, 100000 classes) built for real before its state dict's shapes were compared."""
    config = dict(tiny().config, S=64, B=64, C=100_000, hidden=65_536, local=65_536, width=16.0)
    path = detector_file(tmp_path / "big.pt", model_config=config)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    refused(lambda: load_detector(path), str(path), "does not fit this model")
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


BAD_CONFIGS = [  # (what is wrong, the config or a function of the good one, fragments of the message)
    ("not a dict", lambda c: [c], ["model_config is of type list"]),
    ("no name", lambda c: {k: v for k, v in c.items() if k != "name"}, ["model_config has no 'name'"]),
    ("no S", lambda c: {k: v for k, v in c.items() if k != "S"}, ["model_config has no 'S'"]),
    ("unknown model", lambda c: c | {"name": "yolov9"}, ["name='yolov9'", "yolov1"]),
    ("name not a string", lambda c: c | {"name": 3}, ["name=3 is of type int", "str"]),
    ("unknown option", lambda c: c | {"anchors": 5}, ["unknown option 'anchors'"]),
    ("Fast YOLO option on YOLOv1", lambda c: c | {"convs": 9}, ["unknown option 'convs'"]),
    ("S a string", lambda c: c | {"S": "7"}, ["S='7' is of type str"]),
    ("S a bool", lambda c: c | {"S": True}, ["S=True is of type bool"]),
    ("S a float", lambda c: c | {"S": 2.0}, ["S=2.0 is of type float"]),
    ("S zero", lambda c: c | {"S": 0}, ["S=0", "[1, 64]"]),
    ("B zero", lambda c: c | {"B": 0}, ["B=0"]),
    ("C negative", lambda c: c | {"C": -1}, ["C=-1"]),
    ("hidden negative", lambda c: c | {"hidden": -1}, ["hidden=-1"]),
    ("width zero", lambda c: c | {"width": 0.0}, ["width=0.0"]),
    ("width NaN", lambda c: c | {"width": math.nan}, ["width=nan"]),
    ("width infinite", lambda c: c | {"width": math.inf}, ["width=inf"]),
    ("dropout 1.5", lambda c: c | {"dropout": 1.5}, ["dropout=1.5"]),
    ("batch_norm a string", lambda c: c | {"batch_norm": "yes"}, ["batch_norm='yes' is of type str"]),
    ("batch_norm an int", lambda c: c | {"batch_norm": 1}, ["batch_norm=1 is of type int"]),
]


@pytest.mark.parametrize("edit, fragments", [pytest.param(e, f, id=i) for i, e, f in BAD_CONFIGS])
def test_a_malformed_model_config_is_one_line_naming_the_file_and_the_option(tmp_path, edit, fragments):
    """Bug: a malformed model_config gave a KeyError (or a TypeError deep in a constructor)."""
    path = detector_file(tmp_path / "bad.pt", model_config=edit(dict(tiny().config)))
    refused(lambda: load_detector(path), f"{path}: ", *fragments)


def test_a_fast_yolo_config_is_checked_against_its_own_options(tmp_path):
    """Bug: the options allowed were YOLOv1's whatever the name (convs=7 built, hidden passed)."""
    fast = tiny("fast")
    path = detector_file(tmp_path / "f.pt", fast, model_config=dict(fast.config, convs=7))
    refused(lambda: load_detector(path), "convs=7", "8, 9")
    path = detector_file(tmp_path / "g.pt", fast, model_config=dict(fast.config, hidden=16))
    refused(lambda: load_detector(path), "unknown option 'hidden'")


def test_every_constructor_option_has_limits():
    """Bug: a new option added to a network but not to OPTION_LIMITS would be refused as
    unknown in every checkpoint (or, checked nowhere, reach the constructor unchecked)."""
    for cls in {entry.cls for entry in MODELS.values()} | {Darknet}:
        assert option_names(cls) <= set(OPTION_LIMITS), cls.__name__


@pytest.mark.parametrize("state, fragments", [
    (lambda s: s | {"head.4.weight": s["head.4.weight"][:-1]}, ["'head.4.weight'", "shape"]),
    (lambda s: {k: v for k, v in s.items() if k != "head.4.bias"}, ["missing 'head.4.bias'"]),
    (lambda s: s | {"extra.weight": torch.zeros(1)}, ["unexpected 'extra.weight'"]),
    (lambda s: s | {"head.4.bias": [0.0] * 4}, ["'head.4.bias' is a list, not a tensor"]),
    (lambda s: [1, 2], ["model state is list"]),
    (lambda s: {}, ["(empty)"]),
], ids=["wrong shape", "missing tensor", "unexpected tensor", "not a tensor", "not a dict", "empty"])
def test_a_state_dict_that_does_not_fit_its_config_is_refused(tmp_path, state, fragments):
    """Bug: the state dict was loaded (or the model built) without comparing names and shapes
    first: tracebacks from load_state_dict, or a KeyError."""
    model = tiny()
    path = detector_file(tmp_path / "bad.pt", model, model=state(model.state_dict()))
    refused(lambda: load_detector(path), f"{path}: ", *fragments)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_valid_checkpoint_loads_bitwise_in_eval_mode(tmp_path, name):
    """Bug: the checked loader (meta device, assign=True) changing a weight or a buffer on the
    way, or giving a model whose tensors are still on the meta device."""
    model = tiny(name).eval()
    loaded, names = load_detector(detector_file(tmp_path / "ok.pt", model))
    assert names == [f"c{i}" for i in range(model.C)] and loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].device.type == "cpu" and got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_darknet_classifier_checkpoint_is_checked_the_same_way(tmp_path):
    """Bug: darknet_convert built a classifier from an unchecked config (Darknet(**config))."""
    dark = Darknet(num_classes=5, width=0.0625)
    good = {"kind": "darknet", "model": dark.state_dict(), "model_config": dict(dark.config)}
    save_checkpoint(good, tmp_path / "ok.pt")
    model, _ = darknet_convert.model_from_checkpoint(tmp_path / "ok.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dark.state_dict().values()))
    save_checkpoint(good | {"model_config": dict(dark.config, num_classes=10**9)}, tmp_path / "big.pt")
    refused(lambda: darknet_convert.model_from_checkpoint(tmp_path / "big.pt"), "big.pt", "num_classes=")
    save_checkpoint(good | {"model_config": dict(dark.config, head="mlp")}, tmp_path / "head.pt")
    refused(lambda: darknet_convert.model_from_checkpoint(tmp_path / "head.pt"), "head='mlp'")


def test_load_backbone_checks_the_config_it_reads(tmp_path):
    """Bug: load_backbone read batch_norm from a model_config it never checked (a string
    'false' is truthy) and a non-dict checkpoint raised AttributeError."""
    dark = Darknet(num_classes=5, width=0.0625)
    yolo = YOLOv1(**TINY, hidden=8)
    refused(lambda: load_backbone(yolo, {"model": dark.state_dict(), "model_config": dict(dark.config,
                                  batch_norm="false")}, "b.pt"), "b.pt: ", "batch_norm='false'")
    refused(lambda: load_backbone(yolo, [1, 2], "b.pt"), "b.pt: ", "list")


# --------------------------------------------------------------------------- class 4: non-finite weights
NONFINITE = [("head.4.weight", math.nan), ("features.0.1.running_var", math.inf),
             ("extra.0.1.running_mean", -math.inf)]


@pytest.mark.parametrize("key, value", NONFINITE, ids=["NaN weight", "inf BN variance", "-inf BN mean"])
def test_a_detector_with_non_finite_weights_is_refused(tmp_path, key, value):
    """Bug: a checkpoint with NaN weights was accepted by test.py (mAP 0), detect.py (no
    boxes) and export.py (load_detector loads every one of them): batch-norm buffers too."""
    model = tiny()
    state = model.state_dict()
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    path = detector_file(tmp_path / "nan.pt", model, model=state)
    refused(lambda: load_detector(path), f"{path}: tensor {key!r} holds non-finite values ({value})")


def test_a_backbone_and_a_darknet_conversion_with_nan_are_refused(tmp_path):
    """Bug: train.py --backbone and darknet_convert.py took NaN convolutions silently."""
    dark = Darknet(num_classes=5, width=0.0625)
    state = dark.state_dict()
    state["features.0.0.weight"][0, 0, 0, 0] = math.nan
    refused(lambda: load_backbone(YOLOv1(**TINY, hidden=8), {"model": state}, "b.pt"),
            "b.pt: tensor '0.0.weight' holds non-finite values")
    save_checkpoint({"kind": "darknet", "model": state, "model_config": dark.config}, tmp_path / "d.pt")
    refused(lambda: darknet_convert.model_from_checkpoint(tmp_path / "d.pt"),
            "d.pt: tensor 'features.0.0.weight' holds non-finite values")


def test_resuming_a_checkpoint_with_nan_weights_is_refused_without_falling_back(tmp_path, capsys):
    """Bug: --resume of a last.pt whose weights are NaN trained on (or quietly fell back to
    last_prev.pt like a damaged file): a run gone wrong must be looked at."""
    run = tmp_path / "runs" / "exp"
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.1.bias"][0] = math.nan
    detector_file(run / "last.pt", model, model=state)
    detector_file(run / "last_prev.pt", model)
    args = argparse.Namespace(project=str(tmp_path / "runs"), name="exp", resume=str(run), auto_resume=False)
    refused(lambda: runs.load_resume(args), f"{run / 'last.pt'}: tensor 'head.1.bias' holds non-finite")
    assert "warning" not in capsys.readouterr().out
    detector_file(run / "last.pt", model, model_config=dict(model.config, S=400))
    ckpt, _ = runs.load_resume(args)  # a damaged configuration: the previous file, with a warning
    assert ckpt["source"] == str(run / "last_prev.pt")
    assert "S=400: must be in [1, 64]; resuming from the previous checkpoint" in capsys.readouterr().out


# --------------------------------------------------------------------------- fast unit tests
def test_a_save_that_crashes_mid_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    """Bug: a non-atomic checkpoint save (writing straight to the real name): a run killed
    in the middle of the write leaves a truncated last.pt and nothing to resume from."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(4.0)}}, path)
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the kill arrives in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(4)}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # and no half-written temporary left behind
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(4.0))


def test_a_corrupted_tensor_inside_the_archive_is_refused(tmp_path):
    """Bug: a skipped CRC check on load: torch.load reads a checkpoint whose tensor bytes
    were damaged (bad disk, interrupted copy) and returns wrong weights silently."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.zeros(256)}}, path)
    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[member.header_offset + k:member.header_offset + k + 2], "little")
                           for k in (26, 28))
    data[member.header_offset + 30 + name_len + extra_len + 8] ^= 0x40  # one bit of one float
    path.write_bytes(bytes(data))
    # without the check the damage goes unnoticed: the file loads, with another weight
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.zeros(256))
    refused(lambda: check_archive(path), f"{path}: not a readable checkpoint")
    refused(lambda: load_checkpoint(path), f"{path}: not a readable checkpoint", "CRC")


def test_load_detector_returns_a_model_in_eval_mode(tmp_path):
    """Bug: load_detector left the model in training mode: dropout drops half the features
    (two runs of one image differ) and batch norm normalises by the batch, not its running
    statistics (an image's boxes depend on the other images of its batch)."""
    model, _ = load_detector(detector_file(tmp_path / "m.pt"))
    assert not any(m.training for m in model.modules())
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        first, again, alone = model(x), model(x), model(x[:1])
    assert torch.equal(first, again)
    torch.testing.assert_close(alone[0], first[0], rtol=1e-5, atol=1e-5)


class Ids(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i)])


def test_a_run_resumed_mid_epoch_continues_at_the_saved_batch(tmp_path, monkeypatch):
    """Bug: a resume from batch 0 of the epoch instead of the saved batch: the images
    before the interruption are trained twice in that epoch (and the epoch's sums are off)."""
    monkeypatch.setattr(engine, "refresh_plots", lambda run_dir: None)
    seen = []

    def step(model, batch, device):
        seen.extend(int(v) for v in batch.view(-1))
        loss = model(batch).square().mean()
        return loss, {"loss": loss.detach()}, len(batch)

    def state_for(resume):
        args = argparse.Namespace(epochs=1, accum_steps=1, grad_clip=0.0, skip_nonfinite=False)
        model = nn.Linear(1, 1)
        model.config = {}
        loader = make_loader(Ids(), 2, True, 0, Dist(), seed=3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        return engine.TrainState(model, loader, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                                 Dist(), args, tmp_path, "yolo", resume=resume)

    engine.fit(state_for(None), step, None, "loss")
    whole = list(seen)
    assert sorted(whole) == list(range(10))
    seen.clear()
    partial = {"sums": {"loss": 0.0}, "seen": 6, "skipped": 0, "time": 0.0}
    engine.fit(state_for({"epoch": 0, "batch": 3, "partial": partial, "epoch_lr": 0.0}), step, None, "loss")
    assert seen == whole[6:]  # the epoch's order, after the 3 batches already trained
    row = runs.MetricsLog(tmp_path).rows()[-1]
    assert row["images"] == 10  # the 6 before the interruption and the 4 after
