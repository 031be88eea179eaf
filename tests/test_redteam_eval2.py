"""The fourth red-team pass on the evaluation path (evaluate.py, box_files.py, voc_results.py,
plots.py, analyze.py, test.py's options): each test names the bug it guards against. Numbers
are worked out by hand in the docstrings."""
from __future__ import annotations

import json
import re
import unicodedata

import pytest

import analyze
import box_files
import evaluate as ev
import voc_results
from errors import UserError
from test_redteam_eval import DET, GT, folder, one_error_line, run  # the same small folders and checks


# --------------------------------------------------------------------------- VOC results files
def test_upper_case_results_file_extension_is_a_results_file(tmp_path, capsys):
    """Bug: comp4_det_test_dog.TXT was not recognised as the VOC server's results file: the
    folder was read as per-image files (image 'comp4_det_test_dog') and refused with a
    misleading 'no file name in common'. Hand-worked: image a's dog found at 0.9, image b's
    at 0.8 (left/top 11 in the devkit's 1-based pixels are 10 here) -> AP 1."""
    gt = folder(tmp_path / "gt", GT)
    det = folder(tmp_path / "det", {"comp4_det_test_dog.TXT": "a 0.9 11 11 50 50\nb 0.8 11 11 50 50\n"})
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 0 and "mAP = 1.0000" in out, err
    table = voc_results.read_results_dir(det)
    assert table["cls"].tolist() == ["dog", "dog"] and table["boxes"].tolist() == [[10, 10, 50, 50]] * 2


def test_one_class_in_two_results_files_is_refused(tmp_path):
    """Both comp4_det_test_dog.txt and .TXT in one folder would read the class's detections
    twice (every duplicate a false positive): refused, naming both files."""
    det = folder(tmp_path, {"comp4_det_test_dog.TXT": "a 0.9 1 1 5 5\n", "comp4_det_test_dog.txt": "a 0.9 1 1 5 5\n"})
    with pytest.raises(UserError, match="comp4_det_test_dog.TXT and comp4_det_test_dog.txt are the results "
                                        "files of one class"):
        voc_results.read_results_dir(det)


# --------------------------------------------------------------------------- folders
@pytest.mark.parametrize("where", ["gt", "det"])
def test_a_folder_named_like_a_box_file_is_refused_in_either_folder(tmp_path, capsys, where):
    """Bug: a folder named b.txt inside the detection folder was skipped silently (image b
    lost its detections: mAP 0.5 instead of 1, exit 0); inside the ground-truth folder only
    the warning about detections without ground truth hinted at it. Now one error line,
    the same for both folders, naming it."""
    gt = folder(tmp_path / "gt", GT if where == "det" else {"a.txt": GT["a.txt"]})
    det = folder(tmp_path / "det", DET if where == "gt" else {"a.txt": DET["a.txt"]})
    (tmp_path / where / "b.txt").mkdir()
    for main in (ev.main, analyze.main):
        status, out, err = run(main, capsys, "--gt", gt, "--det", det)
        assert status == 2 and out == ""
        assert f"{tmp_path / where / 'b.txt'}: is a folder" in one_error_line(err)


def test_a_folder_not_named_like_a_box_file_is_still_ignored(tmp_path, capsys):
    """Sub-folders with other names (a detect_txt.py run's own layout, plots/) are no box files."""
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", DET)
    (det / "plots").mkdir()
    (gt / "old").mkdir()
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 0 and "mAP = 1.0000" in out, err


# --------------------------------------------------------------------------- Unicode file names
NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


@pytest.mark.parametrize("det_name", [NFD, NFC])
def test_file_names_in_nfc_and_nfd_are_one_image(tmp_path, capsys, det_name):
    """Bug: ground truth café.txt written on Linux (NFC) and detections café.txt from macOS
    (NFD: 'e' + combining accent) matched nothing: 'no file name in common', or with other
    images beside them every café detection a false positive. Names are compared in NFC, as
    macOS's own file system compares them. Hand-worked: both dogs found first -> AP 1."""
    assert NFC != NFD
    gt = folder(tmp_path / "gt", {f"{NFC}.txt": GT["a.txt"], "b.txt": GT["b.txt"]})
    det = folder(tmp_path / "det", {f"{det_name}.txt": DET["a.txt"], "b.txt": DET["b.txt"]})
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 0 and "mAP = 1.0000" in out and "warning" not in err, err
    det_table = box_files.read_det_dir(det)
    assert NFC in det_table["image"].tolist()


def test_results_file_image_ids_are_compared_in_nfc(tmp_path, capsys):
    """The VOC results files' image ids follow the same rule as file names."""
    gt = folder(tmp_path / "gt", {f"{NFC}.txt": GT["a.txt"]})
    det = folder(tmp_path / "det", {"comp4_det_test_dog.txt": f"{NFD} 0.9 11 11 50 50\n"})
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det)
    assert status == 0 and "mAP = 1.0000" in out, err


def test_one_image_named_in_nfc_and_nfd_in_one_folder_is_refused(tmp_path):
    """Two files whose names differ only in normalisation would be one image read twice."""
    det = folder(tmp_path, {f"{NFC}.txt": DET["a.txt"], f"{NFD}.txt": DET["a.txt"]})
    with pytest.raises(UserError, match="are the files of one image; keep one .*Unicode normalisation"):
        box_files.read_det_dir(det)


# --------------------------------------------------------------------------- report tables
LONG = "pedestrian_crossing_signal_red"  # 30 characters


def cells(line):
    """The words of a table line, each with the column where it ends."""
    return [(m.group(), m.end()) for m in re.finditer(r"\S+", line)]


def assert_lined_up(header, rows, expected):
    """Each row holds ``expected``'s words, the class name first (left-aligned, at 0) and
    every other word ending where its header word ends (right-aligned columns)."""
    ends = [end for _, end in cells(header)][1:]
    for row, words in zip(rows, expected, strict=True):
        got = cells(row)
        assert [w for w, _ in got] == words, row
        assert row.startswith(words[0]) and [end for _, end in got[1:]] == ends, (header, row)


def test_report_columns_line_up_with_a_30_character_class_name():
    """Bug: format_report padded class names to 16 characters, so a longer name pushed its
    row's numbers right, under the wrong headers. Hand-worked: LONG has 1 object found by
    its only detection (TP 1, AP 1); dog 2 objects, 1 detection found one (AP 0.5)."""
    assert len(LONG) == 30
    result = ev.evaluate_detections([("a", LONG, 0, 0, 9, 9), ("a", "dog", 20, 20, 29, 29),
                                     ("b", "dog", 20, 20, 29, 29)],
                                    [("a", LONG, 0.9, 0, 0, 9, 9), ("a", "dog", 0.8, 20, 20, 29, 29)])
    header, *rows, total = ev.format_report(result).splitlines()
    assert_lined_up(header, rows, [["dog", "2", "1", "1", "0", "0.5000"], [LONG, "1", "1", "1", "0", "1.0000"]])
    assert total.startswith("mAP = 0.7500")


def test_analyze_table_columns_line_up_with_a_30_character_class_name():
    """The same bug in analyze.py's table (its class column was 16 wide, 'overall %' 28)."""
    gts = {"image": ev.np.array(["a", "a"]), "cls": ev.np.array([LONG, "dog"]),
           "boxes": ev.np.array([[0, 0, 9, 9], [20, 20, 29, 29]], float), "difficult": ev.np.zeros(2, bool)}
    dets = {"image": ev.np.array(["a"]), "cls": ev.np.array([LONG]), "score": ev.np.array([0.9]),
            "boxes": ev.np.array([[0, 0, 9, 9]], float)}
    lines = analyze.format_table(analyze.analyze(gts, dets, []), "YOLO").splitlines()
    header, rows, share = lines[1], lines[2:-1], lines[-1]
    assert_lined_up(header, rows, [["dog", "1", "0", "0", "0", "0", "0", "0"], [LONG, "1", "1", "1", "0", "0", "0", "0"],
                                   ["overall", "2", "1", "1", "0", "0", "0", "0"]])
    assert [end for _, end in cells(share)][2:] == [end for _, end in cells(header)][3:]  # 'overall %' is 2 words


# --------------------------------------------------------------------------- plots
def interpolated_line(result, label):
    """The thick line (the interpolated precision) of ``label``'s panel in pr_curves.png."""
    pytest.importorskip("matplotlib")
    import plots

    fig = plots.pr_figure(result)
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(f"{label} ")]
    (line,) = [line for line in ax.get_lines() if line.get_label().endswith("interpolated")]
    return ax, line


HAND_GT = [("a", "dog", 0, 0, 9, 9), ("b", "dog", 0, 0, 9, 9), ("c", "dog", 0, 0, 9, 9)]
HAND_DET = [("a", "dog", 0.9, 0, 0, 9, 9), ("a", "dog", 0.8, 50, 50, 59, 59),    # TP, FP
            ("b", "dog", 0.7, 0, 0, 9, 9), ("b", "dog", 0.6, 50, 50, 59, 59)]    # TP, FP


def test_11_point_plot_draws_the_11_points_that_were_scored():
    """Bug: --interp 11 --plots drew the every-point envelope under the 11-point AP's title
    (its area, 0.5556, is not the 0.5455 printed above it). Hand-worked: 3 dogs; ranked TP,
    FP, TP, FP -> recall 1/3, 1/3, 2/3, 2/3 at precision 1, 1/2, 2/3, 1/2. Envelope at
    recall >= r: 1 for r = 0 ... 0.3, 2/3 for r = 0.4 ... 0.6, 0 beyond 2/3 (never reached);
    AP = (4 * 1 + 3 * 2/3) / 11 = 6/11."""
    result = ev.evaluate_detections(HAND_GT, HAND_DET, interp="11", return_curves=True)
    assert result["AP"]["dog"] == pytest.approx(6 / 11)
    ax, line = interpolated_line(result, "dog")
    assert line.get_xdata().tolist() == pytest.approx([0, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1])
    assert line.get_ydata().tolist() == pytest.approx([1, 1, 1, 1, 2 / 3, 2 / 3, 2 / 3, 0, 0, 0, 0])
    assert line.get_drawstyle() == "steps-post"
    assert "11-pt AP 0.545" in ax.get_title()


def test_every_point_plot_still_draws_the_envelope_step():
    """The default (every-point) panel keeps the envelope step, whose area is the AP:
    1 over (0, 1/3], 2/3 over (1/3, 2/3] -> 1/3 + 2/9 = 5/9."""
    result = ev.evaluate_detections(HAND_GT, HAND_DET, return_curves=True)
    assert result["AP"]["dog"] == pytest.approx(5 / 9)
    ax, line = interpolated_line(result, "dog")
    x, y = line.get_xdata(), line.get_ydata()
    assert x.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert y.tolist() == pytest.approx([1, 1, 2 / 3, 2 / 3, 1 / 2])
    assert line.get_drawstyle() == "steps-pre" and "AP 0.556" in ax.get_title()


# --------------------------------------------------------------------------- score thresholds
@pytest.mark.parametrize("script", ["test", "detect_txt", "detect", "train"])
def test_a_conf_threshold_that_keeps_nothing_is_refused(script, capsys):
    """Bug: --conf-threshold 1 was accepted (the range was [0, 1]) but boxes are kept when
    score > threshold and a score is at most 1 (a product of two values clamped to [0, 1]),
    so no box was ever kept: test.py printed VOC mAP 0 with exit 0. The range is [0, 1)."""
    import importlib

    parser = importlib.import_module(script).build_parser()
    required = {"test": ["c.pt"], "detect_txt": ["c.pt"], "detect": ["c.pt", "a.jpg"], "train": []}[script]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*required, "--conf-threshold", "1"])
    assert exc.value.code == 2
    assert one_error_line(capsys.readouterr().err) == "error: --conf-threshold must be in [0, 1), got 1"
    assert parser.parse_args([*required, "--conf-threshold", "0.999"]).conf_threshold == 0.999


def test_threshold_1_indeed_keeps_no_box_and_check_inference_args_refuses_it():
    """Why 1 is refused: an output with confidence 1 and class probability 1 scores exactly 1,
    the highest score there is, and 1 > 1 is false: no detection. Just below 1 it is kept."""
    import argparse

    import predict
    import torch
    import utils

    pred = torch.zeros(1, 7 * 7 * 30)
    pred[0, 0] = 1.0                      # cell (0, 0): class 0 probability 1
    pred[0, 20:25] = torch.tensor([1.0, 0.5, 0.5, 0.3, 0.3])  # its first box: confidence 1
    assert len(utils.decode_predictions(pred, conf_threshold=1.0)[0]) == 0
    assert len(utils.decode_predictions(pred, conf_threshold=0.999)[0]) == 1
    args = argparse.Namespace(conf_threshold=1.0, nms_iou=0.5, batch_size=1)
    with pytest.raises(UserError, match=r"--conf-threshold must be in \[0, 1\), got 1.0"):
        predict.check_inference_args(args)


# --------------------------------------------------------------------------- outputs over inputs
def test_json_over_an_input_file_is_refused_even_with_overwrite(tmp_path, capsys):
    """Bug: evaluate.py --json det/a.txt replaced a detection file with the JSON report (the
    user's detections lost). A file under --gt or --det is never written, also through a
    link to it (compared by real path), whatever --overwrite says."""
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", DET)
    (tmp_path / "link.json").symlink_to(gt / "b.txt")
    for target, where in ((det / "a.txt", f"under --det {det}"), (tmp_path / "link.json", f"under --gt {gt}")):
        for extra in ([], ["--overwrite"]):
            status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--json", target, *extra)
            assert status == 2 and out == ""
            line = one_error_line(err)
            assert f"--json {target}: " in line and (("is an input file" in line and where in line)
                                                     or (not extra and "already exists" in line)), line
    assert (det / "a.txt").read_text() == DET["a.txt"] and (gt / "b.txt").read_text() == GT["b.txt"]


def test_a_new_output_file_inside_an_input_folder_is_refused(tmp_path, capsys):
    """Bug: evaluate.py --json det/new.txt (no such file yet) wrote the JSON report into the
    detection folder, where the next evaluation read it as the box file of an image 'new'
    and failed ('expected 6 values'). Nothing is written under --gt or --det."""
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", DET)
    for target, where in ((det / "new.txt", f"under --det {det}"), (gt / "sub.json", f"under --gt {gt}")):
        status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--json", target, "--overwrite")
        assert status == 2 and out == ""
        assert one_error_line(err) == (f"error: --json {target}: lies in an input folder ({where}); "
                                       "write the output elsewhere, nothing was written")
    assert sorted(p.name for p in det.iterdir()) == ["a.txt", "b.txt"] and sorted(p.name for p in gt.iterdir()) == ["a.txt", "b.txt"]


def test_json_over_an_existing_file_needs_overwrite(tmp_path, capsys):
    """Bug: --json FILE silently replaced whatever FILE held (a previous run's results kept
    for comparison). Refused in one line, nothing written, unless --overwrite."""
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", DET)
    kept = tmp_path / "results.json"
    kept.write_text("my earlier results\n")
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--json", kept)
    assert status == 2 and out == "" and kept.read_text() == "my earlier results\n"
    assert one_error_line(err) == (f"error: --json {kept}: already exists; choose another path, "
                                   "or --overwrite to replace it")
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--json", kept, "--overwrite")
    assert status == 0 and json.loads(kept.read_text())["mAP"] == 1.0, err


def test_plots_over_existing_images_need_overwrite_and_never_go_over_inputs(tmp_path, capsys):
    """Bug: --plots DIR replaced DIR's pr_curves.png and ap_per_class.png without a word."""
    pytest.importorskip("matplotlib")
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", {**DET, "pr_curves.png": b"mine"})
    plots_dir = folder(tmp_path / "plots", {"ap_per_class.png": b"mine"})
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--plots", plots_dir)
    assert status == 2 and out == "" and (plots_dir / "ap_per_class.png").read_bytes() == b"mine"
    assert f"--plots {plots_dir / 'ap_per_class.png'}: already exists" in one_error_line(err)
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--plots", det, "--overwrite")
    assert status == 2 and (det / "pr_curves.png").read_bytes() == b"mine"
    assert f"--plots {det / 'pr_curves.png'}: is an input file (under --det {det})" in one_error_line(err)
    status, out, err = run(ev.main, capsys, "--gt", gt, "--det", det, "--plots", plots_dir, "--overwrite")
    assert status == 0 and (plots_dir / "ap_per_class.png").read_bytes()[:4] == b"\x89PNG", err


def test_analyze_out_is_checked_before_the_analysis_and_is_no_input_folder(tmp_path, capsys):
    """Bug: analyze.py --out DET wrote analysis.txt into the detection folder (the next
    evaluation read it as the box file of an image 'analysis' and failed), and an --out
    holding a previous analysis was refused only after the tables were printed."""
    gt, det = folder(tmp_path / "gt", GT), folder(tmp_path / "det", DET)
    status, out, err = run(analyze.main, capsys, "--gt", gt, "--det", det, "--out", det)
    assert status == 2 and out == "" and sorted(p.name for p in det.iterdir()) == ["a.txt", "b.txt"]
    assert f"--out {det}: is the --det folder" in one_error_line(err)
    previous = folder(tmp_path / "out", {"analysis.json": "{}"})
    status, out, err = run(analyze.main, capsys, "--gt", gt, "--det", det, "--out", previous)
    assert status == 2 and out == "" and f"{previous / 'analysis.json'}: already exists" in one_error_line(err)


def test_test_py_json_never_replaces_the_checkpoint_or_an_existing_file(tmp_path):
    """Bug: test.py best.pt --json best.pt would have replaced the checkpoint with the JSON
    summary (and any existing --json file was replaced silently). Both are refused before
    the checkpoint is even opened (it does not exist here: no network runs)."""
    import test as test_script

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(UserError, match=f"--json {checkpoint}: is an input file \\(the checkpoint {checkpoint}\\)"):
        test_script.main([str(checkpoint), "--json", str(checkpoint), "--overwrite"])
    labels = folder(tmp_path / "labels", {"a.txt": "0 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(UserError, match="is an input file \\(under --label-dir"):
        test_script.main([str(checkpoint), "--label-dir", str(labels), "--json", str(labels / "a.txt"), "--overwrite"])
    with pytest.raises(UserError, match="already exists; choose another path, or --overwrite"):
        test_script.main(["missing.pt", "--json", str(checkpoint)])
    assert checkpoint.read_bytes() == b"weights"
