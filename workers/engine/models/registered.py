"""The `registered` source: a factory the operator installed as a `trainplan.models` entry point.

The request only names the entry point; the code is the operator's, installed with the worker.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from torch import nn

from service.schemas.spec import DataSpec, RegisteredModel
from workers.engine.errors import SpecError
from workers.engine.models.built import BuiltModel

GROUP = "trainplan.models"


def registered_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def build_registered(model: RegisteredModel, data: DataSpec) -> BuiltModel:
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == model.name]
    if not matches:
        raise SpecError(
            ("model", "name"),
            f"no registered model {model.name!r}; registered: {registered_names() or 'none'}",
        )
    factory = matches[0].load()
    try:
        module = factory(**model.kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(("model", "kwargs"), f"{model.name}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise SpecError(("model", "name"), f"{model.name} did not return an nn.Module")
    family = "regression" if data.target == "regression" else "classification"
    return BuiltModel(module, family)
