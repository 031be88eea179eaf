"""The training loop every training script shares: arguments and their checks, the
start of a run, and the epoch loop with gradient accumulation, mixed precision,
non-finite losses and clean stops on signals.

train.py (YOLO on VOC) and the three Darknet scripts all build on it, so a run folder,
a checkpoint and a progress bar look the same whichever script made them. The pieces
below it: distributed.py (devices, processes, samplers), runs.py (run folders, signals,
checkpoints, resume), schedule.py (the optimiser and its learning-rate schedule).
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import argtypes
import resume_policy
from distributed import (Dist, agree_on_error, agreed_batches, amp_dtype, average_gradients, broadcast_object,
                         make_loader, merge_partial, reduce_sums, set_epoch, share_of_partial, sync_buffers,
                         unwrap)
from schedule import build_optimizer, build_scheduler
from runs import (GracefulStop, MetricsLog, RunInterrupted, check_same_checkpoint, data_summary,
                  load_training_state, open_run, refresh_plots, release_locks, remove_stale_temporaries,
                  rng_state, save_epoch_checkpoints, save_with_previous, set_rng_state, write_config)
from utils import UserError, load_state_checked, one_line


# --------------------------------------------------------------------------- arguments
def add_training_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                      schedule: str, warmup_epochs: float, project: str) -> None:
    """Arguments shared by all training scripts; each script passes its paper defaults."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=argtypes.positive_int, default=epochs, help="epochs to train (default %(default)s)")
    g.add_argument("--batch-size", type=argtypes.positive_int, default=batch_size,
                   help="images per optimiser step, over all processes (default %(default)s)")
    g.add_argument("--accum-steps", type=argtypes.positive_int, default=1,
                   help="split each batch into this many micro-batches, their gradients accumulated "
                        "into one step (less memory, the same step): --batch-size 64 --accum-steps 4 "
                        "runs 16 images at a time; must divide --batch-size (default 1)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="default %(default)s")
    g.add_argument("--lr", type=argtypes.positive_float, default=lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--momentum", type=argtypes.fraction(0, 1, hi_open=True), default=0.9, help="SGD momentum (paper: 0.9)")
    g.add_argument("--weight-decay", type=argtypes.nonneg_float, default=5e-4, help="paper: 0.0005")
    g.add_argument("--schedule", choices=("step", "cosine", "poly", "constant", "steps"), default=schedule,
                   help="learning-rate schedule after warm-up (default %(default)s; steps: Darknet's "
                        "policy=steps, in iterations, with --lr-steps and --lr-scales)")
    g.add_argument("--lr-steps", type=argtypes.nonneg_int, nargs="*", default=[],
                   help="'steps': the iterations (optimiser steps) at which the rate is multiplied "
                        "by the matching --lr-scales (Darknet's steps=)")
    g.add_argument("--lr-scales", type=argtypes.positive_float, nargs="*", default=[],
                   help="'steps': the factors, one per --lr-steps entry (Darknet's scales=)")
    g.add_argument("--milestones", type=argtypes.nonneg_float, nargs="*", default=[75, 105],
                   help="epochs at which 'step' multiplies the rate by --gamma (paper: 75 105)")
    g.add_argument("--gamma", type=argtypes.positive_float, default=0.1, help="'step' factor (default %(default)s)")
    g.add_argument("--poly-power", type=argtypes.nonneg_float, default=4.0, help="'poly' exponent (Darknet: 4)")
    g.add_argument("--warmup-epochs", type=argtypes.nonneg_float, default=warmup_epochs,
                   help="epochs of linear warm-up from --warmup-factor x lr (default %(default)s)")
    g.add_argument("--warmup-factor", type=argtypes.fraction(0, 1), default=0.1,
                   help="warm-up starts at this fraction of --lr (paper: 1e-3 -> 1e-2, so 0.1)")
    g.add_argument("--grad-clip", type=argtypes.nonneg_float, default=0.0,
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
    r.add_argument("--workers", type=argtypes.nonneg_int, default=2, help="data-loading processes (default %(default)s)")
    r.add_argument("--seed", type=argtypes.nonneg_int, default=0, help="random seed (default %(default)s)")
    r.add_argument("--project", default=project, help="parent folder of run folders (default %(default)s)")
    r.add_argument("--name", default="exp", help="run folder name; exp, exp2, ... if taken")
    r.add_argument("--resume", metavar="RUN_OR_CKPT", default=None,
                   help="continue a run exactly: its folder or one of its .pt files; arguments not "
                        "given are the run's own. "
                        f"{resume_policy.help_text()} (table: docs/training.md, Resuming)")
    r.add_argument("--auto-resume", action="store_true",
                   help="continue project/name from its last.pt if it has one, else start it (never "
                        "name2): rerun the same command after a crash or preemption, or let "
                        "torchrun --max-restarts do it")


def check_training_args(args: argparse.Namespace) -> None:
    """Reject nonsense before anything is written."""
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_size % args.accum_steps:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by --accum-steps {args.accum_steps}: "
                        "each optimiser step is --accum-steps micro-batches of equal size")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if len(getattr(args, "lr_steps", [])) != len(getattr(args, "lr_scales", [])):
        raise UserError(f"--lr-steps has {len(args.lr_steps)} values and --lr-scales {len(args.lr_scales)}: "
                        f"give one scale per step")


def compile_model(model: torch.nn.Module, args) -> torch.nn.Module:
    """``--compile``: compile ``model`` in place (``nn.Module.compile``) before any DDP
    wrapping. Unlike ``torch.compile(model)`` this keeps the module itself, so state-dict
    keys, checkpoints and ``unwrap`` are those of the plain model."""
    if getattr(args, "compile", False):
        model.compile()
    return model


# --------------------------------------------------------------------------- the run and its state
def start_run(args, dist: Dist, kind: str, extra: dict | None = None, data: dict | None = None):
    """Open the run folder (new, or the resumed run's), lock it for this process and
    record the resolved configuration, with ``data`` (a summary of the training data:
    :func:`data_summary`) (runs.open_run: a resume must be the run's own).

    Returns ``(run_dir, checkpoint or None)``. Only rank 0 creates, locks and writes
    files; it tells the other ranks the folder and the checkpoint, or its error, so that
    every rank stops with the same one line.
    """
    check_training_args(args)
    if (args.batch_size // args.accum_steps) % dist.world_size:  # on every rank alike: no collective yet
        raise UserError(f"--batch-size {args.batch_size} (over all processes) in --accum-steps {args.accum_steps} "
                        f"micro-batches does not split evenly over {dist.world_size} processes: give a "
                        f"multiple of {args.accum_steps * dist.world_size}")
    run_dir, ckpt, error = None, None, None
    if dist.is_main:
        try:
            run_dir, ckpt, _ = open_run(args, kind, extra or {})
        except UserError as err:
            if not dist.distributed:
                raise
            error = str(err)
    shared = broadcast_object((error, str(run_dir), ckpt and ckpt["source"]), dist)
    if shared[0] is not None:
        raise UserError(shared[0])
    run_dir = Path(shared[1])
    if not dist.is_main and shared[2] is not None:  # the very checkpoint rank 0 resumes
        try:
            ckpt = load_training_state(Path(shared[2]))
        except UserError:  # not on this node's storage: check_same_checkpoint says so on every rank
            ckpt = None
    if dist.distributed:
        check_same_checkpoint(ckpt, dist)
    if dist.is_main:
        remove_stale_temporaries(run_dir)
        if ckpt is None:  # a resumed run records its configuration in fit(), once its state fits
            write_config(run_dir / "config.json", args, dist, data)
    return run_dir, ckpt


@dataclass
class TrainState:
    """What the loop works on, in one object rather than long argument lists.

    The model, optimiser, schedule and gradient scaler are what a checkpoint saves
    (:meth:`checkpoint`) and a resumed run restores (:meth:`restore`); the rest says
    where and how the run goes.
    """
    model: torch.nn.Module                # bare, or wrapped in DataParallel / DDP
    loader: DataLoader                    # distributed.make_loader: batches from (seed, epoch) alone
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped once per optimiser step
    scaler: torch.amp.GradScaler
    dist: Dist
    args: argparse.Namespace
    run_dir: Path
    kind: str                             # "yolo" or "darknet": resuming another kind is refused
    dtype: torch.dtype | None = None      # autocast dtype (distributed.amp_dtype); None: float32
    resume: dict | None = None            # the interrupted run's checkpoint, already restored
    extra: dict = field(default_factory=dict)  # in every checkpoint too (a detector's class names)

    def checkpoint(self, epoch: int, best: float) -> dict:
        """Everything a resumed run needs; only tensors and plain Python types (weights_only).

        ``extra`` carries what a script adds, such as the class names of a detector.
        """
        bare = unwrap(self.model)
        return self.extra | {
            "kind": self.kind, "epoch": epoch, "step": self.scheduler.last_epoch, "best": best,
            "model": bare.state_dict(), "model_config": dict(bare.config),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "args": {k: v for k, v in vars(self.args).items()},
            "rng": rng_state(),
        }

    def restore(self, ckpt: dict) -> None:
        """Continue from ``ckpt`` (a :meth:`checkpoint`): weights, optimiser, schedule,
        scaler and the random-number state. A model built with other arguments than the
        checkpoint's is named in one line, with the arguments that differ."""
        source, kind = self.args.resume, self.kind
        if ckpt.get("kind") != kind:
            raise UserError(f"{source}: a {ckpt.get('kind', 'unknown')!r} checkpoint, not a {kind!r} one")
        source = ckpt.get("source", source)
        try:
            load_state_checked(unwrap(self.model), ckpt["model"], source)
        except UserError as err:
            saved = dict(ckpt.get("model_config") or {})
            built = dict(getattr(unwrap(self.model), "config", {}))
            differ = [k for k in built if saved and saved.get(k) != built[k]]
            if not differ:
                raise
            was, now = (", ".join(f"{k}={config.get(k)!r}" for k in differ) for config in (saved, built))
            raise UserError(f"{source}: the checkpoint's model has {was}, this command builds {now}: resume "
                            f"with the run's own model arguments (its config.json); "
                            f"{str(err).removeprefix(f'{source}: ')}") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])


def start_training(model, dataset, args, dist: Dist, kind: str, extra: dict | None = None) -> TrainState:
    """Open the run (:func:`start_run`), then build the training loader, optimiser,
    per-step schedule, gradient scaler and AMP dtype, restored from the run's checkpoint
    when resuming: the same for every training script."""
    # The training-set size travels in every checkpoint: resuming on other data is refused.
    # So does one digest per image of its labels, where the dataset has labels: a resume
    # names the images whose labels changed (resume_policy.compare_labels: a warning).
    extra = dict(extra or {}) | {"train_images": len(dataset)}
    digests = dataset.label_digests() if hasattr(dataset, "label_digests") else None
    labels = {} if digests is None else {"train_labels": torch.from_numpy(digests)}
    run_dir, ckpt = start_run(args, dist, kind, extra, data_summary(extra | labels))
    try:
        if ckpt is not None and dist.is_main:
            note = resume_policy.compare_labels(ckpt.get("train_labels"), digests,
                                                [record.path for record in getattr(dataset, "records", ())],
                                                ckpt["source"])
            if note:
                print(note, flush=True)
        return build_state(model, dataset, args, dist, kind, extra | labels, run_dir, ckpt)
    except BaseException:
        release_locks()  # a refused resume leaves the run folder as it was
        raise


def build_state(model, dataset, args, dist: Dist, kind: str, extra: dict, run_dir: Path, ckpt) -> TrainState:
    """start_training's second half, once the run folder is open."""
    # --batch-size images per optimiser step, in --accum-steps micro-batches (train_one_epoch)
    loader = make_loader(dataset, args.batch_size // args.accum_steps, True, args.workers, dist, args.seed,
                         getattr(dataset, "collate_fn", None))
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, -(-len(loader) // args.accum_steps))
    dtype = amp_dtype(args, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    state = TrainState(model, loader, optimizer, scheduler, scaler, dist, args, run_dir, kind, dtype,
                       resume=ckpt, extra=extra)
    if ckpt is not None:
        state.restore(ckpt)
    return state


# --------------------------------------------------------------------------- the loop
class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: stop rather than train on garbage."""


def train_one_epoch(state: TrainState, step_fn, epoch: int, start_batch: int = 0,
                    partial: dict | None = None, stopper=None) -> dict:
    """One pass over ``state.loader`` (from ``start_batch`` on); returns per-image means of the logs.

    ``step_fn(model, batch, device) -> (loss, logs, n)``: the mean loss of the batch, a
    dict of detached per-batch means to log, and the batch size. Gradients are
    accumulated over ``args.accum_steps`` micro-batches; under DDP the gradient
    all-reduce is skipped for all but the last of them (``no_sync``). When ``stopper``
    reports a signal, the epoch ends after the next optimiser step and the result has
    ``"interrupted"``: the batches done and the running sums, to save and resume from.
    """
    model, dist, args = state.model, state.dist, state.args
    model.train()
    acc = dict(partial or {"sums": {}, "seen": 0, "skipped": 0, "time": 0.0})
    acc["sums"], start = dict(acc["sums"]), time.perf_counter() - acc["time"]
    total, micro = start_batch + len(state.loader), max(1, args.accum_steps)
    # agreed_batches: a bad file on any rank stops every rank before the next step (else the
    # others would wait for it in the step's gradient all-reduce)
    bar = tqdm(agreed_batches(state.loader, dist), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not dist.is_main,
               dynamic_ncols=True, leave=False, initial=start_batch, total=total)
    done = {"batch": start_batch, "partial": snapshot(acc, start)}  # the last optimiser step's state
    try:
        for i, batch in enumerate(bar, start=start_batch):
            last_micro = (i + 1) % micro == 0 or i + 1 == total
            # an epoch's last step may hold fewer micro-batches: its gradient averages over those
            in_step = min(micro, total - i // micro * micro)
            loss, synced = forward_backward(state, step_fn, batch, (epoch, in_step), last_micro, acc)
            if last_micro:
                # DDP averaged the gradients in the backward pass of this micro-batch, if it ran
                if dist.distributed and not synced:
                    average_gradients(model)
                optimizer_step(model, state.optimizer, state.scaler, args.grad_clip)
                state.scheduler.step()
                done = {"batch": i + 1, "partial": snapshot(acc, start)}
                if stopper is not None and stopper.agreed(dist):
                    return {"interrupted": done}
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{acc['seen'] / (time.perf_counter() - start):.1f}")
    except NonFiniteLoss:
        raise
    except UserError as err:
        # A bad file met in the middle of an epoch (a truncated JPEG is found only when it
        # is decoded) lost every step of the epoch so far: they are saved like an interrupt.
        # Micro-batches of an unfinished step are redone on resume.
        return {"interrupted": done, "failed": one_line(err)}
    return epoch_means(acc, dist, time.perf_counter() - start)


def snapshot(acc: dict, start: float) -> dict:
    """A copy of the epoch's running sums, with the time spent so far, to save and resume from."""
    return acc | {"sums": dict(acc["sums"]), "time": time.perf_counter() - start}


def forward_backward(state: TrainState, step_fn, batch, where: tuple[int, int], last_micro: bool,
                     acc: dict):
    """One micro-batch: the forward pass, the loss check and, for a finite loss, the
    backward pass adding this batch's share (1 / the step's micro-batches, ``where`` =
    (epoch, micro-batches in this step)) to the step's gradients. Returns ``(loss, finite)``;
    a skipped batch (--skip-nonfinite) is counted in ``acc``."""
    model, dist, args = state.model, state.dist, state.args
    epoch, micro = where
    sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
    with sync:
        # The forward pass of a batch that --skip-nonfinite skips has already moved batch
        # norm's running statistics (to NaN, for NaN activations): they are put back.
        skip = getattr(args, "skip_nonfinite", False)
        buffers = [b.detach().clone() for b in model.buffers()] if skip else None
        with torch.autocast(dist.device.type, dtype=state.dtype, enabled=state.dtype is not None):
            loss, logs, n = step_fn(model, batch, dist.device)
        # DDP's backward is collective: every rank skips, or stops, when any rank's loss is not finite
        problem = agree_on_error(nonfinite(loss, logs, epoch, state.scheduler.last_epoch), dist)
        if problem is not None and not skip:
            raise NonFiniteLoss(f"{problem}; lower --lr, use --grad-clip or --skip-nonfinite, or check the data")
        finite = problem is None
        if finite:
            state.scaler.scale(loss / micro).backward()
            accumulate(acc, logs, n)
        else:
            acc["skipped"] += 1
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
    return loss, finite


def accumulate(acc: dict, logs: dict, n: int) -> None:
    acc["seen"] += n
    for k, v in logs.items():
        acc["sums"][k] = acc["sums"].get(k, 0.0) + float(v) * n


def epoch_means(acc: dict, dist: Dist, seconds: float) -> dict:
    """Per-image means over all processes, the image count, skipped steps and time."""
    totals = reduce_sums({**acc["sums"], "_n": acc["seen"], "_skipped": acc["skipped"]}, dist)
    # every rank skips together (agree_on_error in forward_backward), so each counted every skip
    n, skipped = max(1.0, totals.pop("_n")), int(totals.pop("_skipped")) // dist.world_size
    row = {k: v / n for k, v in totals.items()} | {"images": int(n), "time_s": round(seconds, 2)}
    return row | ({"skipped_steps": skipped} if skipped else {})


def nonfinite(loss, logs: dict, epoch: int, step: int) -> str | None:
    """None for a finite loss; otherwise what happened, with the step and the loss
    components named (forward_backward stops there, or with --skip-nonfinite skips it)."""
    if torch.isfinite(loss.detach()).all():
        return None
    parts = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items())
    return f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {step} ({parts})"


def optimizer_step(model, optimizer, scaler, grad_clip: float) -> None:
    if all(p.grad is None for group in optimizer.param_groups for p in group["params"]):
        return  # every micro-batch of this step was skipped (--skip-nonfinite)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def fit(state: TrainState, step_fn, evaluate_fn, metric: str, on_epoch_end=None) -> float:
    """The epoch loop: train, evaluate, log one line, save ``last.pt`` and ``best.pt``,
    redraw the run's plots. Returns the best ``metric``.

    ``evaluate_fn(model, epoch) -> dict`` (or None to skip) runs on every rank, so
    metrics can be reduced across ranks; ``metric`` (higher is better) picks best.pt.
    A resumed run (``state.resume``, its state already restored) continues at the
    checkpoint's epoch and batch. ``on_epoch_end(row, model)`` runs on rank 0 only,
    after the checkpoints are saved (train.py's TensorBoard logging). SIGTERM or Ctrl-C
    saves the state after the current step and raises RunInterrupted.
    """
    dist, args, run_dir = state.dist, state.args, state.run_dir
    if state.resume and dist.is_main:
        write_config(run_dir / "config_resumed.json", args, dist, data_summary(state.extra))
    resume = state.resume or {}
    start, best = resume.get("epoch", 0), resume.get("best", -math.inf)
    batch, partial = resume.get("batch", 0), share_of_partial(resume.get("partial"), dist)
    epoch_lr = resume.get("epoch_lr") if batch else None  # the rate at the start of that epoch
    log = MetricsLog(run_dir, keep_below_epoch=start + 1) if dist.is_main else None
    stopper = GracefulStop()
    try:
        if resume.get("unvalidated"):
            best = validate_saved_epoch(state, evaluate_fn, metric, best, (log, on_epoch_end))
        for epoch in range(start, args.epochs):
            set_epoch(state.loader, epoch, batch)  # this epoch's shuffle (DistributedSampler.set_epoch)
            lr = state.optimizer.param_groups[0]["lr"] if epoch_lr is None else epoch_lr
            row = {"epoch": epoch + 1, "lr": lr}
            row |= train_one_epoch(state, step_fn, epoch, batch, partial, stopper)
            if "interrupted" in row:
                stop = row["interrupted"] | {"epoch": epoch, "epoch_lr": row["lr"]}
                stop["partial"] = merge_partial(stop["partial"], dist)
                if dist.is_main:
                    save_with_previous(state.checkpoint(epoch, best) | stop, run_dir / "last.pt")
                where = (f"stopped in epoch {epoch + 1} after batch {stop['batch']}; state saved in "
                         f"{run_dir / 'last.pt'}")
                if "failed" in row:
                    raise UserError(f"{row['failed']} ({where}: fix the file, then --resume {run_dir})")
                raise RunInterrupted(f"{stopper.signal}: {where}; continue with --resume {run_dir}")
            batch, partial, epoch_lr = 0, None, None
            # Every rank validates its shard with rank 0's batch-norm statistics, those saved
            # (DDP syncs buffers only at each forward; the Darknet scripts did this, YOLO not: #14).
            sync_buffers(unwrap(state.model), dist)
            try:
                row |= (evaluate_fn(state.model, epoch) or {}) if evaluate_fn else {}
            except UserError as err:
                # a bad validation image lost the epoch just trained (and, at the first
                # validation, the whole run): the epoch is saved first, marked unvalidated,
                # and --resume validates it before anything else (validate_saved_epoch)
                if dist.is_main:
                    end_of_epoch(state, row, best, None, log, None)
                raise unvalidated_error(err, epoch, run_dir) from None
            improved = metric in row and row[metric] > best
            best = row[metric] if improved else best
            if dist.is_main:  # rank 0 alone logs and saves
                end_of_epoch(state, row, best, improved, log, on_epoch_end)
    finally:
        stopper.restore()
        if dist.is_main:
            release_locks()  # the run is over: the folder is free for the next one
    return best


def unvalidated_error(err: UserError, epoch: int, run_dir: Path) -> UserError:
    return UserError(f"{one_line(err)} (epoch {epoch + 1} was trained and saved in {run_dir / 'last.pt'} "
                     f"without validation: fix the file, then --resume {run_dir})")


def validate_saved_epoch(state: TrainState, evaluate_fn, metric: str, best: float, rank0: tuple) -> float:
    """``--resume`` from a checkpoint saved unvalidated (a bad validation image, :func:`fit`):
    validate that epoch first, as the interrupted run would have, and save best.pt by the
    usual rule. Without this the epoch was never validated: a run whose last validation
    failed ended "best validation mAP -inf" with no best.pt. ``rank0``: (MetricsLog,
    on_epoch_end) on rank 0, (None, None) elsewhere. Returns the best ``metric``."""
    dist, ckpt, (log, on_epoch_end) = state.dist, state.resume, rank0
    epoch = ckpt["epoch"]  # the number (1-based) of the epoch saved
    sync_buffers(unwrap(state.model), dist)
    try:
        metrics = (evaluate_fn(state.model, epoch - 1) or {}) if evaluate_fn else {}
    except UserError as err:  # still bad: the checkpoint stays as it is, unvalidated
        raise unvalidated_error(err, epoch - 1, state.run_dir) from None
    # Validation may draw random numbers (a DataLoader's seed): the run continues with the
    # checkpoint's, as a run that validated this epoch without failing did.
    set_rng_state(ckpt["rng"])
    improved = metric in metrics and metrics[metric] > best
    best = metrics[metric] if improved else best
    if dist.is_main:  # the epoch's logged row (training means) gets its metrics
        saved = [row for row in log.rows() if row.get("epoch") == epoch]
        log = MetricsLog(state.run_dir, keep_below_epoch=epoch)
        row = (saved[-1] if saved else {"epoch": epoch}) | metrics
        end_of_epoch(state, row, best, improved, log, on_epoch_end)
    return best


def end_of_epoch(state: TrainState, row: dict, best: float, improved: bool | None, log: MetricsLog,
                 on_epoch_end) -> None:
    """Rank 0: log the row, save best.pt and last.pt (keeping the previous one), plots.
    ``improved`` None: the epoch's validation failed; last.pt is marked unvalidated."""
    log.append(row)
    print(format_row(row), flush=True)
    ckpt = state.checkpoint(row["epoch"], best) | ({"unvalidated": True} if improved is None else {})
    save_epoch_checkpoints(ckpt, state.run_dir, bool(improved))
    refresh_plots(state.run_dir)
    if on_epoch_end is not None:
        on_epoch_end(row, state.model)


def format_row(row: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
