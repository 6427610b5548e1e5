"""The cuda device. Real GPU tests skip cleanly without one; the parts that need no GPU run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.schemas.spec import PlanSpec
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device
from workers.engine.devices.cuda import CudaUnavailable

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def cuda_spec(small_spec: dict[str, Any], memory_gib: float = 2.0) -> PlanSpec:
    return PlanSpec.model_validate(
        small_spec | {"device": {"kind": "cuda", "memory_gib": memory_gib}}
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_clear_error(small_spec: dict[str, Any]) -> None:
    with pytest.raises(CudaUnavailable, match="no CUDA device"):
        open_device(compile_job(cuda_spec(small_spec)))


def test_workers_only_claim_cuda_plans_with_a_gpu() -> None:
    from workers.loop import device_kinds

    assert ("cuda" in device_kinds()) == torch.cuda.is_available()


@pytest.mark.cuda
@needs_gpu
def test_real_oom_bisection_is_exact(small_spec: dict[str, Any]) -> None:
    spec = cuda_spec(small_spec, 1.5)
    result = engine.plan(spec)
    answer = result.max_micro_batch_size
    by_batch = {t.batch_size: t for t in result.trials}
    assert by_batch[answer].fits and not by_batch[answer + 1].fits
    assert result.throughput is not None and result.throughput.measured
    assert result.memory.peak <= result.memory.capacity


@pytest.mark.cuda
@needs_gpu
def test_memory_cap_is_honoured(small_spec: dict[str, Any]) -> None:
    small = engine.plan(cuda_spec(small_spec, 1.0)).max_micro_batch_size
    large = engine.plan(cuda_spec(small_spec, 2.0)).max_micro_batch_size
    assert small < large
