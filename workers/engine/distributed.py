"""One rank of a multi-GPU job, traced: the real wrappers under a fake process group.

PyTorch's `fake` process group (torch.testing's `FakeStore`) answers every collective at once
without moving data, so `DistributedDataParallel`, `ZeroRedundancyOptimizer` and FSDP2's
`fully_shard` run their own code on rank 0 of `world_size` ranks and allocate exactly what they
allocate on a GPU: local shards, gathered parameters, all-gather and reduce-scatter buffers,
gradient buckets. Rank 0 is the worst rank (FSDP pads the last shards, ZeRO-1's greedy partition
gives rank 0 the first and largest parameters).

What this module adds to a plain trace, each found by running torch 2.14 (see issue 11):
- the device mesh is made outside FakeTensorMode (it holds real rank tensors);
- DTensor's sharding propagation runs each op at full shapes under the same fake mode to learn
  the output's metadata: the tracker is paused there (`ShardingPropagator`'s private
  `_propagate_tensor_meta_non_cached`, the one place it happens);
- FSDP2 frees gathered parameters with `UntypedStorage.resize_(0)` and regathers into the same
  storage, which no op's output shows: `resize_` is wrapped while tracing (PyTorch's own
  `FSDPMemTracker` does the same);
- DDP's one-time bucket rebuild broadcasts real indices, which fake tensors cannot hold, so DDP
  runs with `find_unused_parameters=True` (no rebuild; the buckets are the same size) and a comm
  hook that returns the bucket as reduced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from service.schemas.spec import SHARDED, TrainingSpec
from workers.engine.tensor_parallel import parallelize_blocks, split_head, splits_the_head
from workers.engine.tracker import MemoryTracker

REPLICATING = frozenset({"ddp", "zero1"})


@dataclass
class World:
    """Rank 0's view of the job: the strategy, its size and (for sharding) the device mesh."""

    strategy: str
    world_size: int
    gpus_per_node: int
    mesh: Any = None
    context_parallel: int = 1  # ranks one sequence is split over
    cp_mesh: Any = None  # their mesh dimension (context_parallel.py)
    tensor_parallel: int = 1  # ranks each block's linear layers are split over
    tp_mesh: Any = None  # their mesh dimension (tensor_parallel.py)
    loss_parallel: bool = False  # the head's logits split by vocabulary over tp

    @property
    def shards(self) -> bool:
        return self.strategy in SHARDED

    @property
    def replicates(self) -> bool:
        return self.strategy in REPLICATING

    @property
    def shard_group(self) -> int:
        """Ranks one parameter is split over: all of them, or one node's for hybrid_shard."""
        if self.strategy == "hybrid_shard":
            return min(self.gpus_per_node, self.world_size)
        return self.world_size


@contextmanager
def fake_world(training: TrainingSpec) -> Iterator[World | None]:
    """A fake process group of the spec's world size for the length of one session (None for a
    single-process job). Only one group exists per process: sessions do not nest."""
    strategy = training.strategy
    if strategy == "none":
        yield None
        return
    size = training.world_size
    if dist.is_initialized():
        dist.destroy_process_group()
    _forget_earlier_meshes()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        world = World(
            strategy,
            size,
            training.parallelism.gpus_per_node,
            context_parallel=training.parallelism.context_parallel,
            tensor_parallel=training.parallelism.tensor_parallel,
        )
        if world.context_parallel > 1 or world.tensor_parallel > 1:
            world.mesh, world.cp_mesh, world.tp_mesh = _layout_mesh(world)
        elif world.shards:
            world.mesh = _mesh(world)
        yield world
    finally:
        dist.destroy_process_group()


def _forget_earlier_meshes() -> None:
    """Clear DTensor's sharding-propagation and redistribution caches. They are keyed by specs
    whose device meshes compare equal by shape and names, not by process group, so an op of this
    session would get an output spec holding an earlier session's mesh, and its collectives
    would run on that session's (destroyed) group: the roofline, which counts a group's traffic
    by its name, then missed them (a second TP plan in one process costed no all-reduces)."""
    from torch.distributed.tensor._redistribute import _gen_transform_infos
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    _gen_transform_infos.cache_clear()


def _mesh(world: World) -> Any:
    shard = world.shard_group
    if world.strategy == "hybrid_shard" and world.world_size > shard:
        if world.world_size % shard:
            raise ValueError(
                f"hybrid_shard needs world_size ({world.world_size}) to be whole nodes of "
                f"{shard} GPUs"
            )
        return init_device_mesh(
            "cpu", (world.world_size // shard, shard), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh("cpu", (world.world_size,))


def _layout_mesh(world: World) -> tuple[Any, Any, Any]:
    """torchtitan's layout: a (dp_shard, cp, tp) mesh (dimensions of one left out), FSDP over
    dp_shard and cp flattened, CP over cp, TP over tp (adjacent ranks: inside a node first).
    Returns the FSDP, CP and TP meshes (None for a dimension of one)."""
    cp, tp = world.context_parallel, world.tensor_parallel
    dims = [("dp_shard", world.world_size // (cp * tp)), ("cp", cp), ("tp", tp)]
    dims = [(name, size) for name, size in dims if size > 1 or name == "dp_shard"]
    names = tuple(name for name, _ in dims)
    mesh = init_device_mesh("cpu", tuple(size for _, size in dims), mesh_dim_names=names)
    fsdp = mesh["dp_shard", "cp"]._flatten("dp_shard_cp") if cp > 1 else mesh["dp_shard"]
    return fsdp, mesh["cp"] if cp > 1 else None, mesh["tp"] if tp > 1 else None


@contextmanager
def traced_collectives(tracker: MemoryTracker) -> Iterator[None]:
    """Let the tracker see FSDP's storage resizes and not see DTensor's sharding propagation."""
    # DTensor's machinery (0.7 s to import): only sharded plans trace it
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    resize = torch.UntypedStorage.resize_
    propagate = ShardingPropagator._propagate_tensor_meta_non_cached
    coordinates = DeviceMesh._compute_coordinate_on_dim

    def tracked_resize(storage: Any, size: int) -> Any:
        out = resize(storage, size)
        tracker.resized(storage, int(size), "gathered_parameters")
        return out

    def untracked_propagate(self: Any, op_schema: Any) -> Any:
        with tracker.paused():
            return propagate(self, op_schema)

    def real_coordinates(mesh: DeviceMesh) -> Any:
        # FSDP joins its mesh and a TP-sharded parameter's under the fake mode: the new mesh's
        # coordinates of this rank are read from real rank ids, as outside it
        with tracker.paused(), unset_fake_temporarily():
            return coordinates(mesh)

    # setattr: these are patches of torch's own classes for the trace's duration
    setattr(torch.UntypedStorage, "resize_", tracked_resize)  # noqa: B010
    setattr(ShardingPropagator, "_propagate_tensor_meta_non_cached", untracked_propagate)  # noqa: B010
    setattr(DeviceMesh, "_compute_coordinate_on_dim", real_coordinates)  # noqa: B010
    try:
        yield
    finally:
        setattr(torch.UntypedStorage, "resize_", resize)  # noqa: B010
        setattr(ShardingPropagator, "_propagate_tensor_meta_non_cached", propagate)  # noqa: B010
        setattr(DeviceMesh, "_compute_coordinate_on_dim", coordinates)  # noqa: B010


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one at a time: a Hugging Face model's `_no_split_modules` (its
    decoder layers), else the parametered children of each Sequential/ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    out: list[nn.Module] = []
    for parent in model.modules():
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            out += [c for c in parent.children() if any(True for _ in c.parameters())]
    return out


def shard(model: nn.Module, world: World, training: TrainingSpec, low: torch.dtype | None) -> None:
    """`fully_shard` each block, then the root, on the meta model (before materialising);
    `low`: the mixed-precision dtype, if any."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # only sharded plans

    reshard = training.reshards_after_forward
    policy = MixedPrecisionPolicy()
    if low is not None:  # gathered in low precision, gradients reduced in fp32 (FSDP2's advice)
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    if world.tensor_parallel > 1:
        parallelize_blocks(blocks(model), model.config, training, world.tp_mesh)
        if splits_the_head(model, training):
            split_head(model, world.tp_mesh)
            world.loss_parallel = True
    seen: set[int] = set()
    for block in blocks(model):
        if id(block) in seen or block is model:
            continue
        seen.update(id(m) for m in block.modules())
        fully_shard(block, mesh=world.mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=world.mesh, reshard_after_forward=reshard, mp_policy=policy)


def replicate(model: nn.Module, training: TrainingSpec, tracker: MemoryTracker) -> nn.Module:
    """DDP around the materialised model; its gradient buckets count as communication."""
    with tracker.in_phase("communication"):
        wrapped = DistributedDataParallel(
            model,
            bucket_cap_mb=training.parallelism.bucket_cap_mb,
            init_sync=False,
            find_unused_parameters=True,
        )
    wrapped.register_comm_hook(None, _reduced)
    return wrapped


def _reduced(_state, bucket):
    """A comm hook whose all-reduce is done at once. DDP checks the hook's annotations as
    objects, which this module's postponed (string) annotations are not: none given."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes this rank holds of a (possibly distributed) tensor."""
    inner = getattr(tensor, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else tensor
