"""SkyPilot's admin policy over REST: requests in SkyPilot's own wire format (a JSON string of
YAML texts, as `UserRequest.encode` writes it), and SkyPilot's own `RestfulAdminPolicy` client
(from the .venv-sky venv: SkyPilot pins click and uvicorn below the service's) against a running
server, authenticated by the key in the policy URL as SkyPilot's config would carry it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from copy import deepcopy
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.integrations.hooks import outcome_of
from tests.helpers import SKY_PYTHON, hook_settings, run_queued_plan, served

ROUTE = "/v1/integrations/skypilot/policy"


def user_request(task: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """The body RestfulAdminPolicy posts: `json=UserRequest.encode()`, a JSON string."""
    inner = {
        "task": yaml.safe_dump(task),
        "skypilot_config": yaml.safe_dump(config or {}),
        "request_name": "cluster.launch",
        "request_options": None,
        "at_client_side": False,
        "user": "",
    }
    return json.dumps(json.dumps(inner))


def decoded(response: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task, config) of an answer, read as `MutatedUserRequest.decode(response.json())`."""
    inner = json.loads(response.json())
    return yaml.safe_load(inner["task"]), yaml.safe_load(inner["skypilot_config"]) or {}


def h100_spec(small_spec: dict[str, Any], world: int = 16) -> dict[str, Any]:
    spec = deepcopy(small_spec)
    spec["device"] = {"kind": "simulated", "gpu": "H100-80GB"}
    spec["training"]["world_size"] = world
    spec["training"]["parallelism"] = {"strategy": "ddp", "gpus_per_node": 8}
    spec["training"]["global_batch_size"] = 4096
    return spec


def task_with(spec: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    envs = {"HF_HOME": "/cache"}
    if spec is not None:
        envs["TRAINPLAN_SPEC"] = json.dumps(spec)
    return {"name": "finetune", "envs": envs, **extra}


@pytest.fixture
def api(db_url: str) -> Iterator[tuple[TestClient, Settings]]:
    settings = Settings(database_url=db_url, embedded_worker=False, admission_wait_seconds=0.2)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def test_a_task_without_a_spec_passes_unchanged(api: tuple[TestClient, Settings]) -> None:
    client, _ = api
    task = task_with(None, resources={"accelerators": "A100:2"}, run="python x.py")
    response = client.post(ROUTE, content=user_request(task, {"jobs": {"bucket": "s3://b"}}))
    assert response.status_code == 200
    assert decoded(response) == (task, {"jobs": {"bucket": "s3://b"}})


@pytest.mark.parametrize(
    "raw", [b"not json", b'"[1, 2]"', b'{"task": 3}', json.dumps(json.dumps({"task": ": ["}))]
)
def test_a_malformed_request_is_a_400_with_a_reason(
    api: tuple[TestClient, Settings], raw: Any
) -> None:
    client, _ = api
    response = client.post(ROUTE, content=raw)
    assert response.status_code == 400 and response.text.startswith("trainplan: ")


def test_an_invalid_spec_is_rejected_naming_the_field(
    api: tuple[TestClient, Settings], small_spec: dict[str, Any]
) -> None:
    client, _ = api
    bad = deepcopy(small_spec)
    bad["training"]["global_batch_size"] = 0
    response = client.post(ROUTE, content=user_request(task_with(bad)))
    assert response.status_code == 400
    assert "envs.TRAINPLAN_SPEC: training.global_batch_size" in response.text


def test_a_plan_not_done_is_rejected_with_a_retry_hint_then_reused(
    api: tuple[TestClient, Settings], small_spec: dict[str, Any]
) -> None:
    client, settings = api
    task = task_with(h100_spec(small_spec), resources={"accelerators": {"H100": 1}})
    first = client.post(ROUTE, content=user_request(task))
    assert first.status_code == 400 and "not done yet" in first.text and "retry" in first.text
    run_queued_plan(settings)  # the plan the first request queued
    plans = client.get("/v1/plans").json()["items"]
    assert len(plans) == 1 and plans[0]["status"] == "succeeded"
    second = client.post(ROUTE, content=user_request(task))
    assert second.status_code == 200
    assert len(client.get("/v1/plans").json()["items"]) == 1  # reused, not planned again
    out, _ = decoded(second)
    result = client.get(f"/v1/plans/{plans[0]['id']}").json()["result"]
    assert out["num_nodes"] == 2  # 16 ranks at 8 per node
    assert out["resources"] == {"accelerators": {"H100": 8}}
    assert out["envs"]["MICRO_BATCH_SIZE"] == str(result["micro_batch_size"])
    assert out["envs"]["GRAD_ACCUM_STEPS"] == str(result["accumulation_steps"])
    assert float(out["envs"]["LEARNING_RATE"]) == result["learning_rate"]
    assert out["envs"]["TRAINPLAN_PLAN_ID"] == plans[0]["id"]
    assert out["envs"]["HF_HOME"] == "/cache" and "TRAINPLAN_SPEC" in out["envs"]
    # no run of its own: the plan's torchrun line; the plan's card where the task names none
    assert out["run"] == result["configs"]["launch"]["skypilot"]["run"]
    bare = client.post(ROUTE, content=user_request(task_with(h100_spec(small_spec))))
    assert decoded(bare)[0]["resources"] == {"accelerators": "H100:8"}


def test_candidate_resources_each_get_the_plan_s_count(
    api: tuple[TestClient, Settings], small_spec: dict[str, Any]
) -> None:
    client, settings = api
    spec = h100_spec(small_spec)
    client.post("/v1/plans", json=spec)
    run_queued_plan(settings)
    resources = {"any_of": [{"accelerators": "H100:1"}, {"accelerators": ["A100-80GB", "H200"]}]}
    task = task_with(spec, resources=resources, run="python my_train.py")
    out, _ = decoded(client.post(ROUTE, content=user_request(task)))
    assert out["resources"] == {
        "any_of": [{"accelerators": "H100:8"}, {"accelerators": ["A100-80GB:8", "H200:8"]}]
    }
    assert out["run"] == "python my_train.py"  # the task's own command is kept


def test_each_state_of_a_plan_is_one_outcome_for_every_hook() -> None:
    infeasible = outcome_of("p1", "succeeded", {"feasible": False, "suggestions": ["LoRA"]}, None)
    assert (infeasible.kind, infeasible.code) == ("infeasible", 422)
    assert infeasible.message == "trainplan: plan p1 does not fit: LoRA"
    failed = outcome_of("p2", "failed", None, {"status": 422, "detail": "no such model"})
    assert (failed.kind, failed.code) == ("failed", 422) and "no such model" in failed.message
    for status in ("queued", "running", None):
        assert outcome_of("p3", status, None, None).kind == "pending"
    planned = outcome_of("p4", "succeeded", {"feasible": True, "micro_batch_size": 3}, None)
    assert planned.kind == "planned" and planned.result == {"feasible": True, "micro_batch_size": 3}


# -- SkyPilot's own client -----------------------------------------------------------------------

CLIENT = r"""
import json, sys
import sky
from sky import exceptions
from sky.admin_policy import RestfulAdminPolicy, UserRequest
from sky.server.requests.request_names import AdminPolicyRequestName
from sky.utils import config_utils

url, task_json = sys.argv[1], sys.argv[2]
task = sky.Task.from_yaml_config(json.loads(task_json))
request = UserRequest(
    task=task,
    skypilot_config=config_utils.Config.from_dict({}),
    request_name=AdminPolicyRequestName.CLUSTER_LAUNCH,
)
try:
    mutated = RestfulAdminPolicy(url).validate_and_mutate(request)
except exceptions.UserRequestRejectedByPolicy as exc:
    print(json.dumps({"rejected": str(exc)}))
else:
    out = mutated.task.to_yaml_config()
    out.pop("_user_specified_yaml", None)
    print(json.dumps({"task": out}))
"""


@pytest.fixture
def live_api(db_url: str) -> Iterator[tuple[str, Settings]]:
    """The service on a free loopback port, keys required (the shared-token mode)."""
    settings = hook_settings(db_url, "sky-secret")
    with served(settings) as host:
        yield host, settings


def sky_client(url: str, task: dict[str, Any]) -> dict[str, Any]:
    run = subprocess.run(
        [str(SKY_PYTHON), "-c", CLIENT, url, json.dumps(task)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not SKY_PYTHON.exists(), reason="make install makes .venv-sky")
def test_skypilot_s_own_client_gets_the_plan_and_its_rejections(
    live_api: tuple[str, Settings], small_spec: dict[str, Any]
) -> None:
    host, settings = live_api
    spec = h100_spec(small_spec)
    import httpx

    headers = {"Authorization": "Bearer sky-secret"}
    plan_id = httpx.post(f"http://{host}/v1/plans", json=spec, headers=headers).json()["id"]
    run_queued_plan(settings)
    url = f"http://sky:sky-secret@{host}{ROUTE}"  # the key rides in the URL, as Basic
    task = task_with(spec, resources={"accelerators": "H100:1"})
    out = sky_client(url, task)["task"]
    result = httpx.get(f"http://{host}/v1/plans/{plan_id}", headers=headers).json()["result"]
    assert out["num_nodes"] == 2
    assert out["resources"]["accelerators"] == {"H100": 8}
    assert out["envs"]["TRAINPLAN_PLAN_ID"] == plan_id
    assert out["envs"]["MICRO_BATCH_SIZE"] == str(result["micro_batch_size"])
    assert out["run"] == result["configs"]["launch"]["skypilot"]["run"]
    bad = deepcopy(spec)
    bad["training"]["world_size"] = 0
    rejected = sky_client(url, task_with(bad))["rejected"]
    assert "rejected by admin policy" in rejected and "training.world_size" in rejected
