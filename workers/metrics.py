"""Prometheus metrics the worker updates in process (the embedded worker shares the API's
registry; a standalone worker's figures are also derivable from the store, see /metrics)."""

from prometheus_client import Counter, Histogram

PLAN_SECONDS = Histogram(
    "trainplan_plan_duration_seconds",
    "Wall time of a plan on a worker",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
PLANS_FINISHED = Counter(
    "trainplan_plans_finished_total", "Plans ended by this process", ["status"]
)
TRIALS = Counter("trainplan_trials_total", "Trials run by this process", ["fits"])
