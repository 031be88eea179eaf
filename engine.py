"""What every training script shares: arguments, run folder, distributed set-up,
learning-rate schedules, data loaders, checkpoints with exact resume, the training loop.

train.py (YOLO on VOC) and the three Darknet scripts all build on these pieces, so a
run folder, a checkpoint and a progress bar look the same whichever script made them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import plots  # stdlib only at import time: matplotlib loads when a plot is drawn
from evaluate import evaluate_detections
from utils import (Interrupted, UserError, decode_predictions, load_checkpoint, load_state_checked,
                   save_checkpoint)


# --------------------------------------------------------------------------- arguments
def add_training_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                      schedule: str, warmup_epochs: float, project: str) -> None:
    """Arguments shared by all training scripts; each script passes its paper defaults."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs to train (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="images per optimiser step, over all processes (default %(default)s)")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="split each batch into this many micro-batches (small GPUs); default 1")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="default %(default)s")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="paper: 0.0005")
    g.add_argument("--schedule", choices=("step", "cosine", "poly", "constant"), default=schedule,
                   help="learning-rate schedule after warm-up (default %(default)s)")
    g.add_argument("--milestones", type=float, nargs="*", default=[75, 105],
                   help="epochs at which 'step' multiplies the rate by --gamma (paper: 75 105)")
    g.add_argument("--gamma", type=float, default=0.1, help="'step' factor (default %(default)s)")
    g.add_argument("--poly-power", type=float, default=4.0, help="'poly' exponent (Darknet: 4)")
    g.add_argument("--warmup-epochs", type=float, default=warmup_epochs,
                   help="epochs of linear warm-up from --warmup-factor x lr (default %(default)s)")
    g.add_argument("--warmup-factor", type=float, default=0.1,
                   help="warm-up starts at this fraction of --lr (paper: 1e-3 -> 1e-2, so 0.1)")
    g.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip the gradient norm (0: off; train.py's paper recipe uses 10: the exact "
                        "gradient of equation 3 diverges at the paper's learning rate without it)")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss is NaN or infinite (counted in the log) "
                        "instead of stopping the run")
    r = parser.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    r.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="mixed precision: auto = on for CUDA, off on CPU (CPUs without native "
                        "bfloat16 run it hundreds of times slower)")
    r.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPU tensor cores)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the network (GPU: fused kernels, see BENCHMARKS.md; the "
                        "first steps are slow while it compiles)")
    r.add_argument("--workers", type=int, default=2, help="data-loading processes (default %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    r.add_argument("--project", default=project, help="parent folder of run folders (default %(default)s)")
    r.add_argument("--name", default="exp", help="run folder name; exp, exp2, ... if taken")
    r.add_argument("--resume", metavar="RUN_OR_CKPT", default=None,
                   help="continue a run exactly: its folder or one of its .pt files")
    r.add_argument("--auto-resume", action="store_true",
                   help="continue project/name from its last.pt if it has one, else start it (never "
                        "name2): rerun the same command after a crash or preemption, or let "
                        "torchrun --max-restarts do it")


def check_training_args(args: argparse.Namespace) -> None:
    """Reject nonsense before anything is written."""
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")


# --------------------------------------------------------------------------- devices and processes
@dataclass
class Dist:
    """Where this process runs and what it is among its peers (world_size 1 if alone)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: not a device name: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def setup_distributed(device_arg: str = "auto") -> Dist:
    """One process per device under ``torchrun``; a plain single process otherwise.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. NCCL carries the gradients between
    GPUs, gloo between CPU processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device=resolve_device(device_arg))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        warn_if_restarted_on_shared_store(rank)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def warn_if_restarted_on_shared_store(rank: int) -> None:
    """torchrun --max-restarts: recent torchrun hands restarted workers the store of the
    first attempt, whose stale addresses keep the new process group from connecting
    (pytorch/pytorch#167288). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt its own."""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and rank == 0:
        print("warning: torchrun restarted the workers on the store of its first attempt; if they "
              "fail to connect, start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
              "(pytorch/pytorch#167288)", file=sys.stderr, flush=True)


def cleanup_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def reduce_sums(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """Sum each value over all processes, so every rank sees the same totals."""
    if not dist.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=dist.device if dist.device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel."""
    return model.module if hasattr(model, "module") else model


def compile_model(model: torch.nn.Module, args) -> torch.nn.Module:
    """``--compile``: compile ``model`` in place (``nn.Module.compile``) before any DDP
    wrapping. Unlike ``torch.compile(model)`` this keeps the module itself, so state-dict
    keys, checkpoints and ``unwrap`` are those of the plain model."""
    if getattr(args, "compile", False):
        model.compile()
    return model


def amp_dtype(args, device: torch.device):
    """float16 on CUDA (bfloat16 where supported), nothing on CPU unless asked for."""
    if args.amp == "off" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------- run folder
def make_run_dir(project: str, name: str, exist_ok: bool = False) -> Path:
    """``project/name``, or ``name2``, ``name3``... if it is taken (as YOLOv5 does);
    with ``exist_ok``, ``project/name`` whether or not it exists."""
    root = Path(project)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder")
    candidate, k = root / name, 2
    while candidate.exists() and not exist_ok:
        candidate, k = root / f"{name}{k}", k + 1
    try:
        candidate.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as err:
        raise UserError(f"{candidate}: cannot create the run folder: {err.strerror}") from None
    return candidate


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """One JSON line per epoch in ``metrics.jsonl``. On resume, lines of epochs that the
    checkpoint does not include (written just before a kill) are dropped."""

    def __init__(self, run_dir: Path, keep_below_epoch: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if keep_below_epoch is not None and self.path.exists():
            rows = self.rows()  # without the half line a crash in the middle of a write leaves
            kept = "".join(json.dumps(r) + "\n" for r in rows if r.get("epoch", 0) < keep_below_epoch)
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text(kept)
            os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return plots.read_metrics(self.path)


# --------------------------------------------------------------------------- optimisation
def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (paper), or Adam (the original project's setting).

    Weight decay applies to weights only, not to biases and batch-norm parameters.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def lr_factor(epoch: float, args) -> float:
    """Learning rate at fractional ``epoch`` as a fraction of ``--lr``.

    The paper raises the rate from 1e-3 to 1e-2 over the first epochs, then holds 1e-2
    for 75 epochs, 1e-3 for 30 and 1e-4 for 30: 'step' with milestones 75, 105 and
    warm-up from 0.1. Darknet's ImageNet pretraining uses 'poly' (power 4).
    """
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


def build_scheduler(optimizer, args, steps_per_epoch: int):
    """A per-step LambdaLR following :func:`lr_factor` (the rate changes every step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step / steps_per_epoch, args))


# --------------------------------------------------------------------------- data loaders
class EpochSampler(torch.utils.data.Sampler):
    """This process's indices for one epoch, from any position in it.

    The order follows from (seed, epoch) alone; under DDP each of the world_size processes
    takes every world_size-th index of it, padded to equal shares as DistributedSampler
    does. ``start`` skips the samples already trained when a run resumes mid-epoch.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.epoch, self.start = 0, 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[:self.per_rank * self.world - self.n]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class SeededDataset(torch.utils.data.Dataset):
    """Each sample's random augmentation follows from (seed, epoch, index) alone.

    It then does not depend on which worker loads the sample, on how many workers
    there are, or on whether the run was interrupted and resumed.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1000003 + self.epoch) * 10000019 + index) % 2**63)
            return self.dataset[index]


def make_loader(dataset, batch_size: int, train: bool, workers: int, dist: Dist,
                seed: int, collate_fn=None) -> DataLoader:
    """A training loader whose batches depend only on (seed, epoch): see set_epoch.

    Under DDP each process reads its own shard of a per-process batch of
    ``batch_size / world_size``. The loader has a generator of its own: without one, each
    epoch's iterator draws its base seed from the global RNG, which a run resumed in the
    middle of an epoch would draw once more than the uninterrupted run (other dropout masks).
    """
    batch_size = max(1, batch_size // dist.world_size)
    sampler = EpochSampler(len(dataset), train, seed, dist.rank, dist.world_size)
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, pin_memory=dist.device.type == "cuda", drop_last=False,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Select ``epoch``'s order and augmentation, starting after ``start_batch`` batches."""
    loader.sampler.set_epoch(epoch, start_batch * loader.batch_size)
    loader.dataset.epoch = epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(model, optimizer, scheduler, scaler, epoch: int, best: float, args, kind: str,
                   extra: dict | None = None) -> dict:
    """Everything a resumed run needs; only tensors and plain Python types (weights_only).

    ``extra`` carries what a script adds, such as the class names of a detector.
    """
    bare = unwrap(model)
    return (extra or {}) | {
        "kind": kind, "epoch": epoch, "step": scheduler.last_epoch, "best": best,
        "model": bare.state_dict(), "model_config": dict(bare.config),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "args": {k: v for k, v in vars(args).items()},
        "rng": rng_state(),
    }


def find_resume_checkpoint(resume: str) -> Path:
    """``--resume`` takes a run folder (its last.pt) or a checkpoint file."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    return path


def restore_training_state(ckpt: dict, source: str, model, optimizer, scheduler, scaler, kind: str) -> None:
    if ckpt.get("kind") != kind:
        raise UserError(f"{source}: a {ckpt.get('kind', 'unknown')!r} checkpoint, not a {kind!r} one")
    source = ckpt.get("source", source)
    try:
        load_state_checked(unwrap(model), ckpt["model"], source)
    except UserError as err:
        saved, built = dict(ckpt.get("model_config") or {}), dict(getattr(unwrap(model), "config", {}))
        differ = [k for k in built if saved and saved.get(k) != built[k]]
        if not differ:
            raise
        was, now = (", ".join(f"{k}={config.get(k)!r}" for k in differ) for config in (saved, built))
        raise UserError(f"{source}: the checkpoint's model has {was}, this command builds {now}: resume "
                        f"with the run's own model arguments (its config.json); "
                        f"{str(err).removeprefix(f'{source}: ')}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])


def prepare_training(model, dataset, args, dist: Dist, ckpt: dict | None, kind: str, collate_fn=None):
    """The training loader, optimiser, per-step schedule, gradient scaler and AMP dtype,
    restored from ``ckpt`` when resuming: the same for every training script."""
    loader = make_loader(dataset, args.batch_size, True, args.workers, dist, args.seed, collate_fn)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, -(-len(loader) // args.accum_steps))
    dtype = amp_dtype(args, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    if ckpt is not None:
        restore_training_state(ckpt, args.resume, model, optimizer, scheduler, scaler, kind)
    return loader, optimizer, scheduler, scaler, dtype


def load_resume(args) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume and its run folder, or (None, None) for a new run.

    ``--auto-resume`` becomes ``--resume project/name/last.pt`` when that file exists. A
    damaged or missing last.pt falls back to last_prev.pt, saying so.
    """
    last = Path(args.project) / args.name / "last.pt"
    if not args.resume and getattr(args, "auto_resume", False) and (
            last.is_file() or previous_path(last).is_file()):
        args.resume = str(last)
    if not args.resume:
        return None, None
    path = Path(args.resume)
    path = path / "last.pt" if path.is_dir() else path
    try:
        path = find_resume_checkpoint(str(path))
        return load_training_state(path), path.parent
    except UserError as err:
        if not previous_path(path).is_file():
            raise
        print(f"warning: {err}; resuming from the previous checkpoint {previous_path(path)}", flush=True)
        return load_training_state(previous_path(path)), path.parent


def load_training_state(path: Path) -> dict:
    """A checkpoint to resume, with ``source``: the file it came from (for messages)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a training checkpoint (no 'model' state in it)")
    return ckpt | {"source": str(path)}


# --------------------------------------------------------------------------- the loop
class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: stop rather than train on garbage."""


def train_one_epoch(model, loader, step_fn, optimizer, scheduler, scaler, dist: Dist, args,
                    epoch: int, dtype=None, start_batch: int = 0, partial: dict | None = None,
                    stopper=None) -> dict:
    """One pass over ``loader`` (from ``start_batch`` on); returns per-image means of the logs.

    ``step_fn(model, batch, device) -> (loss, logs, n)``: the mean loss of the batch, a
    dict of detached per-batch means to log, and the batch size. Gradients are
    accumulated over ``args.accum_steps`` micro-batches; under DDP the gradient
    all-reduce is skipped for all but the last of them (``no_sync``). When ``stopper``
    reports a signal, the epoch ends after the next optimiser step and the result has
    ``"interrupted"``: the batches done and the running sums, to save and resume from.
    """
    model.train()
    acc = dict(partial or {"sums": {}, "seen": 0, "skipped": 0, "time": 0.0})
    acc["sums"], start = dict(acc["sums"]), time.perf_counter() - acc["time"]
    total, micro = start_batch + len(loader), max(1, args.accum_steps)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not dist.is_main,
               dynamic_ncols=True, leave=False, initial=start_batch, total=total)
    for i, batch in enumerate(bar, start=start_batch):
        last_micro = (i + 1) % micro == 0 or i + 1 == total
        sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            # The forward pass of a batch that --skip-nonfinite skips has already moved batch
            # norm's running statistics (to NaN, for NaN activations): they are put back.
            skip = getattr(args, "skip_nonfinite", False)
            buffers = [b.detach().clone() for b in model.buffers()] if skip else None
            with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
                loss, logs, n = step_fn(model, batch, dist.device)
            finite = check_finite(loss, logs, epoch, scheduler.last_epoch, args)
            if skip and dist.distributed:  # DDP's backward is collective: skip on every rank or none
                finite = all_ranks(finite, dist)
            if finite:
                scaler.scale(loss / micro).backward()
                accumulate(acc, logs, n)
            if last_micro:  # DDP averages the gradients in this backward pass, if it runs
                synced = finite
            if not finite:
                acc["skipped"] += 1
                with torch.no_grad():
                    for buffer, saved in zip(model.buffers(), buffers):
                        buffer.copy_(saved)
        if last_micro:
            if dist.distributed and not synced:
                average_gradients(model)
            optimizer_step(model, optimizer, scaler, args.grad_clip)
            scheduler.step()
            if stopper is not None and stopper.agreed(dist):
                acc["time"] = time.perf_counter() - start
                return {"interrupted": {"batch": i + 1, "partial": acc}}
        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{acc['seen'] / (time.perf_counter() - start):.1f}")
    return epoch_means(acc, dist, time.perf_counter() - start)


def average_gradients(model) -> None:
    """Average the accumulated gradients over the ranks by hand. DDP does it in the backward
    pass of a step's last micro-batch; when --skip-nonfinite skipped that one (on every rank
    at once), the earlier micro-batches' gradients (under ``no_sync``) are still each rank's
    own, and stepping on them would let the ranks' weights drift apart."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        world = torch_dist.get_world_size()
        for grad in grads:
            torch_dist.all_reduce(grad)
            grad.div_(world)


def all_ranks(flag: bool, dist: Dist) -> bool:
    """True on every rank if ``flag`` is true on every rank."""
    t = torch.tensor([float(flag)], device=dist.device if dist.device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    return bool(t.item())


def accumulate(acc: dict, logs: dict, n: int) -> None:
    acc["seen"] += n
    for k, v in logs.items():
        acc["sums"][k] = acc["sums"].get(k, 0.0) + float(v) * n


def epoch_means(acc: dict, dist: Dist, seconds: float) -> dict:
    """Per-image means over all processes, the image count, skipped steps and time."""
    totals = reduce_sums({**acc["sums"], "_n": acc["seen"], "_skipped": acc["skipped"]}, dist)
    # every rank skips together (all_ranks in train_one_epoch), so each counted every skip
    n, skipped = max(1.0, totals.pop("_n")), int(totals.pop("_skipped")) // dist.world_size
    row = {k: v / n for k, v in totals.items()} | {"images": int(n), "time_s": round(seconds, 2)}
    return row | ({"skipped_steps": skipped} if skipped else {})


class GracefulStop:
    """SIGTERM (a scheduler's time limit) or Ctrl-C: finish the step, save, exit cleanly.

    A second Ctrl-C interrupts at once. Under DDP the ranks agree (a max all-reduce each
    step) so that all of them stop after the same step.
    """

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def agreed(self, dist: Dist) -> bool:
        if not dist.distributed:
            return self.signal is not None
        flag = torch.tensor([self.signal is not None], dtype=torch.float32,
                            device=dist.device if dist.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        self.signal = self.signal or ("SIGTERM" if flag.item() else None)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_finite(loss, logs: dict, epoch: int, step: int, args) -> bool:
    """True for a finite loss. Otherwise stop with the step and the loss components
    named, or, with ``--skip-nonfinite``, report False so that the step is skipped."""
    if torch.isfinite(loss.detach()).all():
        return True
    if getattr(args, "skip_nonfinite", False):
        return False
    parts = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items())
    raise NonFiniteLoss(f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {step} "
                        f"({parts}); lower --lr, use --grad-clip or --skip-nonfinite, or check the data")


def optimizer_step(model, optimizer, scaler, grad_clip: float) -> None:
    if all(p.grad is None for group in optimizer.param_groups for p in group["params"]):
        return  # every micro-batch of this step was skipped (--skip-nonfinite)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def start_run(args, dist: Dist, kind: str):
    """Open the run folder (new, or the resumed run's) and record the resolved configuration.

    Returns ``(run_dir, checkpoint or None)``. Only rank 0 creates and writes files; the
    other ranks learn the folder name but never write to it.
    """
    check_training_args(args)
    ckpt, run_dir = load_resume(args)
    if ckpt is not None and ckpt.get("kind") != kind:
        raise UserError(f"{args.resume}: a {ckpt.get('kind', 'unknown')!r} checkpoint, not a {kind!r} one")
    if dist.distributed:
        check_same_checkpoint(ckpt, dist)
    if run_dir is None:
        exist_ok = getattr(args, "auto_resume", False)
        run_dir = (make_run_dir(args.project, args.name, exist_ok) if dist.is_main
                   else Path(args.project) / args.name)
        if dist.distributed:
            names = [str(run_dir)]
            torch_dist.broadcast_object_list(names, src=0)
            run_dir = Path(names[0])
    if dist.is_main:
        remove_stale_temporaries(run_dir)
        if ckpt is None:  # a resumed run records its configuration in fit(), once its state fits
            write_config(run_dir / "config.json", args, dist)
    return run_dir, ckpt


def write_config(path: Path, args, dist: Dist) -> None:
    write_json(path, {k: v for k, v in vars(args).items()} | {"world_size": dist.world_size,
                                                             "torch": torch.__version__})


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the ``.<name>.tmp`` files that a run killed while saving left in its folder
    (half-written checkpoints can be as large as the real ones)."""
    for stale in run_dir.glob(".*.tmp"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def check_same_checkpoint(ckpt: dict | None, dist: Dist) -> None:
    """Every rank must start from the same checkpoint (or none): a node that cannot see
    the run folder would otherwise start afresh beside the others' resumed run."""
    steps = [None] * dist.world_size
    torch_dist.all_gather_object(steps, None if ckpt is None else ckpt["step"])
    if len(set(steps)) > 1:
        raise UserError(f"the processes found different checkpoints to resume (steps {steps} by rank): "
                        "the run folder must be on storage that every node sees")


def fit(model, loader, step_fn, evaluate_fn, optimizer, scheduler, scaler, dist: Dist, args,
        run_dir: Path, kind: str, metric: str, resume: dict | None = None,
        dtype=None, extra: dict | None = None, on_epoch_end=None) -> float:
    """The epoch loop: train, evaluate, log one line, save ``last.pt`` and ``best.pt``,
    redraw the run's plots. Returns the best ``metric``.

    ``evaluate_fn(model, epoch) -> dict`` (or None to skip) runs on every rank, so
    metrics can be reduced across ranks; ``metric`` (higher is better) picks best.pt.
    ``resume`` is the checkpoint of an interrupted run (its state already restored):
    the loop continues at its epoch and batch. ``on_epoch_end(row, model)`` runs on
    rank 0 only, after the checkpoints are saved (train.py's TensorBoard logging).
    SIGTERM or Ctrl-C saves the state after the current step and raises RunInterrupted.
    """
    if resume and dist.is_main:
        write_config(run_dir / "config_resumed.json", args, dist)
    resume = resume or {}
    start, best = resume.get("epoch", 0), resume.get("best", -math.inf)
    batch, partial = resume.get("batch", 0), resume.get("partial")
    epoch_lr = resume.get("epoch_lr") if batch else None  # the rate at the start of that epoch
    log = MetricsLog(run_dir, keep_below_epoch=start + 1) if dist.is_main else None
    stopper = GracefulStop()
    try:
        for epoch in range(start, args.epochs):
            set_epoch(loader, epoch, batch)
            lr = optimizer.param_groups[0]["lr"] if epoch_lr is None else epoch_lr
            row = {"epoch": epoch + 1, "lr": lr}
            row |= train_one_epoch(model, loader, step_fn, optimizer, scheduler, scaler, dist, args,
                                   epoch, dtype, batch, partial, stopper)
            if "interrupted" in row:
                stop = row["interrupted"] | {"epoch": epoch, "epoch_lr": row["lr"]}
                if dist.is_main:
                    state = training_state(model, optimizer, scheduler, scaler, epoch, best, args, kind, extra)
                    save_with_previous(state | stop, run_dir / "last.pt")
                raise RunInterrupted(f"{stopper.signal}: stopped in epoch {epoch + 1} after batch "
                                     f"{stop['batch']}; state saved in {run_dir / 'last.pt'}; "
                                     f"continue with --resume {run_dir}")
            batch, partial, epoch_lr = 0, None, None
            row |= (evaluate_fn(model, epoch) or {}) if evaluate_fn else {}
            improved = metric in row and row[metric] > best
            best = row[metric] if improved else best
            if dist.is_main:
                end_of_epoch(row, model, optimizer, scheduler, scaler, best, improved, args, kind,
                             extra, run_dir, log, on_epoch_end)
    finally:
        stopper.restore()
    return best


def end_of_epoch(row, model, optimizer, scheduler, scaler, best, improved, args, kind, extra,
                 run_dir: Path, log: MetricsLog, on_epoch_end) -> None:
    """Rank 0: log the row, save best.pt and last.pt (keeping the previous one), plots.

    best.pt goes first: a run killed between the two saves resumes from the previous
    last.pt and redoes this epoch, so best.pt is written again. The other way round,
    last.pt would already hold the new best score and best.pt would never be written.
    """
    log.append(row)
    print(format_row(row), flush=True)
    state = training_state(model, optimizer, scheduler, scaler, row["epoch"], best, args, kind, extra)
    if improved:
        save_checkpoint(state, run_dir / "best.pt")
    save_with_previous(state, run_dir / "last.pt")
    refresh_plots(run_dir)
    if on_epoch_end is not None:
        on_epoch_end(row, model)


class RunInterrupted(Interrupted):
    """A signal stopped the run after its state was saved; the script exits cleanly."""


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}_prev{path.suffix}")


def save_with_previous(state: dict, path: Path) -> None:
    """Save ``path`` atomically, keeping the checkpoint it replaces as ``<stem>_prev.pt``.

    The old file is hard-linked (or copied) to the previous name first, so ``path``
    itself never disappears, and a resume can fall back if ``path`` is ever damaged.
    """
    if path.is_file():
        tmp = path.with_name(f".{path.stem}_prev.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            import shutil
            shutil.copyfile(path, tmp)
        os.replace(tmp, previous_path(path))
        # A run killed after the line above and before the save below leaves last_prev.pt and
        # last.pt as two links to one file; renaming a link onto its twin does nothing.
        tmp.unlink(missing_ok=True)
    save_checkpoint(state, path)


def refresh_plots(run_dir: Path) -> None:
    """Redraw loss.png, lr.png and metrics.png from metrics.jsonl (plots.plot_run).

    The pictures are a convenience: whatever goes wrong drawing them (a broken matplotlib,
    a full disk) is reported and the training run goes on.
    """
    try:
        plots.plot_run(run_dir)
    except Exception as err:  # noqa: BLE001 - see the docstring
        print(f"warning: plots not updated: {' '.join(str(err).split())}", flush=True)


def format_row(row: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


# --------------------------------------------------------------------------- detection evaluation
@torch.no_grad()
def predict_dataset(model, dataset, batch_size: int, dist: Dist, conf_threshold: float,
                    nms_iou: float, dtype=None, workers: int = 0) -> dict[int, "np.ndarray"]:
    """Detections for every image of ``dataset``: index -> ``(M, 6)`` array of
    ``class, score, x1, y1, x2, y2`` in absolute pixels of the original image.

    Under DDP each rank predicts every world_size-th image and the results are gathered,
    so every rank returns the whole dictionary (and computes the same metrics).
    """
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                        num_workers=workers, pin_memory=dist.device.type == "cuda")
    results, position = {}, 0
    for images, _ in loader:
        with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
            out = bare(images.to(dist.device, non_blocking=True))
        dets = decode_predictions(out, bare.S, bare.B, bare.C, conf_threshold, nms_iou)
        batch = indices[position:position + len(dets)]
        sizes = [(ann["width"], ann["height"]) for ann in map(dataset.annotation, batch)]
        results.update(zip(batch, scale_to_pixels(dets, sizes)))
        position += len(dets)
    bare.train(was_training)
    if dist.distributed:
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return results


def scale_to_pixels(dets: list[torch.Tensor], sizes) -> list["np.ndarray"]:
    """Image-relative detections (``decode_predictions``) -> arrays in pixels of each image.

    ``sizes``: ``(width, height)`` per image. One copy to the host and one multiply for the
    whole batch, rather than one of each per image.
    """
    counts = [len(d) for d in dets]
    flat = torch.cat(dets).cpu().numpy() if dets else np.zeros((0, 6), np.float32)
    flat[:, 2:] *= np.repeat(np.tile(np.asarray(sizes).reshape(-1, 2), 2), counts, axis=0)
    ends = np.cumsum(counts).tolist()
    return [flat[start:end] for start, end in zip([0] + ends[:-1], ends)]


def ground_truth_table(dataset, class_names) -> dict:
    """All ground-truth boxes of ``dataset`` in the evaluator's table form (absolute pixels)."""
    images, classes, boxes, difficult = [], [], [], []
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        k = len(ann["labels"])
        images += [i] * k
        classes += [class_names[int(c)] for c in ann["labels"]]
        boxes.append(np.asarray(ann["boxes"], dtype=np.float64).reshape(k, 4))
        difficult.append(np.asarray(ann.get("difficult", np.zeros(k)), dtype=bool).reshape(k))
    return {"image": np.asarray(images, dtype=np.int64), "cls": np.asarray(classes, dtype=object),
            "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4)),
            "difficult": np.concatenate(difficult) if difficult else np.zeros(0, bool)}


def detection_table(dets: dict, class_names, min_score: float = 0.0) -> dict:
    """Detections from :func:`predict_dataset` in the evaluator's table form."""
    images = sorted(dets)
    if not images:
        return {"image": np.zeros(0, np.int64), "cls": np.zeros(0, object),
                "score": np.zeros(0), "boxes": np.zeros((0, 4))}
    arr = np.concatenate([dets[i] for i in images])
    image = np.repeat(np.asarray(images, np.int64), [len(dets[i]) for i in images])
    keep = arr[:, 1] >= min_score
    arr, image = arr[keep], image[keep]
    names = np.asarray(class_names, dtype=object)
    return {"image": image, "cls": names[arr[:, 0].astype(int)], "score": arr[:, 1], "boxes": arr[:, 2:6]}


def detection_evaluator(dataset, args, dist: Dist):
    """``evaluate_fn`` for :func:`fit`: VOC mAP (all-point, IoU 0.5) on ``dataset`` every
    ``args.eval_every`` epochs and after the last one."""
    gt = ground_truth_table(dataset, dataset.class_names)

    def evaluate_fn(model, epoch):
        if (epoch + 1) % max(1, args.eval_every) and epoch + 1 != args.epochs:
            return None
        dets = predict_dataset(model, dataset, max(1, args.batch_size // dist.world_size), dist,
                               args.conf_threshold, args.nms_iou, amp_dtype(args, dist.device))
        result = evaluate_detections(gt, detection_table(dets, dataset.class_names))
        return {"mAP": result["mAP"]}
    return evaluate_fn
