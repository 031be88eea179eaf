"""Data loading: every layout written by synthetic.py and read back, the augmentation,
and the catalogue of bad input (each a one-line UserError naming the file)."""
import colorsys
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import synthetic
import transforms
import voc_convert
from dataset import VOCSource, build_image_dataset, build_voc_dataset, load_image
from imagenet import build_imagenet
from transforms import YoloAugment, scale_exposure_saturation
from utils import VOC_CLASSES, UserError, run_cli, target_to_boxes

S, SIZE = 4, 64


# --------------------------------------------------------------------------- helpers
def first_per_cell(boxes_xyxy, labels, S):
    """Expected target content, written out independently of encode_target: the first
    object in file order keeps its cell."""
    kept = {}
    for box, label in zip(boxes_xyxy, labels):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        cell = (min(int(cy * S), S - 1), min(int(cx * S), S - 1))
        kept.setdefault(cell, (int(label), list(box)))
    return sorted(kept.values())


def decoded(target):
    labels, boxes = target_to_boxes(target)
    return sorted(zip(labels.tolist(), boxes.tolist()))


def assert_same_objects(actual, expected, atol=1e-4):
    assert [a[0] for a in actual] == [e[0] for e in expected]
    np.testing.assert_allclose([a[1] for a in actual], [e[1] for e in expected], atol=atol)


def small_tree(root, labels, csv_text=None, size=(40, 30)):
    """A hand-written txt tree: ``labels`` maps a stem to its label file text."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    for stem, text in labels.items():
        Image.new("RGB", size, (90, 120, 200)).save(root / "images" / f"{stem}.jpg")
        (root / "labels" / f"{stem}.txt").write_text(text)
    if csv_text is None:
        csv_text = "".join(f"{stem}.jpg,{stem}.txt\n" for stem in labels)
    (root / "train.csv").write_text(csv_text)
    return root / "train.csv"


def user_error(func, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- txt layout
@pytest.fixture(scope="module")
def txt_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt")
    options = dict(size=96, seed=3, difficult_rate=0.3, vary_aspect=True)
    csv_path = synthetic.write_voc_txt_tree(root, 6, **options)
    return csv_path, synthetic.make_samples(6, **options)


def test_txt_layout_targets_decode_to_written_boxes(txt_tree):
    csv_path, samples = txt_tree
    data = build_voc_dataset(csv_path, S=S, img_size=SIZE)
    assert len(data) == 6 and data.class_names == VOC_CLASSES
    assert any(s.difficult.any() for s in samples)
    for (image, target), sample in zip(data, samples):
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.2
        assert target.shape == (S, S, 25)
        width, height = sample.image.size
        easy = ~sample.difficult
        relative = sample.boxes[easy] / [width, height, width, height]
        assert_same_objects(decoded(target), first_per_cell(relative, sample.labels[easy], S))


def test_txt_layout_annotation_in_pixels_without_decoding(txt_tree, monkeypatch):
    csv_path, samples = txt_tree
    data = build_voc_dataset(csv_path)
    monkeypatch.setattr(dataset, "load_image", None)  # annotation() must not decode
    for i, sample in enumerate(samples):
        ann = data.annotation(i)
        order = np.argsort(sample.difficult, kind="stable")  # difficult ones come last
        assert ann["image_id"] == f"synth_{i:06d}"
        assert (ann["width"], ann["height"]) == sample.image.size
        np.testing.assert_allclose(ann["boxes"].numpy(), sample.boxes[order], atol=1e-3)
        assert ann["labels"].tolist() == sample.labels[order].tolist()
        assert ann["difficult"].tolist() == sample.difficult[order].tolist()
        assert ann["boxes"].dtype == torch.float32 and ann["difficult"].dtype == torch.bool


def test_csv_header_is_optional_and_paths_default_beside_csv(tmp_path):
    with_header = small_tree(tmp_path, {"a": "14 0.5 0.5 0.2 0.2\n", "b": ""}, "img,label\na.jpg,a.txt\nb.jpg,b.txt\n")
    (tmp_path / "plain.csv").write_text("a.jpg,a.txt\n\nb.jpg,b.txt\n")
    assert len(build_voc_dataset(with_header)) == len(build_voc_dataset(tmp_path / "plain.csv")) == 2


def test_first_object_in_a_cell_keeps_it(tmp_path):
    csv_path = small_tree(tmp_path, {"a": "14 0.30 0.30 0.20 0.20\n7 0.32 0.31 0.40 0.40\n7 0.8 0.8 0.1 0.1\n"})
    _, target = build_voc_dataset(csv_path, S=S, img_size=SIZE)[0]
    assert_same_objects(decoded(target), [(7, [0.75, 0.75, 0.85, 0.85]), (14, [0.2, 0.2, 0.4, 0.4])])


def test_empty_label_file_is_an_image_without_objects(tmp_path):
    data = build_voc_dataset(small_tree(tmp_path, {"a": "\n"}), S=S, img_size=SIZE)
    assert data[0][1].abs().sum() == 0
    assert data.annotation(0)["boxes"].shape == (0, 4)


def test_custom_class_names_from_a_file_or_a_list(tmp_path):
    csv_path = small_tree(tmp_path, {"a": "2 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "my.names").write_text("apple\nbanana\n\ncherry\n")
    for names in (tmp_path / "my.names", ["apple", "banana", "cherry"]):
        data = build_voc_dataset(csv_path, names=names, S=S, img_size=SIZE)
        assert data.class_names == ("apple", "banana", "cherry")
        assert data[0][1].shape == (S, S, 3 + 5)
    (tmp_path / "bad.names").write_text("apple\nbanana\napple\n")
    assert "bad.names:3: class name 'apple' appears twice" in user_error(build_voc_dataset, csv_path, names=tmp_path / "bad.names")


def test_plain_image_folder_for_detection(tmp_path):
    Image.new("L", (50, 40)).save(tmp_path / "b.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    data = build_image_dataset(tmp_path, img_size=SIZE, S=S)
    assert [data.annotation(i)["image_id"] for i in range(2)] == ["a", "b"]
    assert (data.annotation(1)["width"], data.annotation(1)["height"]) == (50, 40)
    image, target = data[1]
    assert image.shape == (3, SIZE, SIZE) and target.shape == (S, S, 25) and target.sum() == 0
    (tmp_path / "empty").mkdir()
    assert "no images" in user_error(build_image_dataset, tmp_path / "empty")


# --------------------------------------------------------------------------- images
def test_any_pillow_mode_becomes_rgb(tmp_path):
    cases = {
        "l.png": (Image.new("L", (8, 8), 100), (100, 100, 100)),
        "rgba.png": (Image.new("RGBA", (8, 8), (10, 200, 30, 80)), (10, 200, 30)),
        "la.png": (Image.new("LA", (8, 8), (70, 9)), (70, 70, 70)),
        "i16.png": (Image.fromarray(np.full((8, 8), 51400, np.uint16)), (200, 200, 200)),
        "cmyk.tif": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        "p.png": (Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"), (0, 0, 255)),
    }
    for name, (image, rgb) in cases.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == (8, 8), name
        assert loaded.getpixel((4, 4)) == rgb, name


def test_exif_orientation_is_applied_and_labels_refer_to_the_turned_image(tmp_path):
    upright = Image.new("RGB", (60, 80), (128, 128, 128))
    upright.paste((255, 0, 0), (0, 0, 20, 20))                # red square at the top left
    exif = Image.Exif()
    exif[0x0112] = 6                                           # "turn 90 degrees clockwise to view"
    (tmp_path / "images").mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "images" / "a.jpg", exif=exif, quality=95)
    csv_path = small_tree(tmp_path, {}, "a.jpg,a.txt\n")
    (tmp_path / "labels" / "a.txt").write_text(f"14 {10 / 60} {10 / 80} {20 / 60} {20 / 80}\n")
    data = build_voc_dataset(csv_path, S=S, img_size=SIZE)
    image, target = data[0]
    red = (image[0] > 0.7) & (image[1] < 0.3)
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert xs.float().mean() < SIZE * 20 / 60 and ys.float().mean() < SIZE * 20 / 80
    ann = data.annotation(0)
    assert (ann["width"], ann["height"]) == (60, 80)
    np.testing.assert_allclose(ann["boxes"][0].numpy(), [0, 0, 20, 20], atol=1e-3)
    assert_same_objects(decoded(target), [(14, [0, 0, 1 / 3, 0.25])])


# --------------------------------------------------------------------------- VOCdevkit and converter
SETS = {"2007/trainval": 4, "2012/trainval": 2, "2007/test": 3}


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    root = synthetic.write_vocdevkit_tree(tmp_path_factory.mktemp("devkit"), SETS, size=96, seed=5)
    return root, synthetic.make_samples(9, 96, 5, difficult_rate=0.25, vary_aspect=True)


def test_devkit_reader_mixes_years_and_keeps_difficult_for_evaluation(devkit):
    root, samples = devkit
    data = build_voc_dataset(VOCSource(root, split="2007/trainval+2012/trainval"), S=S, img_size=SIZE)
    assert len(data) == 6
    assert [data.annotation(i)["image_id"] for i in (0, 4)] == ["000001", "2012_000005"]
    assert any(s.difficult.any() for s in samples[:6])
    for i, sample in enumerate(samples[:6]):
        ann = data.annotation(i)
        assert (ann["width"], ann["height"]) == sample.image.size
        np.testing.assert_allclose(ann["boxes"].numpy(), sample.boxes, atol=1e-3)
        assert ann["difficult"].tolist() == sample.difficult.tolist()
        easy = ~sample.difficult
        relative = sample.boxes[easy] / (list(sample.image.size) * 2)
        assert_same_objects(decoded(data[i][1]), first_per_cell(relative, sample.labels[easy], S))


def test_devkit_default_splits(devkit):
    root, _ = devkit
    assert len(build_voc_dataset(root, train=True)) == 6        # every year's trainval
    assert len(build_voc_dataset(root)) == 3                    # 2007/test
    assert "VOC2007/ImageSets/Main/val.txt: split file not found" in user_error(build_voc_dataset, VOCSource(root, split="2007/val"))


def test_converter_writes_the_txt_layout(devkit, tmp_path):
    root, _ = devkit
    out = tmp_path / "voc"
    voc_convert.main(["--devkit", str(root), "--sets", "2007/trainval", "2012/trainval", "2007/test",
                      "--out", str(out)])
    source = build_voc_dataset(VOCSource(root, split="2007/trainval+2012/trainval"))
    converted = build_voc_dataset(out / "train.csv")
    assert len(converted) == 6 and len(build_voc_dataset(out / "test.csv")) == 3
    assert os.path.samefile(out / "images" / "000001.jpg", root / "VOC2007" / "JPEGImages" / "000001.jpg")
    for i in range(6):
        a, b = source.annotation(i), converted.annotation(i)
        order = np.argsort(a["difficult"].numpy(), kind="stable")
        np.testing.assert_allclose(b["boxes"].numpy(), a["boxes"].numpy()[order], atol=1e-3)
        assert b["difficult"].tolist() == a["difficult"].numpy()[order].tolist()
        assert_same_objects(decoded(converted[i][1]), decoded(source[i][1]), atol=1e-5)


def test_converter_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(voc_convert.main, ["--devkit", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: VOCdevkit folder not found"


# --------------------------------------------------------------------------- augmentation
COLOURS = {14: (255, 0, 0), 7: (0, 255, 0), 3: (0, 0, 255), 19: (255, 255, 0)}
RECTS = {14: (6, 8, 40, 36), 7: (78, 6, 120, 30), 3: (10, 80, 36, 122), 19: (70, 66, 118, 112)}


def colour_masks(image):
    """Per class, the pixels of its colour: chroma > 0.2, classified by the channels that
    stay above half of the pixel's maximum (exposure and saturation keep that)."""
    peak = image.amax(0)
    coloured = peak - image.amin(0) > 0.2
    high = image > peak / 2
    return {label: coloured & (high == torch.tensor([c > 0 for c in rgb])[:, None, None]).all(0)
            for label, rgb in COLOURS.items()}


@pytest.fixture(scope="module")
def rectangles(tmp_path_factory):
    root = tmp_path_factory.mktemp("rects")
    image = Image.new("RGB", (128, 128), (128, 128, 128))
    lines = []
    for label, rect in RECTS.items():
        image.paste(COLOURS[label], rect)
        x1, y1, x2, y2 = (v / 128 for v in rect)
        lines.append(f"{label} {(x1 + x2) / 2} {(y1 + y2) / 2} {x2 - x1} {y2 - y1}\n")
    (root / "images").mkdir()
    image.save(root / "images" / "a.png")
    csv_path = small_tree(root, {}, "a.png,a.txt\n")
    (root / "labels" / "a.txt").write_text("".join(lines))
    return csv_path


def test_augmentation_moves_boxes_with_their_objects(rectangles):
    torch.manual_seed(0)
    data = build_voc_dataset(rectangles, S=7, img_size=96, train=True)
    size = 96
    for _ in range(24):
        image, target = data[0]
        masks = colour_masks(image)
        objects = decoded(target)
        found = {label for label, _ in objects}
        for label, box in objects:
            x1, y1, x2, y2 = (round(v * size) for v in box)
            mask = masks[label]
            assert mask[y1:y2, x1:x2].float().mean() > 0.85, "box region is mostly its object's colour"
            margin = mask[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1]   # resampling blurs 1 px
            assert margin.sum() > 0.98 * mask.sum(), "the colour lies inside its box"
        for label, (x1, y1, x2, y2) in RECTS.items():
            full = (x2 - x1) * (y2 - y1) * (size / 128) ** 2
            if masks[label].sum() > 0.5 * full * 1.2 ** 2:   # half or more still visible at most zoom
                assert label in found, "a mostly visible object keeps its box"
            if masks[label].sum() < 0.15 * full * 0.8 ** 2:
                assert label not in found, "an object mostly outside is dropped"


def test_augmentation_only_when_training(rectangles):
    evaluation = build_voc_dataset(rectangles, S=S, img_size=SIZE)
    assert evaluation.augment is None
    assert torch.equal(evaluation[0][0], evaluation[0][0])
    training = build_voc_dataset(rectangles, S=S, img_size=SIZE, train=True)
    torch.manual_seed(1)
    assert not torch.equal(training[0][0], training[0][0])


def test_drop_rule():
    augment = YoloAugment(min_visible=0.25, min_side=0.01)
    boxes = torch.tensor([[-0.3, 0.1, 0.1, 0.5],      # a quarter inside: kept
                          [-0.4, 0.1, 0.1, 0.5],      # a fifth inside: dropped
                          [0.2, 0.2, 0.6, 0.205],     # 0.5 % high: dropped
                          [0.5, 0.5, 1.5, 1.5]])      # a quarter inside: kept, clipped
    kept, labels = augment.drop_hidden(boxes, torch.arange(4))
    assert labels.tolist() == [0, 3]
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.1, 0.1, 0.5], [0.5, 0.5, 1.0, 1.0]]))


def test_exposure_and_saturation_scale_v_and_s_in_hsv():
    pixels = torch.rand(3, 1, 50)
    for exposure, saturation in ((1.2, 0.7), (0.8, 1.4)):
        out = scale_exposure_saturation(pixels.clone(), exposure, saturation)
        for rgb, new in zip(pixels[:, 0].T.tolist(), out[:, 0].T.tolist()):
            h, s, v = colorsys.rgb_to_hsv(*rgb)
            expected = [min(max(c, 0), 1) for c in colorsys.hsv_to_rgb(h, s * saturation, v * exposure)]
            np.testing.assert_allclose(new, expected, atol=1e-5)


def test_uint8_samples_finished_on_the_device_equal_float_samples(rectangles):
    """The training loop's path (uint8 from the workers, to_float_images on its device)
    gives the same pixels and targets as the float samples, with and without augmentation."""
    for train in (False, True):
        floats = build_voc_dataset(rectangles, S=S, img_size=SIZE, train=train)
        uint8 = build_voc_dataset(rectangles, S=S, img_size=SIZE, train=train, uint8=True)
        batch, expected = [], []
        for i in range(len(floats)):
            torch.manual_seed(i)
            expected.append(floats[i])
            torch.manual_seed(i)
            batch.append(uint8[i])
        images, targets, factors = (torch.stack(t) for t in zip(*batch))
        assert images.dtype == torch.uint8 and factors.shape == (len(floats), 3)
        assert torch.equal(targets, torch.stack([t for _, t in expected]))
        finished = transforms.to_float_images(images, factors, memory_format=torch.channels_last)
        assert finished.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(finished, torch.stack([x for x, _ in expected]))
        assert train == bool((factors != torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).any())
        assert not factors[:, 2].any()  # no hue: the paper's augmentation has none


@pytest.mark.parametrize("exposure, saturation, hue", [(1.2, 0.7, 0.1), (0.8, 1.4, -0.07), (1.5, 1.5, 0.5),
                                                        (1.0, 1.0, -0.1)])
def test_hue_shift_is_darknets_distort_image(exposure, saturation, hue):
    """Darknet's distort_image: S and V scaled, the hue moved and wrapped, back to RGB (with
    S above 1 where the saturation says so: colorsys computes the same sectors), then clamped.
    Greys stay grey."""
    pixels = torch.rand(3, 1, 60)
    pixels[:, 0, :5] = pixels[0, 0, :5]                       # five greys
    out = scale_exposure_saturation(pixels.clone(), exposure, saturation, hue)
    for rgb, new in zip(pixels[:, 0].T.tolist(), out[:, 0].T.tolist()):
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        expected = [min(max(c, 0), 1) for c in colorsys.hsv_to_rgb((h + hue) % 1.0, s * saturation, v * exposure)]
        np.testing.assert_allclose(new, expected, atol=2e-5)
    assert torch.equal(out[0, 0, :5], out[1, 0, :5]) and torch.equal(out[1, 0, :5], out[2, 0, :5])


def test_hue_is_drawn_only_when_asked_for():
    """Darknet's rand_uniform(-hue, hue) per sample; with hue 0 (the paper's recipe) nothing
    is drawn, so every other draw stays what it was."""
    shifts = []
    for seed in range(20):
        torch.manual_seed(seed)
        shifts.append(YoloAugment(hue=0.1).draw(100, 80).factors[2].item())
        torch.manual_seed(seed)
        plain = YoloAugment().draw(100, 80)
        after_plain = torch.rand(()).item()
        torch.manual_seed(seed)
        again = YoloAugment(hue=0.1).draw(100, 80)
        assert plain.crop == again.crop and plain.flip == again.flip
        assert torch.equal(plain.factors[:2], again.factors[:2]) and plain.factors[2] == 0
        assert torch.rand(()).item() != after_plain       # one more number drawn: the hue
    assert all(-0.1 <= h <= 0.1 for h in shifts) and len(set(shifts)) == 20


def test_batched_photometric_factors_apply_per_image():
    """Each image of a batch gets its own exposure and saturation: the batch equals the
    images one at a time, which test_exposure_and_saturation_scale_v_and_s_in_hsv checks
    against colorsys."""
    images = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    scales = [(1.2, 0.7, 0.0), (0.8, 1.4, 0.05), (1.0, 1.0, -0.1)]
    factors = torch.stack([transforms.photometric_factors(e, s, h) for e, s, h in scales])
    batch = transforms.to_float_images(images, factors)
    for image, (e, s, h), out in zip(images, scales, batch):
        alone = scale_exposure_saturation(image.float() / 255, e, s, h)
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- ImageNet
@pytest.mark.parametrize("layout, label_format", [("flat", "kaggle"), ("flat", "plain"), ("folders", None)])
def test_imagenet_indices_follow_sorted_training_wnids(tmp_path, layout, label_format):
    root = synthetic.write_imagenet_tree(tmp_path, n_classes=3, n_train_per_class=2, n_val_per_class=2,
                                         size=40, seed=0, val_layout=layout, label_format=label_format)
    wnids = sorted(synthetic.SHAPE_WNIDS[s] for s in synthetic.SHAPES[:3])
    train = build_imagenet(root, img_size=32)
    assert train.classes == wnids and len(train) == 6
    image, target = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target == 0
    val_labels = root / "val_labels.txt" if label_format == "plain" else None
    val = build_imagenet(root / "train", root / "val", val_labels, train=False, img_size=32)
    truth = {}
    if layout == "flat":
        lines = (root / ("val_labels.txt" if label_format == "plain" else "LOC_val_solution.csv")).read_text().split("\n")
        truth = {line.replace(",", " ").split()[0].split(".")[0]: line.replace(",", " ").split()[1]
                 for line in lines[1 if label_format == "kaggle" else 0:] if line}
    for path, target in val.samples:
        wnid = truth.get(os.path.basename(path).split(".")[0]) or os.path.basename(os.path.dirname(path))
        assert target == wnids.index(wnid)
    assert len(val) == 6 and val[0][0].shape == (3, 32, 32)


# --------------------------------------------------------------------------- bad input
BAD_LABELS = [
    ("14 0.5 0.5 0.2\n", "a.txt:1: expected 5 values 'class_id x y w h', got 4"),
    ("14 0.5 0.5 0.2 0.2\n14 0.5 zero 0.2 0.2\n", "a.txt:2: y_center 'zero' is not a number"),
    ("20 0.5 0.5 0.2 0.2\n", "a.txt:1: class id 20 out of range: expected an integer 0..19 (20 class names)"),
    ("1.5 0.5 0.5 0.2 0.2\n", "a.txt:1: class id 1.5 out of range"),
    ("14 1.2 0.5 0.2 0.2\n", "a.txt:1: x_center 1.2 outside [0, 1]"),
    ("14 0.5 0.5 0 0.2\n", "a.txt:1: box size 0 x 0.2 must be positive"),
]


@pytest.mark.parametrize("text, message", BAD_LABELS)
def test_bad_label_lines(tmp_path, text, message):
    csv_path = small_tree(tmp_path, {"a": text})
    assert f"{tmp_path / 'labels' / 'a.txt'}:" in user_error(build_voc_dataset, csv_path)
    assert message in user_error(build_voc_dataset, csv_path)


@pytest.mark.parametrize("csv_text, message", [
    ("img,label\na.jpg,a.txt\nb.jpg,a.txt\n", "train.csv:3: image {root}/images/b.jpg not found"),
    ("a.jpg,a.txt\na.jpg,b.txt\n", "train.csv:2: label file {root}/labels/b.txt not found"),
    ("a.jpg,a.txt\na.jpg\n", "train.csv:2: expected 2 fields 'image,label', got 1"),
    ("a.jpg,a.txt\n,a.txt\n", "train.csv:2: expected 2 fields 'image,label', the image field is empty"),
])
def test_bad_csv_rows(tmp_path, csv_text, message):
    csv_path = small_tree(tmp_path, {"a": ""}, csv_text)
    assert message.format(root=tmp_path) in user_error(build_voc_dataset, csv_path)


def test_missing_csv_and_folders(tmp_path):
    assert "nope.csv: csv file not found" in user_error(build_voc_dataset, tmp_path / "nope.csv")
    assert "not found (expected a csv file" in user_error(build_voc_dataset, tmp_path / "nope")
    csv_path = small_tree(tmp_path, {"a": ""})
    assert "labels folder not found" in user_error(build_voc_dataset, VOCSource(csv_path, label_dir=tmp_path / "x"))


def test_unreadable_and_truncated_images(tmp_path):
    csv_path = small_tree(tmp_path, {"a": "", "b": ""}, size=(64, 64))
    (tmp_path / "images" / "a.jpg").write_bytes(b"this is not an image")
    data = build_voc_dataset(csv_path, S=S, img_size=SIZE)
    assert f"{tmp_path / 'images' / 'a.jpg'}: unreadable image" in user_error(data.__getitem__, 0)
    assert "unreadable image" in user_error(data.annotation, 0)
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "images" / "b.jpg", quality=95)
    whole = (tmp_path / "images" / "b.jpg").read_bytes()
    (tmp_path / "images" / "b.jpg").write_bytes(whole[:len(whole) // 2])
    assert f"{tmp_path / 'images' / 'b.jpg'}: unreadable image" in user_error(data.__getitem__, 1)


def bad_devkit(tmp_path, edit):
    root = synthetic.write_vocdevkit_tree(tmp_path, {"2007/test": 1}, size=48, seed=0)
    xml = root / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(edit(xml.read_text()))
    return root, xml


def test_xml_without_size(tmp_path):
    root, xml = bad_devkit(tmp_path, lambda t: t[:t.index("<size>")] + t[t.index("</size>") + 7:])
    assert f"{xml}: no <size> element" in user_error(build_voc_dataset, root)


def test_xml_box_outside_the_image(tmp_path):
    import re
    root, xml = bad_devkit(tmp_path, lambda t: re.sub(r"<xmax>\d+</xmax>", "<xmax>49</xmax>", t, count=1))
    assert f"{xml}: object 1" in user_error(build_voc_dataset, root)
    assert "outside the 48 x" in user_error(build_voc_dataset, root)


def test_xml_unknown_class_and_broken_xml(tmp_path):
    import re
    root, xml = bad_devkit(tmp_path, lambda t: re.sub(r"<name>\w+</name>", "<name>unicorn</name>", t, count=1))
    assert "unknown class 'unicorn'" in user_error(build_voc_dataset, root)
    xml.write_text("<annotation><size>")
    assert f"{xml}: not a readable XML file" in user_error(build_voc_dataset, root)


def test_empty_imagenet_class_folder(tmp_path):
    root = synthetic.write_imagenet_tree(tmp_path, n_classes=2, n_train_per_class=1, n_val_per_class=1, size=32)
    (root / "train" / "n01234567").mkdir()
    assert f"{root / 'train' / 'n01234567'}: empty class folder" in user_error(build_imagenet, root)


def test_val_image_missing_from_the_label_file(tmp_path):
    root = synthetic.write_imagenet_tree(tmp_path, n_classes=2, n_train_per_class=1, n_val_per_class=1, size=32)
    Image.new("RGB", (32, 32)).save(root / "val" / "ILSVRC2012_val_00000099.JPEG")
    message = user_error(build_imagenet, root, train=False)
    assert f"{root / 'val' / 'ILSVRC2012_val_00000099.JPEG'}: not in the validation label file" in message
    lines = (root / "LOC_val_solution.csv").read_text().splitlines()
    (root / "LOC_val_solution.csv").write_text("\n".join(lines[:1] + [lines[1].replace(",n0", ",n9")] + lines[2:]))
    (root / "val" / "ILSVRC2012_val_00000099.JPEG").unlink()
    assert "LOC_val_solution.csv:2: class n9" in user_error(build_imagenet, root, train=False)


def test_bundled_sample_reads(tmp_path):
    data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    names = ("8examples.csv", "100examples.csv", "train.csv", "test.csv")
    sets = {name: build_voc_dataset(os.path.join(data_dir, name), S=S, img_size=SIZE) for name in names}
    assert (len(sets["8examples.csv"]), len(sets["100examples.csv"])) == (8, 100)
    train_ids = {sets["train.csv"].annotation(i)["image_id"] for i in range(len(sets["train.csv"]))}
    test_ids = {sets["test.csv"].annotation(i)["image_id"] for i in range(len(sets["test.csv"]))}
    assert not train_ids & test_ids
    image, target = sets["8examples.csv"][1]                  # camera.jpg: greyscale JPEG
    assert image.shape == (3, SIZE, SIZE) and target[..., 20].sum() == 1
    assert build_imagenet(os.path.join(data_dir, "imagenet"), train=False, img_size=32)[0][0].shape == (3, 32, 32)
