"""inference.py: every backend gives eager float32's boxes; bad models are one-line errors.

The tiny detectors (S=2, width 1/16: 128 px input) have random batch-norm statistics, as
trained ones do: with the fresh 0 / 1 statistics folding batch norm would change nothing
and the comparison could not fail.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import detect
import export
import predict
import inference
import utils
from inference import Backend, Runner, fold_batch_norm
from model import build_model
from utils import UserError, decode_predictions

NAMES = ["cat", "dog", "person"]
# Folding batch norm and onnxruntime's fused kernels reorder float32 operations: raw
# outputs of order 1 move by about 1e-6; boxes (0..1 of the image) are allowed 1e-4.
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


def tiny_model(name: str = "fast") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, S=2, width=1 / 16, C=3, **({"hidden": 16} if name == "yolov1" else {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.3)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        # Fresh, the outputs are near 0 and no score passes a threshold: spread them.
        model.head[-1].weight.mul_(20)
        model.head[-1].bias.uniform_(0, 1, generator=g)
    return model.eval()


def save(model: nn.Module, path):
    utils.save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": model.config,
                           "class_names": NAMES}, path)
    return path


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def boxes(raw: torch.Tensor) -> list[torch.Tensor]:
    return decode_predictions(raw, 2, 2, 3, conf_threshold=0.05, nms_iou=0.5)


def assert_same_boxes(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert sum(len(w) for w in want) >= 6  # the comparison is not vacuous
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g[:, 0], w[:, 0])  # same boxes, same classes
        torch.testing.assert_close(g[:, 1:], w[:, 1:], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- batch norm folding
def test_folding_is_the_hand_computed_convolution():
    """conv then BN(x) = gamma (x - mean) / sqrt(var + eps) + beta is one convolution with
    weight w * gamma / sqrt(var + eps) and bias beta - mean * gamma / sqrt(var + eps)."""
    block = tiny_model().features[0]  # Conv2d(3, 1, 3, bias=False), BatchNorm2d(1), LeakyReLU
    conv, bn = block[0], block[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = fold_batch_norm(block)
    assert isinstance(folded[1], nn.Identity) and isinstance(block[1], nn.BatchNorm2d)  # a copy
    torch.testing.assert_close(folded[0].weight, conv.weight * scale[:, None, None, None])
    torch.testing.assert_close(folded[0].bias, bn.bias - bn.running_mean * scale)


@pytest.mark.parametrize("name", ["fast", "yolov1"])
def test_folded_network_has_no_batch_norm_and_the_same_output(name):
    model = tiny_model(name)
    folded = fold_batch_norm(model)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert norms == (9 if name == "fast" else 24)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.bias is not None for m in folded.modules()) == norms
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", ["yolov1-tiny", "yolov1-darknet"])
def test_darknet_batch_norm_folds_with_darknets_divisor(name):
    """Darknet divides by sqrt(var) + 1e-6 (DarknetBatchNorm2d), PyTorch's fold by
    sqrt(var + eps): at variance 1e-6 the two differ by 0.1%, amplified by the layers after.
    The fold must give the network's own outputs (it used PyTorch's divisor)."""
    from darknet_model import DarknetBatchNorm2d

    model = tiny_model(name)
    first = model.features[0][1]
    assert isinstance(first, DarknetBatchNorm2d)
    with torch.no_grad():
        first.running_var[::2] = 1e-6  # (later layers would overflow: this one shows it)
    model, x = model.double(), images(2).double()  # the formula, not float32's rounding
    with torch.no_grad():
        torch.testing.assert_close(fold_batch_norm(model)(x), model(x), atol=1e-9, rtol=1e-9)
        conv, bn = model.features[0][0], model.features[0][1]
        library = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)  # what folding did before
        assert (library(x) - bn(conv(x))).abs().max() > 0.1


@pytest.mark.parametrize("name", ["yolov1-tiny", "yolov1-darknet"])
def test_released_networks_run_on_the_default_backend(name):
    """channels_last for the convolutions only: the locally connected layer's 5-D weight
    cannot take it (inference.load of a converted yolov1.weights failed)."""
    from darknet_model import LocallyConnected2d, to_channels_last

    model = tiny_model(name)
    x = images(4)

    def run(backend):
        raw = inference.torch_runner(model, NAMES, torch.device("cpu"), backend)(x)
        return decode_predictions(raw, model.S, model.B, model.C, conf_threshold=0.05, nms_iou=0.5)
    assert_same_boxes(run(Backend()), run(inference.EAGER))
    converted = to_channels_last(copy.deepcopy(model))
    convs = [m for m in converted.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(m.weight.is_contiguous() for m in converted.modules() if isinstance(m, LocallyConnected2d))


# --------------------------------------------------------------------------- backends vs eager
@pytest.mark.parametrize("name", ["fast", "yolov1"])
@pytest.mark.parametrize("backend", [Backend(fold_bn=False), Backend(channels_last=False), Backend()],
                         ids=["channels_last", "folded", "default"])
def test_backend_gives_eager_boxes(name, backend):
    model = tiny_model(name)
    x = images(4)
    want = boxes(inference.torch_runner(model, NAMES, torch.device("cpu"), inference.EAGER)(x))
    runner = inference.torch_runner(model, NAMES, torch.device("cpu"), backend)
    assert_same_boxes(boxes(runner(x)), want)
    assert next(model.parameters()).is_contiguous()  # the caller's model is left as it was


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU code needs a C++ compiler")
def test_compiled_backend_packs_the_weights_and_gives_eager_boxes_also_for_a_short_batch():
    """Guards against torch.compile(options={"freezing": True}), which compiles without
    freezing: the convolutions stay plain aten ones, repacking their weights at every call."""
    from torch.profiler import profile

    model = tiny_model("fast")
    x = images(5)
    want = boxes(model(x).detach())
    runner = inference.torch_runner(model, NAMES, torch.device("cpu"), Backend(compile=True))
    got = boxes(runner(x[:3]))
    with profile() as prof:
        got += boxes(runner(x[3:]))
    assert_same_boxes(got, want)
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_convolution_pointwise" in ops and "aten::mkldnn_convolution" not in ops


def test_a_short_batch_is_padded_to_the_smallest_compiled_size_and_trimmed():
    """A compiled graph is specialised to its batch size: the last, shorter batch of a
    folder must reuse it (padded), not compile again; a size already compiled runs as it
    is (guards against padding every single image to a batch of 8 seen once)."""
    seen = []

    def forward(x):
        seen.append(len(x))
        return x.flatten(1)[:, :4] * 2

    runner = Runner(forward, 2, 2, 3, 128, NAMES, torch.device("cpu"), "test", pad_batches=True)
    x = images(5)
    assert torch.equal(runner(x[:4]), x[:4].flatten(1)[:, :4] * 2)
    assert torch.equal(runner(x[:3]), x[:3].flatten(1)[:, :4] * 2)
    runner(x)
    runner(x[:1])
    runner(x[:4])
    assert seen == [4, 4, 5, 4, 4]
    seen.clear()
    runner = Runner(forward, 2, 2, 3, 128, NAMES, torch.device("cpu"), "test", pad_batches=True)
    for n in (1, 5, 1, 3, 2):
        runner(x[:n])
    assert seen == [1, 5, 1, 5, 5]


def test_the_network_keeps_its_threads_while_detect_py_runs_the_rest_on_one(monkeypatch):
    """Resize and NMS are faster on one thread (a second one costs a scheduler slice per
    operation on a loaded machine); the network runs on the threads the runner was made with."""
    seen = {}

    def forward(x):
        seen["network"] = torch.get_num_threads()
        return torch.zeros(len(x), 2 * 2 * 13)

    def decode(*args, **kwargs):
        seen["decode"] = torch.get_num_threads()
        return decode_predictions(*args, **kwargs)

    monkeypatch.setattr(predict, "decode_predictions", decode)
    runner = Runner(forward, 2, 2, 3, 128, NAMES, torch.device("cpu"), "test", threads=2)
    args = type("Args", (), {"conf_threshold": 0.2, "nms_iou": 0.5, "max_det": 10})
    with inference.intra_op_threads(2):
        predict.predict_images(runner, [torch.zeros(3, 40, 60, dtype=torch.uint8)], args)
        assert torch.get_num_threads() == 2
    assert seen == {"network": 2, "decode": 1}


def test_half_on_the_cpu_is_a_user_error():
    with pytest.raises(UserError, match="--half needs a GPU"):
        inference.torch_runner(tiny_model(), NAMES, torch.device("cpu"), Backend(dtype=torch.float16))


# --------------------------------------------------------------------------- onnxruntime
@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("onnx")
    model = tiny_model()
    export.export(model, NAMES, root, ["onnx"], raw=True, check=False)
    return root / "model.onnx", save(model, root / "tiny.pt"), model


def test_onnx_backend_gives_eager_boxes_and_carries_the_layout(onnx_files):
    path, _, model = onnx_files
    runner = inference.load(path)
    assert (runner.S, runner.B, runner.C, runner.input_size, runner.names) == (2, 2, 3, 128, NAMES)
    x = images(4)
    assert_same_boxes(boxes(runner(x)), boxes(model(x).detach()))


def test_detect_py_on_the_onnx_file_gives_the_checkpoints_boxes(onnx_files, tmp_path):
    path, ckpt, _ = onnx_files
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8)
        from PIL import Image
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    got = {}
    for source, name in ((ckpt, "pt"), (path, "onnx")):
        detect.main([str(source), str(tmp_path), "--conf-threshold", "0.05", "--save-json",
                     "--project", str(tmp_path / "runs"), "--name", name])
        records = json.loads((tmp_path / "runs" / name / "detections.json").read_text())["images"]
        got[name] = [[[d["class_id"], d["score"], *d["box"]] for d in r["detections"]] for r in records]
    assert sum(map(len, got["pt"])) >= 3
    for o, p in zip(got["onnx"], got["pt"], strict=True):
        assert [d[0] for d in o] == [d[0] for d in p]
        np.testing.assert_allclose(np.array(o), np.array(p), atol=0.02, rtol=0)  # pixels, 2 decimals


def test_detect_txt_on_the_onnx_file_gives_the_checkpoints_detections(onnx_files, tmp_path):
    """detect_txt.py (and test.py, through the same predict.predict_files) take an ONNX
    file in place of the checkpoint: a folder of images, the same detection files."""
    import detect_txt
    from PIL import Image

    path, ckpt, _ = onnx_files
    (tmp_path / "photos").mkdir()
    for i in range(3):
        pixels = np.random.default_rng(10 + i).integers(0, 256, (100, 90 + 20 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "photos" / f"{i}.jpg", quality=90)
    rows = {}
    for source, name in ((ckpt, "pt"), (path, "onnx")):
        detect_txt.main([str(source), "--data", str(tmp_path / "photos"), "--conf-threshold", "0.05",
                         "--project", str(tmp_path / "runs"), "--name", name])
        rows[name] = [[line.split() for line in f.read_text().splitlines()]
                      for f in sorted((tmp_path / "runs" / name / "detections").iterdir())]
    assert len(rows["pt"]) == 3 and sum(map(len, rows["pt"])) >= 3
    for o, p in zip(rows["onnx"], rows["pt"], strict=True):
        assert [r[0] for r in o] == [r[0] for r in p]                       # the same classes
        np.testing.assert_allclose(np.array([r[1:] for r in o], float), np.array([r[1:] for r in p], float),
                                   atol=0.02, rtol=0)                       # pixels, 2 decimals


def fake_onnx(path, outputs: dict, metadata: dict | None):
    """A small hand-made ONNX graph: images (N, 3, 128, 128) -> the given (N, k) outputs."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
                    helper.make_node("Flatten", ["pooled"], ["flat"])], []
    for name, k in outputs.items():
        inits.append(helper.make_tensor(f"w_{name}", TensorProto.FLOAT, [3, k], [0.1] * 3 * k))
        nodes.append(helper.make_node("MatMul", ["flat", f"w_{name}"], [name]))
    graph = helper.make_graph(
        nodes, "fake", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 128, 128])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", k]) for name, k in outputs.items()],
        inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, str(path))
    return path


LAYOUT = {"S": 2, "B": 2, "C": 3, "input_size": 128, "class_names": json.dumps(NAMES)}


@pytest.mark.parametrize("case, message", [
    ("decoded", "export.py CHECKPOINT --include onnx --raw"),
    ("wrong shape", "do not fit S=2, B=2, C=3: expected (N, 3, 128, 128) and (N, 52)"),
    ("no metadata", "export the model with export.py"),
    ("not onnx", "not a loadable ONNX model"),
    ("missing", "no such file"),
])
def test_unusable_onnx_file_is_a_one_line_error_naming_it(case, message, tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    if case == "decoded":
        fake_onnx(path, {"boxes": 32, "scores": 24}, LAYOUT)
    elif case == "wrong shape":
        fake_onnx(path, {"output": 50}, LAYOUT)
    elif case == "no metadata":
        fake_onnx(path, {"output": 52}, None)
    elif case == "not onnx":
        path.write_text("not a model")
    with pytest.raises(UserError) as err:
        inference.load(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_fake_onnx_with_the_right_layout_loads(tmp_path):
    """The error cases above fail for the reason they name, not for a broken fake graph."""
    pytest.importorskip("onnxruntime")
    runner = inference.load(fake_onnx(tmp_path / "model.onnx", {"output": 52}, LAYOUT))
    assert runner(images(2)).shape == (2, 52)


def test_missing_onnxruntime_and_flags_for_onnx_are_one_line_errors(tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"unread")
    image = tmp_path / "a.png"
    image.write_bytes(b"unread")
    for argv, message in (([str(path), str(image), "--compile"], "--compile and --half apply to a checkpoint"),
                          ([str(path), str(image)], "needs the 'onnxruntime' package: pip install onnxruntime")):
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
        with pytest.raises(SystemExit) as exc:
            utils.run_cli(detect.main, argv + ["--project", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()
