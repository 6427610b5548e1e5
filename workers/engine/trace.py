"""What a device needs to trace one training step, compiled from the spec once: the training
settings and the data shape (the contract's own slices), never the whole spec. A device's
session takes this, the built model and a byte limit."""

from __future__ import annotations

from dataclasses import dataclass

from service.schemas.spec import ImageData, PlanSpec, TensorData, TokensData, TrainingSpec


@dataclass(frozen=True)
class TraceJob:
    training: TrainingSpec
    data: ImageData | TokensData | TensorData
    headroom: float  # the fraction of the device the search keeps free


def trace_job(spec: PlanSpec) -> TraceJob:
    return TraceJob(training=spec.training, data=spec.data, headroom=spec.search.headroom)
