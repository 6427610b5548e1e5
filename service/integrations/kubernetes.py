"""Kubernetes mutating admission: an `AdmissionReview` (admission.k8s.io/v1) in, a JSONPatch out.

A workload annotated `trainplan.dev/spec: <a plan spec as JSON>` is planned (or its stored plan
reused) and admitted with the plan's numbers in every training container's environment
(`MICRO_BATCH_SIZE`, `GRAD_ACCUM_STEPS`, `LEARNING_RATE`, `TRAINPLAN_PLAN_ID`) and the plan's id
in `trainplan.dev/plan-id`. Kinds and where their containers are:

- `Job` (batch/v1) and anything with a pod template: `spec.template.spec.containers`;
- `Pod`: `spec.containers`;
- `PyTorchJob` (kubeflow.org/v1): every replica's `template.spec.containers`;
- `TrainJob` (trainer.kubeflow.org, Trainer v2): `spec.trainer.env`, and `spec.trainer.numNodes`
  from the plan's world size and GPUs per node.

Anything malformed is answered as an AdmissionReview denial with a 400 status: the API server
reads that shape, never a 500.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from service.integrations.hooks import node_layout, plan_env

SPEC_ANNOTATION = "trainplan.dev/spec"
PLAN_ANNOTATION = "trainplan.dev/plan-id"


class MalformedReview(ValueError):
    """Not an AdmissionReview the webhook can answer to the letter."""


@dataclass
class Review:
    uid: str
    kind: str
    obj: dict[str, Any]

    @property
    def annotations(self) -> dict[str, str]:
        metadata = self.obj.get("metadata") or {}
        found = metadata.get("annotations") or {}
        return found if isinstance(found, dict) else {}


@dataclass
class Verdict:
    allowed: bool
    patch: list[dict[str, Any]] = field(default_factory=list)
    code: int | None = None
    message: str | None = None
    warnings: list[str] = field(default_factory=list)


def parse(raw: bytes) -> Review:
    """The review's request, or MalformedReview saying what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedReview(f"the body is not JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
        raise MalformedReview("the body is not an AdmissionReview")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise MalformedReview("the AdmissionReview has no request with a uid")
    obj = request.get("object")
    kind = (
        (request.get("kind") or {}).get("kind") if isinstance(request.get("kind"), dict) else None
    )
    if not isinstance(obj, dict) or not isinstance(kind, str):
        raise MalformedReview("the AdmissionReview's request has no object and kind")
    return Review(request["uid"], kind, obj)


def uid_of(raw: bytes) -> str:
    """The request's uid where one can be read (a denial must echo it)."""
    try:
        body = json.loads(raw)
        return str(body["request"]["uid"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return ""


def answer(uid: str, verdict: Verdict) -> dict[str, Any]:
    """The AdmissionReview the API server expects back."""
    response: dict[str, Any] = {"uid": uid, "allowed": verdict.allowed}
    if verdict.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(verdict.patch).encode()).decode()
    if verdict.message is not None:
        response["status"] = {"code": verdict.code or 400, "message": verdict.message}
    if verdict.warnings:
        response["warnings"] = verdict.warnings
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def patch_for(review: Review, plan_id: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """JSONPatch operations that give the workload the plan's numbers."""
    env = plan_env(plan_id, result)
    ops = _annotation(review.obj, PLAN_ANNOTATION, plan_id)
    spec = review.obj.get("spec") or {}
    if review.kind == "TrainJob":
        trainer = spec.get("trainer")
        if not isinstance(trainer, dict):
            ops.append({"op": "add", "path": "/spec/trainer", "value": {}})
            trainer = {}
        ops += _env_ops("/spec/trainer", trainer, env)
        nodes, _ = node_layout(result)
        ops.append({"op": "add", "path": "/spec/trainer/numNodes", "value": nodes})
        return ops
    for path, containers in _container_lists(review.kind, spec):
        for index, container in enumerate(containers):
            if isinstance(container, dict):
                ops += _env_ops(f"{path}/{index}", container, env)
    return ops


def _container_lists(kind: str, spec: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    if kind == "Pod":
        return [("/spec/containers", spec.get("containers") or [])]
    if kind == "PyTorchJob":
        replicas = spec.get("pytorchReplicaSpecs") or {}
        return [
            (
                f"/spec/pytorchReplicaSpecs/{_escape(name)}/template/spec/containers",
                ((replica.get("template") or {}).get("spec") or {}).get("containers") or [],
            )
            for name, replica in replicas.items()
            if isinstance(replica, dict)
        ]
    template = (spec.get("template") or {}).get("spec") or {}
    return [("/spec/template/spec/containers", template.get("containers") or [])]


def _env_ops(path: str, holder: dict[str, Any], env: dict[str, str]) -> list[dict[str, Any]]:
    """Set each variable in `holder`'s env list: replace one of the same name, else append."""
    current = holder.get("env")
    if not isinstance(current, list):
        value = [{"name": k, "value": v} for k, v in env.items()]
        return [{"op": "add", "path": f"{path}/env", "value": value}]
    ops = []
    names = [item.get("name") if isinstance(item, dict) else None for item in current]
    for key, text in env.items():
        var = {"name": key, "value": text}
        if key in names:
            ops.append({"op": "replace", "path": f"{path}/env/{names.index(key)}", "value": var})
        else:
            ops.append({"op": "add", "path": f"{path}/env/-", "value": var})
    return ops


def _annotation(obj: dict[str, Any], key: str, value: str) -> list[dict[str, Any]]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return [{"op": "add", "path": "/metadata", "value": {"annotations": {key: value}}}]
    if not isinstance(metadata.get("annotations"), dict):
        return [{"op": "add", "path": "/metadata/annotations", "value": {key: value}}]
    return [{"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": value}]


def _escape(key: str) -> str:
    """A JSON Pointer token (RFC 6901): '~' as '~0', '/' as '~1'."""
    return key.replace("~", "~0").replace("/", "~1")
