"""Whole-model PyTorch goldens (forward logits, BN statistics, one ResNet-20 training step)
for checking wgcnn's model definitions against PyTorch WITHOUT shipping any weights: every
parameter comes from a closed-form, seed-free formula (below) that the Rust test
re-implements exactly.

How to run (from the repository root; CPU only, single thread, about a minute):

    /work/venv/torch/bin/python tests/golden/make_models_golden.py
    /work/venv/torch/bin/python tests/golden/make_models_golden.py --describe   # print module trees

Made with torch 2.15.0, torchvision 0.29.2, efficientnet-lite-pytorch 0.1.0, numpy 2.4.6,
safetensors 0.8.0 (the versions in use are also written into param_counts.json).
resnext50_32x4d was added later (5 December 2026): a run on another host moved the other
models' float32 values (logits, BN statistics) in their last bits, so only its own files and
entries were taken from that run.

Models (all num_classes=10, input 32x32, float32, CPU):
    resnet18, resnet34, resnet50, resnext50_32x4d, mobilenet_v2
                           torchvision.models definitions
    resnet20, resnet56     CIFAR ResNets (He et al. 2016), defined below with torchvision's
                           BasicBlock: conv1 3x3/1 (no bias) + bn1 + relu, no max pool,
                           layer1/2/3 of n = 3 resp. 9 BasicBlocks with 16/32/64 channels,
                           "option B" shortcut layer{2,3}.0.downsample.{0: conv1x1 stride 2 no
                           bias, 1: BatchNorm2d}, adaptive avg pool 1x1, fc Linear(64, 10)
    efficientnet_lite0     efficientnet_lite_pytorch.EfficientNet.from_name(
                           'efficientnet-lite0', num_classes=10) (static "same" padding
                           computed for image_size 224, see --describe)

Files written to tests/golden/models/:
    <model>.safetensors            input      f32 [2,3,32,32]  formula("input"), unscaled
                                   logits     f32 [2,10]       eval mode, float32 run
                                   logits_f64 f64 [2,10]       same weights/stats/input cast
                                                               to float64, float64 run
    <model>_bn_stats.safetensors   every BN's <bn>.running_mean, <bn>.running_var (f32) and
                                   <bn>.num_batches_tracked (i64, shape [] as in the
                                   state_dict, = 4), state_dict names (separate file)
    resnet20_train_step.safetensors  one SGD step of resnet20, see below
    resnet20_train_step_f64_gap.json float32-vs-float64 gap of every stored train-step tensor
    param_counts.json              sum(p.numel() for p in model.parameters()); torchvision
                                   models and efficientnet-lite0 with num_classes=1000
                                   (default), resnet20/56 with 10; plus versions
    weights_check.json             per model, every state_dict entry in order:
                                   name, shape, dtype, kind, first 4 values, f64 sum of the
                                   f32 values (checks both the Rust formula and the Rust
                                   module names/shapes without torch)
    forward_report.json            per model: f32-vs-f64 logit gap, pre-activation values
                                   near a kink, activation-mask disagreements f32 vs f64

WEIGHT FORMULA (Rust must copy this exactly; all arithmetic IEEE float64, no FMA):

    FREQ  = 0.7548776662466927
    fnv1a_32(bytes): h = 2166136261; for b in bytes: h = ((h ^ b) * 16777619) mod 2**32
    h     = fnv1a_32(name.encode("utf-8"))          # name = the state_dict key
    phase = ((h % 100003) as f64 / 100003.0) * (2.0 * PI)      # PI = 3.141592653589793
    s[i]  = sin(FREQ * (i as f64) + phase)          # i = row-major element index, 0..n
    value by tensor (then cast f64 -> f32, round to nearest):
      ndim >= 2 (conv / linear weight):  s[i] * sqrt(3.0 / fan_in),
                                         fan_in = prod(shape[1:]) (depthwise: 1*kh*kw)
      ndim == 1, name ends ".weight"  (only BatchNorm gammas in these models):
                                         1.0 + 0.25 * s[i]
      ndim == 1, name ends ".bias"    (conv/linear bias and BatchNorm beta alike):
                                         0.1 * s[i]
    running_mean / running_var / num_batches_tracked: NOT from the formula, see below.
    Data tensors use the same s[i] with a fixed name:
      "input"           [2,3,32,32]  s[i]                    (values in [-1, 1])
      "calibration.{k}" [8,3,32,32]  s[i] * sqrt(2.0)        (k = 0..3; unit variance)
      "train_input.{k}" [2,3,32,32]  s[i]                   (the first k whose pass keeps
                                                            every pre-activation 1e-5 from
                                                            its kink, see below)
    (cast to f32; the float64 runs use these f32 values cast back to f64).

    Check values (resnet18, linear formula, printed by this script; also "first4" in
    weights_check.json for every tensor of every model):
      fnv1a_32("conv1.weight") = 3184444564, phase = 3.0808674893508297
      conv1.weight[0:4] = 0.008669693022966385, -0.09139060974121094,
                          -0.14179937541484833, -0.11517006903886795
      fnv1a_32("fc.weight") = 1248825632, phase = 5.5397811237596
      fc.weight[0:4]    = -0.05180654674768448, 0.0008782363147474825,
                          0.05308588221669197, 0.07645253837108612

    CAVEAT of the linear formula (the first one specified; kept as `--formula linear`): sin(FREQ*(o*K + j) + phase)
    = sin(FREQ*o*K + phase) cos(FREQ*j) + cos(FREQ*o*K + phase) sin(FREQ*j), so every weight
    matrix [out, fan_in] has rank exactly 2 (singular values e.g. 96, 96, 4e-11, ...), and
    the input is a plane wave of the same frequency. The networks are then badly conditioned:
    float32 vs float64 logits differ by up to 2.9e-2 (relative to max |logit|, resnet50),
    the resnet20 train step's grad.conv1.weight by 3.8e-2 (see forward_report.json and
    resnet20_train_step_f64_gap.json). `--formula quadratic` uses x = i*i instead of i
    (s[i] = sin(FREQ * ((i as f64) * (i as f64)) + phase), i*i exact in f64): full-rank
    weights, worst logits gap 5.6e-5 (resnet50), worst train-step gap 3.8e-6 (2.8e-6 with
    the earlier batch-8 input), no mask flips. (The linear-formula figures are from before
    the train step's input search, which may find no input under that formula.)
    The formula used is recorded as "formula" in every JSON file written.

BN running statistics: every BatchNorm gets momentum=None (cumulative average),
reset_running_stats(), then the model runs in train mode under no_grad on the 4 calibration
batches, so running_mean / running_var are the exact averages of the 4 batch means /
unbiased batch variances and num_batches_tracked = 4; the original momenta are restored
(torchvision 0.1; efficientnet-lite 1-0.99 = 0.010000000000000009, eps 1e-3).
EfficientNet's drop-connect (random in train mode) is switched off during calibration.

resnet20_train_step.safetensors (start: the resnet20 weights + resnet20_bn_stats above,
BN momentum 0.1, model.train()):
    input          f32 [2,3,32,32]   formula("train_input.k"), k the first whose float64
                                     train-mode forward pass has no pre-activation value
                                     within KINK_MARGIN = 1e-5 of its kink (the margin and k
                                     are in resnet20_train_step_f64_gap.json). With batch 8 and
                                     "train_input" one value of layer2.1's first ReLU lay
                                     9.7e-7 from 0: NVIDIA's float32 (FMA) rounding put it on
                                     the other side, and every gradient below layer2.1 moved
                                     by up to 3.5 %. A float64 margin of 1e-5 keeps every
                                     mask for any float32 computation whose pre-activations
                                     stay within 1e-5 of the exact ones; batch 2 has few
                                     enough values that such an input exists.
    labels         i64 [2]           [i * 3 % 10 for i in range(2)] = 0,3
    logits         f32 [2,10]        train-mode logits before the step
    loss           f32 [1]           F.cross_entropy(logits, labels) (mean)
    grad.<p>       f32               for p in conv1.weight, layer3.2.conv2.weight, fc.weight,
                                     fc.bias (after loss.backward())
    after.<p>      f32               after one torch.optim.SGD(model.parameters(), lr=0.1,
                                     momentum=0.9, weight_decay=5e-4) step, for p in
                                     conv1.weight, layer1.0.bn1.weight,
                                     layer3.2.conv2.weight, fc.weight, fc.bias
                                     (weight decay applies to every parameter, BN included;
                                     first step: buf = g + wd*p, p -= lr*buf)
    after.<bn>.running_mean / running_var (f32), after.<bn>.num_batches_tracked (i64 [], = 5)
                                     for every BN, after the training forward pass
"""

import argparse
import copy
import json
import math
import os
import platform
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, conv1x1

torch.set_num_threads(1)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")

FREQ = 0.7548776662466927
FNV_OFFSET = 2166136261
FNV_PRIME = 16777619
PHASE_MOD = 100003
RES = 32
N_CALIB = 4
CALIB_BATCH = 8


# ----------------------------------------------------------------------------- formula

def fnv1a_32(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) % (1 << 32)
    return h


FORMULA = "quadratic"  # the default since the linear one gives rank-2 weights, see the docstring


def formula(name: str, n: int) -> np.ndarray:
    """s[i] = sin(FREQ * x + phase(name)), x = i ("linear") or i*i ("quadratic"), float64,
    i = 0..n-1, math.sin per element."""
    h = fnv1a_32(name.encode("utf-8"))
    phase = (h % PHASE_MOD) / float(PHASE_MOD) * (2.0 * math.pi)
    idx = np.arange(n, dtype=np.float64)
    if FORMULA == "quadratic":
        idx = idx * idx   # exact in f64 for i < 2**26
    arg = idx * FREQ      # one IEEE multiply per element
    arg = arg + phase     # one IEEE add per element (separate ufuncs: no FMA)
    return np.fromiter(map(math.sin, arg.tolist()), dtype=np.float64, count=n)


def data_tensor(name, shape, scale=None):
    n = int(np.prod(shape))
    s = formula(name, n)
    if scale is not None:
        s = s * scale
    return torch.from_numpy(s.astype(np.float32).reshape(shape))


def is_bn(m):
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def bn_param_names(model):
    out = set()
    for mname, m in model.named_modules():
        if is_bn(m):
            out.add(mname + ".weight")
            out.add(mname + ".bias")
    return out


def kind_of(name, t, bn_params):
    if name.endswith(".running_mean") or name.endswith(".running_var") or name.endswith(
            ".num_batches_tracked"):
        return "bn_stat"
    if t.dim() >= 2:
        return "weight"
    if name.endswith(".weight"):
        assert name in bn_params, f"1-d weight that is not a BN gamma: {name}"
        return "bn_gamma"
    if name.endswith(".bias"):
        return "bn_beta" if name in bn_params else "bias"
    raise ValueError(f"unclassified tensor {name} {tuple(t.shape)}")


def init_weights(model):
    bn_params = bn_param_names(model)
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            k = kind_of(name, t, bn_params)
            if k == "bn_stat":
                continue
            assert t.dtype == torch.float32, name
            s = formula(name, t.numel())
            if k == "weight":
                fan_in = int(np.prod(t.shape[1:]))
                v = s * math.sqrt(3.0 / fan_in)
            elif k == "bn_gamma":
                v = 1.0 + 0.25 * s
            else:  # conv/linear bias or BN beta
                v = 0.1 * s
            t.copy_(torch.from_numpy(v.astype(np.float32).reshape(tuple(t.shape))))


# ----------------------------------------------------------------------------- models

class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet (6n+2 layers), option-B (1x1 conv + BN) projection
    shortcuts, module names as torchvision's ResNet/BasicBlock."""

    def __init__(self, n, num_classes=10):
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def efficientnet_lite0(num_classes):
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)


BUILDERS = {
    "resnet18": lambda nc: torchvision.models.resnet18(num_classes=nc),
    "resnet34": lambda nc: torchvision.models.resnet34(num_classes=nc),
    "resnet50": lambda nc: torchvision.models.resnet50(num_classes=nc),
    "resnext50_32x4d": lambda nc: torchvision.models.resnext50_32x4d(num_classes=nc),
    "mobilenet_v2": lambda nc: torchvision.models.mobilenet_v2(num_classes=nc),
    "resnet20": lambda nc: CifarResNet(3, nc),
    "resnet56": lambda nc: CifarResNet(9, nc),
    "efficientnet_lite0": efficientnet_lite0,
}
EXPECTED_1000 = {"resnet18": 11689512, "resnet34": 21797672, "resnet50": 25557032,
                 "resnext50_32x4d": 25028904,
                 "mobilenet_v2": 3504872, "efficientnet_lite0": 4652008}


def build(name, num_classes=10):
    torch.manual_seed(0)  # only the default init, which is overwritten anyway
    return BUILDERS[name](num_classes)


# ----------------------------------------------------------------------------- BN stats

def calibrate(model):
    bns = [m for m in model.modules() if is_bn(m)]
    momenta = [m.momentum for m in bns]
    gp = getattr(model, "_global_params", None)
    if gp is not None:  # efficientnet: random drop-connect in train mode -> off
        model._global_params = gp._replace(drop_connect_rate=0.0)
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for k in range(N_CALIB):
            model(data_tensor(f"calibration.{k}", [CALIB_BATCH, 3, RES, RES], math.sqrt(2.0)))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    if gp is not None:
        model._global_params = gp
    model.eval()


def bn_stats(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k.endswith((".running_mean", ".running_var", ".num_batches_tracked"))}


def make_model(name):
    model = build(name)
    init_weights(model)
    calibrate(model)
    return model


# ----------------------------------------------------------------------------- activation probes

ACTS = (nn.ReLU, nn.ReLU6)


class PreActRecorder:
    """Records every input of an nn.ReLU / nn.ReLU6 call (before in-place modification)."""

    def __init__(self, model):
        self.values = []
        self.handles = []
        for m in model.modules():
            if isinstance(m, ACTS):
                self.handles.append(m.register_forward_pre_hook(self._hook))

    def _hook(self, m, inp):
        kinks = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (0.0,)
        self.values.append((inp[0].detach().double().clone(), kinks))

    def remove(self):
        for h in self.handles:
            h.remove()


def mask_report(rec32, rec64, tol=1e-6):
    assert len(rec32.values) == len(rec64.values)
    near, flips, total = 0, 0, 0
    for (a, kinks), (b, _) in zip(rec32.values, rec64.values):
        total += a.numel()
        for k in kinks:
            near += int(((a - k).abs() <= tol).sum())
            flips += int(((a > k) != (b > k)).sum())
    return {"activation_calls": len(rec32.values), "pre_activation_values": total,
            "within_1e-6_of_kink_f32": near, "mask_disagreements_f32_vs_f64": flips}


# ----------------------------------------------------------------------------- goldens

def rel_gap(a, b):
    a = a.double()
    b = b.double()
    d = float((a - b).abs().max()) if a.numel() else 0.0
    m = float(b.abs().max()) if b.numel() else 0.0
    return {"max_abs_diff": d, "max_abs": m, "rel": d / m if m > 0 else d}


def weights_check(model):
    bn_params = bn_param_names(model)
    out = []
    for name, t in model.state_dict().items():
        flat = t.reshape(-1)
        out.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                    "kind": kind_of(name, t, bn_params),
                    "first4": [float(v) if t.is_floating_point() else int(v) for v in flat[:4].tolist()],
                    "sum": float(flat.double().sum()) if t.is_floating_point() else int(flat.sum())})
    return out


def forward_golden(name, checks, reports):
    model = make_model(name)
    x = data_tensor("input", [2, 3, RES, RES])
    model.eval()
    rec32 = PreActRecorder(model)
    with torch.no_grad():
        logits = model(x)
    rec32.remove()
    m64 = copy.deepcopy(model).double().eval()
    rec64 = PreActRecorder(m64)
    with torch.no_grad():
        logits64 = m64(x.double())
    rec64.remove()
    save_file({"input": x.contiguous(), "logits": logits.contiguous(),
               "logits_f64": logits64.contiguous()},
              os.path.join(OUT, f"{name}.safetensors"))
    save_file(bn_stats(model), os.path.join(OUT, f"{name}_bn_stats.safetensors"))
    checks[name] = weights_check(model)
    rep = {"logits_gap_f32_vs_f64": rel_gap(logits, logits64), **mask_report(rec32, rec64),
           "logits_row0": logits[0].tolist(),
           "logits_max_abs_diff_between_batch_items": float((logits[0] - logits[1]).abs().max())}
    reports[name] = rep
    print(f"{name:20s} logits[0,:4]={[round(v, 5) for v in logits[0, :4].tolist()]} "
          f"f32-vs-f64 rel gap {rep['logits_gap_f32_vs_f64']['rel']:.2e} "
          f"near-kink {rep['within_1e-6_of_kink_f32']} "
          f"mask flips {rep['mask_disagreements_f32_vs_f64']}/{rep['pre_activation_values']}",
          flush=True)
    if name == "resnet18":
        sd = model.state_dict()
        for p in ("conv1.weight", "fc.weight", "bn1.weight", "fc.bias"):
            print(f"  check resnet18 {p}[0:4] = {[repr(v) for v in sd[p].reshape(-1)[:4].tolist()]}")
    return model


GRAD_NAMES = ["conv1.weight", "layer3.2.conv2.weight", "fc.weight", "fc.bias"]
AFTER_NAMES = ["conv1.weight", "layer1.0.bn1.weight", "layer3.2.conv2.weight", "fc.weight", "fc.bias"]


def train_step(model, x, labels):
    model.train()
    rec = PreActRecorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    rec.remove()
    params = dict(model.named_parameters())
    out = {"logits": logits.detach().clone(), "loss": loss.detach().reshape(1).clone()}
    for p in GRAD_NAMES:
        out[f"grad.{p}"] = params[p].grad.detach().clone()
    opt.step()
    sd = model.state_dict()
    for p in AFTER_NAMES:
        out[f"after.{p}"] = sd[p].detach().clone()
    for k, v in bn_stats(model).items():
        out[f"after.{k}"] = v
    return out, rec


KINK_MARGIN = 1e-5
TRAIN_BATCH = 2


def kink_margin(model, x):
    """The smallest distance of a pre-activation value to its activation's kink in a
    float64 train-mode forward pass of a copy of `model` on `x`."""
    m64 = copy.deepcopy(model).double().train()
    rec = PreActRecorder(m64)
    with torch.no_grad():
        m64(x.double())
    rec.remove()
    return min((v - k).abs().min().item() for v, kinks in rec.values for k in kinks)


def train_input(model):
    """The first formula("train_input.k") whose pass keeps KINK_MARGIN (see the docstring)."""
    for k in range(1000):
        x = data_tensor(f"train_input.{k}", [TRAIN_BATCH, 3, RES, RES])
        margin = kink_margin(model, x)
        if margin >= KINK_MARGIN:
            return x, k, margin
    raise SystemExit(f"no train input keeps every pre-activation {KINK_MARGIN} from its kink")


def train_step_golden():
    model = make_model("resnet20")
    start = copy.deepcopy(model)
    x, input_k, margin = train_input(model)
    labels = torch.tensor([i * 3 % 10 for i in range(TRAIN_BATCH)], dtype=torch.int64)
    out32, rec32 = train_step(model, x, labels)
    m64 = copy.deepcopy(start).double()
    out64, rec64 = train_step(m64, x.double(), labels)
    tensors = {"input": x.contiguous(), "labels": labels}
    tensors.update({k: v.contiguous() for k, v in out32.items()})
    save_file(tensors, os.path.join(OUT, "resnet20_train_step.safetensors"))
    gaps = {}
    for k, v in out32.items():
        if v.is_floating_point():
            gaps[k] = rel_gap(v, out64[k])
        else:
            assert torch.equal(v, out64[k]), k
    worst = max(gaps.items(), key=lambda kv: kv[1]["rel"])
    masks = mask_report(rec32, rec64)
    masks.update({"input": f"train_input.{input_k}", "min_kink_margin_f64": margin})
    summary = {"formula": FORMULA, "per_tensor": gaps, "worst": {"name": worst[0], **worst[1]}, "train_forward": masks,
               "loss_f32": float(out32["loss"]), "loss_f64": float(out64["loss"])}
    with open(os.path.join(OUT, "resnet20_train_step_f64_gap.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(f"resnet20 train step: loss f32 {float(out32['loss']):.9g} f64 {float(out64['loss']):.12g}")
    for k in ["logits", "loss"] + [f"grad.{p}" for p in GRAD_NAMES] + [f"after.{p}" for p in AFTER_NAMES]:
        g = gaps[k]
        print(f"  {k:32s} rel gap {g['rel']:.2e} (max|d| {g['max_abs_diff']:.2e}, max|x| {g['max_abs']:.3g})")
    bn_keys = [k for k in gaps if k.startswith("after.") and k.endswith(("running_mean", "running_var"))]
    bw = max(bn_keys, key=lambda k: gaps[k]["rel"])
    print(f"  worst BN running stat: {bw} rel gap {gaps[bw]['rel']:.2e}")
    print(f"  worst overall: {worst[0]} rel gap {worst[1]['rel']:.2e}")
    print(f"  train forward: {masks}")


def param_counts():
    counts = {}
    for name in BUILDERS:
        nc = 10 if name in ("resnet20", "resnet56") else 1000
        m = build(name, nc)
        c = sum(p.numel() for p in m.parameters())
        counts[name] = {"num_classes": nc, "params": c}
        if name in EXPECTED_1000:
            assert c == EXPECTED_1000[name], (name, c)
        print(f"params {name:20s} num_classes={nc:4d}: {c:,}")
    return counts


def describe():
    torch.set_printoptions(profile="short")
    mb = build("mobilenet_v2")
    print(mb)
    for k, v in mb.state_dict().items():
        print(k, tuple(v.shape))
    ef = build("efficientnet_lite0")
    print(ef)
    gp = ef._global_params
    print("global params:", gp)
    for i, b in enumerate(ef._blocks):
        a = b._block_args
        pad = b._depthwise_conv.static_padding
        print(i, "in", a.input_filters, "out", a.output_filters, "e", a.expand_ratio,
              "k", a.kernel_size, "s", a.stride, "pad(l,r,t,b)", getattr(pad, "padding", None),
              "skip", bool(a.id_skip and a.stride == 1 and a.input_filters == a.output_filters),
              "dw stride", tuple(b._depthwise_conv.stride), "expand", hasattr(b, "_expand_conv"),
              "bn eps", b._bn1.eps, "mom", b._bn1.momentum)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--describe", action="store_true")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--formula", choices=["linear", "quadratic"], default="quadratic")
    args = ap.parse_args()
    global FORMULA
    FORMULA = args.formula
    if args.describe:
        describe()
        return
    os.makedirs(OUT, exist_ok=True)
    names = args.only or list(BUILDERS)
    if not args.only:
        counts = param_counts()
        meta = {"formula": FORMULA, "counts": counts, "versions": {
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "efficientnet_lite_pytorch": __import__("efficientnet_lite_pytorch").__version__,
            "numpy": np.__version__, "python": platform.python_version()}}
        with open(os.path.join(OUT, "param_counts.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
    checks, reports = {}, {}
    for name in names:
        forward_golden(name, checks, reports)
    if not args.only:
        with open(os.path.join(OUT, "weights_check.json"), "w") as f:
            # one state_dict entry per line
            f.write('{"formula": "%s", "models": {\n' % FORMULA)
            for mi, (mname, entries) in enumerate(checks.items()):
                f.write(' "%s": [\n' % mname)
                f.write(",\n".join("  " + json.dumps(e) for e in entries))
                f.write("\n ]%s\n" % ("," if mi + 1 < len(checks) else ""))
            f.write("}}\n")
        with open(os.path.join(OUT, "forward_report.json"), "w") as f:
            json.dump({"formula": FORMULA, "models": reports}, f, indent=1)
            f.write("\n")
    if not args.only or "resnet20" in names:
        train_step_golden()


if __name__ == "__main__":
    sys.exit(main())
