"""How a scheduler starts the plan's job, from the same numbers as the other renderings: a
`torchrun` command line, a Slurm batch script, a SkyPilot task, a Kubeflow Trainer v2 `TrainJob`,
a Ray Train driver, and the plan's numbers as environment variables.

The rendezvous is torchrun's c10d store on the first node (port 29500, torchrun's default), so
one command line serves one node or many; under Slurm, `srun` starts one torchrun per node and
the first node of the allocation hosts the store; under SkyPilot the first of
`$SKYPILOT_NODE_IPS` does. Kubeflow's torch runtime sets torchrun's `PET_*` variables itself
(nodes, processes per node, the master), so its command is a bare `torchrun train.py`. Ray Train
starts the process group itself and runs the loop in each worker (the loop joins a group that
exists rather than making one).

Each rendering is checked by its own library in tests/engine/test_launch.py: Kubeflow's TrainJob
models, SkyPilot's `Task.from_yaml_config`, Ray's `ScalingConfig`, and a 2-worker CPU
`TorchTrainer` running the loop to its last optimizer step.
"""

from __future__ import annotations

import math
import shlex
import textwrap
from typing import Any

from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import PlanNumbers

PORT = 29500
SCRIPT = "train.py"  # the generated PyTorch loop, saved as this file
# Kubeflow Trainer v2's runtime for PyTorch (installed with the trainer's manifests).
KUBEFLOW_RUNTIME = "torch-distributed"
# The catalogue's cards by the names SkyPilot's catalogue knows them (`sky show-gpus`).
SKYPILOT_ACCELERATORS = {
    "T4": "T4",
    "V100-16GB": "V100",
    "V100-32GB": "V100-32GB",
    "A10": "A10",
    "RTX-3090": "RTX3090",
    "A100-40GB": "A100",
    "A100-80GB": "A100-80GB",
    "L4": "L4",
    "RTX-4090": "RTX4090",
    "L40S": "L40S",
    "H100-PCIe": "H100",
    "H100-80GB": "H100",
    "H200": "H200",
}


def launch_specs(job: LaunchJob, numbers: PlanNumbers, loop: str) -> dict[str, Any]:
    """`loop`: the generated PyTorch loop (configs.pytorch), which the TrainJob carries."""
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
        "skypilot": skypilot_task(job.gpu, nodes, per_node, env),
        "kubeflow_trainjob": train_job(nodes, per_node, env, loop),
        "ray": ray_driver(numbers.world_size),
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


def skypilot_run(master_port: int = PORT) -> str:
    """The task's `run`: one torchrun per node, the first node's address as the rendezvous."""
    return textwrap.dedent(
        f"""\
        MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | sed -n 1p)
        torchrun --nnodes="$SKYPILOT_NUM_NODES" --nproc_per_node="$SKYPILOT_NUM_GPUS_PER_NODE" \\
          --node_rank="$SKYPILOT_NODE_RANK" --master_addr="$MASTER_ADDR" \\
          --master_port={master_port} {SCRIPT}
        """
    )


def skypilot_accelerator(gpu: str | None) -> str | None:
    """SkyPilot's name for the plan's card (None: a card SkyPilot's catalogue does not name)."""
    if gpu is None:
        return None
    return SKYPILOT_ACCELERATORS.get(gpu.split("@")[0])


def skypilot_task(
    gpu: str | None, nodes: int, per_node: int, env: dict[str, str]
) -> dict[str, Any]:
    """A SkyPilot task (`sky launch task.yaml`; JSON is YAML): the workdir holding train.py is
    synced to every node. Without a card SkyPilot names, the accelerator is left to the user."""
    resources: dict[str, Any] = {}
    accelerator = skypilot_accelerator(gpu)
    if accelerator is not None:
        resources["accelerators"] = f"{accelerator}:{per_node}"
    return {
        "name": "trainplan",
        "workdir": ".",
        "num_nodes": nodes,
        "resources": resources,
        "envs": dict(env),
        "run": skypilot_run(),
    }


def train_job(nodes: int, per_node: int, env: dict[str, str], loop: str) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob on the `torch-distributed` runtime, carrying the loop in
    its command as Kubeflow's own SDK carries a training function (a quoted heredoc: nothing in
    it is expanded): `kubectl apply -f` after the loop's model and data are filled in."""
    command = f"cat > {SCRIPT} <<'TRAINPLAN_EOF'\n{loop}\nTRAINPLAN_EOF\ntorchrun {SCRIPT}\n"
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "trainplan"},
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
                "name": KUBEFLOW_RUNTIME,
            },
            "trainer": {
                "numNodes": nodes,
                "numProcPerNode": per_node,
                "resourcesPerNode": {
                    "limits": {"nvidia.com/gpu": str(per_node)},
                },
                "env": [{"name": k, "value": v} for k, v in env.items()],
                "command": ["bash", "-c", command],
            },
        },
    }


def ray_driver(workers: int) -> str:
    """A Ray Train driver: `TorchTrainer` runs train.py (the filled-in loop) in each of
    `workers` workers, one GPU each. TRAINPLAN_RAY_CPU=1 runs it on CPUs (gloo), as a dry run."""
    return textwrap.dedent(
        f"""\
        # Ray Train: the plan's loop (train.py, model and data filled in) on {workers} worker(s).
        import os
        from pathlib import Path

        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        WORKERS = {workers}
        USE_GPU = os.environ.get("TRAINPLAN_RAY_CPU") != "1"
        SOURCE = Path("{SCRIPT}").read_text()


        def train_loop_per_worker() -> None:
            # Ray made the process group and set RANK, LOCAL_RANK and WORLD_SIZE: the loop
            # joins it
            exec(compile(SOURCE, "{SCRIPT}", "exec"), {{"__name__": "__main__"}})


        scaling = ScalingConfig(
            num_workers=WORKERS,
            use_gpu=USE_GPU,
            resources_per_worker={{"GPU": 1}} if USE_GPU else {{"CPU": 1}},
        )
        if __name__ == "__main__":
            TorchTrainer(
                train_loop_per_worker,
                scaling_config=scaling,
                run_config=RunConfig(name="trainplan", storage_path=os.path.abspath("ray_results")),
            ).fit()
        """
    )
