"""Inference backends: a trained detector as a fast callable for one device.

    runner = inference.load("best.pt", "cpu")                     # the default for the device
    runner = inference.load("best.pt", "cuda", Backend(dtype=torch.float16, compile=True))
    runner = inference.load("model.onnx", "cpu")                  # onnxruntime (export.py --raw)
    runner = inference.for_job(runner, len(dataset))   # the fastest correct path for the job
    raw = runner(images)   # float (N, 3, size, size) RGB in [0, 1] -> float32 (N, S*S*(C+5B))

A runner also carries what decoding needs (``S``, ``B``, ``C``, ``input_size``, ``names``,
``device``), so ``utils.decode_predictions(runner(x), runner.S, runner.B, runner.C)`` gives
the boxes. Every backend computes the same network; bench/bench_detect.py measures them
and checks each one's boxes against eager float32 (BENCHMARKS.md, "Detection speed").

* eager: the model as trained (``model.load_detector``): the reference.
* the default: batch norm folded into the convolutions before it (its running
  statistics are constants at test time) and the channels_last memory layout, which
  oneDNN's and cuDNN's convolutions prefer. Same numbers up to float32 rounding.
* ``compile=True``: ``torch.compile`` of the fused model; inductor's freezing folds the
  weights into constants and pre-packs them for oneDNN. On a GPU, mode
  ``reduce-overhead`` (CUDA graphs: one launch per batch instead of one per layer).
  Start-up on the CPU 20-40 s the first time, seconds from inductor's cache: for videos
  and folders.
* ``dtype=torch.float16`` or ``bfloat16`` (GPU only; detect.py ``--half``: float16).
* an ``.onnx`` file: onnxruntime with all graph optimisations, as many intra-op threads
  as torch uses, and the CUDA provider on a GPU (``pip install onnxruntime-gpu``).
  The file must hold the raw network output (``python export.py CKPT --include onnx --raw``).
* :func:`for_job` (the scripts' ``--backend auto``): on the CPU, a job of enough images
  exports the default runner's network in-process and runs it under onnxruntime, checked
  on the first batch against PyTorch; a missing package or a failed export falls back to
  the default with one line.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import math
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from darknet_model import fold_into_conv, to_channels_last
from model import load_detector
from plots import require
from utils import UserError


@dataclass(frozen=True)
class Backend:
    """How to run a checkpoint (the default: :func:`default_backend`'s choice)."""

    fold_bn: bool = True         # batch norm folded into the convolutions
    channels_last: bool = True   # the NHWC memory layout oneDNN and cuDNN prefer
    compile: bool = False        # torch.compile (GPU: CUDA graphs)
    dtype: torch.dtype = torch.float32  # float16 / bfloat16: GPU only
    compile_mode: str | None = None  # override torch.compile's mode (None: per device)

    def describe(self) -> str:
        parts = [str(self.dtype).removeprefix("torch.")]
        parts += ["batch norm folded"] if self.fold_bn else []
        parts += ["channels_last"] if self.channels_last else []
        parts += [f"torch.compile ({self.compile_mode or 'default'})"] if self.compile else []
        return " + ".join(parts) if len(parts) > 1 else parts[0] + " eager"


EAGER = Backend(fold_bn=False, channels_last=False)  # the reference


def default_backend(device: torch.device) -> Backend:
    """The fastest correct path that starts at once: batch norm folded, channels_last,
    float32, on every device (1.4-1.5x eager float32 on the CPU: BENCHMARKS.md section 6).

    ``compile`` is 1.9x faster again per image but costs 20-40 s of start-up on the CPU the
    first time; float16 on a GPU moves boxes by its rounding: both are asked for, not assumed.
    onnxruntime, faster still on the CPU, is :func:`for_job`'s choice once a job repays its
    export.
    """
    return Backend()


@dataclass
class Runner:
    """``runner(images)`` -> raw predictions ``(N, S*S*(C+5B))`` float32 on ``device``."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    S: int
    B: int
    C: int
    input_size: int
    names: list
    device: torch.device
    description: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    pad_batches: bool = False    # compiled graphs: pad a short batch rather than recompile
    input_device: torch.device | None = None  # where the input goes (onnxruntime: the host)
    threads: int = field(default_factory=torch.get_num_threads)  # intra-op threads of the network
    module: nn.Module | None = None  # the default backend's network, which for_job may export
    _sizes: set = field(default_factory=set)   # batch sizes compiled so far

    def batch_size_for(self, n: int) -> int:
        """The batch size to run ``n`` images at: with compiled graphs (one per batch size),
        the smallest already compiled that holds them, so that the last, shorter batch of a
        folder does not compile again (a minute on the CPU); zeros fill the rest."""
        if not self.pad_batches or n in self._sizes:
            return n
        size = min((s for s in self._sizes if s > n), default=n)
        self._sizes.add(size)
        return size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        images = images.to(self.input_device or self.device, self.dtype, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        size = self.batch_size_for(n)
        if size > n:
            images = torch.cat((images, images.new_zeros(size - n, *images.shape[1:])))
        with torch.inference_mode(), intra_op_threads(self.threads):
            out = self.forward(images)[:n].float()
        # CUDA graphs hand back the same output buffer at every call: copy it out.
        return out.clone() if self.pad_batches else out


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to ``n`` for a block. The network is worth every
    core; the small per-image operations around it (resize, decoding, NMS) are faster on one
    thread, and far faster when other processes load the cores: waking a second OpenMP thread
    then costs a scheduler slice per operation (detect.py's pipeline, measured under load:
    260 ms instead of 330 ms per frame; the same when the machine is idle)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------- PyTorch
def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each Conv2d -> BatchNorm2d pair (darknet_model.conv_block)
    folded into one convolution (darknet_model.fold_into_conv: ``torch.nn.utils.fusion``
    with Darknet's own divisor for a DarknetBatchNorm2d)."""
    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if not isinstance(block, nn.Sequential):
            continue
        for i in range(len(block) - 1):
            if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                block[i] = fold_into_conv(block[i], block[i + 1])
                block[i + 1] = nn.Identity()
    return model


def compile_model(model: nn.Module, device: torch.device, mode: str | None = None) -> Callable:
    """``torch.compile`` for inference: CUDA graphs on a GPU; on the CPU inductor's freezing
    (weights become constants: oneDNN packs them once instead of at every call, and the
    leaky ReLU runs inside the convolution)."""
    # dynamic=False: one static graph per batch size (Runner pads a short last batch);
    # a dynamic batch axis would cost the static graph's speed.
    if device.type == "cuda":
        return torch.compile(model, mode=mode or "reduce-overhead", dynamic=False)
    compiled = torch.compile(model, mode=mode, dynamic=False)

    def forward(images: torch.Tensor) -> torch.Tensor:
        # Compilation happens at a call (the first, or a new batch size). Freezing must be
        # set in inductor's config then: torch.compile(options={"freezing": True}) does not
        # reach the pass that packs the weights (measured: 0 packed convolutions, 2x slower).
        with torch._inductor.config.patch(freezing=True):
            return compiled(images)
    return forward


def torch_runner(model: nn.Module, names, device: torch.device, backend: Backend) -> Runner:
    """A :class:`Runner` of a loaded float32 model (in eval mode) with ``backend``."""
    if backend.dtype != torch.float32 and device.type != "cuda":
        # The project never computes in reduced precision on the CPU: this AVX2 CPU has no
        # float16/bfloat16 arithmetic, so it is slower than float32 as well as less exact.
        raise UserError("--half needs a GPU: on the CPU float16 is slower than float32")
    if backend.fold_bn:
        net = fold_batch_norm(model)
    elif backend.channels_last or backend.dtype != torch.float32:
        net = copy.deepcopy(model)  # .to() below changes a module in place: leave the caller's alone
    else:
        net = model
    net = net.to(device, backend.dtype)
    if backend.channels_last:
        net = to_channels_last(net)
    forward = compile_model(net, device, backend.compile_mode) if backend.compile else net
    plain = not backend.compile and backend.dtype == torch.float32
    return Runner(forward, model.S, model.B, model.C, model.input_size, list(names), device,
                  backend.describe(), backend.dtype, backend.channels_last, pad_batches=backend.compile,
                  module=net if plain else None)


# --------------------------------------------------------------------------- onnxruntime
def onnx_providers(device: torch.device) -> list:
    """onnxruntime's execution providers for ``device``; a UserError if it cannot run there."""
    require("onnxruntime", "onnxruntime", "running an ONNX model")
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError(f"running an ONNX model on {device} needs onnxruntime's CUDA provider: "
                        "pip install onnxruntime-gpu")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def onnx_session(path: Path, device: torch.device):
    """An onnxruntime session with every graph optimisation and torch's thread count."""
    providers = onnx_providers(device)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own (Fail, InvalidProtobuf, ...) classes
        raise UserError(f"{path}: not a loadable ONNX model ({' '.join(str(err).split())[:200]})") from None


def onnx_layout(path: Path, session) -> dict:
    """S, B, C, input size and class names from export.py's metadata, checked against the
    graph's input and output shapes."""
    meta = session.get_modelmeta().custom_metadata_map
    try:
        S, B, C, size = (int(meta[k]) for k in ("S", "B", "C", "input_size"))
        names = json.loads(meta["class_names"])
    except (KeyError, ValueError) as err:
        raise UserError(f"{path}: no S, B, C, input_size and class_names metadata ({err}): "
                        "export the model with export.py") from None
    outputs = [o.name for o in session.get_outputs()]
    if outputs != ["output"]:
        raise UserError(f"{path}: outputs {', '.join(outputs)} (decoded boxes); running it needs "
                        "the raw network output: python export.py CHECKPOINT --include onnx --raw")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    if list(inp.shape[1:]) != [3, size, size] or out.shape[1:] != [S * S * (C + 5 * B)]:
        raise UserError(f"{path}: input {inp.shape} and output {out.shape} do not fit S={S}, B={B}, "
                        f"C={C}: expected (N, 3, {size}, {size}) and (N, {S * S * (C + 5 * B)})")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UserError(f"{path}: its class_names metadata is not a JSON list of strings")
    if len(names) != C:
        raise UserError(f"{path}: {len(names)} class names for C={C} classes")
    return {"S": S, "B": B, "C": C, "input_size": size, "names": names}


def onnx_runner(path: Path, device: torch.device) -> Runner:
    session = onnx_session(path, device)
    layout = onnx_layout(path, session)
    return Runner(session_forward(session, device), layout["S"], layout["B"], layout["C"],
                  layout["input_size"], layout["names"], device,
                  f"onnxruntime ({onnx_provider(session)}, {path.name})", input_device=torch.device("cpu"))


def session_forward(session, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    name = session.get_inputs()[0].name

    def forward(images: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {name: images.cpu().numpy()})
        return torch.from_numpy(out).to(device)
    return forward


def onnx_provider(session) -> str:
    return session.get_providers()[0].replace("ExecutionProvider", "")


# --------------------------------------------------------------------------- the choice for a job
BACKENDS = ("auto", "torch", "onnx", "compile")  # the scripts' --backend
# --backend auto on the CPU: jobs of at least this many images run under onnxruntime (the
# loaded network exported in-process), smaller ones on the default backend. The export and
# onnxruntime's session cost start-up that only enough images repay (BENCHMARKS.md section
# 6, "The automatic choice"): measured per network size, by parameters below the bound.
AUTO_ONNX_MIN_IMAGES = ((100e6, 200), (math.inf, 400))
# The first batch's raw outputs may differ by float32 rounding (onnxruntime fuses and
# reorders the convolutions' sums; measured up to 2.1e-5 of the largest output, as
# export.RTOL says), relative to the largest output (at least 1: confidences and box
# coordinates are of order 1).
FIRST_BATCH_TOLERANCE = 1e-4


def auto_onnx_min_images(module: nn.Module) -> int:
    """The job size from which --backend auto exports ``module`` to onnxruntime on the CPU."""
    parameters = sum(p.numel() for p in module.parameters())
    return next(images for bound, images in AUTO_ONNX_MIN_IMAGES if parameters < bound)


def onnx_missing() -> str | None:
    """Why this machine cannot export and run a network under onnxruntime, or None."""
    for module in ("onnxruntime", "onnx", "onnxscript"):  # torch.onnx's exporter needs the last two
        if importlib.util.find_spec(module) is None:
            return f"the '{module}' package is not installed (pip install {module})"
    return None


# The export holds about twice the network's weights on top of PyTorch's copy while it runs
# (measured for YOLOv1, 1.09 GB of weights: 5.3 GB peak against 3.0 GB with PyTorch alone).
EXPORT_MEMORY_FACTOR = 2.5


def memory_short(module: nn.Module, available: int | None = None) -> str | None:
    """Why exporting ``module`` might exhaust this machine's memory, or None: --backend auto
    must not turn an evaluation that fits into one that is killed (YOLOv1 on a laptop)."""
    needed = EXPORT_MEMORY_FACTOR * sum(p.numel() * p.element_size() for p in module.parameters())
    available = available_memory() if available is None else available
    if available is None or needed <= available:
        return None
    return (f"exporting the network to onnxruntime needs about {needed / 2**30:.1f} GiB and "
            f"{available / 2**30:.1f} GiB of memory is available")


def available_memory() -> int | None:
    """Bytes of memory the kernel can give without swapping (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def export_session(module: nn.Module, input_size: int, device: torch.device):
    """``module`` exported by torch.onnx (export.py's exporter settings, raw output, a
    dynamic batch axis) and loaded by onnxruntime. The file lives in a temporary folder
    removed on every path, an error included: onnxruntime reads it whole at the start."""
    example = torch.rand(2, 3, input_size, input_size, device=next(module.parameters()).device)
    with tempfile.TemporaryDirectory(prefix="yolo-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # torch.export's and onnxscript's notes on the graph
            torch.onnx.export(module, (example,), str(path), input_names=["images"],
                              output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              opset_version=18, dynamo=True, external_data=False, verbose=False)
        return onnx_session(path, device)


class FirstBatchCheck:
    """onnxruntime's forward, checked once: on the first batch the PyTorch runner runs too,
    and a raw output further from its own than float32 rounding (FIRST_BATCH_TOLERANCE)
    sends that batch and every later one to PyTorch, with one line saying so."""

    def __init__(self, fast: Callable, reference: Runner):
        self.fast, self.reference = fast, reference
        self.runner: Runner | None = None  # the runner this forward belongs to (its description)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            return self.fast(images)
        got, want = self.fast(images), self.reference(images)
        diff = (got - want).abs().max().item() if got.shape == want.shape else math.inf
        limit = FIRST_BATCH_TOLERANCE * max(1.0, want.abs().max().item())
        if diff <= limit:  # NaN compares false: a NaN output is a disagreement
            self.reference = None  # checked: the PyTorch network may go (YOLOv1: 1.1 GB)
            return got
        note(f"onnxruntime's output differs from PyTorch's by up to {diff:.3g} on the first batch "
             f"(more than {limit:.2g}): running {self.reference.description} instead")
        self.fast = self.reference
        self.reference = None
        if self.runner is not None:
            self.runner.description, self.runner.input_device = self.fast.description, None
        return want


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def for_job(runner: Runner, images: float, choice: str = "auto") -> Runner:
    """The runner for a job of ``images`` images (``math.inf``: a video or a stream).

    ``choice`` ``"auto"``: on the CPU, a default-backend runner whose job is big enough
    (:func:`auto_onnx_min_images`) becomes its network exported in-process and run by
    onnxruntime, the fastest CPU path, checked on the first batch (:class:`FirstBatchCheck`);
    if onnxruntime is missing or the export fails, one line says why and the default runs.
    ``"onnx"``: the same whatever the job, and a failure is a UserError. Anything else, a
    runner that is not the default backend's (``--compile``, ``--half``, an ONNX file) or
    a GPU under ``"auto"``: ``runner`` as it is.
    """
    module = runner.module
    if choice not in ("auto", "onnx") or module is None:
        return runner
    if choice == "auto" and (runner.device.type != "cpu" or images < auto_onnx_min_images(module)):
        return runner
    fallback = f"running {runner.description} (PyTorch)"
    missing = onnx_missing() or (memory_short(module) if choice == "auto" else None)
    if missing:
        if choice == "onnx":
            raise UserError(f"--backend onnx: {missing}")
        note(f"{missing}: {fallback}, slower on the CPU than onnxruntime")
        return runner
    if choice == "onnx":
        onnx_providers(runner.device)  # a GPU without onnxruntime-gpu: its own one-line error
    try:
        session = export_session(module, runner.input_size, runner.device)
    except Exception as err:  # torch.onnx and onnxruntime raise many classes; any failure falls back
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        if choice == "onnx":
            raise UserError(f"--backend onnx: exporting the network failed ({reason})") from None
        note(f"exporting the network to onnxruntime failed ({reason}): {fallback}")
        return runner
    description = f"onnxruntime ({onnx_provider(session)}, exported in-process, checked on the first batch)"
    check = FirstBatchCheck(session_forward(session, runner.device), runner)
    fast = Runner(check, runner.S, runner.B, runner.C, runner.input_size, runner.names, runner.device,
                  description, input_device=torch.device("cpu"), threads=runner.threads)
    check.runner = fast
    return fast


# --------------------------------------------------------------------------- entry point
def load(path, device="cpu", backend: Backend | None = None) -> Runner:
    """A :class:`Runner` of a train.py checkpoint or a raw ONNX file (by its suffix)."""
    device, path = torch.device(device), Path(path)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        if backend is not None and (backend.compile or backend.dtype != torch.float32):
            raise UserError(f"{path}: --compile and --half apply to a checkpoint, not an ONNX model")
        return onnx_runner(path, device)
    if is_torchscript(path):
        raise UserError(f"{path}: a TorchScript file (export.py); this runs a train.py checkpoint, "
                        "or an ONNX file from export.py --raw")
    model, names = load_detector(path, device)
    return torch_runner(model, names, device, backend or default_backend(device))


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip holding ``code/`` and ``constants.pkl``): torch.load
    warned about it and load_checkpoint refused it as 'objects that could run code', which
    sent the user of export.py's own file looking for something malicious."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
