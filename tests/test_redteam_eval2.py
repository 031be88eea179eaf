"""The fourth red-team pass on the evaluation path (evaluate.py, box_files.py, voc_results.py,
plots.py, analyze.py, test.py's options): each test names the bug it guards against. Numbers
are worked out by hand in the docstrings."""
from __future__ import annotations

import json
import unicodedata

import pytest

import analyze
import box_files
import evaluate as ev
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
