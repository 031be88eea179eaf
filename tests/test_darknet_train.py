"""Darknet pretraining scripts on a tiny generated ImageNet tree (CPU, a few seconds each).

Each script runs as a user would start it (a subprocess) and leaves a run folder that is
checked; the shared pieces (top-k counting, exact resume, the backbone hand-over to
YOLOv1, argument errors) are tested in-process. The network is 1/16 wide at 64 x 64:
64 px keeps a 2 x 2 map before the pooling, so batch norm works even on a last batch of
one image. DistributedDataParallel for real (torchrun) is in test_ddp.py.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import classification
import darknet_train
import engine
import utils
from darknet_model import Darknet
from model import YOLOv1, load_backbone
from synthetic import write_imagenet_tree

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("darknet_train.py", "darknet_train_multigpu.py", "darknet_train_multigpu_distr.py")
TINY = ["--width", "0.0625", "--img-size", "64", "--batch-size", "8", "--workers", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """4 classes (so top-5 is always 100 %): 16 training images, 8 flat validation images
    with LOC_val_solution.csv, as in the ImageNet download from Kaggle."""
    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet"), n_classes=4, n_train_per_class=4,
                               n_val_per_class=2, size=64)


@pytest.fixture
def one_thread():
    """In-process training of a tiny network: more threads only wait on each other (and on a
    busy 2-core machine, 20 times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data_args(tree: Path) -> list[str]:
    return ["--train-dir", str(tree / "train"), "--val-dir", str(tree / "val"),
            "--val-labels", str(tree / "LOC_val_solution.csv")]


def run_script(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the three scripts
EXTRA = {  # each script also exercises a few options on the way
    "darknet_train.py": ["--accum-steps", "2", "--label-smoothing", "0.1", "--channels-last"],
    "darknet_train_multigpu.py": ["--no-batch-norm", "--workers", "1"],
    "darknet_train_multigpu_distr.py": ["--schedule", "cosine"],
}
NOTE = {"darknet_train.py": None, "darknet_train_multigpu.py": "DataParallel needs two or more GPUs",
        "darknet_train_multigpu_distr.py": "not started by torchrun"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_trains_one_epoch_and_leaves_a_run_folder(script, tree, tmp_path):
    proc = run_script(script, *TINY, *data_args(tree), *EXTRA[script], "--project", str(tmp_path))
    run_dir = tmp_path / "exp"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 1 and config["width"] == 0.0625 and config["epochs"] == 1
    ckpt = utils.load_checkpoint(run_dir / "last.pt")           # weights_only=True
    assert ckpt["kind"] == "darknet" and ckpt["epoch"] == 1
    assert ckpt["model_config"] == {"num_classes": 4, "batch_norm": "--no-batch-norm" not in EXTRA[script],
                                    "width": 0.0625, "head": "linear", "darknet_bn": False}
    assert utils.load_checkpoint(run_dir / "best.pt")["best"] == ckpt["best"]
    (row,) = metrics(run_dir)
    assert row["epoch"] == 1 and row["images"] == 16
    assert 0 <= row["top1"] <= row["top5"] <= 100 and row["top5"] == 100  # 4 classes: top-5 is all
    assert row["top1"] * 8 / 100 == pytest.approx(round(row["top1"] * 8 / 100))  # whole images of 8
    if NOTE[script]:
        assert NOTE[script] in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_the_shared_arguments(script, capsys):
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--train-dir", "--val-labels", "--label-smoothing", "--accum-steps", "--auto-resume",
                   "--channels-last", "--no-batch-norm", "--width"):
        assert option in out
    assert out.split("\n\n")[1].startswith(module.__doc__.splitlines()[0])  # each script's own text


def test_defaults_are_darknets_recipe_and_point_at_the_bundled_sample():
    args = darknet_train.parse_args([])
    assert (args.lr, args.batch_size, args.schedule, args.poly_power) == (0.1, 128, "poly", 4.0)
    assert (args.momentum, args.weight_decay, args.img_size, args.project) == (0.9, 5e-4, 224, "runs/darknet")
    assert args.train_dir == "data/imagenet/train"


def test_bundled_sample_loads_with_the_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    train_set, val_set = darknet_train.build_datasets(darknet_train.parse_args([]))
    assert len(train_set) > 0 and len(val_set) > 0 and val_set.classes == train_set.classes


# --------------------------------------------------------------------------- shared pieces
def test_topk_correct_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    # sample 0: top-1 hit; sample 1: label 2 ties label 1 for second place; sample 2: label 0 last
    assert classification.topk_correct(logits, labels, ks=(1, 2)) == [1, 1]
    assert classification.topk_correct(logits, labels, ks=(1, 5)) == [1, 3]  # k capped at 3 classes


def test_auto_resume_after_a_crash_continues_exactly(tree, tmp_path, monkeypatch, one_thread):
    """Two epochs straight, and two epochs with a crash at the start of the second and the
    same command started again, end with the same weights, bit for bit."""
    argv = [*TINY, "--epochs", "2", *data_args(tree), "--project", str(tmp_path), "--auto-resume"]
    darknet_train.main([*argv, "--name", "straight"])
    real_train_one_epoch = engine.train_one_epoch

    class Preempted(Exception):
        pass

    def crash_at_second_epoch(state, step_fn, epoch, *rest):
        if epoch == 1:
            raise Preempted
        return real_train_one_epoch(state, step_fn, epoch, *rest)
    monkeypatch.setattr(engine, "train_one_epoch", crash_at_second_epoch)
    with pytest.raises(Preempted):
        darknet_train.main([*argv, "--name", "crashed"])
    monkeypatch.setattr(engine, "train_one_epoch", real_train_one_epoch)
    darknet_train.main([*argv, "--name", "crashed"])

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed", "straight"]  # no crashed2
    assert json.loads((crashed / "config_resumed.json").read_text())["resume"] == str(crashed / "last.pt")
    assert [row["epoch"] for row in metrics(crashed)] == [1, 2]
    a, b = (utils.load_checkpoint(d / "last.pt") for d in (straight, crashed))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_trained_backbone_loads_into_yolov1(tree, tmp_path, one_thread):
    """What train.py --backbone does: YOLOv1's first 20 convolutions then compute exactly
    what the pretrained Darknet's do (eval mode: batch norm uses the trained statistics)."""
    darknet_train.main([*TINY, *data_args(tree), "--project", str(tmp_path)])
    ckpt = utils.load_checkpoint(tmp_path / "exp" / "best.pt")
    darknet = Darknet(**ckpt["model_config"])
    darknet.load_state_dict(ckpt["model"])
    yolo = YOLOv1(S=2, C=4, hidden=8, width=ckpt["model_config"]["width"])
    load_backbone(yolo, ckpt, "best.pt")
    darknet.eval(), yolo.eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(yolo.features(x), darknet.features(x))
    assert darknet.features[0][1].running_mean.abs().sum() > 0  # trained statistics, not the init


@pytest.mark.parametrize("argv, message", [
    (["--width", "0"], "--width must be positive"),
    (["--img-size", "16"], "--img-size must be at least 32"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--train-dir", "no/such/folder"], "no/such/folder"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(darknet_train.main, [*argv, "--project", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written before the data is found
