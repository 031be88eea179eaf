"""The Darknet reference itself builds and parses the yolov1-family cfgs (tests/darknet_ref.py)."""
import pytest


@pytest.mark.parametrize("cfg, outputs", [
    ("yolov1.cfg", 7 * 7 * (3 * 5 + 20)),      # 1715 per cell grid: S=7, B=3, C=20
    ("yolov1-tiny.cfg", 7 * 7 * (2 * 5 + 20)),  # 1470: S=7, B=2, C=20
    ("extraction.cfg", 1000),                   # the ImageNet classifier
])
def test_darknet_parses_the_family(darknet, tmp_path, cfg, outputs):
    """Guards the harness plumbing: a broken build or a wrong cfg path would fail here first."""
    exe = darknet.compile("version.c", tmp_path)
    fields = darknet.run(exe, darknet.cfg_dir / cfg).split()
    assert int(fields[1]) == outputs
