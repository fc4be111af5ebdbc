"""PyTorch's Adam while layers are frozen, unfrozen and replaced: the state (moments and its
own step count) follows each parameter. Writes tests/golden/freeze_replace_adam.json.

    /work/venv/torch/bin/python tests/golden/make_optimizer_freeze_golden.py

Model: fc1 = Linear(4, 3) + ReLU, fc2 = Linear(3, 2); cross-entropy on 5 fixed rows; Adam(lr
0.1). Steps: 1 all; freeze fc1 (requires_grad False: no gradient, Adam skips it); 2; 3;
unfreeze fc1; 4 (fc1's second Adam step, fc2's fourth); replace fc2 by a new Linear(3, 2)
with given weights, added to the optimizer as a new parameter group (fresh state); 5.
After each step every parameter is recorded.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "freeze_replace_adam.json"


def values(shape, seed):
    n = math.prod(shape)
    return torch.tensor([math.sin(0.7 * i + seed) * 0.5 for i in range(n)],
                        dtype=torch.float32).reshape(shape)


def stored(t):
    """A tensor as the tests' golden reader takes it."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return {"shape": list(t.shape), "data": t.flatten().tolist()}


def main():
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    init = {"fc1.weight": values([3, 4], 1), "fc1.bias": values([3], 2),
            "fc2.weight": values([2, 3], 3), "fc2.bias": values([2], 4)}
    new_head = {"fc2.weight": values([2, 3], 5), "fc2.bias": values([2], 6)}
    with torch.no_grad():
        fc1.weight.copy_(init["fc1.weight"]); fc1.bias.copy_(init["fc1.bias"])
        fc2.weight.copy_(init["fc2.weight"]); fc2.bias.copy_(init["fc2.bias"])
    x = values([5, 4], 7) * 4
    labels = torch.tensor([0, 1, 1, 0, 1])
    opt = torch.optim.Adam(list(fc1.parameters()) + list(fc2.parameters()), lr=0.1)
    heads = {"fc2": fc2}
    after = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(heads["fc2"](F.relu(fc1(x))), labels)
        loss.backward()
        opt.step()
        after.append({"fc1.weight": stored(fc1.weight), "fc1.bias": stored(fc1.bias),
                      "fc2.weight": stored(heads["fc2"].weight),
                      "fc2.bias": stored(heads["fc2"].bias), "loss": loss.item()})

    step()
    for p in fc1.parameters():
        p.requires_grad_(False)
    step()
    step()
    for p in fc1.parameters():
        p.requires_grad_(True)
    step()
    replacement = torch.nn.Linear(3, 2)
    with torch.no_grad():
        replacement.weight.copy_(new_head["fc2.weight"]); replacement.bias.copy_(new_head["fc2.bias"])
    heads["fc2"] = replacement
    opt.add_param_group({"params": list(replacement.parameters())})
    step()
    golden = {
        "made_by": "tests/golden/make_optimizer_freeze_golden.py",
        "torch": torch.__version__,
        "x": stored(x), "labels": labels.tolist(), "lr": 0.1,
        "init": {k: stored(v) for k, v in init.items()},
        "new_head": {k: stored(v) for k, v in new_head.items()},
        "after": after,
    }
    OUT.write_text(json.dumps(golden) + "\n")
    print(OUT, [round(a["loss"], 5) for a in after])


if __name__ == "__main__":
    main()
