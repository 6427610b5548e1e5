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
