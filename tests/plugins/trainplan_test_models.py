"""Model factories the tests register as `trainplan.models` entry points (see the dist-info
beside this file): an ordinary MLP, a slow one, and one that kills its process."""

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
