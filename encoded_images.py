"""Evaluation input decoded where the network runs: JPEG files are read as bytes by the
loader's workers and decoded a whole batch at a time on the device (nvJPEG on a GPU).

test.py and detect_txt.py read their images through here. The images are the ones
dataset.py's evaluation samples hold (an antialiased resize of the uint8 RGB pixels to the
network's square input, EXIF orientation applied), without a decode and a resize per image
on the host's cores, which bound a GPU's evaluation (BENCHMARKS.md section 6):

* a baseline JPEG in RGB or greyscale without an EXIF turn (every VOC photo) travels as its
  bytes and is decoded with ``torchvision.io.decode_jpeg`` on the device, the batch in one
  call. On the CPU that is libjpeg-turbo, as Pillow: the same pixels as images.load_image
  (checked by the tests); nvJPEG's inverse DCT and the GPU's resize may differ from them by
  a unit of 255 here and there (bench/bench_eval.py reports what that does to the mAP);
* anything else (PNG, CMYK JPEG, an EXIF orientation to apply) is decoded and resized by the
  worker through images.load_image, as dataset.py does.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import io
from torchvision.transforms.v2 import functional as F

from images import load_image, read_header


@dataclass
class EncodedImage:
    """One image of a batch: the file's bytes (``decoded`` False) or its pixels already at
    the network's size (uint8 ``(3, size, size)``), and the displayed ``(width, height)``."""
    index: int
    path: Path
    data: torch.Tensor
    size: tuple[int, int]
    decoded: bool


def device_decodes(path: Path) -> tuple[bool, tuple[int, int]]:
    """Whether ``decode_jpeg`` gives load_image's pixels for this file, and its displayed size."""
    header = read_header(path)
    plain = header.format == "JPEG" and header.mode in ("RGB", "L") and header.orientation == 1
    return plain, header.displayed


class EncodedImages(Dataset):
    """The images at ``paths`` as :class:`EncodedImage` items (a DataLoader with
    ``collate_fn=list`` gives lists of them, for :func:`decode_batch`)."""

    def __init__(self, paths: list[Path], size: int, decode_on_device: bool = True):
        self.paths, self.size, self.decode_on_device = list(paths), size, decode_on_device

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> EncodedImage:
        path = self.paths[index]
        plain, size = device_decodes(path)
        if plain and self.decode_on_device:
            with codecs_quietly():
                return EncodedImage(index, path, io.read_file(str(path)), size, decoded=False)
        return EncodedImage(index, path, resized_pixels(path, self.size), size, decoded=True)


@contextmanager
def codecs_quietly():
    """torchvision 0.29 deprecates its image codecs for TorchCodec, which has no batched
    nvJPEG decode yet: keep them, without the warning at every call, until it does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def resized_pixels(path: Path, size: int) -> torch.Tensor:
    """dataset.py's evaluation image: load_image, then an antialiased uint8 resize."""
    return F.resize(F.pil_to_tensor(load_image(path)), [size, size], antialias=True)


def decode_jpegs(items: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """The items' JPEG bytes decoded as RGB on ``device``, one call for the batch. nvJPEG
    refuses the whole batch when one file fails: then each is tried alone, and a file the
    device cannot decode goes through load_image (a one-line UserError if it is broken)."""
    data = [item.data for item in items]
    with codecs_quietly():
        try:
            return io.decode_jpeg(data, mode=io.ImageReadMode.RGB, device=device)
        except RuntimeError:
            images = []
            for item in items:
                try:
                    images.append(io.decode_jpeg(item.data, mode=io.ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(F.pil_to_tensor(load_image(item.path)).to(device))
            return images


def decode_batch(items: list[EncodedImage], size: int, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, 3, size, size)`` on ``device``, in the items' order."""
    encoded = [item for item in items if not item.decoded]
    pixels = dict(zip((item.index for item in encoded), decode_jpegs(encoded, device) if encoded else []))
    for index, image in pixels.items():
        pixels[index] = F.resize(image, [size, size], antialias=True)
    return torch.stack([item.data.to(device, non_blocking=True) if item.decoded else pixels[item.index]
                        for item in items])
