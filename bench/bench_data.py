"""Data-loading speed: one sample (decode, augment or resize, target) and dataset start-up.

    python bench/bench_data.py [--images 40] [--files 16551] [--size 448]

Builds synthetic trees in a temporary folder: VOC-sized JPEGs (500 x 375) for the
per-sample times, and ``--files`` label files / XML annotations (VOC 2007+2012 trainval
has 16,551) for the start-up times, which parse every annotation. Prints medians of
``--repeats`` runs, in one thread, as a DataLoader worker runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset  # noqa: E402
import synthetic  # noqa: E402


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
    dataset.write_csv(txt / "train.csv", [(f"{i}.jpg", f"{i}.txt") for i in ids])
    return txt / "train.csv", devkit


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--files", type=int, default=16551)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv_path = synthetic.write_voc_txt_tree(root / "samples", args.images, size=(500, 375), seed=0)
        for train in (False, True):
            data = dataset.build_voc_dataset(csv_path, img_size=args.size, train=train)
            seconds = median_seconds(lambda: [data[i] for i in range(len(data))], args.repeats)
            print(f"{'train' if train else 'eval':5} sample, 500x375 JPEG -> {args.size}: "
                  f"{1000 * seconds / len(data):.2f} ms")
        csv_big, devkit = many_annotations(root / "many", args.files)
        for name, source in (("csv + txt label files", csv_big), ("VOCdevkit XML files", devkit)):
            build = lambda: dataset.build_voc_dataset(source, split="2007/trainval")  # noqa: E731
            seconds = median_seconds(build, max(1, args.repeats // 2))
            print(f"start-up, {len(build())} {name}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
