"""timm's published RTX 3090 training benchmarks as fidelity cases (issue 29).

.venv/bin/python -m bench.fidelity --timm [--every K] [--timm-dir PATH]

Each row of the calibration CSVs (`../shared/calibration/timm/`, README there: timm 0.6.6's
`benchmark.py --bench train`, AMP, RTX 3090 24GB, PyTorch 1.11/1.12, CUDA 11.3) becomes a case of
`bench/published.py`'s format, planned with the recipe the benchmark ran:
- `model.source: "timm"` with `fused_attn: false` (timm 0.6.6 computed `q @ k^T` explicitly);
  the model as today's timm defines it (a name today's timm lacks is skipped, and counted);
- 3 x img x img images (the row's `train_img_size`), 1000 classes, NCHW or channels_last as the
  file says; fp16 autocast; SGD with Nesterov momentum 0.9; cuDNN's defaults;
- the stack's defaults: zero_grad keeps gradients (torch < 2.0), the CUDA 11.3 context;
- the bracket: `train_batch_size` ran and the step before it in timm's decay sequence
  (`decay_batch_step`: 512, 384, 256, 192, 128, 96, 64, 48, 32, ...) ran out of memory (none
  when it is 512); the throughput at `train_batch_size`.
`--every K` takes every K-th row of each file (in the file's order, which is by throughput).
A model's family is its first word without digits (resnet, vit, convnext; tf_efficientnet_b0 is
efficientnet). Names timm has since renamed into pretrained tags are planned by their old name
(`timm.is_model` knows them; the architecture is the same).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "calibration" / "timm"
# file name -> (torch, cuda, layout)
FILE_STACK = re.compile(r"train-amp-(nchw|nhwc)-pt(\d)(\d+)-cu(\d+)(\d)-rtx3090\.csv")


def decay_sequence(start: int = 512) -> list[int]:
    """timm's `decay_batch_step(b, num_intra_steps=2)` from 512 down to 1."""
    from timm.utils.decay_batch import decay_batch_step  # the optional `vision` extra

    out, batch = [start], start
    while batch > 1:
        batch = decay_batch_step(batch)
        out.append(batch)
    return out


def bracket(ran: int) -> dict[str, int | None]:
    sequence = decay_sequence()
    index = sequence.index(ran)
    return {"fits": ran, "fails": sequence[index - 1] if index > 0 else None}


# Prefixes that name a weight source or a port rather than an architecture (tf_efficientnet_b0,
# gluon_resnet50_v1b, ssl_resnet18 ...): the family is the next word.
PREFIXES = {"tf", "gluon", "ssl", "swsl", "tv", "ig", "legacy"}


def family(model: str) -> str:
    words = model.split("_")
    word = words[1] if words[0] in PREFIXES and len(words) > 1 else words[0]
    return re.split(r"\d", word, maxsplit=1)[0] or word


def cases(folder: Path = DEFAULT_DIR, every: int = 1) -> tuple[list[dict[str, Any]], list[str]]:
    """(cases, names skipped because today's timm has no such model)."""
    import timm  # the optional `vision` extra

    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for path in sorted(folder.glob("train-amp-*-rtx3090.csv")):
        found = FILE_STACK.fullmatch(path.name)
        if found is None:
            continue
        layout, major, minor, cu_major, cu_minor = found.groups()
        stack = (f"{major}.{minor}", f"{cu_major}.{cu_minor}")
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        for row in rows[::every]:
            if not timm.is_model(row["model"]):
                skipped.append(f"{path.name}:{row['model']}")
                continue
            out.append(_case(path.name, row, layout, stack))
    return out, skipped


def _case(file: str, row: dict[str, str], layout: str, stack: tuple[str, str]) -> dict[str, Any]:
    ran, size = int(row["train_batch_size"]), int(row["train_img_size"])
    return {
        "id": f"{row['model']}@{layout}-pt{stack[0]}",
        "family": family(row["model"]),
        "source": f"timm calibration {file} row {row['model']}",
        "notes": f"PyTorch {stack[0]} / CUDA {stack[1]}",
        "measured": {
            "max_batch": bracket(ran),
            "throughput": {"samples_per_s": float(row["train_samples_per_sec"]), "batch": ran},
            "param_count_m": float(row["param_count"]),
        },
        "spec": {
            "model": {"source": "timm", "name": row["model"], "fused_attn": False},
            "data": {
                "kind": "image",
                "channels": 3,
                "height": size,
                "width": size,
                "num_classes": 1000,
                "num_samples": 1_281_167,
                "layout": "channels_last" if layout == "nhwc" else "channels_first",
            },
            "training": {
                "optimizer": "nesterov",
                "precision": "fp16-mixed",
                "global_batch_size": ran,
                "base_lr": 1e-4,
                "base_batch_size": ran,
            },
            "device": {"kind": "simulated", "gpu": "RTX-3090"},
            "search": {"headroom": 0.0, "micro_batch": "max"},
        },
    }
