"""Red-team pass on detection as a user runs it (detect.py, detect_txt.py, export.py,
drawing): each test names the bug it guards against. The tiny detector is test_detect's:
whatever the picture, a dog at (0, 0, 0.5, 0.5) scoring 0.9 and a person at
(0.65, 0.55, 0.85, 0.95) scoring 0.6, image-relative.
"""
from __future__ import annotations

import fractions
import json

import numpy as np
import pytest
import torch
from PIL import Image

import detect
import utils
from test_detect import checkpoint, expected_lines, make_video, noise_image, read_video  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(argv, capsys):
    """detect.py through run_cli: ``(exit code, stdout, stderr)``; a traceback fails the test."""
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(detect.main, [str(a) for a in argv])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def write_ffv1(path, frames, width=64, height=48, times_ms=None):
    """A lossless (FFV1) .mkv: any frame size, and frame times given in milliseconds."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        if times_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i in range(frames):
            pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def audio_only(path):
    """An .mp4 holding one AAC audio stream and no video."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


# --------------------------------------------------------------------------- videos
def test_one_bad_video_among_good_sources_keeps_the_others(checkpoint, tmp_path, capsys):
    """Bug: a video that could not be opened (here audio only) ended the whole run with
    its error: detections.json of the images already done was never written, and the
    videos after it were never run. Now it is reported like an unreadable image: the
    others are detected, everything is written, and the run ends with one error line."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    noise_image(40, 30).save(folder / "a.png")
    audio_only(folder / "b_sound.mp4")
    make_video(folder / "c_clip.mp4", frames=3)
    code, out, err = cli([checkpoint, folder, "--project", tmp_path / "runs", "--save-json", "--save-txt"], capsys)
    assert code == 2
    assert last_line(err) == (f"error: 1 of 3 images and videos could not be read; the first: "
                              f"{folder / 'b_sound.mp4'}: holds no video stream")
    assert "Traceback" not in err
    run = tmp_path / "runs" / "exp"
    records = json.loads((run / "detections.json").read_text())["images"]
    assert [(r["file"], r.get("frame")) for r in records] == [("a.png", None)] + [("c_clip.mp4", i) for i in range(3)]
    assert len(read_video(run / "c_clip.mp4")) == 3
    assert (run / "labels" / "c_clip_000002.txt").read_text().splitlines() == expected_lines(64, 48)
    assert "1 image and 1 video (3 frames): 8 boxes" in out


@pytest.mark.parametrize("source", ["audio", "stream"])
def test_a_video_or_stream_that_cannot_open_leaves_no_output_folder(source, checkpoint, tmp_path, capsys):
    """Bug: an unreadable video or an unreachable stream left an empty runs/detect/expN
    behind (the folder was made before the video was opened), one more per attempt; an
    unreadable image already left none."""
    pytest.importorskip("av")
    audio_only(tmp_path / "sound.mp4")
    target = tmp_path / "sound.mp4" if source == "audio" else "rtsp://127.0.0.1:1/none"
    code, _, err = cli([checkpoint, target, "--project", tmp_path / "runs", "--save-txt"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {target}: ")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_corrupt_video_keeps_the_frames_before_the_error(checkpoint, tmp_path, capsys):
    """Bug: a decoding error part-way through a video (a damaged file) lost every frame
    detected before it: no detections.json, no summary. Now the frames before the damage
    are detected, written (.mp4, labels, JSON) and the error line says how many."""
    av = pytest.importorskip("av")
    write_ffv1(tmp_path / "good.mkv", frames=20)
    data = bytearray((tmp_path / "good.mkv").read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    data[len(data) // 2:len(data) // 2 + 3000] = noise
    (tmp_path / "bad.mkv").write_bytes(bytes(data))
    decodable = 0  # what PyAV itself decodes before the error: the frames that must be kept
    with pytest.raises(av.FFmpegError), av.open(str(tmp_path / "bad.mkv")) as container:
        for _ in container.decode(video=0):
            decodable += 1
    assert 0 < decodable < 20
    code, out, err = cli([checkpoint, tmp_path / "bad.mkv", "--project", tmp_path / "runs",
                          "--save-json", "--batch-size", "4"], capsys)
    assert code == 2
    assert last_line(err).startswith(f"error: {tmp_path / 'bad.mkv'}: cannot decode the video")
    assert last_line(err).endswith(f"; kept the {decodable} frames before it")
    run = tmp_path / "runs" / "exp"
    assert len(json.loads((run / "detections.json").read_text())["images"]) == decodable
    assert len(read_video(run / "bad.mkv.mp4")) == decodable
    assert f"1 video ({decodable} frames)" in out


@pytest.mark.parametrize("size", [(1, 1), (63, 47)])
def test_odd_sized_video_is_padded_not_cropped(size, checkpoint, tmp_path, capsys):
    """Bug: H.264's 4:2:0 colour needs even sides, and the drawn copy was cropped to them:
    a 1-pixel-wide video became 0 wide (a traceback from the encoder) and a 63 x 47 one
    lost the column and row where boxes at the edge are drawn. Now the last column and
    row are repeated: 1 x 1 -> 2 x 2, 63 x 47 -> 64 x 48 with the picture intact."""
    width, height = size
    write_ffv1(tmp_path / "odd.mkv", frames=2, width=width, height=height)
    code, _, err = cli([checkpoint, tmp_path / "odd.mkv", "--project", tmp_path / "runs", "--save-json"], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "exp"
    frames = read_video(run / "odd.mkv.mp4")
    assert len(frames) == 2 and frames[0].shape == (height + 1, width + 1, 3)
    records = json.loads((run / "detections.json").read_text())["images"]
    assert (records[0]["width"], records[0]["height"]) == size  # boxes stay in the source's pixels


def test_variable_frame_rate_video_keeps_its_frame_times(checkpoint, tmp_path, capsys):
    """Bug: the drawn copy was written at the stream's average rate, frame after frame, so
    a variable-frame-rate clip (a phone's, with pauses) played shorter than its source and
    out of step with it. Now each frame keeps its presentation time."""
    av = pytest.importorskip("av")
    times = [0, 40, 80, 320, 360, 1000]  # milliseconds
    write_ffv1(tmp_path / "vfr.mkv", frames=len(times), times_ms=times)
    with av.open(str(tmp_path / "vfr.mkv")) as container:
        assert [round(float(f.pts * f.time_base) * 1000) for f in container.decode(video=0)] == times
    code, _, err = cli([checkpoint, tmp_path / "vfr.mkv", "--project", tmp_path / "runs"], capsys)
    assert code == 0, err
    with av.open(str(tmp_path / "runs" / "exp" / "vfr.mkv.mp4")) as container:
        got = [round(float(f.pts * f.time_base) * 1000) for f in container.decode(video=0)]
    assert got == times


def test_ctrl_c_in_a_folder_of_images_keeps_what_is_done(checkpoint, tmp_path, capsys, monkeypatch):
    """Bug: Ctrl-C during a folder of images ended with no detections.json although the
    drawn pictures of the images done were written (a video already kept its frames).
    Now the records so far are written and the run exits 130 with run_cli's note."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        noise_image(32, 24, seed=i).save(folder / f"p{i}.png")
    real_predict, calls = detect.predict.predict_images, []

    def interrupted(model, images, args):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_predict(model, images, args)

    monkeypatch.setattr(detect.predict, "predict_images", interrupted)
    code, out, err = cli([checkpoint, folder, "--project", tmp_path / "runs", "--save-json",
                          "--batch-size", "2"], capsys)
    assert code == 130 and last_line(err) == "interrupted: Ctrl-C"
    records = json.loads((tmp_path / "runs" / "exp" / "detections.json").read_text())["images"]
    assert [r["file"] for r in records] == ["p0.png", "p1.png"]
    assert "2 images: 4 boxes" in out


# --------------------------------------------------------------------------- class names in box files
def checkpoint_named(tmp_path, names):
    """test_detect's tiny checkpoint with other class names (a checkpoint made elsewhere:
    train.py refuses such names, a hand-made or converted checkpoint need not)."""
    from test_inference import save, tiny_model

    model = tiny_model("fast")
    assert model.C == len(names)
    path = tmp_path / "named.pt"
    save(model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["class_names"] = list(names)
    utils.save_checkpoint(ckpt, path)
    return path


@pytest.mark.parametrize("names, problem", [
    (["cat", "potted plant", "person"], "class 1 'potted plant' is not one word"),
    (["cat", "", "person"], "class 1 '' is not one word"),
    (["cat", " dog", "person"], "class 1 ' dog' is not one word"),
    (["dog", "dog", "person"], "class name 'dog' appears twice"),
])
def test_box_files_refuse_class_names_they_cannot_hold(names, problem, tmp_path, capsys):
    """Bug: detect.py --save-txt and detect_txt.py wrote a checkpoint's class names into
    space-separated box files as they were: 'potted plant 0.9 ...' (evaluate.py reads
    'potted' and then a score 'plant', or refuses the file), an empty name shifted every
    field, two equal names merged two classes. Now refused before any output, naming
    the checkpoint and the class; --save-json alone (which keeps class ids) still runs."""
    import detect_txt

    ckpt = checkpoint_named(tmp_path, names)
    noise_image(32, 32).save(tmp_path / "a.png")
    runs = tmp_path / "runs"
    code, _, err = cli([ckpt, tmp_path / "a.png", "--project", runs, "--save-txt"], capsys)
    assert code == 2 and err.startswith(f"error: {ckpt}: {problem}") and err.count("\n") == 1
    assert not runs.exists()
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(detect_txt.main, [str(ckpt), "--data", str(tmp_path), "--project", str(runs)])
    assert exc.value.code == 2 and problem in capsys.readouterr().err
    assert not runs.exists()
    code, _, err = cli([ckpt, tmp_path / "a.png", "--project", runs, "--save-json"], capsys)
    assert code == 0, err
    assert json.loads((runs / "exp" / "detections.json").read_text())["class_names"] == names


@pytest.mark.parametrize("names", ['{"0": "cat", "1": "dog", "2": "person"}', '"cat"', "[1, 2, 3]"])
def test_onnx_class_names_must_be_a_list_of_strings(names, tmp_path):
    """Bug: an ONNX file whose class_names metadata was a JSON object, string or list of
    numbers of the right length loaded: a dict's keys or a string's letters became the
    class names of every box (silently wrong labels)."""
    pytest.importorskip("onnxruntime")
    import inference
    from test_inference import LAYOUT, fake_onnx

    path = fake_onnx(tmp_path / "model.onnx", {"output": 52}, LAYOUT | {"class_names": names, "C": 3})
    with pytest.raises(utils.UserError, match="class_names metadata is not a JSON list of strings"):
        inference.load(path)


# --------------------------------------------------------------------------- drawing
@pytest.mark.parametrize("name", ["person", "chat noir très long — ünïcode", 'a "quoted" name'])
def test_labels_at_the_right_and_bottom_edges_are_drawn_whole(name):
    """Bug: torchvision puts a label inside its box's top-left corner and clips what runs
    past the picture, so a box at the right edge showed a letter or two of its class and
    one at the bottom edge half a line. Now the label moves left or up to stay whole: its
    background (one pixel around the text, as wide and high as Pillow measures the text
    in that font) lies whole inside the picture, against the edge."""
    from PIL import ImageDraw, ImageFont

    from plots import class_colour, draw_detections, label_font

    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), f"{name} 0.50", font=ImageFont.truetype(label_font(), 12) if label_font() else None)
    w, h = right - left + 2, bottom - top + 2
    colour = torch.tensor(class_colour(0)).view(3, 1)

    def drawn(x1, y1):
        dets = torch.tensor([[0.0, 0.5, x1, y1, x1 + 10, y1 + 10]])
        return draw_detections(torch.zeros(3, 120, 300, dtype=torch.uint8), dets, [name], line_width=1, font_size=12)

    at_right = drawn(290.0, 50.0)      # the label starts at the box's corner + 1 (51), ends at the edge
    assert (at_right[:, 51, 300 - w:] == colour).all() and (at_right[:, 51 + h - 1, 300 - w:] == colour).all()
    at_bottom = drawn(100.0, 110.0)    # the label starts 1 right of the box's left edge, ends at the bottom
    assert (at_bottom[:, 120 - h, 101:101 + w] == colour).all() and (at_bottom[:, 119, 101:101 + w] == colour).all()


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("opset, message", [
    (7, "--opset 7: torch.onnx could not write this model in opset 7 (it wrote opset 18)"),
    (10_000, "--opset 10000: the installed onnx package knows opsets up to"),
])
def test_export_refuses_an_opset_it_did_not_write(opset, message, checkpoint, tmp_path, capsys):
    """Bug: torch.onnx's exporter writes opset 18 and converts down; when the conversion
    failed (--opset 7) or the opset does not exist (--opset 99) it printed the converter's
    traceback and wrote an opset 18 file, and export.py reported success (exit 0). Now
    the written opset is checked: one error line, no file, no empty run folder."""
    pytest.importorskip("onnxscript")
    import export

    with pytest.raises(SystemExit) as exc:
        utils.run_cli(export.main, [str(checkpoint), "--include", "onnx", "--opset", str(opset),
                                    "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --------------------------------------------------------------------------- sources
def test_one_file_named_twice_is_detected_once(checkpoint, tmp_path, capsys, monkeypatch):
    """Bug: the same image named two ways (relative and absolute, or a folder and a file
    in it) was taken for two files whose outputs clash, and the run was refused."""
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(40, 30).save(folder / "a.png")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli([checkpoint, "photos/a.png", folder / "a.png", "photos", "--project", "runs",
                          "--save-json"], capsys)
    assert code == 0, err
    assert [r["file"] for r in json.loads((tmp_path / "runs/exp/detections.json").read_text())["images"]] == ["a.png"]
    assert out.startswith("1 image: 2 boxes")


def test_a_folder_says_which_files_it_skipped(checkpoint, tmp_path, capsys):
    """Bug: a folder's files whose suffix is not an image's or a video's (a .gif, a .jfif)
    were left out without a word: the summary counted fewer images and nothing said why.
    Now one note names them; naming such a file directly detects it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(40, 30).save(folder / "a.png")
    noise_image(40, 30).convert("P").save(folder / "b.gif")
    code, out, err = cli([checkpoint, folder, "--project", tmp_path / "runs"], capsys)
    assert code == 0
    assert f"note: {folder}: skipped 1 file not named as an image or a video (b.gif)" in err
    code, out, err = cli([checkpoint, folder / "b.gif", "--project", tmp_path / "runs"], capsys)
    assert code == 0 and out.startswith("1 image: 2 boxes")


@pytest.mark.parametrize("mode", ["F", "I"])
def test_32_bit_images_are_refused_not_blacked_out(mode, checkpoint, tmp_path, capsys):
    """Bug: a 32-bit float image (values 0..1, as scientific tools save them) became an
    all-black picture and a 32-bit integer one beyond 16 bits an all-white one (Pillow's
    conversion truncates and clips): detections on a blank picture, exit 0. There is no
    defined 8-bit scale for them: one error line. 16-bit images still scale (257 per step)."""
    rng = np.random.default_rng(0)
    pixels = rng.random((30, 40)).astype(np.float32) if mode == "F" else \
        rng.integers(0, 2**31, (30, 40)).astype(np.int32)
    Image.fromarray(pixels).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == mode
    code, _, err = cli([checkpoint, tmp_path / "deep.tif", "--project", tmp_path / "runs"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'deep.tif'}: unreadable image (32-bit ")
    from images import load_image

    Image.fromarray((rng.integers(0, 65536, (30, 40))).astype(np.uint16)).save(tmp_path / "g16.png")
    sixteen = np.asarray(Image.open(tmp_path / "g16.png"), dtype=np.float64)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "g16.png"))[..., 0],
                                  (sixteen / 257).round().astype(np.uint8))


def test_a_torchscript_file_is_named_as_such(tmp_path, capsys):
    """Bug: export.py's TorchScript file given to detect.py (or test.py, detect_txt.py) as
    the checkpoint printed torch's warning and 'refused: the file holds objects ... which
    could run code when loaded', as if it were malicious. Now one line says what it is."""
    import inference
    from test_inference import save, tiny_model

    model = tiny_model("fast")
    save(model, tmp_path / "ckpt.pt")
    from export import jit_quietly

    with jit_quietly():  # torch.jit's deprecation warning
        traced = torch.jit.trace(model.eval(), torch.rand(1, 3, model.input_size, model.input_size),
                                 check_trace=False)
        torch.jit.save(traced, str(tmp_path / "model.torchscript.pt"))
    with pytest.raises(utils.UserError, match=r"model.torchscript.pt: a TorchScript file \(export.py\); this runs"):
        inference.load(tmp_path / "model.torchscript.pt")
    assert inference.load(tmp_path / "ckpt.pt").C == model.C  # a checkpoint is not mistaken for one


def test_videos_named_by_other_suffixes_are_videos(checkpoint, tmp_path, capsys):
    """Bug: a camcorder's .MTS (MPEG transport stream), a .3gp or a video with any suffix
    outside detect.py's list was read as an image: 'unreadable image (cannot identify
    image file)'. Now the common suffixes are videos, and a file named directly with an
    unknown suffix is a video when Pillow cannot read it and PyAV finds a video in it."""
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "cam.MTS"), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    make_video(tmp_path / "clip.mp4", frames=3)
    (tmp_path / "clip.mp4").rename(tmp_path / "clip.bin")
    (tmp_path / "notes.bin").write_text("neither")
    code, out, err = cli([checkpoint, tmp_path / "cam.MTS", tmp_path / "clip.bin", "--project", tmp_path / "runs"], capsys)
    assert code == 0, err
    assert out.startswith("2 videos (33 frames)")
    assert len(read_video(tmp_path / "runs" / "exp" / "clip.bin.mp4")) == 3
    code, _, err = cli([checkpoint, tmp_path / "notes.bin", "--project", tmp_path / "runs"], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'notes.bin'}: unreadable image")


def test_a_failed_write_is_one_line_and_keeps_what_was_written(checkpoint, tmp_path, capsys, monkeypatch):
    """Bug: a write that failed (a full disk, a folder removed under the run) ended in a
    traceback, and detections.json of the images done was never written. Now one line
    names the file and the run folder, and the records so far are written."""
    import errno

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        noise_image(32, 24, seed=i).save(folder / f"p{i}.png")
    real_save = detect.save_image

    def full_disk(image, path):
        if path.name == "p1.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(image, path)

    monkeypatch.setattr(detect, "save_image", full_disk)
    code, _, err = cli([checkpoint, folder, "--project", tmp_path / "runs", "--save-json", "--batch-size", "1"], capsys)
    run = tmp_path / "runs" / "exp"
    assert code == 2 and "Traceback" not in err
    assert last_line(err) == (f"error: {run / 'p1.png'}: cannot write the results (No space left on device); "
                              f"what was written before is in {run}")
    assert [r["file"] for r in json.loads((run / "detections.json").read_text())["images"]] == ["p0.png"]
