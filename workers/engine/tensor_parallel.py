"""Tensor parallelism: each transformer block's linear layers split over N ranks.

`parallelism.tensor_parallel: N` traces what torchtitan and transformers' own `tp_plan` run: a
(dp_shard, [cp,] tp) device mesh, DTensor's `parallelize_module` on every decoder layer with the
plan transformers ships for the architecture (`config.base_model_tp_plan`), then FSDP over the
data ranks on top. "colwise" (`ColwiseParallel`) splits a linear layer's output features: q, k, v
and the MLP's gate and up projections, so each rank holds heads / N attention heads and
intermediate / N MLP features; "rowwise" (`RowwiseParallel`) splits the input features of the
attention's output and the MLP's down projection, whose partial sums are all-reduced. Forward
all-reduces after each rowwise layer and backward after each colwise layer's input gradient:
four all-reduces of (micro-batch x tokens x hidden) per block and step, more with checkpointed
recompute, on the critical path (no async TP). The traced collectives are the ones costed.

`sequence_parallel` adds torchtitan's sequence parallelism: the block's norms and the residual
stream between blocks on 1/N of the tokens, an all-gather before the attention and the MLP and a
reduce-scatter after them in place of each all-reduce. What the layout leaves out, each stated
where it matters:
- the embeddings are not split by TP, nor the output head unless `loss_parallel` asks
  (torchtitan's loss parallelism: the head split by vocabulary, the cross-entropy on each rank's
  share of the logits); FSDP shards them over the data ranks;
- entries other than colwise/rowwise (packed projections, experts' own styles) and
  LoRA-wrapped layers: refused at the field. An MoE model whose plan splits only the
  attention (Mixtral's) keeps its experts whole on every TP rank, as transformers' plan does:
  expert parallelism is another layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from service.schemas.spec import TrainingSpec, TransformersModel
from workers.engine.errors import SpecError

if TYPE_CHECKING:  # the compile step imports the models, whose sharding imports this module
    from workers.engine.compiled import CompiledJob

FIELD = ("training", "parallelism", "tensor_parallel")
SP_FIELD = ("training", "parallelism", "sequence_parallel")
STYLES = ("colwise", "rowwise")
# Parameters every TP rank keeps whole (Qwen3's per-head q/k norms): left to FSDP, as traced
# (their gradients' all-reduce over tp, a few KiB per layer, is not costed)
WHOLE = ("replicated_with_grad_allreduce",)
LAYERS = re.compile(r"^(?:model\.)?layers\.\*\.(.+)$")  # transformers' per-block plan entries


def block_plan(config: Any) -> dict[str, str]:
    """transformers' tensor-parallel plan for one decoder block, names relative to the block;
    the plan's entries outside the blocks (embeddings, norms, head) are left to FSDP."""
    plan = getattr(config, "base_model_tp_plan", None) or {}
    return {m.group(1): style for key, style in plan.items() if (m := LAYERS.match(key))}


def check(job: CompiledJob) -> None:
    """422s at `training.parallelism.tensor_parallel` for a layout the trace cannot split (the
    model's config built, not the model)."""
    if job.training.parallelism.tensor_parallel == 1:
        return
    from workers.engine.models.hf import hf_config  # (see the imports)

    if not isinstance(job.model, TransformersModel):
        raise SpecError(FIELD, "tensor parallelism is planned for transformers models")
    check_config(hf_config(job.model, job.data), job.training)


def check_config(config: Any, training: TrainingSpec) -> dict[str, str]:
    """The block plan for `config`, or the 422 saying why the layout cannot be traced."""
    n = training.parallelism.tensor_parallel
    plan = block_plan(config)
    name = type(config).__name__
    if not plan:
        raise SpecError(FIELD, f"transformers ships no tensor-parallel plan for {name}")
    plan = {path: style for path, style in plan.items() if style not in WHOLE}
    odd = sorted({style for style in plan.values() if style not in STYLES})
    if odd:
        raise SpecError(
            FIELD,
            f"{name}'s tensor-parallel plan uses {', '.join(odd)} (experts or packed "
            "projections): only colwise/rowwise linear layers are traced",
        )
    if training.peft is not None:
        raise SpecError(FIELD, "tensor parallelism with LoRA adapters is not planned")
    for what in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, what, None)
        if heads is not None and heads % n:
            raise SpecError(FIELD, f"{n} ranks do not divide the model's {what} ({heads})")
    return plan


def check_sequence_parallel(job: CompiledJob) -> None:
    """422s at `training.parallelism.sequence_parallel` for what it cannot split."""
    parallelism = job.training.parallelism
    if not parallelism.sequence_parallel:
        return
    n = parallelism.tensor_parallel
    seq_len = getattr(job.data, "seq_len", None)
    if seq_len is None:
        raise SpecError(
            SP_FIELD, "sequence parallelism splits a token sequence: data.kind 'tokens'"
        )
    if seq_len % n:
        raise SpecError(SP_FIELD, f"seq_len {seq_len} must be a multiple of tensor_parallel {n}")


def parallelize_blocks(
    blocks: list[nn.Module], config: Any, training: TrainingSpec, mesh: Any
) -> None:
    """Every decoder block split over the tp mesh dimension, before FSDP shards them; with
    sequence parallelism the stack's residual stream is split on the sequence from the first
    block's input to the last block's output."""
    plan = check_config(config, training)
    sequence = training.parallelism.sequence_parallel
    for block in blocks:
        parallelize(block, plan, mesh, sequence)
    if sequence and blocks:
        _split_stack(blocks[0], blocks[-1], mesh)


def splits_the_head(model: nn.Module, training: TrainingSpec) -> bool:
    """Loss parallelism asked for and applicable: a causal LM's own loss on the output head's
    logits (the fused loss kernels take the head's weight whole: with them the head is left to
    FSDP). Opt-in: on a tiny Llama PyTorch's FSDPMemTracker reports a per-rank peak 13% above
    the tracker's under `loss_parallel()` (they agree within 0.2% everywhere else), unresolved,
    so the default keeps the head whole, which holds more and cannot under-count."""
    head = getattr(model, "lm_head", None)
    return (
        training.parallelism.tensor_parallel > 1
        and training.parallelism.loss_parallel
        and training.loss_kernel == "standard"
        and isinstance(head, nn.Linear)
        and type(model).__name__.endswith("ForCausalLM")
    )


def split_head(model: nn.Module, mesh: Any) -> None:
    """torchtitan's loss parallelism: the head split by vocabulary (colwise), its logits left
    split (each rank holds vocab / N of every token's logits) and the cross-entropy computed on
    them under `loss_parallel()` (a max, a sum and the target's logit all-reduced per token),
    so no rank holds or computes the whole vocabulary's logits."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    style = ColwiseParallel(
        input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
    )
    parallelize_module(model, mesh, {"lm_head": style})


def parallelize(block: nn.Module, plan: dict[str, str], mesh: Any, sequence: bool) -> None:
    """`parallelize_module` one block on the tp mesh dimension with transformers' plan;
    `sequence`: torchtitan's sequence parallelism (norms on 1/N of the tokens, the rowwise
    layers reduce-scatter to it)."""
    # DTensor's tensor-parallel styles: only tensor-parallel plans import them
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    def rowwise() -> Any:
        if sequence:  # the output stays a DTensor split on the sequence
            return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        return RowwiseParallel()

    styles = {"colwise": ColwiseParallel, "rowwise": rowwise}
    names = {name for name, _ in block.named_modules()}
    layers: dict[str, Any] = {
        path: styles[style]() for path, style in plan.items() if path in names
    }
    if not layers:
        raise ValueError("no layer of the block matches the tensor-parallel plan")
    if sequence:
        layers |= {name: SequenceParallel() for name in _norms(block, plan)}
    parallelize_module(block, mesh, layers)
    for parent in _shared_inputs(plan, names):
        _replicate_first_input(block.get_submodule(parent), mesh)


def _norms(block: nn.Module, plan: dict[str, str]) -> list[str]:
    """The block's own norms (its children outside the split modules): what sequence
    parallelism runs on 1/N of the tokens."""
    split = {path.partition(".")[0] for path in plan}
    return [
        name
        for name, child in block.named_children()
        if name not in split and "norm" in type(child).__name__.lower()
    ]


def _split_stack(first: nn.Module, last: nn.Module, mesh: Any) -> None:
    """The residual stream enters the first block split on the sequence (each rank keeps its
    1/N of the tokens) and leaves the last one gathered, as a plain tensor for the final norm
    and the head (torchtitan splits the embedding's output and the head's input instead: the
    same collectives, one block apart)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def scattered(x: torch.Tensor) -> Any:
        whole = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
        return whole.redistribute(mesh, (Shard(1),))

    def gather(_module: nn.Module, _args: Any, out: Any) -> Any:
        first = out[0] if isinstance(out, tuple) else out
        whole = first.redistribute(mesh, (Replicate(),)).to_local()
        return (whole, *out[1:]) if isinstance(out, tuple) else whole

    _on_first_input(first, scattered)
    last.register_forward_hook(gather)


def _shared_inputs(plan: dict[str, str], names: set[str]) -> list[str]:
    """The modules that feed several colwise layers one input (attention: q, k, v; the MLP:
    gate and up)."""
    parents: dict[str, int] = {}
    for path, style in plan.items():
        parent = path.rpartition(".")[0]
        if style == "colwise" and parent and path in names:
            parents[parent] = parents.get(parent, 0) + 1
    return [parent for parent, colwise in parents.items() if colwise > 1]


def _replicate_first_input(module: nn.Module, mesh: Any) -> None:
    """torchtitan's input preparation (`PrepareModuleInput` to a replicated DTensor): the
    module's input enters as one replicated DTensor, so the input gradients of its colwise
    layers add up as one partial sum and backward all-reduces it once per module rather than
    once per layer."""
    from torch.distributed.tensor import DTensor, Replicate

    def replicated(value: Any) -> Any:
        if isinstance(value, DTensor):  # sequence parallelism: all-gathered here
            return value.redistribute(mesh, (Replicate(),))
        if not isinstance(value, torch.Tensor):
            return value
        return DTensor.from_local(value, mesh, (Replicate(),), run_check=False)

    _on_first_input(module, replicated)


def _on_first_input(module: nn.Module, transform: Callable[[Any], Any]) -> None:
    """`transform` the module's first input before its forward, whether it comes positionally
    (the MLP) or by name (transformers calls attention and decoder layers with
    `hidden_states=`)."""
    import inspect

    name = next(iter(inspect.signature(module.forward).parameters))

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        if name in kwargs:
            return args, kwargs | {name: transform(kwargs[name])}
        return None

    module.register_forward_pre_hook(hook, with_kwargs=True)
