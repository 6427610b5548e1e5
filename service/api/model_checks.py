"""Submit's costly check, cached: building the spec's model on the meta device (milliseconds for a
CNN, tens for a ResNet or an 8B LLM). Specs that share the model, data and adapters build the same
model, so a bounded LRU keyed by `engine.model_key` answers the next one (a fine-tune swept over
batch sizes, learning rates and cards) without a build. A failed build is cached as its error."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated

from cachetools import LRUCache
from fastapi import Depends, Request
from prometheus_client import Counter

from service.schemas.spec import PlanSpec
from workers import engine

LOOKUPS = Counter(
    "trainplan_model_checks", "Model builds asked for at submit, by cache outcome", ["cache"]
)


@dataclass(frozen=True)
class _Failed:
    """A build that raised: replayed as a fresh exception each time (a stored one would grow
    its traceback on every raise)."""

    loc: tuple[str | int, ...] | None
    message: str
    missing: str | None = None  # an ImportError's package

    def raise_(self) -> None:
        if self.missing is not None:
            raise ImportError(self.message, name=self.missing)
        raise engine.SpecError(self.loc or (), self.message)


class ModelChecks:
    """`facts(spec)`: the built model's facts, from the cache when the same model was built."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: LRUCache[str, engine.ModelFacts | _Failed] = LRUCache(maxsize=max(size, 1))
        self._lock = threading.Lock()

    def facts(self, spec: PlanSpec) -> engine.ModelFacts:
        if self.size == 0:
            return engine.model_facts(spec)
        key = engine.model_key(spec)
        with self._lock:
            outcome = self._cache.get(key)
        LOOKUPS.labels(cache="miss" if outcome is None else "hit").inc()
        if outcome is None:
            outcome = self._build(spec)
            with self._lock:
                self._cache[key] = outcome
        if isinstance(outcome, _Failed):
            outcome.raise_()
            raise AssertionError("unreachable")
        return outcome

    @staticmethod
    def _build(spec: PlanSpec) -> engine.ModelFacts | _Failed:
        try:
            return engine.model_facts(spec)
        except engine.SpecError as exc:
            return _Failed(exc.loc, exc.message)
        except ImportError as exc:
            return _Failed(None, str(exc), exc.name or "?")


async def get_model_checks(request: Request) -> ModelChecks:
    return request.app.state.model_checks


ModelChecksDep = Annotated[ModelChecks, Depends(get_model_checks)]
