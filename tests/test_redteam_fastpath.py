"""--backend auto: the fastest correct path for the job (inference.for_job).

On the CPU a job of enough images runs the loaded network exported in-process under
onnxruntime, checked against PyTorch on the first batch; a missing package or a failed
export falls back to PyTorch with one line saying why; the temporary ONNX file never
outlives the export. Most tests use a stand-in onnxruntime session (``TorchSession``)
so that only two tests pay for a real export (seconds each).
"""
from __future__ import annotations

import importlib.util
import math
import tempfile

import numpy as np
import pytest
import torch

import detect
import detect_txt
import inference
import predict
import test as test_script
import utils
from inference import Backend, FirstBatchCheck, Runner
from dataset import load_class_names
from model import build_model
from test_inference import NAMES, save, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread
CPU = torch.device("cpu")


def default_runner(device=CPU) -> Runner:
    return inference.torch_runner(tiny_model(), NAMES, device, Backend())


class TorchSession:
    """An onnxruntime.InferenceSession stand-in computing ``fn`` (numpy in, numpy out)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def get_inputs(self):
        return [type("Input", (), {"name": "images"})]

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def run(self, outputs, feeds):
        self.calls += 1
        with torch.inference_mode():
            return [self.fn(torch.from_numpy(feeds["images"])).numpy()]


def fake_export(monkeypatch, fn=None) -> list:
    """inference.export_session replaced by a TorchSession (the network itself by default)."""
    made = []

    def export_session(module, size, device):
        made.append(TorchSession(fn or module))
        return made[-1]
    monkeypatch.setattr(inference, "export_session", export_session)
    return made


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(n))


def without_package(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


# --------------------------------------------------------------------------- the choice
def test_auto_exports_from_the_threshold_on_and_only_on_the_cpu(monkeypatch):
    made = fake_export(monkeypatch)
    runner = default_runner()
    small = inference.auto_onnx_min_images(runner.module)
    assert small == 200  # a tiny network: the small networks' bound (Fast YOLO's)
    assert inference.for_job(runner, small - 1) is runner and made == []
    fast = inference.for_job(runner, small)
    assert fast is not runner and len(made) == 1 and fast.description.startswith("onnxruntime (CPU")
    assert inference.for_job(runner, math.inf).description.startswith("onnxruntime")  # a video, a stream
    # --backend torch, and a GPU under auto: PyTorch whatever the job (the GPU's rule is unchanged)
    assert inference.for_job(runner, math.inf, "torch") is runner
    on_gpu = Runner(runner.forward, 2, 2, 3, 128, NAMES, torch.device("cuda"), "gpu", module=runner.module)
    assert inference.for_job(on_gpu, math.inf) is on_gpu and len(made) == 2
    # --backend onnx: whatever the job size
    assert inference.for_job(runner, 1, "onnx").description.startswith("onnxruntime") and len(made) == 3


def test_the_large_networks_bound_is_yolov1s():
    yolov1 = torch.nn.Linear(1, 1)
    yolov1.weight = torch.nn.Parameter(torch.empty(271_716_734, 1, device="meta"))
    assert inference.auto_onnx_min_images(yolov1) == inference.AUTO_ONNX_MIN_IMAGES[-1][1] > 200


def test_explicit_choices_win_over_auto(monkeypatch, tmp_path):
    """--compile (--backend compile) and --half are not the default backend: auto leaves them."""
    made = fake_export(monkeypatch)
    monkeypatch.setattr(inference, "compile_model", lambda net, device, mode: net)  # not torch.compile's 5 s import
    args = test_script.build_parser().parse_args([str(save(tiny_model(), tmp_path / "m.pt")), "--backend", "compile"])
    compiled = predict.open_runner(args)
    assert compiled.pad_batches and compiled.module is None
    assert predict.for_job(compiled, math.inf, args) is compiled and made == []


def test_a_missing_package_falls_back_with_one_line(monkeypatch, capsys):
    made = fake_export(monkeypatch)
    runner = default_runner()
    for package in ("onnxruntime", "onnxscript"):
        without_package(monkeypatch, package)
        assert inference.for_job(runner, 10_000) is runner and made == []
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pip install {package}" in err and "batch norm folded" in err, err
        with pytest.raises(utils.UserError, match=f"--backend onnx: the '{package}' package is not installed"):
            inference.for_job(runner, 1, "onnx")
        monkeypatch.undo()
        made = fake_export(monkeypatch)


def test_auto_does_not_export_what_the_memory_cannot_hold(monkeypatch, capsys):
    """Risk guarded: the export holds about twice the weights on top of PyTorch's copy
    (YOLOv1: 5.3 GB peak against 3.0 GB); --backend auto must not turn an evaluation that
    fits into one the kernel kills. Too little memory: the default runs, with one line;
    an explicit --backend onnx is the user's choice and still exports."""
    made = fake_export(monkeypatch)
    runner = default_runner()
    weights = sum(p.numel() * p.element_size() for p in runner.module.parameters())
    assert inference.memory_short(runner.module, available=3 * weights) is None
    assert "needs about" in inference.memory_short(runner.module, available=2 * weights)
    monkeypatch.setattr(inference, "available_memory", lambda: 2 * weights)
    assert inference.for_job(runner, 10_000) is runner and made == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "of memory is available" in err and "batch norm folded" in err, err
    assert inference.for_job(runner, 1, "onnx").description.startswith("onnxruntime") and len(made) == 1
    assert inference.available_memory() is None or inference.available_memory() > 0


def test_a_failed_export_falls_back_with_one_line_and_leaves_no_file(monkeypatch, tmp_path, capsys):
    """An exporter that dies half-way through its file: onnxruntime refuses what it wrote,
    one line says so, and the temporary folder is gone (on this error path too)."""
    pytest.importorskip("onnxruntime")
    written = []

    def half_export(module, args, f, **kwargs):
        written.append(f)
        with open(f, "wb") as file:
            file.write(b"\x08\x07half an ONNX file")
    monkeypatch.setattr(torch.onnx, "export", half_export)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = default_runner()
    assert inference.for_job(runner, 10_000) is runner
    err = capsys.readouterr().err
    assert len(written) == 1 and list(tmp_path.iterdir()) == []
    assert err.count("\n") == 1 and "exporting the network to onnxruntime failed" in err, err
    assert "not a loadable ONNX model" in err and "batch norm folded + channels_last" in err
    with pytest.raises(utils.UserError, match=r"--backend onnx: exporting the network failed .*not a loadable"):
        inference.for_job(runner, 1, "onnx")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the first-batch check
@pytest.mark.parametrize("plant", ["10x the tolerance", "NaN", "wrong shape"])
def test_the_first_batch_check_refuses_a_disagreement(plant, monkeypatch, capsys):
    """A session whose output is off by more than float32 rounding (or NaN, or misshapen)
    is dropped after the first batch: that batch and the next come from PyTorch."""
    def planted(x):
        out = runner.module(x.contiguous(memory_format=torch.channels_last)).clone()
        if plant == "wrong shape":
            return out[:, :-1]
        out[0, 5] += 10 * inference.FIRST_BATCH_TOLERANCE * out.abs().max() if plant[0] == "1" else math.nan
        return out
    made = fake_export(monkeypatch, planted)
    runner = default_runner()
    fast = inference.for_job(runner, 10_000)
    x, y = images(3), images(2)
    assert torch.equal(fast(x), runner(x)) and torch.equal(fast(y), runner(y))
    assert made[0].calls == 1  # the session ran the first batch only
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from PyTorch's" in err and "on the first batch" in err, err
    assert fast.description == runner.description


def test_the_first_batch_check_accepts_float32_rounding_then_runs_alone(monkeypatch, capsys):
    """Within the tolerance, the session's own output is used, and PyTorch is not run again."""
    rounding = 2e-5  # a raw output of order 1 moved as onnxruntime's reordered sums move it
    made = fake_export(monkeypatch, lambda x: runner.module(x) + rounding)
    runner = default_runner()
    fast = inference.for_job(runner, 10_000)
    calls = []
    monkeypatch.setattr(runner, "forward", lambda x: calls.append(1) or runner.module(x))
    x = images(3)
    got = fast(x)
    torch.testing.assert_close(got, runner.module(x) + rounding)
    fast(images(2))
    assert made[0].calls == 2 and len(calls) == 1 and capsys.readouterr().err == ""
    assert fast.forward.reference is None  # the PyTorch network is no longer held


def test_first_batch_tolerance_is_relative_to_the_outputs_size():
    big = Runner(lambda x: torch.full((len(x), 4), 1000.0), 1, 1, 1, 8, ["a"], CPU, "ref")
    check = FirstBatchCheck(lambda x: torch.full((len(x), 4), 1000.05), big)
    assert check(torch.zeros(1, 3, 8, 8))[0, 0].item() == pytest.approx(1000.05)  # 5e-5 of 1000: rounding
    check = FirstBatchCheck(lambda x: torch.full((len(x), 4), 1000.2), big)
    assert check(torch.zeros(1, 3, 8, 8))[0, 0].item() == 1000.0  # 2e-4 of it: refused


# --------------------------------------------------------------------------- real export, real scripts
def test_test_py_on_the_bundled_data_gives_the_defaults_boxes_and_leaves_no_file(monkeypatch, tmp_path, capsys):
    """test.py --backend onnx (a real in-process export, onnxruntime) against --backend torch
    on data/test.csv (100 images): the same boxes and classes up to float32 rounding, the
    same metrics, one line naming the backend, and the temporary ONNX folder gone."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = build_model("fast", S=2, width=1 / 16)  # VOC's 20 classes, as data/ is labelled
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # trained-like statistics: folding them matters
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.3, 2)
        model.head[-1].weight.mul_(20)
        model.head[-1].bias.uniform_(0, 1)
    ckpt = tmp_path / "tiny.pt"
    utils.save_checkpoint({"kind": "yolo", "model": model.eval().state_dict(), "model_config": model.config,
                           "class_names": list(load_class_names())}, ckpt)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    results, dets = {}, {}
    real_predict = predict.predict_files

    def keep(runner, paths, args, keep_outputs=False):
        found = real_predict(runner, paths, args, keep_outputs)
        dets[args.backend] = found[0]
        return found
    monkeypatch.setattr(predict, "predict_files", keep)
    for backend in ("torch", "onnx"):
        args = test_script.build_parser().parse_args([str(ckpt), "--data", "data/test.csv", "--backend", backend,
                                                      "--conf-threshold", "0.05"])
        results[backend] = test_script.evaluate_checkpoint(args)
    assert results["torch"]["backend"] == "float32 + batch norm folded + channels_last"
    assert results["onnx"]["backend"].startswith("onnxruntime (CPU, exported in-process")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sum(len(d) for d in dets["torch"].values()) >= 100 and dets["torch"].keys() == dets["onnx"].keys()
    for i, want in dets["torch"].items():
        got = dets["onnx"][i]
        assert got.shape == want.shape and np.array_equal(got[:, 0], want[:, 0])
        np.testing.assert_allclose(got[:, 1], want[:, 1], atol=1e-4, rtol=0)   # scores
        np.testing.assert_allclose(got[:, 2:], want[:, 2:], atol=0.02, rtol=0)  # pixels
    assert results["onnx"]["voc"]["mAP"] == pytest.approx(results["torch"]["voc"]["mAP"], abs=1e-6)
    assert "note:" not in capsys.readouterr().err  # no fallback: the check passed


# --------------------------------------------------------------------------- the scripts' options
@pytest.mark.parametrize("argv, message", [
    (["--backend", "fastest"], "argument --backend: invalid choice: 'fastest'"),
    (["--backend", "onnx", "--compile"], "--compile and --backend onnx contradict each other"),
    (["--backend", "torch", "--compile"], "--compile and --backend torch contradict each other"),
    (["--backend", "onnx", "--half"], "--half and --backend onnx contradict each other"),
])
def test_wrong_backend_options_are_one_line(argv, message, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    ckpt, out = str(tmp_path / "missing.pt"), ["--project", str(tmp_path / "runs")]
    for main, args in ((detect.main, [ckpt, str(tmp_path / "a.png"), *out]), (detect_txt.main, [ckpt, *out]),
                       (test_script.main, [ckpt])):
        with pytest.raises(SystemExit) as exc:
            utils.run_cli(main, args + argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and message in err, (main, err)
    assert not (tmp_path / "runs").exists()


def test_an_onnx_file_with_backend_torch_is_one_line(tmp_path, capsys):
    args = test_script.build_parser().parse_args([str(tmp_path / "m.onnx"), "--backend", "torch"])
    with pytest.raises(utils.UserError, match=r"--backend torch: .*m\.onnx is an ONNX file, run by onnxruntime"):
        predict.open_runner(args)


def test_help_explains_the_backends(capsys):
    with pytest.raises(SystemExit):
        test_script.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--backend {auto,torch,onnx,compile}" in text and "checked against PyTorch on the first batch" in text


def test_detect_py_counts_images_and_video_frames_and_streams_are_unbounded(tmp_path):
    from test_detect import make_video

    pytest.importorskip("av")
    make_video(tmp_path / "clip.mp4", frames=7)
    assert detect.job_size([tmp_path / "a.jpg"] * 3, [tmp_path / "clip.mp4"]) == 10
    assert detect.job_size([], [detect.Stream("rtsp://camera/stream")]) == math.inf
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert detect.job_size([tmp_path / "a.jpg"], [tmp_path / "bad.mp4"]) == 1  # reported in its turn
