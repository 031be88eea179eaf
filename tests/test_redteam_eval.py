"""The third red-team pass on the evaluation path (evaluate.py, box_files.py, voc_results.py,
analyze.py, utils.decode_predictions): each test names the bug it guards against, found by
feeding the commands unusual but legal files, bad files and bad arguments. Numbers are
worked out by hand in the docstrings or computed by an independent naive reading."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analyze
import box_files
import evaluate as ev
import utils
import voc_results
from errors import UserError

GT = {"a.txt": "dog 10 10 50 50\n", "b.txt": "dog 10 10 50 50\n"}
DET = {"a.txt": "dog 0.9 10 10 50 50\n", "b.txt": "dog 0.8 10 10 50 50\n"}


def folder(path, files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def run(main, capsys, *argv):
    """(exit status, stdout, stderr) of a command's main()."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- huge coordinates
@pytest.mark.parametrize("where, files", [
    ("gt", {"a.txt": "dog 0 0 1e200 1e200\n"}),
    ("det", {"a.txt": "dog 0.9 0 0 1e200 1e200\n"}),
    ("det", {"a.txt": "dog 0.9 -1.7e308 0 5 5\n"}),
])
def test_coordinates_beyond_any_image_are_refused_with_file_and_line(tmp_path, capsys, where, files):
    """Bug: a box 0 0 1e200 1e200 in both folders ended in an IndexError traceback (its area
    overflowed to inf, IoU inf/inf = NaN never equalled the best IoU), and analyze.py called
    the same detection Background (true IoU 1). Coordinates past 2**53 pixels are refused."""
    gt = folder(tmp_path / "gt", files if where == "gt" else {"a.txt": "dog 0 0 5 5\n"})
    det = folder(tmp_path / "det", files if where == "det" else {"a.txt": "dog 0.9 0 0 1e200 1e200\n"})
    for main in (ev.main, analyze.main):
        status, _, err = run(main, capsys, "--gt", gt, "--det", det)
        assert status == 2
        line = one_error_line(err)
        assert f"{tmp_path / where / 'a.txt'}:1:" in line and "pixel" in line


def test_largest_accepted_coordinates_give_finite_ious():
    """The limit is low enough that the VOC '+1' areas of boxes at it stay finite (so IoU is
    a number), and the in-memory API refuses what lies beyond it, naming the row."""
    big = box_files.MAX_COORDINATE
    box = np.array([[-big, -big, big, big]])
    assert ev.box_iou(box, box).tolist() == [1.0]
    result = ev.evaluate_detections([("a", "dog", -big, -big, big, big)],
                                    [("a", "dog", 0.5, -big, -big, big, big)])
    assert result["AP"] == {"dog": 1.0}
    with pytest.raises(ValueError, match="row 0"):
        ev.evaluate_detections([("a", "dog", 0, 0, 2 * big, 5)], [])


def test_results_files_refuse_huge_coordinates(tmp_path):
    """Bug: the VOC server's files took 1e300 as a coordinate (a RuntimeWarning, then IoU 0)."""
    path = folder(tmp_path, {"comp4_det_test_dog.txt": "000001 0.9 1 1 1e300 5\n"})
    with pytest.raises(UserError, match=r"comp4_det_test_dog.txt:1: right .* pixel"):
        voc_results.read_results_dir(path)


# --------------------------------------------------------------------------- line endings
def test_old_mac_line_endings_are_lines(tmp_path, capsys):
    """Bug: files with lone CR line ends (classic Mac OS; Padilla's toolkit reads them, as
    Python's text mode does) were refused as one line of 10 values. Hand-worked: dog found
    at rank 1 of 2 with 2 dogs -> AP 0.5; cat found -> AP 1; mAP 0.75."""
    gt = folder(tmp_path / "gt", {"a.txt": "dog 10 10 50 50\rcat 60 60 90 90\rdog 100 10 150 50\r"})
    det = folder(tmp_path / "det", {"a.txt": "dog 0.9 10 10 50 50\rcat 0.7 60 60 90 90\r"
                                             "dog 0.5 300 300 310 310\r"})
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--json", tmp_path / "r.json")
    assert status == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["AP"] == {"cat": 1.0, "dog": 0.5} and result["mAP"] == 0.75
    assert result["npos"] == {"cat": 1, "dog": 2}


def test_error_line_numbers_count_every_kind_of_line_end(tmp_path):
    """Line numbers in errors must be those an editor shows, whatever the line ends."""
    folder(tmp_path, {"a.txt": b"dog 1 1 5 5\r\ncat 1 1 5 5\rdog 1 1 x 5\n"})
    with pytest.raises(UserError, match=r"a.txt:3: right is not a number"):
        box_files.read_gt_dir(tmp_path)
    folder(tmp_path / "r", {"comp4_det_test_dog.txt": b"000001 0.9 1 1 5 5\r000001 0.9 1 1 x 5\n"})
    with pytest.raises(UserError, match=r"comp4_det_test_dog.txt:2: right is not a number"):
        voc_results.read_results_dir(tmp_path / "r")


# --------------------------------------------------------------------------- folders
def test_a_broken_link_is_an_error_not_a_missing_image(tmp_path, capsys):
    """Bug: a detection (or ground-truth) file that is a link to a missing file was skipped
    silently: the image lost its detections and mAP fell from 1.0 to 0.5 with exit 0."""
    gt = folder(tmp_path / "gt", GT)
    det = folder(tmp_path / "det", {"a.txt": DET["a.txt"]})
    os.symlink(tmp_path / "nowhere.txt", det / "b.txt")
    status, _, err = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 2 and f"{det / 'b.txt'}: cannot read" in one_error_line(err)
    os.symlink(tmp_path / "nowhere.txt", folder(tmp_path / "gt2", {"a.txt": GT["a.txt"]}) / "b.txt")
    status, _, err = run(ev.main, capsys, "--gt", tmp_path / "gt2", "--det", folder(tmp_path / "d2", DET))
    assert status == 2 and f"{tmp_path / 'gt2' / 'b.txt'}: cannot read" in one_error_line(err)


def test_a_link_to_a_box_file_is_read(tmp_path, capsys):
    """Links to files are box files like any other (only broken ones are refused)."""
    gt = folder(tmp_path / "gt", GT)
    det = folder(tmp_path / "det", {"a.txt": DET["a.txt"]})
    os.symlink(folder(tmp_path / "elsewhere", {"x": DET["b.txt"]}) / "x", det / "b.txt")
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 0 and "mAP = 1.0000" in out, err


@pytest.mark.parametrize("main", [ev.main, analyze.main])
def test_a_detection_folder_without_box_files_is_refused(tmp_path, capsys, main):
    """Bug: --det pointing at detect_txt.py's run folder (runs/detect_txt/exp, which holds
    detections/ and groundtruths/) or at an empty folder printed mAP 0.0000 with exit 0."""
    run_dir = tmp_path / "exp"
    folder(run_dir / "groundtruths", GT)
    folder(run_dir / "detections", DET)
    status, _, err = run(main, capsys, "--gt", run_dir / "groundtruths", "--det", run_dir)
    assert status == 2
    line = one_error_line(err)
    assert f"{run_dir}: no detection files" in line and "detections" in line
    (tmp_path / "empty").mkdir()
    status, _, err = run(main, capsys, "--gt", run_dir / "groundtruths", "--det", tmp_path / "empty")
    assert status == 2 and f"{tmp_path / 'empty'}: no detection files" in one_error_line(err)


def test_empty_detection_files_still_mean_no_detections(tmp_path, capsys):
    """What a detector that found nothing writes (an empty file per image) still scores 0."""
    gt = folder(tmp_path / "gt", GT)
    det = folder(tmp_path / "det", {"a.txt": "", "b.txt": "\n"})
    status, out, _ = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 0 and "mAP = 0.0000" in out


def test_a_file_given_as_a_folder_is_named_as_such(tmp_path, capsys):
    """Bug: --det FILE said 'no such directory' about a file that exists."""
    gt = folder(tmp_path / "gt", GT)
    (tmp_path / "det.txt").write_text(DET["a.txt"])
    status, _, err = run(ev.main, capsys, "--gt", gt, "--det", tmp_path / "det.txt")
    assert status == 2 and f"{tmp_path / 'det.txt'}: not a folder" in one_error_line(err)


# --------------------------------------------------------------------------- analyze.py's inputs
def test_analyze_refuses_what_evaluate_refuses(tmp_path, capsys):
    """Bug: analyze.py read the same folders as evaluate.py without its checks: relative
    0-1 coordinates (every box 'Correct' under the "+1" pixel IoU) and folders with no file
    name in common (every detection 'Background') gave a table with exit 0."""
    gt = folder(tmp_path / "gt", {"a.txt": "dog 0 0 .5 .5\n"})
    det = folder(tmp_path / "det", {"a.txt": "dog 0.9 0.5 0.5 1 1\n"})
    status, _, err = run(analyze.main, capsys, "--gt", gt, "--det", det)
    assert status == 2 and "between 0 and 1" in one_error_line(err)
    gt = folder(tmp_path / "gt2", GT)
    det = folder(tmp_path / "det2", {"c.txt": DET["a.txt"]})
    for argv in (("--det", det), ("--det", folder(tmp_path / "ok", DET), "--det2", det)):
        status, _, err = run(analyze.main, capsys, "--gt", gt, *argv)
        assert status == 2 and "no file name in common" in one_error_line(err)


# --------------------------------------------------------------------------- evaluate.py's outputs
@pytest.mark.parametrize("target", ["folder", "missing_parent"])
def test_json_target_is_checked_before_the_evaluation(tmp_path, capsys, target):
    """Bug: --json naming a folder (or a path whose folder does not exist) was refused only
    after the whole evaluation and its report: exit 2 with the table already printed."""
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", DET)
    path = tmp_path if target == "folder" else tmp_path / "nowhere" / "r.json"
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--json", path)
    assert status == 2 and out == ""
    assert f"--json {path}" in one_error_line(err)


def test_plots_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    """Bug: plots.require's UserError (matplotlib missing) escaped evaluate.main as a
    traceback: only OSError was caught around --plots."""
    import plots

    def missing(*_):
        raise UserError("plotting needs the 'matplotlib' package: pip install matplotlib")
    monkeypatch.setattr(plots, "require", missing)
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", DET)
    status, _, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--plots", tmp_path / "p")
    assert status == 2 and "matplotlib" in one_error_line(err)


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_network_outputs_are_refused_not_turned_into_boxes(value):
    """Bug: outputs holding infinity (a half-precision overflow) decoded into boxes with NaN
    corners, and NaN outputs into no boxes at all (mAP 0, exit 0)."""
    pred = torch.zeros(2, 7 * 7 * 30)
    pred[1, 5] = value
    with pytest.raises(UserError, match="image 1 .*not finite"):
        utils.decode_predictions(pred)


# --------------------------------------------------------------------------- fuzzing the readers
LINE = st.lists(st.sampled_from(["dog", "cat", "0.5", "1e3", "-2", "1e200", "nan", "x", "9e15",
                                 "1", "difficult", "\t", "\u00e9"]), max_size=8).map(" ".join)
ENDS = st.sampled_from(["\n", "\r\n", "\r"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(LINE, ENDS), max_size=6), is_gt=st.booleans())
def test_fuzzed_lines_and_line_ends_read_as_an_independent_reading_or_fail_in_one_line(
        tmp_path, lines, is_gt):
    """Any mix of line ends and of huge, odd or bad values: the reader gives exactly what a
    naive reading gives (splitting on the three line ends), or one UserError naming the
    file and the line; never a traceback, never a box the metric cannot score."""
    text = "".join(line + end for line, end in lines)
    (tmp_path / "a.txt").write_text(text, newline="")
    expected, bad_line = [], None
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        fields = line.split()
        if not fields:
            continue
        values = fields[1:5] if is_gt else fields[1:6]
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = None
        good = (len(fields) in ((5, 6) if is_gt else (6,)) and numbers is not None
                and all(np.isfinite(numbers)) and max(map(abs, numbers[-4:])) <= box_files.MAX_COORDINATE
                and numbers[-2] >= numbers[-4] and numbers[-1] >= numbers[-3]
                and (not is_gt or len(fields) == 5 or fields[5] in ("0", "1", "difficult")))
        if not good:
            bad_line = number
            break
        expected.append((fields[0], *numbers))
    read = box_files.read_gt_dir if is_gt else box_files.read_det_dir
    if bad_line is not None:
        with pytest.raises(UserError, match=rf"a.txt:{bad_line}: "):
            read(tmp_path)
        return
    table = read(tmp_path)
    got = [(c, *b) if is_gt else (c, s, *b) for c, s, b in zip(
        table["cls"].tolist(), table["difficult" if is_gt else "score"].tolist(), table["boxes"].tolist())]
    assert [g[:1] + g[-4:] if is_gt else g for g in got] == expected
    assert np.isfinite(ev.box_iou(table["boxes"], table["boxes"])).all()


@pytest.mark.parametrize("gt_text, det_text", [
    ("dog 0.1 0.1 1.0000001 0.5\n", "dog 0.9 0.1 0.1 1.0000001 0.5\n"),    # rounding past 1
    ("dog 10 10 50 50\n", "dog 0.9 -0.02 0.1 0.4 1.03\n"),                   # unclipped, relative
])
def test_relative_coordinates_just_outside_0_1_are_still_refused(tmp_path, capsys, gt_text, det_text):
    """Bug: the relative-coordinate check wanted every value in [0, 1] exactly: a converted
    label rounded to 1.0000001, or a detector's unclipped box at -0.02, slipped past it and
    the files scored as pixels (mAP 0 or a wrong 1 with exit 0)."""
    gt = folder(tmp_path / "gt", {"a.txt": gt_text})
    det = folder(tmp_path / "det", {"a.txt": det_text})
    status, _, err = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 2 and "between 0 and 1" in one_error_line(err)


def test_test_py_refuses_a_json_folder_before_running_the_network(tmp_path, capsys):
    """Bug: test.py --json DIR ran the whole evaluation, printed it, then failed to write."""
    import test as test_script

    with pytest.raises(UserError, match=f"--json {tmp_path}: is a folder"):
        test_script.main(["no_such_checkpoint.pt", "--json", str(tmp_path)])
