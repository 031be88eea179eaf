"""Reliability: runs that survive being killed, checkpoints that cannot hurt, numerical faults.

* SIGKILL at seeded random moments, in the middle of a checkpoint write and right after
  one, then ``--resume`` / ``--auto-resume``: every ``*.pt`` of the run folder always loads
  (weights_only), and the final weights equal an uninterrupted run's, bit for bit (YOLO
  via train.py, Darknet via darknet_train.py, and DDP: torchrun with 2 CPU ranks).
* SIGTERM / Ctrl-C save the state after the current step (mid-epoch) and exit 0 with one
  "interrupted:" line; resuming ends with the uninterrupted run's weights.
* A damaged last.pt falls back to last_prev.pt with a warning naming it, or is a
  one-line error (exit 2) without one.
* Checkpoints from strangers: a pickle that would run a command is refused by every
  script that loads checkpoints; a checkpoint of another model configuration is a
  one-line error naming the tensor and the options that differ.
* A non-finite loss stops the run (step and loss components named, last good checkpoint
  intact) or, with --skip-nonfinite, the step is skipped and counted (under DDP on every
  rank at once); --grad-clip bounds the update.

Bitwise equality holds because everything random follows from (seed, epoch, index) and
the checkpointed RNG state (the training loader has a generator of its own, so iterating
it draws nothing from the global one), and because each process computes on one thread
(OMP_NUM_THREADS=1): the order of floating-point sums is then fixed. No
torch.use_deterministic_algorithms is needed on the CPU. With two DDP ranks the gradient
all-reduce is a sum of two numbers, which is commutative, so that is exact too.

Starting a script costs about 6 s on a 2-core machine, nearly all of it importing torch
and torchvision. So the scripts run through a small fork server (tests/scripts_server.py): it
imports those modules once, then forks one process per run, which executes the script
as ``__main__`` with its own argv, working directory, stdout/stderr files and exit code,
exactly as ``python script.py ...`` would (the modules it finds already imported are
pristine: nothing ran in the server). A fork takes milliseconds, and the processes can be
killed like any other. torchrun starts its workers itself, as real processes.

Faults are injected by scripts_server.LAUNCHER, which patches engine in the forked process only:
REL_STOP_AFTER_STEPS / REL_STOP_SIGNAL (a signal to itself after N optimiser steps),
REL_KILL_IN_SAVE (SIGKILL half-way through writing the N-th checkpoint),
REL_KILL_AFTER_SAVE (SIGKILL right after the N-th checkpoint is in place),
REL_KILL_AFTER_EPOCH (SIGKILL right after the last.pt of the end of epoch N),
REL_NAN_AT_BATCH (the N-th batch's images become NaN; with REL_NAN_RANK, on that DDP
rank only), REL_SAVE_INITIAL / REL_SAVE_FINAL (save the initial / each rank's final
weights to a file).
"""
from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import utils
from synthetic import write_imagenet_tree, write_voc_txt_tree

from scripts_server import LAUNCHER, REPO, Proc, Scripts, hashes, ok, one_line_error
from test_ddp import output_lines  # torchrun's shared output, split where each line starts


# --------------------------------------------------------------------------- data and settings
@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    """8 training images (4 batches of 2: several steps an epoch), 2 validation images."""
    root = tmp_path_factory.mktemp("voc")
    write_voc_txt_tree(root, 8, size=64, seed=0, csv_name="train.csv")
    write_voc_txt_tree(root, 2, size=64, seed=1, csv_name="val.csv", prefix="val_")
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """4 classes x 3 training images (3 batches of 4), 4 flat validation images."""
    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet"), n_classes=4, n_train_per_class=3,
                               n_val_per_class=1, size=64)


YOLO_EPOCHS, YOLO_STEPS = 6, 4  # steps per epoch: 8 images, batch 2


def yolo_args(voc: Path, project: Path, name: str, *extra) -> list[str]:
    """A 1/16-width YOLOv1, S=2 (128 px), hidden 16: batch norm, dropout, augmentation,
    a cosine schedule after one warm-up epoch and mAP every epoch (best.pt)."""
    return ["--data", voc / "train.csv", "--val-data", voc / "val.csv", "--S", 2, "--width", 0.0625,
            "--hidden", 16, "--epochs", YOLO_EPOCHS, "--batch-size", 2, "--workers", 0, "--device", "cpu",
            "--optimizer", "adam", "--lr", 1e-3, "--weight-decay", 5e-4, "--schedule", "cosine",
            "--warmup-epochs", 1, "--eval-every", 1, "--project", project, "--name", name, *extra]


DARKNET_EPOCHS = 5


def darknet_args(imagenet: Path, project: Path, name: str, *extra) -> list[str]:
    return ["--train-dir", imagenet / "train", "--val-dir", imagenet / "val", "--val-labels",
            imagenet / "LOC_val_solution.csv", "--width", 0.0625, "--img-size", 64, "--batch-size", 4,
            "--epochs", DARKNET_EPOCHS, "--workers", 0, "--device", "cpu", "--lr", 0.05,
            "--project", project, "--name", name, *extra]


# --------------------------------------------------------------------------- checks
def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_all_checkpoints_load(run_dir: Path) -> None:
    """No checkpoint is ever half-written under its real name."""
    for path in sorted(run_dir.glob("*.pt")):
        ckpt = utils.load_checkpoint(path)  # weights_only=True; a UserError if damaged
        assert {"model", "optimizer", "rng", "epoch", "step"} <= ckpt.keys(), path


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), (
            f"{what}: {key} differs by up to {(a[key].double() - b[key].double()).abs().max():.3g}")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final (and best) weights bit for bit, optimizer state, and one metrics row per epoch
    with the same values (all but the time)."""
    mine, ref = utils.load_checkpoint(run_dir / "last.pt"), utils.load_checkpoint(reference / "last.pt")
    assert (mine["epoch"], mine["step"]) == (ref["epoch"], ref["step"]) and "batch" not in mine
    assert_same_tensors(mine["model"], ref["model"], "last.pt")
    for index, state in ref["optimizer"]["state"].items():
        assert_same_tensors(mine["optimizer"]["state"][index], state, f"optimizer state {index}")
    assert (run_dir / "best.pt").exists() == (reference / "best.pt").exists()
    if (reference / "best.pt").exists():
        mine_best, ref_best = (utils.load_checkpoint(d / "best.pt") for d in (run_dir, reference))
        assert mine_best["epoch"] == ref_best["epoch"]
        assert_same_tensors(mine_best["model"], ref_best["model"], "best.pt")
    rows, ref_rows = metrics(run_dir), metrics(reference)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows] == list(range(1, len(ref_rows) + 1))
    for row, ref_row in zip(rows, ref_rows):
        assert {k: v for k, v in row.items() if k != "time_s"} == {k: v for k, v in ref_row.items()
                                                                   if k != "time_s"}
    assert not list(run_dir.glob(".*.tmp")), "stale temporary files left behind"


def stale_tmp(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob(".*.pt.*.tmp")} if run_dir.is_dir() else set()


def kill_when_a_checkpoint_is_being_written(proc: Proc, run_dir: Path, timeout: float = 60) -> bool:
    """Poll for a new ``.<name>.pt.*.tmp`` and SIGKILL the moment one appears."""
    before, deadline = stale_tmp(run_dir), time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        if stale_tmp(run_dir) - before:
            proc.signal(signal.SIGKILL)
            return True
        time.sleep(0.0005)
    return False


# --------------------------------------------------------------------------- references
EPOCH_SECONDS: dict[str, float] = {}  # wall time per epoch of the uninterrupted runs, on this machine


@pytest.fixture(scope="module")
def yolo_reference(scripts, voc, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("yolo_reference")
    start = time.monotonic()
    ok(scripts.run("train.py", *yolo_args(voc, project, "straight")))
    EPOCH_SECONDS["train.py"] = (time.monotonic() - start) / YOLO_EPOCHS
    return project / "straight"


@pytest.fixture(scope="module")
def darknet_reference(scripts, imagenet, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("darknet_reference")
    start = time.monotonic()
    ok(scripts.run("darknet_train.py", *darknet_args(imagenet, project, "straight")))
    EPOCH_SECONDS["darknet_train.py"] = (time.monotonic() - start) / DARKNET_EPOCHS
    return project / "straight"


# --------------------------------------------------------------------------- SIGKILL at any moment
def kill_and_resume(scripts: Scripts, script: str, args: list, run_dir: Path, plan: list) -> list[str]:
    """Run ``script`` once per kill in ``plan``, each resuming the last; then to the end.

    ``plan`` entries: ("delay", f): SIGKILL after f epochs' time (as the uninterrupted run
    took them on this machine: f < 1 keeps each kill from letting the run finish);
    ("in_save", n): SIGKILL half-way through writing the n-th checkpoint of that process;
    ("after_save", n): right after the n-th is in place; ("writing", None): SIGKILL when a
    temporary checkpoint file appears. Every ``*.pt`` must load after every kill. Returns
    what each kill hit.
    """
    hits = []
    for kind, value in plan:
        resume = ["--resume", run_dir] if (run_dir / "last.pt").exists() else ["--auto-resume"]
        env = {"in_save": {"REL_KILL_IN_SAVE": value}, "after_save": {"REL_KILL_AFTER_SAVE": value}}.get(kind)
        proc = scripts.start(script, *args, *resume, env=env, faults=env is not None)
        if kind == "delay":
            time.sleep(value * EPOCH_SECONDS[script])
            proc.signal(signal.SIGKILL)
        elif kind == "writing":
            kill_when_a_checkpoint_is_being_written(proc, run_dir)
        result = proc.wait()
        if result.rc == 0:  # the run ended before the kill
            hits.append(f"{kind} {value}: finished")
            break
        assert result.rc == -signal.SIGKILL, str(result)
        assert_all_checkpoints_load(run_dir)
        done = utils.load_checkpoint(run_dir / "last.pt")["epoch"] if (run_dir / "last.pt").exists() else 0
        hits.append(f"{kind} {value}: killed with {done} epochs saved"
                    + (f", {len(stale_tmp(run_dir))} temp files" if stale_tmp(run_dir) else ""))
    ok(scripts.run(script, *args, "--auto-resume"))
    return hits


def test_yolo_killed_at_random_moments_resumes_to_the_same_weights(scripts, voc, yolo_reference, tmp_path):
    """Eight SIGKILLs: right after a checkpoint is in place (the first: epoch 1's best.pt,
    before its last.pt), half-way through checkpoint writes, at seeded random moments, and
    while a temporary checkpoint file exists (polled for: last, as it could miss)."""
    rng = random.Random(20150608)
    plan = [("after_save", 1), ("delay", rng.uniform(0.1, 0.6)), ("after_save", 2), ("in_save", 2),
            ("delay", rng.uniform(0.1, 0.6)), ("in_save", 1), ("delay", rng.uniform(0.1, 0.6)),
            ("writing", None)]
    run_dir = tmp_path / "killed"
    hits = kill_and_resume(scripts, "train.py", yolo_args(voc, tmp_path, "killed"), run_dir, plan)
    print("\n".join(hits))
    assert sum("killed" in hit for hit in hits) >= 7, hits  # the last, polled for, may miss
    assert_same_run(run_dir, yolo_reference)


def test_darknet_killed_at_random_moments_resumes_to_the_same_weights(scripts, imagenet, darknet_reference,
                                                                       tmp_path):
    rng = random.Random(224)
    plan = [("after_save", 2), ("in_save", 2), ("delay", rng.uniform(0.3, 0.7)), ("writing", None)]
    run_dir = tmp_path / "killed"
    args = darknet_args(imagenet, tmp_path, "killed")
    hits = kill_and_resume(scripts, "darknet_train.py", args, run_dir, plan)
    print("\n".join(hits))
    assert sum("killed" in hit for hit in hits) >= 3, hits
    assert_same_run(run_dir, darknet_reference)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants: torchrun starts each worker in a session
    of its own, so killing torchrun's process group would leave the workers training."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, k = [pid], 0
    while k < len(family):
        family += children.get(family[k], [])
        k += 1
    for member in reversed(family):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def torchrun(workdir: Path, args: list, env: dict | None = None, faults: bool = False):
    """Start ``torchrun --standalone --nproc-per-node 2 darknet_train_multigpu_distr.py args``
    (through LAUNCHER with ``faults``); returns the process and its log file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **{k: str(v) for k, v in (env or {}).items()}}
    script = [str(REPO / "darknet_train_multigpu_distr.py")]
    if faults:
        (workdir / "launch.py").write_text(LAUNCHER)
        script.insert(0, str(workdir / "launch.py"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script,
           *map(str, args)]
    log = workdir / f"torchrun.{time.monotonic_ns()}.log"
    with open(log, "w") as f:  # a file, not a pipe: nobody reads while the test waits
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT), log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        pytest.fail(f"torchrun timed out:\n{log.read_text()[-4000:]}")
    return proc.returncode


def test_ddp_group_killed_mid_run_resumes_to_the_same_weights(imagenet, tmp_path):
    """torchrun, 2 CPU ranks (gloo): torchrun and both workers are SIGKILLed (a lost
    machine) once epoch 1 is logged, and the same command (--auto-resume) finishes the run;
    rank 0's last.pt equals an uninterrupted DDP run's bit for bit (a sum of two values is
    commutative, so the gradient all-reduce is deterministic with two ranks)."""
    runs = tmp_path / "runs"
    reference, log = torchrun(tmp_path, darknet_args(imagenet, runs, "straight"))
    assert finish(reference, log) == 0, log.read_text()[-6000:]
    args, run_dir = [*darknet_args(imagenet, runs, "killed"), "--auto-resume"], runs / "killed"
    killed, log = torchrun(tmp_path, args)
    deadline = time.monotonic() + 200
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert killed.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.01)
    time.sleep(random.Random(2).uniform(0.0, 0.3))
    kill_tree(killed.pid)
    assert finish(killed, log) == -signal.SIGKILL, log.read_text()[-4000:]
    assert_all_checkpoints_load(run_dir)
    assert utils.load_checkpoint(run_dir / "last.pt")["epoch"] < DARKNET_EPOCHS, "the run ended first"
    resumed, log = torchrun(tmp_path, args)
    assert finish(resumed, log) == 0, log.read_text()[-6000:]
    assert json.loads((run_dir / "config_resumed.json").read_text())["world_size"] == 2
    assert_same_run(run_dir, runs / "straight")


# --------------------------------------------------------------------------- SIGTERM and Ctrl-C
def test_sigterm_then_ctrl_c_mid_epoch_save_and_resume_exactly(scripts, voc, yolo_reference, tmp_path):
    """SIGTERM after 6 steps (epoch 2, batch 2 of 4), resume; Ctrl-C (SIGINT) 3 steps later
    (epoch 3, batch 1), resume again: both exit 0 with one 'interrupted:' line, and the run
    ends with the uninterrupted run's weights and metrics."""
    args, run_dir = yolo_args(voc, tmp_path, "stopped"), tmp_path / "stopped"
    stops = [("SIGTERM", 6, 1, 2), ("SIGINT", 3, 2, 1)]  # signal, after steps, epoch index, batch
    for k, (name, steps, epoch, batch) in enumerate(stops):
        resume = ["--resume", run_dir] if k else []
        result = ok(scripts.run("train.py", *args, *resume, faults=True,
                                env={"REL_STOP_AFTER_STEPS": steps, "REL_STOP_SIGNAL": name}))
        assert result.shown[-1].startswith(f"interrupted: {name}: stopped in epoch {epoch + 1} after batch "
                                           f"{batch}; state saved in {run_dir / 'last.pt'}"), str(result)
        assert "Traceback" not in result.stderr
        last = utils.load_checkpoint(run_dir / "last.pt")
        assert (last["epoch"], last["batch"], last["step"]) == (epoch, batch, epoch * YOLO_STEPS + batch)
        assert [row["epoch"] for row in metrics(run_dir)] == list(range(1, epoch + 1))
    ok(scripts.run("train.py", *args, "--resume", run_dir))
    assert_same_run(run_dir, yolo_reference)


def test_darknet_ctrl_c_from_outside_saves_and_resumes_exactly(scripts, imagenet, darknet_reference,
                                                                 tmp_path):
    """SIGINT sent by another process, once the first epoch is logged: wherever it lands
    (training, validation, a save), the run stops after a step, saves and exits 0."""
    args, run_dir = darknet_args(imagenet, tmp_path, "ctrl_c"), tmp_path / "ctrl_c"
    proc = scripts.start("darknet_train.py", *args)
    deadline = time.monotonic() + 60
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.alive() and time.monotonic() < deadline
        time.sleep(0.005)
    proc.signal(signal.SIGINT)
    result = ok(proc.wait())
    assert result.shown[-1].startswith("interrupted: SIGINT: stopped in epoch "), str(result)
    last = utils.load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] < DARKNET_EPOCHS and "batch" in last
    ok(scripts.run("darknet_train.py", *args, "--resume", run_dir))
    assert_same_run(run_dir, darknet_reference)


# --------------------------------------------------------------------------- damaged checkpoints
def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # bytes flipped in the middle of the zip archive
        middle = len(data) // 2
        flipped = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
        path.write_bytes(data[:middle] + flipped + data[middle + 4096:])


@pytest.fixture(scope="module")
def two_epochs(scripts, voc, tmp_path_factory) -> Path:
    """A YOLO run killed right after epoch 2's last.pt: last.pt (epoch 2), last_prev.pt (epoch 1)."""
    project = tmp_path_factory.mktemp("two_epochs")
    result = scripts.run("train.py", *yolo_args(voc, project, "run"), faults=True,
                         env={"REL_KILL_AFTER_EPOCH": 2})
    assert result.rc == -signal.SIGKILL, str(result)
    assert utils.load_checkpoint(project / "run" / "last_prev.pt")["epoch"] == 1
    return project / "run"


STOP_AT_ONCE = {"REL_STOP_AFTER_STEPS": 1}  # SIGTERM after the first step: the resume is checked, cheaply


def test_damaged_last_pt_falls_back_to_last_prev(scripts, voc, two_epochs, yolo_reference, tmp_path):
    """A truncated last.pt: the resume warns, naming it, continues from last_prev.pt
    (epoch 1) and ends exactly like the uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    damage(run_dir / "last.pt", "truncated")
    result = ok(scripts.run("train.py", *yolo_args(voc, tmp_path, "run"), "--resume", run_dir))
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, str(result)
    assert warnings[0].startswith(f"warning: {run_dir / 'last.pt'}: not a readable checkpoint (truncated or "
                                  f"corrupt?): "), warnings[0]
    assert warnings[0].endswith(f"; resuming from the previous checkpoint {run_dir / 'last_prev.pt'}")
    assert_same_run(run_dir, yolo_reference)


@pytest.mark.parametrize("how", ["flipped", "empty"])
def test_any_damage_is_detected_and_falls_back(scripts, voc, two_epochs, tmp_path, how):
    """Bytes flipped inside a tensor (torch.load alone would load them: the zip members'
    CRC-32 is checked), or an empty file: the same fallback to epoch 1's last_prev.pt."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    damage(run_dir / "last.pt", how)
    result = ok(scripts.run("train.py", *yolo_args(voc, tmp_path, "run"), "--resume", run_dir, faults=True,
                            env=STOP_AT_ONCE))
    assert f"warning: {run_dir / 'last.pt'}: not a readable checkpoint" in result.stdout, str(result)
    assert result.shown[-1].startswith("interrupted: SIGTERM: stopped in epoch 2 after batch 1;"), str(result)
    assert [row["epoch"] for row in metrics(run_dir)] == [1]
    resumed = json.loads((run_dir / "config_resumed.json").read_text())
    assert resumed["resume"] == str(run_dir)


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_damaged_last_pt_without_a_previous_one_is_a_one_line_error(scripts, voc, two_epochs, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    (run_dir / "last_prev.pt").unlink()
    damage(run_dir / "last.pt", how)
    before = hashes(run_dir)
    result = scripts.run("train.py", *yolo_args(voc, tmp_path, "run"), "--resume", run_dir)
    one_line_error(result, f"{run_dir / 'last.pt'}: not a readable checkpoint (truncated or corrupt?)")
    assert hashes(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_metrics_line_cut_by_a_crash_is_dropped_on_resume(scripts, voc, two_epochs, tmp_path):
    """A machine that dies while metrics.jsonl grows (a power cut, not SIGKILL: one write
    call is never split) leaves half a line; resuming drops it with the epochs the
    checkpoint lacks."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    rows = metrics(run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lr": 0.0009, "lo')
    ok(scripts.run("train.py", *yolo_args(voc, tmp_path, "run"), "--resume", run_dir, faults=True,
                   env=STOP_AT_ONCE))
    assert metrics(run_dir) == rows and [row["epoch"] for row in rows] == [1, 2]


# --------------------------------------------------------------------------- checkpoints from strangers
def test_every_torch_load_in_the_repository_is_weights_only():
    """Every ``torch.load(`` in the project's Python files passes ``weights_only=True``, and
    none is reached another way (an alias, ``from torch import load``,
    torch.serialization.load, pickle). Tests may pass ``weights_only=False`` explicitly
    (never by omission): that is how they prove a malicious checkpoint really is one."""
    calls, offenders = 0, []
    loaders = ("torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "pickle.Unpickler")
    for path in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(REPO).parts):
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            here = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and ast.unparse(node) in loaders:
                if ast.unparse(node) != "torch.load" or id(node) not in called:
                    offenders.append(f"{here}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization",
                                                                      "pickle") \
                    and any(alias.name in ("load", "loads", "Unpickler") for alias in node.names):
                offenders.append(f"{here}: from {node.module} import ...")
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                given = [k.value for k in node.keywords if k.arg == "weights_only"]
                safe = any(isinstance(v, ast.Constant) and v.value is True for v in given)
                explicit = any(isinstance(v, ast.Constant) for v in given)
                if not safe and not (path.parent.name == "tests" and explicit):
                    offenders.append(f"{here}: {ast.unparse(node)}")
    assert calls >= 5 and not offenders, offenders


class RunsACommand:
    """Unpickling this runs ``touch SENTINEL`` (what a malicious checkpoint would do)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint shaped like a train.py one whose 'model' would run a command on load."""
    folder = tmp_path_factory.mktemp("evil")
    sentinel, path = folder / "SENTINEL", folder / "evil.pt"
    torch.save({"kind": "yolo", "epoch": 1, "model_config": {"name": "yolov1"},
                "model": RunsACommand(sentinel)}, path)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert sentinel.exists()
    sentinel.unlink()
    return path, sentinel


STRANGER_LOADERS = {
    "train.py --resume": lambda p, voc, imagenet, out: ("train.py", *yolo_args(voc, out, "x"), "--resume", p),
    "train.py --backbone": lambda p, voc, imagenet, out: ("train.py", *yolo_args(voc, out, "x"),
                                                          "--backbone", p),
    "test.py": lambda p, voc, imagenet, out: ("test.py", p, "--data", voc / "val.csv", "--device", "cpu"),
    "detect_txt.py": lambda p, voc, imagenet, out: ("detect_txt.py", p, "--data", voc / "val.csv",
                                                    "--project", out, "--device", "cpu"),
    "detect.py": lambda p, voc, imagenet, out: ("detect.py", p, voc / "images" / "val_000000.jpg",
                                                "--project", out, "--device", "cpu"),
    "export.py": lambda p, voc, imagenet, out: ("export.py", p, "--include", "torchscript", "--project", out),
    "darknet_train.py --resume": lambda p, voc, imagenet, out: (
        "darknet_train.py", *darknet_args(imagenet, out, "x"), "--resume", p),
}


@pytest.mark.parametrize("loader", STRANGER_LOADERS)
def test_a_checkpoint_that_would_run_code_is_refused(scripts, voc, imagenet, evil, tmp_path, loader):
    path, sentinel = evil
    out = tmp_path / "runs"
    result = scripts.run(*STRANGER_LOADERS[loader](path, voc, imagenet, out))
    one_line_error(result, f"{path}: refused: the file holds objects other than tensors")
    assert not sentinel.exists()
    assert not out.exists() or not any(out.iterdir()), f"{loader} wrote {list(out.rglob('*'))}"


OTHER_CONFIGURATIONS = [  # train.py arguments of the resuming command -> what the message names
    # refused by the resume policy (resume_policy.py) before any model is loaded
    (["--S", "3"], ["cannot resume with other arguments", "--S 2 -> 3"]),
    (["--B", "1"], ["--B 2 -> 1"]),  # config.json holds the network's own B, as built
    (["--hidden", "32"], ["--hidden 16 -> 32"]),
    (["--width", "0.125"], ["--width 0.0625 -> 0.125"]),
    (["--no-batch-norm"], ["--no-batch-norm False -> True"]),
    (["--names", "NAMES21"], ["--names None -> ", "names21.txt"]),
    (["--model", "fast"], ["--model 'yolov1' -> 'fast'"]),
]


@pytest.mark.parametrize("extra, fragments", OTHER_CONFIGURATIONS,
                         ids=[" ".join(extra) for extra, _ in OTHER_CONFIGURATIONS])
def test_resuming_with_another_model_configuration_says_what_differs(scripts, voc, two_epochs, tmp_path,
                                                                      extra, fragments):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    names = tmp_path / "names21.txt"
    names.write_text("\n".join([*utils.VOC_CLASSES, "unicorn"]) + "\n")
    extra = [str(names) if arg == "NAMES21" else arg for arg in extra]
    before = hashes(run_dir)
    result = scripts.run("train.py", *yolo_args(voc, tmp_path, "run"), *extra, "--resume", run_dir)
    one_line_error(result, str(run_dir / "last.pt"), *fragments)
    assert hashes(run_dir) == before, "a refused resume changed the run folder"


def test_darknet_resume_with_another_width_says_what_differs(scripts, imagenet, darknet_reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(darknet_reference, run_dir)
    before = hashes(run_dir)
    result = scripts.run("darknet_train.py", *darknet_args(imagenet, tmp_path, "run", "--width", "0.125"),
                         "--resume", run_dir)
    one_line_error(result, str(run_dir / "last.pt"), "cannot resume with other arguments", "--width 0.0625 -> 0.125")
    assert hashes(run_dir) == before


# --------------------------------------------------------------------------- numerical faults
def test_non_finite_loss_stops_with_step_and_components_named(scripts, voc, two_epochs, tmp_path):
    """The 6th batch (epoch 2, batch 2) turns NaN: one line naming the epoch, the step and
    the loss components, exit 2; epoch 1's last.pt is intact: it equals, bit for bit, the
    epoch-1 checkpoint of a run with the same arguments and no fault."""
    args, run_dir = yolo_args(voc, tmp_path, "nan"), tmp_path / "nan"
    result = scripts.run("train.py", *args, faults=True, env={"REL_NAN_AT_BATCH": 6})
    one_line_error(result, "loss became nan at epoch 2, step 5 (loss=nan, coord=nan, obj=nan, noobj=nan, "
                           "cls=nan); lower --lr, use --grad-clip or --skip-nonfinite")
    assert "Warning" not in result.stderr, str(result)
    assert_all_checkpoints_load(run_dir)
    last = utils.load_checkpoint(run_dir / "last.pt")
    good = utils.load_checkpoint(two_epochs / "last_prev.pt")
    assert last["epoch"] == good["epoch"] == 1
    assert_same_tensors(last["model"], good["model"], "last.pt")
    assert torch.equal(last["rng"]["torch"], good["rng"]["torch"])
    assert last["rng"]["python"] == good["rng"]["python"]
    assert [row["epoch"] for row in metrics(run_dir)] == [1]


def test_skip_nonfinite_skips_and_counts_the_step(scripts, voc, tmp_path):
    """With --skip-nonfinite the NaN batch is skipped (no update, and batch norm's running
    statistics untouched), counted in metrics.jsonl, and training goes on."""
    args, run_dir = yolo_args(voc, tmp_path, "skip", "--skip-nonfinite", "--epochs", 3), tmp_path / "skip"
    result = ok(scripts.run("train.py", *args, faults=True, env={"REL_NAN_AT_BATCH": 6}))
    assert "Traceback" not in result.stderr
    rows = metrics(run_dir)
    assert [row.get("skipped_steps", 0) for row in rows] == [0, 1, 0]
    assert [row["images"] for row in rows] == [8, 6, 8]
    assert utils.load_checkpoint(run_dir / "last.pt")["step"] == 3 * YOLO_STEPS
    for name, tensor in utils.load_checkpoint(run_dir / "last.pt")["model"].items():
        assert torch.isfinite(tensor.float()).all(), name


def test_ddp_skip_nonfinite_on_one_rank_skips_on_every_rank(imagenet, tmp_path):
    """Under DDP a NaN on rank 1 alone: both ranks skip the step together (the backward pass
    all-reduces gradients, so one rank skipping alone would desynchronise the collectives:
    gloo aborts, NCCL hangs), the skip is counted once, and training goes on."""
    run_dir = tmp_path / "runs" / "skip"
    args = [*darknet_args(imagenet, tmp_path / "runs", "skip"), "--epochs", 2, "--skip-nonfinite"]
    proc, log = torchrun(tmp_path, args, env={"REL_NAN_AT_BATCH": 2, "REL_NAN_RANK": 1}, faults=True)
    assert finish(proc, log) == 0, log.read_text()[-6000:]
    rows = metrics(run_dir)
    assert [row.get("skipped_steps", 0) for row in rows] == [1, 0]
    assert [row["images"] for row in rows] == [8, 12]  # 12 images an epoch; the skipped batch held 4
    for name, tensor in utils.load_checkpoint(run_dir / "last.pt")["model"].items():
        assert torch.isfinite(tensor.float()).all(), name


def test_ddp_nonfinite_loss_on_one_rank_stops_every_rank_in_one_line(imagenet, tmp_path):
    """Bug: without --skip-nonfinite a NaN loss on rank 1 alone stopped rank 1 alone; rank 0
    went on into the gradient all-reduce (gloo: a traceback when the peer's socket closed;
    NCCL: a hang). Now the ranks agree first and both stop with rank 1's line."""
    args = [*darknet_args(imagenet, tmp_path / "runs", "stop"), "--epochs", 2]
    proc, log = torchrun(tmp_path, args, env={"REL_NAN_AT_BATCH": 2, "REL_NAN_RANK": 1}, faults=True)
    assert finish(proc, log) != 0
    text = log.read_text()
    errors = [line for line in output_lines(text) if line.startswith("error: loss became nan")]
    assert len(errors) == 2 and errors[0] == errors[1], text[-6000:]
    assert "[rank0]" not in text and "[rank1]" not in text, text[-6000:]  # no worker traceback


def test_ddp_skipped_last_micro_batch_keeps_the_ranks_identical(imagenet, tmp_path):
    """--accum-steps 2 under DDP, the NaN in the last micro-batch of the first step (rank 1):
    both ranks skip it, so DDP's gradient all-reduce (in that backward pass) never runs; the
    engine averages the first micro-batch's gradients by hand, and both ranks end with the
    same weights (stepping on each rank's own gradients would let them drift apart)."""
    final = tmp_path / "final.pt"
    args = [*darknet_args(imagenet, tmp_path / "runs", "accum"), "--epochs", 2, "--skip-nonfinite",
            "--accum-steps", 2]
    proc, log = torchrun(tmp_path, args, env={"REL_NAN_AT_BATCH": 2, "REL_NAN_RANK": 1,
                                              "REL_SAVE_FINAL": final}, faults=True)
    assert finish(proc, log) == 0, log.read_text()[-6000:]
    assert [row.get("skipped_steps", 0) for row in metrics(tmp_path / "runs" / "accum")] == [1, 0]
    rank0, rank1 = (torch.load(f"{final}.rank{r}", weights_only=True) for r in (0, 1))
    assert_same_tensors(rank0, rank1, "weights of rank 0 and rank 1")


def test_a_step_whose_batches_were_all_skipped_changes_nothing():
    """engine.optimizer_step without gradients (every micro-batch skipped): no update, and
    no failure with a GradScaler (float16 AMP), whose step needs a scaled backward."""
    import engine
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    engine.optimizer_step(model, optimizer, scaler, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.optimizer_step(model, optimizer, scaler, 1.0)
    assert_same_tensors(model.state_dict(), before, "weights")


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_grad_clip_bounds_the_update(scripts, voc, tmp_path, clip):
    """One SGD step, lr 1, no momentum, no weight decay: the weights move by the clipped
    gradient, whose norm is at most --grad-clip (unclipped it is far larger)."""
    initial = tmp_path / "initial.pt"
    args = yolo_args(voc, tmp_path, "clip", "--epochs", 1, "--batch-size", 8, "--optimizer", "sgd", "--lr", 1,
                     "--momentum", 0, "--weight-decay", 0, "--schedule", "constant", "--warmup-epochs", 0,
                     "--grad-clip", clip)
    args.remove("--val-data"), args.remove(voc / "val.csv")
    ok(scripts.run("train.py", *args, faults=True, env={"REL_SAVE_INITIAL": initial}))
    before = torch.load(initial, weights_only=True)
    after = utils.load_checkpoint(tmp_path / "clip" / "last.pt")
    assert after["step"] == 1
    names = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    update = torch.cat([(after["model"][n] - before[n]).flatten().double() for n in names])
    if clip:
        assert 0.5 * clip < update.norm() <= clip * (1 + 1e-4)
    else:
        assert update.norm() > 10 * 0.05

