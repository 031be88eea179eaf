"""The benchmark scripts run (``--quick``), write parseable JSON, and their checks pass."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.json"
    assert load("bench_train").main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["model"] for r in report["rows"]} == {"yolov1@448", "darknet@224"}
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and row["flops_per_image"] > 0
        assert 0 < row["fraction_of_matmul"] < math.inf
    assert report["matmul"]["flops_per_s"]["float32"] > 0
    assert len(report["profile"]["top"]) == 8
    assert (tmp_path / "train_profile.txt").is_file()


def test_bench_postprocess_quick(tmp_path):
    out = tmp_path / "postprocess.json"
    assert load("bench_postprocess").main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert checks["same_detections"] and checks["same_aps"] and checks["max_ap_diff"] == 0
    assert checks["whole_batch_same"] and checks["previous_same"] and checks["single_matching_same"]
    assert 0 < report["mAP"]["all"] < 1 and 0 < report["mAP"]["11"] < 1
    assert report["timings_s"]["fast_total"] > 0


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
