"""The paper's training augmentation (Section 2.2) and its photometric maths.

Geometry (random scale and translation, horizontal flip) is done on uint8 images and
``tv_tensors.BoundingBoxes`` with ``torchvision.transforms.v2``; the exposure/saturation
jitter (and Darknet's hue shift, ``--hue``) is applied to a whole float batch by
:func:`to_float_images`, on the training device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F


def scale_exposure_saturation(image: torch.Tensor, exposure: float, saturation: float,
                              hue: float = 0.0) -> torch.Tensor:
    """Darknet's ``distort_image``: S and V scaled and the hue shifted by ``hue`` (a fraction
    of the colour circle) in HSV space, on one float ``(3, H, W)`` image in [0, 1], in place:
    see :func:`to_float_images`."""
    return to_float_images(image[None], photometric_factors(exposure, saturation, hue)[None])[0]


def photometric_factors(exposure: float = 1.0, saturation: float = 1.0, hue: float = 0.0) -> torch.Tensor:
    """The two multipliers of :func:`scale_exposure_saturation`, computed in double precision
    as it does, and the hue shift, for :func:`to_float_images`."""
    return torch.tensor([exposure * saturation, exposure * (1.0 - saturation), hue], dtype=torch.float64)


def to_float_images(images: torch.Tensor, factors: torch.Tensor | None = None, device=None,
                    memory_format=torch.preserve_format) -> torch.Tensor:
    """A uint8 ``(N, 3, H, W)`` batch -> float32 in [0, 1] on ``device``, with each image's
    exposure, saturation and hue changed (``factors``: ``(N, 3)`` from :func:`photometric_factors`).

    Darknet's ``random_distort_image`` scales V and S in HSV space. For a fixed hue and
    value V = max(R, G, B), every channel is ``V - S * V * k`` with k set by the hue alone,
    so scaling S by s moves each channel to ``V - s * (V - c)``, and scaling V by e scales
    all three: ``c' = e * s * c + e * (1 - s) * V``, clamped to [0, 1] as Darknet does. The
    same operations in the same order on any device, so the CPU and GPU give the same
    pixels. A float batch is converted in place (a fresh 448 x 448 float tensor per image
    costs more than the arithmetic). A hue shift needs the real conversion
    (:func:`shift_hue`), done only for the images that have one, before the clamp, as
    Darknet's ``distort_image`` shifts the hue of the scaled, unclamped HSV values."""
    images = images.to(device, non_blocking=True)
    if memory_format != torch.preserve_format:
        images = images.contiguous(memory_format=memory_format)
    if images.dtype == torch.uint8:
        images = F.to_dtype(images, torch.float32, scale=True)
    if factors is None:
        return images
    # which images turn their hue, read from the loader's host tensor: asking the device
    # would wait for it at every training step
    turned = factors[:, 2].nonzero().flatten().tolist()
    factors = factors.to(images.device, torch.float32, non_blocking=True)
    scale, shift = factors[:, :2, None, None, None].unbind(1)
    value = torch.maximum(torch.maximum(images[:, 0:1], images[:, 1:2]), images[:, 2:3]).mul_(shift)
    images = images.mul_(scale).add_(value)
    for i in turned:  # one image at a time: the paper recipe draws no hue, Darknet's .1 all
        images[i] = shift_hue(images[i], factors[i, 2])
    return images.clamp_(0.0, 1.0)


def shift_hue(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Darknet's ``rgb_to_hsv``, the hue moved by ``shift`` (wrapped into [0, 1)), then
    ``hsv_to_rgb``, on one float ``(3, H, W)`` image (values may be outside [0, 1]: they are
    clamped after). Greys (max = min) keep hue 0 and stay grey, as in Darknet."""
    r, g, b = image.unbind(0)
    value, _ = image.max(0)
    delta = value - image.min(0)[0]
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift, 1.0)
    saturation = torch.where(value != 0, delta / torch.where(value != 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    return hsv_to_rgb(hue, saturation, value)


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Darknet's ``hsv_to_rgb`` (the six sectors of the hue circle) on whole planes."""
    h6 = hue * 6
    sector = torch.floor(h6)
    f = h6 - sector
    p, q, t = value * (1 - saturation), value * (1 - saturation * f), value * (1 - saturation * (1 - f))
    sector = sector.long().remainder(6)
    table = torch.stack([torch.stack(c) for c in ((value, t, p), (q, value, p), (p, value, t),
                                                  (p, q, value), (t, p, value), (value, p, q))])  # (6, 3, H, W)
    rgb = table.gather(0, sector[None, None].expand(1, 3, *sector.shape))[0]
    return torch.where(saturation == 0, value.expand(3, *value.shape), rgb)


# The drop rule of every training target, with augmentation or without (--no-augment).
MIN_VISIBLE, MIN_SIDE = 0.25, 0.01


def keep_targets(boxes: torch.Tensor, labels: torch.Tensor, min_visible: float = MIN_VISIBLE,
                 min_side: float = MIN_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative xyxy boxes clipped to the image, and the drop rule: a box is dropped when
    less than ``min_visible`` (25 %) of its area stays inside, or when its clipped width or
    height is under ``min_side`` (1 %) of the image, as Darknet's ``fill_truth_region``
    drops every box under 1 % (``w < .01 || h < .01``) whatever the augmentation.

    One rule for both paths: the augmented samples (:meth:`YoloAugment.drop_hidden`) and
    the unaugmented ones (dataset.py, --no-augment), where a 1e-9-wide label box was
    still a training target while the augmentation dropped it. Evaluation keeps every box."""
    clipped = boxes.clamp(0.0, 1.0)
    sides = clipped[:, 2:] - clipped[:, :2]
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    visible = sides.prod(dim=1) / area.clamp(min=1e-12)
    keep = (visible >= min_visible) & (sides >= min_side).all(dim=1)
    return clipped[keep], labels[keep]


@dataclass(frozen=True)
class Draw:
    """One training sample's augmentation: the crop ``(top, left, height, width)`` of the
    original image (it may reach outside: black there) resized to the network's input,
    the horizontal flip, and the photometric factors for :func:`to_float_images`."""
    crop: tuple[int, int, int, int]
    flip: bool
    factors: torch.Tensor


def identity_draw(width: int, height: int) -> Draw:
    """No augmentation: the whole image, resized (``--no-augment``, evaluation)."""
    return Draw((0, 0, height, width), False, photometric_factors())


def apply_geometry(image: torch.Tensor, draw: Draw, img_size: int) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` image (on any device) through ``draw``'s crop, resize and flip:
    Darknet's ``crop_image`` + ``resize_image`` as one antialiased resized crop."""
    image = F.resized_crop(image, *draw.crop, [img_size, img_size], antialias=True)
    return F.horizontal_flip(image) if draw.flip else image


def _rand_scale(limit: float) -> float:
    """Darknet's ``rand_scale``: uniform in [1, limit], inverted half of the time."""
    scale = 1.0 + (limit - 1.0) * torch.rand(()).item()
    return scale if torch.rand(()).item() < 0.5 else 1.0 / scale


class YoloAugment:
    """The paper's training augmentation (Section 2.2), box-aware.

    * Random scaling by a factor in ``[1 - jitter, 1 + jitter]`` about the centre and a
      translation of up to ``jitter`` of the image size in x and y: the same mapping as
      ``v2.RandomAffine(translate=(0.2, 0.2), scale=(0.8, 1.2))``, done as one crop and
      resize of the original image (Darknet's ``crop_image`` + ``resize_image``), which also
      does the resize to ``img_size`` on uint8 and costs a third of resize + affine.
      Uncovered area is black.
    * Horizontal flip with probability ``flip``: Darknet's, not the paper's (Section 2.2 does not
      mention flipping; Darknet's ``load_data_region`` flips half the images, ``rand()%2``).
      train.py ``--no-flip`` sets it to 0.
    * Exposure and saturation scaled by up to ``exposure`` / ``saturation`` (1.5) in HSV.
    * Hue shifted by up to ``hue`` of the colour circle: Darknet's (``hue=.1`` in its cfgs),
      not the paper's; 0 by default (train.py ``--hue``).

    Drop rule (:func:`keep_targets`, also applied without augmentation): boxes are clipped
    to the image; a box is dropped when less than ``min_visible`` (25 %) of its area stays
    inside, or when its clipped width or height is under ``min_side`` (1 %) of the image
    (Darknet's ``fill_truth_region`` drops boxes under 1 % of the image).
    """

    def __init__(self, img_size: int = 448, jitter: float = 0.2, exposure: float = 1.5,
                 saturation: float = 1.5, flip: float = 0.5, min_visible: float = MIN_VISIBLE,
                 min_side: float = MIN_SIDE, hue: float = 0.0):
        self.img_size, self.jitter, self.flip = img_size, jitter, flip
        self.exposure, self.saturation, self.hue = exposure, saturation, hue
        self.min_visible, self.min_side = min_visible, min_side

    def sample(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
        """uint8 ``(3, H, W)`` image, relative xyxy boxes, labels -> the geometric part done
        on uint8 (``img_size`` square), the boxes (relative xyxy) and labels kept, and the
        photometric factors still to apply: ``(uint8 image, boxes, labels, factors)``;
        :func:`to_float_images` applies them
        (on the GPU for training: a uint8 batch is a quarter of the bytes to collate,
        pin and copy, and the per-pixel arithmetic leaves the loader's workers)."""
        height, width = image.shape[-2:]
        draw = self.draw(width, height)
        boxes, labels = self.move_boxes(boxes, labels, width, height, draw)
        return apply_geometry(image, draw, self.img_size), boxes, labels, draw.factors

    def draw(self, width: int, height: int) -> "Draw":
        """One sample's random choices for an image of ``width`` x ``height`` (from torch's
        generator, in a fixed order: a sample is the same wherever its pixels are made)."""
        scale = 1.0 + self.jitter * (2.0 * torch.rand(()).item() - 1.0)
        shift_x, shift_y = (self.jitter * (2.0 * torch.rand(2) - 1.0)).tolist()
        crop_w, crop_h = width / scale, height / scale
        left = round(width / 2 - (width / 2 + shift_x * width) / scale)
        top = round(height / 2 - (height / 2 + shift_y * height) / scale)
        flip = torch.rand(()).item() < self.flip
        exposure, saturation = _rand_scale(self.exposure), _rand_scale(self.saturation)
        # Darknet's rand_uniform(-hue, hue); drawn only when asked for, so that the paper's
        # recipe (no hue) keeps its random stream
        hue = self.hue * (2.0 * torch.rand(()).item() - 1.0) if self.hue > 0 else 0.0
        factors = photometric_factors(exposure, saturation, hue)
        return Draw((top, left, round(crop_h), round(crop_w)), flip, factors)

    def move_boxes(self, boxes: torch.Tensor, labels: torch.Tensor, width: int, height: int, draw: "Draw"):
        """Relative xyxy boxes of a ``width`` x ``height`` image through ``draw``'s crop and
        flip, then the drop rule: ``(boxes, labels)`` kept."""
        size = [self.img_size, self.img_size]
        boxes = tv_tensors.BoundingBoxes(boxes * torch.tensor([width, height, width, height]),
                                         format="XYXY", canvas_size=(height, width), clamping_mode=None)
        boxes = F.resized_crop(boxes, *draw.crop, size)
        if draw.flip:
            boxes = F.horizontal_flip(boxes)
        return self.drop_hidden(boxes.as_subclass(torch.Tensor) / self.img_size, labels)

    def drop_hidden(self, boxes: torch.Tensor, labels: torch.Tensor):
        """Clip relative xyxy boxes to the image and apply the drop rule (:func:`keep_targets`)."""
        return keep_targets(boxes, labels, self.min_visible, self.min_side)
