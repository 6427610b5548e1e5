"""Launch specs: the torchrun command line parses with torchrun's own parser, and the Slurm
script, run with stand-ins for `scontrol` and `srun`, starts one torchrun per node on the
first node's rendezvous."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from tests.helpers import configs_of, tensor_spec


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
