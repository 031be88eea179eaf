"""Outputs named after their inputs never overwrite each other, and detect.py and
detect_txt.py decode and score an image the same way (#14 classes 6 and 8)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import detect
import detect_txt
import utils
import voc_convert
from box_files import refuse_name_clashes
from model import build_model
from synthetic import write_vocdevkit_tree
from utils import UserError

NAMES = ["cat", "dog", "person"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny detector (S=2, 128 px input) whose boxes depend on the pixels: random weights,
    with a head bias that makes a few boxes score well above any threshold."""
    torch.manual_seed(0)
    model = build_model("yolov1", S=2, width=1 / 16, hidden=16, C=3).eval()
    with torch.no_grad():
        last = model.head[-1]
        last.weight.mul_(20.0)
        bias = last.bias.zero_().view(2, 2, 3 + 5 * 2)
        bias[:, :, 1] = 1.0
        bias[:, :, 3:8] = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    utils.save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": model.config,
                           "class_names": NAMES}, path)
    return path


def noise(path, width=60, height=40, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_refuse_name_clashes_names_both_files():
    refuse_name_clashes([("a.txt", "x/a.jpg"), ("b.txt", "x/b.jpg")])
    with pytest.raises(UserError, match=r"^x/a.jpg and x/a.png would both write a.txt .*nothing was written$"):
        refuse_name_clashes([("a.txt", "x/a.jpg"), ("a.txt", "x/a.png")])
    with pytest.raises(UserError, match=r"^x/A.jpg and y/a.jpg would both write a.txt"):
        refuse_name_clashes([("A.txt", "x/A.jpg"), ("a.txt", "y/a.jpg")])  # case-insensitive file systems
    with pytest.raises(UserError, match=r"^x/a.jpg is listed twice"):
        refuse_name_clashes([("a.txt", "x/a.jpg"), ("a.txt", "x/a.jpg")])


def test_detect_txt_refuses_two_images_with_one_stem_before_writing(checkpoint, tmp_path):
    """a.jpg and a.png in one folder gave one a.txt: one image's boxes were lost."""
    (tmp_path / "photos").mkdir()
    noise(tmp_path / "photos" / "a.jpg"), noise(tmp_path / "photos" / "a.png", seed=1)
    with pytest.raises(UserError, match="a.jpg and .*a.png would both write a.txt"):
        detect_txt.main([str(checkpoint), "--data", str(tmp_path / "photos"), "--device", "cpu",
                         "--project", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("files, clash", [
    (["a.jpg", "a.png"], "labels/a.txt"),
    (["clip.mp4", "clip_000003.jpg"], "labels/clip_000003.txt"),
    (["a.mp4", "a.mov"], "labels/a_%06d.txt"),
])
def test_detect_refuses_outputs_that_would_overwrite_each_other(checkpoint, tmp_path, files, clash):
    (tmp_path / "in").mkdir()
    for name in files:
        (tmp_path / "in" / name).write_bytes(b"not read: refused first")
    with pytest.raises(UserError, match=f"would both write {clash}"):
        detect.main([str(checkpoint), str(tmp_path / "in"), "--save-txt", "--project", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_voc_convert_refuses_a_previous_conversion_unless_overwrite(tmp_path):
    """Rerunning into the same folder overwrote edited labels and left a stale
    labels_difficult file, which counted an object twice."""
    devkit = write_vocdevkit_tree(tmp_path, {"2007/test": 3}, size=48, seed=0, difficult_rate=0.5)
    out = tmp_path / "out"
    args = ["--devkit", str(devkit), "--sets", "2007/test", "--out", str(out)]
    voc_convert.main(args)
    (out / "labels_difficult" / "stale.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (out / "labels" / "000001.txt").write_text("edited\n")
    (out / "notes.md").write_text("mine\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=f"^{out}: output folder is not empty .*--overwrite"):
        voc_convert.main(args)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    voc_convert.main(args + ["--overwrite"])
    assert not (out / "labels_difficult" / "stale.txt").exists()
    assert (out / "labels" / "000001.txt").read_text() != "edited\n"
    assert (out / "notes.md").read_text() == "mine\n"  # not the conversion's: left alone


def read_boxes(path):
    rows = [line.split() for line in path.read_text().splitlines()]
    return [r[0] for r in rows], np.array([[float(v) for v in r[1:]] for r in rows]).reshape(-1, 5)


def test_detect_and_detect_txt_give_the_same_boxes_for_the_same_image(checkpoint, tmp_path):
    """detect.py decoded JPEGs at full size, detect_txt.py (and training, test.py) with a
    reduced-size draft: one checkpoint, two sets of boxes (mAP 0.93 against 1.00). A
    600 x 520 JPEG is where a 128-pixel draft would decode at a quarter of the size."""
    (tmp_path / "photos").mkdir()
    noise(tmp_path / "photos" / "a.jpg", 600, 520)
    common = ["--device", "cpu", "--conf-threshold", "0.01", "--batch-size", "1"]
    detect.main([str(checkpoint), str(tmp_path / "photos" / "a.jpg"), "--save-txt", "--max-det", "1000",
                 "--project", str(tmp_path / "detect"), *common])
    detect_txt.main([str(checkpoint), "--data", str(tmp_path / "photos"), "--project",
                     str(tmp_path / "detect_txt"), *common])
    names, boxes = read_boxes(tmp_path / "detect" / "exp" / "labels" / "a.txt")
    names_txt, boxes_txt = read_boxes(tmp_path / "detect_txt" / "exp" / "detections" / "a.txt")
    assert len(names) > 0 and names == names_txt
    np.testing.assert_allclose(boxes, boxes_txt, atol=0.011)
