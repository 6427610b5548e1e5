"""The recipe as Python source (`configs.recipe`): the plan's schedule function, its per-group
learning rates and the scheduler factories, which the PyTorch loop inlines and Lightning, the HF
Trainer and DeepSpeed fall back to where their own settings cannot say the same.

Only trainplan's own text and numbers go into it (validated floats, ints and name prefixes).
"""

from __future__ import annotations

from workers.engine.schedule import IMPORTS, LINEAR_START, SOURCE, Schedule

PARAM_GROUPS_SOURCE = '''
def param_groups(model, lr=LR):
    """The optimizer's groups: the first PARAM_GROUPS prefix a parameter's name starts with sets
    its rate (x lr); the rest train at lr. Frozen parameters are left out."""
    groups = [{"params": [], "lr": lr * scale} for _, scale in PARAM_GROUPS]
    rest = {"params": [], "lr": lr}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.removeprefix("module.")  # DistributedDataParallel's wrapper
        index = next((i for i, (p, _) in enumerate(PARAM_GROUPS) if name.startswith(p)), None)
        (rest if index is None else groups[index])["params"].append(param)
    return [g for g in (*groups, rest) if g["params"]]
'''


def recipe_source(schedule: Schedule, learning_rate: float, groups: list[tuple[str, float]]) -> str:
    lines = [
        "# trainplan's learning-rate recipe: the plan's learning rates come from these functions.",
        IMPORTS + "import torch",
        "",
        f"LR = {learning_rate!r}",
        f"SCHEDULE = {schedule.table!r}",
        f"PARAM_GROUPS = {groups!r}",
        "",
        "",
        SOURCE.rstrip(),
        "",
        PARAM_GROUPS_SOURCE.rstrip(),
        "",
        "",
        *_make_scheduler(schedule),
    ]
    if schedule.name == "plateau":
        lines += ["", "", *_make_plateau(schedule)]
    return "\n".join(lines) + "\n"


def _make_scheduler(schedule: Schedule) -> list[str]:
    """Stepped once per optimizer step, after `optimizer.step()`."""
    head = ["def make_scheduler(optimizer):"]
    if schedule.name == "one_cycle":
        p = schedule.params
        return [
            *head,
            "    # PyTorch's OneCycleLR: the rates of lr_factor, and it also cycles momentum",
            "    return torch.optim.lr_scheduler.OneCycleLR(",
            "        optimizer,",
            '        max_lr=[group["lr"] for group in optimizer.param_groups],',
            f"        total_steps={schedule.total},",
            f"        pct_start={p['pct_start']!r},",
            f"        div_factor={p['div_factor']!r},",
            f"        final_div_factor={p['final_div_factor']!r},",
            "    )",
        ]
    if schedule.name == "plateau" and not schedule.warmup:
        return [
            *head,
            "    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)",
        ]
    if schedule.name == "plateau":
        # chainable: after its last step it leaves the rate to ReduceLROnPlateau's cuts
        return [
            *head,
            "    # warm-up only (from 1e-10 x: lr_factor's 0 within 1e-10); cuts: make_plateau",
            "    return torch.optim.lr_scheduler.LinearLR(",
            f"        optimizer, start_factor={LINEAR_START!r}, total_iters={schedule.warmup}",
            "    )",
        ]
    return [
        *head,
        "    return torch.optim.lr_scheduler.LambdaLR(",
        "        optimizer, lambda step: lr_factor(step, SCHEDULE)",
        "    )",
    ]


def _make_plateau(schedule: Schedule) -> list[str]:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in schedule.plateau_kwargs.items())
    return [
        "def make_plateau(optimizer):",
        f"    # stepped once per epoch with the validation {schedule.params['monitor']!r}",
        f"    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, {kwargs})",
    ]
