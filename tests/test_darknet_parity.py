"""The project against Darknet's C implementation: cfg reading, forward pass, weights files.

Darknet is built from ``../shared/third_party/darknet`` (``darknet`` fixture, conftest.py)
and driven by the harnesses in ``tests/darknet/``: ``layers`` (Darknet's own reading of a
cfg), ``predict`` (load_network + network_predict on a given input) and ``resave``
(load_network + save_weights). The released cfgs are used as they are where that is cheap
and otherwise reduced by a plain text edit in this file (fewer filters, a smaller input and
grid), so the network Darknet runs comes from Darknet's own cfg, not from the project's
writer. Weights are random, written by the project, with non-trivial batch-norm statistics,
including a channel of running variance 1e-6 where Darknet's normalisation (divide by
sqrt(var) + 1e-6) and PyTorch's (sqrt(var + 1e-5)) differ threefold.

Why the forward passes agree to ~1e-6 and not exactly: Darknet sums each dot product in its
own order (im2col + a naive gemm, built with -Ofast, which lets the compiler reassociate),
computes the batch-norm division in double, and PyTorch's kernels sum in theirs; float32
sums in another order differ in the last bits, and those differences grow a little through
24 layers. Everything else (which weight goes where, the layout of the output) is exact:
the weights files round-trip byte for byte through Darknet's own loader and saver.

Measured maximum absolute differences are printed with ``-s`` (they are docs/darknet.md's
table). The full-size yolov1.cfg runs only with ``DARKNET_FULL=1`` (an 789 MB weights file,
a minute of Darknet's CPU forward pass).
"""
from __future__ import annotations

import os
import re
import struct

import numpy as np
import pytest
import torch
from torch import nn

import darknet_weights as dw
from darknet_cfg import read_cfg
from darknet_convert import match_cfg
from darknet_model import Darknet, LocallyConnected2d, variance_from_darknet
from model import build_model, load_detector
from scripts_server import ok
from utils import VOC_CLASSES, load_checkpoint

# Tolerance of the forward passes, relative to the output's largest magnitude (module docstring).
RTOL = 1e-5


@pytest.fixture(scope="module")
def harness(darknet, tmp_path_factory):
    """The three harnesses compiled once for this module."""
    out = tmp_path_factory.mktemp("harness")
    return {name: darknet.compile(f"{name}.c", out) for name in ("layers", "predict", "resave")}


# --------------------------------------------------------------------------- helpers
def reduced(darknet, name: str, tmp_path, divide: int, size: int, side: int | None = None,
            output: int | None = None):
    """A released cfg with every ``filters`` divided, another input size, grid and output."""
    text = (darknet.cfg_dir / name).read_text()
    text = re.sub(r"filters=(\d+)", lambda m: f"filters={int(m.group(1)) // divide}", text)
    text = re.sub(r"(height|width)=\d+", lambda m: f"{m.group(1)}={size}", text)
    if side:
        text = re.sub(r"side=\d+", f"side={side}", text)
    if output:
        text = re.sub(r"output=\s*\d+", f"output={output}", text)
    path = tmp_path / name.replace(".cfg", f"-{divide}x{size}.cfg")
    path.write_text(text)
    return path


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights with non-trivial batch norm; channel 0 of each norm has variance 1e-6
    (and a small scale, so the values stay of order 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (lo, hi) in ((m.running_mean, (-0.5, 0.5)), (m.running_var, (0.5, 2.0)),
                                    (m.weight, (0.5, 1.5)), (m.bias, (-0.2, 0.2))):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
                m.running_var[0], m.weight[0] = 1e-6, 1e-3
            elif isinstance(m, (nn.Conv2d, nn.Linear, LocallyConnected2d)):
                fan_in = m.weight[0].numel() if not isinstance(m, LocallyConnected2d) else m.weight[0, 0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.2 - 0.1)
    return model.eval()


def write_weights(model, cfg_size, path, seen=0):
    cfg, units = dw.model_cfg(model, cfg_size)
    with open(path, "wb") as f:
        dw.save_weights(model, cfg, units, f, seen)
    return path


def darknet_predict(darknet, harness, cfg, weights, x: torch.Tensor, tmp_path) -> torch.Tensor:
    x.numpy().astype("<f4").tofile(tmp_path / "in.bin")
    darknet.run(harness["predict"], cfg, weights, tmp_path / "in.bin", tmp_path / "out.bin")
    return torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype="<f4"))


def to_project_layout(out: torch.Tensor, S: int, B: int, C: int) -> torch.Tensor:
    """Darknet's detection output in the project's per-cell layout, written out from
    detection_layer.c's indexing (independently of darknet_weights.detection_permutation):
    class j of cell i at i*C + j, confidence of box n at S*S*C + i*B + n, its four box
    numbers at S*S*(C+B) + (i*B + n)*4."""
    cells = []
    for i in range(S * S):
        cell = [out[i * C + j] for j in range(C)]
        for n in range(B):
            cell.append(out[S * S * C + i * B + n])
            cell += [out[S * S * (C + B) + (i * B + n) * 4 + k] for k in range(4)]
        cells.append(torch.stack(cell))
    return torch.cat(cells)


def project_output(model, x) -> torch.Tensor:
    """The detector's output; the classifier's log-probabilities (its cfg ends in [softmax],
    and near-uniform probabilities would hide differences that their logarithms show)."""
    with torch.no_grad():
        out = model(x)[0]
    return out.log_softmax(0) if isinstance(model, Darknet) else out


def darknet_output(model, out: torch.Tensor) -> torch.Tensor:
    """Darknet's output, comparable with :func:`project_output`."""
    if isinstance(model, Darknet):
        return out.log()
    return to_project_layout(out, model.S, model.B, model.C)


def assert_parity(label, project, darknet_out) -> float:
    diff = (project - darknet_out).abs().max().item()
    scale = project.abs().max().item()
    print(f"\nparity {label}: max |project - Darknet| = {diff:.3g} (outputs up to {scale:.3g})")
    assert diff <= RTOL * max(scale, 1e-3), f"{label}: {diff} > {RTOL} * {scale}"
    return diff


# --------------------------------------------------------------------------- cfg reading
@pytest.mark.parametrize("name", ["extraction.cfg", "extraction.conv.cfg", "yolov1.cfg", "yolov1-tiny.cfg",
                                  "darknet.cfg", "tiny.cfg"])
def test_cfg_shapes_agree_with_darknets_parser(darknet, harness, name):
    """darknet_cfg's shape arithmetic (padding, Darknet's max pooling and local-layer sizes,
    flattening into connected layers) gives Darknet's shapes for every cfg beside the project."""
    theirs = darknet.run(harness["layers"], darknet.cfg_dir / name).split("\n")[:-1]
    mine = []
    for layer in read_cfg(darknet.cfg_dir / name).layers:
        c, h, w = layer.out_shape
        mine.append(f"{layer.kind} {c if h else 0} {h} {w} {c * max(h, 1) * max(w, 1)}")
    assert mine == theirs


def test_released_cfgs_are_the_registry_networks(darknet):
    """The released cfgs are built as exactly the registry's networks (and extraction.conv.cfg,
    whose head is a leaky fully connected layer the project has not, as its convolutions)."""
    found = {name: match_cfg(read_cfg(darknet.cfg_dir / name))
             for name in ("yolov1.cfg", "yolov1-tiny.cfg", "extraction.cfg", "extraction.conv.cfg")}
    assert found["yolov1.cfg"].name == "yolov1-darknet"
    assert found["yolov1.cfg"].config | {"width": 1} == {"S": 7, "B": 3, "C": 20, "batch_norm": True, "width": 1,
                                                         "darknet_bn": True, "hidden": 0, "local": 256,
                                                         "dropout": 0.5}
    assert found["yolov1-tiny.cfg"].name == "yolov1-tiny" and found["yolov1-tiny.cfg"].config["B"] == 2
    assert found["extraction.cfg"].config["head"] == "conv" and found["extraction.cfg"].upto is None
    assert found["extraction.conv.cfg"].upto == 24 and not found["extraction.conv.cfg"].config["batch_norm"]


# --------------------------------------------------------------------------- forward passes
REDUCED = {  # released cfg -> (filters divided by, input side, grid, connected output)
    "extraction.cfg": (16, 64, None, None),
    "yolov1.cfg": (16, 128, 2, 2 * 2 * (3 * 5 + 20)),
    "yolov1-tiny.cfg": (4, 128, 2, 2 * 2 * (2 * 5 + 20)),
}


@pytest.mark.parametrize("name", list(REDUCED))
def test_forward_pass_equals_darknets_on_released_cfgs(darknet, harness, tmp_path, name):
    """The project's network built from a released cfg computes what Darknet computes with the
    same weights file and input: the detection output permuted into the project's layout, the
    classifier's softmax. Guards the weight layout (local layer, connected rows), Darknet's
    batch-norm formula and the detection-layer permutation."""
    cfg_path = reduced(darknet, name, tmp_path, *REDUCED[name])
    cfg = read_cfg(cfg_path)
    model = randomise(match_cfg(cfg).build(), seed=len(name))
    weights = write_weights(model, cfg.input_shape[1], tmp_path / "random.weights", seen=12345)
    x = torch.rand(1, *cfg.input_shape, generator=torch.Generator().manual_seed(0))
    theirs = darknet_output(model, darknet_predict(darknet, harness, cfg_path, weights, x, tmp_path))
    assert_parity(name + " (reduced)", project_output(model, x), theirs)

    darknet.run(harness["resave"], cfg_path, weights, tmp_path / "resaved.weights")
    assert (tmp_path / "resaved.weights").read_bytes() == weights.read_bytes()


PROJECT_ONLY = {  # networks of the project that no released cfg describes
    "yolov1 (paper head, PyTorch batch norm)": lambda: build_model("yolov1", S=2, width=1 / 16, hidden=32, C=5),
    "yolov1 without batch norm": lambda: build_model("yolov1", S=2, width=1 / 16, hidden=16, batch_norm=False),
    "fast (nine convolutions)": lambda: build_model("fast", S=2, width=1 / 4, B=1, C=3),
    "Darknet classifier (linear head)": lambda: Darknet(num_classes=7, width=1 / 16),
}


@pytest.mark.parametrize("label", list(PROJECT_ONLY))
def test_project_networks_written_as_darknet_files_run_in_darknet(darknet, harness, tmp_path, label):
    """write_darknet's cfg and weights load and run in Darknet with the project's numbers,
    including a PyTorch batch norm (its running variances converted to Darknet's formula),
    and read back into exactly the same tensors (variances to float rounding)."""
    model = randomise(PROJECT_ONLY[label](), seed=len(label))
    size = 64 if isinstance(model, Darknet) else None
    cfg_path, weights = dw.write_darknet(model, tmp_path / "net", size, seen=7)
    x = torch.rand(1, 3, size or model.input_size, size or model.input_size,
                   generator=torch.Generator().manual_seed(1))
    theirs = darknet_output(model, darknet_predict(darknet, harness, cfg_path, weights, x, tmp_path))
    assert_parity(label, project_output(model, x), theirs)

    darknet.run(harness["resave"], cfg_path, weights, tmp_path / "resaved.weights")
    assert (tmp_path / "resaved.weights").read_bytes() == weights.read_bytes()
    cfg = read_cfg(cfg_path)
    again = match_cfg(cfg).build()
    dw.load_weights(again, dw.model_cfg(again, cfg.input_shape[1])[1], weights, cfg)
    for (key, want), got in zip(model.state_dict().items(), again.state_dict().values()):
        if key.endswith("running_var") and not model.config.get("darknet_bn"):
            # read back into Darknet's batch norm: the same divisor, in Darknet's convention
            torch.testing.assert_close(variance_from_darknet(got, 1e-5), want, rtol=1e-5, atol=1e-10)
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(got, want), key


def test_transposed_header_is_read_as_darknet_reads_it(darknet, harness, tmp_path):
    """A header with minor above 1000 (old files): a 32-bit ``seen`` and connected weights
    stored (inputs, outputs). Darknet and the project read such a file to the same network."""
    cfg_path = reduced(darknet, "yolov1-tiny.cfg", tmp_path, *REDUCED["yolov1-tiny.cfg"])
    cfg = read_cfg(cfg_path)
    model = randomise(match_cfg(cfg).build(), seed=3)
    plain = write_weights(model, cfg.input_shape[1], tmp_path / "plain.weights")
    floats = np.fromfile(plain, dtype="<f4", offset=20)
    connected = cfg.layers[-2]
    start = sum(layer.n_weights for layer in cfg.layers[:-2]) + connected.params["output"]
    rows = floats[start:start + connected.n_weights - connected.params["output"]]
    floats[start:start + rows.size] = rows.reshape(connected.params["output"], -1).T.ravel()
    old = tmp_path / "transposed.weights"
    old.write_bytes(struct.pack("<3ii", 0, 1001, 0, 99) + floats.astype("<f4").tobytes())

    x = torch.rand(1, *cfg.input_shape, generator=torch.Generator().manual_seed(2))
    theirs = to_project_layout(darknet_predict(darknet, harness, cfg_path, old, x, tmp_path),
                               model.S, model.B, model.C)
    again = match_cfg(cfg).build().eval()
    header = dw.load_weights(again, dw.model_cfg(again)[1], old, cfg)
    assert header.transposed and header.seen == 99
    assert_parity("transposed header", project_output(again, x), theirs)
    assert torch.equal(project_output(again, x), project_output(model, x))


# --------------------------------------------------------------------------- the command
def test_convert_command_round_trip(darknet, harness, scripts, tmp_path):
    """darknet_convert.py: cfg + weights -> a checkpoint that load_detector (test.py, detect.py,
    detect_txt.py, export.py) runs with Darknet's numbers, and back to a cfg and weights file
    that Darknet runs identically, the weights byte for byte the original."""
    cfg_path = reduced(darknet, "yolov1.cfg", tmp_path, *REDUCED["yolov1.cfg"])
    cfg = read_cfg(cfg_path)
    weights = write_weights(randomise(match_cfg(cfg).build(), seed=5), 128, tmp_path / "yolo.weights", seen=4242)
    ok(scripts.run("darknet_convert.py", cfg_path, weights, "-o", tmp_path / "yolo.pt"))
    ckpt = load_checkpoint(tmp_path / "yolo.pt")
    assert ckpt["kind"] == "yolo" and ckpt["class_names"] == list(VOC_CLASSES)
    assert ckpt["model_config"]["name"] == "yolov1-darknet" and ckpt["darknet"]["seen"] == 4242
    model, names = load_detector(tmp_path / "yolo.pt")
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    theirs = darknet_predict(darknet, harness, cfg_path, weights, x, tmp_path)
    assert_parity("yolov1 via darknet_convert.py", project_output(model, x), to_project_layout(theirs, 2, 3, 20))
    # what detect.py and test.py run: batch norm folded with Darknet's divisor, channels_last
    # for the convolutions (the locally connected layer's weight cannot take it)
    import inference
    runner = inference.load(tmp_path / "yolo.pt", "cpu")
    assert "batch norm folded" in runner.description
    assert_parity("yolov1 on detect.py's default backend", runner(x), to_project_layout(theirs, 2, 3, 20))

    ok(scripts.run("darknet_convert.py", tmp_path / "yolo.pt", "-o", tmp_path / "back" / "yolo"))
    assert (tmp_path / "back" / "yolo.weights").read_bytes() == weights.read_bytes()
    again = darknet_predict(darknet, harness, tmp_path / "back" / "yolo.cfg", tmp_path / "back" / "yolo.weights",
                            x, tmp_path)
    assert torch.equal(again, theirs)


def test_convert_command_makes_a_backbone_for_train(darknet, scripts, tmp_path):
    """extraction.conv.cfg's convolutions (a file cut after them, as Darknet's ``partial``
    writes) become a checkpoint that model.load_backbone (train.py --backbone) loads."""
    from model import YOLOv1, load_backbone

    cfg_path = reduced(darknet, "extraction.conv.cfg", tmp_path, 16, 64)
    cfg = read_cfg(cfg_path)
    dark = randomise(Darknet(width=1 / 16, batch_norm=False), seed=8)
    full = write_weights(dark, 64, tmp_path / "full.weights")
    n_conv = sum(layer.n_weights for layer in cfg.layers[:24])
    cut = tmp_path / "extraction.conv.weights"
    cut.write_bytes(full.read_bytes()[:20 + 4 * n_conv])
    ok(scripts.run("darknet_convert.py", cfg_path, cut, "-o", tmp_path / "backbone.pt"))
    ckpt = load_checkpoint(tmp_path / "backbone.pt")
    assert ckpt["kind"] == "backbone" and ckpt["contents"] == "convolutions"
    yolo = YOLOv1(S=2, width=1 / 16, hidden=8, batch_norm=False).eval()
    load_backbone(yolo, ckpt, "backbone.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(yolo.features(x), dark.eval().features(x))


# --------------------------------------------------------------------------- full size
@pytest.mark.skipif(not os.environ.get("DARKNET_FULL"), reason="full-size released cfgs: set DARKNET_FULL=1 "
                    "(writes weights files of up to 789 MB; Darknet's CPU forward pass of yolov1.cfg takes minutes)")
@pytest.mark.parametrize("name", ["extraction.cfg", "yolov1-tiny.cfg", "yolov1.cfg"])
def test_full_size_forward_pass_equals_darknets(darknet, harness, tmp_path, name):
    """The released cfgs as they are (the size of the released weights files checked too)."""
    cfg_path = darknet.cfg_dir / name
    cfg = read_cfg(cfg_path)
    model = randomise(match_cfg(cfg).build(), seed=13)
    weights = write_weights(model, cfg.input_shape[1], tmp_path / "full.weights")
    floats = {"extraction.cfg": 23_455_400, "yolov1-tiny.cfg": 27_099_950, "yolov1.cfg": 197_328_243}[name]
    assert weights.stat().st_size == 20 + 4 * floats  # yolov1.weights: 789,312,992 bytes
    x = torch.rand(1, *cfg.input_shape, generator=torch.Generator().manual_seed(0))
    theirs = darknet_output(model, darknet_predict(darknet, harness, cfg_path, weights, x, tmp_path))
    assert_parity(f"{name} (full size)", project_output(model, x), theirs)
    darknet.run(harness["resave"], cfg_path, weights, tmp_path / "resaved.weights")
    assert (tmp_path / "resaved.weights").read_bytes() == weights.read_bytes()
