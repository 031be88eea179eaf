"""voc_results.py: the VOC server's comp4_det_test_<class>.txt files, through detect_txt.py,
evaluate.py and hand-written Darknet-style folders, and a fuzzed reader."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import detect_txt
import evaluate
import utils
import voc_results
from model import build_model
from voc_results import UserError, read_results_dir, write_results

NAMES = ["cat", "dog", "person"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A detector that sees the same two boxes in every picture (image-relative x1 y1 x2 y2):
    dog 0.9 (0, 0, .5, .5) and person 0.6 (.65, .55, .85, .95); test_detect.py's trick."""
    model = build_model("yolov1", S=2, width=1 / 16, hidden=16, C=3)
    last = model.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        bias = last.bias.zero_().view(2, 2, 3 + 5 * 2)
        bias[0, 0, 1] = 1.0
        bias[0, 0, 3:8] = torch.tensor([0.9, 0.5, 0.5, 0.5 ** 0.5, 0.5 ** 0.5])
        bias[1, 1, 2] = 1.0
        bias[1, 1, 8:13] = torch.tensor([0.6, 0.5, 0.5, 0.2 ** 0.5, 0.4 ** 0.5])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    utils.save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": model.config,
                           "class_names": NAMES}, path)
    return path


# (image, width, height, [(class id, cx, cy, w, h)]): the csv lists them in reverse order,
# so the results files hold img3 first and the reader must sort them as read_det_dir does.
IMAGES = [("img0", 120, 80, [(1, 0.25, 0.25, 0.5, 0.5)]),     # dog where the dog box is
          ("img1", 100, 100, [(1, 0.75, 0.75, 0.5, 0.5)]),    # dog elsewhere
          ("img2", 90, 120, [(2, 0.75, 0.75, 0.2, 0.4)]),     # person where the person box is
          ("img3", 100, 60, [(0, 0.25, 0.25, 0.3, 0.3)])]     # a cat


def write_tree(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for name, width, height, objects in IMAGES:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
        (root / "labels" / f"{name}.txt").write_text("".join(f"{c} {x} {y} {w} {h}\n" for c, x, y, w, h in objects))
    (root / "data.csv").write_text("".join(f"{n}.png,{n}.txt\n" for n, *_ in reversed(IMAGES)))
    return root / "data.csv"


def evaluate_json(gt, det, out: Path) -> dict:
    assert evaluate.main(["--gt", str(gt), "--det", str(det), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_server_format_round_trips_through_detect_txt_and_evaluate(checkpoint, tmp_path, capsys):
    """detect_txt.py --format voc writes a results file per class (cat's empty) in 1-based
    pixels, and evaluate.py scores them with exactly the mAP of the per-image files.

    By hand: every dog detection scores 0.9; in file-name order img0..img3 they are TP,
    FP, FP, FP with 2 dogs: AP 1/2. Person: FP, FP, TP, FP with 1 person: AP 1/3. Cat: no
    detection, AP 0. mAP = (1/2 + 1/3 + 0) / 3. Reading the results files in their own
    (csv, reversed) order would break the ties the other way (dog AP 1/8), which is the
    bug the reader's sort guards against."""
    data = write_tree(tmp_path / "data")
    detect_txt.main([str(checkpoint), "--data", str(data), "--device", "cpu", "--format", "voc",
                     "--project", str(tmp_path / "runs"), "--name", "exp"])
    out = tmp_path / "runs" / "exp"
    assert "VOC results files in" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "results").iterdir()) == [
        f"comp4_det_test_{c}.txt" for c in NAMES]
    assert (out / "results" / "comp4_det_test_cat.txt").read_text() == ""
    dog_lines = (out / "results" / "comp4_det_test_dog.txt").read_text().splitlines()
    assert [line.split()[0] for line in dog_lines] == ["img3", "img2", "img1", "img0"]
    assert dog_lines[3] == "img0 0.900000 1.00 1.00 60.00 40.00"
    assert (out / "detections" / "img0.txt").read_text().splitlines()[0] == "dog 0.900000 0.00 0.00 60.00 40.00"
    per_image = evaluate_json(out / "groundtruths", out / "detections", tmp_path / "a.json")
    server = evaluate_json(out / "groundtruths", out / "results", tmp_path / "b.json")
    assert server == per_image
    assert server["AP"] == {"cat": 0.0, "dog": 0.5, "person": pytest.approx(1 / 3)}
    assert server["mAP"] == pytest.approx((1 / 2 + 1 / 3) / 3)


def test_detect_txt_refuses_names_the_format_cannot_hold(checkpoint, tmp_path, capsys):
    """A class name with a space cannot be a results file name: one line, exit 2, before
    any prediction or output folder."""
    state = utils.load_checkpoint(checkpoint)
    state["class_names"] = ["cat", "hot dog", "person"]
    spaced = tmp_path / "spaced.pt"
    utils.save_checkpoint(state, spaced)
    data = write_tree(tmp_path / "data")
    with pytest.raises(SystemExit) as stop:
        utils.run_cli(detect_txt.main, [str(spaced), "--data", str(data), "--device", "cpu", "--format", "voc",
                                        "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "'hot dog'" in err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- Darknet-style folders
def hand_written(root: Path, dog_name="comp4_det_test_dog.txt", cat_name="comp4_det_test_cat.txt"):
    """Ground truth one file per image (this project's pixels) and a Darknet-style results folder."""
    (root / "gt").mkdir(parents=True)
    (root / "gt" / "000001.txt").write_text("dog 0 0 9 9\ncat 20 20 29 29\n")
    (root / "gt" / "000002.txt").write_text("dog 0 0 9 9\n")
    results = root / "results"
    results.mkdir()
    (results / dog_name).write_text("000001 0.900000 1.000000 1.000000 10.000000 10.000000\n"
                                    "000002 0.800000 1.000000 1.000000 10.000000 5.000000\n"
                                    "000002 0.700000 50.000000 50.000000 60.000000 60.000000\n")
    (results / cat_name).write_text("000002 0.950000 1 1 10 10\n000001 0.600000 21 21 30 30\n")
    return root / "gt", results


def test_a_darknet_style_results_folder_scores_as_worked_out_by_hand(tmp_path):
    """Left and top are 1-based: "1 1 10 5" is the extent [0, 0, 10, 5], IoU (VOC +1
    pixels) with the dog [0, 0, 9, 9]: 10*6 / (100 + 66 - 60) = .566, a true positive;
    read without the shift ([1, 1, 10, 5]: 45 / 105 = .43) it would be a false positive.
    Dog: TP (.826), TP (.566), FP for 2 dogs: AP 1. Cat: FP (no cat in 000002) then TP:
    AP 1/2. mAP 3/4."""
    gt, results = hand_written(tmp_path)
    table = evaluate.read_det_dir(results)
    assert table["image"].tolist() == ["000001", "000001", "000002", "000002", "000002"]
    assert table["cls"].tolist() == ["cat", "dog", "cat", "dog", "dog"]
    assert table["boxes"][3].tolist() == [0.0, 0.0, 10.0, 5.0]
    result = evaluate_json(gt, results, tmp_path / "r.json")
    assert result["AP"] == {"cat": 0.5, "dog": 1.0} and result["mAP"] == 0.75


def test_analyze_reads_results_folders_as_per_image_files(tmp_path):
    """analyze.py reads through evaluate.py's reader: the hand-written results folder and
    the same detections written one file per image (this project's pixels) analyse alike."""
    import analyze

    gt, results = hand_written(tmp_path)
    per_image = tmp_path / "per_image"
    per_image.mkdir()
    (per_image / "000001.txt").write_text("dog 0.9 0 0 10 10\ncat 0.6 20 20 30 30\n")
    (per_image / "000002.txt").write_text("dog 0.8 0 0 10 5\ndog 0.7 49 49 60 60\ncat 0.95 0 0 10 10\n")
    gts = evaluate.read_gt_dir(gt)
    server = analyze.analyze(gts, evaluate.read_det_dir(results))
    assert server == analyze.analyze(gts, evaluate.read_det_dir(per_image))
    assert [server["classes"]["dog"][c] for c in analyze.CATEGORIES] == [2, 0, 0, 0, 0]
    assert [server["classes"]["cat"][c] for c in analyze.CATEGORIES] == [0, 0, 1, 0, 0]  # on a dog


def test_salted_names_of_py_faster_rcnn_are_read(tmp_path):
    gt, results = hand_written(tmp_path, "comp4_8f2c_det_test_dog.txt", "comp4_8f2c_det_test_cat.txt")
    assert voc_results.is_results_dir(results) and not voc_results.is_results_dir(gt)
    assert evaluate_json(gt, results, tmp_path / "r.json")["mAP"] == 0.75


@pytest.mark.parametrize("case, message", [
    ("mixed", "holds VOC results files (comp4_det_test_cat.txt) and other .txt files (000001.txt)"),
    ("two sets", "results of several runs or image sets (comp4_det_test, comp4_det_val)"),
    ("five values", "comp4_det_test_dog.txt:2: expected 6 values"),
    ("not a number", "comp4_det_test_dog.txt:1: confidence is not a number: 'high'"),
    ("nan", "comp4_det_test_dog.txt:1: right must be a finite number, got nan"),
    ("inverted", "comp4_det_test_dog.txt:1: box left 10 top 1 right 5 bottom 10 is inverted"),
    ("latin-1", "comp4_det_test_dog.txt:3: not UTF-8 text"),
])
def test_bad_results_folders_are_one_line_errors(case, message, tmp_path, capsys):
    """evaluate.py names the file (and line) and exits 2; nothing is half-read."""
    gt, results = hand_written(tmp_path)
    dog = results / "comp4_det_test_dog.txt"
    if case == "mixed":
        (results / "000001.txt").write_text("dog 0.5 0 0 9 9\n")
    elif case == "two sets":
        (results / "comp4_det_val_bird.txt").write_text("")
    elif case == "five values":
        dog.write_text("000001 0.9 1 1 10 10\n000002 0.8 1 1 10\n")
    elif case == "not a number":
        dog.write_text("000001 high 1 1 10 10\n")
    elif case == "nan":
        dog.write_text("000001 0.9 1 1 nan 10\n")
    elif case == "inverted":
        dog.write_text("000001 0.9 10 1 5 10\n")
    else:
        dog.write_bytes(b"000001 0.9 1 1 10 10\n\n000002 0.8 caf\xe9 1 10 10\n")
    assert evaluate.main(["--gt", str(gt), "--det", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_two_runs_in_one_folder_are_refused(tmp_path):
    """comp4 and a salted comp4 are two runs (each may have its file of a class): mixing
    them would count every detection twice."""
    gt, results = hand_written(tmp_path)
    (results / "comp4_x_det_test_dog.txt").write_text("")
    with pytest.raises(UserError, match="several runs"):
        read_results_dir(results)


# --------------------------------------------------------------------------- fuzzing
TOKENS = st.sampled_from(["000001", "a", "0", "1", "-1", "0.5", "10", "1e400", "nan", "inf", "-inf",
                          "1_0", "0x10", "\u0661\u0662", "\x00", "é", "", " ", "\t", "\r", "\u2028", "\x85"])
FUZZ_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read_one_file(content: bytes):
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "comp4_det_test_dog.txt").write_bytes(content)
        return read_results_dir(folder)


def check_no_traceback(content: bytes) -> None:
    try:
        table = read_one_file(content)
    except UserError as err:
        assert "\n" not in str(err)
        return
    assert np.isfinite(table["score"]).all() and np.isfinite(table["boxes"]).all()
    assert (table["boxes"][:, 2] >= table["boxes"][:, 0]).all() and (table["boxes"][:, :2] >= 0).all()


@FUZZ_SETTINGS
@given(st.binary(max_size=300))
def test_fuzz_any_bytes_read_or_one_line_error(content):
    """Guards against a traceback (IndexError, UnicodeDecodeError, OverflowError ...) on any
    file: the reader returns finite, well-formed boxes or raises its one-line error."""
    check_no_traceback(content)


@FUZZ_SETTINGS
@given(st.lists(st.lists(TOKENS, max_size=8).map(" ".join), max_size=6).map("\n".join))
def test_fuzz_near_valid_lines(text):
    """Lines made of plausible and hostile tokens (NaN, overflow, Unicode digits and
    spaces) reach every check of the line parser."""
    check_no_traceback(text.encode("utf-8"))


BOX = st.tuples(*[st.integers(0, 100000).map(lambda v: v / 100)] * 2, *[st.integers(0, 50000).map(lambda v: v / 100)] * 2)
DETECTION = st.tuples(st.integers(0, 2), st.integers(0, 10 ** 6).map(lambda v: v / 10 ** 6), BOX)
IMAGE_ID = st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 3 files each
@given(st.lists(st.tuples(IMAGE_ID, st.lists(DETECTION, max_size=4)), max_size=6))
@example([("0", [(0, 0.0, (0.0, 0.01, 0.0, 0.0))]), ("7", [(1, 0.5, (3.35, 3.35, 0.0, 1.0))])])
def test_fuzz_valid_detections_round_trip(images):
    """write_results then read_results_dir gives back every detection, boxes in this
    project's pixels exactly as a two-decimal per-image file holds them, each class's rows
    in read_det_dir's order (by <image id>.txt, then as written). Guards against float
    arithmetic on the 1-based numbers (1.01 - 1 > 0.01 made a flat box 'inverted')."""
    detections = [(image_id, np.array([[c, s, x, y, x + w, y + h] for c, s, (x, y, w, h) in dets]))
                  for image_id, dets in images]
    with tempfile.TemporaryDirectory() as folder:
        write_results(folder, detections, NAMES)
        table = read_results_dir(folder)
    for k, name in enumerate(NAMES):
        written = [(image_id, row) for image_id, dets in detections for row in dets.reshape(-1, 6) if row[0] == k]
        written.sort(key=lambda item: f"{item[0]}.txt")  # stable: ties keep the written order
        mine = table["cls"] == name
        assert table["image"][mine].tolist() == [image_id for image_id, _ in written]
        expected = np.array([[float(f"{v:.2f}") for v in row[2:]] for _, row in written]).reshape(-1, 4)
        assert np.array_equal(table["score"][mine], [row[1] for _, row in written])
        assert np.array_equal(table["boxes"][mine], expected)  # exactly what a two-decimal file holds


def test_writer_refuses_what_the_format_cannot_hold(tmp_path):
    assert voc_results.unwritable(["cat", "dog"], ["000001"]) is None
    for names, ids in ((["hot dog"], []), (["a/b"], []), ([".hidden"], []), ([""], []), (["cat"], ["my photo"])):
        assert voc_results.unwritable(names, ids)
        with pytest.raises(UserError):
            write_results(tmp_path / "r", [(i, np.zeros((0, 6))) for i in ids], names)
    assert not (tmp_path / "r").exists()
    assert math.isclose(float(voc_results.devkit_number(12.35, 1)) - 1, 12.35)
