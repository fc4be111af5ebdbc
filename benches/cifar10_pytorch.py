"""The recipe of examples/cifar10.rs in PyTorch, for the side-by-side in README: ResNet-20
(option-B shortcuts, as wgcnn's models::resnet20: torchvision's names and layers), He-uniform
initial weights (wgcnn's default `Init::He`: bound sqrt(6/fan_in), biases zero), SGD with
Nesterov momentum 0.9 and weight decay 5e-4 on the weights only, OneCycleLR (or cosine)
stepped per batch, batch 128, random crops of the 4-pixel-padded image and horizontal flips,
CIFAR-10's mean/std. Prints a line per epoch and, with --json, one JSON line at the end.

    /work/venv/torch/bin/python benches/cifar10_pytorch.py --data DIR [--epochs 1]
        [--threads 2] [--schedule one-cycle|cosine] [--train-limit N] [--json]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)


def load(directory):
    """CIFAR-10's binary files: (train images, labels), (test images, labels), uint8 NCHW."""
    root = Path(directory)
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"

    def read(names):
        raw = np.concatenate([np.fromfile(root / n, dtype=np.uint8) for n in names])
        records = raw.reshape(-1, 3073)
        return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)

    return read([f"data_batch_{i}.bin" for i in range(1, 6)]), read(["test_batch.bin"])


class Block(nn.Module):
    def __init__(self, c_in, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or c_in != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet20(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, c_in = [], 16
        for planes, stride in [(16, 1), (32, 2), (64, 2)]:
            layers.append(nn.Sequential(*[Block(c_in if i == 0 else planes, planes,
                                                stride if i == 0 else 1) for i in range(3)]))
            c_in = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def augment(images, rng):
    """Random 32x32 crops of the zero-padded (4 px) images, each flipped with p = 0.5."""
    n = len(images)
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    tops, lefts = rng.integers(0, 9, n), rng.integers(0, 9, n)
    out = np.stack([padded[i, :, t:t + 32, l:l + 32] for i, (t, l) in enumerate(zip(tops, lefts))])
    flips = rng.random(n) < 0.5
    out[flips] = out[flips, :, :, ::-1]
    return out


def to_input(images):
    return torch.from_numpy((images.astype(np.float32) / 255.0 - MEAN) / STD)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--schedule", choices=["one-cycle", "cosine"], default="one-cycle")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    (train_x, train_y), (test_x, test_y) = load(args.data)
    if args.train_limit:
        train_x, train_y = train_x[:args.train_limit], train_y[:args.train_limit]
    model = ResNet20()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(train_x) // args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.schedule == "one-cycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                        total_steps=total)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    test_inputs = to_input(test_x)
    curve, seconds = [], []
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        order = rng.permutation(len(train_x))
        loss_sum, correct = 0.0, 0
        for first in range(0, len(order), args.batch_size):
            idx = order[first:first + args.batch_size]
            x, y = to_input(augment(train_x[idx], rng)), torch.from_numpy(train_y[idx])
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        seconds.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(test_inputs[i:i + 500]).argmax(1)
                            == torch.from_numpy(test_y[i:i + 500])).sum())
                       for i in range(0, len(test_y), 500))
        curve.append(hits / len(test_y))
        line = (f"epoch {epoch + 1}: train loss {loss_sum / len(order):.4f} accuracy "
                f"{100 * correct / len(order):.2f}%, test accuracy {100 * curve[-1]:.2f}%, "
                f"{seconds[-1]:.1f} s ({len(order) / seconds[-1]:.0f} images/s)")
        print(line, flush=True)
    if args.json:
        mean = sum(seconds) / len(seconds)
        print(json.dumps({"epochs": args.epochs, "test_accuracy": round(curve[-1], 4),
                          "test_accuracy_per_epoch": [round(a, 4) for a in curve],
                          "epoch_seconds": round(mean, 2),
                          "train_images_per_sec": round(len(train_x) / mean, 1),
                          "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
