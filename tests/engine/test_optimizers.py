"""Optimizer implementations as users run them: what each one's state and temporaries cost, as
traced, against the byte counts their sources give; the 422s; and the configs naming the same
implementation the plan traced."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from service.schemas.spec import PlanSpec
from tests.helpers import mlp_spec, run_pytorch_loop, session_of, tensor_spec
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.configs import PlanNumbers, build_configs
from workers.engine.optimizers import PAGED_MIN_ELEMENTS, choose

bnb = pytest.importorskip("bitsandbytes")

# mlp_spec's parameters: 512x1024 + 1024, 1024x1024 + 1024, 1024x10 + 10
SHAPES = [(1024, 512), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)]
NUMEL = [math.prod(s) for s in SHAPES]
FP32 = 4
BLOCK = 256  # bitsandbytes' block-wise quantization: one float32 absmax per 256 elements
MIN_8BIT = 4096  # smaller parameters keep 32-bit states


def block(nbytes: int) -> int:
    """The caching allocator's size for one tensor: a multiple of 512 bytes."""
    return -(-nbytes // 512) * 512


def breakdown(impl: str | None, optimizer: str = "adamw", batch: int = 1) -> dict[str, int]:
    """The traced breakdown at `batch` for a torch optimizer's kernels (`impl`) or a
    bitsandbytes optimizer (`impl` None)."""
    spec = PlanSpec.model_validate(
        mlp_spec(optimizer, memory_gib=4, optimizer_impl=impl)
        | {"search": {"what_if": False, "max_batch_size": 64}}
    )
    with session_of(spec) as session:
        outcome = session.probe(batch)
    assert outcome.allocated_bytes is not None
    return outcome.breakdown | {"allocated": outcome.allocated_bytes}


def state_bytes_8bit(states: int) -> int:
    """Adam's two (Lion's one) 8-bit states: 1 byte per element and a float32 absmax per block;
    parameters under 4,096 elements keep float32 states."""
    total = 0
    for n in NUMEL:
        if n >= MIN_8BIT:
            per_state = block(n) + block(math.ceil(n / BLOCK) * FP32)
        else:
            per_state = block(n * FP32)
        total += states * per_state
    return total


FP32_STATE = sum(block(n * FP32) for n in NUMEL)  # one float32 copy of every parameter


def test_adamw_states_are_two_fp32_copies_whatever_the_kernel() -> None:
    for impl in ("foreach", "fused", "for_loop"):
        assert breakdown(impl)["optimizer_state"] == 2 * FP32_STATE, impl


def test_8bit_states_are_one_byte_per_element_plus_block_statistics() -> None:
    traced = breakdown(None, "adamw_8bit")["optimizer_state"]
    # plus the two 256-entry float32 quantization maps, one tensor each that all parameters share
    maps = 2 * 256 * FP32
    assert traced == state_bytes_8bit(states=2) + maps
    assert traced < 0.3 * 2 * sum(NUMEL) * FP32


def test_lion_keeps_one_state_and_its_8bit_form_a_quarter_of_it() -> None:
    assert breakdown(None, "lion")["optimizer_state"] == FP32_STATE
    maps = 256 * FP32
    assert breakdown(None, "lion_8bit")["optimizer_state"] == state_bytes_8bit(states=1) + maps


def test_paged_states_are_host_backed_not_device_memory() -> None:
    plain, paged = breakdown(None, "adamw_8bit"), breakdown(None, "paged_adamw_8bit")
    spec = PlanSpec.model_validate(mlp_spec("paged_adamw_8bit", memory_gib=4))
    result = engine.plan(
        spec.model_copy(update={"search": spec.search.model_copy(update={"what_if": False})})
    )
    # bitsandbytes pages the uint8 states of parameters of 100,000 elements or more
    paged_bytes = 2 * sum(block(n) for n in NUMEL if n >= PAGED_MIN_ELEMENTS)
    assert result.memory.host_offloaded == paged_bytes
    assert plain["optimizer_state"] - paged["optimizer_state"] == paged_bytes
    assert result.memory.host_offloaded > 0


def test_foreach_temporaries_cost_a_copy_of_the_state_that_fused_does_not() -> None:
    """With a batch of one the optimizer step is the peak: foreach's `_foreach_sqrt` of the second
    moments is a float32 copy of every parameter at once; fused allocates nothing; the loop's
    `exp_avg_sq.sqrt() / bias_correction2_sqrt` holds two copies of one parameter at a time."""
    foreach, fused, loop = (breakdown(i) for i in ("foreach", "fused", "for_loop"))
    assert foreach["temporary"] == FP32_STATE
    assert fused["temporary"] < 64 * 1024  # the loss and its gradient
    assert 0 <= loop["temporary"] - 2 * block(max(NUMEL) * FP32) < 64 * 1024
    assert foreach["allocated"] - fused["allocated"] >= FP32_STATE - 64 * 1024


@pytest.mark.parametrize(
    ("optimizer", "impl", "field"),
    [
        ("rmsprop", "fused", "training.optimizer_impl"),
        ("sgd", "8bit", "training.optimizer_impl"),
        ("adamw_8bit", "foreach", "training.optimizer_impl"),
    ],
)
def test_an_implementation_the_optimizer_lacks_is_a_422_at_the_field(
    client: Any, optimizer: str, impl: str, field: str
) -> None:
    spec = mlp_spec(optimizer, optimizer_impl=impl)
    response = client.post("/v1/plans", json=spec)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == [field]


def test_bitsandbytes_states_with_a_sharding_strategy_is_a_422(client: Any) -> None:
    spec = mlp_spec("adamw_8bit")
    spec["training"] |= {"world_size": 2, "parallelism": {"strategy": "fsdp"}}
    response = client.post("/v1/plans", json=spec)
    assert response.status_code == 422
    assert "not sharded" in response.json()["errors"][0]["msg"]


def test_default_is_what_pytorch_picks_on_cuda() -> None:
    assert choose(tensor_spec(optimizer="adamw").training).impl == "foreach"
    assert choose(tensor_spec(optimizer="lion").training).cls == "Lion"
    # a trace that stands for a real CPU run keeps PyTorch's CPU default, the loop
    assert choose(tensor_spec(optimizer="adamw").training, gpu=False).kwargs["foreach"] is False


def numbers() -> PlanNumbers:
    return PlanNumbers(32, 8, 1, 0.4, 3, 8)


HF_OPTIM = {
    ("adamw", "foreach"): ("adamw_torch", "AdamW"),
    ("adamw", "fused"): ("adamw_torch_fused", "AdamW"),
    ("adamw_8bit", None): ("adamw_bnb_8bit", "AdamW"),
    ("paged_adamw", None): ("paged_adamw_32bit", "AdamW"),
    ("paged_adamw_8bit", None): ("paged_adamw_8bit", "AdamW"),
    ("lion", None): ("lion_32bit", "Lion"),
    ("lion_8bit", None): ("lion_8bit", "Lion"),
    ("paged_lion_8bit", None): ("paged_lion_8bit", "Lion"),
}


@pytest.mark.parametrize(("optimizer", "impl"), list(HF_OPTIM))
def test_hf_trainer_builds_the_traced_implementation(
    tmp_path: Any, optimizer: str, impl: str | None
) -> None:
    transformers = pytest.importorskip("transformers")
    spec = tensor_spec(optimizer=optimizer, optimizer_impl=impl)
    hf = build_configs(compile_job(spec).launch, numbers())["hf_trainer"]
    assert hf["optim"] == HF_OPTIM[optimizer, impl][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", **hf
        )
        trainer = transformers.Trainer(model=nn.Linear(16, 4), args=args)
        opt = trainer.create_optimizer()
    inner = getattr(opt, "optimizer", opt)
    assert type(inner).__name__ == HF_OPTIM[optimizer, impl][1]
    if impl is None:  # bitsandbytes: its state bits and paging as the plan traced them
        assert inner.args.optim_bits == (8 if "8bit" in optimizer else 32)
        assert inner.is_paged == optimizer.startswith("paged")
    if impl == "fused":
        assert inner.defaults["fused"] is True


@pytest.mark.parametrize(
    ("optimizer", "impl"), [("adamw", "fused"), ("adamw_8bit", None), ("lion", None)]
)
def test_pytorch_loop_and_lightning_name_the_same_class(optimizer: str, impl: str | None) -> None:
    spec = tensor_spec(optimizer=optimizer, optimizer_impl=impl)
    choice = choose(spec.training)
    configs = build_configs(compile_job(spec).launch, numbers())
    assert f"optimizer = {choice.path}(" in configs["pytorch"]
    assert configs["lightning"]["optimizer"] == choice.path
    module, cls = choice.path.rsplit(".", 1)
    built = getattr(__import__(module, fromlist=[cls]), cls)(
        nn.Linear(16, 4).parameters(), lr=0.1, **configs["lightning"]["optimizer_kwargs"]
    )
    assert isinstance(built, torch.optim.Optimizer)
    assert ("optimizer" in configs["deepspeed"]) == (not choice.bitsandbytes)


def test_what_if_shows_what_fused_and_8bit_buy() -> None:
    """A wide MLP on a small card: Adam's states crowd the activations out."""
    spec = mlp_spec("adamw", memory_gib=0.85)
    spec["model"]["layers"][0]["out_features"] = spec["model"]["layers"][2]["out_features"] = 4096
    spec["data"]["shape"] = [4096]
    spec["search"] = {"headroom": 0.0, "max_batch_size": 1 << 14, "what_if": True}
    result = engine.plan(PlanSpec.model_validate(spec))
    offered = {w.value: w for w in result.what_if if w.change in ("optimizer_impl", "optimizer")}
    assert set(offered) == {"fused", "adamw_8bit"}  # foreach's temporaries tip it over
    assert offered["adamw_8bit"].max_micro_batch_size > offered["fused"].max_micro_batch_size
    for what_if in offered.values():
        assert what_if.max_micro_batch_size > result.max_micro_batch_size


@pytest.mark.parametrize(
    ("optimizer", "impl"), [("adamw", "fused"), ("adamw_8bit", None), ("lion", None)]
)
def test_pytorch_loop_runs_with_the_implementation(optimizer: str, impl: str | None) -> None:
    spec = tensor_spec(optimizer=optimizer, optimizer_impl=impl)
    scope = run_pytorch_loop(build_configs(compile_job(spec).launch, numbers())["pytorch"], 300)
    assert len(scope["steps"]) == 8
    assert type(scope["optimizer"]).__name__ == choose(spec.training).cls
