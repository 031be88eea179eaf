"""The third red-team pass on the data and training path: each test names the bug it
guards against (found by trying odd but legal inputs as a user would), and the user-fed
parsers of the data path (label files, csv lists, VOC XML) are fuzzed with hypothesis."""
from __future__ import annotations

import string
import xml.etree.ElementTree as ET

import numpy as np
import torch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import synthetic
import voc_convert
import voc_txt
import voc_xml
from dataset import VOCSource, build_voc_dataset
from errors import UserError
from test_dataset import user_error  # one-line UserError message of a call




def txt_tree(root, label_bytes: bytes, csv_bytes: bytes = b"img,label\na.jpg,a.txt\n"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.new("RGB", (40, 20), (90, 120, 200)).save(root / "images" / "a.jpg")
    (root / "labels" / "a.txt").write_bytes(label_bytes)
    (root / "train.csv").write_bytes(csv_bytes)
    return root / "train.csv"


# --------------------------------------------------------------------------- label files
@pytest.mark.parametrize("line, field", [(b"0 0_5 0.5 0.2 0.2\n", "x_center '0_5'"),
                                         (b"1_0 0.5 0.5 0.2 0.2\n", "class_id '1_0'")])
def test_digit_grouping_underscore_is_not_a_number(tmp_path, line, field):
    """Bug: float() reads "0_5" as 5 and "1_0" as 10 (PEP 515), so a typo became a box
    five image widths wide (an out-of-range error naming '5') or, worse, class 10 of a
    20-class file: read silently as another class."""
    path = tmp_path / "a.txt"
    path.write_bytes(line)
    assert f"a.txt:1: {field} is not a number" in user_error(voc_txt.read_label_file, path, 20)


def test_label_file_with_a_byte_order_mark_reads(tmp_path):
    """Bug: a label file saved by a Windows editor (UTF-8 with BOM) failed with
    "class_id '\\ufeff14' is not a number"; names files and csv lists already took it."""
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf14 0.5 0.25 0.2 0.1\r\n3 0.25 0.75 0.5 0.5\r\n")
    boxes, labels = voc_txt.read_label_file(path, 20)
    assert labels.tolist() == [14, 3]
    np.testing.assert_allclose(boxes, [[0.4, 0.2, 0.6, 0.3], [0.0, 0.5, 0.5, 1.0]], atol=1e-6)


def test_errors_show_the_values_as_written(tmp_path):
    """Bug: a width of 1.0000001 (a rounding exporter) was refused as "width 1 outside
    [0, 1]", which reads as a contradiction; and a csv row of 3 fields with an empty one
    (pandas' index column) was reported as "got 2" fields."""
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 1.0000001 0.5\n")
    assert "a.txt:1: width 1.0000001 outside [0, 1]" in user_error(voc_txt.read_label_file, path, 1)
    csv_path = txt_tree(tmp_path, b"", b",img,label\n0,a.jpg,a.txt\n")
    assert "train.csv:1: expected 2 fields 'image,label', got 3" in user_error(build_voc_dataset, csv_path)
    csv_path.write_text("a.jpg,\n")
    assert "train.csv:1: expected 2 fields 'image,label', the label field is empty" in \
        user_error(build_voc_dataset, csv_path)


LABEL_TEXT = st.text(alphabet=string.digits + " .-+_eEnaif\t\r\n,x\ufeff\u00a0", max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=LABEL_TEXT, num_classes=st.integers(1, 25))
def test_fuzzed_label_files_give_boxes_or_one_line_error(tmp_path, text, num_classes):
    """Any label file text: boxes inside the image with valid class ids, or one line naming
    the file; never a traceback."""
    path = tmp_path / "fuzz.txt"
    path.write_text(text, encoding="utf-8")
    try:
        boxes, labels = voc_txt.read_label_file(path, num_classes)
    except UserError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert boxes.shape == (len(labels), 4) and np.isfinite(boxes).all()
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert ((labels >= 0) & (labels < num_classes)).all()


UNIT = st.floats(0.0, 0.99, allow_nan=False)  # + 1e-3 below: every box has a size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(objects=st.lists(st.tuples(st.integers(0, 19), UNIT, UNIT, UNIT, UNIT), max_size=6),
       width=st.integers(1, 2000), height=st.integers(1, 2000))
def test_label_files_round_trip(tmp_path, objects, width, height):
    """write_label_file -> read_label_file gives the boxes back (6 decimals of the image,
    clipped to it as Darknet's correct_boxes clips)."""
    boxes = np.array([[min(x1, x2), min(y1, y2), max(x1, x2) + 1e-3, max(y1, y2) + 1e-3]
                      for _, x1, y1, x2, y2 in objects]).reshape(-1, 4).clip(0, 1)
    labels = np.array([c for c, *_ in objects], dtype=np.int64)
    path = tmp_path / "round.txt"
    voc_txt.write_label_file(path, boxes * [width, height, width, height], labels, width, height)
    read_boxes, read_labels = voc_txt.read_label_file(path, 20)
    assert read_labels.tolist() == labels.tolist()
    np.testing.assert_allclose(read_boxes, boxes, atol=2e-6)


CSV_TEXT = st.text(alphabet="ab.jpgtx,\"\r\n \ufeff", max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=CSV_TEXT)
def test_fuzzed_csv_lists_give_pairs_or_one_line_error(tmp_path, text):
    """Any csv text: existing (image, label) pairs or one line naming the csv."""
    csv_path = txt_tree(tmp_path, b"", text.encode())
    (tmp_path / "labels" / "b.txt").write_text("")
    try:
        pairs = voc_txt.read_csv_pairs(csv_path, tmp_path / "images", tmp_path / "labels")
    except UserError as err:
        assert str(csv_path) in str(err) and "\n" not in str(err)
        return
    assert pairs and all(image.is_file() and label.is_file() for image, label in pairs)


# --------------------------------------------------------------------------- VOC XML
OBJECT = "<object><name>{}</name><difficult>{}</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin>" \
         "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def test_namespaced_voc_xml_keeps_its_objects(tmp_path):
    """Bug: an annotation written with an XML namespace (<annotation xmlns="...">) found no
    <object>: evaluate.py's ground truth lost the file's objects without a word, and the
    devkit reader said "no <size> element" although there is one."""
    path = tmp_path / "a.xml"
    path.write_text('<annotation xmlns="http://example.com/voc"><size><width>50</width>'
                    '<height>40</height></size>' + OBJECT.format("dog", 1, 2, 3, 20, 30) + "</annotation>")
    for with_size in (False, True):
        ann = voc_xml.read_annotation(path, with_size=with_size)
        assert ann.names == ["dog"] and ann.boxes.tolist() == [[2, 3, 20, 30]] and ann.difficult.tolist() == [True]
    assert ann.size == (50, 40)


def test_objects_inside_a_wrapper_element_are_read(tmp_path):
    """Bug: an <object> one level down (inside <objects>) was skipped without a word."""
    path = tmp_path / "a.xml"
    path.write_text("<annotation><objects>" + OBJECT.format("cat", 0, 1, 1, 9, 9) + "</objects>"
                    + OBJECT.format("dog", 0, 5, 5, 8, 8) + "</annotation>")
    assert voc_xml.read_annotation(path).names == ["cat", "dog"]


def test_xml_coordinate_with_underscore_is_refused(tmp_path):
    """Bug: <xmin>1_0</xmin> was read as 10 (float() digit grouping), silently."""
    path = tmp_path / "a.xml"
    path.write_text("<annotation>" + OBJECT.format("dog", 0, "1_0", 1, 20, 20) + "</annotation>")
    assert "object 1 (dog): <xmin> is not a number: '1_0'" in user_error(voc_xml.read_annotation, path)


TAG = st.sampled_from(["annotation", "object", "objects", "name", "bndbox", "xmin", "ymin", "xmax",
                       "ymax", "difficult", "size", "width", "height", "part", "{urn:x}object"])


@st.composite
def xml_trees(draw, depth=0):
    element = ET.Element(draw(TAG))
    element.text = draw(st.sampled_from(["", "dog", "1", "0", "5", "-1", "1_0", "nan", " 7 ", "x"]))
    if depth < 3:
        element.extend(draw(st.lists(xml_trees(depth + 1), max_size=4)))
    return element


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=xml_trees(), with_size=st.booleans())
def test_fuzzed_xml_structures_give_objects_or_one_line_error(tmp_path, tree, with_size):
    """Any nesting of VOC's tags (namespaced ones too): finite, ordered boxes or one line
    naming the file; never a traceback."""
    path = tmp_path / "fuzz.xml"
    ET.ElementTree(tree).write(path)
    try:
        ann = voc_xml.read_annotation(path, with_size=with_size)
    except UserError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert np.isfinite(ann.boxes).all() and (ann.boxes[:, 2:] >= ann.boxes[:, :2]).all()
    assert len(ann.names) == len(ann.boxes) == len(ann.difficult) and all(ann.names)


# --------------------------------------------------------------------------- VOCdevkit sets
@pytest.fixture
def devkit(tmp_path):
    root = synthetic.write_vocdevkit_tree(tmp_path, {"2007/trainval": 4, "2007/test": 2}, size=48, seed=0)
    main = root / "VOC2007" / "ImageSets" / "Main"
    (main / "train.txt").write_text("000001\n000002\n")
    return root


def test_sets_that_overlap_are_refused(devkit, tmp_path):
    """Bug: "2007/train+2007/trainval" trained on the train images twice, and voc_convert.py
    --sets 2007/trainval 2007/train wrote them into train.csv twice, although its docstring
    said an image in two sets stops the conversion (it compared paths, equal for one image)."""
    message = user_error(build_voc_dataset, VOCSource(devkit, split="2007/train+2007/trainval"))
    assert "000001.jpg: image 000001 is listed by both 2007/train and 2007/trainval" in message
    assert "names a set twice" in user_error(build_voc_dataset, VOCSource(devkit, split="2007/test+2007/test"))
    out = tmp_path / "out"
    message = user_error(voc_convert.main, ["--devkit", str(devkit), "--out", str(out),
                                            "--sets", "2007/trainval", "2007/train"])
    assert "listed by both 2007/trainval and 2007/train" in message and not out.exists()


def test_missing_year_names_the_years_the_devkit_has(devkit):
    """Bug: train.py's default --split (2007 and 2012) on a VOC2007-only devkit said
    "expected a VOCdevkit folder" about a VOCdevkit folder."""
    message = user_error(build_voc_dataset, VOCSource(devkit, split="2007/trainval+2012/trainval"))
    assert "no VOC2012/Annotations folder; this VOCdevkit has VOC2007" in message
    assert "e.g. 2007/trainval" in message


# --------------------------------------------------------------------------- bad images mid-run
TINY = ["--recipe", "demo", "--width", "0.0625", "--hidden", "16", "--workers", "0", "--device", "cpu",
        "--names", "cross", "--cell-winner", "first"]


@pytest.fixture
def shapes(tmp_path):
    """4 training images (batch 1: 4 steps an epoch) and a copy used as validation data."""
    for folder in ("train", "val"):
        synthetic.write_voc_txt_tree(tmp_path / folder, 4, size=64, seed=0, csv_name="list.csv",
                                     shapes=("cross",))
    (tmp_path / "names").write_text("cross\n")
    TINY[TINY.index("--names") + 1] = str(tmp_path / "names")
    return tmp_path


def truncate(path):
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) * 6 // 10])  # the header stays readable: found when decoded
    return whole


def test_bad_validation_image_keeps_the_epoch_just_trained(shapes):
    """Bug: a truncated validation image (found only when decoded, at the first validation)
    ended the run with nothing saved: every epoch trained until then was lost."""
    import train

    image = sorted((shapes / "val" / "images").iterdir())[1]
    truncate(image)
    args = TINY + ["--data", str(shapes / "train" / "list.csv"), "--val-data", str(shapes / "val" / "list.csv"),
                   "--epochs", "2", "--eval-every", "2", "--batch-size", "2", "--project", str(shapes / "runs")]
    message = user_error(train.main, args + ["--name", "a"])
    run = shapes / "runs" / "a"
    assert f"{image}: unreadable image" in message and f"--resume {run}" in message
    import torch
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "batch" not in ckpt
    assert [row["epoch"] for row in map(eval, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_bad_training_image_mid_epoch_keeps_the_steps_done(shapes, capsys):
    """Bug: a truncated training image met in the middle of an epoch lost the epoch's steps
    so far. They are saved as an interrupt saves them; once the file is mended, --resume
    ends with the very weights of a run that never met it."""
    import torch

    import train

    args = TINY + ["--data", str(shapes / "train" / "list.csv"), "--epochs", "1", "--batch-size", "1",
                   "--val-data", str(shapes / "val" / "list.csv"), "--project", str(shapes / "runs")]
    train.main(args + ["--name", "clean"])
    image = sorted((shapes / "train" / "images").iterdir())[2]
    whole = truncate(image)
    message = user_error(train.main, args + ["--name", "broken"])
    run = shapes / "runs" / "broken"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert f"{image}: unreadable image" in message and f"after batch {ckpt['batch']}" in message
    assert f"--resume {run}" in message
    image.write_bytes(whole)
    capsys.readouterr()
    train.main(args + ["--resume", str(run)])
    assert "training images changed" not in capsys.readouterr().out  # a mended image: the labels are the run's
    clean = torch.load(shapes / "runs" / "clean" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


# --------------------------------------------------------------------------- second pass
def metric_rows(run):
    import json
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_validates_an_epoch_saved_unvalidated(shapes, capsys):
    """Bug: an epoch saved unvalidated (a bad validation image; engine.fit saves the epoch
    before re-raising) was never validated on --resume: failed at the last epoch, the run
    ended "best validation mAP -inf" with no best.pt; failed earlier, that epoch never had
    its score (nor its chance at best.pt). Now --resume validates it first, at any epoch:
    the mended run ends exactly as a run that never met the bad file."""
    import torch

    import train

    image = sorted((shapes / "val" / "images").iterdir())[1]
    args = TINY + ["--data", str(shapes / "train" / "list.csv"), "--val-data", str(shapes / "val" / "list.csv"),
                   "--eval-every", "1", "--batch-size", "2", "--project", str(shapes / "runs")]
    train.main(args + ["--epochs", "2", "--name", "clean"])
    whole = truncate(image)
    for name, epochs in (("first", "2"), ("last", "1")):  # fails at epoch 1: of 2, and the last
        assert "without validation" in user_error(train.main, args + ["--epochs", epochs, "--name", name])
        ckpt = torch.load(shapes / "runs" / name / "last.pt", weights_only=True)
        assert ckpt["unvalidated"] and ckpt["epoch"] == 1 and not (shapes / "runs" / name / "best.pt").exists()
    # still bad on resume: refused again, nothing lost
    assert "without validation" in user_error(train.main, args + ["--epochs", "1", "--resume", str(shapes / "runs" / "last")])
    assert torch.load(shapes / "runs" / "last" / "last.pt", weights_only=True)["unvalidated"]
    image.write_bytes(whole)
    capsys.readouterr()
    train.main(args + ["--epochs", "1", "--resume", str(shapes / "runs" / "last")])
    assert "best validation mAP -inf" not in capsys.readouterr().out
    last = shapes / "runs" / "last"
    assert (last / "best.pt").exists() and "unvalidated" not in torch.load(last / "last.pt", weights_only=True)
    assert metric_rows(last) == metric_rows(shapes / "runs" / "clean")[:1]
    train.main(args + ["--epochs", "2", "--resume", str(shapes / "runs" / "first")])
    clean, first = shapes / "runs" / "clean", shapes / "runs" / "first"
    assert metric_rows(first) == metric_rows(clean) and all("mAP" in row for row in metric_rows(first))
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(run / name, weights_only=True) for run in (clean, first))
        assert a["epoch"] == b["epoch"] and a["best"] == b["best"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_one_pixel_devkit_boxes_round_trip_through_voc_convert(tmp_path):
    """Bug: a VOC box with xmin = xmax = 0 (a tool counting pixels from 0) became 0..0,
    width 0: voc_convert.py wrote a label file its own reader refuses ("box size 0.000000
    x ... must be positive"), and the VOCdevkit reader trained a w = 0 target. Pixel boxes
    are inclusive (the devkit's convention): xmin = xmax is one pixel wide, wherever it is."""
    devkit = synthetic.write_vocdevkit_tree(tmp_path, {"2007/trainval": 2}, size=48, seed=0,
                                            difficult_rate=0.0, vary_aspect=False)
    xml = devkit / "VOC2007" / "Annotations" / "000001.xml"
    tree = ET.parse(xml)
    first, second = tree.getroot().findall("object/bndbox")[:2]
    for box, (x, y) in ((first, (0, 0)), (second, (7, 48))):  # the top-left corner; a 1-pixel column
        for tag, value in (("xmin", x), ("xmax", x), ("ymin", y), ("ymax", y)):
            box.find(tag).text = str(value)
    tree.write(xml)
    out = tmp_path / "out"
    voc_convert.main(["--devkit", str(devkit), "--out", str(out), "--sets", "2007/trainval"])
    for name, data in (("devkit", VOCSource(devkit, split="2007/trainval")), ("txt", VOCSource(out / "train.csv"))):
        boxes = build_voc_dataset(data).annotation(0)["boxes"][:2].numpy()
        expected = [[0, 0, 1, 1], [6, 47, 7, 48]]  # 0-based continuous pixels of a 48 x 48 image
        np.testing.assert_allclose(boxes, expected, atol=48 * 1e-6, err_msg=name)


def test_tiny_boxes_follow_one_drop_rule_with_and_without_augmentation(tmp_path):
    """Bug: a 1e-9-wide label box stayed a training target under --no-augment, while the
    augmentation dropped it by its 1 % rule (Darknet's fill_truth_region): the two paths
    trained on different objects. Now both apply transforms.keep_targets."""
    csv = txt_tree(tmp_path, b"0 0.5 0.5 0.6 0.6\n0 0.1 0.1 1e-9 0.2\n0 0.9 0.1 0.0099 0.2\n0 0.9 0.9 0.0101 0.2\n")
    kept = {(3, 3), (6, 6)}  # the 60 % box and the 1.01 %-wide one; not the 1e-9 nor the 0.99 %
    plain, augmented = (build_voc_dataset(csv, ["a"], S=7, img_size=64, train=train, uint8=True)
                        for train in (False, True))
    augmented.augment.jitter, augmented.augment.flip = 0.0, 0.0  # the identity draw: the same boxes
    for encoded in (False, True):
        plain.encoded = augmented.encoded = encoded
        targets = [data[0][1] for data in (plain, augmented)]
        for target in targets:
            assert {tuple(cell) for cell in target[..., 1].nonzero().tolist()} == kept
        torch.testing.assert_close(targets[0], targets[1])
    assert len(plain.annotation(0)["boxes"]) == 4  # evaluation keeps every box


def test_repeated_csv_rows_are_said_once(tmp_path, capsys):
    """Bug: an image listed twice in a csv list (a list concatenated twice by mistake) was
    trained, or scored, twice without a word. It stays allowed (repeating rows oversamples
    on purpose, as Darknet lists do) but one warning line names the csv and the lines."""
    csv = txt_tree(tmp_path, b"0 0.5 0.5 0.2 0.2\n", b"img,label\na.jpg,a.txt\n\nb.jpg,b.txt\na.jpg,b.txt\nb.jpg,b.txt\n")
    (tmp_path / "images" / "b.jpg").write_bytes((tmp_path / "images" / "a.jpg").read_bytes())
    (tmp_path / "labels" / "b.txt").write_text("")
    capsys.readouterr()
    assert len(build_voc_dataset(csv, ["a"])) == 4
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {csv}: 2 row(s) repeat an image listed before (the first: line 5 repeats "
                   "line 2, a.jpg); each is used as often as it is listed"]
    txt_tree(tmp_path, b"0 0.5 0.5 0.2 0.2\n", b"img,label\na.jpg,a.txt\nb.jpg,b.txt\n")
    build_voc_dataset(csv, ["a"])
    assert capsys.readouterr().err == ""


def test_resume_names_the_images_whose_labels_changed(shapes, capsys):
    """Bug: on --resume only the number of training images was compared with the run's
    start: edited boxes were accepted silently, and the resumed run trained on other data
    than its config.json says. Now every checkpoint keeps one digest per image of its
    labels, config.json a digest of them all, and a resume names what changed (a warning:
    refusing would block a legitimate mend of the labels)."""
    import json

    import train

    args = TINY + ["--data", str(shapes / "train" / "list.csv"), "--val-data", str(shapes / "val" / "list.csv"),
                   "--batch-size", "4", "--project", str(shapes / "runs"), "--name", "r"]
    run = shapes / "runs" / "r"
    train.main(args + ["--epochs", "1"])
    summary = json.loads((run / "config.json").read_text())["train_data"]
    assert summary["images"] == 4 and len(summary["labels_digest"]) == 16
    capsys.readouterr()
    train.main(args + ["--epochs", "2", "--resume", str(run)])
    assert "training images changed" not in capsys.readouterr().out
    label = sorted((shapes / "train" / "labels").iterdir())[2]
    first, *rest = label.read_text().splitlines()
    fields = first.split()  # the first object, 10 % narrower
    label.write_text("\n".join([" ".join(fields[:3] + [f"{float(fields[3]) * 0.9:.6f}", fields[4]]), *rest]))
    train.main(args + ["--epochs", "3", "--resume", str(run)])
    image = sorted((shapes / "train" / "images").iterdir())[2]
    assert (f"warning: {run / 'last.pt'}: the labels of 1 of 4 training images changed since this checkpoint "
            f"was saved (the first: {image})") in capsys.readouterr().out
    resumed = json.loads((run / "config_resumed.json").read_text())["train_data"]
    assert resumed["images"] == 4 and resumed["labels_digest"] != summary["labels_digest"]


def test_readme_counts_the_bad_input_catalogue():
    """Bug: the README's "holds 117 cases over 8 commands" (and its root-only and
    run-folder exceptions) was a number typed by hand, kept right only by whoever
    remembered to recount tests/test_bad_inputs.py after adding cases."""
    import re
    from pathlib import Path

    import test_bad_inputs

    text = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    found = re.search(r"holds (\d+) cases over (\d+) commands: all (\d+) end in one line and exit 2, .*?"
                      r"\((\d+) read-only-folder cases run only as a non-root user; (\d+) bad images", text)
    cases = test_bad_inputs.CASES
    assert found is not None
    assert tuple(map(int, found.groups())) == (len(cases), len({case.script for case in cases}), len(cases),
                                               sum(1 for case in cases if case.marks),
                                               sum(1 for case in cases if case.writes))
