"""Server-sent events of one plan, from its followed state and where the client is.

Event ids name a position, so a client that reconnects with `Last-Event-ID` resumes there:
`A.I` after trial I of attempt A, `A.-1` at the start of attempt A (a `retry` event: an earlier
attempt's worker was lost and its trials are void), `A.end` after the end."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from service.feed.hub import PlanState

EVENT_ID = re.compile(r"^(\d{1,9})\.(-1|\d{1,9}|end)$")


@dataclass
class Cursor:
    """The last event a client has: None for a new stream."""

    attempt: int | None = None
    index: int = -1
    ended: bool = False

    @classmethod
    def parse(cls, last_event_id: str | None) -> Cursor:
        """From `Last-Event-ID`; an id this server did not issue starts from the beginning."""
        match = EVENT_ID.match((last_event_id or "").strip())
        if match is None:
            return cls()
        attempt, position = int(match[1]), match[2]
        if position == "end":
            return cls(attempt, -1, True)
        return cls(attempt, int(position))


def events(state: PlanState, cursor: Cursor) -> Iterator[bytes]:
    """What the client lacks of `state`, advancing `cursor` past it."""
    if cursor.attempt != state.attempts:
        if cursor.attempt:  # it saw trials of an attempt that is now void
            yield sse("retry", {"attempt": state.attempts}, f"{state.attempts}.-1")
        cursor.attempt, cursor.index, cursor.ended = state.attempts, -1, False
    for trial in state.trials:
        if trial["index"] > cursor.index:
            cursor.index = trial["index"]
            yield sse("trial", trial, f"{state.attempts}.{trial['index']}")
    if state.final and not cursor.ended:
        cursor.ended = True
        end = {
            "status": state.status,
            "error": state.error,
            "max_micro_batch_size": state.max_micro_batch_size,
        }
        yield sse("end", end, f"{state.attempts}.end")


def sse(event: str, data: dict[str, Any], event_id: str) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"
