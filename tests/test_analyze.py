"""analyze.py: the paper's error analysis (Section 4.2, Figure 4) on cases worked out by hand.

Every case is written as files and read back by evaluate.py's readers, as the command does.
IoU uses the VOC "+1" pixel rule: the object box [0, 0, 9, 9] covers 10 x 10 = 100 pixels,
so a detection [0, 0, 9, 4] (50 pixels, inside it) has IoU 50/100 = .5 exactly and
[0, 0, 9, 0] (10 pixels) IoU 10/100 = .1 exactly: the boundaries of the categories.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import analyze
from evaluate import read_det_dir, read_gt_dir
from utils import VOC_CLASSES

ROOT = Path(__file__).resolve().parents[1]
OBJ = (0, 0, 9, 9)  # the object box of most cases: 100 pixels
IOU_HALF, IOU_TENTH = (0, 0, 9, 4), (0, 0, 9, 0)          # IoU .5 and .1 with OBJ, exactly
IOU_049, IOU_009 = (0, 0, 6, 6), (0, 0, 8, 0)             # 49/100 and 9/100


def shifted(box, dx):
    return (box[0] + dx, box[1], box[2] + dx, box[3])


def write_case(root: Path, gt: dict, det: dict) -> tuple[Path, Path]:
    """``gt``: image -> [(class, box[, 'difficult'])]; ``det``: image -> [(class, score, box)]."""
    gt_dir, det_dir = root / "gt", root / "det"
    gt_dir.mkdir(parents=True)
    det_dir.mkdir(parents=True)
    for image, objects in gt.items():
        (gt_dir / f"{image}.txt").write_text("".join(
            f"{o[0]} {' '.join(map(str, o[1]))}{' difficult' if len(o) > 2 else ''}\n" for o in objects))
    for image, boxes in det.items():
        (det_dir / f"{image}.txt").write_text("".join(
            f"{c} {s} {' '.join(map(str, b))}\n" for c, s, b in boxes))
    return gt_dir, det_dir


def run_case(tmp_path, gt, det, groups=analyze.VOC_SIMILAR):
    gt_dir, det_dir = write_case(tmp_path, gt, det)
    return analyze.analyze(read_gt_dir(gt_dir), read_det_dir(det_dir), groups)


def counts(row):
    return [row[c] for c in analyze.CATEGORIES]


def test_one_detection_of_each_category_at_the_boundary_ious(tmp_path):
    """Five dogs, one detection each, ranked by score, each at a category's boundary:
    IoU .5 is Correct, IoU .1 with its own class is Localization, IoU .5 with a cat
    (similar to a dog in Hoiem's groups) is Similar, IoU .1 with a tvmonitor (in no
    group) is Other, IoU .09 with everything is Background. A sixth detection, a perfect
    one, ranks 6th: outside the top N = 5, it is not counted."""
    gt = {"a": [("dog", OBJ)], "b": [("dog", OBJ)],
          "c": [("dog", OBJ), ("cat", shifted(OBJ, 20))],
          "d": [("dog", OBJ), ("tvmonitor", shifted(OBJ, 20))], "e": [("dog", OBJ)]}
    det = {"a": [("dog", 0.9, IOU_HALF)], "b": [("dog", 0.8, IOU_TENTH)],
           "c": [("dog", 0.7, shifted(IOU_HALF, 20))], "d": [("dog", 0.6, shifted(IOU_TENTH, 20))],
           "e": [("dog", 0.5, IOU_009), ("dog", 0.4, OBJ)]}
    result = run_case(tmp_path, gt, det)
    dog = result["classes"]["dog"]
    assert (dog["objects"], dog["detections"], dog["analysed"]) == (5, 6, 5)
    assert counts(dog) == [1, 1, 1, 1, 1]
    assert dog["confused_with"] == {"cat": 1, "tvmonitor": 1}
    assert counts(result["classes"]["cat"]) == [0] * 5 and result["classes"]["cat"]["objects"] == 1
    overall = result["overall"]
    assert (overall["objects"], overall["analysed"]) == (7, 5) and counts(overall) == [1, 1, 1, 1, 1]
    assert analyze.fractions(overall) == dict.fromkeys(analyze.CATEGORIES, 0.2)


def test_just_below_the_boundaries(tmp_path):
    """IoU .49 with its object is Localization, not Correct; IoU .09 with a cat is
    Background, not Similar; IoU .09 with its own object is Background, not Localization."""
    gt = {"a": [("dog", OBJ)], "b": [("dog", OBJ), ("cat", shifted(OBJ, 20))], "c": [("dog", OBJ)]}
    det = {"a": [("dog", 0.9, IOU_049)], "b": [("dog", 0.8, shifted(IOU_009, 20))],
           "c": [("dog", 0.7, IOU_009)]}
    assert counts(run_case(tmp_path, gt, det)["classes"]["dog"]) == [0, 1, 0, 0, 2]


def test_duplicates_are_localization_errors(tmp_path):
    """Hoiem's 'weak' matching labels a duplicate 0, so analyzeFalsePositives counts it
    as a localization error: the second perfect box on the same dog is Loc, not Correct."""
    gt = {"a": [("dog", OBJ)], "b": [("dog", OBJ)]}
    det = {"a": [("dog", 0.9, OBJ), ("dog", 0.8, OBJ)]}
    dog = run_case(tmp_path, gt, det)["classes"]["dog"]
    assert counts(dog) == [1, 1, 0, 0, 0]


def test_a_detection_falls_back_to_the_best_free_object(tmp_path):
    """Two dogs A = [0,0,9,9] and B = [2,0,11,9]; two detections [0,0,10,9] (IoU 100/110
    with A, 90/120 = .75 with B). The first takes A; the second's best object A is taken,
    so Hoiem's matching gives it B (IoU .75 >= .5): Correct, where evaluate.py (like the
    VOC devkit) would call it a false positive."""
    gt = {"a": [("dog", OBJ), ("dog", (2, 0, 11, 9))]}
    det = {"a": [("dog", 0.9, (0, 0, 10, 9)), ("dog", 0.8, (0, 0, 10, 9))]}
    assert counts(run_case(tmp_path, gt, det)["classes"]["dog"]) == [2, 0, 0, 0, 0]


def test_the_most_overlapped_class_decides_similar_or_other(tmp_path):
    """A dog detection on a cat (IoU .2, similar) and a tvmonitor (IoU .5, other) is Other;
    with the IoUs swapped it is Similar (Hoiem: the object class of the largest overlap)."""
    det_box = (0, 0, 9, 9)
    cat_02, tv_05 = (0, 0, 9, 1), (0, 0, 9, 4)   # 20/100 and 50/100 of det_box
    gt = {"a": [("dog", (50, 50, 59, 59)), ("cat", cat_02), ("tvmonitor", tv_05)],
          "b": [("dog", (50, 50, 59, 59)), ("cat", tv_05), ("tvmonitor", cat_02)]}
    det = {"a": [("dog", 0.9, det_box)], "b": [("dog", 0.8, det_box)]}
    dog = run_case(tmp_path, gt, det)["classes"]["dog"]
    assert counts(dog) == [0, 0, 1, 1, 0] and dog["confused_with"] == {"cat": 1, "tvmonitor": 1}


def test_difficult_objects_count_as_correct_and_not_in_n(tmp_path):
    """Hoiem's rule: N counts the objects that are not difficult (here 1 of 2), and a
    detection that takes a difficult object is Correct (its label 0 is >= 0). The
    detection on the other, normal dog ranks second: outside the top 1."""
    gt = {"a": [("dog", OBJ, "difficult"), ("dog", shifted(OBJ, 50))]}
    det = {"a": [("dog", 0.9, OBJ), ("dog", 0.8, shifted(OBJ, 50))]}
    dog = run_case(tmp_path, gt, det)["classes"]["dog"]
    assert (dog["objects"], dog["analysed"]) == (1, 1) and counts(dog) == [1, 0, 0, 0, 0]


def test_top_n_ranks_by_score_and_breaks_ties_in_file_order(tmp_path):
    """Equal scores keep the order evaluate.py gives them (file name, then line): with
    N = 1 the background box of a.txt ranks before the perfect box of b.txt."""
    gt = {"b": [("dog", OBJ)]}
    det = {"a": [("dog", 0.5, OBJ)], "b": [("dog", 0.5, OBJ)]}
    dog = run_case(tmp_path, gt, det)["classes"]["dog"]
    assert counts(dog) == [0, 0, 0, 0, 1]


def test_fewer_detections_than_objects_and_classes_without_objects(tmp_path):
    """Three cats and one cat detection: the one is analysed. A class with detections but
    no object (bird) has N = 0 and is not in the table (as it is not in the mAP)."""
    gt = {"a": [("cat", OBJ), ("cat", shifted(OBJ, 20)), ("cat", shifted(OBJ, 40))]}
    det = {"a": [("cat", 0.9, OBJ), ("bird", 0.8, shifted(OBJ, 20))]}
    result = run_case(tmp_path, gt, det)
    assert list(result["classes"]) == ["cat"]
    assert (result["classes"]["cat"]["analysed"], counts(result["classes"]["cat"])) == (1, [1, 0, 0, 0, 0])


def test_voc_groups_are_hoiems():
    """setDatasetParameters.m: animals include person, aeroplane is similar to bird, and
    bottle, pottedplant, tvmonitor are similar to nothing."""
    similar = analyze.similar_classes(analyze.VOC_SIMILAR)
    assert similar["person"] == {"bird", "cat", "cow", "dog", "horse", "sheep"}
    assert similar["aeroplane"] == {"bird", "boat", "bus", "car", "train", "bicycle", "motorbike"}
    assert similar["bird"] >= {"aeroplane", "person"} and similar["sofa"] == {"chair", "diningtable"}
    assert not {"bottle", "pottedplant", "tvmonitor"} & set(similar)
    assert analyze.VOC_NAMES == set(VOC_CLASSES)


# --------------------------------------------------------------------------- the command
SHAPES_GT = {"a": [("cross", OBJ), ("rectangle", shifted(OBJ, 20))]}
SHAPES_DET = {"a": [("cross", 0.9, shifted(IOU_HALF, 20))]}   # a cross on the rectangle


def test_non_voc_classes_have_no_similar_group_unless_given(tmp_path, capsys):
    """The demo's classes are not VOC's: the cross on a rectangle is Other and the note
    says Similar is empty; a --similar file grouping them makes it Similar."""
    gt_dir, det_dir = write_case(tmp_path, SHAPES_GT, SHAPES_DET)
    analyze.main(["--gt", str(gt_dir), "--det", str(det_dir)])
    out = capsys.readouterr().out
    assert "Similar is empty" in out
    assert out.splitlines()[2].split() == ["cross", "1", "1", "0", "0", "0", "1", "0"]
    groups = tmp_path / "similar.json"
    groups.write_text('[["cross", "rectangle"]]')
    analyze.main(["--gt", str(gt_dir), "--det", str(det_dir), "--similar", str(groups)])
    assert capsys.readouterr().out.splitlines()[2].split() == ["cross", "1", "1", "0", "0", "1", "0", "0"]


def test_two_detectors_side_by_side(tmp_path, capsys):
    """--det2: one table and one pie each, side by side, with their labels; the JSON holds
    both detectors' counts."""
    gt_dir, det_dir = write_case(tmp_path, SHAPES_GT, SHAPES_DET)
    det2 = tmp_path / "det2"
    det2.mkdir()
    (det2 / "a.txt").write_text("cross 0.9 0 0 9 9\nrectangle 0.8 100 100 110 110\n")
    out = tmp_path / "out"
    analyze.main(["--gt", str(gt_dir), "--det", str(det_dir), "--det2", str(det2),
                  "--labels", "Fast R-CNN", "YOLO", "--out", str(out)])
    text = capsys.readouterr().out
    assert "Fast R-CNN: top N" in text and "YOLO: top N" in text
    data = json.loads((out / "analysis.json").read_text())
    assert [d["label"] for d in data["detectors"]] == ["Fast R-CNN", "YOLO"]
    first, second = (d["overall"] for d in data["detectors"])
    assert counts(first) == [0, 0, 0, 1, 0] and counts(second) == [1, 0, 0, 0, 1]
    assert data["detectors"][1]["overall_fractions"]["correct"] == 0.5
    assert (out / "analysis.txt").read_text().startswith("Fast R-CNN: top N")
    with Image.open(out / "error_pie.png") as pie:
        two_wide = pie.size
    analyze.main(["--gt", str(gt_dir), "--det", str(det_dir), "--out", str(tmp_path / "one")])
    with Image.open(tmp_path / "one" / "error_pie.png") as pie:
        assert two_wide[0] > 1.8 * pie.size[0] and two_wide[1] == pie.size[1]


def bad_case(tmp_path, name):
    gt_dir, det_dir = write_case(tmp_path, SHAPES_GT, SHAPES_DET)
    args = ["--gt", str(gt_dir), "--det", str(det_dir)]
    if name == "missing det":
        return args[:3] + [str(tmp_path / "nope")], "nope: no such directory"
    if name == "bad det line":
        (det_dir / "b.txt").write_text("cross 0.5 1 2 3\n")
        return args, "b.txt:1: expected 6 values"
    if name == "empty gt":
        for f in gt_dir.iterdir():
            f.unlink()
        return args, "no ground-truth boxes"
    if name == "labels":
        return args + ["--labels", "A", "B"], "--labels: 2 names for 1 detector"
    if name == "similar not json":
        (tmp_path / "s.json").write_text("[[cross")
        return args + ["--similar", str(tmp_path / "s.json")], "s.json: not a JSON file"
    if name == "similar shape":
        (tmp_path / "s.json").write_text('{"cross": "rectangle"}')
        return args + ["--similar", str(tmp_path / "s.json")], "must be a JSON list of groups"
    if name == "similar unknown":
        (tmp_path / "s.json").write_text('[["cross", "rectangel"]]')
        return args + ["--similar", str(tmp_path / "s.json")], "'rectangel' is not a class"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "analysis.json").write_text("mine")
    return args + ["--out", str(tmp_path / "out")], "analysis.json: already exists"


@pytest.mark.parametrize("name", ["missing det", "bad det line", "empty gt", "labels", "similar not json",
                                  "similar shape", "similar unknown", "out exists"])
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, capsys):
    """A mistake ends with one 'error:' line naming the file or argument, exit code 2, and
    nothing written over (the existing analysis.json keeps its content)."""
    args, message = bad_case(tmp_path, name)
    assert analyze.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    if name == "out exists":
        assert (tmp_path / "out" / "analysis.json").read_text() == "mine"
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analysis.json"]


def test_command_line_entry_point_without_torch(tmp_path):
    """``python analyze.py`` as a user runs it: one line and exit 2 on a bad folder, no
    traceback; like evaluate.py it starts without importing torch (which takes seconds)."""
    gt_dir = write_case(tmp_path, SHAPES_GT, SHAPES_DET)[0]
    code = ("import sys, runpy; sys.argv = ['analyze.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path('analyze.py', run_name='__main__')\n"
            "finally:\n    print('torch' in sys.modules)")
    bad = subprocess.run([sys.executable, "-c", code, "--gt", str(gt_dir), "--det", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path / 'x'}: no such directory\n"
    assert bad.stdout == "False\n"
