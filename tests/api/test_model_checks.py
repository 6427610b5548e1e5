"""Submit's model build is cached by the parts of the spec it reads (issue 14): a new spec on a
known model skips the build, yet every check that depends on the rest still runs."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.schemas.spec import PlanSpec
from workers import engine


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model keys of the builds submit asked the engine for."""
    seen: list[str] = []
    real = engine.model_facts

    def counted(spec: PlanSpec) -> engine.ModelFacts:
        seen.append(engine.model_key(spec))
        return real(spec)

    monkeypatch.setattr(engine, "model_facts", counted)
    return seen


def _variant(spec: dict[str, Any], **training: Any) -> dict[str, Any]:
    out = deepcopy(spec)
    out["training"].update(training)
    return out


def test_a_new_spec_on_a_known_model_skips_the_build(
    client: TestClient, small_spec: dict[str, Any], builds: list[str]
) -> None:
    for epochs in (1, 2, 3):
        assert client.post("/v1/plans", json=_variant(small_spec, epochs=epochs)).status_code == 202
    other_card = deepcopy(small_spec) | {"device": {"kind": "simulated", "gpu": "A100-80GB"}}
    assert client.post("/v1/plans", json=other_card).status_code == 202
    assert len(builds) == 1
    # the data is part of what the build reads (input shape, classes): a new shape builds again
    wider = deepcopy(small_spec)
    wider["data"]["width"] = 32
    assert client.post("/v1/plans", json=wider).status_code == 202
    assert len(builds) == 2 and builds[0] != builds[1]


def test_checks_on_the_rest_of_the_spec_still_run_on_a_cached_model(
    client: TestClient, small_spec: dict[str, Any], builds: list[str]
) -> None:
    assert client.post("/v1/plans", json=small_spec).status_code == 202
    bad = _variant(small_spec, param_groups=[{"prefix": "nope.", "lr_scale": 2.0}])
    r = client.post("/v1/plans", json=bad)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "training.param_groups.0.prefix"
    assert len(builds) == 1


def test_a_failed_build_is_cached_as_its_error(
    client: TestClient, small_spec: dict[str, Any], builds: list[str]
) -> None:
    broken = deepcopy(small_spec)
    broken["model"]["layers"].insert(8, {"type": "Linear", "in_features": 3, "out_features": 4})
    answers = [client.post("/v1/plans", json=_variant(broken, epochs=e)) for e in (1, 2)]
    assert [a.status_code for a in answers] == [422, 422]
    assert answers[0].json()["errors"] == answers[1].json()["errors"]
    assert answers[0].json()["errors"][0]["field"] == "model.layers.8"
    assert len(builds) == 1


def test_a_cache_of_size_zero_builds_every_time(
    db_url: str, small_spec: dict[str, Any], builds: list[str]
) -> None:
    settings = Settings(database_url=db_url, embedded_worker=False, model_check_cache=0)
    with TestClient(create_app(settings)) as client:
        for epochs in (1, 2):
            client.post("/v1/plans", json=_variant(small_spec, epochs=epochs))
    assert len(builds) == 2
