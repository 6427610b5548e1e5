"""Token data as the fine-tuning frameworks batch it: TRL's SFTConfig, Axolotl's keys, and the
generated PyTorch loop's own collation (run for real)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import yaml

from service.schemas.spec import PlanSpec
from tests.helpers import TINY_LLAMA, configs_of
from workers.engine.configs import configs_with_evaluation

SHORT = {"percentiles": {"0": 5, "50": 20, "100": 64}}


def llm_spec(batching: str, attention: str = "sdpa", **training: Any) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA,
                "attn_implementation": attention,
            },
            "data": {
                "kind": "tokens",
                "seq_len": 64,
                "vocab_size": 1000,
                "num_samples": 1000,
                "lengths": SHORT,
                "batching": batching,
            },
            "training": {"precision": "bf16-mixed", **training},
        }
    )


NUMBERS = {"micro_batch_size": 2, "accumulation_steps": 2, "total_optimizer_steps": 3}


@pytest.mark.parametrize(
    ("batching", "attention", "keys"),
    [
        ("packed", "flash_attention_2", {"packing": True, "padding_free": True}),
        ("pad_to_max", "sdpa", {"packing": False, "pad_to_multiple_of": 64}),
        ("pad_to_longest", "sdpa", {"packing": False, "pad_to_multiple_of": None}),
    ],
)
def test_trl_sft_config_is_valid_and_batches_as_planned(
    tmp_path: Any, batching: str, attention: str, keys: dict[str, Any]
) -> None:
    trl = pytest.importorskip("trl")
    configs = configs_of(llm_spec(batching, attention, gradient_checkpointing=True), **NUMBERS)
    args = configs["trl_sft"]
    config = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, **args)
    assert config.max_length == 64
    for key, value in keys.items():
        assert getattr(config, key) == value
    assert config.per_device_train_batch_size == 2 and config.gradient_accumulation_steps == 2
    assert config.learning_rate == args["learning_rate"] and config.bf16
    # the Trainer's own arguments are the hf_trainer rendering's
    assert {k: v for k, v in args.items() if k in configs["hf_trainer"]} == configs["hf_trainer"]


@pytest.mark.parametrize("every_steps", [None, 50])
def test_every_rendering_that_evaluates_gets_the_plan_s_evaluation(
    tmp_path: Any, every_steps: int | None
) -> None:
    """The evaluation micro-batch is found after the renderings: each that evaluates takes it."""
    trl = pytest.importorskip("trl")
    configs = configs_of(llm_spec("pad_to_max"), **NUMBERS)
    evaluated = configs_with_evaluation(configs, 7, every_steps)
    config = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, **evaluated["trl_sft"])
    assert config.per_device_eval_batch_size == 7
    assert evaluated["hf_trainer"]["per_device_eval_batch_size"] == 7
    axolotl = evaluated["axolotl"]
    assert axolotl["eval_batch_size"] == 7
    if every_steps is None:
        assert config.eval_strategy == "epoch" and axolotl["evals_per_epoch"] == 1
    else:
        assert config.eval_strategy == "steps" and config.eval_steps == every_steps
        assert axolotl["eval_steps"] == every_steps
    assert "per_device_eval_batch_size" not in configs["trl_sft"]  # the input is not changed


def test_packed_rows_get_no_trl_config_without_flash_attention() -> None:
    """TRL keeps documents apart only padding-free, flattening the micro-batch into one row: with
    sdpa that row gets one square mask, not the rows the plan traced."""
    assert "trl_sft" not in configs_of(llm_spec("packed", "sdpa"), **NUMBERS)
    assert "axolotl" in configs_of(llm_spec("packed", "sdpa"), **NUMBERS)


@pytest.mark.parametrize(
    ("batching", "attention", "switch", "packing", "padded"),
    [
        ("packed", "sdpa", "sdp_attention", True, True),
        ("packed", "flash_attention_2", "flash_attention", True, True),
        ("pad_to_longest", "eager", "eager_attention", False, False),
    ],
)
def test_axolotl_keys(
    batching: str, attention: str, switch: str, packing: bool, padded: bool
) -> None:
    spec = llm_spec(
        batching,
        attention,
        gradient_checkpointing=True,
        loss_kernel="liger",
        peft={"method": "lora", "r": 8, "alpha": 16},
    )
    out = yaml.safe_load(yaml.safe_dump(configs_of(spec, **NUMBERS)["axolotl"]))
    assert out["sequence_len"] == 64 and out[switch] is True
    assert out["sample_packing"] is packing and out["pad_to_sequence_len"] is padded
    assert (out["micro_batch_size"], out["gradient_accumulation_steps"]) == (2, 2)
    assert out["bf16"] is True and out["gradient_checkpointing"] is True
    assert out["adapter"] == "lora" and (out["lora_r"], out["lora_alpha"]) == (8, 16)
    assert out["plugins"] == ["axolotl.integrations.liger.LigerPlugin"]
    assert out["liger_fused_linear_cross_entropy"] is True and out["liger_rms_norm"] is False


def test_axolotl_layouts() -> None:
    fsdp = llm_spec(
        "packed",
        "flash_attention_2",
        parallelism={"strategy": "fsdp", "world_size": 4, "context_parallel": 2},
    )
    out = configs_of(fsdp, **NUMBERS, world_size=2)["axolotl"]
    assert out["fsdp_version"] == 2 and out["fsdp_config"]["reshard_after_forward"] is True
    assert out["context_parallel_size"] == 2
    qlora = llm_spec("pad_to_max", peft={"method": "qlora"}, precision="bf16")
    out = configs_of(qlora, **NUMBERS)["axolotl"]
    assert out["adapter"] == "qlora" and out["load_in_4bit"] is True
    assert out["bfloat16"] is True and out["bf16"] is False


def test_no_fine_tuning_configs_beyond_causal_lms(small_spec: dict[str, Any]) -> None:
    configs = configs_of(PlanSpec.model_validate(small_spec), **NUMBERS)
    assert "trl_sft" not in configs and "axolotl" not in configs


# -- the generated loop's collation, run for real on a tiny Llama ------------------------------


def _run_loop(batching: str, samples: list[list[int]]) -> tuple[dict[str, Any], list[Any]]:
    return _run_loop_code(configs_of(llm_spec(batching), **NUMBERS)["pytorch"], samples)


def _run_loop_code(code: str, samples: list[list[int]]) -> tuple[dict[str, Any], list[Any]]:
    """Execute the plan's PyTorch loop (trainplan's own text) on the CPU; record each batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    seen: list[Any] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    scope: dict[str, Any] = {
        "model": model,
        "train_dataset": [{"input_ids": s} for s in samples],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "<plan>", "exec", dont_inherit=True), scope)
    return scope, seen


def _samples(n: int = 40) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 65, (n,), generator=generator).tolist()
    return [torch.randint(1, 1000, (length,), generator=generator).tolist() for length in lengths]


def test_the_loop_packs_samples_into_rows_with_their_boundaries() -> None:
    samples = _samples()
    scope, seen = _run_loop("packed", samples)
    rows = scope["train_rows"]
    assert all(row["input_ids"].shape == (64,) for row in rows)
    real = sum(int((row["labels"] != -100).sum()) for row in rows)
    # every token is packed once; a sample's first token is never a target
    assert real == sum(len(s) - 1 for s in samples)
    # no fewer rows than the tokens need, and fewer than one per sample
    assert -(-sum(map(len, samples)) // 64) <= len(rows) < len(samples)
    # positions restart at each sample: the documents a row holds are the samples
    # (and the padding at a row's end, if any, counts as one more)
    starts = sum(int((row["position_ids"] == 0).sum()) for row in rows)
    assert len(samples) <= starts <= len(samples) + len(rows)
    # the model saw micro-batches of 2 rows with their positions, 3 optimizer steps of 2
    assert len(seen) == 3 * 2
    assert all(kw["input_ids"].shape == (2, 64) and "position_ids" in kw for kw in seen)
    assert scope["step"] == 3


@pytest.mark.parametrize(("batching", "widths"), [("pad_to_max", {64}), ("pad_to_longest", None)])
def test_the_loop_pads_as_planned(batching: str, widths: set[int] | None) -> None:
    samples = _samples()
    _, seen = _run_loop(batching, samples)
    assert len(seen) == 3 * 2
    for kw in seen:
        ids, mask = kw["input_ids"], kw["attention_mask"]
        width = ids.shape[1]
        if widths is not None:
            assert width in widths
        else:  # padded to the batch's longest sample: one row has no padding
            assert int(mask.sum(dim=1).max()) == width
        assert torch.equal(kw["labels"] == -100, mask == 0)


def test_the_loop_runs_op_selective_checkpointing_as_planned() -> None:
    """The rendered policy keeps the matmul outputs: the layers' checkpoint function carries it,
    and the loop trains with it."""
    spec = llm_spec(
        "pad_to_max", gradient_checkpointing=True, checkpointing={"selective": "op", "every": 2}
    )
    configs = configs_of(spec, **NUMBERS)
    assert configs["checkpointing"]["torchtitan"]["activation_checkpoint"] == {
        "mode": "selective",
        "selective_ac_option": "op",
    }
    assert "aten.mm" in configs["checkpointing"]["keeps"]
    scope, seen = _run_loop_code(configs["pytorch"], _samples())
    layers = scope["_layers"]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert "context_fn" in layers[0]._gradient_checkpointing_func.keywords
    assert len(seen) == 6 and scope["step"] == 3
