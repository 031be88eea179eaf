"""ImageNet for Darknet pretraining: class folders, flat validation with a label file.

Images are read by :func:`images.load_image` (RGB, EXIF orientation applied), in [0, 1]
without mean/std normalisation, like the detection input the backbone is moved to.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from torchvision.transforms import v2

from images import load_image
from utils import UserError, one_line


def imagenet_transform(train: bool, img_size: int = 224, uint8: bool = False) -> v2.Compose:
    """Standard ImageNet transforms at any size: RandomResizedCrop + flip for training,
    Resize(img_size * 256 / 224) + CenterCrop for validation. Output in [0, 1] without
    mean/std normalisation, like the detection input the backbone is moved to; ``uint8``
    leaves the conversion to :func:`to_float_images` on the training device."""
    if train:
        steps = [v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(img_size * 256 / 224), antialias=True), v2.CenterCrop(img_size)]
    steps.append(v2.PILToTensor())
    return v2.Compose(steps if uint8 else [*steps, v2.ToDtype(torch.float32, scale=True)])


class ImageNetFolder(ImageFolder):
    """``ImageFolder`` with :func:`load_image` and one-line errors.

    With ``class_to_idx`` (validation in class folders) the indices follow that mapping,
    the training set's, instead of the folders present; an unknown folder is an error.
    Without it (training), an empty class folder is an error.
    """

    def __init__(self, root, transform=None, class_to_idx: dict[str, int] | None = None):
        self.fixed_classes = class_to_idx
        try:
            super().__init__(str(root), transform=transform, loader=load_image, allow_empty=True)
        except FileNotFoundError as err:
            raise UserError(f"{root}: {one_line(err)}") from None
        if class_to_idx is None:
            found = {target for _, target in self.samples}
            empty = [name for name, i in self.class_to_idx.items() if i not in found]
            if empty:
                raise UserError(f"{Path(root) / empty[0]}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} "
                                f"images){f'; {len(empty) - 1} more' if len(empty) > 1 else ''}")

    def find_classes(self, directory):
        check_class_folders(directory)
        if self.fixed_classes is None:
            return super().find_classes(directory)
        for entry in os.scandir(directory):
            if entry.is_dir() and entry.name not in self.fixed_classes:
                raise UserError(f"{entry.path}: class folder {entry.name!r} is not a training class")
        return sorted(self.fixed_classes, key=self.fixed_classes.get), dict(self.fixed_classes)


def check_class_folders(directory) -> None:
    """Refuse what would silently shift or split the classes (ids follow the sorted folder
    names): a link to a missing folder (skipped by ImageFolder: every later class id moved
    down by one) and two folders whose names differ only in case (one class read as two,
    and on a case-insensitive copy of the data set, one)."""
    seen = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_symlink() and not os.path.exists(entry.path):
            raise UserError(f"{entry.path}: a link to {os.readlink(entry.path)}, which does not exist")
        if entry.is_dir():
            twin = seen.setdefault(entry.name.lower(), entry.name)
            if twin != entry.name:
                raise UserError(f"{entry.path}: class folders {twin!r} and {entry.name!r} differ only in case: "
                                "merge or rename one")


def read_imagenet_val_labels(path: Path) -> dict[str, tuple[str, int]]:
    """Ground truth of flat validation images: image stem -> (wnid, line number).

    Kaggle's ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``, the prediction
    string starts with the wnid) or plain lines ``image wnid`` (devkit-style lists).
    """
    try:  # utf-8-sig: a spreadsheet's BOM is not part of the header
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read validation label file ({one_line(err)})") from None
    kaggle = bool(lines) and lines[0].replace(" ", "").replace('"', "").lower().startswith("imageid,")
    truth = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or (kaggle and n == 1):
            continue
        # csv: a spreadsheet quotes the fields ("ILSVRC2012_val_00000001","n01751748 ...")
        fields = next(csv.reader([line])) if kaggle else line.split()
        wnid = fields[1].split()[0] if len(fields) >= 2 and fields[1].split() else None
        if wnid is None or len(fields) != 2:
            layout = "'ImageId,PredictionString'" if kaggle else "'image wnid'"
            raise UserError(f"{path}:{n}: expected {layout}, got {line.strip()!r}")
        stem = Path(fields[0].strip()).stem
        if stem in truth and truth[stem][0] != wnid:
            raise UserError(f"{path}:{n}: {stem} is listed again with another class ({wnid}; line "
                            f"{truth[stem][1]}: {truth[stem][0]})")
        truth.setdefault(stem, (wnid, n))
    return truth


class ImageNetFlatVal(Dataset):
    """A flat folder of validation images (``ILSVRC2012_val_*.JPEG``) with a label file;
    class indices follow ``class_to_idx`` (the training set's sorted wnids)."""

    def __init__(self, val_dir, labels_file, class_to_idx: dict[str, int], transform=None):
        val_dir, labels_file = Path(val_dir), Path(labels_file)
        self.class_to_idx, self.transform = dict(class_to_idx), transform
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        truth = read_imagenet_val_labels(labels_file)
        files = sorted(p for p in val_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise UserError(f"{val_dir}: no validation images")
        self.samples, stems = [], {}
        for path in files:
            if stems.setdefault(path.stem, path) != path:  # one label line for two images
                raise UserError(f"{path}: {stems[path.stem].name} has the same name: which one is "
                                f"{path.stem} of {labels_file}? Remove one")
            if path.stem not in truth:
                raise UserError(f"{path}: not in the validation label file {labels_file}")
            wnid, line = truth[path.stem]
            if wnid not in class_to_idx:
                raise UserError(f"{labels_file}:{line}: class {wnid} is not a training class folder")
            self.samples.append((str(path), class_to_idx[wnid]))
        self.targets = [target for _, target in self.samples]
        missing = sorted(set(truth) - set(stems))
        if missing:  # a subset may be meant (a quicker validation), but not unsaid: its top-1 is not ImageNet's
            print(f"warning: {labels_file}: {len(missing)} of its {len(truth)} images are not in {val_dir} "
                  f"(the first: {missing[0]}); validating on the {len(files)} there", flush=True)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), target


def _imagenet_dirs(root: Path) -> tuple[Path, Path]:
    """(train dir, default val dir) for an ImageNet root, a Kaggle root or a train dir."""
    for base in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):
        if (base / "train").is_dir():
            return base / "train", base / "val"
    if not root.is_dir():
        raise UserError(f"{root}: ImageNet folder not found")
    return root, root.parent / "val"


def build_imagenet(root_or_train_dir, val_dir=None, val_labels=None, train: bool = True,
                   img_size: int = 224, uint8: bool = False) -> Dataset:
    """ImageNet for Darknet pretraining: the training set, or (``train=False``) validation.
    ``uint8``: training images stay uint8 (see :func:`imagenet_transform`).

    Validation images are in class folders, or flat with ``val_labels`` (found by default
    as ``LOC_val_solution.csv`` in the val folder, beside it or in the root). Class indices
    always follow the sorted wnids of the training folders.
    """
    root = Path(root_or_train_dir)
    train_dir, default_val = _imagenet_dirs(root)
    if train:
        return ImageNetFolder(train_dir, imagenet_transform(True, img_size, uint8))
    val_dir = Path(val_dir) if val_dir is not None else default_val
    if not val_dir.is_dir():
        raise UserError(f"{val_dir}: validation folder not found")
    try:
        _, class_to_idx = find_classes(str(train_dir))
    except FileNotFoundError as err:
        raise UserError(f"{train_dir}: {one_line(err)}") from None
    transform = imagenet_transform(False, img_size)
    if any(entry.is_dir() for entry in os.scandir(val_dir)):
        val_set = ImageNetFolder(val_dir, transform, class_to_idx)
        if not val_set.samples:  # else every epoch reports top-1 0 % of nothing
            raise UserError(f"{val_dir}: no validation images in its class folders")
        return val_set
    if val_labels is None:
        candidates = [d / "LOC_val_solution.csv" for d in (val_dir, val_dir.parent, root)]
        val_labels = next((c for c in candidates if c.is_file()), None)
        if val_labels is None:
            raise UserError(f"{val_dir}: flat validation folder needs a label file "
                            "(LOC_val_solution.csv or an 'image wnid' list)")
    return ImageNetFlatVal(val_dir, val_labels, class_to_idx, transform)
