"""Shapes, parameter counts and structure of YOLOv1, Fast YOLO and the Darknet backbone.

Parameter counts are computed here from the paper's Figure 3 table (written out again
below, not imported from the production layer tables). The full-size networks are built
on the ``meta`` device: shapes and parameter counts without allocating 1 GB of weights.
Forward passes run only on tiny configurations (width 1/16, small S, small hidden).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import utils
from darknet_model import Darknet
from model import FastYOLO, YOLOv1, build_model, load_backbone, model_from_config

TINY = 1 / 16

# Paper Figure 3, written out independently: (kernel, filters, stride) of the 24 convolutions.
FIG3_FIRST_20 = (
    [(7, 64, 2)]                                               # block 1
    + [(3, 192, 1)]                                            # block 2
    + [(1, 128, 1), (3, 256, 1), (1, 256, 1), (3, 512, 1)]     # block 3
    + [(1, 256, 1), (3, 512, 1)] * 4 + [(1, 512, 1), (3, 1024, 1)]  # block 4
    + [(1, 512, 1), (3, 1024, 1)] * 2                          # block 5, first part
)
FIG3_LAST_4 = [(3, 1024, 1), (3, 1024, 2), (3, 1024, 1), (3, 1024, 1)]  # block 5 end, block 6
# Fast YOLO as this project defines it (yolov1-tiny.cfg plus a second 3x3x1024): nine 3x3 convs.
FAST_FILTERS = [16, 32, 64, 128, 256, 512, 1024, 1024, 256]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_stack_params(layers, batch_norm: bool, width: float = 1.0, cin: int = 3) -> int:
    """Sum over convolutions of k*k*cin*cout weights plus, per output channel, either one
    conv bias (no batch norm) or the batch norm's weight and bias (2 per channel)."""
    total = 0
    for k, filters, _stride in layers:
        cout = max(1, round(filters * width))
        total += k * k * cin * cout + (2 * cout if batch_norm else cout)
        cin = cout
    return total


def linear_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def meta(cls, **kw):
    with torch.device("meta"):
        return cls(**kw)


# --------------------------------------------------------------------------- parameter counts
def test_paper_network_without_batch_norm_has_271_7_million_parameters():
    # Hand check of the first conv: 7*7*3*64 + 64 = 9408 + 64 = 9472.
    assert conv_stack_params(FIG3_FIRST_20[:1], batch_norm=False) == 9472
    convs_total = conv_stack_params(FIG3_FIRST_20 + FIG3_LAST_4, batch_norm=False)
    fc1 = linear_params(7 * 7 * 1024, 4096)       # 50176*4096 + 4096 = 205,524,992
    fc2 = linear_params(4096, 7 * 7 * 30)         # 4096*1470 + 1470 = 6,022,590
    assert fc1 == 205_524_992 and fc2 == 6_022_590
    expected = convs_total + fc1 + fc2
    assert expected == 271_703_550                # "about 271.7 M" (reference, issue)
    model = meta(YOLOv1, batch_norm=False, hidden=4096)
    assert n_params(model) == expected


def test_batch_norm_hidden_496_is_about_85_8_million():
    convs_total = conv_stack_params(FIG3_FIRST_20 + FIG3_LAST_4, batch_norm=True)
    expected = convs_total + linear_params(7 * 7 * 1024, 496) + linear_params(496, 7 * 7 * 30)
    model = meta(YOLOv1, batch_norm=True, hidden=496)
    assert n_params(model) == expected
    assert round(expected / 1e6, 1) == 85.8


def test_default_yolov1_is_the_batch_norm_4096_network():
    # Batch norm replaces each conv bias (cout) with weight + bias (2*cout): +sum(cout).
    extra = sum(f for _, f, _ in FIG3_FIRST_20 + FIG3_LAST_4)
    model = meta(YOLOv1)
    assert n_params(model) == 271_703_550 + extra
    assert model.config["batch_norm"] is True and model.config["hidden"] == 4096


@pytest.mark.parametrize("batch_norm", [True, False])
def test_fast_yolo_parameters(batch_norm):
    layers = [(3, f, 1) for f in FAST_FILTERS]
    # nine convs, then one linear 7*7*256 -> 7*7*30 (12544*1470 + 1470 = 18,441,150)
    expected = conv_stack_params(layers, batch_norm) + linear_params(7 * 7 * 256, 7 * 7 * 30)
    assert linear_params(7 * 7 * 256, 7 * 7 * 30) == 18_441_150
    assert n_params(meta(FastYOLO, batch_norm=batch_norm)) == expected


@pytest.mark.parametrize("batch_norm", [True, False])
def test_darknet_parameters(batch_norm):
    # 20 convolutions, average pooling (no parameters), fc 1024 -> 1000 (1,025,000).
    expected = conv_stack_params(FIG3_FIRST_20, batch_norm) + linear_params(1024, 1000)
    assert n_params(meta(Darknet, batch_norm=batch_norm)) == expected


@pytest.mark.parametrize("width", [0.5, 0.25, TINY])
def test_width_multiplier_parameter_count(width):
    layers = FIG3_FIRST_20 + FIG3_LAST_4
    last = max(1, round(1024 * width))
    expected = (conv_stack_params(layers, True, width)
                + linear_params(7 * 7 * last, 32) + linear_params(32, 7 * 7 * 30))
    assert n_params(meta(YOLOv1, width=width, hidden=32)) == expected


# --------------------------------------------------------------------------- structure
def test_conv_counts():
    yolo = meta(YOLOv1)
    assert len(convs(meta(Darknet).features)) == 20
    assert len(convs(yolo.features)) == 20
    assert len(convs(yolo.extra)) == 4
    assert len(convs(yolo.features)) + len(convs(yolo.extra)) == 24
    assert len(convs(yolo)) == 24
    assert len(convs(meta(FastYOLO))) == 9
    assert len([m for m in meta(FastYOLO).modules() if isinstance(m, nn.MaxPool2d)]) == 6


def test_yolov1_convs_follow_figure_3():
    yolo = meta(YOLOv1)
    got = [(c.kernel_size, c.out_channels, c.stride, c.padding) for c in convs(yolo)]
    want = [((k, k), f, (s, s), (k // 2, k // 2)) for k, f, s in FIG3_FIRST_20 + FIG3_LAST_4]
    assert got == want
    pools = [m for m in yolo.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    fc1, fc2 = [m for m in yolo.head if isinstance(m, nn.Linear)]
    assert (fc1.in_features, fc1.out_features) == (7 * 7 * 1024, 4096)
    assert (fc2.in_features, fc2.out_features) == (4096, 7 * 7 * 30)
    drop = [m for m in yolo.head if isinstance(m, nn.Dropout)]
    assert len(drop) == 1 and drop[0].p == 0.5


def test_fast_yolo_convs():
    fast = meta(FastYOLO)
    assert [(c.kernel_size, c.out_channels, c.stride) for c in convs(fast)] == \
        [((3, 3), f, (1, 1)) for f in FAST_FILTERS]
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert (linears[0].in_features, linears[0].out_features) == (7 * 7 * 256, 7 * 7 * 30)


def test_darknet_head_is_avgpool_then_fc_1000():
    net = meta(Darknet)
    kinds = [type(m) for m in net.classifier]
    assert kinds[0] is nn.AdaptiveAvgPool2d and kinds[-1] is nn.Linear
    assert not any(k in (nn.Conv2d, nn.LeakyReLU) for k in kinds)
    fc = net.classifier[-1]
    assert (fc.in_features, fc.out_features) == (1024, 1000)


@pytest.mark.parametrize("cls", [YOLOv1, FastYOLO, Darknet])
def test_width_multiplier_keeps_structure(cls):
    full, small = meta(cls), meta(cls, width=0.25)
    key = lambda m: [(type(x).__name__, getattr(x, "kernel_size", None), getattr(x, "stride", None))
                     for x in m.modules()]
    assert key(full) == key(small)
    for a, b in zip(convs(full), convs(small)):
        assert b.out_channels == max(1, round(a.out_channels * 0.25))
    assert [type(m) for m in full.modules()] == [type(m) for m in small.modules()]


@pytest.mark.parametrize("cls", [YOLOv1, FastYOLO, Darknet])
def test_batch_norm_switch_and_conv_bias(cls):
    plain, normed = meta(cls, batch_norm=False), meta(cls, batch_norm=True)
    assert all(c.bias is not None for c in convs(plain))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(c.bias is None for c in convs(normed))
    # every conv is directly followed by a batch norm of its width
    for block in (m for m in normed.modules() if isinstance(m, nn.Sequential) and
                  len(m) and isinstance(m[0], nn.Conv2d)):
        assert isinstance(block[1], nn.BatchNorm2d)
        assert block[1].num_features == block[0].out_channels
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == len(convs(normed))


@pytest.mark.parametrize("cls,n_hidden_act", [(YOLOv1, 1), (FastYOLO, 0), (Darknet, 0)])
def test_leaky_relu_0_1_everywhere_and_linear_output(cls, n_hidden_act):
    net = meta(cls)
    acts = [m for m in net.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh,
                                                       nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Softmax))]
    assert all(type(a) is nn.LeakyReLU and a.negative_slope == 0.1 for a in acts)
    # one activation after each conv, plus the one after YOLOv1's hidden fully connected layer
    assert len(acts) == len(convs(net)) + n_hidden_act
    for block in (m for m in net.modules() if isinstance(m, nn.Sequential) and
                  len(m) and isinstance(m[0], nn.Conv2d)):
        assert isinstance(block[-1], nn.LeakyReLU)
    last = list((net.classifier if cls is Darknet else net.head).children())[-1]
    assert isinstance(last, nn.Linear)


def test_output_is_not_squashed():
    # A linear last layer gives negative outputs and outputs above 1 for random inputs;
    # a sigmoid or ReLU at the end could not.
    torch.manual_seed(0)
    for net in (YOLOv1(S=2, width=TINY, hidden=16).eval(), FastYOLO(S=2, width=TINY).eval()):
        with torch.no_grad():
            out = net(torch.randn(2, 3, 128, 128))
        assert (out < 0).any() and (out > 1).any()


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("S,B,C", [(1, 1, 1), (2, 2, 3), (3, 3, 5), (2, 1, 20)])
@pytest.mark.parametrize("cls", [YOLOv1, FastYOLO])
def test_output_shape(cls, S, B, C):
    torch.manual_seed(0)
    net = cls(S=S, B=B, C=C, width=TINY, **({"hidden": 8} if cls is YOLOv1 else {})).eval()
    assert net.input_size == 64 * S
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64 * S, 64 * S))
    assert out.shape == (2, S * S * (C + 5 * B))


def test_paper_grid_shape_on_tiny_width():
    # S=7, B=2, C=20 at 448x448 (the paper's sizes), tiny width so it runs on a CPU.
    torch.manual_seed(0)
    for net in (YOLOv1(width=TINY, hidden=8).eval(), FastYOLO(width=TINY).eval()):
        with torch.no_grad():
            assert net(torch.randn(1, 3, 448, 448)).shape == (1, 7 * 7 * 30)
    with torch.no_grad():
        feats = YOLOv1(width=TINY, hidden=8).eval().features(torch.randn(1, 3, 448, 448))
    assert feats.shape == (1, 64, 14, 14)     # 448 / 32 after the 20 Darknet layers


def test_darknet_shapes_at_224():
    torch.manual_seed(0)
    net = Darknet(num_classes=10, width=TINY).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert net.features(x).shape == (2, 64, 7, 7)   # 224 / 32 = 7; 1024/16 = 64 channels
        assert net(x).shape == (2, 10)


@pytest.mark.parametrize("cls", [YOLOv1, FastYOLO])
@pytest.mark.parametrize("shape", [(1, 3, 127, 128), (1, 3, 64, 64), (1, 3, 256, 256), (3, 128, 128)])
def test_wrong_input_size_raises_value_error(cls, shape):
    net = cls(S=2, width=TINY, **({"hidden": 8} if cls is YOLOv1 else {}))
    with pytest.raises(ValueError, match=r"\(N, 3, 128, 128\)"):
        net(torch.zeros(shape))


def test_build_model_and_config_round_trip():
    net = build_model("yolov1", S=2, B=1, C=3, width=TINY, hidden=8, batch_norm=False)
    again = model_from_config(net.config)
    assert type(again) is YOLOv1 and again.config == net.config
    assert n_params(again) == n_params(net)
    fast = build_model("fast", S=2, width=TINY)
    assert type(model_from_config(fast.config)) is FastYOLO
    with pytest.raises(utils.UserError, match="unknown model"):
        build_model("yolov9")


# --------------------------------------------------------------------------- backbone
def _randomised_darknet(width=TINY, batch_norm=True, seed=1):
    torch.manual_seed(seed)
    net = Darknet(num_classes=5, width=width, batch_norm=batch_norm)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):   # non-trivial running statistics and affine
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("form", ["checkpoint_file", "state_dict", "features_state_dict"])
def test_backbone_loads_into_yolov1(tmp_path, form):
    dark = _randomised_darknet()
    torch.manual_seed(2)
    yolo = YOLOv1(S=2, width=TINY, hidden=8).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(yolo.features(x), dark.features(x))   # differ before
    before = {k: v.clone() for k, v in yolo.state_dict().items() if not k.startswith("features.")}

    if form == "checkpoint_file":   # what darknet_train.py saves, through the checkpoint helpers
        path = tmp_path / "darknet.pt"
        utils.save_checkpoint({"model": dark.state_dict(), "config": dark.config, "epoch": 3}, path)
        source = utils.load_checkpoint(path)
    elif form == "state_dict":
        source = dark.state_dict()
    else:
        source = dark.features.state_dict()
    load_backbone(yolo, source)

    with torch.no_grad():
        torch.testing.assert_close(yolo.features(x), dark.features(x), rtol=0, atol=0)
    after = yolo.state_dict()
    for k, v in before.items():          # extra convs and head untouched
        assert torch.equal(after[k], v), k


def test_backbone_of_another_width_is_a_user_error():
    dark = Darknet(width=1 / 8)          # first conv: 64/8 = 8 filters
    yolo = YOLOv1(S=2, width=TINY, hidden=8)   # first conv: 64/16 = 4 filters
    with pytest.raises(utils.UserError) as err:
        load_backbone(yolo, {"model": dark.state_dict()}, source="dark.pt")
    msg = str(err.value)
    assert "dark.pt" in msg and "'0.0.weight'" in msg
    assert "(8, 3, 7, 7)" in msg and "(4, 3, 7, 7)" in msg and "width" in msg


def test_backbone_with_other_batch_norm_setting_is_a_user_error():
    dark = Darknet(width=TINY, batch_norm=False)
    yolo = YOLOv1(S=2, width=TINY, hidden=8, batch_norm=True)
    with pytest.raises(utils.UserError, match="does not fit this model"):
        load_backbone(yolo, {"model": dark.state_dict()})


def test_checkpoint_without_features_is_a_user_error():
    yolo = YOLOv1(S=2, width=TINY, hidden=8)
    with pytest.raises(utils.UserError, match="features"):
        load_backbone(yolo, {"model": {"classifier.2.weight": torch.zeros(3, 3)}})


def test_fast_yolo_refuses_a_backbone():
    dark = Darknet(width=TINY)
    with pytest.raises(utils.UserError, match="Fast YOLO"):
        load_backbone(FastYOLO(S=2, width=TINY), {"model": dark.state_dict()})


# --------------------------------------------------------------------------- Darknet's released variants
def test_locally_connected_layer_equals_a_loop_over_positions():
    """Each output position has its own filters (weight[position] is (out, in, k, k),
    positions row-major) and each output value its own bias; computed here by hand with a
    zero-padded input and one dot product per position and filter."""
    from darknet_model import LocallyConnected2d

    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 4, 3, (5, 6), stride=2, padding=1)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, 5, 6)
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    out_h, out_w = layer.out_size
    assert (out_h, out_w) == (3, 3)
    want = torch.empty(2, 4, out_h, out_w)
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            for f in range(4):
                w = layer.weight[i * out_w + j, f]
                want[:, f, i, j] = (patch * w).sum((1, 2, 3)) + layer.bias[f, i, j]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="built for"):
        layer(torch.randn(1, 3, 6, 6))


def test_darknet_batch_norm_divides_by_sqrt_var_plus_1e_6():
    """blas.c normalize_cpu: (x - mean) / (sqrt(var) + 1e-6), then scale and shift; not
    PyTorch's sqrt(var + 1e-5), which is three times larger at var = 1e-6."""
    from darknet_model import DarknetBatchNorm2d

    bn = DarknetBatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
        bn.running_var.copy_(torch.tensor([1e-6, 4.0]))
        bn.weight.copy_(torch.tensor([2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.25, 0.0]))
    x = torch.tensor([1.5, 1.0]).view(1, 2, 1, 1)
    want = [(1.5 - 0.5) / (1e-3 + 1e-6) * 2 + 0.25, (1.0 + 1.0) / (2 + 1e-6) * 3]
    with torch.no_grad():
        torch.testing.assert_close(bn(x).flatten(), torch.tensor(want), rtol=1e-6, atol=0)
    assert bn.momentum == 0.01                      # Darknet's rolling averages (.99 / .01)


def test_variance_conversions_give_the_same_divisor():
    from darknet_model import variance_from_darknet, variance_to_darknet

    torch_var = torch.tensor([0.0, 1e-6, 0.3, 7.0])
    darknet_var = variance_to_darknet(torch_var, 1e-5)
    torch.testing.assert_close(darknet_var.sqrt() + 1e-6, (torch_var + 1e-5).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(variance_from_darknet(darknet_var, 1e-5), torch_var, rtol=1e-5, atol=1e-10)


def test_detection_permutation_by_hand():
    """S=1, B=2, C=2. Darknet: classes [0, 1], confidences [2, 3], boxes [4..7] and [8..11]
    (detection_layer.c). Project: c0 c1 | conf0 x0 y0 w0 h0 | conf1 x1 y1 w1 h1."""
    from darknet_weights import detection_permutation

    assert detection_permutation(1, 2, 2).tolist() == [0, 1, 2, 4, 5, 6, 7, 3, 8, 9, 10, 11]
    perm = detection_permutation(7, 3, 20)
    assert sorted(perm.tolist()) == list(range(1715))
    # cell 8 (row 1, column 1), box 2's sqrt h: project 8*35 + 20 + 2*5 + 4; Darknet 49*23 + (8*3 + 2)*4 + 3
    assert perm[8 * 35 + 20 + 10 + 4] == 49 * 23 + (8 * 3 + 2) * 4 + 3


def test_registry_builds_the_released_networks():
    yolo = meta(lambda **kw: build_model("yolov1-darknet", **kw))
    assert (yolo.B, yolo.config["local"], yolo.config["hidden"], yolo.config["darknet_bn"]) == (3, 256, 0, True)
    kinds = [type(m).__name__ for m in yolo.head]
    assert kinds == ["LocallyConnected2d", "LeakyReLU", "Flatten", "Dropout", "Linear"]
    assert yolo.head[-1].in_features == 7 * 7 * 256 and yolo.head[-1].out_features == 1715
    tiny = meta(lambda **kw: build_model("yolov1-tiny", **kw))
    assert [c.out_channels for c in convs(tiny)] == [16, 32, 64, 128, 256, 512, 1024, 256]
    assert model_from_config(tiny.config).config == tiny.config
    for name in ("yolov1", "fast", "yolov1-darknet", "yolov1-tiny"):
        net = build_model(name, S=2, width=TINY, C=3, hidden=8, local=4)
        assert net.config["name"] == name and type(model_from_config(net.config)) is type(net)


def test_checkpoint_config_of_before_the_registry_still_builds():
    """Configs saved before ``local``/``darknet_bn``/``convs`` existed: same network, same keys."""
    old = {"name": "yolov1", "S": 2, "B": 2, "C": 20, "hidden": 8, "batch_norm": True, "width": TINY,
           "dropout": 0.5}
    net = model_from_config(old)
    assert list(net.state_dict())[-4:] == ["head.1.weight", "head.1.bias", "head.4.weight", "head.4.bias"]
    assert len(convs(model_from_config({"name": "fast", "S": 2, "width": TINY}))) == 9


def test_extraction_head_is_a_leaky_1x1_conv_then_avgpool():
    net = meta(lambda **kw: Darknet(head="conv", **kw))
    conv_ = net.classifier[0][0]
    assert (conv_.kernel_size, conv_.in_channels, conv_.out_channels, conv_.bias is not None) == ((1, 1), 1024, 1000, True)
    assert isinstance(net.classifier[0][1], nn.LeakyReLU) and isinstance(net.classifier[1], nn.AdaptiveAvgPool2d)
    assert n_params(net) == conv_stack_params(FIG3_FIRST_20, True) + 1024 * 1000 + 1000


def test_darknet_normed_backbone_into_a_pytorch_normed_yolov1():
    """A backbone converted from Darknet (``darknet_bn``: its own variance convention) gives a
    PyTorch-normed YOLOv1 the same features, to float rounding; one without batch norm is
    refused for a batch-normed YOLOv1 with the flag to use."""
    dark = _randomised_darknet()
    dark_bn = Darknet(num_classes=5, width=TINY, darknet_bn=True).eval()
    dark_bn.load_state_dict(dark.state_dict())
    yolo = YOLOv1(S=2, width=TINY, hidden=8).eval()
    load_backbone(yolo, {"model": dark_bn.state_dict(), "model_config": dark_bn.config})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(yolo.features(x), dark_bn.features(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(dark.features(x), dark_bn.features(x), rtol=1e-5, atol=1e-5)
    plain = Darknet(width=TINY, batch_norm=False)
    with pytest.raises(utils.UserError, match="without batch norm; build the detector with --no-batch-norm"):
        load_backbone(yolo, {"model": plain.state_dict(), "model_config": plain.config}, "plain.pt")
