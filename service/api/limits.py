"""What one spec may cost this server, priced at submit against the settings' limits: a spec over
a limit is a 422 naming the field and the limit, before anything is built, queued or traced.

Tracing time and a plan's memory grow with the number of layers (ops traced, allocation events
replayed) and the world size (ranks laid out); the parameters and the activation elements per
sample bound the rest. The layer and world-size checks run before the model is built (a
100,000-layer config would take minutes and gigabytes to build at all); the parameter and
activation checks read the built model's facts. The activation figure is a price, not a
prediction: elements of one sample as the first layer sees it (a token model: sequence x
embedding width) times the layers that hold weights."""

from __future__ import annotations

import math
from typing import Any

from service.config import Settings
from service.core.problems import ProblemException, field_error, validation_problem
from service.schemas.spec import PlanSpec
from workers.engine import ModelFacts

# How transformers configs name their depth.
LAYER_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_encoder_layers",
    "num_decoder_layers",
)


def _over(loc: tuple[str | int, ...], what: str, limit: float, setting: str) -> dict[str, Any]:
    return field_error(
        loc, f"{what} is over this server's limit of {limit:,.0f} ({setting})", "cost_limit"
    )


def _raise(errors: list[dict[str, Any]]) -> None:
    if errors:
        raise ProblemException.from_body(validation_problem(errors))


def check_before_build(spec: PlanSpec, limits: Settings) -> None:
    errors = []
    if spec.model.source == "transformers":
        for key in LAYER_KEYS:
            value = spec.model.config.get(key)
            if isinstance(value, int) and value > limits.max_layers:
                errors.append(
                    _over(
                        ("model", "config", key),
                        f"{value:,} layers",
                        limits.max_layers,
                        "TRAINPLAN_MAX_LAYERS",
                    )
                )
    if spec.training.world_size > limits.max_world_size:
        errors.append(
            _over(
                ("training", "world_size"),
                f"a world of {spec.training.world_size:,} GPUs",
                limits.max_world_size,
                "TRAINPLAN_MAX_WORLD_SIZE",
            )
        )
    seq_len = getattr(spec.data, "seq_len", None)
    if seq_len is not None and seq_len > limits.max_sequence_length:
        errors.append(
            _over(
                ("data", "seq_len"),
                f"a sequence of {seq_len:,} tokens",
                limits.max_sequence_length,
                "TRAINPLAN_MAX_SEQUENCE_LENGTH",
            )
        )
    _raise(errors)


def activation_elements(spec: PlanSpec, facts: ModelFacts) -> int:
    """The price of one sample's activations (see the module's docstring)."""
    data = spec.data
    if data.kind == "tokens":
        per_sample = data.seq_len * (facts.token_width or 1)
    elif data.kind == "image":
        per_sample = math.prod(data.sample_shape)
    else:
        per_sample = math.prod(data.shape)
    return per_sample * max(facts.weighted_layers, 1)


def check_built(spec: PlanSpec, facts: ModelFacts, limits: Settings) -> None:
    errors = []
    if facts.parameters > limits.max_parameters:
        errors.append(
            _over(
                ("model",),
                f"a model of {facts.parameters:,} parameters",
                limits.max_parameters,
                "TRAINPLAN_MAX_PARAMETERS",
            )
        )
    price = activation_elements(spec, facts)
    if price > limits.max_activation_elements:
        where = ("data", "seq_len") if spec.data.kind == "tokens" else ("data",)
        errors.append(
            _over(
                where,
                f"{price:,} activation elements per sample ({facts.weighted_layers} weighted "
                "layers)",
                limits.max_activation_elements,
                "TRAINPLAN_MAX_ACTIVATION_ELEMENTS",
            )
        )
    _raise(errors)
