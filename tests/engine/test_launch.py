"""Launch specs: the torchrun command line parses with torchrun's own parser; the Slurm script,
run with stand-ins for `scontrol` and `srun`, starts one torchrun per node on the first node's
rendezvous; Kubeflow's TrainJob models, SkyPilot's `Task.from_yaml_config` and Ray's
`ScalingConfig` read theirs, and Ray's TorchTrainer runs the loop on 2 CPU workers."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from service.schemas.spec import SimulatedDeviceSpec
from tests.helpers import SKY_PYTHON, configs_of, tensor_spec


def launch(world_size: int, gpus_per_node: int = 8) -> dict:
    spec = tensor_spec(world_size=world_size, parallelism={"gpus_per_node": gpus_per_node})
    return configs_of(spec, world_size=world_size, learning_rate=3e-4)["launch"]


@pytest.mark.parametrize(("world", "nodes", "per_node"), [(1, 1, 1), (4, 1, 4), (16, 2, 8)])
def test_torchrun_parses_the_command_line(world: int, nodes: int, per_node: int) -> None:
    spec = launch(world)
    assert (spec["nodes"], spec["gpus_per_node"]) == (nodes, per_node)
    argv = shlex.split(spec["torchrun"].replace("$MASTER_ADDR", "node-0"))
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert args.nnodes == str(nodes) and int(args.nproc_per_node) == per_node
    assert args.training_script == "train.py"
    if nodes > 1:
        assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "node-0:29500"
    else:
        assert args.standalone
    assert spec["env"] == {
        "MICRO_BATCH_SIZE": "4",
        "GRAD_ACCUM_STEPS": "2",
        "LEARNING_RATE": "0.0003",
        "WORLD_SIZE_PLANNED": str(world),
    }


def test_the_slurm_script_starts_a_torchrun_per_node(tmp_path: Path) -> None:
    spec = launch(16)
    script = tmp_path / "job.sh"
    script.write_text(spec["slurm"])
    directives = [
        line.split()[1] for line in spec["slurm"].splitlines() if line.startswith("#SBATCH")
    ]
    assert "--nodes=2" in directives and "--gpus-per-node=8" in directives
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        # `scontrol show hostnames` of a large allocation: more than a pipe's first read
        "scontrol": "for i in $(seq 1 20000); do echo gpu-$i; done",
        "srun": 'echo "$MICRO_BATCH_SIZE $GRAD_ACCUM_STEPS $*" > "$OUT"',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "srun.txt"
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "42",
        "OUT": str(out),
    }
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=30)
    words = out.read_text().split()
    assert words[:2] == ["4", "2"]  # the plan's numbers reach the job's environment
    args = get_args_parser().parse_args(words[3:])
    assert words[2] == "torchrun" and args.nnodes == "2" and int(args.nproc_per_node) == 8
    assert args.rdzv_endpoint == "gpu-1:29500" and args.rdzv_id == "42"


def h100_launch(world_size: int = 16) -> tuple[dict, str]:
    """The launch specs and the loop of a plan on simulated H100s, 8 to a node."""
    spec = tensor_spec(world_size=world_size, parallelism={"gpus_per_node": 8})
    spec = spec.model_copy(update={"device": SimulatedDeviceSpec(kind="simulated", gpu="H100")})
    configs = configs_of(spec, world_size=world_size, learning_rate=3e-4)
    return configs["launch"], configs["pytorch"]


def test_the_trainjob_is_a_kubeflow_trainjob_carrying_the_loop(tmp_path: Path) -> None:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    launch_spec, loop = h100_launch()
    manifest = launch_spec["kubeflow_trainjob"]
    job = TrainerV1alpha1TrainJob.from_dict(manifest)
    assert job is not None
    # the models ignore keys they do not know: every key must come back
    assert job.to_dict() == manifest
    trainer = job.spec.trainer
    assert (trainer.num_nodes, trainer.num_proc_per_node) == (2, 8)
    assert trainer.resources_per_node.limits["nvidia.com/gpu"].actual_instance == "8"
    assert {e.name: e.value for e in trainer.env}["MICRO_BATCH_SIZE"] == "4"
    assert job.spec.runtime_ref.name == "torch-distributed"
    # the command writes the loop byte for byte (nothing in it expanded) and runs torchrun on it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "torchrun"
    stub.write_text('#!/bin/bash\necho "$*" > torchrun.args\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": "/x"}
    argv = trainer.command
    subprocess.run(argv, cwd=tmp_path, env=env, check=True, timeout=30)
    assert (tmp_path / "train.py").read_text() == loop + "\n"
    assert (tmp_path / "torchrun.args").read_text().split() == ["train.py"]


SKY_TASK = """
import json, sys
import sky
task = sky.Task.from_yaml_config(json.loads(sys.argv[1]))
resources = next(iter(task.resources))
print(json.dumps({"nodes": task.num_nodes, "accelerators": resources.accelerators,
                  "envs": task.envs, "run": task.run, "workdir": task.workdir}))
"""


@pytest.mark.skipif(not SKY_PYTHON.exists(), reason="make install makes .venv-sky")
def test_skypilot_reads_the_task_and_its_run_starts_torchrun_per_node(tmp_path: Path) -> None:
    launch_spec, _ = h100_launch()
    task = launch_spec["skypilot"]
    run = subprocess.run(
        [str(SKY_PYTHON), "-c", SKY_TASK, json.dumps(task)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    read = json.loads(run.stdout.strip().splitlines()[-1])
    assert read["nodes"] == 2 and read["accelerators"] == {"H100": 8}
    assert read["envs"]["GRAD_ACCUM_STEPS"] == "2"
    # the run line, with SkyPilot's variables on the second node, parses as torchrun's
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "torchrun"
    stub.write_text(f'#!/bin/bash\necho "$*" > {tmp_path}/args\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8",
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "8",
    }
    subprocess.run(["bash", "-c", read["run"]], env=env, check=True, timeout=30)
    args = get_args_parser().parse_args((tmp_path / "args").read_text().split())
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.master_addr, args.master_port) == ("10.0.0.7", 29500)
    assert args.training_script == "train.py"


def test_a_card_skypilot_does_not_name_leaves_the_accelerator_to_the_user() -> None:
    assert launch(8)["skypilot"]["resources"] == {}  # a memory-only simulated card


def test_the_ray_driver_builds_ray_s_scaling_config() -> None:
    from ray.train import ScalingConfig

    namespace: dict = {"__name__": "driver"}  # not __main__: builds, does not fit
    source = h100_launch()[0]["ray"]
    # the driver reads train.py where it runs; give it one to read
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "train.py").write_text("pass\n")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            exec(compile(source, "driver.py", "exec"), namespace)  # trainplan's own text
        finally:
            os.chdir(cwd)
    scaling = namespace["scaling"]
    assert isinstance(scaling, ScalingConfig)
    assert scaling.num_workers == 16 and scaling.use_gpu
    assert scaling.resources_per_worker == {"GPU": 1}


@pytest.mark.slow
def test_ray_s_torchtrainer_runs_the_loop_to_its_last_optimizer_step(tmp_path: Path) -> None:
    """2 CPU workers (gloo), the plan's loop filled in with a small model and data."""
    from tests.engine.test_parallel import EPILOGUE, PRELUDE

    spec = tensor_spec(world_size=2, parallelism={"strategy": "ddp"})
    configs = configs_of(spec, world_size=2, total_optimizer_steps=3)
    (tmp_path / "train.py").write_text(PRELUDE + configs["pytorch"] + EPILOGUE)
    (tmp_path / "driver.py").write_text(configs["launch"]["ray"])
    # Ray's sockets live under its temp dir, whose path may not pass 107 bytes: a short one
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = os.environ | {
        "TRAINPLAN_RAY_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": ray_tmp,
    }
    try:
        run = subprocess.run(
            [sys.executable, "driver.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    steps = [line.split("STEPS")[1].split()[0] for line in out.splitlines() if "STEPS" in line]
    assert steps and set(steps) == {"3"}  # rank 0 stepped the plan's 3 optimizer steps
