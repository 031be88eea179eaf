"""Write one txt of detections per image, for Rafael Padilla's Object-Detection-Metrics.

    python detect_txt.py runs/train/demo/best.pt --data data/shapes/test.csv
    python pascalvoc.py -gt $PWD/runs/detect_txt/exp/groundtruths \
        -det $PWD/runs/detect_txt/exp/detections -gtformat xyrb -detformat xyrb -np
    python evaluate.py --gt runs/detect_txt/exp/groundtruths \
        --det runs/detect_txt/exp/detections --difficult count      # the same mAP

Detections go to ``detections/<image>.txt`` as ``class confidence left top right bottom``
and, when the data has labels, ground truth to ``groundtruths/<image>.txt`` as
``class left top right bottom``, in absolute pixels of the original image, class names as
text, one space between fields (Padilla's reader splits on single spaces). A difficult
object's line ends in a sixth field ``difficult``: Padilla's toolkit ignores the extra
field and counts the object, evaluate.py ignores it (VOC2007 rule) unless
``--difficult count``. ``--format voc`` also writes the VOC evaluation server's
``results/comp4_det_test_<class>.txt`` files (voc_results.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import argtypes
import predict
import runs
from dataset import VOCSource, build_image_dataset, build_voc_dataset
from box_files import refuse_name_clashes
from utils import UserError, run_cli
from voc_results import unwritable, write_results


def build_parser() -> argparse.ArgumentParser:
    p = argtypes.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_inference_args(p, conf_threshold=0.005, batch_size=16,
                               conf_help="keep boxes scoring above this (the mAP needs almost all)")
    predict.add_dataset_args(p, "a csv of image,label pairs, a VOCdevkit folder, or a folder of images "
                                "(no labels)")
    p.add_argument("--project", default="runs/detect_txt", help="parent of the output folder")
    p.add_argument("--name", default="exp", help="output folder name; exp2, exp3 ... if taken")
    p.add_argument("--format", choices=("txt", "voc"), default="txt",
                   help="txt: detections/<image>.txt (Padilla's format); voc: also results/"
                        "comp4_det_test_<class>.txt, the VOC server's and Darknet's (voc_results.py)")
    return p


def det_lines(dets, names) -> str:
    return "".join(f"{names[int(c)]} {s:.6f} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}\n"
                   for c, s, x1, y1, x2, y2 in dets.tolist())


def gt_lines(ann, names) -> str:
    flags = ann.get("difficult", [False] * len(ann["labels"]))
    return "".join(f"{names[int(c)]} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}{' difficult' if d else ''}\n"
                   for c, (x1, y1, x2, y2), d in zip(ann["labels"], ann["boxes"].tolist(), flags))


def load_data(args, names, model):
    """A labelled dataset (csv or VOCdevkit), or the images of a plain folder."""
    path = Path(args.data)
    is_devkit = path.is_dir() and any(path.glob("VOC*/Annotations"))
    if path.is_dir() and not is_devkit:
        return build_image_dataset(path, img_size=model.input_size), False
    return build_voc_dataset(VOCSource.of(args), names, S=model.S, img_size=model.input_size), True


def main(argv=None):
    args = build_parser().parse_args(argv)
    predict.check_inference_args(args)
    model = predict.open_runner(args)
    names = model.names
    predict.check_box_file_names(names, args.checkpoint)
    dataset, labelled = load_data(args, names, model)
    ids = [dataset.annotation(i)["image_id"] for i in range(len(dataset))]
    refuse_name_clashes((f"{image_id}.txt", record.path) for image_id, record in zip(ids, dataset.records))
    if args.format == "voc" and unwritable(names, ids):
        raise UserError(f"{args.checkpoint}, {args.data}: {unwritable(names, ids)}")
    model = predict.for_job(model, len(dataset), args)
    dets, _ = predict.predict_files(model, [record.path for record in dataset.records], args)
    out = runs.make_run_dir(args.project, args.name)
    if args.format == "voc":  # also the per-image files below: evaluate.py scores either
        write_results(out / "results", [(ids[i], dets[i]) for i in range(len(dataset))], names)
    (out / "detections").mkdir()
    if labelled:
        (out / "groundtruths").mkdir()
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        (out / "detections" / f"{ann['image_id']}.txt").write_text(det_lines(dets[i], names))
        if labelled:
            (out / "groundtruths" / f"{ann['image_id']}.txt").write_text(gt_lines(ann, names))
    print(f"{len(dataset)} image{'s' * (len(dataset) != 1)}: detections in {out / 'detections'}"
          + (f", VOC results files in {out / 'results'}" if args.format == "voc" else "")
          + (f", ground truth in {out / 'groundtruths'}" if labelled else "") + f" ({model.description})")


if __name__ == "__main__":
    run_cli(main)
