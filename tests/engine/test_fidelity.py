"""What makes the simulated device a real GPU: usable memory, fixed costs, reserved memory, the
roofline's FLOPs and math modes, and the bad inputs that come with them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from service.schemas.spec import PlanSpec
from tests.helpers import session_of
from workers import engine
from workers.engine.catalogue import GIB, GPU_CATALOGUE, MIB
from workers.engine.compiled import compile_job
from workers.engine.cudnn import grouped_convolutions
from workers.engine.devices import open_device
from workers.engine.errors import SpecError
from workers.engine.roofline import Roofline, StepCostMode
from workers.engine.runtime import (
    CONTEXT_EAGER,
    CONTEXT_LAZY,
    CONTEXT_LEGACY,
    CUBLAS_WORKSPACE,
    CUBLAS_WORKSPACE_SM90,
    Runtime,
    fixed_costs,
)

DATASHEET_GB = {"T4": 16, "A10": 24, "RTX-3090": 24, "A100-80GB": 80, "H100-80GB": 80, "H200": 141}


def cnn_spec(**device: Any) -> dict[str, Any]:
    return {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": {"kind": "image", "channels": 3, "height": 64, "width": 64, "num_classes": 10},
        "training": {"optimizer": "sgd_momentum", "precision": "fp16-mixed"},
        "device": {"kind": "simulated", "gpu": "RTX-3090", **device},
        "search": {"headroom": 0.0, "what_if": False, "max_batch_size": 4096},
    }


@pytest.mark.parametrize("name", sorted(DATASHEET_GB))
def test_cards_offer_what_torch_reports_not_the_datasheet(name: str) -> None:
    gpu = GPU_CATALOGUE[name]
    assert gpu.memory_source
    # the driver keeps 0.3-6% of the marketed size; GB here are the datasheet's GiB or GB
    assert 0.85 * DATASHEET_GB[name] * GIB < gpu.memory_bytes < DATASHEET_GB[name] * GIB


def test_rtx_3090_offers_about_23_6_gib() -> None:
    assert GPU_CATALOGUE["RTX-3090"].memory_bytes / GIB == pytest.approx(23.59, abs=0.01)


def test_context_follows_the_software_stack() -> None:
    gpu = GPU_CATALOGUE["A100-80GB"]
    assert fixed_costs(gpu, Runtime()).cuda_context == CONTEXT_LAZY
    assert fixed_costs(gpu, Runtime(module_loading="eager")).cuda_context == CONTEXT_EAGER
    assert fixed_costs(gpu, Runtime(torch=(1, 12), cuda=(11, 3))).cuda_context == CONTEXT_LEGACY
    assert CONTEXT_LAZY < CONTEXT_EAGER < CONTEXT_LEGACY


def test_cublas_workspaces_per_thread_and_bigger_on_hopper() -> None:
    ampere = fixed_costs(GPU_CATALOGUE["A100-80GB"], Runtime()).workspaces
    hopper = fixed_costs(GPU_CATALOGUE["H100-80GB"], Runtime()).workspaces
    assert ampere.count(CUBLAS_WORKSPACE) == 2 and hopper.count(CUBLAS_WORKSPACE_SM90) == 2


def test_nccl_buffers_only_when_distributed() -> None:
    gpu = GPU_CATALOGUE["H100-80GB"]
    assert fixed_costs(gpu, Runtime(), 1).nccl_buffers == 0
    assert (
        0
        < fixed_costs(gpu, Runtime(), 2).nccl_buffers
        < fixed_costs(gpu, Runtime(), 8).nccl_buffers
    )


def test_breakdown_names_allocated_reserved_and_fixed_costs() -> None:
    spec = cnn_spec()
    spec["training"]["world_size"] = 2
    spec["training"]["global_batch_size"] = 512
    result = engine.plan(PlanSpec.model_validate(spec))
    m = result.memory
    parts = sum(getattr(m, part) for part in m.PARTS)  # DDP's buckets count too
    assert parts == m.peak and m.communication > 0
    assert m.overhead == m.cuda_context + m.nccl_buffers and m.nccl_buffers > 0
    assert m.reserved is not None and m.reserved >= m.peak
    assert m.allocator_cached == m.reserved - m.peak
    assert m.reserved <= m.capacity
    assert m.workspace >= 2 * CUBLAS_WORKSPACE


def test_answer_plus_one_fails_on_reserved_memory() -> None:
    spec = PlanSpec.model_validate(cnn_spec(memory_gib=4))
    result = engine.plan(spec)
    by_batch = {t.batch_size: t for t in result.trials}
    answer = result.max_micro_batch_size
    assert by_batch[answer].fits and not by_batch[answer + 1].fits
    assert by_batch[answer + 1].reason and "allocator" in by_batch[answer + 1].reason


def test_legacy_stack_plans_a_smaller_batch() -> None:
    """torch 1.12: eager context loading and gradients kept by zero_grad(): less room."""
    current = engine.plan(PlanSpec.model_validate(cnn_spec(memory_gib=4))).max_micro_batch_size
    legacy = engine.plan(
        PlanSpec.model_validate(cnn_spec(memory_gib=4, runtime={"torch": "1.12", "cuda": "11.3"}))
    ).max_micro_batch_size
    assert legacy < current


def test_expandable_segments_plan_close_to_plain_segments() -> None:
    """Large activations get segments of their own size either way; expandable segments round
    growth to 20 MiB pages, so the answers differ by a few samples (unit tests: allocator)."""
    plain = engine.plan(PlanSpec.model_validate(cnn_spec(memory_gib=4))).max_micro_batch_size
    expandable = engine.plan(
        PlanSpec.model_validate(cnn_spec(memory_gib=4, allocator={"expandable_segments": True}))
    ).max_micro_batch_size
    assert plain < 4096 and abs(expandable - plain) <= 0.02 * plain


def test_channels_last_avoids_the_cudnn_transform_workspace() -> None:
    nchw = PlanSpec.model_validate(cnn_spec())
    nhwc_spec = cnn_spec()
    nhwc_spec["data"]["layout"] = "channels_last"
    nhwc = PlanSpec.model_validate(nhwc_spec)
    workspaces = []
    for spec in (nchw, nhwc):
        with session_of(spec) as session:
            workspaces.append(session.probe(64).breakdown["workspace"])
    assert workspaces[0] > workspaces[1]


def _conv_backward_flops(counter_cls: Any, depthwise: bool) -> int:
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32 if depthwise else 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(8, 32, 28, 28, requires_grad=True)
        if counter_cls is FlopCounterMode:
            with FlopCounterMode(display=False) as counter:
                conv(x).sum().backward()
            return int(counter.get_total_flops())
        mode = StepCostMode(Roofline(GPU_CATALOGUE["A100-80GB"], "fp32"), lambda: "forward")
        with mode:
            conv(x).sum().backward()
        return mode.cost.flops


def test_grouped_convolutions_are_counted_right() -> None:
    forward = 2 * 8 * 32 * 28 * 28 * 1 * 9  # depthwise: one input channel per output
    ours = _conv_backward_flops(StepCostMode, depthwise=True)
    assert ours == 3 * forward  # forward, input gradient, weight gradient
    torch_count = _conv_backward_flops(FlopCounterMode, depthwise=True)
    assert torch_count > 10 * ours  # torch 2.14's counter forgets the groups in backward
    dense = _conv_backward_flops(StepCostMode, depthwise=False)
    assert dense == _conv_backward_flops(FlopCounterMode, depthwise=False)


def test_a_tensor_s_metadata_moves_no_bytes() -> None:
    """On a fake tensor the autograd engine's and the foreach grouping's device checks dispatch
    `prim.device` (C++ asks a Python tensor its device); no kernel runs for them. Costed as
    reading the tensor, they were about half the bytes of a small Llama's step."""
    with FakeTensorMode():
        x = torch.empty(256, 1024, requires_grad=True)  # traces run on the CPU, as plans do
        mode = StepCostMode(Roofline(GPU_CATALOGUE["A100-80GB"], "fp32"), lambda: "backward")
        with mode:
            (x * 2.0).sum().backward()
            torch._C._group_tensors_by_device_and_dtype([[x, x.grad]], False)
        seen = [op.name for op in mode.cost.ops]
    assert "device" not in seen
    assert {"mul", "sum"} <= set(seen)  # the kernels still count


def test_math_modes_follow_pytorch_defaults() -> None:
    a100 = GPU_CATALOGUE["A100-80GB"]
    fp32 = Roofline(a100, "fp32")
    assert fp32.math_mode("conv", torch.float32) == "tf32"  # cudnn.allow_tf32 defaults to True
    assert fp32.math_mode("matmul", torch.float32) == "fp32"  # matmul.allow_tf32 does not
    assert Roofline(a100, "tf32").math_mode("matmul", torch.float32) == "tf32"
    assert Roofline(a100, "fp32", matmul_tf32=True).math_mode("matmul", torch.float32) == "tf32"
    assert Roofline(GPU_CATALOGUE["V100-16GB"], "fp32").math_mode("conv", torch.float32) == "fp32"
    assert fp32.ceiling("matmul", torch.float16) > 10 * fp32.ceiling("matmul", torch.float32)


def test_estimated_throughput_is_split_banded_and_not_measured() -> None:
    result = engine.plan(PlanSpec.model_validate(cnn_spec()))
    t = result.throughput
    assert t is not None and not t.measured and t.split is not None
    assert t.step_time_s == pytest.approx(
        t.split.compute_s + t.split.memory_bound_s + t.split.optimizer_s
    )
    low, high = t.samples_per_second_band or (0, 0)
    assert low < t.samples_per_second < high
    assert t.flops_per_sample and t.flops_per_sample > 3 * 0.15e9  # resnet18 at 64x64, x3


def test_tf32_on_a_card_without_it_names_the_field() -> None:
    spec = cnn_spec()
    spec["device"]["gpu"] = "V100-16GB"
    spec["training"]["precision"] = "tf32"
    with pytest.raises(SpecError) as info:
        open_device(compile_job(PlanSpec.model_validate(spec)))
    assert info.value.loc == ("training", "precision")


def test_tf32_plans_like_fp32_in_memory() -> None:
    fp32 = cnn_spec()
    fp32["training"]["precision"] = "fp32"
    tf32 = cnn_spec()
    tf32["training"]["precision"] = "tf32"
    a = engine.plan(PlanSpec.model_validate(fp32))
    b = engine.plan(PlanSpec.model_validate(tf32))
    assert a.max_micro_batch_size == b.max_micro_batch_size
    assert a.throughput and b.throughput
    assert b.throughput.samples_per_second >= a.throughput.samples_per_second


def test_memory_cap_on_a_catalogued_card_keeps_its_compute() -> None:
    spec = PlanSpec.model_validate(cnn_spec(memory_gib=8))
    device = open_device(compile_job(spec))
    assert device.memory_bytes == 8 * GIB
    assert device.name == "RTX-3090@8GiB" and device.supports_tf32
    assert device.overhead_bytes > 200 * MIB


def test_channels_last_grouped_convolutions_warn_on_stacks_before_cudnn_8_5() -> None:
    """A fixed-group-width net (RegNetY) in channels_last on torch 1.12 warns that its time is
    optimistic; channels_first, or a stack from torch 1.13 on, does not."""

    def warned(layout: str, torch_version: str) -> list[str]:
        spec = {
            "model": {"source": "torchvision", "name": "regnet_y_400mf", "kwargs": {}},
            "data": {
                "kind": "image",
                "channels": 3,
                "height": 32,
                "width": 32,
                "num_classes": 1000,
                "layout": layout,
            },
            "training": {"optimizer": "sgd_momentum", "precision": "fp16-mixed"},
            "device": {
                "kind": "simulated",
                "gpu": "RTX-3090",
                "runtime": {"torch": torch_version, "cuda": "11.3"},
            },
            "search": {"what_if": False, "max_batch_size": 64},
        }
        result = engine.plan(PlanSpec.model_validate(spec))
        return [
            w.message for w in result.warnings if w.code == "channels_last_grouped_convolutions"
        ]

    grouped = grouped_convolutions(torchvision.models.regnet_y_400mf())  # 4M parameters
    assert grouped == 16  # one 3x3 grouped convolution per block, 16 blocks
    (message,) = warned("channels_last", "1.12")
    assert message.startswith(f"{grouped} grouped convolutions in channels_last on torch 1.12")
    assert warned("channels_first", "1.12") == []
    assert warned("channels_last", "1.13") == []


def test_depthwise_and_dense_convolutions_are_not_grouped_ones() -> None:
    convs = torch.nn.Sequential(
        torch.nn.Conv2d(32, 32, 3, groups=32),  # depthwise
        torch.nn.Conv2d(32, 64, 1),  # dense
        torch.nn.Conv2d(64, 64, 3, groups=4),  # grouped: 16 channels a group
        torch.nn.Conv1d(64, 64, 3, groups=2),
    )
    assert grouped_convolutions(convs) == 2
