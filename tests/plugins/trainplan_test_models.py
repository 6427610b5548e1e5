"""Model factories the tests register as `trainplan.models` entry points (see the dist-info
beside this file): an ordinary MLP, a slow one, one that kills its process, and one that grows
its process by `gib` GiB as it is built (a runaway spec, for the plan's memory cap)."""

from __future__ import annotations

import os
import time

from torch import nn


def mlp(hidden: int = 256, classes: int = 10, features: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def slow(seconds: float = 3.0) -> nn.Module:
    time.sleep(seconds)
    return mlp()


def crash() -> nn.Module:
    os._exit(137)


def hog(gib: float = 4.0) -> nn.Module:
    held = [bytearray(1 << 20) for _ in range(int(gib * 1024))]
    model = mlp()
    model.held = held  # type: ignore[assignment]
    return model
