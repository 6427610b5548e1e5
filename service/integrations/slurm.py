"""Slurm's job_submit.lua hook (deploy/slurm/job_submit.lua): the controller runs it for every
submission; a batch script with a `#TRAINPLAN {spec as JSON}` line is planned here, and the hook
reads back plain `key=value` lines (Lua has no JSON parser; the values never hold a newline):

    decision=accept | reject | pending
    message=<why, for slurm.log_user>
    plan_id, nodes, gpus_per_node and the plan's environment (MICRO_BATCH_SIZE, ...)

`accept` sets the job's nodes and GPUs per node and exports the plan's numbers in its script;
`reject` refuses the submission; `pending` (the plan was not done in time) admits the job
unchanged or refuses it, as the hook's TRAINPLAN_ON_TIMEOUT says, and the plan is reused when
the job is submitted again.
"""

from __future__ import annotations

from service.integrations.hooks import Outcome, node_layout, plan_env


def lines(outcome: Outcome) -> str:
    fields: dict[str, str] = {"plan_id": outcome.plan_id}
    if outcome.kind == "planned":
        assert outcome.result is not None
        nodes, per_node = node_layout(outcome.result)
        fields |= {"decision": "accept", "nodes": str(nodes), "gpus_per_node": str(per_node)}
        fields |= plan_env(outcome.plan_id, outcome.result)
    else:
        decision = "pending" if outcome.kind == "pending" else "reject"
        fields |= {"decision": decision, "message": outcome.message}
    return as_lines(fields)


def refused(message: str) -> str:
    """A spec the hook cannot plan (malformed, refused by validation): the job is refused."""
    return as_lines({"decision": "reject", "message": message})


def as_lines(fields: dict[str, str]) -> str:
    """One `key=value` per line, newlines in values flattened."""
    return "".join(f"{k}={' '.join(str(v).splitlines())}\n" for k, v in fields.items())
