"""examples/finetune.rs in PyTorch: EfficientNet-Lite0 (the efficientnet-lite-pytorch
package's, without drop-connect as wgcnn trains it) fine-tuned from its ImageNet weights on
the first N CIFAR-10 training images upscaled to --size, the head alone for the warm-up
epochs and then everything at a tenth of the rate (one SGD optimizer throughout: Nesterov
momentum 0.9, weight decay 5e-4 on the weights only, a cosine per phase), against the same
network from scratch; random resized crops (scale 0.35-1) and flips for training, a plain
antialiased resize for testing, inputs (x - 127) / 128.

    /work/venv/torch/bin/python benches/finetune_pytorch.py --data DIR \
        --weights target/weights/efficientnet-lite0-57934424.pth [--size 96] [--epochs 3]
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from efficientnet_lite_pytorch import EfficientNet
from torch.nn import functional as F

from cifar10_pytorch import load


def network(weights=None):
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=10, drop_connect_rate=0.0)
    if weights:
        state = torch.load(weights, map_location="cpu")
        missing = model.load_state_dict({k: v for k, v in state.items()
                                         if not k.startswith("_fc.")}, strict=False)
        assert set(missing.missing_keys) == {"_fc.weight", "_fc.bias"}, missing
    return model


def sgd(model, lr):
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def cosine(optimizer, lr, step, total):
    for group in optimizer.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def inputs(images):
    return (images.float() - 127.0) / 128.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-scratch", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = load(args.data)
    train_x = torch.from_numpy(train_x[:args.train_images].copy())
    train_y = torch.from_numpy(train_y[:args.train_images])
    test_x = TF.resize(torch.from_numpy(test_x[:args.test_images].copy()),
                       [args.size, args.size], antialias=True)
    test_y = torch.from_numpy(test_y[:args.test_images])
    augment = T.Compose([T.RandomResizedCrop(args.size, scale=(0.35, 1.0), antialias=True),
                         T.RandomHorizontalFlip()])
    steps = -(-len(train_x) // args.batch_size)

    def epoch(model, optimizer, lr, first_step, total):
        model.train()
        order = torch.randperm(len(train_x))
        for k, start in enumerate(range(0, len(order), args.batch_size)):
            idx = order[start:start + args.batch_size]
            x = inputs(torch.stack([augment(train_x[i]) for i in idx]))
            cosine(optimizer, lr, first_step + k, total)
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def accuracy(model):
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(inputs(test_x[i:i + 100])).argmax(1) == test_y[i:i + 100]).sum())
                       for i in range(0, len(test_y), 100))
        return hits / len(test_y)

    results = {}
    model = network(args.weights)
    optimizer = sgd(model, args.lr)
    start, tuned = time.perf_counter(), []
    warmup = min(args.warmup_epochs, args.epochs)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model._fc.parameters():
        p.requires_grad_(True)
    for e in range(warmup):
        epoch(model, optimizer, args.lr, e * steps, warmup * steps)
        tuned.append(accuracy(model))
        print(f"fine-tuning epoch {e + 1} (head only): test accuracy {100 * tuned[-1]:.2f}%",
              flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    rest = args.epochs - warmup
    for e in range(rest):
        epoch(model, optimizer, args.lr / 10, e * steps, rest * steps)
        tuned.append(accuracy(model))
        print(f"fine-tuning epoch {warmup + e + 1} (all layers): test accuracy "
              f"{100 * tuned[-1]:.2f}%", flush=True)
    results["finetuned_test_accuracy"] = [round(a, 4) for a in tuned]
    results["finetune_seconds"] = round(time.perf_counter() - start, 1)
    if not args.no_scratch:
        model = network()
        optimizer = sgd(model, args.lr)
        start, scratch = time.perf_counter(), []
        for e in range(args.epochs):
            epoch(model, optimizer, args.lr, e * steps, args.epochs * steps)
            scratch.append(accuracy(model))
            print(f"from scratch epoch {e + 1}: test accuracy {100 * scratch[-1]:.2f}%", flush=True)
        results["scratch_test_accuracy"] = [round(a, 4) for a in scratch]
        results["scratch_seconds"] = round(time.perf_counter() - start, 1)
    results.update(size=args.size, train_images=len(train_x), test_images=len(test_y),
                   threads=args.threads, torch=torch.__version__)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
