"""deploy/slurm/job_submit.lua in Debian's Lua 5.4, as slurmctld would call it: a `slurm` table
with the plugin's constants and loggers, a recorded job_desc of `sbatch --nodes=1
--gpus-per-node=1 job.sh` (unset numbers are Slurm's NO_VAL), curl calling a running service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from tests.helpers import hook_settings, run_queued_plan, served

HOOK = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "job_submit.lua"
LUA = shutil.which("lua5.4")
NO_VAL = 4294967294
# CI installs Lua (.ci/run): there a missing interpreter fails the tests instead
pytestmark = pytest.mark.skipif(
    LUA is None and not os.environ.get("CI"), reason="needs lua5.4 (.ci/run installs it)"
)

# The plugin's side: its constants, loggers that record, the job_desc, the call and what the
# hook left in the job (as JSON-ish lines the test reads).
DRIVER = r"""
local messages = {}
slurm = {
  SUCCESS = 0, ERROR = -1,
  log_info = function(fmt, ...) end,
  log_user = function(fmt, ...) messages[#messages + 1] = string.format(fmt, ...) end,
}
dofile(arg[1])
local f = assert(io.open(arg[2], "r")); local script = f:read("a"); f:close()
local job_desc = {
  script = script, comment = "nightly", min_nodes = 1, max_nodes = 1,
  tres_per_node = "gres/gpu:1", num_tasks = %d, name = "finetune", partition = "gpu",
}
local rc = slurm_job_submit(job_desc, {}, 1000)
print("rc=" .. rc)
print("min_nodes=" .. tostring(job_desc.min_nodes))
print("max_nodes=" .. tostring(job_desc.max_nodes))
print("tres_per_node=" .. tostring(job_desc.tres_per_node))
print("comment=" .. tostring(job_desc.comment))
print("message=" .. table.concat(messages, " | "))
local out = assert(io.open(arg[3], "w")); out:write(job_desc.script); out:close()
""".replace("%d", str(NO_VAL))


def job_script(spec: dict[str, Any] | None) -> str:
    line = f"#TRAINPLAN {json.dumps(spec)}\n" if spec is not None else ""
    return (
        "#!/bin/bash\n#SBATCH --job-name=finetune\n#SBATCH --nodes=1\n"
        f"{line}srun torchrun --nproc_per_node=$SLURM_GPUS_ON_NODE train.py\n"
    )


def submit(tmp_path: Path, script: str, **env: str) -> tuple[dict[str, str], str]:
    """Run the hook on a job with `script`; (what it printed, the job's script after it)."""
    driver, script_in, script_out = (tmp_path / n for n in ("driver.lua", "in.sh", "out.sh"))
    driver.write_text(DRIVER)
    script_in.write_text(script)
    run = subprocess.run(
        [LUA or "lua5.4", str(driver), str(HOOK), str(script_in), str(script_out)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert run.returncode == 0, run.stderr
    printed = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)
    return printed, script_out.read_text()


@pytest.fixture
def service(db_url: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Settings]]:
    """The service (keys required) and the hook's environment pointing at it."""
    settings = hook_settings(db_url, "slurm-secret")
    key = tmp_path / "trainplan.key"
    key.write_text("slurm-secret\n")
    with served(settings) as host:
        yield {"TRAINPLAN_URL": f"http://{host}", "TRAINPLAN_KEY_FILE": str(key)}, settings


def multi_node(small_spec: dict[str, Any]) -> dict[str, Any]:
    spec = deepcopy(small_spec)
    spec["training"]["world_size"] = 16
    spec["training"]["parallelism"] = {"strategy": "ddp", "gpus_per_node": 8}
    spec["training"]["global_batch_size"] = 4096
    return spec


def test_a_job_without_a_spec_is_untouched(service: Any, tmp_path: Path) -> None:
    env, _ = service
    printed, script = submit(tmp_path, job_script(None), **env)
    assert printed["rc"] == "0" and printed["min_nodes"] == "1" and printed["comment"] == "nightly"
    assert script == job_script(None)


def test_a_pending_plan_admits_unchanged_then_the_next_submit_gets_it(
    service: Any, tmp_path: Path, small_spec: dict[str, Any]
) -> None:
    env, settings = service
    spec = multi_node(small_spec)
    printed, script = submit(tmp_path, job_script(spec), **env)
    assert printed["rc"] == "0" and "not done yet" in printed["message"]
    assert printed["tres_per_node"] == "gres/gpu:1" and script == job_script(spec)
    denied, _ = submit(tmp_path, job_script(spec), **env, TRAINPLAN_ON_TIMEOUT="deny")
    assert denied["rc"] == "-1" and "not done yet" in denied["message"]
    run_queued_plan(settings)  # the one plan both submissions share
    printed, script = submit(tmp_path, job_script(spec), **env)
    assert printed["rc"] == "0" and printed["message"] == ""
    assert (printed["min_nodes"], printed["max_nodes"]) == ("2", "2")
    assert printed["tres_per_node"] == "gres/gpu:8"
    plan_id = printed["comment"].removeprefix("nightly trainplan-plan=")
    assert len(plan_id) == 36
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("export MICRO_BATCH_SIZE='")
    exported = dict(line[len("export ") :].split("=", 1) for line in lines[1:5])
    assert exported["TRAINPLAN_PLAN_ID"] == f"'{plan_id}'"
    # the exports run: bash sees the plan's numbers before the user's commands
    shown = subprocess.run(
        ["bash", "-c", "\n".join(lines[:5]) + '\necho "$GRAD_ACCUM_STEPS $LEARNING_RATE"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert int(shown[0]) >= 1 and float(shown[1]) > 0


def test_an_invalid_spec_is_rejected_naming_the_field(
    service: Any, tmp_path: Path, small_spec: dict[str, Any]
) -> None:
    env, _ = service
    bad = deepcopy(small_spec)
    bad["training"]["global_batch_size"] = -3
    printed, _ = submit(tmp_path, job_script(bad), **env)
    assert printed["rc"] == "-1"
    assert "#TRAINPLAN: training.global_batch_size" in printed["message"]


def test_a_service_that_does_not_answer_admits_or_denies_as_configured(
    tmp_path: Path, small_spec: dict[str, Any]
) -> None:
    env = {"TRAINPLAN_URL": "http://127.0.0.1:9", "TRAINPLAN_KEY_FILE": "/nonexistent"}
    printed, _ = submit(tmp_path, job_script(small_spec), **env)
    assert printed["rc"] == "0" and "trainplan did not answer" in printed["message"]
    printed, _ = submit(tmp_path, job_script(small_spec), **env, TRAINPLAN_ON_TIMEOUT="deny")
    assert printed["rc"] == "-1"


def test_a_wrong_key_is_not_an_answer(service: Any, tmp_path: Path, small_spec: Any) -> None:
    env, _ = service
    key = tmp_path / "wrong.key"
    key.write_text("nope\n")
    printed, _ = submit(tmp_path, job_script(small_spec), **env | {"TRAINPLAN_KEY_FILE": str(key)})
    assert printed["rc"] == "0"  # admitted unchanged, as when the service is away
    assert "trainplan did not answer" in printed["message"] and "401" in printed["message"]
