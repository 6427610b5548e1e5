"""A model of PyTorch's CUDA caching allocator: what `memory_reserved` becomes, and when it OOMs.

A real GPU runs out of memory when the allocator cannot reserve another segment, not when live
tensors reach the card's size: blocks are rounded, small requests share 2 MiB segments, large
ones take 20 MiB segments or their own, freed blocks stay reserved and are reused best-fit, and a
block is split only when the remainder is worth keeping. This module replays a sequence of
allocations and frees through those rules (c10/cuda/CUDACachingAllocator.cpp and
c10/core/AllocatorConfig.h of PyTorch 2.x; constants below carry their names there):

- `round_size`: < 512 B -> 512; else up to a multiple of 512, or to one of
  `roundup_power2_divisions` steps between powers of two when that option is set;
- pools: <= 1 MiB small, larger large; segment sizes (`get_allocation_size`): small -> 2 MiB,
  < 10 MiB -> 20 MiB, else rounded up to 2 MiB;
- best fit among free blocks of the pool; a request below `max_split_size` never takes a block at
  or above it, a request at or above it only a block less than 20 MiB bigger;
- split (`should_split`): small pool when >= 512 B would remain; large pool when the request is
  below `max_split_size` and more than 1 MiB would remain; an unsplit block is allocated whole;
- free blocks merge with free neighbours of the same segment and stay reserved;
- when a new segment would exceed the limit, the allocator frees every cached segment that holds no
  live block and retries (`release_cached_blocks`); still over: `OutOfMemoryError`.
- `expandable_segments`: one segment per pool that grows by pages (2 MiB small, 20 MiB large),
  so rounding to segments costs at most a page.

It is a model of the rules, not of the addresses: one stream, no events, no graph pools.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sortedcontainers import SortedList

KB = 1024
MB = 1024 * KB
MIN_BLOCK_SIZE = 512  # kMinBlockSize
SMALL_SIZE = 1 * MB  # kSmallSize: largest "small" allocation
SMALL_BUFFER = 2 * MB  # kSmallBuffer: segment size of the small pool
MIN_LARGE_ALLOC = 10 * MB  # kMinLargeAlloc: below it, large requests share a 20 MiB segment
LARGE_BUFFER = 20 * MB  # kLargeBuffer
ROUND_LARGE = 2 * MB  # kRoundLarge
MAX_NON_SPLIT_ROUNDING = 20 * MB  # max_non_split_rounding_mb default


@dataclass(frozen=True)
class AllocatorConfig:
    """The `PYTORCH_ALLOC_CONF` options that change reserved memory (defaults: PyTorch's)."""

    expandable_segments: bool = False
    max_split_size: int | None = None  # bytes; None: unlimited (the default)
    roundup_power2_divisions: int = 0  # one value for every size bucket; 0/1: off


class AllocatorOOM(RuntimeError):
    def __init__(self, requested: int, reserved: int, limit: int) -> None:
        super().__init__(
            f"tried to reserve a {requested}-byte segment with {reserved} bytes reserved; "
            f"the limit is {limit} bytes"
        )
        self.requested = requested


@dataclass(eq=False, slots=True)
class _Segment:
    size: int
    small: bool
    serial: int  # order of creation: ties in best fit go to the older segment, deterministically
    blocks: int = 1  # blocks carved from it
    live: int = 0  # of them, allocated


@dataclass(eq=False, slots=True)
class Block:
    size: int
    segment: _Segment
    offset: int
    allocated: bool = False
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment.serial, self.offset)


def round_size(size: int, divisions: int = 0) -> int:
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
        floor = 1 << (size.bit_length() - 1)
        if floor == size:
            return size
        step = floor // divisions
        return -(-size // step) * step
    return -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class CachingAllocator:
    """Replays malloc/free; tracks allocated and reserved bytes and their peaks."""

    def __init__(self, limit: int | None = None, config: AllocatorConfig | None = None) -> None:
        self.limit = limit
        self.config = config or AllocatorConfig()
        self._free: dict[bool, SortedList] = {True: SortedList(), False: SortedList()}
        self._segments: list[_Segment] = []
        self._serial = 0
        self._expandable: dict[bool, Block | None] = {True: None, False: None}  # tail blocks
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.oom: AllocatorOOM | None = None  # the first failure, if any
        self.releases = 0  # how often cached segments were given back under pressure

    # -- public ------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> Block:
        """Allocate `nbytes`. Past the limit the first failure is recorded in `oom` and the
        allocation is made anyway, so one replay also tells how far over the limit it went."""
        size = round_size(nbytes, self.config.roundup_power2_divisions)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small)
        if block is None:
            block = self._grow(size, small)
        block = self._split(block, size, small)
        block.allocated = True
        block.segment.live += 1
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        block.allocated = False
        block.segment.live -= 1
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                block = self._merge(block, neighbour)
        self._free[block.segment.small].add((*block.key(), block))

    # -- malloc path ---------------------------------------------------------------------------
    def _best_fit(self, size: int, small: bool) -> Block | None:
        pool = self._free[small]
        index = pool.bisect_left((size, 0, 0))
        if index == len(pool):
            return None
        block: Block = pool[index][3]
        max_split = self.config.max_split_size
        if max_split is not None and not small:
            if size < max_split <= block.size:
                return None
            if size >= max_split and block.size >= size + MAX_NON_SPLIT_ROUNDING:
                return None
        pool.pop(index)
        return block

    def _grow(self, size: int, small: bool) -> Block:
        if self.config.expandable_segments:
            return self._grow_expandable(size, small)
        seg = segment_size(size)
        self._reserve(seg)
        segment = self._new_segment(seg, small)
        self._segments.append(segment)
        return Block(seg, segment, 0)

    def _grow_expandable(self, size: int, small: bool) -> Block:
        page = SMALL_BUFFER if small else LARGE_BUFFER
        tail, spare, grow = self._tail_growth(size, small, page)
        self._reserve(grow)
        if self._tail_growth(size, small, page)[:2] != (tail, spare):
            # Under pressure the reservation first gave back cached pages, the free tail's
            # among them: grow from the tail as it is now.
            self.reserved -= grow
            tail, spare, grow = self._tail_growth(size, small, page)
            self._reserve(grow)
        if tail is None:
            segment = self._new_segment(grow, small)
            self._segments.append(segment)
            block = Block(grow, segment, 0)
            self._expandable[small] = block
            return block
        segment = tail.segment
        segment.size += grow
        if spare:  # the free tail block grows in place
            self._free[small].remove((*tail.key(), tail))
            tail.size += grow
            return tail
        block = Block(grow, segment, tail.offset + tail.size, prev=tail)
        segment.blocks += 1
        tail.next = block
        self._expandable[small] = block
        return block

    def _tail_growth(self, size: int, small: bool, page: int) -> tuple[Block | None, int, int]:
        """The expandable segment's tail, its free bytes, and the pages to map for `size`."""
        tail = self._expandable[small]
        spare = tail.size if tail is not None and not tail.allocated else 0
        return tail, spare, -(-(size - spare) // page) * page

    def _new_segment(self, size: int, small: bool) -> _Segment:
        self._serial += 1
        return _Segment(size, small, self._serial)

    def _reserve(self, nbytes: int) -> None:
        if self.limit is not None and self.reserved + nbytes > self.limit:
            self._release_cached()
            if self.reserved + nbytes > self.limit and self.oom is None:
                self.oom = AllocatorOOM(nbytes, self.reserved, self.limit)
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _release_cached(self) -> None:
        """cudaFree every segment with no live block (expandable ones keep their live pages)."""
        self.releases += 1
        for small, pool in self._free.items():
            for entry in list(pool):
                block: Block = entry[3]
                segment = block.segment
                if segment.live == 0 and segment.blocks == 1:
                    pool.remove(entry)
                    self.reserved -= segment.size
                    self._segments.remove(segment)
                    if self._expandable[small] is block:
                        self._expandable[small] = None
                elif self.config.expandable_segments and block.next is None and block.prev:
                    self._unmap_tail(block, small)

    def _unmap_tail(self, block: Block, small: bool) -> None:
        page = SMALL_BUFFER if small else LARGE_BUFFER
        pages = block.size // page
        if not pages:
            return
        self._free[small].remove((*block.key(), block))
        block.size -= pages * page
        block.segment.size -= pages * page
        self.reserved -= pages * page
        if block.size:
            self._free[small].add((*block.key(), block))
        else:
            assert block.prev is not None
            block.prev.next = None
            block.segment.blocks -= 1
            self._expandable[small] = block.prev

    def _split(self, block: Block, size: int, small: bool) -> Block:
        remaining = block.size - size
        max_split = self.config.max_split_size
        if small or self.config.expandable_segments:
            split = remaining >= MIN_BLOCK_SIZE
        else:
            split = (max_split is None or size < max_split) and remaining > SMALL_SIZE
        if not split:
            return block
        rest = Block(remaining, block.segment, block.offset + size, prev=block, next=block.next)
        if block.next is not None:
            block.next.prev = rest
        block.next = rest
        block.size = size
        block.segment.blocks += 1
        if self._expandable[small] is block:
            self._expandable[small] = rest
        self._free[small].add((*rest.key(), rest))
        return block

    # -- free path -----------------------------------------------------------------------------
    def _merge(self, block: Block, other: Block) -> Block:
        """Merge two adjacent free blocks; the one at the lower offset survives."""
        pool = self._free[block.segment.small]
        pool.discard((*other.key(), other))
        first, second = (block, other) if block.offset < other.offset else (other, block)
        first.size += second.size
        first.next = second.next
        if second.next is not None:
            second.next.prev = first
        first.segment.blocks -= 1
        if self._expandable[first.segment.small] is second:
            self._expandable[first.segment.small] = first
        return first


def replay(
    persistent: list[int],
    events: list[tuple[int, int]],
    limit: int | None,
    config: AllocatorConfig | None = None,
    passes: int = 2,
    lazy: dict[int, list[int]] | None = None,
    stop_at_oom: bool = False,
) -> CachingAllocator:
    """Allocate the `persistent` sizes, then run the iteration's `events` `passes` times.

    `lazy` maps an event index to sizes that the first iteration creates for good just before
    that event: optimizer state made by the first `step()`, gradients kept by `zero_grad()`
    before torch 2.0. They land in blocks the first iteration's activations freed, which is where
    a real run's fragmentation comes from.

    `events` is the iteration in order: `(key, nbytes)` allocates, `(key, -1)` frees the block
    allocated under `key`. Blocks still live at the end of a pass are freed before the next
    (the next iteration replaces them). From the second pass on, the blocks the previous
    iteration cached are reused as on a real GPU; peaks and `oom` cover every pass.
    `stop_at_oom`: return at the first failure (for a caller that only asks whether it fits).
    """
    allocator = CachingAllocator(limit, config)
    for nbytes in persistent:
        allocator.malloc(nbytes)
    for index in range(passes):
        inserts = lazy if index == 0 and lazy else {}
        live: dict[int, Block] = {}
        for position, (key, nbytes) in enumerate(events):
            for size in inserts.get(position, ()):
                allocator.malloc(size)
            if nbytes >= 0:
                live[key] = allocator.malloc(nbytes)
                if stop_at_oom and allocator.oom is not None:
                    return allocator
            else:
                block = live.pop(key, None)
                if block is not None:
                    allocator.free(block)
        for size in inserts.get(len(events), ()):
            allocator.malloc(size)
        for block in live.values():
            allocator.free(block)
    return allocator


def reserve_needed(
    persistent: list[int],
    events: list[tuple[int, int]],
    config: AllocatorConfig | None = None,
    lazy: dict[int, list[int]] | None = None,
    resolution: int | None = None,
    fitted: CachingAllocator | None = None,
) -> tuple[int, CachingAllocator]:
    """The smallest reserve limit under which the replay runs without OOM (to `resolution`),
    and the replay at that limit.

    With no pressure the allocator keeps every freed block cached, so its reserved peak says
    little about what the job needs; under pressure it gives cached segments back. This finds the
    limit that pressure can go down to: allocated <= need <= unconstrained reserved. It is
    smooth in the batch where the reserved peak is not, which is what a search extrapolates on.

    A replay that fits under a limit runs identically under its own reserved peak (no request
    came near the limit), so every replay that fits, `fitted` (one the caller already ran, under
    the card's limit, say) and the bisection's own, lowers the upper bound to its peak; with
    `fitted` no unconstrained replay is needed. `resolution` defaults to 1/1024 of the upper
    bound (at least 2 MiB): the figure is reported to about 0.1% at any size, in about 8
    replays, where a fixed 2 MiB took 12-14 for a large model.
    """
    if fitted is not None and fitted.oom is None:
        best = fitted
    else:
        best = replay(persistent, events, None, config, lazy=lazy)
    lo, hi = best.peak_allocated, best.peak_reserved  # fits at hi; may or may not at lo
    step = resolution if resolution is not None else max(ROUND_LARGE, hi >> 10)
    while hi - lo > step:
        mid = (lo + hi) // 2
        attempt = replay(persistent, events, mid, config, lazy=lazy, stop_at_oom=True)
        if attempt.oom is None:
            hi, best = attempt.peak_reserved, attempt
        else:
            lo = mid
    return hi, best


def live_peak(
    persistent: list[int], events: list[tuple[int, int]], lazy: dict[int, list[int]]
) -> int:
    """The peak of live bytes (512-byte blocks) over one iteration, lazy state included: what a
    budget on live tensors (the `cpu` device) is checked against."""
    block = lambda n: -(-n // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE  # noqa: E731
    live = sum(block(n) for n in persistent) + sum(block(n) for v in lazy.values() for n in v)
    peak = live
    sizes: dict[int, int] = {}
    for key, nbytes in events:
        if nbytes >= 0:
            sizes[key] = block(nbytes)
            live += sizes[key]
            peak = max(peak, live)
        else:
            live -= sizes.pop(key, 0)
    return peak


# What `replay` takes: persistent sizes, the iteration's events, the first iteration's lazy sizes.
Sequence = tuple[list[int], list[tuple[int, int]], dict[int, list[int]]]


def _shape(sequence: Sequence) -> tuple[object, ...]:
    """The pattern of a sequence without its sizes: which key allocates or frees when."""
    persistent, events, lazy = sequence
    order: dict[int, int] = {}
    pattern = tuple((order.setdefault(key, len(order)), nbytes < 0) for key, nbytes in events)
    return len(persistent), pattern, tuple((i, len(v)) for i, v in sorted(lazy.items()))


@dataclass(frozen=True)
class AffineSequence:
    """Allocation sizes as `base + per_sample * batch`, fitted on two traced batches whose
    sequences have the same shape (the same ops in the same order at any batch)."""

    persistent: list[int]
    events: list[tuple[int, int, int]]  # key, base, per-sample (freeing events: base -1)
    lazy: dict[int, list[int]]

    @classmethod
    def fit(cls, b1: int, s1: Sequence, b2: int, s2: Sequence) -> AffineSequence | None:
        if b1 == b2 or _shape(s1) != _shape(s2) or s1[0] != s2[0] or s1[2] != s2[2]:
            return None
        events = []
        for (key, n1), (_, n2) in zip(s1[1], s2[1], strict=True):
            if n1 < 0:
                events.append((key, -1, 0))
                continue
            per_sample, rest = divmod(n2 - n1, b2 - b1)
            if rest:  # not affine in the batch: no prediction
                return None
            events.append((key, n1 - per_sample * b1, per_sample))
        return cls(list(s1[0]), events, dict(s1[2]))

    def at(self, batch: int) -> Sequence:
        events = [
            (key, base if base < 0 else max(0, base + per * batch))
            for key, base, per in self.events
        ]
        return self.persistent, events, self.lazy
