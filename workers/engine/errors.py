"""Errors the engine raises for a spec it cannot plan; each names the field at fault."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec that validates field by field but cannot be built (a shape that does not chain,
    an unknown model name, kwargs a factory rejects). Maps to a 422 naming `loc`."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message

    def as_problem_errors(self) -> list[dict[str, object]]:
        return [{"loc": list(self.loc), "msg": self.message, "type": "spec_error"}]


class Unsupported(SpecError):
    """The spec validates and builds, but tracing its training step fails inside a library
    (an op the simulated device cannot run under the precision's autocast policy, a layer
    trainplan does not model yet). Names the layer and the op where it stopped, never passes
    the raw library error on alone. Maps to a 422 'unsupported'."""

    def __init__(self, loc: tuple[str | int, ...], message: str, what: str) -> None:
        super().__init__(loc, message)
        self.what = what

    def as_problem_errors(self) -> list[dict[str, object]]:
        return [{"loc": list(self.loc), "msg": self.message, "type": "unsupported"}]


class BatchUndefined(Exception):
    """Training is undefined at this micro-batch, not out of memory: BatchNorm in training
    mode needs more than one value per channel, so a batch of 1 fails where the last feature
    map is 1x1 (resnet18 at 32 px) although 2 and more train. The search starts above it."""

    def __init__(self, batch: int, reason: str) -> None:
        super().__init__(reason)
        self.batch = batch
        self.reason = reason
