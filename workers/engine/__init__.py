"""The profiling engine: build the job, probe micro-batches on a device, turn the answer into a plan.

Usable with no server: `workers.engine.profile.run_plan(spec)` returns a `PlanResult`.
"""
