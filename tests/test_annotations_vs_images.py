"""Annotations against their images (#14 class 5): EXIF orientation, image sizes, <size>.

Every image here is a real file written by Pillow with an EXIF orientation (tag 0x0112); the
expected boxes are found in the decoded pixels, not computed by the code under test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import voc_convert
from dataset import VOCDevkitDataset
from voc_txt import read_label_file
from images import EXIF_ORIENTATION, image_size, load_image, orient_boxes, read_header
from utils import UserError

STORED = (60, 40)                    # width, height of the pixels as the files store them
RED = (10, 5, 30, 15)                # a red rectangle in the stored grid, continuous xyxy


def write_image(path: Path, orientation: int) -> Path:
    """A 60 x 40 stored image, red rectangle RED on black, with EXIF ``orientation``."""
    pixels = np.zeros((STORED[1], STORED[0], 3), np.uint8)
    pixels[RED[1]:RED[3], RED[0]:RED[2]] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif, **({"quality": 100} if path.suffix == ".jpg" else {}))
    return path


def red_extent(image: Image.Image) -> tuple[int, int, int, int]:
    """Continuous xyxy extent of the red pixels of a decoded image."""
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 128) & (pixels[..., 1] < 100))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_is_the_decoded_size_for_every_orientation(tmp_path, orientation, suffix):
    """Guards two planted/found bugs: orientations 5 and 7 not swapping width and height in
    image_size, and a TIFF's size turned twice (Pillow's TIFF reader already turns it)."""
    path = write_image(tmp_path / f"a{suffix}", orientation)
    header = read_header(path)
    assert (header.stored, header.orientation) == (STORED, orientation)
    assert header.format == {".jpg": "JPEG", ".png": "PNG", ".tif": "TIFF"}[suffix]
    # only a JPEG without a turn is decoded on the device (encoded_images.py) as it is
    assert header.plain_jpeg == (suffix == ".jpg" and orientation == 1)
    turned = orientation in (5, 6, 7, 8)
    assert image_size(path) == load_image(path).size == ((40, 60) if turned else (60, 40))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_boxes_moves_a_box_as_exif_transpose_moves_its_pixels(tmp_path, orientation):
    path = write_image(tmp_path / "a.png", orientation)
    moved = orient_boxes(np.array([RED], np.float32), orientation, STORED)
    assert moved.tolist() == [list(red_extent(load_image(path)))]


def xml_text(width: int, height: int, box=RED) -> str:
    x1, y1, x2, y2 = box  # devkit pixels: first and last pixel, 1-based
    return (f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<object><name>dog</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
            f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>")


def one_image_devkit(root: Path, orientation: int, size: tuple[int, int], box=RED) -> Path:
    year = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / sub).mkdir(parents=True)
    write_image(year / "JPEGImages" / "000001.jpg", orientation)
    (year / "Annotations" / "000001.xml").write_text(xml_text(*size, box))
    (year / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    return root / "VOCdevkit"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_xml_of_a_tool_that_ignored_exif_is_turned_with_the_image(tmp_path, orientation, capsys):
    """The phone-photo bug: <size> and boxes in the stored grid of an EXIF-rotated JPEG gave
    targets that did not overlap the object. Orientations 5-8 are detected by their size and
    corrected, with one warning; 1-4 (size unchanged by the turn) are read as written."""
    devkit = one_image_devkit(tmp_path, orientation, STORED)
    data = VOCDevkitDataset(devkit, "2007/test", class_names=["dog"])
    ann = data.annotation(0)
    shown = load_image(devkit / "VOC2007" / "JPEGImages" / "000001.jpg")
    assert (ann["width"], ann["height"]) == shown.size
    err = capsys.readouterr().err
    if orientation in (5, 6, 7, 8):
        assert ann["boxes"].tolist() == [list(map(float, red_extent(shown)))]
        assert err.count("warning:") == 1 and "000001.xml" in err and "EXIF" in err
    else:
        assert ann["boxes"].tolist() == [list(map(float, RED))] and err == ""


def test_xml_giving_the_shown_size_is_used_as_written(tmp_path, capsys):
    shown_box = tuple(orient_boxes(np.array([RED], float), 6, STORED)[0].astype(int))
    devkit = one_image_devkit(tmp_path, 6, (40, 60), shown_box)
    ann = VOCDevkitDataset(devkit, "2007/test", class_names=["dog"]).annotation(0)
    assert ann["boxes"].tolist() == [list(map(float, shown_box))] and capsys.readouterr().err == ""


@pytest.mark.parametrize("size", [(30, 20), (40, 40), (61, 40)])
def test_xml_size_matching_neither_is_refused_with_both_sizes(tmp_path, size):
    """A plain wrong <size> (half the image) halved every box silently."""
    devkit = one_image_devkit(tmp_path, 6, size, (1, 1, 10, 10))
    with pytest.raises(UserError) as err:
        VOCDevkitDataset(devkit, "2007/test", class_names=["dog"])
    xml = devkit / "VOC2007" / "Annotations" / "000001.xml"
    assert str(err.value) == (f"{xml}: <size> {size[0]} x {size[1]} does not match the image "
                              f"{devkit / 'VOC2007' / 'JPEGImages' / '000001.jpg'} (40 x 60 as shown, "
                              "60 x 40 stored)")


def test_converter_writes_the_corrected_boxes(tmp_path):
    devkit = one_image_devkit(tmp_path, 8, STORED)
    voc_convert.main(["--devkit", str(devkit), "--sets", "2007/test", "--out", str(tmp_path / "out"),
                      "--names", str(write_names(tmp_path))])
    boxes, _ = read_label_file(tmp_path / "out" / "labels" / "000001.txt", 1)
    shown = load_image(devkit / "VOC2007" / "JPEGImages" / "000001.jpg")
    expected = np.array(red_extent(shown)) / [*shown.size, *shown.size]
    np.testing.assert_allclose(boxes[0], expected, atol=1e-6)


def write_names(tmp_path: Path) -> Path:
    (tmp_path / "names.txt").write_text("dog\n")
    return tmp_path / "names.txt"
