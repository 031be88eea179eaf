"""Reading images: the one decode path, what a file's header says, and an image's bytes for
decoding elsewhere (:class:`EncodedImage`, finished by encoded_images.py on the network's device).

Every image the project reads goes through :func:`load_image`: any Pillow mode becomes RGB
and the EXIF orientation is applied first, so label coordinates refer to the image as a
viewer shows it (the transposed image), not to the stored pixel grid. :func:`read_header`
tells the stored size and orientation without decoding, for checking annotations against
their images (dataset.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from errors import UserError, one_line

if TYPE_CHECKING:  # annotations only: reading headers needs neither
    import torch

    from transforms import Draw

EXIF_ORIENTATION = 0x0112


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB.

    16-bit greyscale (``I;16*``, and ``I`` as Pillow opens 16-bit PNGs) is scaled to 8 bits:
    Pillow's own conversion clips it at 255, which turns most of the image white. Alpha is
    dropped, as Darknet's loader does (it asks stb_image for 3 channels).
    """
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and pixels.size and not 0 <= pixels.min() <= pixels.max() <= 65535:
            raise ValueError("32-bit integer pixels beyond 16 bits: no 8-bit scale is defined; save it as 8 or 16 bits")
        pixels = pixels / 257.0
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8), "L")
    if image.mode == "F":  # Pillow's conversion truncates [0, 1] floats to 0: a black picture
        raise ValueError("32-bit float pixels: no 8-bit scale is defined; save it as 8 or 16 bits")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path) -> Image.Image:
    """Decode an image as RGB with its EXIF orientation applied: the one decode path of
    training, test.py, detect_txt.py and detect.py.

    Always at full size: JPEG's reduced-size "draft" decode (DCT scaling) gives other
    pixels than decoding and then resizing with antialiasing, so a draft decode in the
    datasets but not in detect.py gave one checkpoint two mAPs (#14). Unreadable or
    truncated files raise a one-line :class:`UserError`.
    """
    try:
        with Image.open(path) as image:
            return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: unreadable image ({one_line(err)})") from None


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: its stored pixel grid and its EXIF orientation."""
    stored: tuple[int, int]      # (width, height) of the pixels as the file stores them
    orientation: int             # EXIF orientation 1..8; 1 when absent or not a valid value
    format: str = ""             # Pillow's name of the file format ("JPEG", "PNG" ...)
    mode: str = ""               # Pillow's pixel mode as stored ("RGB", "L", "CMYK" ...)

    @property
    def plain_jpeg(self) -> bool:
        """A JPEG that ``torchvision.io.decode_jpeg`` turns into :func:`load_image`'s pixels:
        RGB or greyscale, no EXIF turn to apply (every VOC photo)."""
        return self.format == "JPEG" and self.mode in ("RGB", "L") and self.orientation == 1

    @property
    def displayed(self) -> tuple[int, int]:
        """``(width, height)`` as a viewer shows the image (and :func:`load_image` returns it):
        orientations 5-8 turn it by 90 degrees."""
        width, height = self.stored
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)


def read_header(path) -> ImageHeader:
    """The stored size and EXIF orientation of an image, without decoding its pixels.

    Pillow's TIFF reader already reports (and later loads) a TIFF with orientation 5-8
    turned, so its stored size is the reported one swapped back; counting the turn again
    on top of Pillow's gave TIFFs their size rotated twice (#14).
    """
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            orientation = orientation if orientation in range(1, 9) else 1
            width, height = image.size
            if image.format == "TIFF" and orientation in (5, 6, 7, 8):
                width, height = height, width
            return ImageHeader((width, height), orientation, image.format or "", image.mode)
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: unreadable image ({one_line(err)})") from None


def image_size(path) -> tuple[int, int]:
    """``(width, height)`` as :func:`load_image` returns it, read from the header only."""
    return read_header(path).displayed


def orient_boxes(boxes: np.ndarray, orientation: int, stored: tuple[int, int]) -> np.ndarray:
    """Boxes (K, 4) xyxy in continuous pixels of the stored grid -> the same boxes in the
    image as shown (:func:`load_image`), for EXIF orientation 1..8: each corner moves as
    Pillow's ``ImageOps.exif_transpose`` moves that pixel."""
    width, height = stored
    x, y = boxes[:, [0, 2]], boxes[:, [1, 3]]
    nx, ny = {1: (x, y), 2: (width - x, y), 3: (width - x, height - y), 4: (x, height - y),
              5: (y, x), 6: (height - y, x), 7: (height - y, width - x), 8: (y, width - x)}[orientation]
    return np.stack((nx.min(1), ny.min(1), nx.max(1), ny.max(1)), axis=1).astype(boxes.dtype)


@dataclass
class EncodedImage:
    """An image on its way to the network, made in a loader's worker and finished by
    encoded_images.decode_batch where the network runs: a plain JPEG's bytes (``decoded``
    False) with the augmentation ``draw`` to apply (transforms.Draw; None: a plain resize),
    or its pixels already finished (uint8 ``(3, size, size)``). ``size`` is the displayed
    ``(width, height)`` of the original image."""
    index: int
    path: Path
    data: torch.Tensor
    size: tuple[int, int]
    decoded: bool
    draw: Draw | None = None


def read_bytes(path) -> torch.Tensor:
    """A file's bytes as the uint8 tensor ``torchvision.io.decode_jpeg`` takes. In memory of
    its own: torchvision's ``read_file`` maps the file, and a loader's worker cannot hand such
    a tensor to the main process (its storage's descriptor is closed)."""
    import torch  # here: reading headers does not need torch

    try:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    except OSError as err:
        raise UserError(f"{path}: unreadable image ({err.strerror or one_line(err)})") from None
