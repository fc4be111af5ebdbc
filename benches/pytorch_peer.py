"""PyTorch timings of the shapes in examples/perf.rs, for the README's comparison.

    python3 benches/pytorch_peer.py [--threads 1] [--runs 9] [--device cpu|cuda]

Prints one JSON line per row with the keys of `perf --json` that apply: op, shape, torch_ms
(median of --runs after a warm-up; on CUDA each run ends with a synchronize, as perf's
GPU runs end with a wait for the device). Run it right after `perf` on the same host.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


DEVICE = torch.device("cpu")


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_ms(fn, runs):
    fn()
    synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def rand(*shape, grad=False):
    return (torch.rand(*shape, device=DEVICE) * 2 - 1).requires_grad_(grad)


def rows():
    for m, k, n in [(256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048),
                    (4096, 150, 16), (25088, 576, 64)]:
        a, b = rand(m, k), rand(k, n)
        yield "matmul", f"{m}x{k}x{n}", lambda a=a, b=b: a @ b

    for n, c, h, o, k, pad, g, s in [(64, 1, 28, 6, 5, 0, 1, 1), (64, 6, 12, 16, 5, 0, 1, 1),
                                     (8, 64, 56, 64, 3, 1, 1, 1), (8, 64, 56, 64, 3, 1, 64, 1),
                                     (8, 64, 56, 64, 3, 1, 2, 1), (8, 128, 28, 128, 3, 1, 32, 1),
                                     (8, 64, 56, 64, 1, 0, 1, 1), (8, 3, 224, 64, 7, 3, 1, 2),
                                     (8, 64, 56, 128, 3, 1, 1, 2)]:
        x, w, b = rand(n, c, h, h, grad=True), rand(o, c // g, k, k, grad=True), rand(o, grad=True)
        dy = rand(*F.conv2d(x, w, b, stride=s, padding=pad, groups=g).shape)
        label = (f"N{n} {c}->{o} {h}x{h} k{k} p{pad}" + (f" s{s}" if s > 1 else "")
                 + ("" if g == 1 else " depthwise" if g == c else f" groups{g}"))
        yield "conv2d_fwd", label, lambda x=x, w=w, b=b, pad=pad, g=g, s=s: F.conv2d(
            x.detach(), w.detach(), b.detach(), stride=s, padding=pad, groups=g)
        yield "conv2d_fwd_bwd", label, lambda x=x, w=w, b=b, pad=pad, g=g, s=s, dy=dy: torch.autograd.grad(
            F.conv2d(x, w, b, stride=s, padding=pad, groups=g), (x, w, b), dy)

    for name, pool in [("max_pool2d", F.max_pool2d), ("avg_pool2d", F.avg_pool2d)]:
        x = rand(64, 6, 24, 24, grad=True)
        dy = rand(64, 6, 12, 12)
        yield f"{name}_fwd", "N64 C6 24x24 2x2", lambda x=x, pool=pool: pool(x.detach(), 2)
        yield f"{name}_fwd_bwd", "N64 C6 24x24 2x2", lambda x=x, pool=pool, dy=dy: torch.autograd.grad(pool(x, 2), x, dy)

    x = rand(8, 64, 56, 56, grad=True)
    g = torch.ones(64, device=DEVICE, requires_grad=True)
    b = torch.zeros(64, device=DEVICE, requires_grad=True)
    dy = rand(8, 64, 56, 56)
    mean, var = torch.zeros(64, device=DEVICE), torch.ones(64, device=DEVICE)
    bn = lambda x: F.batch_norm(x, mean, var, g, b, training=True)
    yield "batch_norm2d_fwd", "N8 C64 56x56", lambda: bn(x.detach())
    yield "batch_norm2d_fwd_bwd", "N8 C64 56x56", lambda: torch.autograd.grad(bn(x), (x, g, b), dy)

    x = rand(8, 64, 28, 28, grad=True)
    g, b = rand(64, 28, 28, grad=True), rand(64, 28, 28, grad=True)
    dy = rand(8, 64, 28, 28)
    ln = lambda x: F.layer_norm(x, (64, 28, 28), g, b)
    yield "layer_norm_fwd", "N8 C64 28x28", lambda: ln(x.detach())
    yield "layer_norm_fwd_bwd", "N8 C64 28x28", lambda: torch.autograd.grad(ln(x), (x, g, b), dy)

    for rows_, classes in [(64, 10), (64, 1000), (1024, 1000)]:
        logits = rand(rows_, classes, grad=True)
        labels = torch.tensor([(i * 7) % classes for i in range(rows_)], device=DEVICE)
        yield "softmax_cross_entropy_fwd_bwd", f"N{rows_} K{classes}", lambda l=logits, t=labels: torch.autograd.grad(
            F.cross_entropy(l, t), l)

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(256, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
        torch.nn.Linear(84, 10)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = rand(64, 1, 28, 28)
    labels = torch.tensor([i % 10 for i in range(64)], device=DEVICE)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    yield "train_step_lenet_b64", "N64 1x28x28", step

    # Real networks (torchvision, and efficientnet-lite-pytorch when installed).
    import torchvision
    nets = [("resnet18_inference", torchvision.models.resnet18())]
    try:
        from efficientnet_lite_pytorch import EfficientNet
        nets.append(("efficientnet_lite0_inference", EfficientNet.from_name("efficientnet-lite0")))
    except ImportError:
        pass
    for op, net in nets:
        net.eval().to(DEVICE)
        for n in (1, 8):
            x = rand(n, 3, 224, 224)

            def infer(net=net, x=x):
                with torch.no_grad():
                    net(x)

            yield op, f"N{n} 3x224x224", infer

    net = torchvision.models.resnext50_32x4d().eval().to(DEVICE)
    x = rand(1, 3, 224, 224)

    def infer_resnext(net=net, x=x):
        with torch.no_grad():
            net(x)

    yield "resnext50_32x4d_inference", "N1 3x224x224", infer_resnext

    if len(nets) > 1:
        yield ("train_step_efficientnet_lite0_b8", "N8 3x224x224",
               sgd_step(nets[1][1].train(), rand(8, 3, 224, 224)))
    yield ("train_step_resnet20_b128", "N128 3x32x32",
           sgd_step(cifar_resnet20().to(DEVICE), rand(128, 3, 32, 32)))


def sgd_step(net, x):
    """One training step of `net` on the batch `x` (labels i % 10, SGD with momentum), as
    perf's model rows take it."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    labels = torch.tensor([i % 10 for i in range(x.shape[0])], device=DEVICE)

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), labels).backward()
        opt.step()

    return step


def cifar_resnet20():
    """ResNet-20 for CIFAR as wgcnn::models::resnet20 builds it (option-B shortcuts)."""
    from torchvision.models.resnet import BasicBlock

    def stage(c_in, c_out, stride):
        down = None
        if stride != 1 or c_in != c_out:
            down = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       torch.nn.BatchNorm2d(c_out))
        blocks = [BasicBlock(c_in, c_out, stride, down)]
        blocks += [BasicBlock(c_out, c_out) for _ in range(2)]
        return blocks

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        *stage(16, 16, 1), *stage(16, 32, 2), *stage(32, 64, 2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).train()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU peer")
    parser.add_argument("--filter", default="", help="only the rows whose op contains this")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    # wgcnn computes in fp32: keep cuDNN's convolutions off TF32 (its default) to compare alike.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for op, shape, fn in rows():
        if args.filter not in op:
            continue
        ms = median_ms(fn, args.runs)
        print(json.dumps({"op": op, "shape": shape, "torch_ms": round(ms, 4),
                          "threads": args.threads, "device": args.device,
                          "torch": torch.__version__}))


if __name__ == "__main__":
    main()
