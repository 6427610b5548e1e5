"""A/B of two checkouts on one `bench.depth_fold` case: each plan in its own process, the trees
alternating, so both see the same machine state. Prints wall seconds per run, traced steps, and
whether the two plans are the same (`bench.depth_fold.same_plan`; a change that moves the time
model differs in `throughput` only: compare the trials then).

.venv/bin/python -m bench.trees_ab --before /tmp/wt-before [--after .] [--case 8b-fsdp-auto]
    [--rounds 2]   (make the other tree with `git worktree add /tmp/wt-before <commit>`)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.depth_fold import same_plan
from bench.machine import header


def run(tree: str, case: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, "-m", "bench.depth_fold", "--one", case, "--out", out, "--fold"]
    subprocess.run(command, cwd=tree, check=True, stderr=subprocess.DEVNULL)
    data = json.loads(Path(out).read_text())
    Path(out).unlink()
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--case", default="8b-fsdp-auto")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(header())
    trees = {"before": args.before, "after": args.after}
    walls: dict[str, list[float]] = {name: [] for name in trees}
    plans = {}
    for index in range(args.rounds):
        for name, tree in trees.items():
            data = run(tree, args.case)
            walls[name].append(data["wall_s"])
            plans[name] = data["plan"]
            traced = data["plan"]["traced_steps"]
            print(f"{name} round {index}: {data['wall_s']:.1f} s, {traced} traced")
    before, after = (statistics.median(walls[n]) for n in trees)
    trials = [
        [(t["batch_size"], t["fits"], t["peak_bytes"]) for t in plans[n]["trials"]] for n in trees
    ]
    print(
        f"{args.case}: median {before:.1f} s before, {after:.1f} s after ({before / after:.2f}x); "
        f"same plan: {same_plan(plans['before'], plans['after'])}; "
        f"same trials: {trials[0] == trials[1]}"
    )


if __name__ == "__main__":
    main()
