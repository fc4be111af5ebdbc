"""PyTorch's training-loop pieces on fixed inputs: cross-entropy with label smoothing (loss
and logit gradient), clip_grad_norm_ (the norm and the clipped gradients), parameter groups
(SGD with Nesterov momentum and no weight decay on vectors; Adam with a head at ten times
the rate) over four steps of given gradients and rates, and top-1/top-5 counts. Writes
tests/golden/training_pieces.json.

    /work/venv/torch/bin/python tests/golden/make_training_golden.py
"""

import json
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "training_pieces.json"


def tensor(t):
    return {"shape": list(t.shape), "data": [float(v) for v in t.detach().reshape(-1)]}


def label_smoothing(gen):
    cases = []
    for n, k, eps in [(5, 10, 0.1), (3, 7, 0.35), (4, 10, 0.0), (2, 3, 1.0)]:
        logits = (torch.randn(n, k, generator=gen) * 3).requires_grad_()
        labels = torch.randint(0, k, (n,), generator=gen)
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=eps)
        loss.backward()
        cases.append({"smoothing": eps, "logits": tensor(logits), "labels": labels.tolist(),
                      "loss": float(loss.detach()), "grad": tensor(logits.grad)})
    return cases


def clipping(gen):
    cases = []
    for max_norm in [1.0, 100.0]:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (5,), (2, 2, 3)]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 2
        before = [tensor(p.grad) for p in params]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        cases.append({"max_norm": max_norm, "grads": before, "norm": float(norm),
                      "clipped": [tensor(p.grad) for p in params]})
    return cases


SHAPES = {"conv1.weight": (4, 3, 2, 2), "bn1.weight": (4,), "bn1.bias": (4,),
          "fc.weight": (10, 8), "fc.bias": (10,)}


def groups(gen, name, make, split, lr_factors):
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}
    initial = {n: tensor(p) for n, p in params.items()}
    first, rest = split(params)
    optimizer = make(first, rest)
    bases = [g["lr"] for g in optimizer.param_groups]
    grads, after = [], []
    for factor in lr_factors:
        for g, base in zip(optimizer.param_groups, bases):
            g["lr"] = base * factor
        step = {}
        for n, p in params.items():
            p.grad = torch.randn(p.shape, generator=gen)
            step[n] = tensor(p.grad)
        grads.append(step)
        optimizer.step()
        after.append({n: tensor(p) for n, p in params.items()})
    return {"name": name, "initial": initial, "lr_factors": lr_factors, "grads": grads,
            "after": after}


def main():
    gen = torch.Generator().manual_seed(2024)
    sgd = groups(
        gen, "sgd_nesterov_no_decay_on_vectors",
        lambda vec, rest: torch.optim.SGD(
            [{"params": vec, "weight_decay": 0.0}, {"params": rest}],
            lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-2),
        lambda ps: ([p for p in ps.values() if p.ndim <= 1],
                    [p for p in ps.values() if p.ndim > 1]),
        [1.0, 0.8, 0.5, 0.2])
    adam = groups(
        gen, "adam_head_at_ten_times",
        lambda head, rest: torch.optim.Adam(
            [{"params": head, "lr": 1e-2}, {"params": rest}], lr=1e-3, weight_decay=1e-2),
        lambda ps: ([p for n, p in ps.items() if n.startswith("fc.")],
                    [p for n, p in ps.items() if not n.startswith("fc.")]),
        [1.0, 1.0, 0.5, 0.5])
    logits = torch.randn(40, 10, generator=gen)
    labels = torch.randint(0, 10, (40,), generator=gen)
    top = logits.topk(5, dim=1).indices
    topk = {"logits": tensor(logits), "labels": labels.tolist(),
            "top1": int((top[:, 0] == labels).sum()),
            "top5": int((top == labels[:, None]).any(dim=1).sum())}
    golden = {"torch": torch.__version__, "label_smoothing": label_smoothing(gen),
              "clip_grad_norm": clipping(gen), "param_groups": [sgd, adam], "topk": topk}
    OUT.write_text(json.dumps(golden) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
