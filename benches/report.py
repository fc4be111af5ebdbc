"""The performance table of benches/README.md from one run of each side:

    cargo run --release --example perf -- --json --runs 5 > target/perf.json
    python3 benches/pytorch_peer.py --threads 1 --runs 5 > target/peer.json
    python3 benches/report.py target/perf.json target/peer.json

Prints a markdown table: per row of perf, the kernel, the GPU and CPU-reference medians, the
GPU's GFLOP/s, PyTorch's median for the same shape, and the GPU / PyTorch ratio.
"""

import json
import sys


def rows(path):
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                yield json.loads(line)


def key(op, shape):
    """perf writes `conv2d fwd`, 6→16; pytorch_peer `conv2d_fwd`, 6->16."""
    return op.replace(" ", "_").split("_(")[0], shape.replace("→", "->")


def fmt(v):
    """Three significant digits; empty for a column not measured (`perf --no-cpu`)."""
    if v is None:
        return ""
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def main():
    perf, peer = sys.argv[1], sys.argv[2]
    torch = {key(r["op"], r["shape"]): r["torch_ms"] for r in rows(peer)}
    print("| op | shape | kernel | GPU ms | GFLOP/s | CPU reference ms | PyTorch ms | GPU / PyTorch |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows(perf):
        if "op" not in r:
            continue
        t = torch.get(key(r["op"], r["shape"]))
        ratio = fmt(r["gpu_ms"] / t) if t else ""
        print(f"| {r['op']} | {r['shape']} | {r['kernel']} | {fmt(r['gpu_ms'])} | "
              f"{r['gpu_gflops']:.1f} | {fmt(r['cpu_ms'])} | {fmt(t) if t else ''} | {ratio} |")


if __name__ == "__main__":
    main()
