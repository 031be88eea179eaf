"""Pascal VOC for detection (YOLO txt layout and VOCdevkit), class names and image reading.

The paper's augmentation is in transforms.py, ImageNet (Darknet pretraining) in imagenet.py,
the files of the two layouts in voc_txt.py (label files, csv lists) and voc_xml.py.

Detection samples are ``(image, target)``: a float32 ``(3, img_size, img_size)`` tensor in
[0, 1] (no mean/std normalisation: Darknet feeds [0, 1]) and the ``(S, S, C + 5)`` target of
:func:`utils.encode_target`. Images are squashed to a square without keeping the aspect
ratio, as Darknet's ``load_data_region`` does for YOLOv1.

Every image is read by :func:`images.load_image`: any Pillow mode becomes RGB and the EXIF
orientation is applied first, so label coordinates refer to the image as a viewer shows
it (the transposed image), not to the stored pixel grid.

Both detection datasets also describe each image for evaluation without decoding it:
:meth:`DetectionDataset.annotation` gives the original size and absolute-pixel boxes,
difficult objects included and flagged. Training targets leave difficult objects out, as
Darknet's ``voc_label.py`` does.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from images import EncodedImage, image_size, load_image, orient_boxes, read_bytes, read_header
from transforms import YoloAugment, identity_draw, keep_targets, photometric_factors, to_float_images
from utils import VOC_CLASSES, UserError, encode_target, one_line
from voc_txt import read_csv_pairs, read_label_file
from voc_xml import object_place, read_annotation, to_continuous


# --------------------------------------------------------------------------- class names
def load_class_names(names=None) -> tuple[str, ...]:
    """Class names from ``None`` (VOC's 20), a list of names, or a names file (one per line).

    The number of names sets C. Blank lines in a names file are skipped.
    """
    if names is None:
        return VOC_CLASSES
    if isinstance(names, (str, os.PathLike)):
        path = Path(names)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is no name
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read names file ({one_line(err)})") from None
        where = [(f"{path}:{n}", line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
        source = str(path)
    else:
        where = [(f"class name {n}", str(name).strip()) for n, name in enumerate(names, 1)]
        source = "class names"
    seen = set()
    for place, name in where:
        if len(name.split()) > 1:  # the box files (evaluate.py, detect_txt.py) split fields at spaces
            raise UserError(f"{place}: class name {name!r} contains a space; box files separate their "
                            "fields with spaces, so write it without (e.g. pottedplant or potted_plant)")
        if name in seen:
            raise UserError(f"{place}: class name {name!r} appears twice")
        seen.add(name)
    if not where:
        raise UserError(f"{source}: no class names")
    return tuple(name for _, name in where)


# --------------------------------------------------------------------------- detection base
@dataclass
class ImageRecord:
    """One image and its objects; boxes are relative xyxy in the EXIF-transposed image."""
    path: Path
    boxes: np.ndarray            # (K, 4) float32
    labels: np.ndarray           # (K,) int64
    difficult: np.ndarray        # (K,) bool
    size: tuple[int, int] | None = None   # (width, height), read from the header when needed


class DetectionDataset(Dataset):
    """Shared sample and annotation logic of the two VOC readers."""

    def __init__(self, records: list[ImageRecord], class_names, S: int = 7, img_size: int = 448,
                 train: bool = False):
        self.records, self.class_names = records, tuple(class_names)
        self.S, self.img_size, self.train = S, img_size, train
        self.augment = YoloAugment(img_size) if train else None
        # uint8 samples (image, target, photometric factors) for the training loop, which
        # finishes them with to_float_images on its device; float (image, target) otherwise.
        self.uint8 = False
        # encoded samples (images.EncodedImage, target, factors): JPEG bytes decoded and
        # augmented on the training device (train.py --decode device; encoded_images.py),
        # batched by collate_fn (engine.build_state gives it to the loader).
        self.encoded = False
        # Which object keeps a cell that several centres share: the first in label-file order,
        # or (True) a random one, as Darknet shuffles the boxes (randomize_boxes) each time
        # fill_truth_region loads an image. train.py's --cell-winner sets it.
        self.shuffle_boxes = False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        if self.encoded:
            return self.encoded_sample(index)
        image, target, factors = self.uint8_sample(index)
        if self.uint8:
            return image, target, factors
        return to_float_images(image[None], factors[None] if self.augment else None)[0], target

    @property
    def collate_fn(self):
        """The loader's collate function for these samples (None: PyTorch's default)."""
        return collate_encoded if self.encoded else None

    def uint8_sample(self, index: int):
        """``(uint8 image at img_size, target, photometric factors)``, decoded and augmented here."""
        record = self.records[index]
        size = (self.img_size, self.img_size)
        image = F.pil_to_tensor(load_image(record.path))
        boxes, labels = self.objects(index)
        if self.augment is not None:
            image, boxes, labels, factors = self.augment.sample(image, boxes, labels)
        else:  # resize on uint8, then convert: a quarter of the bytes to interpolate
            image, factors = F.resize(image, list(size), antialias=True), photometric_factors()
            boxes, labels = keep_targets(boxes, labels)  # the augmentation's drop rule, unaugmented
        return image, self.encode(boxes, labels), factors

    def encoded_sample(self, index: int):
        """``(images.EncodedImage, target, factors)``: a plain JPEG's bytes and its
        augmentation's draw, for encoded_images.decode_batch on the training device (the
        draws in the order uint8_sample makes them: the same sample either way); any other
        file decoded and augmented here."""
        record = self.records[index]
        header = read_header(record.path)
        if not header.plain_jpeg:
            image, target, factors = self.uint8_sample(index)
            return EncodedImage(index, record.path, image, header.displayed, decoded=True), target, factors
        width, height = header.displayed
        boxes, labels = self.objects(index)
        if self.augment is not None:
            draw = self.augment.draw(width, height)
            boxes, labels = self.augment.move_boxes(boxes, labels, width, height, draw)
        else:
            draw = identity_draw(width, height)
            boxes, labels = keep_targets(boxes, labels)
        image = EncodedImage(index, record.path, read_bytes(record.path), (width, height), False, draw)
        return image, self.encode(boxes, labels), draw.factors

    def encode(self, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Relative xyxy boxes -> the ``(S, S, C+5)`` target, in --cell-winner's order."""
        if self.shuffle_boxes and len(labels) > 1:  # after the augmentation's draws: they stay the same
            order = torch.randperm(len(labels))  # from (seed, epoch, index): distributed.SeededDataset
            boxes, labels = boxes[order], labels[order]
        return encode_target(box_convert(boxes, "xyxy", "cxcywh"), labels, self.S, len(self.class_names))

    def objects(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Relative xyxy boxes and labels of the objects training sees (not the difficult ones)."""
        record = self.records[index]
        keep = torch.from_numpy(~record.difficult)
        return torch.from_numpy(record.boxes)[keep], torch.from_numpy(record.labels)[keep]

    def target(self, index: int) -> torch.Tensor:
        """The encoded target ``(S, S, C+5)`` of an unaugmented sample, without decoding the
        image: test.py's original-project metric. Every object that is not difficult, as the
        original project counted them: the training drop rule (keep_targets) is not applied."""
        return self.encode(*self.objects(index))

    def label_digests(self) -> np.ndarray:
        """One 64-bit digest per image of what training reads for it: the image's file name,
        its boxes, classes and difficult flags, from the records parsed when the dataset was
        built (no file is read again: VOC 2007+2012 trainval's 16,551 images take about
        80 ms on 2 busy cores). engine.start_training keeps them in every checkpoint, so that
        --resume names the images whose labels changed since (resume_policy.compare_labels)."""
        digests = np.empty(len(self.records), dtype=np.int64)
        for i, record in enumerate(self.records):
            h = hashlib.blake2b(record.path.name.encode(), digest_size=8)
            for array, dtype in ((record.boxes, np.float32), (record.labels, np.int64), (record.difficult, bool)):
                h.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
            digests[i] = int.from_bytes(h.digest(), "little", signed=True)
        return digests

    def image_size(self, index: int) -> tuple[int, int]:
        """Original ``(width, height)`` (after EXIF orientation), without decoding pixels."""
        record = self.records[index]
        if record.size is None:
            record.size = image_size(record.path)
        return record.size

    def annotation(self, index: int) -> dict:
        """Ground truth of one image for evaluation, in pixels of the original image.

        ``boxes`` (K, 4) float32 xyxy, ``labels`` (K,) int64, ``difficult`` (K,) bool:
        difficult objects are included and flagged (VOC's protocol ignores them).
        """
        record = self.records[index]
        width, height = self.image_size(index)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return {"image_id": record.path.stem, "path": str(record.path), "width": width,
                "height": height, "boxes": torch.from_numpy(record.boxes) * scale,
                "labels": torch.from_numpy(record.labels), "difficult": torch.from_numpy(record.difficult)}


def collate_encoded(samples: list) -> tuple:
    """A batch of ``(EncodedImage, target, factors)`` samples: the images as a list (for
    encoded_images.decode_batch on the training device), the rest stacked."""
    items, targets, factors = zip(*samples)
    return list(items), torch.stack(targets), torch.stack(factors)


# --------------------------------------------------------------------------- YOLO txt layout
class VOCTxtDataset(DetectionDataset):
    """The YOLO txt layout of the tutorial / Kaggle VOC copy.

    ``csv_file`` lists ``image,label`` file names (header optional); images live in
    ``img_dir`` and label files in ``label_dir``. Difficult objects, if any, are in a
    parallel folder ``<label_dir>_difficult`` (same file names, same format, file optional),
    as voc_convert.py writes them: used for evaluation only. All label files are parsed
    when the dataset is built (VOC 2007+2012 trainval's 16.5k files: about 1.5 s on 2 CPU
    cores, warm disk cache), so a bad line stops the run before training starts.
    """

    def __init__(self, csv_file, img_dir=None, label_dir=None, class_names=None, S: int = 7,
                 img_size: int = 448, train: bool = False):
        csv_file = Path(csv_file)
        img_dir = Path(img_dir) if img_dir is not None else csv_file.parent / "images"
        label_dir = Path(label_dir) if label_dir is not None else csv_file.parent / "labels"
        if not csv_file.is_file():
            raise UserError(f"{csv_file}: csv file not found")
        class_names = load_class_names(class_names)
        difficult_dir = label_dir.parent / f"{label_dir.name}_difficult"
        hard = set(os.listdir(difficult_dir)) if difficult_dir.is_dir() else set()
        records = [self._record(image, label, difficult_dir / label.name if label.name in hard else None,
                                len(class_names))
                   for image, label in read_csv_pairs(csv_file, img_dir, label_dir)]
        super().__init__(records, class_names, S, img_size, train)

    @staticmethod
    def _record(image: Path, label: Path, difficult_file: Path | None, num_classes: int) -> ImageRecord:
        boxes, labels = read_label_file(label, num_classes)
        difficult = np.zeros(len(labels), dtype=bool)
        if difficult_file is not None:
            hard_boxes, hard_labels = read_label_file(difficult_file, num_classes)
            boxes, labels = np.concatenate((boxes, hard_boxes)), np.concatenate((labels, hard_labels))
            difficult = np.concatenate((difficult, np.ones(len(hard_labels), dtype=bool)))
        return ImageRecord(image, boxes, labels, difficult)


# --------------------------------------------------------------------------- VOCdevkit
def parse_split(split: str) -> list[tuple[str, str]]:
    """``"2007/trainval+2012/trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``."""
    parts = [part.strip() for part in split.split("+")]
    pairs = [tuple(part.split("/")) for part in parts]
    for part, pair in zip(parts, pairs):
        if len(pair) != 2 or not pair[0].isdigit() or not pair[1]:
            raise UserError(f"split {split!r}: {part!r} is not YEAR/SET (e.g. 2007/trainval+2012/trainval)")
    if len(set(pairs)) < len(pairs):  # every image of that set twice: refuse_repeated_ids
        raise UserError(f"split {split!r} names a set twice")
    return pairs


def voc_year_dir(root: Path, year: str) -> Path:
    """``root/VOC<year>``; ``root`` may also be that folder itself."""
    for candidate in (root / f"VOC{year}", root):
        if candidate.name == f"VOC{year}" and (candidate / "Annotations").is_dir():
            return candidate
    years = devkit_years(root) if root.is_dir() else []
    if years:  # a VOCdevkit without this year (train.py's default --split names 2007 and 2012)
        raise UserError(f"{root}: no VOC{year}/Annotations folder; this VOCdevkit has "
                        f"{', '.join(f'VOC{y}' for y in years)}: choose --split (or --sets) from those, "
                        f"e.g. {years[0]}/trainval")
    raise UserError(f"{root}: no VOC{year}/Annotations folder (expected a VOCdevkit folder)")


def read_split_ids(year_dir: Path, image_set: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<image_set>.txt`` (first field of each line)."""
    path = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        sets = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem)
        raise UserError(f"{path}: split file not found (this folder has: {', '.join(sets) or 'none'})") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise UserError(f"{path}: lists no images")
    return ids


def read_voc_xml(path: Path, class_names) -> dict:
    """A VOC annotation -> ``width``, ``height`` and ``boxes`` (K, 4) absolute xyxy in 0-based
    continuous pixels, ``labels``, ``difficult``.

    Read by :func:`voc_xml.read_annotation` (the project's one XML reader, which also checks
    that every box lies inside the image) and converted from the devkit's 1-based inclusive
    pixel indices by :func:`voc_xml.to_continuous`. An unknown class name is an error.
    """
    ann = read_annotation(path, with_size=True)
    index = {name: i for i, name in enumerate(class_names)}
    for k, name in enumerate(ann.names, 1):
        if name not in index:
            raise UserError(f"{object_place(path, k, name)}: unknown class {name!r} "
                            f"(not among the {len(index)} class names)")
    width, height = ann.size
    return {"width": int(width), "height": int(height), "boxes": to_continuous(ann.boxes).astype(np.float32),
            "labels": np.array([index[name] for name in ann.names], dtype=np.int64), "difficult": ann.difficult}


def match_image(ann: dict, xml_path: Path, image_path: Path) -> bool:
    """Check an annotation's ``<size>`` against its image, in place; True if corrected.

    * ``<size>`` is the image as shown (EXIF orientation applied): the boxes are used as
      they are. When the stored and the shown sizes are equal (no 90-degree turn, or a
      square image) nothing tells a tool that ignored EXIF from one that did not: the
      boxes are taken to be in the image as shown.
    * ``<size>`` is the stored size of an image whose EXIF orientation turns it by 90
      degrees: the annotation tool ignored EXIF (phone photos). Unambiguous, so the boxes
      are moved with the orientation (:func:`orient_boxes`) and the size swapped. The boxes
      are corrected rather than the image read without EXIF, so that every image keeps one
      frame, the one a viewer shows: detections, drawn pictures and ground truth agree.
    * anything else (a wrong size would scale every box): a :class:`UserError`.
    """
    header = read_header(image_path)
    size = (ann["width"], ann["height"])
    if size == header.displayed:
        return False
    if size == header.stored:
        ann["boxes"] = orient_boxes(ann["boxes"], header.orientation, header.stored)
        ann["width"], ann["height"] = header.displayed
        return True
    raise UserError(f"{xml_path}: <size> {size[0]} x {size[1]} does not match the image {image_path} "
                    f"({header.displayed[0]} x {header.displayed[1]} as shown, "
                    f"{header.stored[0]} x {header.stored[1]} stored)")


def read_devkit_split(root: Path, year: str, image_set: str, class_names) -> list[tuple[str, Path, dict]]:
    """``(image id, image path, read_voc_xml dict)`` for every image of one VOC year/set.

    Each ``<size>`` is checked against its image (:func:`match_image`); the annotations of
    EXIF-rotated images that give the stored size are corrected, and said so once.
    """
    year_dir = voc_year_dir(root, year)
    jpeg_dir = year_dir / "JPEGImages"
    present = set(os.listdir(jpeg_dir)) if jpeg_dir.is_dir() else set()
    items, corrected = [], []
    for image_id in read_split_ids(year_dir, image_set):
        xml_path = year_dir / "Annotations" / f"{image_id}.xml"
        if f"{image_id}.jpg" not in present:
            raise UserError(f"{jpeg_dir / (image_id + '.jpg')}: image not found (listed in {image_set}.txt)")
        ann = read_voc_xml(xml_path, class_names)
        if match_image(ann, xml_path, jpeg_dir / f"{image_id}.jpg"):
            corrected.append(xml_path)
        items.append((image_id, jpeg_dir / f"{image_id}.jpg", ann))
    if corrected:
        print(f"warning: {year}/{image_set}: {len(corrected)} of {len(items)} annotations give the stored "
              f"size of an EXIF-rotated image (the first: {corrected[0]}); their boxes were turned with "
              "the EXIF orientation to fit the image as shown", file=sys.stderr, flush=True)
    return items


def refuse_repeated_ids(seen: dict, items, split: str) -> None:
    """Record the ids of one year/set's ``items`` (:func:`read_devkit_split`) in ``seen``
    (id -> the split that listed it first); an image that two sets list is an error.

    ``2007/train+2007/trainval`` trained every train image twice, and voc_convert.py
    ``--sets 2007/trainval 2007/val`` wrote the val images into train.csv twice, without a
    word; a test image in a training set would be evaluated on after being learned."""
    for image_id, image_path, _ in items:
        first = seen.setdefault(image_id, split)
        if first != split:
            raise UserError(f"{image_path}: image {image_id} is listed by both {first} and {split}: "
                            "choose sets that do not overlap (trainval = train + val)")


class VOCDevkitDataset(DetectionDataset):
    """A ``VOCdevkit`` tree read directly: ``split`` like ``"2007/trainval+2012/trainval"``.

    All XML files of the split are parsed when the dataset is built (VOC 2007+2012
    trainval: about 2.5 s on 2 CPU cores, warm disk cache), so a bad file stops the run
    before training starts.
    """

    def __init__(self, root, split: str = "2007/test", class_names=None, S: int = 7,
                 img_size: int = 448, train: bool = False):
        root = Path(root)
        class_names = load_class_names(class_names)
        records, seen = [], {}
        for year, image_set in parse_split(split):
            items = read_devkit_split(root, year, image_set, class_names)
            refuse_repeated_ids(seen, items, f"{year}/{image_set}")
            for _, image_path, ann in items:
                scale = np.array([ann["width"], ann["height"]] * 2, dtype=np.float32)
                records.append(ImageRecord(image_path, (ann["boxes"] / scale).clip(0, 1), ann["labels"],
                                           ann["difficult"], (ann["width"], ann["height"])))
        super().__init__(records, class_names, S, img_size, train)


def devkit_years(root: Path) -> list[str]:
    """Years of the ``VOC<year>`` folders in a VOCdevkit root (or the root's own year)."""
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    return [p.name[3:] for p in folders if p.name[:3] == "VOC" and p.name[3:].isdigit()
            and (p / "Annotations").is_dir()]


@dataclass(frozen=True)
class VOCSource:
    """Where a VOC dataset's files are: what travels together from a command's arguments
    to :func:`build_voc_dataset`.

    ``data``: a csv file of the txt layout, whose ``img_dir`` and ``label_dir`` default to
    ``images/`` and ``labels/`` beside it; or a VOCdevkit folder, whose ``split`` defaults
    to every year's trainval for training (the paper's 2007+2012) and to ``2007/test``
    for evaluation. The fields a layout does not use are ignored.
    """
    data: str | os.PathLike
    img_dir: str | os.PathLike | None = None
    label_dir: str | os.PathLike | None = None
    split: str | None = None

    @classmethod
    def of(cls, args, data_arg: str = "data", split_arg: str = "split") -> "VOCSource":
        """From a command's arguments: ``--data`` (or ``data_arg``), ``--img-dir``,
        ``--label-dir`` and ``--split`` (or ``split_arg``), those it has."""
        return cls(getattr(args, data_arg), getattr(args, "img_dir", None), getattr(args, "label_dir", None),
                   getattr(args, split_arg, None))


def build_voc_dataset(source: VOCSource | str | os.PathLike, names=None, *, S: int = 7, img_size: int = 448,
                      train: bool = False, uint8: bool = False) -> DetectionDataset:
    """A VOC dataset from a :class:`VOCSource` (or just its ``data``: a csv file of the txt
    layout or a VOCdevkit folder, with the defaults).

    ``names``: a names file or list; VOC's 20 classes by default. ``train`` switches the
    augmentation on. ``uint8``: samples are ``(uint8 image, target, photometric factors)``,
    finished by :func:`to_float_images`.
    """
    source = source if isinstance(source, VOCSource) else VOCSource(source)
    path, split = Path(source.data), source.split
    if path.is_dir():
        years = devkit_years(path)
        if not years:
            raise UserError(f"{path}: not a VOCdevkit folder (no VOC<year>/Annotations inside)")
        if split is None:
            split = "+".join(f"{y}/trainval" for y in years) if train else "2007/test"
        data = VOCDevkitDataset(path, split, names, S, img_size, train)
    elif path.is_file() or path.suffix.lower() == ".csv":
        data = VOCTxtDataset(path, source.img_dir, source.label_dir, names, S, img_size, train)
    else:
        raise UserError(f"{path}: not found (expected a csv file of the txt layout or a VOCdevkit folder)")
    data.uint8 = uint8
    return data


def build_image_dataset(folder, img_size: int = 448, S: int = 7, names=None) -> DetectionDataset:
    """Every image of ``folder`` (sorted by name, not recursive), without labels: detection
    on new images. Samples are ``(image, empty target)``; :meth:`~DetectionDataset.annotation`
    gives each image's id, path and original size (and no boxes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if not paths:
        raise UserError(f"{folder}: no images ({', '.join(IMG_EXTENSIONS)})")
    records = [ImageRecord(p, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
               for p in paths]
    return DetectionDataset(records, load_class_names(names), S, img_size)
