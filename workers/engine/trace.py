"""What a device needs to trace one training step: the training settings and the data shape
(the contract's own slices), never the whole spec. The compile step (`compiled.py`) makes it once;
a device's session takes it, the built model and a byte limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.schemas.spec import ImageData, TensorData, TokensData, TrainingSpec

# What a real run's batches tell a transformers model about their rows, beyond the tokens:
# nothing (whole sequences), a padding mask (`attention_mask`), or where each packed document
# starts (`position_ids` that restart). See `models.hf.row_layout`.
RowLayout = Literal["whole", "padded", "packed"]


@dataclass(frozen=True)
class TraceJob:
    training: TrainingSpec
    data: ImageData | TokensData | TensorData
    headroom: float  # the fraction of the device the search keeps free
    evaluating: bool = False  # a forward-only evaluation step instead of a training step
    rows: RowLayout = "whole"  # the collator's rows, as a transformers model sees them
