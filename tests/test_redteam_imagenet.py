"""Red-team pass on backbone pretraining (ImageNet folders, the validation labels, top-k,
arguments at edges) in one process; the torchrun cases are in test_redteam_imagenet_ddp.py.
Each test names the bug it guards against: what a user saw before it was fixed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import classification
import darknet_train
import engine
import utils
from distributed import Dist
from imagenet import build_imagenet, read_imagenet_val_labels
from synthetic import write_imagenet_tree
from utils import UserError

TRUTH = [2, 1, 2, 0, 1, 3, 3, 0]  # the generated tree's validation classes, in file order


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_imagenet_tree(tmp_path / "imagenet", n_classes=4, n_train_per_class=2, n_val_per_class=2,
                               size=32)


def val_targets(tree: Path, labels: Path | None = None) -> list[int]:
    val = build_imagenet(tree / "train", tree / "val", labels or tree / "LOC_val_solution.csv", train=False,
                         img_size=32)
    return [target for _, target in val.samples]


def rewrite(path: Path, edit) -> None:
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


# --------------------------------------------------------------------------- the validation labels
def test_label_file_from_a_spreadsheet_reads_like_the_original(tree):
    """Bug: a UTF-8 BOM (Excel's "CSV UTF-8") was refused as "expected 'image wnid'", and
    quoted fields were read as image names with quotes, so no image was found."""
    labels = tree / "LOC_val_solution.csv"
    rows = labels.read_text().splitlines()
    quoted = [rows[0]] + ['"{}","{}"'.format(*row.split(",", 1)) for row in rows[1:]]
    labels.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(quoted).encode() + b"\r\n")
    assert val_targets(tree) == TRUTH


def test_an_image_listed_twice_with_two_classes_is_refused_naming_both_lines(tree):
    """Bug: the later line silently won (one image's truth replaced by another class)."""
    labels = tree / "LOC_val_solution.csv"
    rewrite(labels, lambda rows: rows + ["ILSVRC2012_val_00000001,n04147183 1 1 9 9"])
    with pytest.raises(UserError, match=r"LOC_val_solution.csv:10: ILSVRC2012_val_00000001 is listed again "
                                        r"with another class \(n04147183; line 2: n04254680\)"):
        val_targets(tree)
    rewrite(labels, lambda rows: rows[:-1] + [rows[1]])  # the same line twice: harmless, read once
    assert val_targets(tree) == TRUTH


def test_two_validation_images_of_one_name_are_refused(tree):
    """Bug: a.JPEG and a.png both took a's label line: one image validated twice (9 of 8)."""
    first = tree / "val" / "ILSVRC2012_val_00000001.JPEG"
    shutil.copy(first, first.with_suffix(".png"))
    with pytest.raises(UserError, match=r"ILSVRC2012_val_00000001.png: ILSVRC2012_val_00000001.JPEG has the same name"):
        val_targets(tree)


def test_labelled_images_missing_from_the_folder_are_said(tree, capsys):
    """Bug: label lines whose images are not in the validation folder were dropped without a
    word: top-1 of a subset reported as the validation set's. A subset may be meant (a
    quicker validation): one warning line, and the images there are validated."""
    assert val_targets(tree) == TRUTH and "warning" not in capsys.readouterr().out
    (tree / "val" / "ILSVRC2012_val_00000003.JPEG").unlink()
    (tree / "val" / "ILSVRC2012_val_00000007.JPEG").unlink()
    assert val_targets(tree) == TRUTH[:2] + TRUTH[3:6] + TRUTH[7:]
    assert capsys.readouterr().out == (
        f"warning: {tree / 'LOC_val_solution.csv'}: 2 of its 8 images are not in {tree / 'val'} "
        "(the first: ILSVRC2012_val_00000003); validating on the 6 there\n")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="ab,\" \t\r\ufeff0n", max_size=12), max_size=5))
def test_fuzz_label_file_reads_or_refuses_in_one_line(tmp_path_factory, lines):
    """No label file gives anything but a mapping or one UserError naming the file."""
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    path.write_text("\n".join(["ImageId,PredictionString", *lines]), encoding="utf-8")
    try:
        truth = read_imagenet_val_labels(path)
    except UserError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        return
    assert all(isinstance(wnid, str) and wnid and line >= 2 for wnid, line in truth.values())


# --------------------------------------------------------------------------- class folders
def test_class_folders_differing_only_in_case_are_refused(tree):
    """Bug: n02690373 and N02690373 became two classes (5 of 4), with one class's images."""
    shutil.copytree(tree / "train" / "n02690373", tree / "train" / "N02690373")
    with pytest.raises(UserError, match="'N02690373' and 'n02690373' differ only in case"):
        build_imagenet(tree / "train", train=True, img_size=32)


def test_a_broken_link_to_a_class_folder_is_refused(tree):
    """Bug: ImageFolder skipped it, and every class after it got the id of the next one."""
    os.symlink(tree / "elsewhere", tree / "train" / "n03000000")
    with pytest.raises(UserError, match="n03000000: a link to .*elsewhere, which does not exist"):
        build_imagenet(tree / "train", train=True, img_size=32)


def test_validation_class_folders_without_images_are_refused(tree, tmp_path):
    """Bug: class folders that were all empty made a validation set of 0 images, and every
    epoch logged top-1 0 % (of nothing) with exit 0."""
    val = tmp_path / "val"
    for wnid in os.listdir(tree / "train"):
        (val / wnid).mkdir(parents=True)
    with pytest.raises(UserError, match="val: no validation images in its class folders"):
        build_imagenet(tree / "train", val, train=False, img_size=32)


# --------------------------------------------------------------------------- top-k
def test_topk_counts_ties_as_misses_whatever_order_topk_returns():
    """Bug: torch.topk orders ties arbitrarily: all-equal logits of 10 classes put class 8
    first, so a collapsed network scored top-1 on every class-8 image (argmax, used for
    training's top-1, says class 0: two top-1s for the same logits)."""
    flat = torch.zeros(10, 10)
    labels = torch.arange(10)
    assert classification.topk_correct(flat, labels) == [0, 0]  # 10 tied > 5: nobody is in the top 5
    # by hand: label 1 ties label 2 at the top (a miss for k=1, a hit for k=2 and 5);
    # label 3 is 4th of 6 with 3 above it (hit for 5); a NaN row is a miss
    logits = torch.tensor([[0, 2, 2, 1, 0, 0], [5, 4, 3, 2, 1, 0], [0, 1, float("nan"), 0, 0, 0.]])
    assert classification.topk_correct(logits, torch.tensor([1, 3, 1]), ks=(1, 2, 5)) == [0, 1, 2]
    # fewer classes than k: every label is in the top 5 of 4
    four = torch.tensor([[3.0, 2, 1, 0]] * 3)
    assert classification.topk_correct(four, torch.tensor([0, 1, 3])) == [1, 3]


def test_training_top1_follows_the_same_tie_rule():
    """Bug: the training log used argmax (ties to the lowest class) and validation topk."""
    step = classification.classification_step(0.0, False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    torch.nn.init.zeros_(model[1].weight), torch.nn.init.zeros_(model[1].bias)  # every logit 0
    _, logs, _ = step(model, (torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0])), torch.device("cpu"))
    assert float(logs["train_top1"]) == 0.0  # argmax said 100 %


# --------------------------------------------------------------------------- arguments at edges
def run(argv, tmp_path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(darknet_train.main, [*argv, "--project", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize("batch", ["1", "7"])
def test_a_batch_of_one_image_on_a_one_pixel_map_is_refused_before_training(tree, tmp_path, capsys, batch):
    """Bug: --img-size 32 (allowed) leaves a 1 x 1 map before the last batch norm; a batch
    of one image (--batch-size 1, or 8 images in batches of 7: the epoch's last) ended in
    PyTorch's ValueError traceback, mid-epoch."""
    err = run(["--train-dir", str(tree / "train"), "--img-size", "32", "--batch-size", batch, "--width", "0.0625",
               "--workers", "0", "--epochs", "1"], tmp_path, capsys)
    assert "--img-size 32 leaves batch norm a 1 x 1 map" in err
    assert not (tmp_path / "runs").exists()


def test_batch_that_processes_cannot_share_evenly_is_refused(tmp_path):
    """Bug: --batch-size 7 over 2 processes trained steps of 6 images (3 each), silently;
    --batch-size 8 --accum-steps 4 over 4 processes stepped every 16 images."""
    parser = classification.build_parser()
    for argv, world in ((["--batch-size", "7"], 2), (["--batch-size", "8", "--accum-steps", "4"], 4)):
        args = parser.parse_args([*argv, "--project", str(tmp_path / "runs")])
        with pytest.raises(UserError, match="does not split evenly over"):
            engine.start_run(args, Dist(world_size=world), "darknet")
    assert not (tmp_path / "runs").exists()
