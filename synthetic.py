"""Synthetic VOC-style and ImageNet-style data: the bundled sample in data/ and test trees.

Each image has a background (flat colour, gradient or smooth colour blobs, plus noise) and
objects of random size, aspect, position and colour; objects overlap a little at most.
The class of an object is its SHAPE alone (colours are random), so a tiny CNN can learn it.
Each shape stands for a VOC class (ids of ``utils.VOC_CLASSES``), and for an ImageNet wnid
in the ImageNet layout:

    rectangle -> 19 tvmonitor (a screen)      wnid n04404412 television
    ellipse   -> 16 sheep (a woolly body)     wnid n04254680 soccer ball
    triangle  ->  3 boat (a sail)             wnid n04147183 schooner
    cross     ->  0 aeroplane (seen above)    wnid n02690373 airliner

Everything is deterministic: image ``i`` of a call with ``seed`` is drawn from
``numpy.random.default_rng([seed, i])``, so :func:`make_samples` with the writer's
arguments gives back exactly what a writer wrote.

``python synthetic.py --out data`` regenerates the bundled sample (its photos need
scikit-image, a generation-only dependency; ``--no-photos`` leaves them out).
"""
from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import argtypes
from voc_txt import write_csv, write_label_file
from utils import VOC_CLASSES, UserError, run_cli

SHAPE_CLASSES = {"rectangle": 19, "ellipse": 16, "triangle": 3, "cross": 0}
SHAPES = tuple(SHAPE_CLASSES)
SHAPE_WNIDS = {"rectangle": "n04404412", "ellipse": "n04254680", "triangle": "n04147183",
               "cross": "n02690373"}


@dataclass
class Sample:
    """One drawn image; ``boxes`` (K, 4) are absolute xyxy pixel extents."""
    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    shapes: list[str]


# --------------------------------------------------------------------------- drawing
def random_colour(rng: np.random.Generator, saturation=(0.4, 1.0), value=(0.35, 1.0)) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb) * 255


def make_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """``(height, width, 3)`` float: a flat colour, a linear gradient or smooth blobs."""
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(random_colour(rng, (0, 0.5)), (height, width, 3)).copy()
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = ((t - t.min()) / max(np.ptp(t), 1e-9))[..., None]
        return random_colour(rng, (0, 0.6)) * (1 - t) + random_colour(rng, (0, 0.6)) * t
    grid = rng.integers(2, 6, size=2)
    cells = np.stack([random_colour(rng, (0, 0.6)) for _ in range(grid.prod())]).reshape(*grid, 3)
    blobs = Image.fromarray(cells.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(blobs, dtype=np.float64)


def place_box(rng: np.random.Generator, width: int, height: int, placed: list, size_range) -> list | None:
    """An integer box of random size and aspect inside the image that covers at most 30 %
    of any box already placed (and is covered at most 30 % by one); None if none fits."""
    side = min(width, height)
    for _ in range(30):
        base, aspect = rng.uniform(*size_range) * side, np.exp(rng.uniform(-0.5, 0.5))
        w = int(np.clip(base * aspect ** 0.5, 6, width))
        h = int(np.clip(base / aspect ** 0.5, 6, height))
        x1, y1 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        box = [x1, y1, x1 + w, y1 + h]
        if all(overlap(box, other) <= 0.3 for other in placed):
            return box
    return None


def overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, colour, rng: np.random.Generator) -> None:
    """Fill ``shape`` so that its pixels span exactly ``box`` (x1, y1, x2, y2), x2/y2 exclusive."""
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    fill = tuple(int(c) for c in colour)
    outline = tuple(int(c * 0.5) for c in colour) if rng.random() < 0.3 else None
    if shape == "rectangle":
        draw.rectangle((x1, y1, x2, y2), fill=fill, outline=outline, width=2)
    elif shape == "ellipse":
        draw.ellipse((x1, y1, x2, y2), fill=fill, outline=outline, width=2)
    elif shape == "triangle":
        corners = [(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)]   # apex up, then a random turn
        turn = rng.integers(4)
        if turn % 2:  # apex left or right: swap the roles of x and y inside the box
            corners = [(x1 + (y - y1) * (x2 - x1) / max(y2 - y1, 1), y1 + (x - x1) * (y2 - y1) / max(x2 - x1, 1))
                       for x, y in corners]
        if turn >= 2:  # apex down or right: mirror
            corners = [(x1 + x2 - x, y1 + y2 - y) for x, y in corners]
        draw.polygon(corners, fill=fill, outline=outline)
    elif shape == "cross":
        t = max(2, round(min(x2 - x1, y2 - y1) * rng.uniform(0.25, 0.4)))
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        draw.rectangle((x1, cy - t // 2, x2, cy - t // 2 + t), fill=fill)
        draw.rectangle((cx - t // 2, y1, cx - t // 2 + t, y2), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def contrasting_colour(rng: np.random.Generator, background: np.ndarray, box) -> np.ndarray:
    """A random colour at least 100 (RGB distance) from the mean background under ``box``."""
    mean = background[box[1]:box[3], box[0]:box[2]].reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        colour = random_colour(rng)
        if np.linalg.norm(colour - mean) >= 100:
            return colour
    return 255 - mean


def make_sample(rng: np.random.Generator, width: int, height: int, n_objects=(1, 4), shapes=SHAPES,
                difficult_rate: float = 0.0, size_range=(0.15, 0.5), classes=None) -> Sample:
    """One image with ``n_objects`` (inclusive range) objects of random shapes; ``classes``
    maps a shape to its class id (default :data:`SHAPE_CLASSES`, the VOC ids)."""
    classes = SHAPE_CLASSES if classes is None else classes
    background = make_background(rng, width, height)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes, names = [], []
    for _ in range(rng.integers(n_objects[0], n_objects[1] + 1)):
        box = place_box(rng, width, height, boxes, size_range)
        if box is None:
            continue
        shape = shapes[rng.integers(len(shapes))]
        draw_shape(draw, shape, box, contrasting_colour(rng, background, box), rng)
        boxes.append(box)
        names.append(shape)
    noise = rng.normal(0, rng.uniform(0, 6), size=(height, width, 3))
    image = Image.fromarray((np.asarray(image, dtype=np.float64) + noise).clip(0, 255).astype(np.uint8))
    return Sample(image, np.array(boxes, dtype=np.float64).reshape(-1, 4),
                  np.array([classes[s] for s in names], dtype=np.int64),
                  rng.random(len(names)) < difficult_rate, names)


def image_dims(rng: np.random.Generator, size, vary_aspect: bool) -> tuple[int, int]:
    """``size`` (int: square, or (width, height)); with ``vary_aspect`` one side may be 3/4."""
    width, height = (size, size) if isinstance(size, int) else size
    if vary_aspect:
        short = rng.integers(3)
        width, height = (width * 3 // 4 if short == 1 else width), (height * 3 // 4 if short == 2 else height)
    return int(width), int(height)


def make_samples(n_images: int, size=128, seed: int = 0, n_objects=(1, 4), shapes=SHAPES,
                 difficult_rate: float = 0.0, vary_aspect: bool = False, size_range=(0.15, 0.5),
                 classes=None) -> list[Sample]:
    """``n_images`` samples; image i depends only on (seed, i). ``size_range``: object
    size as a fraction of the image's shorter side; ``classes``: shape -> class id."""
    samples = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        width, height = image_dims(rng, size, vary_aspect)
        samples.append(make_sample(rng, width, height, n_objects, shapes, difficult_rate, size_range, classes))
    return samples


# --------------------------------------------------------------------------- writers
def save_sample(sample: Sample, images: Path, labels: Path, stem: str) -> tuple[str, str]:
    """Write a sample in the txt layout; difficult objects go to ``labels_difficult``."""
    sample.image.save(images / f"{stem}.jpg", quality=90)
    width, height = sample.image.size
    easy, hard = ~sample.difficult, sample.difficult
    write_label_file(labels / f"{stem}.txt", sample.boxes[easy], sample.labels[easy], width, height)
    if hard.any():
        difficult_dir = labels.parent / f"{labels.name}_difficult"
        difficult_dir.mkdir(exist_ok=True)
        write_label_file(difficult_dir / f"{stem}.txt", sample.boxes[hard], sample.labels[hard], width, height)
    return f"{stem}.jpg", f"{stem}.txt"


def save_samples(root: Path, samples: list[Sample], prefix: str) -> list[tuple[str, str]]:
    """Write samples named ``<prefix><i:06d>`` into the txt layout under ``root``."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    return [save_sample(sample, images, labels, f"{prefix}{i:06d}") for i, sample in enumerate(samples)]


def write_voc_txt_tree(root, n_images: int, size=128, seed: int = 0, csv_name: str = "train.csv",
                       prefix: str = "synth_", header: bool = True, **options) -> Path:
    """Write ``root/images``, ``root/labels`` (and ``root/labels_difficult``) and a csv.

    ``options`` go to :func:`make_samples` (``n_objects``, ``shapes``, ``difficult_rate``,
    ``vary_aspect``). Several calls with other prefixes and csv names share one tree.
    Returns the csv path.
    """
    root = Path(root)
    rows = save_samples(root, make_samples(n_images, size, seed, **options), prefix)
    write_csv(root / csv_name, rows, header)
    return root / csv_name


def voc_xml(image_id: str, sample: Sample) -> ET.ElementTree:
    """A VOC annotation of a sample. VOC's bndbox holds the first and last pixel, 1-based:
    a pixel extent x1..x2 (x2 exclusive, 0-based) is written as xmin = x1 + 1, xmax = x2."""
    width, height = sample.image.size
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for box, label, difficult in zip(sample.boxes, sample.labels, sample.difficult):
        obj = ET.SubElement(root, "object")
        for tag, value in (("name", VOC_CLASSES[label]), ("pose", "Unspecified"), ("truncated", 0),
                           ("difficult", int(difficult))):
            ET.SubElement(obj, tag).text = str(value)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box + [1, 1, 0, 0]):
            ET.SubElement(bndbox, tag).text = str(int(value))
    ET.indent(root)
    return ET.ElementTree(root)


def write_vocdevkit_tree(root, sets=None, size=128, seed: int = 0, difficult_rate: float = 0.25,
                         vary_aspect: bool = True, **options) -> Path:
    """Write ``root/VOCdevkit/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}``.

    ``sets`` maps ``"year/set"`` to an image count (default ``{"2007/trainval": 6,
    "2007/test": 4}``). The images are ``make_samples(sum(counts), size, seed,
    difficult_rate=..., vary_aspect=..., **options)`` in the order of ``sets``; ids are
    ``000001``... for 2007 and ``<year>_000001``... for other years. Returns the VOCdevkit path.
    """
    sets = sets or {"2007/trainval": 6, "2007/test": 4}
    samples = iter(make_samples(sum(sets.values()), size, seed, difficult_rate=difficult_rate,
                                vary_aspect=vary_aspect, **options))
    devkit, number = Path(root) / "VOCdevkit", 0
    for split, count in sets.items():
        year, image_set = split.split("/")
        year_dir = devkit / f"VOC{year}"
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (year_dir / sub).mkdir(parents=True, exist_ok=True)
        ids = []
        for _ in range(count):
            number += 1
            image_id = f"{number:06d}" if year == "2007" else f"{year}_{number:06d}"
            sample = next(samples)
            sample.image.save(year_dir / "JPEGImages" / f"{image_id}.jpg", quality=90)
            voc_xml(image_id, sample).write(year_dir / "Annotations" / f"{image_id}.xml")
            ids.append(image_id)
        (year_dir / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in ids))
    return devkit


def imagenet_samples(n_classes: int, count: int, size: int, seed: int):
    """``count`` images per class, one big object of the class's shape in each: yields
    (class index, k, sample), class-major."""
    if not 1 <= n_classes <= len(SHAPES):
        raise ValueError(f"n_classes must be 1..{len(SHAPES)} (one per shape)")
    for c, shape in enumerate(SHAPES[:n_classes]):
        for k in range(count):
            rng = np.random.default_rng([seed, c, k])
            yield c, k, make_sample(rng, size, size, (1, 1), (shape,), size_range=(0.4, 0.85))


def write_imagenet_tree(root, n_classes: int = 4, n_train_per_class: int = 4, n_val_per_class: int = 2,
                        size: int = 64, seed: int = 0, val_layout: str = "flat",
                        label_format: str = "kaggle") -> Path:
    """Write ``root/train/<wnid>/<wnid>_<k>.JPEG`` and validation images, either flat
    (``root/val/ILSVRC2012_val_<n>.JPEG`` with ``root/LOC_val_solution.csv``, or with
    ``label_format="plain"`` ``root/val_labels.txt`` of ``image wnid`` lines) or in class
    folders (``val_layout="folders"``). Class c is ``SHAPES[c]``, wnid ``SHAPE_WNIDS``: the
    creation order is the reverse of the sorted wnids. Returns ``root``."""
    root = Path(root)
    for c, k, sample in imagenet_samples(n_classes, n_train_per_class, size, seed):
        wnid = SHAPE_WNIDS[SHAPES[c]]
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        sample.image.save(root / "train" / wnid / f"{wnid}_{k}.JPEG", quality=90)
    val = list(imagenet_samples(n_classes, n_val_per_class, size, seed + 1))
    order = np.random.default_rng(seed).permutation(len(val))
    rows = []
    for n, index in enumerate(order, 1):
        c, _, sample = val[index]
        wnid, name = SHAPE_WNIDS[SHAPES[c]], f"ILSVRC2012_val_{n:08d}"
        folder = root / "val" / (wnid if val_layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"{name}.JPEG", quality=90)
        rows.append((name, wnid, " ".join(str(int(v)) for v in sample.boxes[0])))
    if val_layout == "flat" and label_format == "kaggle":
        lines = ["ImageId,PredictionString"] + [f"{name},{wnid} {box} " for name, wnid, box in rows]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    elif val_layout == "flat":
        (root / "val_labels.txt").write_text("".join(f"{name}.JPEG {wnid}\n" for name, wnid, _ in rows))
    return root


# --------------------------------------------------------------------------- bundled sample
# scikit-image's sample photos with boxes placed by hand (pixels of the upright photo;
# x2, y2 exclusive; class, x1, y1, x2, y2, difficult) and the EXIF orientation to store.
PHOTOS = (
    ("astronaut", 1, [("person", 18, 14, 362, 512, False)]),
    ("camera", 1, [("person", 0, 64, 332, 512, False)]),      # greyscale: stays mode L
    ("chelsea", 6, [("cat", 0, 0, 398, 300, False)]),         # stored turned, tag 6 turns it back
    ("coffee", 1, [("diningtable", 0, 0, 600, 400, True)]),   # only the table top shows: difficult
)


def write_photos(out: Path) -> list[tuple[str, str]]:
    """Save the PHOTOS as JPEG in the txt layout (needs scikit-image)."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise UserError("the bundled photos come from scikit-image: pip install scikit-image, "
                        "or pass --no-photos") from None
    rows = []
    for name, orientation, objects in PHOTOS:
        upright = Image.fromarray(getattr(skdata, name)())
        stored, exif = upright, Image.Exif()
        if orientation == 6:  # what a camera held upright-turned writes: pixels turned left
            stored, exif[0x0112] = upright.transpose(Image.Transpose.ROTATE_90), 6
        stored.save(out / "images" / f"{name}.jpg", quality=90, exif=exif)
        boxes = np.array([o[1:5] for o in objects], dtype=np.float64)
        labels = np.array([VOC_CLASSES.index(o[0]) for o in objects])
        difficult = np.array([o[5] for o in objects])
        sample = Sample(upright, boxes, labels, difficult, [o[0] for o in objects])
        rows.append(save_sample(sample, out / "images", out / "labels", name))
    return rows


def write_bundled_sample(out, photos: bool = True, n_train: int = 296, n_val: int = 48,
                         n_test: int = 100) -> None:
    """data/: the photos and ``n_train`` synthetic images in 8examples.csv, 100examples.csv
    and train.csv (the first 8 / 100 / all of them, photos first), disjoint val.csv (picks
    best.pt) and test.csv of ``n_val`` and ``n_test`` synthetic images, and a tiny ImageNet
    layout in ``imagenet/``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    photo_rows = write_photos(out) if photos else []
    train = save_samples(out, make_samples(n_train, 224, seed=1, vary_aspect=True), "shapes_")
    test = save_samples(out, make_samples(n_test, 224, seed=2, vary_aspect=True), "shapes_test_")
    val = save_samples(out, make_samples(n_val, 224, seed=4, vary_aspect=True), "shapes_val_")
    rows = photo_rows + train
    for name, part in (("8examples.csv", rows[:8]), ("100examples.csv", rows[:100]),
                       ("train.csv", rows), ("val.csv", val), ("test.csv", test)):
        write_csv(out / name, part)
    (out / "voc.names").write_text("".join(f"{name}\n" for name in VOC_CLASSES))  # the ids' names
    write_imagenet_tree(out / "imagenet", n_classes=4, n_train_per_class=12, n_val_per_class=3,
                        size=96, seed=3)
    write_easy_shapes(out / "shapes")


# One large object per image, two shapes: what a quarter-width network learns on a CPU in
# a minute or two (train.py's demo recipe), where the main sample needs far longer. Its
# classes are named for what they are, in ``names.txt`` beside the csv files (the
# ``--names`` file a user writes for their own classes): label 0 is a cross, 1 a rectangle.
# (``shapes`` keeps its order: it decides which shape each random draw gives.)
EASY_NAMES = ("cross", "rectangle")
EASY = {"n_objects": (1, 1), "size_range": (0.3, 0.6), "shapes": ("rectangle", "cross"),
        "classes": {name: i for i, name in enumerate(EASY_NAMES)}}


def write_easy_shapes(out: Path, n_train: int = 480, n_val: int = 64, n_test: int = 64) -> None:
    """``out/``: names.txt, and train.csv, val.csv and test.csv of 128 x 128 images from :data:`EASY`."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "names.txt").write_text("".join(f"{name}\n" for name in EASY_NAMES))
    for name, n, seed in (("train.csv", n_train, 5), ("val.csv", n_val, 6), ("test.csv", n_test, 7)):
        write_voc_txt_tree(out, n, size=128, seed=seed, csv_name=name, prefix=name[:-4] + "_", **EASY)


def main(argv=None) -> None:
    parser = argtypes.ArgumentParser(description="Regenerate the bundled sample data (data/).")
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.add_argument("--no-photos", action="store_true", help="leave out scikit-image's photos")
    parser.add_argument("--n-train", type=argtypes.positive_int, default=296, help="synthetic training images")
    parser.add_argument("--n-test", type=argtypes.positive_int, default=100, help="synthetic test images")
    args = parser.parse_args(argv)
    write_bundled_sample(args.out, not args.no_photos, n_train=args.n_train, n_test=args.n_test)
    print(f"wrote the sample to {args.out}/")


if __name__ == "__main__":
    run_cli(main)
