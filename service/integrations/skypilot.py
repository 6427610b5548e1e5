"""SkyPilot's admin policy over REST (`admin_policy: https://...` in SkyPilot's config makes its
`RestfulAdminPolicy` POST every launch request here, 30 s timeout).

The wire format is SkyPilot's (sky/admin_policy.py): the request body is a JSON *string* whose
text is `{"task": <task YAML>, "skypilot_config": <config YAML>, "request_name": ..., ...}`, and
the answer must be the same kind of string holding `{"task": ..., "skypilot_config": ...}`; a
400 rejects the request with the response's text as the reason, any other failure is the
policy's error.

A task whose `envs` carry `TRAINPLAN_SPEC` (a plan spec as JSON) is planned; it comes back with
the plan's accelerators per node (the task's own card name kept, the plan's card where it names
none), `num_nodes`, the plan's numbers in `envs`, and the plan's torchrun line as `run` where the
task has none. A task without a spec passes unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from service.integrations.hooks import node_layout, plan_env

SPEC_ENV = "TRAINPLAN_SPEC"


class MalformedRequest(ValueError):
    """Not a request SkyPilot's RestfulAdminPolicy sends."""


def parse(raw: bytes) -> tuple[dict[str, Any], str]:
    """(the task as a mapping, the skypilot_config's YAML text), or MalformedRequest."""
    try:
        body: Any = json.loads(raw)
        if isinstance(body, str):  # RestfulAdminPolicy sends json=<a JSON string>
            body = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"the body is not JSON ({exc})") from None
    if not isinstance(body, dict) or not isinstance(body.get("task"), str):
        raise MalformedRequest("the body is not a SkyPilot user request (no task YAML)")
    config = body.get("skypilot_config", "")
    if not isinstance(config, str):
        raise MalformedRequest("skypilot_config is not YAML text")
    try:
        task = yaml.safe_load(body["task"])
    except yaml.YAMLError as exc:
        raise MalformedRequest(f"the task is not YAML ({exc})") from None
    if task is None:
        task = {}
    if not isinstance(task, dict):
        raise MalformedRequest("the task is not a mapping")
    return task, config


def spec_text(task: dict[str, Any]) -> str | None:
    """The plan spec the task carries, if any."""
    envs = task.get("envs")
    if not isinstance(envs, dict) or envs.get(SPEC_ENV) is None:
        return None
    return str(envs[SPEC_ENV])


def encode(task: dict[str, Any], config: str) -> str:
    """The answer's body: a JSON string of `{"task", "skypilot_config"}`, as SkyPilot's
    `MutatedUserRequest.decode(response.json(), ...)` reads it."""
    inner = {"task": yaml.safe_dump(task, sort_keys=False), "skypilot_config": config}
    return json.dumps(json.dumps(inner))


def mutated(task: dict[str, Any], plan_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """The task with the plan's layout, numbers and (where it has none) launch command; the
    plan's own SkyPilot task (`configs.launch.skypilot`) gives the run line and the card."""
    nodes, per_node = node_layout(result)
    rendered = ((result.get("configs") or {}).get("launch") or {}).get("skypilot") or {}
    planned = (rendered.get("resources") or {}).get("accelerators")
    accelerator = planned.split(":")[0] if isinstance(planned, str) else None
    out = dict(task)
    out["num_nodes"] = nodes
    envs = out.get("envs")
    out["envs"] = {**(envs if isinstance(envs, dict) else {}), **plan_env(plan_id, result)}
    if not out.get("run") and rendered.get("run"):
        out["run"] = rendered["run"]
    resources = out.get("resources")
    if resources is None:
        resources = {}
    out["resources"] = _with_count(resources, per_node, accelerator)
    return out


def _with_count(resources: Any, per_node: int, accelerator: str | None) -> Any:
    """Every candidate of `resources` asking for `per_node` of its accelerator."""
    if isinstance(resources, list):
        return [_with_count(r, per_node, accelerator) for r in resources]
    if not isinstance(resources, dict):
        return resources
    out = dict(resources)
    for key in ("any_of", "ordered"):
        if isinstance(out.get(key), list):
            out[key] = [_with_count(r, per_node, accelerator) for r in out[key]]
    wanted = out.get("accelerators")
    if wanted is None:
        if accelerator is not None and not any(k in out for k in ("any_of", "ordered")):
            out["accelerators"] = f"{accelerator}:{per_node}"
        return out
    out["accelerators"] = _accelerators(wanted, per_node)
    return out


def _accelerators(wanted: Any, per_node: int) -> Any:
    """`H100`, `H100:4`, `{H100: 4}`, `[H100, A100-80GB]` or `{H100, A100}`: each name at
    `per_node`."""
    if isinstance(wanted, str):
        return f"{wanted.split(':')[0].strip()}:{per_node}"
    if isinstance(wanted, dict):
        return {name: per_node for name in wanted}
    if isinstance(wanted, list | set | tuple):
        return [_accelerators(w, per_node) for w in wanted]
    return wanted
