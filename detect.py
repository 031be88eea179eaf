"""Run a trained detector on an image, a folder of images or a video, and draw its boxes.

    python detect.py runs/train/demo/best.pt photo.jpg
    python detect.py best.pt photos/ a.jpg b.png --save-txt --save-json   # several sources
    python detect.py best.pt clip.mp4 --conf-threshold 0.3
    python detect.py best.pt /dev/video0 --batch-size 1   # a camera (Linux); Ctrl-C ends it
    python detect.py best.pt rtsp://camera.local/stream   # any URL PyAV opens

Everything goes to a new folder, runs/detect/exp (then exp2, exp3 ...):

* a copy of each image with the boxes drawn, under the same name (images in a format
  that cannot hold RGB, such as .pgm, get .png added), and for a video an .mp4 of its
  frames with the boxes drawn, each at its source time (an odd side gains a repeated
  last row or column: H.264 needs even sides);
* ``--save-txt``: ``labels/<image>.txt`` (for a video ``labels/<video>_<frame>.txt``,
  frames counted from 0), one line per box ``class confidence left top right bottom``:
  the detection format of evaluate.py and detect_txt.py;
* ``--save-json``: ``detections.json`` with every image or frame, its size and its boxes.

Boxes are in pixels of the original image, as a viewer shows it (EXIF orientation and a
video's rotation applied). Each box is scored for every class, Pr(class | object) *
confidence (paper Section 2, as Darknet does); scores at most ``--conf-threshold`` are
dropped, then non-maximum suppression runs per class. The default threshold (0.2) is for
looking at pictures: mAP is measured with almost no threshold (test.py, 0.005). Videos
need PyAV (``pip install av``); they are read and written frame by frame, so are cameras
and stream URLs, whose drawn copy is named after them (``video0.mp4``), until they end or
Ctrl-C (the frames done so far are kept). The network runs on inference.py's fastest
correct path for the device and the job (``--backend auto``): on the CPU, a video, a
stream or enough images (about 200 for Fast YOLO) run the loaded network exported
in-process under onnxruntime, checked against PyTorch on the first batch; fewer images,
or a GPU, PyTorch with batch norm folded into the convolutions and channels_last.
``--backend torch`` asks for the latter, ``--compile`` and ``--half`` (GPU) for
torch.compile and float16, and an ONNX file from ``export.py --raw`` runs under
onnxruntime. Folders and videos report frames per second, drawing and writing included.
An unreadable image or video (or a video damaged part-way, after the frames before the
damage) is reported and the others run; the run then ends with one error line and exit
code 2, everything done written. A folder's files that are neither images nor videos by
their suffix are named in one note.
"""
from __future__ import annotations

import argparse
import math
import re
import shutil
import stat
import sys
import time
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

import argtypes
import predict
import runs
from box_files import refuse_name_clashes
from images import load_image
from plots import draw_detections, require
from utils import UserError, run_cli
from video import VIDEO_SUFFIXES, Stream, VideoWriter, is_video_file, open_video, video_frames

# Formats Pillow writes RGB in; a drawn copy of anything else is saved as PNG.
RGB_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def build_parser() -> argparse.ArgumentParser:
    p = argtypes.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_inference_args(p, conf_threshold=0.2, batch_size=8,
                               conf_help="keep boxes scoring above this (for display)")
    p.add_argument("source", nargs="+", help="images, folders of images and videos, video files, "
                                                "cameras (/dev/video0) or stream URLs (rtsp://...)")
    p.add_argument("--max-det", type=argtypes.positive_int, default=100, help="at most this many boxes per image")
    p.add_argument("--save-txt", action="store_true", help="write labels/<image>.txt per image")
    p.add_argument("--save-json", action="store_true", help="write detections.json")
    p.add_argument("--line-width", type=argtypes.positive_int, help="box line width in pixels (default: from the image size)")
    p.add_argument("--project", default="runs/detect", help="parent of the output folder")
    p.add_argument("--name", default="exp", help="output folder name; exp2, exp3 ... if taken")
    return p


def list_sources(source: str) -> tuple[list[Path], list]:
    """``(images, videos)`` of a file or a folder (its files only, sorted by name), or a
    camera or URL as one :class:`Stream`."""
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", source) or source.startswith("file:"):
        return [], [Stream(source)]
    path = Path(source)
    if path.exists() and stat.S_ISCHR(path.stat().st_mode):
        return [], [Stream(source, "v4l2")]
    if path.is_file():
        return ([], [path]) if is_video_file(path) else ([path], [])
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMG_EXTENSIONS]
    videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    if not images and not videos:
        raise UserError(f"{path}: no images ({' '.join(IMG_EXTENSIONS)}) or videos "
                        f"({' '.join(VIDEO_SUFFIXES)}) in this folder")
    skipped = [p.name for p in files if p.suffix.lower() not in IMG_EXTENSIONS + VIDEO_SUFFIXES]
    if skipped:  # a .gif or .jfif left out without a word looked like a detector that missed it
        print(f"note: {path}: skipped {plural(len(skipped), 'file')} not named as an image or a video "
              f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}); name a file to detect it "
              "whatever its suffix", file=sys.stderr)
    return images, videos


# --------------------------------------------------------------------------- outputs
def batches(items, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Outputs:
    """Where drawn pictures, label files and JSON records of one run go."""

    def __init__(self, out_dir: Path, names, args):
        self.dir, self.names, self.args = out_dir, names, args
        self.records: list[dict] = []
        if args.save_txt:
            (out_dir / "labels").mkdir()

    def add(self, dets: torch.Tensor, source: Path, size: tuple[int, int], frame: int | None = None) -> None:
        """Record one image's (or frame's) detections; write its label file if asked."""
        record = {"file": source.name} | ({"frame": frame} if frame is not None else {})
        record |= {"width": size[0], "height": size[1], "detections": [
            {"class": self.names[int(c)], "class_id": int(c), "score": round(s, 6),
             "box": [round(v, 2) for v in box]}
            for c, s, *box in dets.tolist()]}
        self.records.append(record)
        if self.args.save_txt:
            stem = source.stem if frame is None else f"{source.stem}_{frame:06d}"
            (self.dir / "labels" / f"{stem}.txt").write_text(label_lines(dets, self.names))

    def draw(self, image: torch.Tensor, dets: torch.Tensor) -> torch.Tensor:
        return draw_detections(image, dets, self.names, self.args.line_width)

    def finish(self, checkpoint: str) -> None:
        if self.args.save_json:
            runs.write_json(self.dir / "detections.json", {
                "checkpoint": str(checkpoint), "class_names": list(self.names),
                "conf_threshold": self.args.conf_threshold, "nms_iou": self.args.nms_iou,
                "box_format": "x1 y1 x2 y2, pixels of the original image", "images": self.records})


def label_lines(dets: torch.Tensor, names) -> str:
    """``class confidence left top right bottom`` per box: evaluate.py's detection format."""
    return "".join(f"{names[int(c)]} {s:.6f} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}\n"
                   for c, s, x1, y1, x2, y2 in dets.tolist())


def output_name(source: Path, suffixes: tuple[str, ...], default_suffix: str) -> str:
    """The source's name if its format can hold the output, else the name plus a suffix."""
    return source.name if source.suffix.lower() in suffixes else source.name + default_suffix


def output_files(images: list[Path], videos: list[Path], save_txt: bool):
    """``(file name, source)`` of every output named after a source, for refuse_name_clashes:
    ``a.jpg`` and ``a.png`` both write ``labels/a.txt``; a video's frames write
    ``labels/<video>_<frame>.txt``, which an image named that way would overwrite."""
    for path in images:
        yield output_name(path, RGB_SUFFIXES, ".png"), path
        if save_txt:
            yield f"labels/{path.stem}.txt", path
    for path in videos:
        yield output_name(path, (".mp4",), ".mp4"), path
        if save_txt:
            yield f"labels/{path.stem}_%06d.txt", path
            yield from ((f"labels/{image.stem}.txt", path) for image in images
                        if re.fullmatch(re.escape(path.stem) + r"_\d{6}", image.stem))


# --------------------------------------------------------------------------- images
def detect_images(model, paths: list[Path], outputs: Outputs, args) -> list[str]:
    """Detect, draw and save every image; returns the one-line errors of unreadable ones.

    One bad file in a folder should not stop the others, so errors are collected and
    reported at the end.
    """
    errors = []
    bar = tqdm(total=len(paths), unit="img", disable=len(paths) < 2, dynamic_ncols=True)
    for chunk in batches(paths, args.batch_size):
        images, kept = [], []
        for path in chunk:
            try:
                images.append(F.pil_to_tensor(load_image(path)))
                kept.append(path)
            except UserError as err:
                errors.append(str(err))
                if len(paths) > 1:
                    tqdm.write(f"warning: {err}", file=sys.stderr)
        for path, image, dets in zip(kept, images, predict.predict_images(model, images, args) if images else []):
            save_image(outputs.draw(image, dets), outputs.dir / output_name(path, RGB_SUFFIXES, ".png"))
            outputs.add(dets, path, (image.shape[2], image.shape[1]))  # recorded once its picture is
        bar.update(len(chunk))
    bar.close()
    return errors


def save_image(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    # Pillow's default JPEG quality (75) smears the thin box lines and the label text.
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=95)


# --------------------------------------------------------------------------- videos
def detect_video(model, path: Path, outputs: Outputs, args) -> int:
    """Detect and draw every frame of a video; returns the number of frames.

    A decoding error part-way (a corrupt file) is a UserError raised once the frames
    before it are detected, recorded and in the finished .mp4: main keeps them.
    """
    container, stream = open_video(path)
    fps = stream.average_rate or 25
    writer = VideoWriter(outputs.dir / output_name(path, (".mp4",), ".mp4"), fps)
    bar = tqdm(total=stream.frames or None, unit="frame", desc=path.name, dynamic_ncols=True)
    count, chunk, error, frames = 0, [], None, video_frames(path, container, stream)
    try:
        while True:
            try:
                chunk.append(next(frames))
            except StopIteration:
                break
            except UserError as err:  # a corrupt packet: detect the frames decoded before it
                error = err
                break
            if len(chunk) == args.batch_size:
                count = detect_frames(model, chunk, count, path, outputs, writer, bar)
                chunk = []
        count = detect_frames(model, chunk, count, path, outputs, writer, bar) if chunk else count
    except KeyboardInterrupt:
        # Ctrl-C ends a camera or a stream (or a long video): the frames done so far are
        # kept, the .mp4 is finished and the records are written, as for a video's end.
        bar.write(f"{path}: stopped after {count} frames (Ctrl-C)")
    finally:
        bar.close()
        writer.close()
        container.close()
    if error is not None:
        raise UserError(f"{error}" + (f"; kept the {plural(count, 'frame')} before it" if count else ""))
    if count == 0:
        raise UserError(f"{path}: the video has no frames")
    if stream.frames and count < stream.frames:
        tqdm.write(f"warning: {path}: {plural(count, 'frame')} decoded of the {stream.frames} its header "
                   "announces (a truncated file?)", file=sys.stderr)
    return count


def detect_frames(model, frames, first: int, path: Path, outputs: Outputs, writer: VideoWriter, bar) -> int:
    images = [image for image, _ in frames]
    for k, ((image, seconds), dets) in enumerate(zip(frames, predict.predict_images(model, images, outputs.args))):
        outputs.add(dets, path, (image.shape[2], image.shape[1]), frame=first + k)
        writer.write(outputs.draw(image, dets), seconds)
    bar.update(len(frames))
    return first + len(frames)


def job_size(images: list[Path], videos: list) -> float:
    """The images and video frames to detect, for ``--backend auto`` to weigh against a
    faster path's start-up: a camera, a stream or a video whose header gives no frame count
    is unbounded. An unreadable video counts none here; it is reported in its turn."""
    frames = 0
    for path in videos:
        if isinstance(path, Stream):
            return math.inf
        try:
            container, stream = open_video(path)
        except UserError:
            continue
        count = stream.frames
        container.close()
        if not count:
            return math.inf
        frames += count
    return len(images) + frames


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = build_parser().parse_args(argv)
    predict.check_inference_args(args)
    found = [list_sources(source) for source in args.source]  # each checked before any work
    images, videos = (unique(p for f in found for p in f[k]) for k in (0, 1))
    if videos:
        require("av", "av", "reading videos")
    refuse_name_clashes(output_files(images, videos, args.save_txt))
    model = predict.open_runner(args)
    if args.save_txt:
        predict.check_box_file_names(model.names, args.checkpoint)
    model = predict.for_job(model, job_size(images, videos), args)
    names, start = model.names, time.perf_counter()
    outputs = Outputs(runs.make_run_dir(args.project, args.name), names, args)
    errors, stop = detect_all(model, images, videos, outputs)
    if not outputs.records:
        shutil.rmtree(outputs.dir, ignore_errors=True)  # made by this run, with nothing in it: no trace
    else:
        failed = write_json(outputs, args.checkpoint)
        report(outputs, images, videos, start, model.description)
        stop = stop or failed
    if stop is not None:
        raise stop
    if errors:
        raise UserError(failure_line(errors, images, videos, any(outputs.records)))


def detect_all(model, images: list, videos: list, outputs: Outputs) -> tuple[list[str], BaseException | None]:
    """Every source: ``(one-line errors of unreadable ones, what stopped the run or None)``.
    One bad image or video does not stop the others. Ctrl-C (in a folder of images as in a
    video) and a failed write (a full disk) stop the run; what was done is kept."""
    errors = []
    try:
        errors += detect_images(model, images, outputs, outputs.args) if images else []
        for path in videos:
            try:
                detect_video(model, path, outputs, outputs.args)
            except UserError as err:
                errors.append(str(err))
                if len(images) + len(videos) > 1:
                    tqdm.write(f"warning: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        return errors, KeyboardInterrupt()  # run_cli: "interrupted: Ctrl-C", exit code 130
    except OSError as err:
        return errors, write_failure(err, outputs, f"; what was written before is in {outputs.dir}")
    return errors, None


def write_json(outputs: Outputs, checkpoint) -> UserError | None:
    """Write detections.json (with --save-json); the error if that fails (a full disk)."""
    try:
        outputs.finish(checkpoint)
        return None
    except OSError as err:
        return write_failure(err, outputs)


def write_failure(err: OSError, outputs: Outputs, after: str = "") -> UserError:
    """The one line of a failed write (a full disk), naming the file."""
    return UserError(f"{err.filename or outputs.dir}: cannot write the results ({err.strerror or err}){after}")


def report(outputs: Outputs, images: list, videos: list, start: float, backend: str) -> None:
    """What was detected, from the records (a video that failed part-way counts its frames)."""
    frames = sum("frame" in r for r in outputs.records)
    boxes = sum(len(r["detections"]) for r in outputs.records)
    done = [plural(len(outputs.records) - frames, "image")] if images else []
    done += [f"{plural(len({r['file'] for r in outputs.records if 'frame' in r}), 'video')} "
             f"({plural(frames, 'frame')})"] if videos else []
    print(f"{' and '.join(done)}: {plural(boxes, 'box', 'boxes')} scoring above "
          f"{outputs.args.conf_threshold}; results in {outputs.dir}")
    if len(outputs.records) > 1:
        print(f"{len(outputs.records) / (time.perf_counter() - start):.1f} frames/s end to end "
              f"(reading, drawing and writing included; {backend})")


def failure_line(errors: list[str], images: list, videos: list, kept: bool) -> str:
    """The one error line of a run where some sources could not be read."""
    total = len(images) + len(videos)
    if total == 1:
        return errors[0]
    kind = "images" if not videos else "videos" if not images else "images and videos"
    if not kept:
        return f"none of the {total} {kind} could be read; the first: {errors[0]}"
    return f"{len(errors)} of {total} {kind} could not be read; the first: {errors[0]}"


def unique(sources) -> list:
    """Sources in order, each file once however it was named (``a.jpg``, ``./a.jpg``, an
    absolute path, a folder and a file in it): two spellings of one file were refused
    as two files whose outputs clash."""
    seen = {}
    for source in sources:
        seen.setdefault(source.resolve() if isinstance(source, Path) else source, source)
    return list(seen.values())


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


if __name__ == "__main__":
    run_cli(main)
