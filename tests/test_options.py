"""Options that do what --help and the README say (#14 class 9)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import train
import utils
from scripts_server import ok
from synthetic import write_voc_txt_tree, write_vocdevkit_tree


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    write_voc_txt_tree(root, 16, size=64, seed=0, csv_name="train.csv")
    return root


def tiny(voc: Path, project: Path, *extra) -> list:
    return ["train.py", "--data", voc / "train.csv", "--S", 2, "--width", 0.0625, "--hidden", 16,
            "--epochs", 1, "--workers", 0, "--device", "cpu", "--optimizer", "adam", "--lr", 1e-3,
            "--project", project, "--name", "exp", *extra]


def test_accum_steps_split_the_batch_into_micro_batches(scripts, voc, tmp_path):
    """--batch-size 8 --accum-steps 2 stepped the optimiser every 16 images (2 batches of 8)
    while --help promised micro-batches: 16 images now make 2 steps of 2 micro-batches of 4."""
    result = ok(scripts.run(*tiny(voc, tmp_path, "--batch-size", 8, "--accum-steps", 2)))
    last = utils.load_checkpoint(tmp_path / "exp" / "last.pt")
    assert last["step"] == 2  # optimiser steps: one per 8 images
    assert "/4 [" in result.stderr  # the progress bar counts 4 micro-batches
    assert json.loads((tmp_path / "exp" / "metrics.jsonl").read_text())["images"] == 16


def test_no_validation_data_ends_without_minus_infinity(scripts, voc, tmp_path):
    result = ok(scripts.run(*tiny(voc, tmp_path, "--batch-size", 8)))
    assert "-inf" not in result.stdout
    assert f"done: no validation data (--val-data), so no best.pt: last.pt in {tmp_path / 'exp'}" in result.stdout


def test_demo_banner_only_for_the_demo_itself():
    """The banner described S=2, 20 epochs on data/shapes even when all were overridden."""
    assert train.demo_banner(train.parse_args([])) == train.DEMO_NOTE
    assert train.demo_banner(train.parse_args(["--recipe", "demo", "--workers", "0", "--name", "x"])) \
        == train.DEMO_NOTE  # how it runs, not what it trains
    banner = train.demo_banner(train.parse_args(["--recipe", "demo", "--S", "3", "--data", "my.csv"]))
    assert banner == "The demo recipe with --data my.csv, --S 3 instead of its own values."


def test_voc_convert_readme_command_on_a_voc2007_only_tree(scripts, tmp_path):
    """README: ``voc_convert.py --devkit VOCdevkit --out voc_txt`` failed on a VOC2007-only
    tree after writing part of its output (the default sets include 2012/trainval)."""
    write_vocdevkit_tree(tmp_path, {"2007/trainval": 3, "2007/test": 2}, size=48, seed=0)
    result = ok(scripts.run("voc_convert.py", "--devkit", tmp_path / "VOCdevkit", "--out", tmp_path / "voc_txt"))
    assert "no VOC2012, skipping 2012/trainval" in result.stdout
    csv = {name: (tmp_path / "voc_txt" / name).read_text().splitlines() for name in ("train.csv", "test.csv")}
    assert (len(csv["train.csv"]), len(csv["test.csv"])) == (4, 3)  # header + images


def test_voc_convert_checks_every_split_before_writing(scripts, tmp_path):
    write_vocdevkit_tree(tmp_path, {"2007/trainval": 2, "2007/test": 2}, size=48, seed=0)
    xml = sorted((tmp_path / "VOCdevkit" / "VOC2007" / "Annotations").iterdir())[-1]  # a test image's
    xml.write_text(xml.read_text().replace("<size>", "<nosize>").replace("</size>", "</nosize>"))
    result = scripts.run("voc_convert.py", "--devkit", tmp_path / "VOCdevkit", "--out", tmp_path / "out")
    assert result.rc == 2 and "no <size> element" in result.stderr, str(result)
    assert not (tmp_path / "out").exists()  # 2007/trainval, read first, wrote nothing either


def test_detect_takes_several_sources(scripts, voc, tmp_path):
    ckpt = tmp_path / "m.pt"
    from model import build_model
    model = build_model("yolov1", S=2, width=0.0625, hidden=16, C=20)
    utils.save_checkpoint({"kind": "yolo", "epoch": 1, "model": model.state_dict(),
                           "model_config": model.config, "class_names": list(utils.VOC_CLASSES)}, ckpt)
    images = sorted((voc / "images").iterdir())
    folder = tmp_path / "folder"
    folder.mkdir()
    for image in images[2:4]:
        (folder / image.name).write_bytes(image.read_bytes())
    result = ok(scripts.run("detect.py", ckpt, images[0], images[1], folder, images[0], "--device", "cpu",
                            "--project", tmp_path / "runs", "--conf-threshold", 0.99))
    assert result.stdout.startswith("4 images:"), result.stdout  # images[0] twice: once
    assert len(list((tmp_path / "runs" / "exp").glob("*.jpg"))) == 4
