"""synthetic.py: deterministic, boxes that fit the drawn shapes exactly, and the layouts."""
import numpy as np
from PIL import Image, ImageDraw

import synthetic
from utils import VOC_CLASSES


def test_same_seed_same_images_and_image_i_independent_of_count():
    a = synthetic.make_samples(3, 64, seed=7)
    b = synthetic.make_samples(5, 64, seed=7)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.labels, y.labels)
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(synthetic.make_samples(1, 64, seed=8)[0].image))


def test_each_shape_fills_exactly_its_box():
    rng = np.random.default_rng(0)
    for shape in synthetic.SHAPES:
        for box in ([5, 7, 40, 30], [10, 3, 22, 44], [0, 0, 48, 48]):
            image = Image.new("RGB", (48, 48), (0, 0, 0))
            synthetic.draw_shape(ImageDraw.Draw(image), shape, box, (200, 100, 50), rng)
            ys, xs = np.nonzero(np.asarray(image).any(axis=2))
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box, (shape, box)


def test_samples_vary_and_classes_follow_shapes():
    samples = synthetic.make_samples(40, 96, seed=1, vary_aspect=True)
    counts = [len(s.labels) for s in samples]
    assert min(counts) >= 1 and max(counts) >= 3
    assert {s.image.size for s in samples} == {(96, 96), (72, 96), (96, 72)}
    for s in samples:
        assert [synthetic.SHAPE_CLASSES[name] for name in s.shapes] == s.labels.tolist()
        assert (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2] <= s.image.size[0]).all()
    labels = np.concatenate([s.labels for s in samples])
    assert set(labels.tolist()) == set(synthetic.SHAPE_CLASSES.values())
    assert [VOC_CLASSES[c] for c in synthetic.SHAPE_CLASSES.values()] == ["tvmonitor", "sheep", "boat", "aeroplane"]


def test_writers_lay_out_the_trees(tmp_path):
    csv_path = synthetic.write_voc_txt_tree(tmp_path / "txt", 3, size=48, seed=0, difficult_rate=1.0)
    assert csv_path.read_text().splitlines()[0] == "img,label"
    assert (tmp_path / "txt" / "labels" / "synth_000000.txt").read_text() == ""
    assert (tmp_path / "txt" / "labels_difficult" / "synth_000000.txt").read_text()
    devkit = synthetic.write_vocdevkit_tree(tmp_path / "dk", {"2012/train": 2}, size=48)
    assert (devkit / "VOC2012" / "ImageSets" / "Main" / "train.txt").read_text() == "2012_000001\n2012_000002\n"
    root = synthetic.write_imagenet_tree(tmp_path / "in", n_classes=2, n_train_per_class=1, n_val_per_class=1,
                                         size=32, val_layout="folders")
    assert sorted(p.name for p in (root / "val").iterdir()) == ["n04254680", "n04404412"]


def test_demo_classes_are_named_for_their_shapes():
    """data/shapes/ labels index data/shapes/names.txt (the --names file of the demo
    recipe): id 0 is a cross, 1 a rectangle. Regenerating the first images of each csv
    gives the shapes the label files name; guards against names and labels drifting apart
    (before, a rectangle was labelled 19, 'tvmonitor')."""
    from pathlib import Path

    import train
    from dataset import load_class_names
    from voc_txt import read_label_file

    shapes = Path(__file__).resolve().parents[1] / "data" / "shapes"
    names = load_class_names(shapes / "names.txt")
    assert names == synthetic.EASY_NAMES == ("cross", "rectangle")
    assert train.parse_args([]).names == "data/shapes/names.txt"
    assert load_class_names(shapes.parent / "voc.names") == VOC_CLASSES  # for the VOC-id samples
    ids = {int(line.split()[0]) for f in (shapes / "labels").glob("*.txt") for line in f.read_text().splitlines()}
    assert ids == {0, 1}
    for csv_name, seed in (("train", 5), ("val", 6), ("test", 7)):
        for i, sample in enumerate(synthetic.make_samples(4, 128, seed=seed, **synthetic.EASY)):
            _, labels = read_label_file(shapes / "labels" / f"{csv_name}_{i:06d}.txt", len(names))
            assert [names[c] for c in labels] == sample.shapes, (csv_name, i)
