"""Activation offload (`training.checkpointing.offload`): each checkpointed block's saved inputs
wait for backward in pinned host memory, as transformers' `activation_checkpointing_enable(
offload=True)` keeps them; the GPU holds less, the host more, and the step pays the copies."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from service.schemas.spec import PlanSpec
from tests.helpers import configs_of, session_of
from workers import engine
from workers.engine.catalogue import GPU_CATALOGUE, host_link_bytes_s

CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}


def spec(offload: bool, precision: str = "bf16-mixed", seq: int = 64, **extra: Any) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": CONFIG | extra.pop("config", {}),
            },
            "data": {"kind": "tokens", "seq_len": seq, "num_samples": 1000},
            "training": {
                "precision": precision,
                "gradient_checkpointing": True,
                "checkpointing": {"offload": offload},
                "global_batch_size": 64,
            },
            "device": {"kind": "simulated", "gpu": "T4", "memory_gib": 0.5},
            "search": {"what_if": False} | extra,
        }
    )


def packed_by_transformers(batch: int, seq: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """What transformers' own offload packs in one real CPU step of the same model: its
    `save_on_cpu` recorded, tensor by tensor."""
    transformers = pytest.importorskip("transformers")
    import transformers.modeling_utils as modeling_utils

    packed: list[tuple[tuple[int, ...], torch.dtype]] = []
    library = modeling_utils.save_on_cpu

    class Recording(library):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            pack = self.pack_hook

            def recorded(tensor: torch.Tensor) -> Any:
                packed.append((tuple(tensor.shape), tensor.dtype))
                return pack(tensor)

            self.pack_hook = recorded

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    modeling_utils.save_on_cpu = Recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.activation_checkpointing_enable(offload=True)
            model.train()
            tokens = torch.randint(0, CONFIG["vocab_size"], (batch, seq))
            model(input_ids=tokens, labels=tokens).loss.backward()
    finally:
        modeling_utils.save_on_cpu = library
    return packed


def test_the_trace_offloads_what_transformers_offloads() -> None:
    """The library, run for real on the CPU, packs each checkpointed layer's input (hidden
    states); the trace's stand-in copies the same bytes out and the same back."""
    batch, seq = 2, 32
    packed = packed_by_transformers(batch, seq)
    assert packed == [((batch, seq, CONFIG["hidden_size"]), torch.float32)] * 3
    library_bytes = sum(torch.Size(shape).numel() * 4 for shape, _ in packed)
    with session_of(spec(True, precision="fp32", seq=seq)) as session:
        session.probe(batch)
        ledger = session.job.activation_offload  # type: ignore[attr-defined]
        assert ledger.to_host == ledger.to_device == library_bytes
        assert ledger.on_host == 0  # every host copy released after backward


def test_offload_moves_the_saved_inputs_off_the_gpu() -> None:
    """At the peak (the loss head) the activations held are the same less every checkpointed
    layer's input, which waits on the host."""
    batch, seq = 8, 64
    layer_input = batch * seq * CONFIG["hidden_size"] * 4  # fp32 residual stream
    activations = {}
    for offload in (False, True):
        with session_of(spec(offload, seq=seq)) as session:
            activations[offload] = session.probe(batch).breakdown["activations"]
    assert activations[False] - activations[True] == 3 * layer_input


def test_a_plan_reports_the_host_copies_and_pays_for_them() -> None:
    plain, offload = engine.plan(spec(False)), engine.plan(spec(True))
    assert offload.max_micro_batch_size > plain.max_micro_batch_size
    micro, k = offload.micro_batch_size, offload.accumulation_steps
    held = 3 * micro * 64 * CONFIG["hidden_size"] * 4  # every layer's input, end of forward
    assert offload.memory.host_offloaded == held and plain.memory.host_offloaded == 0
    split = offload.throughput.split
    assert split.offload_bytes == 2 * held * k
    link = host_link_bytes_s(GPU_CATALOGUE["T4"])
    assert split.offload_s == pytest.approx(2 * held * k / link)
    assert plain.throughput.split.offload_s == 0.0
    rest = split.compute_s + split.memory_bound_s + split.recompute_s + split.optimizer_s
    assert offload.throughput.step_time_s == pytest.approx(rest + split.offload_s)


def test_an_offloaded_stack_folds_to_the_full_trace() -> None:
    deep = {"config": {"num_hidden_layers": 8}}
    folded = engine.plan(spec(True, depth_folding=True, **deep))
    full = engine.plan(spec(True, depth_folding=False, **deep))
    assert folded.depth_folding is not None and folded.depth_folding.folded
    assert folded.max_micro_batch_size == full.max_micro_batch_size
    assert folded.memory == full.memory
    assert [t.peak_bytes for t in folded.trials] == [t.peak_bytes for t in full.trials]
    assert folded.throughput.split.offload_bytes == full.throughput.split.offload_bytes


def test_offload_needs_checkpointing() -> None:
    raw = spec(True).model_dump()
    raw["training"]["gradient_checkpointing"] = False
    with pytest.raises(ValidationError) as error:
        PlanSpec.model_validate(raw)
    assert error.value.errors()[0]["loc"] == ("training", "checkpointing")
    assert "gradient_checkpointing" in error.value.errors()[0]["msg"]


def test_configs_offload_through_transformers(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    configs = configs_of(spec(True))
    hf = configs["hf_trainer"]
    assert hf["gradient_checkpointing_kwargs"] == {"use_reentrant": False, "offload": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", **hf
        )
    assert args.activation_checkpointing_kwargs["offload"] is True
    loop = configs["pytorch"]
    assert "model.activation_checkpointing_enable(every_n_layers=1, offload=True)" in loop
    compile(loop, "<plan>", "exec")
