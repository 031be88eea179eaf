"""Red-team pass on Darknet compatibility: what a user's cfg and weights files may hold.

Each test names the bug it guards against. Files are small (yolov1-tiny at a quarter of its
filters, S = 2); the tests that need Darknet's C code build it once (``darknet`` fixture,
conftest.py) and skip with the reason where it cannot be built.
"""
from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import darknet_weights as dw
from darknet_cfg import parse_cfg, read_cfg
from darknet_convert import convert_from_darknet
from model import build_model
from utils import UserError

NET = "[net]\nheight=64\nwidth=64\nchannels=3\n"
CONV = "[convolutional]\nfilters={}\nsize=3\nstride=1\npad=1\nactivation=leaky\n"


# --------------------------------------------------------------------------- cfg text
def c_atoi(text: str) -> int:
    """C's atoi, written from its definition (leading blanks, a sign, then digits until the
    first other character; 0 when there are none): what Darknet's option_find_int returns."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?)([0-9]*)", text)
    digits = m.group(2)
    return int(m.group(1) + digits) if digits else 0


@pytest.mark.parametrize("value", ["1_6", "\u0661\u0666", "16#sixteen", "16;x", "16.0", "0x10", "1e1"])
def test_cfg_integers_darknet_reads_otherwise_are_refused(value):
    """Bug: Python's int() read ``filters=1_6`` as 16 and Arabic-Indic digits as numbers,
    where Darknet's atoi reads 1 and 0: the project built another network than Darknet from
    the same cfg. Whatever the project accepts it must read as atoi does; the rest is
    refused, naming the line."""
    with pytest.raises(UserError, match=r"bad.cfg:6: \[convolutional\] filters=.*: not an integer"):
        parse_cfg(NET + CONV.format(value), "bad.cfg")


def test_cfg_inline_comment_says_darknet_reads_comments_on_their_own_lines():
    with pytest.raises(UserError, match="comments only on lines of their own"):
        parse_cfg(NET + CONV.format("16 # sixteen"), "bad.cfg")


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from("0123456789+-_.eE#; \t\u0661xa"), min_size=1, max_size=8))
def test_fuzz_cfg_integer_values_agree_with_atoi(value):
    """Any spelling of an integer option: refused with a UserError, or read as C's atoi
    reads it (the whole value, no surplus)."""
    try:
        cfg = parse_cfg(NET + CONV.format(value), "fuzz.cfg")
    except UserError:
        return
    assert cfg.layers[0].params["filters"] == c_atoi(value.replace(" ", "").replace("\t", ""))


@pytest.mark.parametrize("separator", ["\v", "\f", "\x1c", "\x85", "\u2028"])
def test_cfg_lines_break_at_newline_only(separator):
    """Bug: str.splitlines broke a line at \\v, \\f, \\x1c, \\x85 or \\u2028, which Darknet's
    fgetl does not: two options where Darknet reads one (``filters=16\\vsize=3`` is 16
    filters of size 1 to Darknet), and every later line number in messages shifted."""
    text = NET + "[convolutional]\nfilters=16" + separator + "size=3\nsize=3\nactivation=leaky\nfoo=1\n"
    with pytest.raises(UserError) as err:
        parse_cfg(text, "bad.cfg")
    assert str(err.value).startswith("bad.cfg:6: [convolutional] filters="), str(err.value)


def test_cfg_line_numbers_after_odd_characters_are_the_files(tmp_path):
    """A form feed inside a comment is no line break: the error names the file's line 11."""
    text = NET + "# page\fbreak\n" + CONV.format(16).replace("activation=leaky", "activation=relu")
    with pytest.raises(UserError, match=r"bad.cfg:11: \[convolutional\] activation=relu"):
        parse_cfg(text, "bad.cfg")


def tiny_files(tmp_path, seed=0):
    """A small yolov1-tiny written by the project, batch-norm statistics as a trained
    network's (means of both signs, variances of order 1)."""
    torch.manual_seed(seed)
    model = build_model("yolov1-tiny", S=2, width=0.25)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.uniform_(-0.2, 0.2)
    cfg, weights = dw.write_darknet(model, tmp_path / "tiny")
    return model, cfg, weights


@pytest.mark.parametrize("encode", [
    lambda text: ("\ufeff" + text).encode("utf-8"),             # a byte order mark (Windows editors)
    lambda text: ("# r\xe9seau\n" + text).encode("latin-1"),    # a comment in Latin-1
    lambda text: text.replace("\n", "\r\n").encode(),           # CRLF
])
def test_cfg_encodings_darknet_reads_are_read(tmp_path, encode):
    """Bug: a UTF-8 byte order mark made line 1 "expected key=value, got '\\ufeff[net]'" and
    a Latin-1 comment "cannot read the cfg file": Darknet reads bytes, and only ASCII means
    anything in a cfg. Both now give the same network as the plain file."""
    _, cfg, weights = tiny_files(tmp_path)
    plain = read_cfg(cfg)
    odd = tmp_path / "odd.cfg"
    odd.write_bytes(encode(cfg.read_text()))
    assert [(l.kind, l.params) for l in read_cfg(odd).layers] == [(l.kind, l.params) for l in plain.layers]


def test_weights_file_given_as_the_cfg_says_so(tmp_path):
    _, cfg, weights = tiny_files(tmp_path)
    with pytest.raises(UserError, match=r"tiny.weights: a binary file, not a Darknet cfg"):
        convert_from_darknet(weights, cfg, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_cfg_values_read_as_darknet_reads_them(darknet, tmp_path):
    """Against Darknet's own parser (tests/darknet/layers.c): for each spelling of a filter
    count, the project refuses it or builds the layer Darknet builds."""
    exe = darknet.compile("layers.c", tmp_path)
    for value in ["16", "+16", "0016", "1_6", "16#x", "16.0", "\u0661", " 1 6 "]:
        path = tmp_path / "one.cfg"
        path.write_bytes((NET + CONV.format(value)).encode())
        theirs = int(darknet.run(exe, path).split()[1])  # out_c of Darknet's layer 0
        try:
            mine = read_cfg(path).layers[0].out_shape[0]
        except UserError:
            continue
        assert mine == theirs, value


# --------------------------------------------------------------------------- weights of another cfg
def shifted(weights, tmp_path, by=1):
    """The same file with its floats rotated by ``by``: as long as the original, misaligned."""
    data = weights.read_bytes()
    floats = np.frombuffer(data[20:], "<f4")
    path = tmp_path / "shifted.weights"
    path.write_bytes(data[:20] + np.roll(floats, by).tobytes())
    return path


def test_misaligned_weights_of_the_right_length_are_refused(tmp_path):
    """Bug: a weights file of exactly the cfg's length but not its layers (another cfg's
    floats, or these shifted by one) converted without a word into a detector whose every
    output was NaN (detect.py then found nothing). Rolling variances are never negative:
    a misaligned file puts weights there."""
    _, cfg, weights = tiny_files(tmp_path)
    bad = shifted(weights, tmp_path)
    with pytest.raises(UserError) as err:
        convert_from_darknet(cfg, bad, tmp_path / "out.pt")
    msg = str(err.value)
    assert msg.startswith(f"{bad}: layer 0 [convolutional]") and f"({cfg}:" in msg, msg
    assert "rolling variances" in msg and "negative" in msg and "not this cfg's layers" in msg
    assert not (tmp_path / "out.pt").exists()


def test_darknet_itself_computes_nan_from_the_refused_file(darknet, tmp_path):
    """The refusal above is right: Darknet's own forward pass (tests/darknet/predict.c) on the
    shifted file gives NaN, while on the original file it gives finite numbers."""
    _, cfg, weights = tiny_files(tmp_path)
    exe = darknet.compile("predict.c", tmp_path)
    np.random.default_rng(0).random(3 * 128 * 128, dtype=np.float32).astype("<f4").tofile(tmp_path / "in.bin")
    for path, finite in ((weights, True), (shifted(weights, tmp_path), False)):
        darknet.run(exe, cfg, path, tmp_path / "in.bin", tmp_path / "out.bin")
        assert bool(np.isfinite(np.fromfile(tmp_path / "out.bin", "<f4")).all()) is finite


def test_finite_weights_that_overflow_are_refused_naming_the_layer(tmp_path):
    """Bug: without batch norm there are no variances to check; a file whose floats are
    finite but absurd (1e38 for a whole filter of the first convolution) converted into a network whose outputs
    are infinite. The converter runs the network once and names the first layer that fails."""
    torch.manual_seed(0)
    model = build_model("yolov1-tiny", S=2, width=0.25, batch_norm=False)
    cfg, weights = dw.write_darknet(model, tmp_path / "plain")
    data = bytearray(weights.read_bytes())
    data[20 + 4 * 4:20 + 4 * 31] = struct.pack("<27f", *[1e38] * 27)  # after the 4 biases: filter 0 of layer 0
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"plain.weights: with these weights layer 0 \[convolutional\] .* \(.*plain.cfg:\d+\) "
                                        r"computes NaN or infinite values"):
        convert_from_darknet(cfg, weights, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("version, seen_format", [((0, 2, 0), "<i"), ((0, 1, 0), "<Q")])
def test_one_float_off_names_the_header_size(tmp_path, version, seen_format):
    """A header whose ``seen`` was written with the other size than its version says (a
    hand-made or foreign writer): the count is one float off; the message says why."""
    _, cfg, weights = tiny_files(tmp_path)
    bad = tmp_path / "odd.weights"
    bad.write_bytes(struct.pack("<3i", *version) + struct.pack(seen_format, 0) + weights.read_bytes()[20:])
    with pytest.raises(UserError, match=r"exactly one float off: its version 0\.\d header says 'seen' is"):
        convert_from_darknet(cfg, bad, tmp_path / "out.pt")


# --------------------------------------------------------------------------- project -> Darknet -> project
@pytest.mark.parametrize("name", ["yolov1", "fast", "yolov1-darknet", "yolov1-tiny"])
@pytest.mark.parametrize("width", [0.1, 0.07])
def test_any_width_round_trips_through_darknet_files(tmp_path, name, width):
    """Bug: the width was read from the first convolution alone (19 / 64 for width 0.3),
    which gives 57 filters where the network has 58: a checkpoint at width 0.3, 0.1 or 0.07
    written as Darknet files could not be read back ("the closest network ... has
    filters=57"), against #13's exact round trip."""
    from darknet_convert import convert_to_darknet
    from model import load_detector
    from utils import save_checkpoint

    torch.manual_seed(0)
    extra = {"yolov1": {"hidden": 16}, "yolov1-darknet": {"local": 8}}.get(name, {})
    model = build_model(name, S=2, width=width, **extra).eval()
    save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": dict(model.config),
                     "class_names": [f"c{i}" for i in range(20)]}, tmp_path / "a.pt")
    convert_to_darknet(tmp_path / "a.pt", tmp_path / "dk", None)
    (tmp_path / "names.txt").write_text("\n".join(f"c{i}" for i in range(20)))
    convert_from_darknet(tmp_path / "dk.cfg", tmp_path / "dk.weights", tmp_path / "b.pt", tmp_path / "names.txt")
    again, names = load_detector(tmp_path / "b.pt")
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same numbers; Darknet's batch-norm formula where the paper's had PyTorch's
        torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def bases():
    """The width-1 filters of a detector of each kind and of the classifier's features."""
    from darknet_convert import scaled_filters
    from darknet_model import Darknet

    with torch.device("meta"):
        return [scaled_filters(build_model("yolov1")), scaled_filters(build_model("yolov1-tiny")),
                scaled_filters(Darknet())]


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(1 / 1024, 4.0))
def test_fuzz_width_read_back_builds_the_same_filters(bases, width):
    """Any width: the width read back from the filters gives every layer its filters again."""
    from darknet_convert import width_of
    from darknet_model import scaled

    for base in bases:
        filters = [scaled(b, width) for b in base]
        assert [scaled(b, width_of(filters, base)) for b in base] == filters


# --------------------------------------------------------------------------- the command's outputs
def test_convert_command_never_replaces_a_file_unasked(scripts, tmp_path):
    """Bug: ``darknet_convert.py CFG WEIGHTS -o best.pt`` replaced an existing (trained)
    checkpoint without a word, and ``CKPT -o mine`` an existing mine.cfg / mine.weights; an
    output named as an input would have replaced the input. Refused, one line, nothing
    changed; ``--overwrite`` replaces outputs (never an input)."""
    from scripts_server import hashes, ok, one_line_error

    _, cfg, weights = tiny_files(tmp_path)
    out = tmp_path / "best.pt"
    out.write_bytes(b"a trained checkpoint")
    before = hashes(tmp_path)
    one_line_error(scripts.run("darknet_convert.py", cfg, weights, "-o", out), "-o ", "best.pt: exists", "--overwrite")
    one_line_error(scripts.run("darknet_convert.py", cfg, weights, "-o", weights, "--overwrite"),
                   "tiny.weights: is one of the input files")
    assert hashes(tmp_path) == before
    ok(scripts.run("darknet_convert.py", cfg, weights, "-o", out, "--overwrite"))
    assert out.read_bytes() != b"a trained checkpoint"
    before = hashes(tmp_path)
    one_line_error(scripts.run("darknet_convert.py", out, "-o", tmp_path / "tiny"), "tiny.cfg: exists")
    assert hashes(tmp_path) == before
    original = weights.read_bytes()
    ok(scripts.run("darknet_convert.py", out, "-o", tmp_path / "tiny", "--overwrite"))
    assert weights.read_bytes() == original  # the same network written back, byte for byte


# --------------------------------------------------------------------------- backbones
def test_backbone_variances_pytorch_cannot_reproduce_are_reported():
    """Bug: a Darknet backbone (converted extraction.weights) loaded into the default,
    PyTorch-normed YOLOv1 had its tiny running variances clamped without a word: those
    channels no longer computed Darknet's numbers. Now said once; exactly representable
    variances load silently, as before."""
    import warnings

    from darknet_model import Darknet
    from model import load_backbone

    backbone = Darknet(num_classes=10, width=1 / 16, head="conv", darknet_bn=True)
    detector = build_model("yolov1", S=2, width=1 / 16, hidden=8)
    ckpt = {"model": backbone.state_dict(), "model_config": dict(backbone.config)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backbone(detector, ckpt, "ok.pt")
    with torch.no_grad():
        backbone.features[0][1].running_var[:3] = 1e-10
    with pytest.warns(UserWarning, match=r"tiny.pt: 3 batch-norm channels have a running variance below"):
        load_backbone(detector, {"model": backbone.state_dict(), "model_config": dict(backbone.config)}, "tiny.pt")
