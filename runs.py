"""A training run on disk: its folder, configuration and metrics log, seeding and the
random-number state, checkpoints (saved atomically, keeping the previous one), exact
resume from them, and clean stops on signals (GracefulStop).

Only rank 0 writes; what the other ranks need (the folder name, the same checkpoint)
comes through distributed.py.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import random
import signal
from pathlib import Path

import torch

import plots  # stdlib only at import time: matplotlib loads when a plot is drawn
import resume_policy
from distributed import Dist, any_rank, gather_objects
from model import check_config
from utils import Interrupted, UserError, check_finite, check_state_dict, load_checkpoint, save_checkpoint

CONFIG_KINDS = {"yolo": "detector", "darknet": "darknet"}  # a training checkpoint's kind -> its model_config's


# --------------------------------------------------------------------------- run folder
def make_run_dir(project: str, name: str, exist_ok: bool = False) -> Path:
    """``project/name``, or ``name2``, ``name3``... if it is taken (as YOLOv5 does);
    with ``exist_ok``, ``project/name`` whether or not it exists. Two runs starting at
    once never share a folder: ``mkdir`` is atomic, and the loser takes the next name."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        # "" made the run folder project/2, and "../x" or "a/b" one outside or below it
        raise UserError(f"--name {name!r}: a run folder's name is one non-empty file name (no '/')")
    root = Path(project)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder")
    candidate, k = root / name, 2
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=exist_ok)
            return candidate
        except FileExistsError:
            candidate, k = root / f"{name}{k}", k + 1
        except OSError as err:
            raise UserError(f"{candidate}: cannot create the run folder: {err.strerror}") from None


class RunLock:
    """A run folder belongs to one process at a time: ``<run>/.lock``, held with
    ``fcntl.flock`` for the life of the process (the kernel drops it when the process
    dies, however it dies), holding the holder's pid for the message of a second run.

    The file is removed on release; a process that opened it just before (and then got
    the lock of a removed file) sees that its inode is no longer the path's and tries again.
    """
    held: list["RunLock"] = []  # kept open for the life of the process

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.path, self.fd = run_dir, run_dir / ".lock", fd

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        path = run_dir / ".lock"
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"{run_dir}: cannot lock the run folder: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{run_dir}: in use by another run (pid {holder}); wait for it to end, "
                                "or choose another --name") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                lock = cls(run_dir, fd)
                cls.held.append(lock)
                return lock
            os.close(fd)  # released and removed between our open and our flock: try again
        raise UserError(f"{run_dir}: cannot lock the run folder (it keeps changing)")

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: see the class docstring
        os.close(self.fd)
        self.fd = None
        if self in RunLock.held:
            RunLock.held.remove(self)


@atexit.register
def release_locks() -> None:
    """The run is over (engine.fit returned or raised, or the process exits)."""
    for lock in list(RunLock.held):
        lock.release()


# Files a run folder may hold and still be "empty": its lock, temporaries of a killed save.
def previous_run_files(run_dir: Path) -> list[str]:
    """The files of a previous run in ``run_dir`` (not the lock nor temporaries)."""
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))


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


def find_resume_checkpoint(resume: str) -> Path:
    """``--resume`` takes a run folder (its last.pt) or a checkpoint file."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    return path


def resume_target(args) -> Path | None:
    """The checkpoint file to resume, or None for a new run (nothing is read yet).

    ``--auto-resume`` becomes ``--resume project/name/last.pt`` when that file (or the
    previous one) exists."""
    last = Path(args.project) / args.name / "last.pt"
    if not args.resume and getattr(args, "auto_resume", False) and (
            last.is_file() or previous_path(last).is_file()):
        args.resume = str(last)
    if not args.resume:
        return None
    path = Path(args.resume)
    return path / "last.pt" if path.is_dir() else path


def resume_defaults(parser, argv) -> None:
    """``--resume RUN`` alone continues the run as it was: every argument not given on the
    command line defaults to the run's own value (its latest config_resumed.json, else its
    config.json), and those given are compared with the checkpoint's (resume_policy).
    Without this, a bare ``--resume`` compared the script's defaults with the run's
    arguments and refused any run not started with the defaults. Not for --auto-resume,
    which reruns the run's whole command; not --project and --name (the run continues
    where its folder is now, runs.check_resume)."""
    args = parser.parse_known_args(argv)[0]
    if not getattr(args, "resume", None):
        return
    path = Path(args.resume)
    run_dir = path if path.is_dir() else path.parent
    saved = read_config(run_dir / "config_resumed.json") or read_config(run_dir / "config.json")
    if saved is None:  # a checkpoint alone: the checkpoint's arguments are compared as given
        return
    dests = {action.dest for action in parser._actions} - {"resume", "auto_resume", "project", "name", "help"}
    parser.set_defaults(**{k: v for k, v in saved.items() if k in dests})


def load_resume_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``; a damaged or missing one falls back to its
    ``_prev`` twin, saying so."""
    try:
        path = find_resume_checkpoint(str(path))
        ckpt = load_training_state(path)
    except UserError as err:
        if not previous_path(path).is_file():
            raise
        print(f"warning: {err}; resuming from the previous checkpoint {previous_path(path)}", flush=True)
        ckpt = load_training_state(previous_path(path))
    # Not a damaged file but a run gone wrong: refused, not replaced by last_prev.pt unasked.
    check_finite(ckpt["model"], ckpt["source"])
    return ckpt


def load_resume(args) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume and its run folder, or (None, None) for a new run."""
    path = resume_target(args)
    return (None, None) if path is None else (load_resume_checkpoint(path), path.parent)


def open_run(args, kind: str, extra: dict) -> tuple[Path, dict | None, RunLock]:
    """Rank 0: the run folder (new, or the resumed run's), locked for this process, and
    the checkpoint to resume (None for a new run), checked against this command.

    Nothing a previous run wrote is replaced unless that run is the one resumed: a
    resume must keep the run's own arguments (resume_policy), and ``--auto-resume`` into
    a folder without last.pt starts there only if it is empty or holds the same run,
    killed before its first last.pt (its config.json matches). On any error the lock is
    released and the folder left as it was."""
    path = resume_target(args)
    if path is not None:
        run_dir = path.parent
    else:
        run_dir = make_run_dir(args.project, args.name, getattr(args, "auto_resume", False))
    lock = RunLock.acquire(run_dir)
    try:
        ckpt = load_resume_checkpoint(path) if path is not None else None
        if ckpt is not None:
            check_resume(ckpt, args, kind, extra, run_dir)
        else:
            check_fresh_folder(run_dir, args)
        return run_dir, ckpt, lock
    except BaseException:
        lock.release()
        raise


def check_resume(ckpt: dict, args, kind: str, extra: dict, run_dir: Path) -> None:
    """The checkpoint is of this script's kind, and this command is the run's own
    (resume_policy.POLICY): refuse in one line, else print what changes."""
    source = ckpt.get("source", args.resume)
    if ckpt.get("kind") != kind:
        raise UserError(f"{source}: a {ckpt.get('kind', 'unknown')!r} checkpoint, not a {kind!r} one")
    saved = ckpt.get("args")
    if not isinstance(saved, dict):
        saved = read_config(run_dir / "config.json") or {}
    # The run continues where its checkpoint is, which may have been moved since it was
    # saved: --project and --name are compared with that folder, not the saved values.
    saved = {**saved, "project": str(run_dir.parent), "name": run_dir.name}
    for note in resume_policy.compare(saved, vars(args), source):
        print(note, flush=True)
    resume_policy.compare_extra({k: ckpt[k] for k in extra if k in ckpt}, extra, source)


def check_fresh_folder(run_dir: Path, args) -> None:
    """A new run in an existing folder (``--auto-resume`` without a last.pt)."""
    files = previous_run_files(run_dir)
    if not files:
        return
    saved = read_config(run_dir / "config.json")
    what = f"holds a previous run ({', '.join(files[:5])}{', ...' if len(files) > 5 else ''}) and no last.pt"
    if saved is None:
        raise UserError(f"{run_dir}: {what}: choose another --name or --project (nothing was changed)")
    # The same run: every argument that must match is recorded there, with this value
    # (a config.json that lacks one is another program's, or another version's).
    now = vars(args)
    missing = [f"--{k.replace('_', '-')} not recorded" for k in sorted(now)
               if k not in saved and resume_policy.decision(k) == resume_policy.MATCH]
    differ = resume_policy.differences(saved, now)[0] + missing
    if differ:
        listed = "; ".join(differ[:6]) + ("; ..." if len(differ) > 6 else "")
        raise UserError(f"{run_dir}: {what}, and other arguments ({listed}): choose another "
                        "--name or --project (nothing was changed)")
    print(f"note: {run_dir} has no last.pt: restarting the same run (its config.json matches) "
          "from the first epoch", flush=True)


def read_config(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_training_state(path: Path) -> dict:
    """A checkpoint to resume, with ``source``: the file it came from (for messages). Its
    model state and configuration are checked (model.check_config) before anything is built."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a training checkpoint (no 'model' state in it)")
    check_state_dict(ckpt["model"], str(path))
    if ckpt.get("kind") in CONFIG_KINDS and "model_config" in ckpt:
        check_config(ckpt["model_config"], str(path), CONFIG_KINDS[ckpt["kind"]])
    return ckpt | {"source": str(path)}


def write_config(path: Path, args, dist: Dist, data: dict | None = None) -> None:
    """The run's arguments, world size and torch version; ``data``: :func:`data_summary`."""
    write_json(path, {k: v for k, v in vars(args).items()} | {"world_size": dist.world_size,
                                                             "torch": torch.__version__}
               | ({"train_data": data} if data else {}))


def data_summary(extra: dict) -> dict:
    """What config.json records of the training data: the number of images and, where the
    checkpoints keep the labels' digests, one digest of them all (compare two runs' data)."""
    summary = {"images": extra["train_images"]} if "train_images" in extra else {}
    if "train_labels" in extra:
        summary["labels_digest"] = hashlib.sha256(extra["train_labels"].numpy().tobytes()).hexdigest()[:16]
    return summary


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the ``.<name>.tmp`` files that a run killed while saving left in its folder
    (half-written checkpoints can be as large as the real ones)."""
    for stale in run_dir.glob(".*.tmp"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def check_same_checkpoint(ckpt: dict | None, dist: Dist) -> None:
    """Every rank must start from the same checkpoint (or none): a node that cannot see
    the run folder would otherwise start afresh beside the others' resumed run."""
    steps = gather_objects(None if ckpt is None else ckpt["step"], dist)
    if len(set(steps)) > 1:
        raise UserError(f"the processes found different checkpoints to resume (steps {steps} by rank): "
                        "the run folder must be on storage that every node sees")


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
        stop = any_rank(self.signal is not None, dist)
        self.signal = self.signal or ("SIGTERM" if stop else None)
        return stop

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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


def save_epoch_checkpoints(state: dict, run_dir: Path, improved: bool) -> None:
    """The end of an epoch: best.pt if the metric improved, then last.pt (keeping the previous).

    best.pt goes first: a run killed between the two saves resumes from the previous
    last.pt and redoes this epoch, so best.pt is written again. The other way round,
    last.pt would already hold the new best score and best.pt would never be written.
    """
    if improved:
        save_checkpoint(state, run_dir / "best.pt")
    save_with_previous(state, run_dir / "last.pt")


def refresh_plots(run_dir: Path) -> None:
    """Redraw loss.png, lr.png and metrics.png from metrics.jsonl (plots.plot_run).

    The pictures are a convenience: whatever goes wrong drawing them (a broken matplotlib,
    a full disk) is reported and the training run goes on.
    """
    try:
        plots.plot_run(run_dir)
    except Exception as err:  # noqa: BLE001 - see the docstring
        print(f"warning: plots not updated: {' '.join(str(err).split())}", flush=True)
