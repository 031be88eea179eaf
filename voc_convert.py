"""Convert a VOCdevkit tree to the YOLO txt layout, like Darknet's scripts/voc_label.py.

    python voc_convert.py --devkit VOCdevkit --sets 2007/trainval 2012/trainval 2007/test --out voc

writes into OUT:

* ``images/<id>.jpg``: hard links to the devkit's JPEGs (no extra disk space, and they
  survive moving or deleting the devkit); copies where a hard link is impossible (another
  file system). ``--link copy`` or ``--link symlink`` chooses otherwise.
* ``labels/<id>.txt``: ``class_id x_center y_center width height`` (relative), difficult
  objects left out, as voc_label.py does for training.
* ``labels_difficult/<id>.txt``: the difficult objects, same format, only for images that
  have some. VOCTxtDataset reads them for evaluation (flagged difficult), never for targets;
  other tools that only know ``labels/`` see exactly voc_label.py's output.
* ``train.csv`` (every set not named ``test``) and ``test.csv`` (the ``test`` sets), rows
  ``<id>.jpg,<id>.txt`` under an ``img,label`` header, as in the Kaggle copy of VOC.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqdm import tqdm

import argtypes
from dataset import load_class_names, parse_split, read_devkit_split, refuse_repeated_ids, voc_year_dir
from voc_txt import write_csv, write_label_file
from utils import UserError, run_cli


def place_image(source: Path, target: Path, link: str) -> None:
    """Put ``source`` at ``target`` by hard link (falling back to a copy), symlink or copy."""
    target.unlink(missing_ok=True)
    if link == "hard":
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or links not allowed there: copy instead
    if link == "symlink":
        target.symlink_to(source.resolve())
    else:
        shutil.copyfile(source, target)


DEFAULT_SETS = ("2007/trainval", "2012/trainval", "2007/test")


def read_splits(devkit: Path, splits, class_names, explicit: bool) -> dict[tuple[str, str], list]:
    """Every image and annotation of every split, read before anything is written: a bad
    file, a missing split or an image id in two splits stops the conversion with nothing
    written. Without --sets, a year the devkit lacks (a VOC2007-only tree) is skipped,
    saying so; a --sets entry it lacks is an error."""
    read, seen = {}, {}
    for year, image_set in splits:
        if not explicit and not has_year(devkit, year):
            print(f"note: {devkit}: no VOC{year}, skipping {year}/{image_set} (--sets chooses the sets)")
            continue
        read[year, image_set] = items = read_devkit_split(devkit, year, image_set, class_names)
        refuse_repeated_ids(seen, items, f"{year}/{image_set}")  # one output name per image
    if not read:
        raise UserError(f"{devkit}: none of the sets {', '.join(map('/'.join, splits))} is there")
    return read


def has_year(devkit: Path, year: str) -> bool:
    try:
        return voc_year_dir(devkit, year).is_dir()
    except UserError:
        return False


def convert_split(items, out: Path, link: str, name: str) -> list[tuple[str, str]]:
    """Write one year/set's ``items`` (read_devkit_split) into ``out``; returns its csv rows."""
    rows = []
    for image_id, image_path, ann in tqdm(items, desc=name, unit="img", leave=False):
        place_image(image_path, out / "images" / f"{image_id}.jpg", link)
        easy, hard = ~ann["difficult"], ann["difficult"]
        size = (ann["width"], ann["height"])
        write_label_file(out / "labels" / f"{image_id}.txt", ann["boxes"][easy], ann["labels"][easy], *size)
        if hard.any():
            write_label_file(out / "labels_difficult" / f"{image_id}.txt",
                             ann["boxes"][hard], ann["labels"][hard], *size)
        rows.append((f"{image_id}.jpg", f"{image_id}.txt"))
    return rows


OUTPUTS = ("images", "labels", "labels_difficult", "train.csv", "test.csv")  # what a conversion writes


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT, or with ``--overwrite`` remove what a previous conversion
    wrote there (only OUTPUTS: other files stay), before anything is written.

    Converting into a previous conversion's folder overwrote edited labels and left its
    ``labels_difficult`` files behind, where a now-easy object was read a second time (#14).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        raise UserError(f"{out}: output folder is not empty ({', '.join(present[:3])}"
                        f"{' ...' if len(present) > 3 else ''}); choose a new --out, or --overwrite to "
                        "replace a previous conversion's images/, labels*/ and csv files")
    for name in OUTPUTS if overwrite else ():
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def main(argv=None) -> None:
    parser = argtypes.ArgumentParser(description="VOCdevkit -> YOLO txt layout (images/, labels/, csv files).")
    parser.add_argument("--devkit", required=True, help="VOCdevkit folder (holding VOC2007, VOC2012)")
    parser.add_argument("--sets", nargs="+",
                        help="YEAR/SET entries; sets named 'test' go to test.csv, the rest to train.csv "
                             f"(default: {' '.join(DEFAULT_SETS)}, those the devkit has)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--link", choices=("hard", "symlink", "copy"), default="hard",
                        help="how images get into OUT/images (default: hard link, else copy)")
    parser.add_argument("--names", help="class names file, one per line (default: VOC's 20)")
    parser.add_argument("--overwrite", action="store_true",
                        help="OUT may hold a previous conversion: its images/, labels*/ and csv files are "
                             "removed first (without this, a non-empty OUT is refused)")
    args = parser.parse_args(argv)
    devkit, out = Path(args.devkit), Path(args.out)
    if not devkit.is_dir():
        raise UserError(f"{devkit}: VOCdevkit folder not found")
    class_names = load_class_names(args.names)
    splits = [pair for entry in args.sets or DEFAULT_SETS for pair in parse_split(entry)]
    read = read_splits(devkit, splits, class_names, explicit=args.sets is not None)
    try:
        prepare_out(out, args.overwrite)
        for sub in ("images", "labels", "labels_difficult"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out}: cannot create the output folders ({err.strerror})") from None
    csv_rows = {"train.csv": [], "test.csv": []}
    for (year, image_set), items in read.items():
        rows = convert_split(items, out, args.link, f"{year}/{image_set}")
        csv_rows["test.csv" if image_set == "test" else "train.csv"].extend(rows)
        print(f"{year}/{image_set}: {len(rows)} images")
    for name, rows in csv_rows.items():
        if rows:
            write_csv(out / name, rows)
            print(f"wrote {out / name} ({len(rows)} images)")


if __name__ == "__main__":
    run_cli(main)
