"""One training job materialised on a device: forward + loss + backward + optimizer step.

The model is materialised once and the optimizer's state primed once, so every trial measures a
steady-state iteration (the second iteration onward: optimizer state exists, gradients are created
in backward and freed by `zero_grad(set_to_none=True)`), at any micro-batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.schemas.spec import ImageData, TensorData, TokensData
from workers.engine.autocast_policy import CudaAutocastPolicy, autocast_region
from workers.engine.checkpointing import enable_checkpointing
from workers.engine.context_parallel import ring_attention
from workers.engine.data import sample_input, sample_target
from workers.engine.distributed import World, local, replicate, shard
from workers.engine.loss_head import install as install_loss_head
from workers.engine.models import BuiltModel
from workers.engine.models.hf import row_inputs
from workers.engine.offload import OffloadLedger, offload_hooks
from workers.engine.optimizers import choose, make_optimizer, paged_states
from workers.engine.peft import adapter_parameters
from workers.engine.qlora import quantize_materialised
from workers.engine.trace import TraceJob
from workers.engine.tracker import MemoryTracker

LOW_PRECISION = {"fp16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
# Steps traced (or run, on a real device) while a plan is made: `counting_steps` opens a count,
# each iteration adds one. A context variable, so plans in other threads count apart.
_STEPS: ContextVar[list[int] | None] = ContextVar("trainplan_steps", default=None)


@contextmanager
def counting_steps() -> Iterator[list[int]]:
    """A one-element list whose value is the steps run inside the block."""
    count = [0]
    token = _STEPS.set(count)
    try:
        yield count
    finally:
        _STEPS.reset(token)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model normalises over the batch (it then needs a real batch of 16-32)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def compute_loss(out: Any, target: torch.Tensor, family: str) -> torch.Tensor:
    """The loss a user of this model family would train with; auxiliary heads add to it."""
    outputs = _tensors(out)
    loss: torch.Tensor | None = None
    for index, logits in enumerate(outputs):
        part = _one_loss(logits, target, family)
        weight = 1.0 if index == 0 else 0.4
        loss = part * weight if loss is None else loss + part * weight
    assert loss is not None
    return loss


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return [out.logits]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [v for v in out if isinstance(v, torch.Tensor)]
    raise TypeError(f"cannot find the model's output tensor in {type(out).__name__}")


def _one_loss(logits: torch.Tensor, target: torch.Tensor, family: str) -> torch.Tensor:
    if family == "regression":
        return F.mse_loss(logits.float().reshape(target.shape), target)
    if family == "lm":
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    return F.cross_entropy(logits.float(), target)


class TrainingJob:
    """A materialised model + optimizer that runs steady-state iterations at any micro-batch."""

    def __init__(
        self,
        trace: TraceJob,
        built: BuiltModel,
        device: str,
        tracker: MemoryTracker,
        *,
        fake: bool,
        fill: Callable[[torch.Tensor], None] | None = None,
        autocast_policy: CudaAutocastPolicy | None = None,
        grads_set_to_none: bool = True,
        cuda_semantics: bool | None = None,
        world: World | None = None,
    ) -> None:
        self.trace = trace
        self.autocast_policy = autocast_policy  # CUDA's rules on a trace made on the CPU
        # `zero_grad()` frees gradients since torch 2.0; before, it zeroed them in place, so
        # they stay allocated through the next forward.
        self.grads_set_to_none = grads_set_to_none
        self.family = built.family
        self.device = device
        self.tracker = tracker
        self.fake = fake
        training = trace.training
        self.precision = training.precision
        self.autocast_dtype = LOW_PRECISION.get(self.precision)
        self.param_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.world = world
        self.host_bytes = 0  # what CPU offload or paged optimizer states keep in host memory
        self.activation_offload = OffloadLedger()  # activation offload's host copies, step by step
        install_loss_head(training.loss_kernel, built)
        model = built.module
        self.forward_loss = built.forward_loss
        self.vocab_size = built.vocab_size or getattr(trace.data, "vocab_size", None)
        if training.gradient_checkpointing:
            hooks = offload_hooks(fake, self.activation_offload)
            enable_checkpointing(model, training.checkpointing, hooks)
        self.frozen = self._freeze(model)
        with tracker.in_phase("parameters"):
            if world is not None and world.shards:
                model = self._materialise_sharded(model, world)
            else:
                model = self._materialise(model, fill)
            if training.peft is not None and training.peft.method == "qlora":
                quantize_materialised(model)
        if training.peft is not None:
            tracker.mark(adapter_parameters(model), "adapter_parameters")
        if world is not None and world.replicates:
            model = replicate(model, training, tracker)
        self.model = model.train()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("every parameter is frozen: nothing to train")
        self.classes = self._output_classes()
        # CUDA's default is the multi-tensor (foreach) path; traced on CPU we ask for it explicitly
        # (unless the trace stands for a real CPU run: the cpu device's twin).
        if cuda_semantics is None:
            cuda_semantics = fake or device.startswith("cuda")
        self.optimizer_choice = choose(training, gpu=cuda_semantics)
        self.shard_pairs = _local_shards(self.trainable) if fake else []
        self.optimizer = make_optimizer(
            self.optimizer_choice,
            [piece for _, piece in self.shard_pairs] or self.trainable,
            training.base_lr,
            partitioned=world is not None and world.strategy == "zero1",
        )
        self.scaler = self._make_scaler()
        self._prime_optimizer()

    # -- set-up ----------------------------------------------------------------------------
    def _freeze(self, model: nn.Module) -> list[str]:
        prefixes = self.trace.training.trainable
        if prefixes == "all":
            return []
        frozen = []
        for name, param in model.named_parameters():
            if any(name.startswith(p) for p in prefixes):
                param.requires_grad_(False)
                frozen.append(name)
        return frozen

    def _materialise(
        self, model: nn.Module, fill: Callable[[torch.Tensor], None] | None
    ) -> nn.Module:
        dtype = self.param_dtype
        device = self.device
        data = self.trace.data
        nhwc = data.kind == "image" and data.layout == "channels_last"

        def empty(t: torch.Tensor) -> torch.Tensor:
            target = dtype if dtype is not None and t.is_floating_point() else t.dtype
            layout = torch.channels_last if nhwc and t.dim() == 4 else torch.contiguous_format
            out = torch.empty(t.size(), dtype=target, device=device, memory_format=layout)
            if fill is not None:
                fill(out)
            return out

        # `_apply` gives each module its own new Parameter: note which slots shared one
        # (tied embeddings) and share the new one again, or tied weights would count twice.
        slots = [
            (module, name, id(param))
            for module in model.modules()
            for name, param in module._parameters.items()
            if param is not None
        ]
        model = model._apply(empty)
        first: dict[int, nn.Parameter] = {}
        for module, name, key in slots:
            param = module._parameters[name]
            assert param is not None
            if key in first:
                module._parameters[name] = first[key]
            else:
                first[key] = param
        return model

    def _materialise_sharded(self, model: nn.Module, world: World) -> nn.Module:
        """fully_shard the meta model, then give each rank its local shards."""
        if self.param_dtype is not None:
            model = model.to(self.param_dtype)
        shard(model, world, self.trace.training, self.autocast_dtype)
        model.to_empty(device=self.device)
        retie = getattr(model, "tie_weights", None)
        if retie is not None:  # `to_empty` gives tied slots separate parameters
            retie()
        return model

    def _output_classes(self) -> int | None:
        if self.family == "hf_sequence":
            return self.trace.data.num_classes or 2
        return self.trace.data.num_classes or self.vocab_size

    def _make_scaler(self) -> Any:
        if self.precision != "fp16-mixed" or self.fake:
            return None
        return torch.amp.GradScaler(self.device.split(":")[0])

    def _prime_optimizer(self) -> None:
        """Create the optimizer state the way the first real step would, without a forward."""
        with self.tracker.in_phase("optimizer"):
            for p in self.trainable:
                p.grad = torch.zeros_like(p)
            self._step()
            self._zero_grad(self.grads_set_to_none)
        self.tracker.mark(self.optimizer_state_tensors(), "optimizer_state")
        self.tracker.mark(self.gradients(), "gradients")
        if self.fake:
            self.tracker.exclude(self.optimizer_state_tensors(scalars=True))
        if self.offloaded:
            params = (local(p) for p in self.model.parameters())
            self.host_bytes = self.tracker.exclude(params)
            self.host_bytes += self.tracker.exclude(self.optimizer_state_tensors())
        elif self.optimizer_choice.paged:
            self.host_bytes = self.tracker.exclude(paged_states(self.optimizer))

    @property
    def offloaded(self) -> bool:
        return self.world is not None and self.trace.training.parallelism.cpu_offload

    def gradients(self) -> Iterator[torch.Tensor | None]:
        """This rank's gradients (local shards under FSDP)."""
        return (None if p.grad is None else local(p.grad) for p in self.trainable)

    def optimizer_state_tensors(self, scalars: bool = False) -> Iterator[torch.Tensor]:
        """The optimizer's state tensors; `scalars`: only its 0-d counters (`step`), which a
        non-capturable optimizer keeps on the host."""
        inner = getattr(self.optimizer, "optim", self.optimizer)  # ZeRO-1 wraps the local one
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and (value.dim() == 0) == scalars:
                    yield local(value)

    # -- one iteration ---------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        if self.autocast_policy is not None:
            return autocast_region(self.autocast_policy, self.autocast_dtype)
        return torch.autocast(self.device.split(":")[0], dtype=self.autocast_dtype)

    @contextmanager
    def context(self) -> Iterator[None]:
        """Where a step's forward and backward run: through CP's ring when the sequence is
        split over ranks, under loss parallelism when TP splits the head's logits."""
        world = self.world
        with ExitStack() as stack:
            if world is not None and world.loss_parallel:
                from torch.distributed.tensor.parallel import loss_parallel  # TP plans only

                stack.enter_context(loss_parallel())
            if world is not None and world.context_parallel > 1:
                stack.enter_context(ring_attention(world.cp_mesh))
            yield

    def _rank_data(self) -> ImageData | TokensData | TensorData:
        """The data as this rank sees it: seq_len / N tokens of each sample under context
        parallelism."""
        data = self.trace.data
        if self.world is None or self.world.context_parallel == 1 or data.kind != "tokens":
            return data
        return data.model_copy(update={"seq_len": data.seq_len // self.world.context_parallel})

    def make_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._rank_data()
        with self.tracker.in_phase("input"):
            x = sample_input(
                data,
                batch,
                self.device,
                dtype=self.param_dtype or torch.float32,
                vocab=self.vocab_size,
            )
            if self.family == "hf_sequence":
                y = torch.randint(0, self.classes or 2, (batch,), device=self.device)
            elif self.family == "segmentation" and data.kind == "image":
                y = torch.randint(
                    0, self.classes or 2, (batch, data.height, data.width), device=self.device
                )
            else:
                y = sample_target(data, batch, self.device, self.classes)
            if self.param_dtype is not None and y.is_floating_point():
                y = y.to(self.param_dtype)
        return x, y

    def iteration(self, batch: int) -> None:
        """forward + loss + backward + step on one micro-batch, as a training loop would (or,
        for an evaluation job, the forward and the loss alone)."""
        count = _STEPS.get()
        if count is not None:
            count[0] += 1
        if self.trace.evaluating:
            self.evaluation_step(batch)
            return
        tracker = self.tracker
        self.activation_offload.new_step()
        x, y = self.make_batch(batch)
        with self.context():
            loss = self._loss(x, y)
            if self.world is not None and self.world.shards:
                # Parameters still gathered after forward (all of them without resharding:
                # zero2) are FSDP's unsharded copies, whatever op made their storage.
                gathered = (p for p in self.model.parameters() if local(p) is p)
                tracker.mark(gathered, "gathered_parameters")
            self._backward(loss)
        del loss, x, y
        tracker.mark(self.gradients(), "gradients")
        if self.offloaded:  # reduce-scattered, then copied to the host for the CPU step
            tracker.exclude(self.gradients())
        with tracker.in_phase("optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                if self.precision == "fp16-mixed":
                    self._fake_unscale()
                self._step()
            self._zero_grad(self.grads_set_to_none)

    def evaluation_step(self, batch: int) -> None:
        """What `Trainer.evaluate` runs between steps: `model.eval()`, no gradients, the loss
        of one micro-batch; the optimizer state stays, gradients are already freed."""
        x, y = self.make_batch(batch)
        self.model.eval()
        try:
            with self.context(), torch.no_grad():
                loss = self._loss(x, y)
            del loss, x, y
        finally:
            self.model.train()

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The forward and the loss, under the precision's autocast."""
        with self.tracker.in_phase("forward"), self.autocast():
            if self.forward_loss is not None:
                return self.forward_loss(self.model, x, y, **self._row_inputs(x))
            return compute_loss(self.model(x), y, self.family)

    def _row_inputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The collator's padding mask or packed positions, part of the batch (`row_inputs`)."""
        if self.trace.rows == "whole":
            return {}
        with self.tracker.in_phase("input"):
            return row_inputs(self.trace.rows, tokens)

    def _backward(self, loss: torch.Tensor) -> None:
        with self.tracker.in_phase("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            elif self.precision == "fp16-mixed":  # fake: the scaler's memory without its .item()
                (loss * 65536.0).backward()
            else:
                loss.backward()

    def _fake_unscale(self) -> None:
        grads = [g for g in self.gradients() if g is not None]
        found_inf = torch.zeros(1, device=self.device)
        inv_scale = torch.full((1,), 1.0 / 65536.0, device=self.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

    def _step(self) -> None:
        """The optimizer's step; on sharded parameters of a fake job, on each rank's local
        shards (`_local_shards`), handed their gradients' local shards first."""
        for param, piece in self.shard_pairs:
            piece.grad = None if param.grad is None else local(param.grad)
        self.optimizer.step()

    def _zero_grad(self, set_to_none: bool) -> None:
        """`optimizer.zero_grad`: a sharded parameter's gradient goes with its shard's, in the
        parameters' order, as the optimizer over DTensors frees them."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            for param, _ in self.shard_pairs:
                param.grad = None

    def release(self) -> None:
        """Drop what a failed iteration may have left behind (gradients, the autograd graph)."""
        self._zero_grad(True)

    # -- facts -----------------------------------------------------------------------------
    def parameter_count(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        return total, sum(p.numel() for p in self.trainable)

    def has_batchnorm(self) -> bool:
        return has_batchnorm(self.model)


def _local_shards(params: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its local shard) for sharded (DTensor) parameters, for a fake job's optimizer
    to step on the shards. Every op of the step is pointwise on the shards (DTensor runs the
    same foreach ops on the local tensors), so the allocations are the same, byte for byte and
    in order (tested); what it saves is DTensor's dispatch: its sharding propagation, keyed by
    the whole parameter list, misses for every new job (each depth of a fold, each world size)
    and took most of a job's set-up. Empty for unsharded parameters."""
    pairs = [(p, local(p)) for p in params]
    if all(piece is p for p, piece in pairs):
        return []
    return pairs
