"""The Kubernetes mutating webhook: AdmissionReview v1 documents in, JSONPatch out, applied here
with `jsonpatch` as the API server applies it; malformed reviews are denials, never 500s."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from copy import deepcopy
from typing import Any

import jsonpatch
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.helpers import run_queued_plan

ROUTE = "/v1/integrations/kubernetes/mutate"


def review(obj: dict[str, Any], kind: str, group: str = "batch", version: str = "v1") -> dict:
    """An AdmissionReview as the API server sends it (CREATE of `obj`)."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
            "namespace": "ml",
            "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


def job(spec: dict[str, Any] | None, env: list[dict[str, str]] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "train", "image": "trainer:1", "args": ["train.py"]}
    if env is not None:
        container["env"] = env
    annotations = {"trainplan.dev/spec": json.dumps(spec)} if spec is not None else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "finetune", "annotations": annotations},
        "spec": {"template": {"spec": {"containers": [container], "restartPolicy": "Never"}}},
    }


def patched(response: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    answer = response["response"]
    assert answer["allowed"] and answer["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(answer["patch"]))
    return jsonpatch.apply_patch(deepcopy(obj), ops)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.fixture
def api(db_url: str) -> Iterator[tuple[TestClient, Settings]]:
    settings = Settings(database_url=db_url, embedded_worker=False, admission_wait_seconds=0.2)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def planned(client: TestClient, settings: Settings, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit the spec and run it to the end on a worker (the webhook then reuses the plan)."""
    plan_id = client.post("/v1/plans", json=spec).json()["id"]
    run_queued_plan(settings)
    body = client.get(f"/v1/plans/{plan_id}").json()
    assert body["status"] == "succeeded"
    return body


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"kind": "AdmissionReview"}',
        b'{"kind": "AdmissionReview", "request": {"uid": "u1"}}',
    ],
)
def test_a_malformed_review_is_a_denial_in_the_review_shape(
    api: tuple[TestClient, Settings], raw: bytes
) -> None:
    client, _ = api
    response = client.post(ROUTE, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    body = response.json()
    assert body["kind"] == "AdmissionReview" and body["apiVersion"] == "admission.k8s.io/v1"
    assert body["response"]["allowed"] is False
    assert body["response"]["status"]["code"] == 400
    assert body["response"]["uid"] == ("u1" if b"u1" in raw else "")


def test_a_workload_without_a_spec_is_admitted_unchanged(api: tuple[TestClient, Settings]) -> None:
    client, _ = api
    body = client.post(ROUTE, json=review(job(None), "Job")).json()["response"]
    assert body == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_an_invalid_spec_is_denied_naming_the_field(
    api: tuple[TestClient, Settings], small_spec: dict[str, Any]
) -> None:
    client, _ = api
    bad = deepcopy(small_spec)
    bad["training"]["global_batch_size"] = -1
    body = client.post(ROUTE, json=review(job(bad), "Job")).json()["response"]
    assert body["allowed"] is False and body["status"]["code"] == 422
    assert "training.global_batch_size" in body["status"]["message"]


def test_a_plan_still_running_admits_with_a_warning_or_denies(
    db_url: str, small_spec: dict[str, Any]
) -> None:
    for on_timeout, allowed in (("allow", True), ("deny", False)):
        settings = Settings(
            database_url=db_url,
            embedded_worker=False,
            admission_wait_seconds=0.1,
            admission_on_timeout=on_timeout,
        )
        with TestClient(create_app(settings)) as client:
            body = client.post(ROUTE, json=review(job(small_spec), "Job")).json()["response"]
        assert body["allowed"] is allowed and "patch" not in body
        text = body["warnings"][0] if allowed else body["status"]["message"]
        assert "is not done yet" in text


def test_a_finished_plan_sets_the_job_s_environment(
    api: tuple[TestClient, Settings], small_spec: dict[str, Any]
) -> None:
    client, settings = api
    plan = planned(client, settings, small_spec)
    result = plan["result"]
    obj = job(
        small_spec,
        env=[{"name": "MICRO_BATCH_SIZE", "value": "1"}, {"name": "HF_HOME", "value": "/cache"}],
    )
    out = patched(client.post(ROUTE, json=review(obj, "Job")).json(), obj)
    container = out["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["MICRO_BATCH_SIZE"] == str(result["micro_batch_size"])  # replaced, not doubled
    assert [e["name"] for e in container["env"]].count("MICRO_BATCH_SIZE") == 1
    assert env["GRAD_ACCUM_STEPS"] == str(result["accumulation_steps"])
    assert float(env["LEARNING_RATE"]) == result["learning_rate"]
    assert env["HF_HOME"] == "/cache" and env["TRAINPLAN_PLAN_ID"] == plan["id"]
    assert out["metadata"]["annotations"]["trainplan.dev/plan-id"] == plan["id"]


def test_pytorchjob_replicas_and_a_trainjob_s_trainer_get_the_plan(
    api: tuple[TestClient, Settings], small_spec: dict[str, Any]
) -> None:
    client, settings = api
    plan = planned(client, settings, small_spec)
    container = {"name": "pytorch", "image": "trainer:1"}
    pytorchjob = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "ft", "annotations": {"trainplan.dev/spec": json.dumps(small_spec)}},
        "spec": {
            "pytorchReplicaSpecs": {
                role: {"replicas": 1, "template": {"spec": {"containers": [dict(container)]}}}
                for role in ("Master", "Worker")
            }
        },
    }
    answer = client.post(ROUTE, json=review(pytorchjob, "PyTorchJob", "kubeflow.org")).json()
    out = patched(answer, pytorchjob)
    for role in ("Master", "Worker"):
        replica = out["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]
        assert env_of(replica)["TRAINPLAN_PLAN_ID"] == plan["id"]
    trainjob = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "ft", "annotations": {"trainplan.dev/spec": json.dumps(small_spec)}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"image": "trainer:1"}},
    }
    answer = client.post(ROUTE, json=review(trainjob, "TrainJob", "trainer.kubeflow.org")).json()
    out = patched(answer, trainjob)
    trainer = out["spec"]["trainer"]
    assert env_of(trainer)["MICRO_BATCH_SIZE"] == str(plan["result"]["micro_batch_size"])
    assert trainer["numNodes"] == 1
