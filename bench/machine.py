"""What every benchmark prints first: the command and the machine it ran on."""

from __future__ import annotations

import os
import platform
import sys

import torch


def header() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}\n"
        f"machine: {cpu}, {os.cpu_count()} cores, GPU {gpu}; python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
