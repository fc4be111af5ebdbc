"""PyTorch's learning-rate schedulers, step by step: the rate and the momentum in the
optimizer (SGD, momentum 0.9) after construction and after each scheduler.step(). Writes
tests/golden/lr_schedules.json.

    /work/venv/torch/bin/python tests/golden/make_schedule_golden.py
"""

import json
from pathlib import Path

import torch
from torch.optim import lr_scheduler as s

OUT = Path(__file__).resolve().parent / "lr_schedules.json"

CASES = {
    "step": (0.1, 12, lambda o: s.StepLR(o, step_size=3, gamma=0.5)),
    "multistep": (0.1, 12, lambda o: s.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.1)),
    "cosine": (0.1, 25, lambda o: s.CosineAnnealingLR(o, T_max=10, eta_min=0.001)),
    "linear": (0.1, 10, lambda o: s.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=5)),
    "one_cycle_defaults": (0.1, 20, lambda o: s.OneCycleLR(o, max_lr=0.2, total_steps=20)),
    "one_cycle_options": (0.1, 37, lambda o: s.OneCycleLR(
        o, max_lr=0.05, total_steps=37, pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
        base_momentum=0.8, max_momentum=0.92)),
    "one_cycle_fixed_momentum": (0.1, 15, lambda o: s.OneCycleLR(
        o, max_lr=0.3, total_steps=15, cycle_momentum=False)),
    "warmup_cosine": (0.1, 16, lambda o: s.SequentialLR(
        o, [s.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=4),
            s.CosineAnnealingLR(o, T_max=10)], milestones=[4])),
}


def rates(base, steps, make):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base, momentum=0.9)
    scheduler = make(optimizer)
    group = optimizer.param_groups[0]
    lrs, momentums = [group["lr"]], [group["momentum"]]
    for _ in range(steps - 1):
        optimizer.step()
        scheduler.step()
        lrs.append(group["lr"])
        momentums.append(group["momentum"])
    return lrs, momentums


def main():
    cases = {}
    for name, (base, steps, make) in CASES.items():
        lrs, momentums = rates(base, steps, make)
        cases[name] = {"base_lr": base, "lrs": lrs, "momentums": momentums}
    OUT.write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
