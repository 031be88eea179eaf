"""Images decoded where the network runs: JPEG files are read as bytes by the loader's
workers and decoded a whole batch at a time on the device (nvJPEG on a GPU), then resized
there, or cropped, resized and flipped by the training augmentation's draw.

test.py and detect_txt.py (EncodedImages) and train.py (dataset.py's ``encoded`` samples,
``--decode device``) read their images through here. The pixels are the ones dataset.py's
samples hold (EXIF orientation applied, an antialiased resize of the uint8 RGB pixels),
without a decode and a resize per image on the host's cores, which bound a GPU
(BENCHMARKS.md sections 5 and 6):

* a baseline JPEG in RGB or greyscale without an EXIF turn (every VOC photo) travels as its
  bytes and is decoded with ``torchvision.io.decode_jpeg`` on the device, the batch in one
  call. On the CPU that is libjpeg-turbo, as Pillow: the same pixels as images.load_image
  (checked by the tests); nvJPEG's inverse DCT and the GPU's resize may differ from them by
  a unit of 255 here and there (bench/bench_eval.py reports what that does to the mAP);
* anything else (PNG, CMYK JPEG, an EXIF orientation to apply) is decoded and resized by the
  worker through images.load_image, as dataset.py does.

A file the batch decoder refuses is retried alone, then read by images.load_image, which names
a broken file in one line (on the CPU a truncated JPEG is refused both ways: a test). Whether
nvJPEG refuses a truncated file as libjpeg-turbo does has not been checked (no GPU yet);
``--decode host`` is the safe choice for a data set that was never decoded whole.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import io
from torchvision.transforms.v2 import functional as F

from images import EncodedImage, load_image, read_bytes, read_header
from transforms import apply_geometry, identity_draw


def decode_on_device(choice: str, device: torch.device) -> bool:
    """``--decode`` (auto, device or host) for a network on ``device``: auto decodes on a
    GPU, and in the reading processes on the CPU (where they run beside the network)."""
    return choice == "device" or (choice == "auto" and device.type == "cuda")


def device_decodes(path: Path) -> tuple[bool, tuple[int, int]]:
    """Whether ``decode_jpeg`` gives load_image's pixels for this file, and its displayed size."""
    header = read_header(path)
    return header.plain_jpeg, header.displayed


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
            return EncodedImage(index, path, read_bytes(path), size, decoded=False)
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
    """uint8 ``(N, 3, size, size)`` on ``device``, in the items' order: each JPEG decoded,
    then through its ``draw`` (transforms.apply_geometry: the training augmentation's crop,
    resize and flip) or resized whole."""
    encoded = [item for item in items if not item.decoded]
    decoded = iter(decode_jpegs(encoded, device) if encoded else [])
    out = []
    for item in items:
        if item.decoded:
            out.append(item.data.to(device, non_blocking=True))
            continue
        draw = item.draw or identity_draw(*item.size)
        out.append(apply_geometry(next(decoded), draw, size))
    return torch.stack(out)
