"""DistributedDataParallel for real: torchrun on the CPU with gloo (a few seconds per launch).

* Two processes train the same weights, bit for bit, and one step of 2 processes x b
  images equals one step of one process with 2b images.
* Two "nodes" (two torchrun agents on this machine) meet at a c10d rendezvous.
* A process that dies makes torchrun (--max-restarts=1) restart the group, which
  continues from the run's last.pt (--auto-resume).

The processes run darknet_train_multigpu_distr.main through LAUNCHER, written to a
temporary folder: it changes nothing in the script, but wraps two engine functions so
that every rank saves its final weights, and so that rank 1 can die once, on request.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils
from darknet_model import Darknet
from runs import seed_everything
from synthetic import write_imagenet_tree

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.0625", "--img-size", "64", "--workers", "0"]
TIMEOUT = 240

LAUNCHER = '''
import os, sys
from pathlib import Path
import torch
import distributed, engine, utils
import darknet_train_multigpu_distr as script

OUT = Path(os.environ["TEST_OUT"])
CRASH_AT_EPOCH = int(os.environ.get("TEST_CRASH_AT_EPOCH", "0"))
real_fit, real_train_one_epoch = engine.fit, engine.train_one_epoch


def fit(state, *args, **kwargs):
    best = real_fit(state, *args, **kwargs)
    torch.save(distributed.unwrap(state.model).state_dict(), OUT / f"rank{os.environ['RANK']}.pt")
    return best


def train_one_epoch(state, step_fn, epoch, *rest):
    marker = OUT / "crashed"
    if epoch + 1 == CRASH_AT_EPOCH and not marker.exists():
        torch.distributed.barrier()  # rank 0 has saved the previous epoch's last.pt
        if state.dist.rank == 1:
            marker.touch()
            os._exit(1)
    return real_train_one_epoch(state, step_fn, epoch, *rest)


engine.fit, engine.train_one_epoch = fit, train_one_epoch
utils.run_cli(script.main)
'''


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """4 classes x 4 training images (16), 8 flat validation images."""
    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet"), n_classes=4, n_train_per_class=4,
                               n_val_per_class=2, size=64)


def data_args(tree: Path) -> list[str]:
    return ["--train-dir", str(tree / "train"), "--val-dir", str(tree / "val"),
            "--val-labels", str(tree / "LOC_val_solution.csv")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, torchrun_args: list[str], script_args: list[str], env=None) -> subprocess.Popen:
    """Start ``python -m torch.distributed.run ... LAUNCHER script_args`` (one thread per process)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    (tmp_path / "out").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TEST_OUT": str(tmp_path / "out"),
           **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(launcher), *script_args]
    # A session of its own, so that a timeout can end torchrun and its workers together.
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def output_of(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """torchrun's output once it ends; a failure (its process group killed) after ``timeout`` s."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{out[-4000:]}")
    return out


def output_lines(out: str) -> list[str]:
    """torchrun's output (the processes share it) as lines, each starting where its writer
    began: one rank's error line may follow the other's progress bar, which ends without a
    newline ("...| 0/3 [00:00<?]error: loss became nan ..."; failed tests under load)."""
    return re.sub(r"(?=\[rank|error:)", "\n", out.replace("\r", "\n")).splitlines()


def finish(proc: subprocess.Popen) -> str:
    out = output_of(proc)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{out[-6000:]}"
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank_weights(tmp_path: Path, world_size: int) -> list[dict]:
    return [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if atol == 0 else torch.allclose(a[key], b[key], rtol=0, atol=atol)
        assert same, f"{key}: max difference {(a[key].double() - b[key].double()).abs().max():.3g}"


# --------------------------------------------------------------------------- equivalence
def test_two_processes_train_like_one_process_with_twice_the_batch(tree, tmp_path):
    """One step over all 16 images: 2 ranks x 8 under DDP, or 1 process x 16.

    DDP averages the two ranks' gradients of their mean losses, which is the gradient of
    the mean loss over all 16 images: the same SGD step. Batch norm is off because it
    normalises each rank's 8 images with their own statistics, a different function from
    one normalisation over 16; augmentation is off because the random crops would differ.
    What is left differs only in the order of floating-point sums (about 1e-8 here), hence
    atol 1e-5; a rate of 0.5 without warm-up moves every tensor by 1e-4 or more, so a
    wrong step (a rank training alone, on half the batch) could not pass.
    """
    runs = tmp_path / "runs"
    common = [*TINY, *data_args(tree), "--batch-size", "16", "--epochs", "1", "--no-batch-norm",
              "--no-augment", "--lr", "0.5", "--warmup-epochs", "0", "--project", str(runs)]
    single = subprocess.run([sys.executable, str(REPO / "darknet_train.py"), *common, "--name", "single"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-4000:]
    out = finish(torchrun(tmp_path, ["--standalone", "--nproc-per-node", "2"], [*common, "--name", "ddp"]))

    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]
    assert json.loads((runs / "ddp" / "config.json").read_text())["world_size"] == 2
    assert out.count("done: best validation top-1") == 1  # rank 0 alone prints
    (row,), (single_row,) = metrics(runs / "ddp"), metrics(runs / "single")
    assert row["images"] == 16 and 0 <= row["top1"] <= row["top5"] <= 100
    assert row["loss"] == pytest.approx(single_row["loss"], abs=1e-5)
    rank0, rank1 = rank_weights(tmp_path, 2)
    assert_same(rank0, rank1)
    ddp = utils.load_checkpoint(runs / "ddp" / "last.pt")["model"]
    assert_same(ddp, rank0)
    reference = utils.load_checkpoint(runs / "single" / "last.pt")["model"]
    assert_same(ddp, reference, atol=1e-5)
    seed_everything(0)  # the initial weights, as build_model makes them
    initial = Darknet(4, batch_norm=False, width=0.0625).state_dict()
    assert min((reference[k] - v).abs().max() for k, v in initial.items()) > 5e-5


# --------------------------------------------------------------------------- two nodes
def test_two_nodes_meet_at_a_rendezvous_and_agree(tree, tmp_path):
    """Two torchrun agents of one process each, as on two machines: ranks come from the
    c10d rendezvous. Batch norm and augmentation are on; after training both ranks hold
    rank 0's weights and batch-norm statistics, which are also the checkpoint's."""
    endpoint = f"localhost:{free_port()}"
    runs = tmp_path / "runs"
    args = [*TINY, *data_args(tree), "--batch-size", "8", "--epochs", "2", "--project", str(runs)]
    nodes = [torchrun(tmp_path, ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                 "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"], args)
             for _ in range(2)]
    outputs = [finish(node) for node in nodes]
    assert sum(out.count("done: best validation top-1") for out in outputs) == 1
    assert [p.name for p in runs.iterdir()] == ["exp"]
    rank0, rank1 = rank_weights(tmp_path, 2)
    assert_same(rank0, rank1)
    assert_same(utils.load_checkpoint(runs / "exp" / "last.pt")["model"], rank0)
    rows = metrics(runs / "exp")
    assert [row["epoch"] for row in rows] == [1, 2] and all(row["images"] == 16 for row in rows)


# --------------------------------------------------------------------------- a rank dies
def test_a_dead_rank_restarts_the_group_which_resumes_from_last_pt(tree, tmp_path):
    """Rank 1 exits at the start of epoch 2 (once); torchrun --max-restarts=1 starts both
    processes again with the same arguments, and --auto-resume picks up epoch 1's last.pt.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives the restarted processes a fresh store:
    on the store of the first attempt they would fail to connect (pytorch/pytorch#167288).
    """
    runs = tmp_path / "runs"
    run_dir = runs / "preemptible"
    args = [*TINY, *data_args(tree), "--batch-size", "8", "--epochs", "3", "--project", str(runs),
            "--name", "preemptible", "--auto-resume"]
    env = {"TEST_CRASH_AT_EPOCH": "2", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    restarting = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    out = finish(torchrun(tmp_path, restarting, args, env))
    assert (tmp_path / "out" / "crashed").exists(), out[-4000:]
    assert [p.name for p in runs.iterdir()] == ["preemptible"]
    resumed = json.loads((run_dir / "config_resumed.json").read_text())
    assert resumed["resume"] == str(run_dir / "last.pt") and resumed["world_size"] == 2
    assert [row["epoch"] for row in metrics(run_dir)] == [1, 2, 3]
    last = utils.load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 3 and last["step"] == 3 * 2  # 2 steps an epoch: 16 images, batch 8
    rank0, rank1 = rank_weights(tmp_path, 2)
    assert_same(rank0, rank1)
    assert_same(last["model"], rank0)
