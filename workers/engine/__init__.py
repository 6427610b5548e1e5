"""The profiling engine: build the job, probe micro-batches on a device, make the plan.

Usable with no server: `workers.engine.profile.run_plan(spec)` returns a `PlanResult`.
"""
