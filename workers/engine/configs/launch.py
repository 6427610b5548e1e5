"""How a scheduler starts the plan's job: a `torchrun` command line, a Slurm batch script, and
the plan's numbers as environment variables, from the same numbers as the other renderings.

The rendezvous is torchrun's c10d store on the first node (port 29500, torchrun's default), so
one command line serves one node or many; under Slurm, `srun` starts one torchrun per node and
the first node of the allocation hosts the store.
"""

from __future__ import annotations

import math
import shlex
from typing import Any

from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import PlanNumbers

PORT = 29500
SCRIPT = "train.py"  # the generated PyTorch loop, saved as this file


def launch_specs(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    nodes, per_node = layout(numbers.world_size, job.gpus_per_node)
    # for schedulers that pass the plan to the job as variables (the generated loop has them
    # written in)
    env = {
        "MICRO_BATCH_SIZE": str(numbers.micro_batch_size),
        "GRAD_ACCUM_STEPS": str(numbers.accumulation_steps),
        "LEARNING_RATE": repr(numbers.learning_rate),
        "WORLD_SIZE_PLANNED": str(numbers.world_size),
    }
    return {
        "nodes": nodes,
        "gpus_per_node": per_node,
        "env": env,
        # one word per argument, none needing quotes; $MASTER_ADDR is for the shell to expand
        "torchrun": " ".join(torchrun_argv(nodes, per_node, "$MASTER_ADDR" if nodes > 1 else None)),
        "slurm": slurm_script(nodes, per_node, env),
    }


def layout(world_size: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, processes per node): whole nodes once the world outgrows one."""
    per_node = min(gpus_per_node, world_size)
    return math.ceil(world_size / per_node), per_node


def torchrun_argv(nodes: int, per_node: int, master: str | None) -> list[str]:
    argv = ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={per_node}"]
    if master is not None:
        argv += ["--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{PORT}"]
    else:
        argv += ["--standalone"]
    return [*argv, SCRIPT]


def slurm_script(nodes: int, per_node: int, env: dict[str, str]) -> str:
    """An sbatch script: one task per node, each a torchrun of `per_node` processes. The first
    host is read with `sed -n 1p`, not `head`: under pipefail, head's early exit kills
    scontrol with SIGPIPE and the script with it."""
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    return f"""#!/bin/bash
#SBATCH --job-name=trainplan
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={per_node}
set -euo pipefail
{exports}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export MASTER_ADDR
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node={per_node} \\
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:{PORT}" {SCRIPT}
"""
