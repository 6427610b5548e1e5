"""What a device needs to trace one training step: the training settings and the data shape
(the contract's own slices), never the whole spec. The compile step (`compiled.py`) makes it once;
a device's session takes it, the built model and a byte limit."""

from __future__ import annotations

from dataclasses import dataclass

from service.schemas.spec import ImageData, TensorData, TokensData, TrainingSpec


@dataclass(frozen=True)
class TraceJob:
    training: TrainingSpec
    data: ImageData | TokensData | TensorData
    headroom: float  # the fraction of the device the search keeps free
    evaluating: bool = False  # a forward-only evaluation step instead of a training step
    # what the collator's rows tell a transformers model beside the tokens (models.hf.row_layout)
    rows: str = "whole"
