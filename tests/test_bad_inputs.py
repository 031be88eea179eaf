"""Bad inputs, all together: every script against every kind of bad input that applies.

Each case runs a script as a user would (a process of its own, cwd the repository; see
test_reliability.Scripts for how the processes start without importing torch each time)
and must end with

* exit code 2 and ONE line on stderr, ``error: ...``, naming the file or argument at fault
  (what a terminal shows: tqdm's progress bar, redrawn and cleared with \\r, is not a line);
  no "Traceback";
* earlier outputs untouched: a previous run folder (``runs/exp``: config.json,
  metrics.jsonl, last.pt, results.json) is hashed before and after, and the script's
  output (``--project runs``, ``--json runs/exp/results.json``) points right at it.

Errors found before any work leave nothing new behind either. The exceptions are marked
``writes``: a bad image that a training run or a conversion meets only when it reads it
(the datasets check that every file exists up front, but decode images when they are
used), after the new run folder was started.

Read-only output folders: the tests run as root, whom ``chmod`` does not stop. The case
uses a folder under a file instead (mkdir fails with ENOTDIR, as it fails with EACCES in
a read-only folder); the genuine read-only case runs only when the tests do not run as root.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import train
import utils
from model import build_model
from synthetic import write_imagenet_tree, write_voc_txt_tree, write_vocdevkit_tree
from scripts_server import REPO, Result, hashes, one_line_error

TINY_YOLO = ["--S", "2", "--width", "0.0625", "--hidden", "16", "--epochs", "1", "--batch-size", "2",
             "--workers", "0", "--device", "cpu"]
TINY_DARKNET = ["--width", "0.0625", "--img-size", "32", "--epochs", "1", "--batch-size", "2",
                "--workers", "0", "--device", "cpu"]


# --------------------------------------------------------------------------- good inputs, once
@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """Small valid inputs of every kind; each case copies what it breaks."""
    root = tmp_path_factory.mktemp("good")
    write_voc_txt_tree(root / "voc", 4, size=48, seed=0, csv_name="train.csv")
    write_vocdevkit_tree(root / "devkit", {"2007/trainval": 2, "2007/test": 2}, size=48, seed=0)
    write_imagenet_tree(root / "imagenet", n_classes=2, n_train_per_class=2, n_val_per_class=1, size=32)
    model = build_model("yolov1", S=2, width=0.0625, hidden=16, C=20)
    ckpt = root / "yolo.pt"
    utils.save_checkpoint({"kind": "yolo", "epoch": 1, "model": model.state_dict(),
                           "model_config": model.config, "class_names": list(utils.VOC_CLASSES)}, ckpt)
    (root / "gt").mkdir()
    (root / "gt" / "a.txt").write_text("dog 0 0 9 9\n")
    (root / "det").mkdir()
    (root / "det" / "a.txt").write_text("dog 0.9 0 0 9 9\n")
    return {"voc": root / "voc", "devkit": root / "devkit" / "VOCdevkit", "imagenet": root / "imagenet",
            "ckpt": ckpt, "gt": root / "gt", "det": root / "det"}


class Context:
    """One case's folder: copies of the good inputs to break, and the previous run folder."""

    def __init__(self, tmp: Path, good: dict[str, Path]):
        self.tmp, self.good = tmp, good
        self.runs = tmp / "runs"
        previous = self.runs / "exp"
        previous.mkdir(parents=True)
        (previous / "config.json").write_text('{"epochs": 1}\n')
        (previous / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.5}\n')
        (previous / "results.json").write_text('{"mAP": 0.5}\n')
        shutil.copyfile(good["ckpt"], previous / "last.pt")
        self.ckpt = previous / "last.pt"
        self.a_file = tmp / "a_file"
        self.a_file.write_text("not a folder\n")

    def copy(self, what: str) -> Path:
        target = self.tmp / what
        if not target.exists():
            shutil.copytree(self.good[what] if what != "devkit" else self.good[what].parent, target)
        return target / "VOCdevkit" if what == "devkit" else target

    # the txt layout ------------------------------------------------------------------------
    def voc(self, label: str | None = None, csv: str | None = None, image: bytes | str | None = None) -> Path:
        """A copy of the txt tree with the first label file, the csv or the first image replaced."""
        root = self.copy("voc")
        first = sorted((root / "labels").iterdir())[0]
        if label is not None:
            first.write_text(label)
        if csv is not None:
            (root / "train.csv").write_text(csv)
        if image == "truncated":
            path = sorted((root / "images").iterdir())[0]
            noise = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(noise).save(path, quality=95)
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
        elif image is not None:
            sorted((root / "images").iterdir())[0].write_bytes(image)
        return root / "train.csv"

    def image(self, n: int = 0) -> Path:
        return sorted((self.copy("voc") / "images").iterdir())[n]

    def label(self, n: int = 0) -> Path:
        return sorted((self.copy("voc") / "labels").iterdir())[n]

    # VOCdevkit ------------------------------------------------------------------------------
    def devkit(self, edit: Callable[[str], str]) -> tuple[Path, Path]:
        devkit = self.copy("devkit")
        xml = sorted((devkit / "VOC2007" / "Annotations").iterdir())[0]
        xml.write_text(edit(xml.read_text()))
        return devkit, xml

    # ImageNet -------------------------------------------------------------------------------
    def imagenet_args(self) -> list[str]:
        root = self.copy("imagenet")
        return ["--train-dir", str(root / "train"), "--val-dir", str(root / "val"),
                "--val-labels", str(root / "LOC_val_solution.csv")]


def no_size(xml: str) -> str:
    return xml[:xml.index("<size>")] + xml[xml.index("</size>") + len("</size>"):]


def wrong_size(xml: str) -> str:
    import re
    return re.sub(r"<width>\d+</width>", "<width>4000</width>", xml, count=1)


def box_outside(xml: str) -> str:
    import re
    return re.sub(r"<xmax>\d+</xmax>", "<xmax>4000</xmax>", xml, count=1)


# --------------------------------------------------------------------------- the catalogue
@dataclass
class Case:
    id: str
    script: str
    build: Callable[[Context], tuple[list, list[str]]]  # -> (arguments, fragments of the error line)
    writes: str = ""  # why a new output may be left behind (empty: nothing new may appear)
    marks: list = field(default_factory=list)


def data_cases(script: str, argv: Callable[[Context, Path], list]) -> list[Case]:
    """The txt-layout defects, for a script that reads a csv (argv builds its arguments)."""
    lazy = "writes" if script == "train.py" else ""
    defects = [
        ("missing image", lambda c: (c.voc(csv="a.jpg,synth_000000.txt\n"), ["train.csv:1: image",
                                                                             "a.jpg not found"])),
        ("missing label file", lambda c: (c.voc(csv="synth_000000.jpg,nope.txt\n"),
                                          ["train.csv:1: label file", "nope.txt not found"])),
        ("csv row with a missing field",
         lambda c: (c.voc(csv="synth_000000.jpg,synth_000000.txt\nsynth_000001.jpg\n"),
                    ["train.csv:2: expected 2 fields 'image,label', got 1"])),
        ("label line with 4 values", lambda c: (c.voc(label="14 0.5 0.5 0.2\n"),
                                                [f"{c.label()}:1: expected 5 values"])),
        ("label value not a number", lambda c: (c.voc(label="14 0.5 zero 0.2 0.2\n"),
                                                [f"{c.label()}:1: y_center 'zero' is not a number"])),
        ("class id out of range", lambda c: (c.voc(label="20 0.5 0.5 0.2 0.2\n"),
                                             [f"{c.label()}:1: class id 20 out of range"])),
        ("coordinate outside [0, 1]", lambda c: (c.voc(label="14 1.2 0.5 0.2 0.2\n"),
                                                 [f"{c.label()}:1: x_center 1.2 outside [0, 1]"])),
        ("box of size 0", lambda c: (c.voc(label="14 0.5 0.5 0 0.2\n"),
                                     [f"{c.label()}:1: box size 0 x 0.2 must be positive"])),
        ("unreadable image", lambda c: (c.voc(image=b"this is not a JPEG"),
                                        [f"{c.image()}: unreadable image"])),
        ("truncated image", lambda c: (c.voc(image="truncated"), [f"{c.image()}: unreadable image"])),
    ]
    cases = []
    for name, defect in defects:
        def build(c, defect=defect):
            csv, fragments = defect(c)
            return argv(c, csv), fragments
        image = "image" in name and "missing" not in name
        cases.append(Case(f"{script} {name}", script, build, writes=lazy if image else ""))
    return cases


def train_args(c: Context, data) -> list:
    # --workers 1: an error raised in a DataLoader worker comes back wrapped in its traceback
    return ["train.py", "--data", data, *TINY_YOLO, "--workers", "1", "--project", c.runs, "--name", "exp"]


def evaluation_args(c: Context, data) -> list:
    return ["test.py", c.ckpt, "--data", data, "--device", "cpu", "--json", c.runs / "exp" / "results.json",
            "--overwrite"]  # even so, bad input leaves the earlier results.json alone


def detect_txt_args(c: Context, data) -> list:
    return ["detect_txt.py", c.ckpt, "--data", data, "--device", "cpu", "--project", c.runs]


def darknet_args(c: Context, *extra) -> list:
    return ["darknet_train.py", *c.imagenet_args(), *TINY_DARKNET, "--project", c.runs, "--name", "exp",
            *extra]


def devkit_cases() -> list[Case]:
    cases = []
    for name, edit, fragment in (("XML without <size>", no_size, "no <size> element"),
                                 ("XML box outside the image", box_outside, "object 1"),
                                 ("XML <size> not the image's", wrong_size, "<size> 4000 x")):
        for script, argv in (
                ("train.py", lambda c, d: ["train.py", "--data", d, "--split", "2007/trainval+2007/test",
                                           *TINY_YOLO, "--project", c.runs, "--name", "exp"]),
                ("test.py", lambda c, d: [*evaluation_args(c, d), "--split", "2007/trainval"]),
                ("detect_txt.py", lambda c, d: [*detect_txt_args(c, d), "--split", "2007/trainval"]),
                ("voc_convert.py", lambda c, d: ["voc_convert.py", "--devkit", d, "--sets", "2007/trainval",
                                                 "2007/test", "--out", c.runs / "exp" / "converted"])):
            def build(c, edit=edit, argv=argv, fragment=fragment):
                devkit, xml = c.devkit(edit)
                return argv(c, devkit), [f"{xml}: ", fragment]
            cases.append(Case(f"{script} {name}", script, build))
    return cases


def imagenet_cases() -> list[Case]:
    def empty_class_folder(c):
        args = darknet_args(c)
        folder = Path(args[args.index("--train-dir") + 1]) / "n01234567"
        folder.mkdir()
        return args, [f"{folder}: empty class folder"]

    def val_image_not_in_labels(c):
        args = darknet_args(c)
        image = Path(args[args.index("--val-dir") + 1]) / "ILSVRC2012_val_00000099.JPEG"
        Image.new("RGB", (32, 32)).save(image)
        return args, [f"{image}: not in the validation label file"]

    def truncated_training_image(c):
        args = darknet_args(c, "--workers", "1")
        image = sorted(Path(args[args.index("--train-dir") + 1]).rglob("*.JPEG"))[0]
        image.write_bytes(image.read_bytes()[:200])
        return args, [f"{image}: unreadable image"]

    return [Case("darknet_train.py empty class folder", "darknet_train.py", empty_class_folder),
            Case("darknet_train.py val image absent from the label file", "darknet_train.py",
                 val_image_not_in_labels),
            Case("darknet_train.py truncated training image", "darknet_train.py", truncated_training_image,
                 writes="the image is decoded when training reads it")]


def evaluate_cases() -> list[Case]:
    def bad(gt_line: str, det_line: str, fragment: str):
        def build(c):
            for name, line in (("gt", gt_line), ("det", det_line)):
                (c.tmp / name).mkdir()
                (c.tmp / name / "a.txt").write_text(line)
            return (["evaluate.py", "--gt", c.tmp / "gt", "--det", c.tmp / "det",
                     "--json", c.runs / "exp" / "results.json", "--overwrite"], [fragment])
        return build
    return [
        Case("evaluate.py gt line with 4 values", "evaluate.py",
             bad("dog 0 0 9\n", "", "gt/a.txt:1: expected 5")),
        Case("evaluate.py detection score not a number", "evaluate.py",
             bad("dog 0 0 9 9\n", "dog high 0 0 9 9\n", "det/a.txt:1: confidence is not a number")),
        Case("evaluate.py relative coordinates", "evaluate.py",
             bad("dog 0.1 0.1 0.3 0.3\n", "dog 0.9 0.2 0.2 0.5 0.5\n",
                 "every ground-truth coordinate is between 0 and 1")),
        Case("evaluate.py no file name in common", "evaluate.py", no_common_name),
        Case("evaluate.py missing folders", "evaluate.py",
             lambda c: (["evaluate.py", "--gt", c.tmp / "nope", "--det", c.good["det"]],
                        [f"{c.tmp / 'nope'}"])),
        Case("evaluate.py --json under a file", "evaluate.py",
             lambda c: (["evaluate.py", "--gt", c.good["gt"], "--det", c.good["det"], "--json",
                         c.a_file / "r.json"], [f"{c.a_file / 'r.json'}"])),
    ]


def no_common_name(c: Context) -> tuple[list, list[str]]:
    (c.tmp / "det").mkdir()
    (c.tmp / "det" / "a.jpg.txt").write_text("dog 0.9 0 0 9 9\n")
    return (["evaluate.py", "--gt", c.good["gt"], "--det", c.tmp / "det", "--json", c.runs / "exp" / "results.json",
             "--overwrite"],
            ["have no file name in common", "name them a.txt"])


def one_stem_twice(c: Context) -> Path:
    """A folder with a.jpg and a.png: their outputs would share one name."""
    folder = c.tmp / "photos"
    folder.mkdir()
    Image.new("RGB", (48, 48)).save(folder / "a.jpg")
    Image.new("RGB", (48, 48)).save(folder / "a.png")
    return folder


def image_script_cases() -> list[Case]:
    def unreadable(c):
        c.voc(image=b"GIF89a broken")
        return ["detect.py", c.ckpt, c.image(), "--device", "cpu", "--project", c.runs], [
            f"{c.image()}: unreadable image"]

    return [
        Case("detect.py unreadable image", "detect.py", unreadable),
        Case("detect.py --save-txt of a.jpg and a.png", "detect.py",
             lambda c: (["detect.py", c.ckpt, one_stem_twice(c), "--save-txt", "--device", "cpu",
                         "--project", c.runs], ["a.jpg and", "a.png would both write labels/a.txt"])),
        Case("detect_txt.py a.jpg and a.png", "detect_txt.py",
             lambda c: (["detect_txt.py", c.ckpt, "--data", one_stem_twice(c), "--device", "cpu",
                         "--project", c.runs], ["a.jpg and", "a.png would both write a.txt"])),
        Case("voc_convert.py into a non-empty --out", "voc_convert.py",
             lambda c: (["voc_convert.py", "--devkit", c.copy("devkit"), "--sets", "2007/test",
                         "--out", c.runs / "exp"], [f"{c.runs / 'exp'}: output folder is not empty"])),
        Case("train.py --names with a space", "train.py", names_with_a_space),
        Case("detect.py missing source", "detect.py",
             lambda c: (["detect.py", c.ckpt, c.tmp / "nope.jpg", "--project", c.runs],
                        [f"{c.tmp / 'nope.jpg'}: no such file or folder"])),
    ]


def names_with_a_space(c: Context) -> tuple[list, list[str]]:
    names = c.tmp / "names.txt"
    names.write_text("dog\npotted plant\n")
    return (["train.py", "--data", c.copy("voc") / "train.csv", *TINY_YOLO, "--names", names,
             "--project", c.runs, "--name", "exp"], [f"{names}:2: class name 'potted plant' contains a space"])


def argument_cases() -> list[Case]:
    yolo = lambda c, *extra: ["train.py", "--data", c.copy("voc") / "train.csv", *TINY_YOLO,  # noqa: E731
                              "--project", c.runs, "--name", "exp", *extra]
    cases = [
        # missing paths
        Case("train.py missing --data", "train.py",
             lambda c: (["train.py", "--data", c.tmp / "nope.csv", *TINY_YOLO, "--project", c.runs],
                        [f"{c.tmp / 'nope.csv'}"])),
        Case("train.py missing --backbone", "train.py",
             lambda c: (yolo(c, "--backbone", c.tmp / "nope.pt"),
                        [f"{c.tmp / 'nope.pt'}: checkpoint not found"])),
        Case("train.py --resume of a folder without last.pt", "train.py",
             lambda c: (yolo(c, "--resume", c.tmp), [f"{c.tmp / 'last.pt'}: no checkpoint to resume from"])),
        Case("train.py --resume of a file that holds a bare tensor", "train.py", resume_a_bare_tensor),
        Case("darknet_train.py --resume of a YOLO checkpoint", "darknet_train.py",
             lambda c: (darknet_args(c, "--resume", c.ckpt),
                        [f"{c.ckpt}: a 'yolo' checkpoint, not a 'darknet' one"])),
        Case("darknet_train.py missing --train-dir", "darknet_train.py",
             lambda c: (["darknet_train.py", "--train-dir", c.tmp / "nope", *TINY_DARKNET,
                         "--project", c.runs], [f"{c.tmp / 'nope'}"])),
        Case("voc_convert.py missing --devkit", "voc_convert.py",
             lambda c: (["voc_convert.py", "--devkit", c.tmp / "nope", "--out", c.runs / "voc"],
                        [f"{c.tmp / 'nope'}: VOCdevkit folder not found"])),
        Case("export.py missing checkpoint", "export.py",
             lambda c: (["export.py", c.tmp / "nope.pt", "--include", "torchscript", "--project", c.runs],
                        [f"{c.tmp / 'nope.pt'}: checkpoint not found"])),
    ]
    missing = {"test.py": lambda c: ["test.py", c.tmp / "nope.pt", "--device", "cpu"],
               "detect_txt.py": lambda c: ["detect_txt.py", c.tmp / "nope.pt", "--project", c.runs],
               "detect.py": lambda c: ["detect.py", c.tmp / "nope.pt", c.image(), "--project", c.runs]}
    for script, argv in missing.items():
        cases.append(Case(f"{script} missing checkpoint", script, lambda c, a=argv: (
            a(c), [f"{c.tmp / 'nope.pt'}: checkpoint not found"])))
    # output folders that cannot be written
    outputs = {
        "train.py": lambda c, p: yolo(c)[:-4] + ["--project", p, "--name", "exp"],
        "darknet_train.py": lambda c, p: darknet_args(c)[:-4] + ["--project", p, "--name", "exp"],
        "detect_txt.py": lambda c, p: ["detect_txt.py", c.ckpt, "--data", c.copy("voc") / "train.csv",
                                       "--device", "cpu", "--project", p],
        "detect.py": lambda c, p: ["detect.py", c.ckpt, c.image(), "--device", "cpu", "--project", p],
        "export.py": lambda c, p: ["export.py", c.ckpt, "--include", "torchscript", "--project", p],
    }
    for script, argv in outputs.items():
        cases.append(Case(f"{script} --project is a file", script,
                          lambda c, a=argv: (a(c, c.a_file), [f"{c.a_file}: exists and is not a folder"])))
        cases.append(Case(f"{script} --project under a file", script,
                          lambda c, a=argv: (a(c, c.a_file / "runs"),
                                             [f"{c.a_file / 'runs'}", "Not a directory"])))
        cases.append(Case(f"{script} --project read-only", script,
                          lambda c, a=argv: (a(c, read_only(c)), [f"{read_only(c)}", "Permission denied"]),
                          marks=[pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only "
                                                    "folders; the 'under a file' case stands in for it")]))
    cases += [
        Case("test.py --json under a file", "test.py",
             lambda c: (["test.py", c.ckpt, "--data", c.copy("voc") / "train.csv", "--device", "cpu",
                         "--json", c.a_file / "r.json"], [f"{c.a_file / 'r.json'}"])),
        Case("voc_convert.py --out is a file", "voc_convert.py",
             lambda c: (["voc_convert.py", "--devkit", c.copy("devkit"), "--sets", "2007/test",
                         "--out", c.a_file], [f"{c.a_file}"])),
    ]
    # counts
    for value in ("0", "-1"):
        cases.append(Case(f"train.py --epochs {value}", "train.py",
                          lambda c, v=value: (yolo(c, "--epochs", v),
                                              [f"--epochs must be at least 1, got {v}"])))
        cases.append(Case(f"darknet_train.py --epochs {value}", "darknet_train.py",
                          lambda c, v=value: (darknet_args(c, "--epochs", v),
                                              [f"--epochs must be at least 1, got {v}"])))
    batch = {
        "train.py": lambda c: yolo(c, "--batch-size", "-2"),
        "darknet_train.py": lambda c: darknet_args(c, "--batch-size", "-2"),
        "test.py": lambda c: ["test.py", c.ckpt, "--data", c.copy("voc") / "train.csv", "--device", "cpu",
                              "--batch-size", "-2"],
        "detect_txt.py": lambda c: ["detect_txt.py", c.ckpt, "--data", c.copy("voc") / "train.csv",
                                    "--device", "cpu", "--project", c.runs, "--batch-size", "-2"],
        "detect.py": lambda c: ["detect.py", c.ckpt, c.image(), "--device", "cpu", "--project", c.runs,
                                "--batch-size", "-2"],
    }
    for script, argv in batch.items():
        cases.append(Case(f"{script} --batch-size -2", script,
                          lambda c, a=argv: (a(c), ["--batch-size must be at least 1, got -2"])))
    return cases


def range_cases() -> list[Case]:
    """#14 class 3: numeric arguments out of range, refused when parsed (argtypes.py);
    tests/test_argtypes.py tries every numeric option of every script the same way."""
    yolo = lambda c, *extra: ["train.py", "--data", c.copy("voc") / "train.csv", *TINY_YOLO,  # noqa: E731
                              "--project", c.runs, "--name", "exp", *extra]
    rows = [("--lr", "nan", "--lr must be a finite number, got 'nan'"),
            ("--gamma", "-1", "--gamma must be positive, got -1"),
            ("--weight-decay", "-1", "--weight-decay must be at least 0, got -1"),
            ("--width", "0", "--width must be positive, got 0"),
            ("--hidden", "0", "--hidden must be at least 1, got 0"),
            ("--S", "0", "--S must be at least 1, got 0"),
            ("--B", "0", "--B must be at least 1, got 0"),
            ("--dropout", "1.5", "--dropout must be in [0, 1), got 1.5"),
            ("--momentum", "-1", "--momentum must be in [0, 1), got -1"),
            ("--poly-power", "-1", "--poly-power must be at least 0, got -1")]
    cases = [Case(f"train.py {flag} {value}", "train.py",
                  lambda c, f=flag, v=value, m=message: (yolo(c, f, v), [m])) for flag, value, message in rows]
    cases.append(Case("test.py --iou 0", "test.py", lambda c: (
        [*evaluation_args(c, c.copy("voc") / "train.csv"), "--iou", "0"], ["--iou must be in (0, 1], got 0"])))
    cases.append(Case("darknet_train.py --lr inf", "darknet_train.py", lambda c: (
        darknet_args(c, "--lr", "inf"), ["--lr must be a finite number, got 'inf'"])))
    return cases


def run_folder_cases() -> list[Case]:
    """#14 classes 1, 2 and 9: run folders, resumes and options that did not do what they said."""
    yolo = lambda c, *extra: ["train.py", "--data", c.copy("voc") / "train.csv", *TINY_YOLO,  # noqa: E731
                              "--project", c.runs, "--name", "exp", *extra]

    def another_runs_folder(c):
        c.ckpt.unlink()  # a finished or foreign run without last.pt: --auto-resume replaced its files
        return yolo(c, "--auto-resume"), [f"{c.runs / 'exp'}: holds a previous run", "no last.pt",
                                          "choose another --name"]

    def resume_with_another_optimizer(c):
        ckpt = utils.load_checkpoint(c.ckpt)
        args = train.parse_args([str(a) for a in yolo(c, "--optimizer", "adam")[1:]])
        utils.save_checkpoint(ckpt | {"args": vars(args)}, c.ckpt)
        return yolo(c, "--resume", c.runs / "exp", "--optimizer", "sgd"), [
            f"{c.ckpt}: cannot resume with other arguments", "--optimizer 'adam' -> 'sgd'"]

    def devkit_without_a_listed_year(c):
        return (["voc_convert.py", "--devkit", c.copy("devkit"), "--sets", "2007/trainval", "2012/trainval",
                 "--out", c.runs / "exp" / "converted"], ["no VOC2012/Annotations folder"])

    def detect_one_missing_source(c):
        return (["detect.py", c.ckpt, c.image(0), c.tmp / "nope.jpg", c.image(1), "--device", "cpu",
                 "--project", c.runs], [f"{c.tmp / 'nope.jpg'}: no such file or folder"])

    return [
        Case("train.py --auto-resume into another run's folder without last.pt", "train.py", another_runs_folder),
        Case("train.py --resume with another --optimizer", "train.py", resume_with_another_optimizer),
        Case("train.py --batch-size 2 --accum-steps 3", "train.py", lambda c: (
            yolo(c, "--accum-steps", "3"), ["--batch-size 2 is not divisible by --accum-steps 3"])),
        Case("voc_convert.py --sets naming a year the devkit lacks", "voc_convert.py", devkit_without_a_listed_year),
        Case("detect.py several sources, one missing", "detect.py", detect_one_missing_source),
    ]


def resume_a_bare_tensor(c: Context) -> tuple[list, list[str]]:
    torch.save(torch.zeros(3), c.tmp / "tensor.pt")
    return (["train.py", "--data", c.copy("voc") / "train.csv", *TINY_YOLO, "--project", c.runs,
             "--resume", c.tmp / "tensor.pt"], [f"{c.tmp / 'tensor.pt'}: not a training checkpoint"])


def foreign_checkpoint(c: Context, config: dict | None = None, nan: str | None = None) -> Path:
    """A copy of the good checkpoint with another model_config or one NaN tensor (#14 classes 4, 10)."""
    ckpt = utils.load_checkpoint(c.good["ckpt"])
    ckpt["model_config"] = {**ckpt["model_config"], **(config or {})}
    if nan:
        ckpt["model"][nan] = ckpt["model"][nan].clone().fill_(float("nan"))
    utils.save_checkpoint(ckpt, c.tmp / "foreign.pt")
    return c.tmp / "foreign.pt"


def checkpoint_cases() -> list[Case]:
    """Checkpoints whose configuration would build a huge or broken model, or whose weights are NaN:
    refused before anything is built or written."""
    voc = lambda c: c.copy("voc") / "train.csv"  # noqa: E731
    huge = lambda c: foreign_checkpoint(c, {"S": 400})  # noqa: E731
    nan = lambda c: foreign_checkpoint(c, nan="features.0.1.running_var")  # noqa: E731
    return [
        Case("test.py checkpoint with S=400", "test.py", lambda c: (
            ["test.py", huge(c), "--data", voc(c), "--device", "cpu"], [f"{c.tmp / 'foreign.pt'}: ", "S=400"])),
        Case("detect.py checkpoint with an unknown option", "detect.py", lambda c: (
            ["detect.py", foreign_checkpoint(c, {"anchors": 5}), c.image(), "--device", "cpu", "--project",
             c.runs], ["foreign.pt: model_config has an unknown option 'anchors'"])),
        Case("detect_txt.py checkpoint with NaN batch-norm variances", "detect_txt.py", lambda c: (
            ["detect_txt.py", nan(c), "--data", voc(c), "--device", "cpu", "--project", c.runs],
            ["foreign.pt: tensor 'features.0.1.running_var' holds non-finite values (nan)"])),
        Case("export.py checkpoint with NaN weights", "export.py", lambda c: (
            ["export.py", nan(c), "--include", "torchscript", "--project", c.runs],
            ["foreign.pt: tensor 'features.0.1.running_var' holds non-finite"])),
        Case("train.py --resume of a checkpoint with NaN weights", "train.py", lambda c: (
            ["train.py", "--data", voc(c), *TINY_YOLO, "--project", c.runs, "--resume", nan(c)],
            ["foreign.pt: tensor 'features.0.1.running_var' holds non-finite"])),
        Case("train.py --backbone with NaN weights", "train.py", lambda c: (
            ["train.py", "--data", voc(c), *TINY_YOLO, "--project", c.runs, "--backbone", nan(c)],
            ["foreign.pt: tensor '0.1.running_var' holds non-finite"])),
    ]


def read_only(c: Context) -> Path:
    folder = c.tmp / "read_only"
    if not folder.exists():
        folder.mkdir()
        folder.chmod(0o555)
    return folder / "runs"


CASES = [
    *data_cases("train.py", train_args), *data_cases("test.py", evaluation_args),
    *data_cases("detect_txt.py", detect_txt_args), *devkit_cases(), *imagenet_cases(), *evaluate_cases(),
    *image_script_cases(), *argument_cases(), *checkpoint_cases(), *range_cases(),
    *run_folder_cases(),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=case.marks) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_earlier_outputs_alone(scripts, good, tmp_path, case):
    context = Context(tmp_path, good)
    argv, fragments = case.build(context)
    before, entries = hashes(context.runs / "exp"), set(context.runs.iterdir())
    result = scripts.run(*argv, timeout=120)
    line = one_line_error(result, *fragments)
    assert "Traceback" not in result.stdout
    assert hashes(context.runs / "exp") == before, f"{case.id} changed the previous run folder: {line}"
    new = set(context.runs.iterdir()) - entries
    if not case.writes:
        assert not new, f"{case.id} left {sorted(p.name for p in new)} behind: {line}"


def test_a_real_process_says_the_same_as_a_forked_one(scripts, good, tmp_path):
    """The fork server is faithful: ``python train.py`` itself, started the ordinary way,
    prints the same line and exits with the same code."""
    context = Context(tmp_path, good)
    argv = ["train.py", "--data", context.voc(label="14 0.5 0.5 0.2\n"), *TINY_YOLO,
            "--project", context.runs]
    forked = scripts.run(*argv)
    real = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    real = Result(real.returncode, real.stdout, real.stderr)
    assert (real.rc, real.shown, real.stdout) == (forked.rc, forked.shown, forked.stdout) == (
        2, [one_line_error(forked)], "")
