"""encoded_images.py: the images test.py and detect_txt.py feed the network, decoded a batch
at a time on the device, are the pixels dataset.py's evaluation samples hold.

On the CPU the device decode is torchvision's libjpeg-turbo; the GPU's nvJPEG is measured
by bench/bench_eval.py (the mAP it gives beside the host decode's).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

import encoded_images as enc
import predict
import synthetic
from dataset import build_voc_dataset
from errors import UserError

SIZE = 96
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Synthetic VOC-shaped JPEGs, and the files that must take the host path."""
    root = tmp_path_factory.mktemp("encoded")
    csv = synthetic.write_voc_txt_tree(root, 5, size=(150, 110), seed=3)
    source = Image.open(next((root / "images").iterdir())).convert("RGB")
    extra = root / "extra"
    extra.mkdir()
    source.save(extra / "plain.png")
    source.convert("L").save(extra / "grey.jpg", quality=90)          # device path, greyscale
    source.convert("CMYK").save(extra / "cmyk.jpg", quality=90)       # host path: CMYK
    exif = Image.Exif()
    exif[0x0112] = 6                                                   # turned 90 degrees
    source.save(extra / "turned.jpg", quality=90, exif=exif)           # host path: EXIF turn
    return csv, sorted((root / "images").iterdir()), sorted(extra.iterdir())


@pytest.fixture(scope="module")
def mixed(tree, tmp_path_factory):
    """A labelled csv over JPEGs and the files the device does not decode (PNG, EXIF turn)."""
    csv, jpegs, extra = tree
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    label = (csv.parent / "labels" / f"{jpegs[0].stem}.txt").read_text()
    rows = ["img,label"]
    for path in [*jpegs[:3], *(p for p in extra if p.name in ("plain.png", "turned.jpg", "grey.jpg"))]:
        (root / "images" / path.name).write_bytes(path.read_bytes())
        (root / "labels" / f"{path.stem}.txt").write_text(label)
        rows.append(f"{path.name},{path.stem}.txt")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


def batch(paths, on_device=True) -> torch.Tensor:
    items = [enc.EncodedImages(paths, SIZE, on_device)[i] for i in range(len(paths))]
    return enc.decode_batch(items, SIZE, CPU)


def test_device_decode_gives_the_pixels_of_dataset_py(tree):
    csv, jpegs, _ = tree
    dataset = build_voc_dataset(csv, S=2, img_size=SIZE)
    paths = [r.path for r in dataset.records]
    assert all(enc.device_decodes(p)[0] for p in paths)      # all take the batched decode
    pixels = batch(paths)
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(paths), 3, SIZE, SIZE)
    for i in range(len(dataset)):
        assert torch.equal(F.to_dtype(pixels[i], torch.float32, scale=True), dataset[i][0])
        assert torch.equal(dataset.target(i), dataset[i][1])  # the targets test.py scores


def test_other_files_take_the_host_path_and_match_load_image(tree):
    _, _, extra = tree
    decodes = {p.name: enc.device_decodes(p) for p in extra}
    assert {name for name, (plain, _) in decodes.items() if plain} == {"grey.jpg"}
    assert decodes["turned.jpg"][1] == (110, 150)             # the displayed size, turned
    want = torch.stack([enc.resized_pixels(p, SIZE) for p in extra])
    assert torch.equal(batch(extra), want)
    assert torch.equal(batch(extra, on_device=False), want)


def test_a_batch_the_decoder_refuses_is_decoded_file_by_file(tree, monkeypatch):
    """nvJPEG refuses a whole batch for one file: the others are still decoded on the device."""
    _, jpegs, _ = tree
    real = enc.io.decode_jpeg
    calls = []

    def refuse_lists(data, **kwargs):
        calls.append(type(data).__name__)
        if isinstance(data, list):
            raise RuntimeError("nvjpeg: batch refused")
        return real(data, **kwargs)

    want = batch(jpegs)
    monkeypatch.setattr(enc.io, "decode_jpeg", refuse_lists)
    assert torch.equal(batch(jpegs), want)
    assert calls == ["list"] + ["Tensor"] * len(jpegs)


def test_a_truncated_jpeg_is_one_line_naming_it(tmp_path, tree):
    _, jpegs, _ = tree
    broken = tmp_path / "broken.jpg"
    data = jpegs[0].read_bytes()
    broken.write_bytes(data[:len(data) // 2])
    item = enc.EncodedImages([broken], SIZE)[0]
    assert not item.decoded                                   # the header reads fine
    with pytest.raises(UserError, match=f"{broken}: unreadable image"):
        enc.decode_batch([item], SIZE, CPU)


def voc_model(path: Path):
    """A tiny Fast YOLO over the 20 VOC classes whose boxes pass a threshold, saved at ``path``."""
    import utils
    from dataset import load_class_names
    from model import build_model
    from torch import nn

    torch.manual_seed(0)
    model = build_model("fast", S=2, width=1 / 16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that folding must really fold
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.3, 2.0)
        model.head[-1].weight.mul_(20)      # fresh outputs are near 0: spread the scores
        model.head[-1].bias.uniform_(0, 1)
    model.eval()
    utils.save_checkpoint({"kind": "yolo", "model": model.state_dict(), "model_config": model.config,
                           "class_names": list(load_class_names())}, path)
    return model


def test_test_py_gives_the_same_numbers_with_either_decode(tree, tmp_path, scripts):
    """One checkpoint, --decode device (bytes from a reading process) and --decode host: the
    same JSON; and the boxes of predict_files equal those of training's validation pass
    (predict_dataset, eager)."""
    from types import SimpleNamespace

    import inference
    from distributed import Dist

    csv, _, _ = tree
    model = voc_model(tmp_path / "tiny.pt")
    results = []
    for decode in ("device", "host"):
        out = tmp_path / f"{decode}.json"
        run = scripts.run("test.py", tmp_path / "tiny.pt", "--data", csv, "--device", "cpu", "--decode",
                          decode, "--batch-size", "2", "--workers", "1" if decode == "device" else "0",
                          "--json", out)
        assert run.rc == 0, str(run)
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and results[0]["images"] == 5

    dataset = build_voc_dataset(csv, S=2, img_size=model.input_size)
    args = SimpleNamespace(batch_size=2, workers=0, decode="device", conf_threshold=0.05, nms_iou=0.5)
    runner = inference.load(tmp_path / "tiny.pt", "cpu")
    got, outputs = predict.predict_files(runner, [r.path for r in dataset.records], args, keep_outputs=True)
    want = predict.predict_dataset(model, dataset, 2, Dist(), 0.05, 0.5)
    assert outputs.shape == (5, 2 * 2 * (20 + 5 * 2))
    assert sum(len(d) for d in want.values()) >= 5             # the comparison is not vacuous
    for i in range(len(dataset)):
        assert got[i].shape == want[i].shape
        np.testing.assert_allclose(got[i], want[i], atol=2e-3)  # folded batch norm: rounding only


@pytest.mark.parametrize("augment", [True, False])
def test_training_samples_decoded_on_the_device_are_the_workers_samples(mixed, augment):
    """train.py --decode device: the same draws, targets and factors as --decode host, and on
    the CPU the same pixels (a GPU's resize rounds on its own: bench, not here)."""
    from dataset import collate_encoded
    from distributed import SeededDataset

    data = build_voc_dataset(mixed, S=2, img_size=SIZE, train=augment, uint8=True)
    data.shuffle_boxes = True                       # a draw after the augmentation's
    seeded = SeededDataset(data, seed=5)
    seeded.epoch = 3
    host = [seeded[i] for i in range(len(data))]
    data.encoded = True
    encoded = [seeded[i] for i in range(len(data))]
    items, targets, factors = collate_encoded(encoded)
    assert [item.decoded for item in items] == [False] * 4 + [True, True]   # grey.jpg on the device
    pixels = enc.decode_batch(items, SIZE, CPU)
    for i, (image, target, factor) in enumerate(host):
        assert torch.equal(pixels[i], image), data.records[i].path.name
        assert torch.equal(targets[i], target) and torch.equal(factors[i], factor)
    if augment:  # the draws really vary: not every image the plain resize
        plain = torch.stack([enc.resized_pixels(r.path, SIZE) for r in data.records])
        assert not torch.equal(pixels, plain)


def test_train_py_trains_with_device_decode(mixed, tmp_path, scripts):
    """A whole epoch through the loader workers and decode_batch, and --decode on resume."""
    common = ["--data", mixed, "--model", "fast", "--width", "0.0625", "--S", "2", "--batch-size", "3",
              "--workers", "1", "--device", "cpu", "--lr", "1e-4", "--project", tmp_path, "--name", "run"]
    run = scripts.run("train.py", *common, "--epochs", "1", "--decode", "device")
    assert run.rc == 0, str(run)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["images"] == 6 and np.isfinite(rows[-1]["loss"])
    resumed = scripts.run("train.py", *common, "--epochs", "2", "--decode", "host", "--resume", tmp_path / "run")
    assert resumed.rc == 0, str(resumed)

