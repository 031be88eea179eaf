"""What every benchmark records about the machine it ran on (numpy only: bench_evaluate
must not import torch)."""
from __future__ import annotations

import os
import platform
import sys

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine(device=None) -> dict:
    """CPU model and cores, versions, and the torch thread count and GPU when torch is loaded."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        if device is not None and device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
