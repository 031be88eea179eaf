"""export.py: ONNX (run with onnxruntime) and TorchScript files against PyTorch.

One export of a tiny model (S=2, width 1/16: 128 px input) is shared by the module; the
ONNX exporter takes most of this file's time (torch.export tracing, about 8 s on 2 cores).
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import export
import utils
from model import build_model, load_detector
from utils import decode_predictions

# torch.jit is deprecated upstream (FutureWarning on load); TorchScript is still what
# C++ libtorch loads, so the tests keep loading it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

NAMES = ["cat", "dog", "person"]
# Exported graphs compute the same float32 operations as PyTorch; onnxruntime may fuse
# or reorder them, which moves results by a few ulps of values of order 1.
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: waking a second intra-op thread costs more than it saves, a lot more
    on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_checkpoint(path):
    """A tiny detector whose outputs vary with the input and often pass a 0.05 threshold
    (freshly initialised, all its scores are near 0)."""
    torch.manual_seed(0)
    model = build_model("yolov1", S=2, width=1 / 16, hidden=16, C=3)
    with torch.no_grad():
        model.head[-1].weight.mul_(20)
        model.head[-1].bias.uniform_(0, 1)
    utils.save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": model.config,
                           "class_names": NAMES}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(root / "tiny.pt")
    export.main([str(ckpt), "--project", str(root / "runs")])
    model, _ = load_detector(ckpt)
    return root / "runs" / "exp", model


def images(n, seed=1):
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def test_onnx_matches_pytorch_for_any_batch_size(exported):
    import onnxruntime

    out_dir, model = exported
    session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores"]
    for n in (1, 4):  # the export traced a batch of 2: the batch axis must be free
        x = images(n)
        boxes, scores = session.run(None, {"images": x.numpy()})
        want_boxes, want_scores = export.DecodedYOLO(model)(x)
        assert boxes.shape == (n, 8, 4) and scores.shape == (n, 8, 3)
        np.testing.assert_allclose(boxes, want_boxes.detach().numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(scores, want_scores.detach().numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("all_classes", [True, False])
def test_postprocess_of_onnx_outputs_gives_decode_predictions(exported, all_classes):
    """The documented numpy path (onnxruntime + export.postprocess) gives the detections
    that the PyTorch path (utils.decode_predictions) gives, by default every class of a box
    (bug: postprocess kept only each box's best class while decode_predictions, detect.py
    and Darknet score all, so an ONNX user got fewer detections), or the best one alone."""
    import onnxruntime

    out_dir, model = exported
    session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = images(6, seed=2)
    options = {} if all_classes else {"all_classes": False}
    got = export.postprocess(*session.run(None, {"images": x.numpy()}), conf_threshold=0.05, nms_iou=0.5, **options)
    want = decode_predictions(model(x), model.S, model.B, model.C, conf_threshold=0.05, nms_iou=0.5,
                              all_classes=all_classes)
    assert sum(len(w) for w in want) >= 6  # the comparison is not vacuous
    if all_classes:  # some box is a detection of two classes
        assert any(len(set(map(tuple, w[:, 2:].tolist()))) < len(w) for w in want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.detach().numpy(), atol=ATOL, rtol=0)


def test_onnx_file_carries_class_names_and_input_size(exported):
    import onnxruntime

    out_dir, model = exported
    session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == NAMES
    assert (int(meta["S"]), int(meta["B"]), int(meta["C"]), int(meta["input_size"])) == (2, 2, 3, 128)
    assert json.loads(meta["model_config"]) == model.config
    assert session.get_inputs()[0].name == "images"


def test_torchscript_loads_and_matches(exported):
    out_dir, model = exported
    extra = {"config.json": ""}
    loaded = torch.jit.load(str(out_dir / "model.torchscript.pt"), _extra_files=extra)
    config = json.loads(extra["config.json"])
    assert (config["class_names"], config["input_size"], config["model_config"]) == (NAMES, 128, model.config)
    x = images(3)
    for got, want in zip(loaded(x), export.DecodedYOLO(model)(x)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_raw_export_is_the_network_output(tmp_path):
    model, names = load_detector(tiny_checkpoint(tmp_path / "tiny.pt"))
    written = export.export(model, names, tmp_path, ["torchscript"], raw=True)
    loaded = torch.jit.load(str(written["torchscript"]))
    x = images(3)
    torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=0)


def run_cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(export.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_missing_onnx_packages_is_a_one_line_error_before_any_output(tmp_path, capsys, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    err = run_cli_error([str(ckpt), "--project", str(tmp_path / "runs")], capsys)
    assert "pip install onnxscript" in err
    assert not (tmp_path / "runs").exists()


def test_not_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    err = run_cli_error([str(bad), "--include", "torchscript", "--project", str(tmp_path / "runs")], capsys)
    assert "notes.pt" in err
    assert not (tmp_path / "runs").exists()


def test_the_check_after_the_export_fails_on_nan_outputs(tmp_path):
    """Bug: the check against PyTorch passed with ``max |diff| nan`` (``diff > ATOL`` is
    false for NaN): a model whose outputs are NaN was reported as exported correctly."""
    model, names = load_detector(tiny_checkpoint(tmp_path / "tiny.pt"))
    written = export.export(model, names, tmp_path, ["torchscript"], raw=True)
    assert export.check_export(written["torchscript"], "torchscript", model, 128) <= ATOL
    with torch.no_grad():
        model.head[-1].bias[0] = float("nan")  # PyTorch's outputs now hold NaN, the file's do not
    with pytest.raises(utils.UserError, match="outputs differ from PyTorch by up to nan"):
        export.check_export(written["torchscript"], "torchscript", model, 128)


def test_a_checkpoint_with_nan_weights_is_not_exported(tmp_path, capsys):
    """Bug: export.py exported (and 'checked') a checkpoint whose weights were NaN."""
    ckpt = utils.load_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt"))
    ckpt["model"]["head.4.bias"][1] = float("nan")
    utils.save_checkpoint(ckpt, tmp_path / "nan.pt")
    err = run_cli_error([str(tmp_path / "nan.pt"), "--include", "torchscript", "--project",
                         str(tmp_path / "runs")], capsys)
    assert f"{tmp_path / 'nan.pt'}: tensor 'head.4.bias' holds non-finite values (nan)" in err
    assert not (tmp_path / "runs").exists()
