"""Training as Darknet does (issue #13 part 4): train.py building every network of the
registry with its own settings, Darknet's update (half gradient, delta clamped to [-1, 1]),
the seeded-random cell winner, the flip option and the ``darknet`` recipe's schedule.

The scripts run through the fork server (conftest's ``scripts``) on tiny generated VOC trees
(S = 2, 128-pixel inputs, 1/16 of the filters).
"""
from __future__ import annotations

import json

import pytest
import torch

import darknet_weights as dw
from darknet_cfg import read_cfg
from scripts_server import ok
from synthetic import write_voc_txt_tree
from utils import load_checkpoint

SMALL = ["--S", "2", "--width", "0.0625", "--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc_txt_tree(root, 16, size=128, seed=0, csv_name="train.csv", prefix="tr_")
    return root


# --------------------------------------------------------------------------- 1. registry networks
def test_train_builds_yolov1_darknet_with_its_own_options(tree, scripts, tmp_path):
    """Guards against train.py passing its own B=2 and hidden=4096 to every network, which
    turned yolov1-darknet (B=3, a locally connected layer, no hidden layer) into another one."""
    ok(scripts.run("train.py", "--model", "yolov1-darknet", "--data", tree / "train.csv", *SMALL,
                   "--epochs", "1", "--project", tmp_path, "--name", "d"))
    ckpt = load_checkpoint(tmp_path / "d" / "last.pt")
    config = ckpt["model_config"]
    assert (config["name"], config["B"], config["hidden"], config["local"], config["darknet_bn"]) == \
        ("yolov1-darknet", 3, 0, 256, True)
    assert ckpt["model"]["head.0.weight"].shape[0] == 2 * 2  # one filter bank per position (S x S)
    assert ckpt["model"]["head.4.weight"].shape == (2 * 2 * (20 + 5 * 3), 2 * 2 * 256)
    row = json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["images"] == 16 and row["loss"] == row["loss"]  # one epoch trained, finite


def test_extraction_conv_weights_start_train_py_backbone(tree, scripts, tmp_path):
    """extraction.cfg at 1/16 of its filters, written by the project, cut after its 20
    convolutions as Darknet's ``partial`` cuts extraction.conv.weights, converted by
    darknet_convert.py: train.py --model yolov1-darknet --backbone starts from exactly
    those convolutions."""
    from darknet_model import Darknet

    torch.manual_seed(3)
    classifier = Darknet(num_classes=10, width=0.0625, head="conv", darknet_bn=True).eval()
    cfg, weights = dw.write_darknet(classifier, tmp_path / "extraction", 64)
    n_conv = sum(layer.n_weights for layer in read_cfg(cfg).layers[:24])
    cut = tmp_path / "extraction.conv.weights"
    cut.write_bytes(weights.read_bytes()[:20 + 4 * n_conv])
    ok(scripts.run("darknet_convert.py", cfg, cut, "-o", tmp_path / "conv.pt"))
    ok(scripts.run("train.py", "--model", "yolov1-darknet", "--data", tree / "train.csv", *SMALL,
                   "--epochs", "1", "--lr", "1e-12", "--backbone", tmp_path / "conv.pt",
                   "--project", tmp_path, "--name", "b"))
    trained = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for key, value in classifier.features.state_dict().items():
        if key.endswith("weight"):  # batch norm's running statistics move in training mode
            assert torch.allclose(trained[f"features.{key}"], value, atol=1e-6), key


# --------------------------------------------------------------------------- 2. Darknet's update
def test_darknet_update_is_half_the_gradient_clamped_per_image():
    """S = 1, B = 1, C = 1, confidence target 1, a batch of two: an image with an object and
    an empty one. Per image, equation 3's gradient by hand (2 * lambda * (output - truth)):
    class 2(0.2 - 1) = -1.6, confidence 2(0.4 - 1) = -1.2, x 2*5(0.9 - 0.5) = 4,
    y 2*5(0.5 - 0.55) = -0.5, sqrt w 2*5(0.5 - 0.8) = -3, sqrt h 2*5(0.6 - 0.6) = 0; the empty
    image's confidence 2*0.5*3 = 3. The default gives these over the batch (/2); Darknet's
    update half of each, clamped to [-1, 1], then /2. Guards against a clamp in the units of
    the batch mean (or of the mixed-precision loss scale) instead of Darknet's per-image delta."""
    from loss import DarknetUpdate, YoloLoss

    pred = torch.tensor([[0.2, 0.4, 0.9, 0.5, 0.5, 0.6], [0.0, 3.0, 0.5, 0.5, 0.5, 0.5]])
    target = torch.zeros(2, 1, 1, 6)
    target[0, 0, 0] = torch.tensor([1.0, 1.0, 0.5, 0.55, 0.64, 0.36])
    per_image = torch.tensor([[-1.6, -1.2, 4.0, -0.5, -3.0, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    plain = YoloLoss(1, 1, 1, rescore=False)
    darknet = DarknetUpdate(plain)
    grads = {}
    for name, fn in (("plain", plain), ("darknet", darknet)):
        p = pred.clone().requires_grad_()
        value = fn(p, target)
        (value * 1024).backward()  # a mixed-precision loss scale multiplies both alike
        grads[name] = p.grad / 1024
        grads[name + " value"] = value.detach()
    torch.testing.assert_close(grads["plain"], per_image / 2, rtol=0, atol=1e-6)
    want = torch.tensor([[-0.8, -0.6, 1.0, -0.25, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]) / 2
    torch.testing.assert_close(grads["darknet"], want, rtol=0, atol=1e-6)
    assert grads["darknet value"] == grads["plain value"]  # the logged loss is still equation 3's


# --------------------------------------------------------------------------- 3. the cell winner
def test_cell_winner_is_seeded_random_per_seed_epoch_and_image(tmp_path):
    """Two objects (classes 3 and 7) whose centres share the one cell of S = 1: with
    shuffle_boxes the winner changes with the epoch, as Darknet's randomize_boxes reshuffles
    each time an image loads, and is the same for the same (seed, epoch, index), so a resumed
    run sees the same targets. Without it the first object always wins."""
    from PIL import Image

    from dataset import VOCTxtDataset
    from distributed import SeededDataset

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (64, 64), (90, 120, 30)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "labels" / "a.txt").write_text("3 0.4 0.5 0.3 0.3\n7 0.6 0.5 0.2 0.4\n")
    (tmp_path / "all.csv").write_text("a.jpg,a.txt\n")
    data = VOCTxtDataset(tmp_path / "all.csv", S=1, img_size=64)

    def winners(seed, shuffle):
        data.shuffle_boxes = shuffle
        seeded = SeededDataset(data, seed)
        out = []
        for epoch in range(16):
            seeded.epoch = epoch
            out.append(int(seeded[0][1][0, 0, :20].argmax()))
        return out

    assert winners(0, False) == [3] * 16
    first = winners(0, True)
    assert set(first) == {3, 7}                      # the winner varies with the epoch
    assert winners(0, True) == first                 # and is reproducible
    assert winners(5, True) != first                 # another seed, other winners


# --------------------------------------------------------------------------- 4. flip
def test_flip_mirrors_image_and_boxes_exactly(tree):
    """No jitter, the same random draws, flip probability 1 against 0: the image is the
    mirror image pixel for pixel and each box's x edges become 1 - x (dyadic numbers, so
    exactly). train.py --no-flip turns it off; flipping is the default (Darknet's)."""
    import train
    from transforms import YoloAugment

    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    boxes, labels = torch.tensor([[0.25, 0.125, 0.5, 0.75], [0.0, 0.5, 0.375, 1.0]]), torch.tensor([4, 9])
    out = {}
    for flip in (0.0, 1.0):
        torch.manual_seed(7)
        out[flip] = YoloAugment(64, jitter=0.0, flip=flip).sample(image, boxes, labels)
    assert torch.equal(out[0.0][0], image) and torch.equal(out[1.0][0], image.flip(-1))
    assert torch.equal(out[0.0][1], boxes)
    assert torch.equal(out[1.0][1], torch.tensor([[0.5, 0.125, 0.75, 0.75], [0.625, 0.5, 1.0, 1.0]]))
    assert torch.equal(out[1.0][2], labels) and torch.equal(out[1.0][3], out[0.0][3])
    for argv, p in (([], 0.5), (["--no-flip"], 0.0)):
        args = train.parse_args(["--data", str(tree / "train.csv"), "--S", "2", *argv])
        assert train.build_datasets(args, torch.device("cpu"))[0].augment.flip == p


# --------------------------------------------------------------------------- 5. the darknet recipe
def test_steps_schedule_follows_yolov1_cfg_by_hand():
    """cfg/yolov1.cfg: learning_rate 0.0005, steps 200,400,600,20000,30000, scales
    2.5,2,2,.1,.1. Darknet's get_current_rate at batch number b multiplies the scales of the
    steps <= b, and the update made after optimiser step k (0-based) runs at b = k + 1
    (train_network_datum counts the images first). Worked out by hand:
    b 1..199: 0.0005; 200..399: 0.00125; 400..599: 0.0025; 600..19999: 0.005;
    20000..29999: 0.0005; from 30000: 0.00005."""
    import schedule
    import train

    args = train.parse_args(["--recipe", "darknet", "--data", "x.csv"])
    want = {0: 5e-4, 198: 5e-4, 199: 1.25e-3, 398: 1.25e-3, 399: 2.5e-3, 599: 5e-3, 19998: 5e-3,
            19999: 5e-4, 29998: 5e-4, 29999: 5e-5, 39999: 5e-5}
    for step, lr in want.items():
        assert args.lr * schedule.lr_factor(step / 250, args, step) == pytest.approx(lr, rel=1e-12), step
    # the same through the optimiser's per-step scheduler
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=args.lr)
    sched = schedule.build_scheduler(opt, args, steps_per_epoch=250)
    seen = []
    for _ in range(601):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert (seen[198], seen[199], seen[399], seen[600]) == pytest.approx((5e-4, 1.25e-3, 2.5e-3, 5e-3))


def test_darknet_recipe_trains_max_batches_in_whole_epochs(tree, scripts, tmp_path):
    """16 images at batch 8 are 2 steps an epoch: --max-batches 5 rounds up to 3 epochs.
    With steps 2,4 and scales 2,.5 the rate at the start of each epoch (steps 0, 2, 4, so
    batch numbers 1, 3, 5) is lr, 2 lr, lr. The recipe's own choices are in config.json."""
    ok(scripts.run("train.py", "--recipe", "darknet", "--data", tree / "train.csv", *SMALL,
                   "--max-batches", "5", "--lr-steps", "2", "4", "--lr-scales", "2", "0.5", "--lr", "1e-4",
                   "--project", tmp_path, "--name", "dk"))
    rows = [json.loads(x) for x in (tmp_path / "dk" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 2e-4, 1e-4])
    config = json.loads((tmp_path / "dk" / "config.json").read_text())
    assert (config["update"], config["grad_clip"], config["flip"], config["cell_winner"]) == \
        ("darknet", 0.0, True, "random")
    assert load_checkpoint(tmp_path / "dk" / "last.pt")["model_config"]["B"] == 3
