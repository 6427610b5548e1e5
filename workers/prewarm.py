"""Imported by the forkserver before it forks any plan: pays the one-off costs of a first plan
(lazy imports, bitsandbytes for Adam's 8-bit what-if, FakeTensorMode's and the dispatcher's
caches) once per worker instead of once per plan. Forward and optimizer step only: running
backward here would start autograd's threads, which a forked child may not inherit."""

from __future__ import annotations

import contextlib

import torch


def prewarm() -> None:
    # imported inside: the forkserver runs this module under `suppress`, and an import that
    # fails must cost only the warm-up, never the worker
    from service.schemas.spec import PlanSpec
    from workers.engine.compiled import compile_job
    from workers.engine.devices import open_device, open_session
    from workers.engine.job import compute_loss

    job = compile_job(
        PlanSpec.model_validate(
            {
                "model": {
                    "source": "layers",
                    "layers": [
                        {"type": "Conv2d", "out_channels": 4, "kernel_size": 3},
                        {"type": "BatchNorm2d"},
                        {"type": "ReLU"},
                        {"type": "Flatten"},
                        {"type": "Linear", "out_features": 2},
                    ],
                },
                "data": {"kind": "image", "channels": 1, "height": 8, "width": 8, "num_classes": 2},
                "training": {"optimizer": "adamw", "precision": "bf16-mixed"},
                "device": {"kind": "simulated", "memory_gib": 1},
            }
        )
    )
    with open_session(open_device(job), job) as session:
        traced = session.job
        assert traced is not None
        x, y = traced.make_batch(2)
        with torch.no_grad(), traced.autocast():
            compute_loss(traced.model(x), y, traced.family)


with contextlib.suppress(Exception):  # a failed warm-up only costs speed
    prewarm()
with contextlib.suppress(Exception):  # absent without the `peft` extra
    from workers.engine.optimizers import prepare_bitsandbytes

    prepare_bitsandbytes()
