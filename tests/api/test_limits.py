"""Cost limits at submit (issue 13): a spec over one of the server's limits is a 422 naming the
field and the limit, and the layer count is refused before any model is built."""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from workers import engine

LLAMA: dict[str, Any] = {
    "model": {
        "source": "transformers",
        "architecture": "LlamaForCausalLM",
        "config": {
            "num_hidden_layers": 2,
            "hidden_size": 256,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "vocab_size": 1000,
            "max_position_embeddings": 16384,
        },
    },
    "data": {"kind": "tokens", "seq_len": 512, "vocab_size": 1000},
    "training": {"optimizer": "adamw", "precision": "bf16-mixed", "global_batch_size": 64},
    "device": {"kind": "simulated", "gpu": "H100-80GB"},
}


@pytest.fixture
def limited(db_url: str) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db_url,
        embedded_worker=False,
        max_layers=16,
        max_parameters=5e6,
        max_world_size=8,
        max_sequence_length=4096,
        max_activation_elements=2**24,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _llama(**config: Any) -> dict[str, Any]:
    spec = deepcopy(LLAMA)
    spec["model"]["config"].update(config)
    return spec


def _refused(client: TestClient, spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/plans", json=spec)
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert error["type"] == "cost_limit"
    return dict(error)


def test_a_spec_within_the_limits_is_queued(limited: TestClient) -> None:
    assert limited.post("/v1/plans", json=LLAMA).status_code == 202


def test_too_many_layers_is_refused_before_the_model_is_built(
    limited: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[object] = []
    monkeypatch.setattr(engine, "model_facts", lambda spec: built.append(spec))
    error = _refused(limited, _llama(num_hidden_layers=100_000))
    assert error["field"] == "model.config.num_hidden_layers"
    assert "100,000 layers" in error["msg"] and "limit of 16 (TRAINPLAN_MAX_LAYERS)" in error["msg"]
    assert built == []


def test_parameters_world_size_sequence_and_activations_have_limits(
    limited: TestClient,
) -> None:
    big = _refused(limited, _llama(hidden_size=1024, intermediate_size=4096))
    assert big["field"] == "model" and "TRAINPLAN_MAX_PARAMETERS" in big["msg"]

    wide = deepcopy(LLAMA)
    wide["training"]["world_size"] = 16
    assert _refused(limited, wide)["field"] == "training.world_size"

    long = deepcopy(LLAMA)
    long["data"]["seq_len"] = 8192
    assert _refused(limited, long)["field"] == "data.seq_len"

    # 4,096 tokens x 256 wide x 21 weighted layers (2 blocks of 9, embedding, norm, head): 22M
    heavy = deepcopy(LLAMA)
    heavy["data"]["seq_len"] = 4096
    error = _refused(limited, heavy)
    assert error["field"] == "data.seq_len" and "TRAINPLAN_MAX_ACTIVATION_ELEMENTS" in error["msg"]


def test_the_default_limits_admit_the_published_large_models() -> None:
    """A 70B Llama at 8k tokens on 512 GPUs is a real job: the defaults must price it in."""
    from service.api import limits
    from service.schemas.spec import PlanSpec

    spec = PlanSpec.model_validate(
        _llama(
            num_hidden_layers=80,
            hidden_size=8192,
            intermediate_size=28672,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
        )
        | {
            "data": {"kind": "tokens", "seq_len": 8192, "vocab_size": 128256},
            "training": {
                "optimizer": "adamw",
                "precision": "bf16-mixed",
                "global_batch_size": 1024,
                "world_size": 512,
            },
        }
    )
    defaults = Settings()
    limits.check_before_build(spec, defaults)
    limits.check_built(spec, engine.model_facts(spec), defaults)
