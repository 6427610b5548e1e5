"""Model specs the benchmarks share."""

from __future__ import annotations

from typing import Any

# A small grayscale CNN (28x28, 10 classes) of the `layers` source.
GRAY_CNN: dict[str, Any] = {
    "source": "layers",
    "layers": [
        {"type": "Conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "BatchNorm2d"},
        {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
        {"type": "ReLU"},
        {"type": "Flatten"},
        {"type": "Linear", "out_features": 10},
    ],
}

# A three-layer MLP (512 -> 1024 -> 1024 -> 10) of the `layers` source.
MLP: dict[str, Any] = {
    "source": "layers",
    "layers": [
        {"type": "Linear", "out_features": 1024},
        {"type": "ReLU"},
        {"type": "Linear", "out_features": 1024},
        {"type": "ReLU"},
        {"type": "Linear", "out_features": 10},
    ],
}
