"""Data-loading speed: one sample, a DataLoader with N workers, and dataset start-up.

    python bench/bench_data.py [--images 40] [--files 16551] [--size 448] [--workers 0,1,2]

Builds synthetic trees in a temporary folder: VOC-sized JPEGs (500 x 375) for the
per-sample times, and ``--files`` label files / XML annotations (VOC 2007+2012 trainval
has 16,551) for the start-up times, which parse every annotation. Per sample: medians of
``--repeats`` runs in one thread, as a DataLoader worker runs; JPEG decoding alone by PIL
(as images.load_image) and by ``torchvision.io.decode_jpeg``. Per loader: images/s of a
``torch.utils.data.DataLoader`` (batch ``--batch``) over the training set (the paper's
augmentation and target encoding) and the ImageNet training transform at 224, for each
worker count in ``--workers``, in the steady state (worker start-up and prefetch excluded).
Compare with bench_train.py's images/s to see which bounds an epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

import dataset  # noqa: E402
import voc_txt  # noqa: E402
import images  # noqa: E402
from imagenet import build_imagenet  # noqa: E402
import synthetic  # noqa: E402
from machine import load_average, machine  # noqa: E402


def median_seconds(func, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def many_annotations(root: Path, count: int) -> tuple[Path, Path]:
    """``count`` copies of one image's labels, as a csv tree and as a VOCdevkit tree."""
    devkit = synthetic.write_vocdevkit_tree(root, {"2007/trainval": 1}, size=64, seed=0)
    year = devkit / "VOC2007"
    xml = (year / "Annotations" / "000001.xml").read_text()
    image = year / "JPEGImages" / "000001.jpg"
    txt = root / "txt"
    (txt / "images").mkdir(parents=True)
    (txt / "labels").mkdir()
    ids = [f"{i:06d}" for i in range(2, count + 2)]
    for i in ids:
        (year / "Annotations" / f"{i}.xml").write_text(xml)
        os.link(image, year / "JPEGImages" / f"{i}.jpg")
        os.link(image, txt / "images" / f"{i}.jpg")
        (txt / "labels" / f"{i}.txt").write_text("14 0.5 0.5 0.2 0.2\n7 0.3 0.3 0.1 0.1\n3 0.6 0.7 0.2 0.3\n")
    (year / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    voc_txt.write_csv(txt / "train.csv", [(f"{i}.jpg", f"{i}.txt") for i in ids])
    return txt / "train.csv", devkit


class Repeat(torch.utils.data.Dataset):
    """``data`` repeated to ``length`` samples (a few JPEGs stand for an epoch of them)."""

    def __init__(self, data, length: int):
        self.data, self.length = data, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.data[index % len(self.data)]


def loader_rate(data, workers: int, batch: int, batches: int) -> float:
    """Steady-state images/s of a DataLoader over ``data``: the clock starts once the
    batches that the workers prefetch while starting up (2 each) have been taken."""
    ahead = max(1, 2 * workers)
    loader = torch.utils.data.DataLoader(Repeat(data, batch * (batches + ahead)), batch_size=batch,
                                         shuffle=True, num_workers=workers)
    iterator = iter(loader)
    for _ in range(ahead):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(batch[1]) for batch in iterator)
    return count / (time.perf_counter() - start)


def decode_times(paths: list[Path], repeats: int) -> dict:
    """Seconds per JPEG: PIL (images.load_image, as the datasets decode) and torchvision.io."""
    from torchvision.io import decode_jpeg, read_file
    pil = median_seconds(lambda: [images.load_image(p) for p in paths], repeats) / len(paths)
    with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its image decoders
        warnings.simplefilter("ignore", DeprecationWarning)
        tv = median_seconds(lambda: [decode_jpeg(read_file(str(p))) for p in paths], repeats) / len(paths)
    return {"pil_s": pil, "torchvision_decode_jpeg_s": tv}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--files", type=int, default=16551)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--batch", type=int, default=32, help="DataLoader batch size")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "data.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = {"machine": machine(), "load_average_before": load_average(), "size": args.size}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"load average {report['load_average_before']}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv_path = synthetic.write_voc_txt_tree(root / "samples", args.images, size=(500, 375), seed=0)
        train_set = sample_times(csv_path, args, report)
        report["decode"] = decode_times(sorted((root / "samples" / "images").glob("*.jpg")), args.repeats)
        print(f"JPEG decode alone, 500x375: PIL {1000 * report['decode']['pil_s']:.2f} ms, "
              f"torchvision.io.decode_jpeg {1000 * report['decode']['torchvision_decode_jpeg_s']:.2f} ms")
        imagenet = synthetic.write_imagenet_tree(root / "imagenet", n_classes=4, n_train_per_class=8, size=400)
        report["loader"] = loader_rates({
            "voc train, float": train_set,
            "voc train, uint8 (train.py)": dataset.build_voc_dataset(csv_path, img_size=args.size,
                                                                    train=True, uint8=True),
            "imagenet train @224, float": build_imagenet(imagenet, train=True),
            "imagenet train @224, uint8 (darknet_train.py)": build_imagenet(imagenet, train=True,
                                                                           uint8=True)}, args)
        csv_big, devkit = many_annotations(root / "many", args.files)
        for name, source in (("csv + txt label files", csv_big), ("VOCdevkit XML files", devkit)):
            build = lambda: dataset.build_voc_dataset(dataset.VOCSource(source, split="2007/trainval"))  # noqa: E731
            seconds = median_seconds(build, max(1, args.repeats // 2))
            report[f"startup_{name}_s"] = seconds
            print(f"start-up, {len(build())} {name}: {seconds:.2f} s")
    report["load_average_after"] = load_average()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def sample_times(csv_path: Path, args, report: dict):
    """One eval and one training sample (float, and uint8 as train.py loads them), in ms;
    returns the float training set."""
    for name, train, uint8 in (("eval", False, False), ("train uint8", True, True), ("train", True, False)):
        data = dataset.build_voc_dataset(csv_path, img_size=args.size, train=train, uint8=uint8)
        seconds = median_seconds(lambda: [data[i] for i in range(len(data))], args.repeats)
        report[f"{name.replace(' ', '_')}_sample_s"] = seconds / len(data)
        print(f"{name:11} sample, 500x375 JPEG -> {args.size}: {1000 * seconds / len(data):.2f} ms")
    return data


def loader_rates(sets: dict, args) -> list[dict]:
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        for name, data in sets.items():
            rate = loader_rate(data, workers, args.batch, args.batches)
            rows.append({"data": name, "workers": workers, "images_per_s": rate})
            print(f"DataLoader, {name}, {workers} workers, batch {args.batch}: {rate:.1f} images/s")
    return rows


if __name__ == "__main__":
    main()
