"""The caching-allocator model against the rules of c10/cuda/CUDACachingAllocator.cpp."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.allocator import (
    MB,
    AllocatorConfig,
    CachingAllocator,
    replay,
    reserve_needed,
    round_size,
    segment_size,
)


@pytest.mark.parametrize(
    ("size", "divisions", "rounded"),
    [
        (1, 0, 512),
        (512, 0, 512),
        (513, 0, 1024),
        (1200, 4, 1536),  # at or below 512 x divisions the 512-byte rule applies
        (5 * MB + 1, 4, 6 * MB),  # 4 steps between 4 MiB and 8 MiB
        (8 * MB, 4, 8 * MB),  # a power of two stays
        (5 * MB + 1, 0, 5 * MB + 512),
    ],
)
def test_round_size(size: int, divisions: int, rounded: int) -> None:
    assert round_size(size, divisions) == rounded


@pytest.mark.parametrize(
    ("size", "segment"),
    [
        (512, 2 * MB),
        (1 * MB, 2 * MB),
        (1 * MB + 512, 20 * MB),
        (10 * MB, 10 * MB),
        (11 * MB, 12 * MB),
    ],
)
def test_segment_sizes(size: int, segment: int) -> None:
    assert segment_size(size) == segment


def test_small_requests_share_a_2_mib_segment() -> None:
    alloc = CachingAllocator()
    for _ in range(3):
        alloc.malloc(100_000)
    assert alloc.reserved == 2 * MB
    assert alloc.allocated == 3 * round_size(100_000)


def test_large_requests_split_a_20_mib_segment_and_reuse_the_rest() -> None:
    alloc = CachingAllocator()
    alloc.malloc(5 * MB)
    alloc.malloc(5 * MB)
    assert alloc.reserved == 20 * MB
    assert alloc.allocated == 10 * MB


def test_a_remainder_of_1_mib_or_less_is_not_split_off() -> None:
    alloc = CachingAllocator()
    block = alloc.malloc(19 * MB + 512 * 1024)  # 0.5 MiB would remain: kept in the block
    assert block.size == 20 * MB and alloc.allocated == 20 * MB


def test_freed_neighbours_merge_and_stay_reserved() -> None:
    alloc = CachingAllocator()
    a, b = alloc.malloc(5 * MB), alloc.malloc(5 * MB)
    alloc.free(a)
    alloc.free(b)
    assert alloc.allocated == 0 and alloc.reserved == 20 * MB
    alloc.malloc(20 * MB - 512)  # the merged 20 MiB block serves it: no new segment
    assert alloc.reserved == 20 * MB


def test_pressure_releases_cached_segments_before_failing() -> None:
    alloc = CachingAllocator(limit=40 * MB)
    alloc.free(alloc.malloc(30 * MB))  # cached, too small for the next request
    alloc.malloc(32 * MB)
    assert alloc.oom is None and alloc.releases == 1 and alloc.reserved == 32 * MB


def test_out_of_memory_is_decided_on_reserved_not_allocated() -> None:
    alloc = CachingAllocator(limit=40 * MB)
    alloc.malloc(30 * MB)
    small = alloc.malloc(5 * MB)  # a 20 MiB segment for 5 MiB: 50 MiB reserved > 40
    assert alloc.oom is not None
    assert alloc.allocated == 35 * MB < 40 * MB < alloc.reserved
    assert small.size == 5 * MB


def test_expandable_segments_grow_by_pages_instead_of_new_segments() -> None:
    plain, expandable = (
        CachingAllocator(),
        CachingAllocator(config=AllocatorConfig(expandable_segments=True)),
    )
    for alloc in (plain, expandable):
        alloc.malloc(5 * MB)
        alloc.malloc(30 * MB)
    assert plain.reserved == 50 * MB  # 20 MiB segment + its own 30 MiB segment
    assert expandable.reserved == 40 * MB  # 20 MiB page, then 15 MiB more rounded to a page


def test_max_split_size_keeps_small_requests_out_of_big_blocks() -> None:
    config = AllocatorConfig(max_split_size=20 * MB)
    alloc = CachingAllocator(config=config)
    alloc.free(alloc.malloc(40 * MB))
    alloc.malloc(5 * MB)  # may not carve the cached 40 MiB block: a new 20 MiB segment
    assert alloc.reserved == 60 * MB
    unlimited = CachingAllocator()
    unlimited.free(unlimited.malloc(40 * MB))
    unlimited.malloc(5 * MB)
    assert unlimited.reserved == 40 * MB


def test_replay_reaches_a_steady_state() -> None:
    events = [(0, 8 * MB), (1, 30 * MB), (0, -1), (2, 12 * MB), (2, -1), (1, -1)]
    one = replay([50 * MB], events, None, passes=1)
    two = replay([50 * MB], events, None, passes=2)
    assert two.peak_reserved == one.peak_reserved  # the second iteration reuses the cache
    assert two.allocated == 50 * MB


def test_lazy_state_lands_where_the_first_step_creates_it() -> None:
    # activations freed, then the optimizer state made in their block: the next forward's
    # activations no longer find one free run of 40 MiB and need a new segment
    events = [(0, 40 * MB), (0, -1)]
    up_front = replay([20 * MB], events, None)
    lazily = replay([], events, None, lazy={2: [20 * MB]})
    assert up_front.peak_reserved == 60 * MB
    assert lazily.peak_reserved == 80 * MB and lazily.allocated == 20 * MB


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=64 * MB), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
)
def test_reserve_needed_is_tight(sizes: list[int], rnd: object) -> None:
    events: list[tuple[int, int]] = []
    live: list[int] = []
    for key, size in enumerate(sizes):
        events.append((key, size))
        live.append(key)
        if len(live) > 2 and rnd.random() < 0.5:  # type: ignore[attr-defined]
            events.append((live.pop(rnd.randrange(len(live))), -1))  # type: ignore[attr-defined]
    need, at_need = reserve_needed([], events)
    free = replay([], events, None)
    assert free.peak_allocated <= need <= free.peak_reserved
    assert at_need.oom is None and at_need.peak_reserved <= need
    assert replay([], events, free.peak_allocated - 512).oom is not None
    # a replay that fitted under some limit bounds the search from above, to the same width
    fitted = replay([], events, free.peak_reserved)
    bounded, at_bounded = reserve_needed([], events, fitted=fitted)
    assert free.peak_allocated <= bounded <= fitted.peak_reserved
    assert at_bounded.oom is None and replay([], events, bounded).oom is None


def test_a_replay_fits_the_same_under_its_own_reserved_peak() -> None:
    """What lets a fitted replay bound the need: below its peak no request came near the
    limit, so the replay under exactly that peak makes the same choices."""
    rng = random.Random(3)
    for _ in range(40):
        events, live = [], []
        for key in range(rng.randint(20, 200)):
            if live and rng.random() < 0.4:
                events.append((live.pop(rng.randrange(len(live))), -1))
            else:
                events.append((key, rng.randint(1, 48 * MB)))
                live.append(key)
        loose = replay([], events, 1 << 40)
        tight = replay([], events, loose.peak_reserved)
        assert tight.oom is None and tight.releases == 0
        assert tight.peak_reserved == loose.peak_reserved


def test_expandable_segments_under_pressure_grow_from_the_tail_left_after_a_release() -> None:
    """Reserving pages past the limit first gives cached pages back, the free tail's among
    them; growing from the tail as it was before (stale size, gone from the free pool) failed
    with a ValueError on random sequences. Every replay now completes, and what is reserved
    always holds what is allocated."""
    rng = random.Random(7)
    config = AllocatorConfig(expandable_segments=True)
    for _ in range(150):
        events: list[tuple[int, int]] = []
        live: list[int] = []
        for key in range(rng.randint(50, 600)):
            if live and rng.random() < 0.45:
                events.append((live.pop(rng.randrange(len(live))), -1))
            else:
                ceiling = rng.choice([4096, 2 << 20, 64 << 20])
                events.append((key, rng.randint(1, ceiling)))
                live.append(key)
        persistent = [rng.randint(1, 8 << 20) for _ in range(rng.randint(0, 20))]
        limit = rng.randint(16 << 20, 512 << 20)
        allocator = replay(persistent, events, limit, config)
        assert allocator.reserved >= allocator.allocated
        assert allocator.peak_reserved >= allocator.peak_allocated
