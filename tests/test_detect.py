"""detect.py on images, folders and videos, with a detector whose boxes are known.

The tiny network's last layer has zero weights and a hand-set bias, so whatever the
picture, it predicts exactly two boxes (image-relative x1 y1 x2 y2):
  dog    0.9  (0, 0, 0.5, 0.5)       cell row 0, column 0, predictor 0
  person 0.6  (0.65, 0.55, 0.85, 0.95)  cell row 1, column 1, predictor 1
and the tests check where they land in pixels of each original picture.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import detect
import inference
import utils
from model import build_model
from plots import class_colour

NAMES = ["cat", "dog", "person"]
DOG, PERSON = (0.0, 0.0, 0.5, 0.5), (0.65, 0.55, 0.85, 0.95)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_model("yolov1", S=2, width=1 / 16, hidden=16, C=3)
    last = model.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        bias = last.bias.zero_().view(2, 2, 3 + 5 * 2)   # (row, column, [3 classes | 2 x 5])
        bias[0, 0, 1] = 1.0                             # Pr(dog | object) = 1
        bias[0, 0, 3:8] = torch.tensor([0.9, 0.5, 0.5, 0.5 ** 0.5, 0.5 ** 0.5])
        bias[1, 1, 2] = 1.0                             # Pr(person | object) = 1
        bias[1, 1, 8:13] = torch.tensor([0.6, 0.5, 0.5, 0.2 ** 0.5, 0.4 ** 0.5])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    utils.save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": model.config,
                           "class_names": NAMES}, path)
    return path


def expected_lines(width, height, person=True):
    def line(name, score, box):
        x1, y1, x2, y2 = (v * s for v, s in zip(box, (width, height, width, height)))
        return f"{name} {score:.6f} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}"
    return [line("dog", 0.9, DOG)] + ([line("person", 0.6, PERSON)] if person else [])


def run(checkpoint, source, tmp_path, *extra):
    """Run detect.py; returns the output folder it made."""
    runs = tmp_path / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    detect.main([str(checkpoint), str(source), "--project", str(runs), *extra])
    (made,) = set(runs.iterdir()) - before
    return made


def noise_image(width, height, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_boxes_are_in_pixels_of_the_upright_image(checkpoint, tmp_path):
    """A 200 x 100 PNG whose EXIF says 'turn 90 degrees': a viewer shows it 100 x 200."""
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image(200, 100).save(tmp_path / "turned.png", exif=exif)
    out = run(checkpoint, tmp_path / "turned.png", tmp_path, "--save-txt", "--save-json")
    assert (out / "labels" / "turned.txt").read_text().splitlines() == expected_lines(100, 200)
    record = json.loads((out / "detections.json").read_text())["images"][0]
    assert (record["file"], record["width"], record["height"]) == ("turned.png", 100, 200)
    assert [(d["class"], d["class_id"]) for d in record["detections"]] == [("dog", 1), ("person", 2)]
    assert record["detections"][0]["box"] == [0.0, 0.0, 50.0, 100.0]
    drawn = np.asarray(Image.open(out / "turned.png"))
    assert drawn.shape == (200, 100, 3)
    # The dog box's left edge, below its label, has the dog's colour.
    assert tuple(drawn[80, 0]) == class_colour(1)
    assert tuple(drawn[80, 0]) != class_colour(2)


def test_conf_threshold_and_no_outputs_unless_asked(checkpoint, tmp_path):
    noise_image(64, 48).save(tmp_path / "a.jpg")
    out = run(checkpoint, tmp_path / "a.jpg", tmp_path, "--conf-threshold", "0.7")
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg"]
    assert Image.open(out / "a.jpg").size == (64, 48)
    out2 = run(checkpoint, tmp_path / "a.jpg", tmp_path, "--conf-threshold", "0.7", "--save-txt")
    assert out2.name == "exp2"  # a second run never writes into the first one's folder
    assert (out2 / "labels" / "a.txt").read_text().splitlines() == expected_lines(64, 48, person=False)


def test_folder_reads_any_mode_and_reports_unreadable_files(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(40, 30, "RGBA").save(folder / "alpha.png")
    noise_image(50, 20, "L").save(folder / "grey.pgm")
    noise_image(30, 30, "P").save(folder / "palette.bmp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image")
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(detect.main, [str(checkpoint), str(folder), "--project", str(tmp_path / "runs"),
                                    "--save-json", "--batch-size", "2"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 4 images could not be read") and "broken.jpg" in last
    out = tmp_path / "runs" / "exp"
    # A .pgm cannot hold colour boxes: its drawn copy is a PNG beside the original name.
    assert sorted(p.name for p in out.iterdir()) == ["alpha.png", "detections.json", "grey.pgm.png",
                                                     "palette.bmp"]
    records = json.loads((out / "detections.json").read_text())["images"]
    sizes = {r["file"]: (r["width"], r["height"]) for r in records}
    assert sizes == {"alpha.png": (40, 30), "grey.pgm": (50, 20), "palette.bmp": (30, 30)}
    assert Image.open(out / "grey.pgm.png").mode == "RGB"


def make_video(path, frames=5, width=64, height=48, rotation=0):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            pixels = np.full((height, width, 3), 10 * i, dtype=np.uint8)
            pixels[:10, :20] = 255  # a white mark in the stored frame's top-left corner
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def read_video(path):
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def test_video_frames_are_detected_drawn_and_turned_upright(checkpoint, tmp_path):
    """A 128 x 96 video marked 'rotate 90 degrees' plays as 96 x 128 (an .mov: AVI files
    cannot carry a rotation); the drawn copy is an .mp4 beside the original name."""
    pytest.importorskip("av")
    if not hasattr(__import__("av").video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display rotation")
    make_video(tmp_path / "clip.mov", width=128, height=96, rotation=90)
    out = run(checkpoint, tmp_path / "clip.mov", tmp_path, "--save-txt", "--save-json", "--batch-size", "2")
    frames = read_video(out / "clip.mov.mp4")
    assert len(frames) == 5 and frames[0].shape == (128, 96, 3)
    # Turned a quarter counter-clockwise (PyAV's sense of the angle), the top-left mark
    # is now at the bottom left (rows 108-127, columns 0-9); turned the other way it
    # would be at the top right (rows 0-19, columns 86-95). No box or label is there.
    assert frames[0][112:124, 2:8].mean() > 200 and frames[0][4:16, 88:94].mean() < 60
    records = json.loads((out / "detections.json").read_text())["images"]
    assert [(r["file"], r["frame"], r["width"], r["height"]) for r in records] == \
        [("clip.mov", i, 96, 128) for i in range(5)]
    assert (out / "labels" / "clip_000004.txt").read_text().splitlines() == expected_lines(96, 128)


def test_nothing_readable_leaves_no_output_folder(checkpoint, tmp_path, capsys):
    """When no image can be read there is nothing to keep: the new run folder goes too,
    and a folder from an earlier run is untouched."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"not an image")
    earlier = tmp_path / "runs" / "exp"
    earlier.mkdir(parents=True)
    (earlier / "keep.txt").write_text("an earlier run")
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(detect.main, [str(checkpoint), str(folder), "--project", str(tmp_path / "runs"),
                                    "--save-txt", "--save-json"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: none of the 2 images could be read; the first: ") and "a.jpg" in last
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp"]
    assert [p.name for p in earlier.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("case", ["missing source", "not a checkpoint", "darknet checkpoint",
                                  "bad threshold", "unreadable image", "unreadable video"])
def test_bad_input_is_one_line_and_exit_2(case, checkpoint, tmp_path, capsys):
    image = tmp_path / "a.png"
    noise_image(32, 32).save(image)
    args = {"missing source": [checkpoint, tmp_path / "nothing.jpg"],
            "not a checkpoint": [image, image],
            "darknet checkpoint": [tmp_path / "darknet.pt", image],
            "bad threshold": [checkpoint, image, "--conf-threshold", "2"],
            "unreadable image": [checkpoint, tmp_path / "bad.jpg"],
            "unreadable video": [checkpoint, tmp_path / "bad.mp4"]}[case]
    torch.save({"kind": "darknet", "model": {}}, tmp_path / "darknet.pt")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    (tmp_path / "bad.mp4").write_bytes(b"garbage")
    if case == "unreadable video":
        pytest.importorskip("av")
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(detect.main, [str(a) for a in args] + ["--project", str(tmp_path / "runs")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_video_without_pyav_is_a_one_line_error_before_any_output(checkpoint, tmp_path, capsys, monkeypatch):
    import importlib.util

    (tmp_path / "clip.mp4").write_bytes(b"not decoded: PyAV is missing")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "av" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(detect.main, [str(checkpoint), str(tmp_path / "clip.mp4"),
                                    "--project", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: reading videos needs the 'av' package: pip install av\n"
    assert not (tmp_path / "runs").exists()


def test_a_stream_url_is_read_like_a_video_and_named_after_itself(checkpoint, tmp_path, capsys):
    """A URL (here PyAV's file: protocol, standing in for rtsp:// or http://) is a Stream:
    its frames are detected as they arrive and its drawn copy is named after the URL. A
    stream has no end: --backend auto runs it under onnxruntime (the same two boxes)."""
    pytest.importorskip("av")
    make_video(tmp_path / "clip.mp4", frames=4)
    url = f"file:{tmp_path / 'clip.mp4'}"
    (images, (stream,)) = detect.list_sources(url)
    assert images == [] and stream.url == url and stream.format is None
    out = run(checkpoint, url, tmp_path, "--save-json", "--save-txt", "--batch-size", "3")
    name = stream.name
    assert name.endswith("clip.mp4") and "/" not in name and ":" not in name
    assert len(read_video(out / f"{name}.mp4")) == 4
    records = json.loads((out / "detections.json").read_text())["images"]
    assert [(r["file"], r["frame"]) for r in records] == [(name, i) for i in range(4)]
    assert (out / "labels" / f"{name}_000003.txt").read_text().splitlines() == expected_lines(64, 48)
    printed = capsys.readouterr().out
    if inference.onnx_missing() is None:
        assert "included; onnxruntime (CPU, exported in-process, checked on the first batch))" in printed, printed


def test_a_character_device_is_a_camera():
    """/dev/video0 and its kind are cameras for PyAV's v4l2 input (here /dev/null, which
    every Linux has: it then fails to open as a one-line error, not a traceback)."""
    import os
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    (images, (camera,)) = detect.list_sources("/dev/null")
    assert images == [] and camera.format == "v4l2" and camera.name == "dev_null"


def test_ctrl_c_keeps_the_frames_done(checkpoint, tmp_path, monkeypatch, capsys):
    """Ctrl-C ends a camera: the frames detected so far stay in a finished .mp4 and in
    detections.json, and the run reports them (not a traceback, not an empty folder)."""
    pytest.importorskip("av")
    make_video(tmp_path / "clip.mp4", frames=9)
    real_predict, calls = detect.predict.predict_images, []

    def interrupted_predict(model, images, args):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_predict(model, images, args)

    monkeypatch.setattr(detect.predict, "predict_images", interrupted_predict)
    out = run(checkpoint, tmp_path / "clip.mp4", tmp_path, "--save-json", "--batch-size", "2")
    assert len(read_video(out / "clip.mp4")) == 4
    assert len(json.loads((out / "detections.json").read_text())["images"]) == 4
    captured = capsys.readouterr()
    assert "stopped after 4 frames (Ctrl-C)" in captured.err + captured.out
    assert "1 video (4 frames)" in captured.out


def test_video_is_read_and_written_frame_by_frame(checkpoint, tmp_path, monkeypatch, capsys):
    """A video is never held whole in memory: when the network gets a batch, only that
    batch has been decoded (guards against reading every frame first), and the frames
    per second are printed."""
    pytest.importorskip("av")
    make_video(tmp_path / "clip.mp4", frames=7)
    decoded, at_predict = [], []
    real_frames, real_predict = detect.video_frames, detect.predict.predict_images

    def counting_frames(*args):
        for frame in real_frames(*args):
            decoded.append(frame)
            yield frame

    def recording_predict(model, images, args):
        at_predict.append((len(decoded), len(images)))
        return real_predict(model, images, args)

    monkeypatch.setattr(detect, "video_frames", counting_frames)
    monkeypatch.setattr(detect.predict, "predict_images", recording_predict)
    out = run(checkpoint, tmp_path / "clip.mp4", tmp_path, "--batch-size", "2")
    assert at_predict == [(2, 2), (4, 2), (6, 2), (7, 1)]
    assert len(read_video(out / "clip.mp4")) == 7
    assert "frames/s end to end" in capsys.readouterr().out
