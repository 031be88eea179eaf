"""Videos, cameras and streams, read and written a frame at a time with PyAV (FFmpeg in its
wheel): what detect.py needs to tell a video from an image, decode its frames upright with
their times, and write the drawn copy. Never the whole file in memory.
"""
from __future__ import annotations

import fractions
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from plots import require
from utils import UserError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
                  ".ts", ".mts", ".m2ts", ".3gp", ".3g2", ".ogv", ".mxf", ".vob", ".asf", ".dv", ".y4m")


@dataclass(frozen=True)


class Stream:
    """A live video source, read like a video file: a camera (a character device such as
    ``/dev/video0``: PyAV's v4l2 input, Linux) or a URL PyAV opens (``rtsp://``,
    ``http://``, ``file:``...). Frames are detected as they arrive, until the stream ends
    or Ctrl-C; ``name`` and ``stem`` name its outputs as a file's would."""
    url: str
    format: str | None = None

    @property
    def name(self) -> str:
        return re.sub(r"[^\w.-]+", "_", self.url.split("://")[-1]).strip("_.") or "stream"

    @property
    def stem(self) -> str:
        return self.name

    @property
    def suffix(self) -> str:
        return ""

    def __str__(self) -> str:
        return self.url


def is_video_file(path: Path) -> bool:
    """A file named on the command line is a video by its suffix, or, with a suffix that is
    neither an image's nor a video's, when Pillow cannot read it and PyAV finds a video
    stream in it (a camcorder's .MTS or a .ts capture was once read as a broken image)."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES or suffix in IMG_EXTENSIONS:
        return suffix in VIDEO_SUFFIXES
    from PIL import Image

    try:
        Image.open(path).close()
        return False
    except Exception:  # noqa: BLE001 (Pillow raises many classes): not an image, maybe a video
        pass
    if importlib.util.find_spec("av") is None:
        return False
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video)
    except (av.FFmpegError, OSError):
        return False


def open_video(path):
    """``(container, stream)`` of a video file or a :class:`Stream`; UserError if PyAV
    cannot read it."""
    require("av", "av", "reading videos")
    import av

    try:
        container = av.open(str(path), format=getattr(path, "format", None))
    except (av.FFmpegError, OSError) as err:
        raise UserError(f"{path}: unreadable video ({' '.join(str(err).split())})") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{path}: holds no video stream")
    return container, container.streams.video[0]


def video_frames(path: Path, container, stream):
    """``(image, seconds)`` per frame: the upright (3, H, W) uint8 picture and its
    presentation time (None when the stream gives none); a decoding error is a UserError."""
    import av

    try:
        for frame in container.decode(stream):
            image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            # The display matrix turns the stored frame counter-clockwise by ``rotation``
            # degrees (phones store portrait video as landscape frames plus this angle).
            image = torch.rot90(image, round(frame.rotation / 90) % 4, dims=(1, 2))
            seconds = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
            yield image, seconds
    except av.FFmpegError as err:
        raise UserError(f"{path}: cannot decode the video ({' '.join(str(err).split())})") from None


class VideoWriter:
    """An H.264 (or, without libx264, MPEG-4) .mp4 writer, opened at the first frame.

    Each frame keeps its source's presentation time (milliseconds), so a variable-frame-rate
    video (phones, screen captures) plays at its own pace: written at the average rate, a
    clip with pauses came out shorter than its source and out of step with its labels'
    frame times. Frames without a time (some streams) are spaced at ``fps``.
    """

    TIME_BASE = fractions.Fraction(1, 1000)

    def __init__(self, path: Path, fps):
        import av

        self.av, self.path, self.fps = av, path, fps
        self.container = self.stream = None
        self.last_pts = -1

    def write(self, image: torch.Tensor, seconds: float | None = None) -> None:
        # yuv420p stores colour for 2x2 pixel blocks: encoders need even sides. An odd side
        # gets its last row or column repeated (cropping it lost the edge of boxes there,
        # and a 1-pixel-wide video became 0 pixels wide: a traceback from the encoder).
        if image.shape[1] % 2:
            image = torch.cat((image, image[:, -1:]), dim=1)
        if image.shape[2] % 2:
            image = torch.cat((image, image[:, :, -1:]), dim=2)
        if self.container is None:
            codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
            self.container = self.av.open(str(self.path), "w")
            self.stream = self.container.add_stream(codec, rate=self.fps)
            self.stream.width, self.stream.height = image.shape[2], image.shape[1]
            self.stream.pix_fmt = "yuv420p"
            self.stream.codec_context.time_base = self.TIME_BASE
        frame = self.av.VideoFrame.from_ndarray(image.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
        pts = round(seconds * 1000) if seconds is not None else round((self.last_pts + 1) * 1000 / self.fps)
        # Encoders need strictly increasing times; decoders repeat one now and then.
        frame.pts, frame.time_base = max(pts, self.last_pts + 1), self.TIME_BASE
        self.last_pts = frame.pts
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode())  # flush the frames the encoder holds back
            self.container.close()


