"""Red-team pass on backbone pretraining under torchrun (gloo, 2 CPU ranks, ~10 s a launch).

* A bad training image on rank 1 only: before, rank 1 stopped alone and said "state saved
  in last.pt" while rank 0 died in its next gradient all-reduce with a gloo traceback
  (under NCCL it waits until the timeout) and nothing was saved. Now every rank agrees on
  the failure before the next step (distributed.agreed_batches): one line, last.pt saved.
* The saved partial epoch holds every rank's images: resumed as one process, the epoch
  counted 14 of its 16 images (rank 0's running sums alone were saved).
* A bad validation image on rank 1 only: the epoch is saved unvalidated on every rank's word.
* --batch-size that the ranks cannot share equally is refused (2 ranks x 3 made steps of 6
  for --batch-size 7).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


import utils
from distributed import EpochSampler
from imagenet import build_imagenet
from synthetic import write_imagenet_tree
from test_ddp import output_lines, output_of  # torchrun's output, its process group killed after a timeout

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.0625", "--img-size", "64", "--workers", "0"]
TIMEOUT = 120


def tree_with_bad_image(root: Path, where: str) -> tuple[Path, Path, bytes]:
    """16 training and 8 flat validation images; one truncated: rank 1's first image of
    its second training batch (--batch-size 8, seed 0), or a validation image of rank 1's
    shard (every second image, from the second). Returns (tree, bad file, its good bytes)."""
    tree = write_imagenet_tree(root, n_classes=4, n_train_per_class=4, n_val_per_class=2, size=64)
    if where == "train":
        samples = build_imagenet(tree / "train", train=True, img_size=64).samples
        bad = Path(samples[EpochSampler(16, True, 0, rank=1, world_size=2).indices()[4]][0])
    else:
        bad = sorted((tree / "val").iterdir())[3]
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 2])
    return tree, bad, good


def args_for(tree: Path, runs: Path) -> list[str]:
    return [*TINY, "--train-dir", str(tree / "train"), "--val-dir", str(tree / "val"),
            "--val-labels", str(tree / "LOC_val_solution.csv"), "--project", str(runs), "--batch-size", "8"]


def torchrun(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "darknet_train_multigpu_distr.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = output_of(proc, TIMEOUT)  # a hang (the bug these tests guard against) fails after TIMEOUT s
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def worker_lines(out: str) -> list[str]:
    """Lines the workers wrote (torchrun's own report of a failed worker, with its
    ChildFailedError traceback, is the launcher's, not the script's)."""
    return [line for line in output_lines(out) if line.startswith(("[rank", "error:"))]


def test_bad_training_image_on_one_rank_stops_every_rank_and_saves_the_epoch(tmp_path):
    """Bug: a bad file on rank 1 stopped rank 1 alone; rank 0 died in the gradient
    all-reduce (a gloo traceback; NCCL hangs) and last.pt, promised by rank 1's message,
    was never written. Then: the partial epoch saved holds both ranks' images, so a
    resume as one process counts each of the 16 images once (it counted 14)."""
    tree, bad, good = tree_with_bad_image(tmp_path / "imagenet", "train")
    runs = tmp_path / "runs"
    proc = torchrun(tmp_path, args_for(tree, runs) + ["--epochs", "2"])
    lines = worker_lines(proc.stdout)
    assert proc.returncode != 0
    assert not any(line.startswith("[rank") for line in lines), "\n".join(lines[-20:])  # no worker traceback
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], lines  # both ranks, the same one line
    assert f"{bad.name}: unreadable image" in errors[0] and "after batch 1" in errors[0]
    ckpt = utils.load_checkpoint(runs / "exp" / "last.pt")
    assert ckpt["batch"] == 1 and ckpt["partial"]["seen"] == 8  # 4 images on each rank

    bad.write_bytes(good)
    single = subprocess.run([sys.executable, str(REPO / "darknet_train.py"), *args_for(tree, runs),
                             "--epochs", "2", "--resume", str(runs / "exp")], cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    rows = [json.loads(line) for line in (runs / "exp" / "metrics.jsonl").read_text().splitlines()]
    assert [row["images"] for row in rows] == [16, 16]


def test_bad_validation_image_on_one_rank_saves_the_epoch_unvalidated(tmp_path):
    """Bug: rank 1 raised alone in validation; rank 0 died in the reduction of the counts
    (gloo traceback) and the epoch just trained, which rank 1 said was saved, was lost."""
    tree, bad, _ = tree_with_bad_image(tmp_path / "imagenet", "val")
    runs = tmp_path / "runs"
    proc = torchrun(tmp_path, args_for(tree, runs) + ["--epochs", "1"])
    lines = worker_lines(proc.stdout)
    assert proc.returncode != 0
    assert not any(line.startswith("[rank") for line in lines), "\n".join(lines[-20:])
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and f"{bad.name}: unreadable image" in errors[0]
    ckpt = utils.load_checkpoint(runs / "exp" / "last.pt")
    assert ckpt["unvalidated"] and ckpt["epoch"] == 1
