"""Depth folding: the allocation sequence of a step through N identical blocks, from traces of
models with a few of those blocks.

A transformer is the same block repeated. Traced with k blocks, its step's allocations are the
embedding's, k copies of the block's forward, the head's and the loss's, k copies of the block's
backward, the optimizer's (a few foreach chunks, each with a per-block part): a fixed sequence
with *units* inserted at fixed places, k copies each. The blocks beside the ends may differ from
the middle ones, so the fold starts from a *base* trace of `BASE` blocks (`SHARDED_BASE` under
FSDP-style sharding). `learn`:

1. compares the traces with base and base + 1 blocks: every difference must be an insertion
   whose content equals a copy beside it in the base trace (a unit, and its base copy);
2. labels every event of the traces with base, +1 and +2 blocks by its origin (the fixed
   part's position, or a unit's copy and offset), checks each event's signature (bytes,
   category, phase; a free's: what it frees) against its origin, and learns for each free which
   allocation it frees, as a rule over copies: the same copy, a fixed copy from either end, the
   mirror copy (backward frees what the same block's forward saved), or a neighbour; where the
   rule leaves the range of copies (the first block's input is the embedding's output) a fixed
   allocation;
3. must then rebuild the traces with base + 1 to base + 3 blocks exactly (every allocation's
   bytes, category and phase, every free's target): otherwise the model does not fold
   (heterogeneous layers, ...) and the plan traces the whole model.

`synthesize(N)` writes the sequence for N blocks; the allocator replays it as it would a traced
one, so peaks, breakdowns and OOMs come out byte for byte as from a full trace. At another
micro-batch the rules still hold (the ops do not change with the batch, only their sizes): the
base trace gives the sizes and the one with base + 1 blocks is checked against the rules
(`resized`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from difflib import SequenceMatcher
from typing import Any

from workers.engine.models.built import BuiltModel
from workers.engine.roofline import OpCost, StepCost
from workers.engine.tracker import MemoryTracker, round_block

# ("a", requested bytes, category, phase) allocates; ("f", index of the allocating event) frees.
Event = tuple[Any, ...]
Origin = tuple[int, int, int]  # (unit, copy, offset); unit -1: the fixed part (copy 0)
Target = tuple[int, int, int, int]  # (space, unit, copy, offset): space 0 events, 1 persistent
# The first and the last block of a stack border the embedding and the head (the first block's
# backward meets the embedding's gradient): the repeated copies are the middle ones, so the
# base trace has 2 blocks, the fold learns from 2, 3 and 4 and must rebuild 5. Under FSDP a
# block also prefetches its neighbour's parameters and reduce-scatters after it, so the blocks
# next to the first and the last differ too: the base trace has 3 blocks.
BASE = 2
SHARDED_BASE = 3
LEARN = 3


@dataclass(frozen=True)
class DepthPlan:
    """A model to fold: its stack's depth, the model itself, and the same model with k
    blocks."""

    depth: int
    full: BuiltModel
    shallow: Callable[[int], BuiltModel]
    base: int = BASE  # the fold's base trace (SHARDED_BASE for FSDP-style strategies)
    key: str = ""  # the model as specified: sessions of the same model share folds


@dataclass(frozen=True)
class Folding:
    """What a session did: folded the stack of `depth` blocks from traces with
    `traced_depths` blocks, or traced the whole model because of `reason`."""

    depth: int
    folded: bool
    traced_depths: tuple[int, ...] = ()
    reason: str | None = None


def fold_cost(costs: dict[int, StepCost], base: int, depth: int) -> StepCost:
    """The roofline of the stack from the rooflines of `base`, +1 and +2 blocks.

    An op with FLOPs costs max(compute, memory): a block must add the same such ops each time
    (as a multiset). An op without FLOPs costs its bytes over the bandwidth, linear in its
    bytes, so only each bucket's total bytes of them matter: a block must add the same total
    each time (the optimizer's foreach ops grow with every block's parameters rather than
    adding ops). The stack's ops are the base's, depth - base copies of a block's ops with
    FLOPs, and per bucket one op of the bytes the blocks add (sums in another order: equal to
    a full trace's up to float rounding)."""
    step = _block_delta(costs[base], costs[base + 1])
    if step != _block_delta(costs[base + 1], costs[base + 2]):
        raise NotFoldable("each added block does not add the same ops to the step's cost")
    ops, nbytes = step
    extra = depth - base
    first = costs[base]
    grown = [OpCost(bucket, "memory", 0, n * extra, 0.0, "folded") for bucket, n in nbytes if n]
    return replace(
        first,
        ops=list(first.ops) + list(ops.elements()) * extra + grown,
        offloaded=_linear([costs[base + i].offloaded for i in range(3)], extra, "offload"),
        link_bytes={
            bucket: _linear(
                [costs[base + i].link_bytes.get(bucket, 0) for i in range(3)], extra, bucket
            )
            for bucket in first.link_bytes
        },
        recomputed=_linear([costs[base + i].recomputed for i in range(3)], extra, "recomputed"),
    )


def _linear(counts: list[int], extra: int, what: str) -> int:
    """A count each block adds to equally (bytes offloaded, bytes through the ring), at the
    stack's depth."""
    if counts[1] - counts[0] != counts[2] - counts[1]:
        raise NotFoldable(f"each added block does not add the same {what} bytes")
    return counts[0] + (counts[1] - counts[0]) * extra


def _block_delta(
    low: StepCost, high: StepCost
) -> tuple[Counter[OpCost], tuple[tuple[str, int], ...]]:
    """What one more block adds: its ops with FLOPs, and the bytes of the others by bucket."""
    compute = [Counter(op for op in cost.ops if op.flops) for cost in (low, high)]
    if compute[0] - compute[1]:
        raise NotFoldable("a block removes an op with FLOPs from the step")
    memory: Counter[str] = Counter()
    for sign, cost in ((-1, low), (1, high)):
        for op in cost.ops:
            if not op.flops:
                memory[op.bucket] += sign * op.nbytes
    return compute[1] - compute[0], tuple(sorted(memory.items()))


@dataclass(frozen=True)
class StepTrace:
    """One traced step as the allocator and the breakdown need it. A free names what it
    frees: an event of the step (its index), or with a negative index `-1 - i` the i-th
    persistent entry (what the previous step left, such as weight casts made in a
    checkpointed backward, freed during this one)."""

    persistent: tuple[tuple[str, int], ...]  # (category, requested) live when the step began
    events: tuple[Event, ...]

    @classmethod
    def of(cls, tracker: MemoryTracker) -> StepTrace:
        """The tracker's window (the last step), with each allocation's category as it is
        now."""
        kept, timeline = tracker.window()
        where = {id(alloc): -1 - index for index, alloc in enumerate(kept)}
        events: list[Event] = []
        for alloc, made in timeline:
            if made:
                where[id(alloc)] = len(events)
                events.append(("a", alloc.requested, alloc.resolved_category, alloc.phase))
            else:
                events.append(("f", where[id(alloc)]))
        persistent = tuple((alloc.resolved_category, alloc.requested) for alloc in kept)
        return cls(persistent, tuple(events))

    def freed(self, target: int) -> tuple[int, str]:
        """(requested, category) of what a free at `target` frees."""
        if target >= 0:
            return self.events[target][1], self.events[target][2]
        category, nbytes = self.persistent[-1 - target]
        return nbytes, category

    def signatures(self) -> list[tuple[Any, ...]]:
        """What an event is, wherever it sits: a free is known by what it frees."""
        return [e if e[0] == "a" else ("f", e[1] < 0, *self.freed(e[1])) for e in self.events]

    def peak(self) -> tuple[int, dict[str, int]]:
        """The live peak (the tracker's: 512-byte blocks, the first time it is reached) and
        the bytes of each category live then."""
        live = sum(round_block(n) for _, n in self.persistent)
        peak, at = live, -1
        for index, event in enumerate(self.events):
            if event[0] == "a":
                live += round_block(event[1])
                if live > peak:
                    peak, at = live, index
            else:
                live -= round_block(self.freed(event[1])[0])
        freed = {e[1] for e in self.events[: at + 1] if e[0] == "f"}
        parts: Counter[str] = Counter()
        for index, (category, n) in enumerate(self.persistent):
            if -1 - index not in freed:
                parts[category] += round_block(n)
        for index, event in enumerate(self.events[: at + 1]):
            if event[0] == "a" and index not in freed:
                parts[event[2]] += round_block(event[1])
        return peak, dict(parts)


@dataclass(frozen=True)
class Unit:
    at: int  # where the base trace gets the inserted copies
    length: int
    base: int  # where its own copy sits in the base trace
    base_first: bool  # its copy comes before the inserted ones (copy 0) or after (copy k-1)

    def base_copy(self, copies: int) -> int:
        return 0 if self.base_first else copies - 1


@dataclass(frozen=True)
class Rule:
    """Which allocation a free frees, for a free of a given origin: in `space` (the step's
    events or the persistent entries), unit `unit`, copy
    `offset + step * copy + from_end * (copies - 1)`, at `position`. Where that copy does not
    exist (the block before the first is the embedding, or the first block, which borders it)
    the fixed part's allocation `beyond[overshoot]`, by how far it falls outside: -1 just
    before the first copy, +1 just after the last (unit -1: always the fixed `position`)."""

    space: int
    unit: int
    position: int
    offset: int = 0
    step: int = 0
    from_end: int = 0
    beyond: tuple[tuple[int, int], ...] = ()

    def target(self, copy: int, copies: int) -> Target | None:
        if self.unit < 0:
            return (self.space, -1, 0, self.position)
        target = self.offset + self.step * copy + self.from_end * (copies - 1)
        if 0 <= target < copies:
            return (self.space, self.unit, target, self.position)
        position = dict(self.beyond).get(_overshoot(target, copies))
        return None if position is None else (self.space, -1, 0, position)


def _overshoot(target: int, copies: int) -> int:
    return target if target < 0 else target - copies + 1


class NotFoldable(Exception):
    """The traces do not repeat as N copies of a block would: trace the whole model."""


def _units(first: list[Any], second: list[Any]) -> list[Unit]:
    units = []
    floor = 0  # an insertion slides left no further than the previous difference
    for i1, i2, chunk in _insertions(first, second):
        placed = _placed(first, chunk, i1, floor)
        if placed is None:
            raise NotFoldable(f"an added block's events at {i1} match no block beside them")
        units.extend(placed)
        floor = max(i2, i1)
    owned = [p for u in units for p in range(u.base, u.base + u.length)]
    if len(owned) != len(set(owned)):
        raise NotFoldable("two repeated parts overlap")
    return units


def _insertions(first: list[Any], second: list[Any]) -> list[tuple[int, int, list[Any]]]:
    """Where `second` adds events to `first`: (position, end of the matched run, events). The
    matcher may cut one added block in two around a short run it matched inside it (small
    repeated sizes); two insertions are one when the second's end follows from the first."""
    found: list[tuple[int, int, list[Any]]] = []
    opcodes = SequenceMatcher(None, first, second, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            continue
        if tag != "insert":
            raise NotFoldable(f"a block changes the sequence around it ({tag} at {i1})")
        if found:
            p1, _, chunk = found[-1]
            start = j1 - (i1 - p1) - len(chunk)  # where the previous insertion began in second
            merged = second[start : start + len(chunk) + j2 - j1]
            if second[start + len(merged) : j2] == first[p1:i1]:
                found[-1] = (p1, i2, merged)
                continue
        found.append((i1, i2, second[j1:j2]))
    return found


def _placed(first: list[Any], chunk: list[Any], at: int, floor: int) -> list[Unit] | None:
    """Where an added copy repeats the base trace. The matcher may place it anywhere along
    the copy it repeats (as a rotation of it): slide it left until it sits beside an equal
    copy. An insertion may also join two units that meet there (a foreach op allocates every
    block's outputs, then frees them all: "A A | F F" gains "A F"): split it where its head
    repeats what precedes it and its tail what follows."""
    length = len(chunk)
    while True:
        if first[at : at + length] == chunk:
            return [Unit(at, length, at, False)]
        if at >= length and first[at - length : at] == chunk:
            return [Unit(at, length, at - length, True)]
        for split in range(1, length):
            head, tail = chunk[:split], chunk[split:]
            if first[at - split : at] == head and first[at : at + length - split] == tail:
                return [Unit(at, split, at - split, True), Unit(at, length - split, at, False)]
        if at <= floor or first[at - 1] != chunk[-1]:
            return None
        chunk = chunk[-1:] + chunk[:-1]
        at -= 1


def _origins(size: int, units: list[Unit], copies: int) -> list[Origin]:
    """The origin of every event of a trace whose units have `copies` copies, in order."""
    owner = {u.base + o: (i, o) for i, u in enumerate(units) for o in range(u.length)}
    inserted: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        inserted.setdefault(u.at, []).append(i)
    out: list[Origin] = []
    for j in range(size + 1):
        for i in inserted.get(j, ()):
            unit = units[i]
            first = 1 if unit.base_first else 0
            for copy in range(first, first + copies - 1):
                out.extend((i, copy, o) for o in range(unit.length))
        if j == size:
            break
        if j in owner:
            i, o = owner[j]
            out.append((i, units[i].base_copy(copies), o))
        else:
            out.append((-1, 0, j))
    return out


def _source(origin: Origin, units: list[Unit]) -> int:
    """The event of the base trace an origin copies."""
    unit, _, offset = origin
    return offset if unit < 0 else units[unit].base + offset


def _fit(observations: list[tuple[int, int, Target]]) -> Rule:
    """The rule a free follows, from (copies, its copy, what it frees) seen in traces."""
    if len({t[0] for _, _, t in observations}) != 1:
        raise NotFoldable("a free frees a step's allocation at one depth, a kept one at another")
    space = observations[0][2][0]
    moving = [(n, c, t) for n, c, t in observations if t[1] >= 0]
    if not moving:
        if len({t for _, _, t in observations}) != 1:
            raise NotFoldable("a free of the fixed part frees different allocations")
        return Rule(space, -1, observations[0][2][3])
    if len({(t[1], t[3]) for _, _, t in moving}) != 1:
        raise NotFoldable("a free's target moves between parts")
    unit, position = moving[0][2][1], moving[0][2][3]
    n, c, t = moving[0]
    for step in (1, -1, 0):
        for from_end in (0, 1):
            offset = t[2] - step * c - from_end * (n - 1)
            beyond: dict[int, int] = {}
            for n2, c2, t2 in observations:
                at = offset + step * c2 + from_end * (n2 - 1)
                if t2[1] < 0 and not 0 <= at < n2:
                    beyond.setdefault(_overshoot(at, n2), t2[3])
            rule = Rule(
                space, unit, position, offset, step, from_end, tuple(sorted(beyond.items()))
            )
            if all(rule.target(c2, n2) == t2 for n2, c2, t2 in observations):
                return rule
    raise NotFoldable("a free follows no rule over the blocks")


@dataclass(frozen=True)
class Fold:
    """How a step's events repeat with the blocks; `synthesize` writes any depth from the
    trace with `base` blocks (the first and the last block may differ from the others: the
    repeated copies are the ones a trace with `base + 1` blocks adds)."""

    base: int
    units: tuple[Unit, ...]
    persistent_units: tuple[Unit, ...]
    rules: dict[int, Rule]  # by the free's position in the base trace (its source)
    kinds: tuple[tuple[Any, ...], ...]  # the base trace's events without their sizes

    @classmethod
    def learn(cls, traces: dict[int, StepTrace], base: int = BASE) -> Fold:
        """From traces with base .. base + 3 blocks; raises NotFoldable."""
        one = traces[base]
        units = _units(one.signatures(), traces[base + 1].signatures())
        persistent = _units(list(one.persistent), list(traces[base + 1].persistent))
        observed: dict[int, list[tuple[int, int, Target]]] = {}
        for blocks in range(base, base + LEARN):
            copies = blocks - base + 1
            origins = _check(traces[blocks], one, units, copies)
            kept = _origins(len(one.persistent), persistent, copies)
            if len(kept) != len(traces[blocks].persistent):
                raise NotFoldable(f"{blocks} blocks keep a different number of tensors")
            for index, event in enumerate(traces[blocks].events):
                if event[0] == "f":
                    t = event[1]
                    target = (0, *origins[t]) if t >= 0 else (1, *kept[-1 - t])
                    seen = (copies, origins[index][1], target)
                    observed.setdefault(_source(origins[index], units), []).append(seen)
        rules = {source: _fit(seen) for source, seen in observed.items()}
        fold = cls(base, tuple(units), tuple(persistent), rules, kinds_of(one))
        for blocks in range(base + 1, base + LEARN + 1):
            if fold.synthesize(one, blocks) != traces[blocks]:
                raise NotFoldable(f"the fold does not rebuild the trace with {blocks} blocks")
        return fold

    def resized(self, one: StepTrace, two: StepTrace) -> None:
        """Check traces with `base` and `base + 1` blocks at another micro-batch against the
        fold; raises NotFoldable where they do not follow it."""
        if kinds_of(one) != self.kinds:
            raise NotFoldable("the step's ops differ at this micro-batch")
        if self.synthesize(one, self.base + 1) != two:
            raise NotFoldable("the fold does not rebuild the next depth at this micro-batch")

    def synthesize(self, one: StepTrace, blocks: int) -> StepTrace:
        """The trace with `blocks` blocks (at least `base`), from the trace with `base`."""
        copies = blocks - self.base + 1
        units, kept_units = list(self.units), list(self.persistent_units)
        origins = _origins(len(one.events), units, copies)
        kept = _origins(len(one.persistent), kept_units, copies)
        where = {(0, *origin): index for index, origin in enumerate(origins)}
        where |= {(1, *origin): -1 - index for index, origin in enumerate(kept)}
        events: list[Event] = []
        for origin in origins:
            source = _source(origin, units)
            event = one.events[source]
            if event[0] == "a":
                events.append(event)
                continue
            target = self.rules[source].target(origin[1], copies)
            if target is None or target not in where:
                raise NotFoldable(f"a free has no target at {blocks} blocks")
            events.append(("f", where[target]))
        persistent = [one.persistent[_source(origin, kept_units)] for origin in kept]
        return StepTrace(tuple(persistent), tuple(events))


def kinds_of(trace: StepTrace) -> tuple[tuple[Any, ...], ...]:
    """The step's events without their sizes: what stays the same at every micro-batch."""
    return tuple(e[:1] + e[2:] if e[0] == "a" else e for e in trace.events)


def _check(trace: StepTrace, one: StepTrace, units: list[Unit], copies: int) -> list[Origin]:
    """Label the trace's events by origin; each must be what its origin is in the base trace
    (bytes, category, phase; a free: what it frees)."""
    origins = _origins(len(one.events), units, copies)
    if len(origins) != len(trace.events):
        raise NotFoldable(f"{len(trace.events)} events where the fold expects {len(origins)}")
    mine, base = trace.signatures(), one.signatures()
    for index, origin in enumerate(origins):
        if mine[index] != base[_source(origin, units)]:
            raise NotFoldable(f"event {index} differs from its block's")
    return origins
