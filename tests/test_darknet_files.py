"""Darknet files the project cannot use: one clear line, never a traceback or a wrong number.

No Darknet build is needed here (test_darknet_parity.py compares with Darknet itself).
The cfg and weights files are the project's own for a small yolov1-tiny network (written
by darknet_weights.write_darknet, which the parity tests show Darknet reads), then broken.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import darknet_weights as dw
from darknet_cfg import parse_cfg, read_cfg
from darknet_convert import convert_from_darknet, match_cfg
from model import build_model
from scripts_server import hashes, ok, one_line_error
from utils import UserError

# yolov1-tiny at a quarter of its filters, S = 2 (128-pixel input). Its layers: 8
# convolutions, each of the first six followed by a maxpool (layers 0-13), then the
# connected layer (layer 14) and the detection layer.
TINY = dict(S=2, width=0.25)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``tiny.cfg`` + ``tiny.weights`` (random) and the float count, worked out by hand."""
    root = tmp_path_factory.mktemp("darknet-files")
    torch.manual_seed(0)
    model = build_model("yolov1-tiny", **TINY)
    cfg, weights = dw.write_darknet(model, root / "tiny")
    filters = [4, 8, 16, 32, 64, 128, 256, 64]            # 16..1024, 256 divided by 4
    convs, c = 0, 3
    for n in filters:                                    # bias, scale, mean, variance; 3x3 weights
        convs += 4 * n + n * c * 9
        c = n
    connected = 120 + 120 * (2 * 2 * 64)                 # S*S*(5B+C) = 4*30 outputs, 2x2x64 inputs
    parsed = read_cfg(cfg)
    empty = match_cfg(parsed).build()
    return {"root": root, "cfg": cfg, "weights": weights, "convs": convs, "total": convs + connected,
            "model": model, "loader": (empty, dw.model_cfg(empty)[1], parsed)}


def line_of(cfg_path, header: str, occurrence: int = 1) -> int:
    """The line number of the ``occurrence``-th ``header`` in the cfg."""
    lines = [i for i, line in enumerate(cfg_path.read_text().splitlines(), 1) if line.strip() == header]
    return lines[occurrence - 1]


def broken(files, tmp_path, data: bytes, name="broken.weights"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def load(files, weights_path):
    """Read a weights file into (an already built) tiny network."""
    model, units, cfg = files["loader"]
    return dw.load_weights(model, units, weights_path, cfg)


# --------------------------------------------------------------------------- weights files
def test_the_files_fit(files):
    """The hand count is the file's: 20-byte header (version 0.2, 64-bit seen) plus floats."""
    assert files["weights"].stat().st_size == 20 + 4 * files["total"]
    header = load(files, files["weights"])
    assert (header.major, header.minor, header.seen) == (0, 2, 0)


def test_short_weights_file_names_both_counts_and_the_layer(files, tmp_path):
    """Guards against Darknet's own behaviour: its loader reads past the end silently and
    leaves the rest of the network as initialised."""
    data = files["weights"].read_bytes()
    cut = files["convs"] + 100                           # inside the connected layer's floats
    path = broken(files, tmp_path, data[:20 + 4 * cut])
    with pytest.raises(UserError) as err:
        load(files, path)
    msg = str(err.value)
    assert f"holds {cut} floats" in msg and f"needs {files['total']}" in msg
    assert "layer 14 [connected]" in msg and f"tiny.cfg:{line_of(files['cfg'], '[connected]')}" in msg
    assert f"needs floats {files['convs']} to {files['total']}" in msg


def test_weights_file_cut_in_the_first_layer(files, tmp_path):
    path = broken(files, tmp_path, files["weights"].read_bytes()[:20 + 4 * 7])
    with pytest.raises(UserError, match=rf"holds 7 floats.*layer 0 \[convolutional\].*tiny.cfg:"
                                        rf"{line_of(files['cfg'], '[convolutional]')}"):
        load(files, path)


def test_long_weights_file_says_how_many_are_left_over(files, tmp_path):
    path = broken(files, tmp_path, files["weights"].read_bytes() + np.zeros(3, "<f4").tobytes())
    with pytest.raises(UserError) as err:
        load(files, path)
    msg = str(err.value)
    assert f"holds {files['total'] + 3} floats" in msg and f"needs {files['total']}" in msg
    assert "3 are left over after its last layer with weights, layer 14" in msg


def test_partial_float_and_short_header(files, tmp_path):
    with pytest.raises(UserError, match="not a whole number of float32s"):
        load(files, broken(files, tmp_path, files["weights"].read_bytes()[:-2]))
    with pytest.raises(UserError, match="shorter than a Darknet weights header"):
        load(files, broken(files, tmp_path, b"\0" * 10))


@pytest.mark.parametrize("version", [(1, 0, 0), (0, 3, 0), (-1, 2, 0), (0, 2, -5)])
def test_unknown_header_version_is_refused(files, tmp_path, version):
    data = struct.pack("<3i", *version) + files["weights"].read_bytes()[12:]
    with pytest.raises(UserError, match=r"version .* is not one Darknet's loader knows"):
        load(files, broken(files, tmp_path, data))


def test_old_header_with_32_bit_seen_is_read(files, tmp_path):
    """Version 0.1 files (load_weights_upto: ``seen`` as a 32-bit int): the same tensors."""
    data = files["weights"].read_bytes()
    old = broken(files, tmp_path, struct.pack("<3ii", 0, 1, 0, 321) + data[20:])
    cfg = read_cfg(files["cfg"])
    model = match_cfg(cfg).build()
    header = dw.load_weights(model, dw.model_cfg(model)[1], old, cfg)
    assert header.seen == 321 and header.size == 16
    for key, value in files["model"].state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[key], value), key


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64))
def test_fuzz_weights_header(files, tmp_path_factory, data):
    """Any bytes: read, or refused with a UserError."""
    path = tmp_path_factory.getbasetemp() / "fuzz.weights"
    path.write_bytes(data)
    try:
        load(files, path)
    except UserError:
        pass


# --------------------------------------------------------------------------- cfg files
def cfg_error(text: str) -> str:
    with pytest.raises(UserError) as err:
        parse_cfg(text, "bad.cfg")
    return str(err.value)


NET = "[net]\nheight=128\nwidth=128\nchannels=3\n"


@pytest.mark.parametrize("text, fragments", [
    (NET + "[route]\nlayers=-1\n", ["bad.cfg:5:", "[route] is a Darknet layer outside the yolov1 family"]),
    (NET + "[bogus]\n", ["bad.cfg:5:", "not a layer type Darknet knows"]),
    (NET + "[convolutional]\nfilters=4\nsize=3\nactivation=relu\n", ["bad.cfg:8:", "activation=relu"]),
    (NET + "[convolutional]\nfilters=4\nsize=3\n", ["bad.cfg:5:", "activation=logistic"]),
    (NET + "[convolutional]\nfilters=4\nsize=3\ngroups=2\nactivation=leaky\n", ["bad.cfg:8:", "grouped"]),
    (NET + "[convolutional]\nfilters=4\nsize=3\nactivation=leaky\nfoo=1\n", ["bad.cfg:9:", "'foo'"]),
    (NET + "[convolutional]\nfilters=abc\n", ["bad.cfg:6:", "filters=abc: not an integer"]),
    (NET + "[connected]\noutput=4\nbatch_normalize=1\nactivation=linear\n",
     ["bad.cfg:7:", "batch-normed fully connected"]),
    (NET + "[convolutional]\nfilters=4\nsize=3\nactivation=leaky\ndontload=1\n", ["bad.cfg:9:", "dontload"]),
    ("[net]\nheight=127\nwidth=127\nchannels=3\n[maxpool]\nsize=2\nstride=2\n",
     ["bad.cfg:5:", "127x127 input: Darknet pads it (output 64x64)"]),
    (NET + "[connected]\noutput=10\nactivation=linear\n[detection]\nclasses=20\ncoords=4\nside=7\nnum=2\nsqrt=1\n",
     ["bad.cfg:8:", "need 7*7*(5*2+20) = 1470 inputs; the layer before gives 10"]),
    (NET + "[connected]\noutput=30\nactivation=linear\n[detection]\nclasses=20\ncoords=4\nside=1\nnum=2\n",
     ["bad.cfg:", "sqrt=0", "sqrt w"]),
    (NET + "[local]\nfilters=4\nsize=5\npad=1\nactivation=leaky\n", ["bad.cfg:8:", "disagree"]),
    ("height=3\n[net]\n", ["bad.cfg:1:", "before the first [section]"]),
    (NET + "[convolutional]\nfilters\n", ["bad.cfg:6:", "expected key=value"]),
    (NET + "[convolutional]\nfilters=4\nfilters=8\n", ["bad.cfg:7:", "given twice", "line 6"]),
    ("[convolutional]\nfilters=4\n", ["bad.cfg:1:", "first section must be [net]"]),
    ("[net]\nheight=128\nwidth=128\n", ["bad.cfg:1:", "channels"]),
    ("", ["bad.cfg:", "not a Darknet cfg"]),
    ("[net\n", ["bad.cfg:1:", "section header"]),
])
def test_bad_cfg_names_file_and_line(text, fragments):
    msg = cfg_error(text)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_cfg_the_project_cannot_build_names_the_first_difference(files, tmp_path):
    """A cfg Darknet would run but that is none of the registry's networks: the line of the
    first layer where the closest network differs, and what that network has there."""
    lines = files["cfg"].read_text().splitlines()
    third = [i for i, line in enumerate(lines) if line == "[convolutional]"][2]
    assert lines[third + 1] == "batch_normalize=1" and lines[third + 2] == "filters=16"
    lines[third + 2] = "filters=20"
    path = tmp_path / "odd.cfg"
    path.write_text("\n".join(lines))
    with pytest.raises(UserError) as err:
        match_cfg(read_cfg(path))
    msg = str(err.value)
    assert f"odd.cfg:{third + 1}: layer 4 [convolutional]" in msg and "filters=20" in msg
    assert "closest network the project builds (yolov1-tiny) has [convolutional] filters=16" in msg


def test_cfg_of_other_input_size_is_refused(files, tmp_path):
    path = tmp_path / "big.cfg"
    path.write_text(files["cfg"].read_text().replace("height=128", "height=192").replace("width=128", "width=192"))
    with pytest.raises(UserError, match=r"big.cfg:1: \[net\] height=192 width=192: the project's "
                                        r"yolov1-tiny here takes 128x128"):
        match_cfg(read_cfg(path))


SECTION = st.sampled_from(["[net]", "[convolutional]", "[maxpool]", "[local]", "[dropout]", "[connected]",
                           "[avgpool]", "[softmax]", "[cost]", "[detection]", "[route]", "[x]", "[", "[]"])
KEY = st.sampled_from(["filters", "size", "stride", "pad", "padding", "activation", "batch_normalize",
                       "height", "width", "channels", "output", "probability", "classes", "coords",
                       "side", "num", "sqrt", "softmax", "groups", "tree", "numload", "inputs", "x"])
VALUE = st.one_of(st.integers(-3, 600).map(str), st.sampled_from(["leaky", "linear", "relu", ".5", "1e3",
                                                                  "", "abc", "nan", "inf"]))
LINE = st.one_of(SECTION, st.tuples(KEY, VALUE).map("=".join), st.text(max_size=12),
                 st.sampled_from(["# comment", ";", "", "  height = 128 "]))


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(LINE, max_size=30), st.booleans())
def test_fuzz_cfg_parser(lines, with_net):
    """Anything: a parsed cfg, whose network the converter then matches or refuses, or a
    UserError; never another exception."""
    text = "\n".join(([NET] if with_net else []) + lines)
    try:
        cfg = parse_cfg(text, "fuzz.cfg")
    except UserError:
        return
    assert cfg.layers and all(layer.n_weights >= 0 for layer in cfg.layers)
    try:
        match_cfg(cfg)
    except UserError:
        pass


# --------------------------------------------------------------------------- the command
def test_convert_command_bad_weights_one_line_and_nothing_written(files, scripts, tmp_path):
    short = broken(files, tmp_path, files["weights"].read_bytes()[:-40])
    out = tmp_path / "out.pt"
    out.write_bytes(b"an earlier checkpoint")
    before = hashes(tmp_path)
    result = scripts.run("darknet_convert.py", files["cfg"], short, "-o", out, "--overwrite")
    one_line_error(result, "broken.weights: holds", "layer 14 [connected]")
    assert hashes(tmp_path) == before                    # no temporary file left, out untouched


def test_convert_command_bad_cfg_and_bad_names(files, scripts, tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(files["cfg"].read_text().replace("[maxpool]", "[reorg]", 1))
    one_line_error(scripts.run("darknet_convert.py", cfg, files["weights"], "-o", tmp_path / "x.pt"),
                   "bad.cfg:", "[reorg] is a Darknet layer outside the yolov1 family")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    one_line_error(scripts.run("darknet_convert.py", files["cfg"], files["weights"], "-o", tmp_path / "x.pt",
                               "--names", names), "names.txt: 2 names, the cfg has 20 classes")
    assert not (tmp_path / "x.pt").exists()


def test_convert_command_refuses_what_is_not_a_checkpoint(files, scripts, tmp_path):
    one_line_error(scripts.run("darknet_convert.py", files["weights"], "-o", tmp_path / "y"),
                   "tiny.weights: a Darknet file; give both, CFG WEIGHTS")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    one_line_error(scripts.run("darknet_convert.py", junk, "-o", tmp_path / "y"), "junk.pt: ")
    junk.unlink()
    assert not list(tmp_path.iterdir())


def test_convert_command_writes_the_same_files_back(files, scripts, tmp_path):
    """cfg + weights -> checkpoint -> cfg + weights: the same bytes (the parity tests run
    them in Darknet)."""
    ok(scripts.run("darknet_convert.py", files["cfg"], files["weights"], "-o", tmp_path / "tiny.pt"))
    ok(scripts.run("darknet_convert.py", tmp_path / "tiny.pt", "-o", tmp_path / "again.weights"))
    assert (tmp_path / "again.weights").read_bytes() == files["weights"].read_bytes()
    assert (tmp_path / "again.cfg").read_text() == files["cfg"].read_text()


def test_convert_function_refuses_before_writing(files, tmp_path):
    with pytest.raises(UserError):
        convert_from_darknet(files["cfg"], tmp_path / "missing.weights", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- classifiers
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """extraction.cfg's network at 1/16 of its filters (64-pixel input), written by the project,
    and the same weights cut after the 20 convolutions (layers 0-23), as Darknet's ``partial``
    cuts extraction.weights into extraction.conv.weights."""
    from darknet_model import Darknet

    root = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(1)
    model = Darknet(num_classes=10, width=1 / 16, head="conv", darknet_bn=True).eval()
    cfg, weights = dw.write_darknet(model, root / "extraction", 64)
    n_conv = sum(layer.n_weights for layer in read_cfg(cfg).layers[:24])
    cut = root / "extraction.conv.weights"
    cut.write_bytes(weights.read_bytes()[:20 + 4 * n_conv])
    return {"root": root, "cfg": cfg, "weights": weights, "cut": cut, "model": model}


def test_classifier_whole_or_convolutions_only(classifier, tmp_path):
    """The whole file gives the whole classifier; the cut one its convolutions, bit for bit."""
    convert_from_darknet(classifier["cfg"], classifier["weights"], tmp_path / "whole.pt")
    convert_from_darknet(classifier["cfg"], classifier["cut"], tmp_path / "convs.pt")
    from utils import load_checkpoint

    whole, convs = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(tmp_path / "convs.pt")
    assert (whole["kind"], whole["contents"], convs["contents"]) == ("backbone", "classifier", "convolutions")
    want = classifier["model"].state_dict()
    assert set(whole["model"]) == set(want) and set(convs["model"]) == {k for k in want if k.startswith("features.")}
    for key, value in convs["model"].items():
        assert torch.equal(value, want[key]) or key.endswith("num_batches_tracked"), key


def test_convolutions_of_the_other_batch_norm_setting_say_which_cfg(classifier, tmp_path):
    """The batch-normed convolutions read against a cfg without batch norm (such as
    extraction.conv.cfg): the counts, and that the file fits them with batch norm."""
    plain = tmp_path / "plain.cfg"
    plain.write_text(classifier["cfg"].read_text().replace("batch_normalize=1\n", ""))
    with pytest.raises(UserError) as err:
        convert_from_darknet(plain, classifier["cut"], tmp_path / "x.pt")
    msg = str(err.value)
    assert "plain.cfg's convolutions (layers 0-23" in msg and "left over" in msg
    assert "it fits these convolutions with batch norm" in msg
    assert not (tmp_path / "x.pt").exists()
