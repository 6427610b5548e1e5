"""Checkpointing one block in k: memory and recompute between none and full, for transformers'
layers and for our block wrapper, and the loop renders the same choice."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from service.schemas.examples import TINY_LLAMA
from service.schemas.spec import CheckpointingSpec, PlanSpec
from tests.helpers import configs_of
from workers.engine.checkpointing import Checkpointed, apply_checkpointing
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session


def llama(every: int | None, selective: str = "block") -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA | {"num_hidden_layers": 4, "max_position_embeddings": 4096},
            },
            "data": {"kind": "tokens", "seq_len": 2048, "vocab_size": 1000},
            "training": {
                "precision": "bf16-mixed",
                "gradient_checkpointing": every is not None,
                "checkpointing": {"every": every or 1, "selective": selective},
                "loss_kernel": "liger",
            },
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
            "search": {"what_if": False},
        }
    )


@functools.cache
def traced_llama(every: int | None, selective: str = "block") -> tuple[int, float, float, int]:
    """`traced` of `llama(every, selective)`, once per file run."""
    return traced(llama(every, selective))


def traced(spec: PlanSpec) -> tuple[int, float, float, int]:
    """(activations at the peak, the step's FLOPs, its recompute seconds, the bytes recomputed)
    at micro-batch 4."""
    job = compile_job(spec)
    with open_session(open_device(job), job) as session:
        outcome = session.probe(4)
        cost = session.step_cost(4)
    assert cost is not None
    recompute = cost.seconds()["recompute"]
    return outcome.breakdown.get("activations", 0), cost.flops, recompute, cost.recomputed


def test_every_second_layer_sits_between_none_and_full() -> None:
    none, half, full = traced_llama(None), traced_llama(2), traced_llama(1)
    # memory: fewer blocks checkpointed keep more activations
    assert full[0] < half[0] < none[0]
    # time: half the layers recompute their forward
    assert none[1] < half[1] < full[1]
    assert half[1] - none[1] == pytest.approx((full[1] - none[1]) / 2, rel=0.05)


def test_op_selective_keeps_the_matmuls_and_recomputes_none_of_them() -> None:
    """Each checkpointed layer keeps its matmul and attention outputs: more memory than full
    checkpointing, less than none; backward recomputes only the ops between them, none of which
    does matmul work, so the step's FLOPs are those of no checkpointing."""
    none, full, op = traced_llama(None), traced_llama(1), traced_llama(1, "op")
    assert full[0] < op[0] < none[0]
    assert op[1] == none[1] < full[1]
    # the recompute, booked apart: none without checkpointing, least for the op policy
    assert none[2] == none[3] == 0
    assert 0 < op[2] < full[2] and 0 < op[3] < full[3]


def test_op_selective_excludes_offload() -> None:
    raw = llama(1).model_dump(mode="json")
    raw["training"]["checkpointing"] = {"selective": "op", "offload": True}
    with pytest.raises(ValueError, match="selective"):
        PlanSpec.model_validate(raw)


def test_our_block_wrapper_checkpoints_one_block_in_k() -> None:
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(6)]
    model = nn.Sequential(*blocks)
    assert apply_checkpointing(model, CheckpointingSpec(every=3)) == 2
    wrapped = [isinstance(b, Checkpointed) for b in model]
    assert wrapped == [True, False, False, True, False, False]
    model(torch.randn(2, 4)).sum().backward()  # still trains


def test_the_loop_checkpoints_the_same_layers() -> None:
    configs = configs_of(llama(2))
    code = configs["pytorch"]
    assert "_layer.gradient_checkpointing = _index % 2 == 0" in code
    compile(code, "train.py", "exec")
    option: dict[str, Any] = configs["checkpointing"]["torchtitan"]["activation_checkpoint"]
    assert option == {"mode": "selective", "selective_ac_option": "2"}
    assert "checkpointing" not in configs_of(llama(1))


def test_the_trainer_checkpoints_the_same_layers(tmp_path: Any) -> None:
    """transformers 5's Trainer takes `every_n_layers` and checkpoints layers 0, k, 2k ...,
    the ones the plan traced."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = configs_of(llama(2))["hf_trainer"]
    assert hf["gradient_checkpointing_kwargs"] == {"use_reentrant": False, "every_n_layers": 2}
    assert "gradient_checkpointing_kwargs" not in configs_of(llama(1))["hf_trainer"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", **hf
        )
    assert args.activation_checkpointing_kwargs["every_n_layers"] == 2
