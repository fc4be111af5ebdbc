"""PyTorch (CPU, float32) golden cases for the PyTorch-parity ops: log_softmax (forward,
backward), nll_loss, adaptive_avg_pool2d, asymmetric padding, grouped/depthwise
convolution, pooling with ceil_mode and dilation, optimizer options and batch norm's state,
in the schema of ../../shared/golden
(cnn-golden/1). Run from the repository root:

    python3 tests/golden/make_parity_golden.py

Needs only torch (no numpy). Writes tests/golden/{log_softmax,nll,adaptive_avgpool2d,asympad_conv2d}_*.json and
tests/golden/conv2d_{groups,depthwise}*.json, tests/golden/{max,avg}pool2d_{ceil,dil}*.json,
tests/golden/optim_*_{options,amsgrad,nesterov}.json, tests/golden/bn_running_{cumulative,momentum03}.json,
tests/golden/bn_state_dict.{safetensors,json} (needs the safetensors package too).
"""

import json
import os
import platform

import torch
import torch.nn.functional as F

OUT = os.path.dirname(os.path.abspath(__file__))
REFERENCE = {
    "impl": "PyTorch",
    "torch_version": torch.__version__,
    "python_version": platform.python_version(),
    "device": "cpu",
    "dtype": "float32",
}


def T(t):
    t = t.detach().cpu()
    if t.dtype == torch.int64:
        return {"shape": list(t.shape), "dtype": "int64", "data": [int(v) for v in t.reshape(-1)]}
    return {"shape": list(t.shape), "dtype": "float32",
            "data": [float("%.9g" % v) for v in t.reshape(-1).tolist()]}


def write(name, op, description, seed, inputs, outputs, grad_outputs, grads, params=None):
    params = params or {"dim": -1, "reduction": "mean"}
    obj = {"schema": "cnn-golden/1", "case": name, "op": op, "description": description,
           "reference": REFERENCE, "seed": seed, "params": params,
           "inputs": inputs, "outputs": outputs, "grad_outputs": grad_outputs, "grads": grads}
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    print(name)


def log_softmax_case(name, x, seed):
    x = x.clone().requires_grad_(True)
    y = F.log_softmax(x, dim=-1)
    dy = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, x, dy)
    write(name, "log_softmax", "y = log_softmax(x, dim=-1); dx from dy", seed,
          {"x": T(x)}, {"y": T(y)}, {"y": T(dy)}, {"x": T(gx)})


def nll_case(name, logits, target, seed):
    z = logits.clone().requires_grad_(True)
    logp = F.log_softmax(z, dim=-1)
    logp_leaf = logp.detach().requires_grad_(True)
    loss = F.nll_loss(logp_leaf, target)
    (glogp,) = torch.autograd.grad(loss, logp_leaf)
    (gz,) = torch.autograd.grad(F.nll_loss(F.log_softmax(z, dim=-1), target), z)
    write(name, "nll_loss",
          "log_probs = log_softmax(logits); loss = nll_loss(log_probs, target) (mean); "
          "grads: by log_probs, and by logits through log_softmax", seed,
          {"logits": T(z), "target": T(target)}, {"log_probs": T(logp), "loss": T(loss.reshape(1))},
          {"loss": T(torch.ones(1))}, {"log_probs": T(glogp), "logits": T(gz)})


def adaptive_case(name, shape, output, seed):
    torch.manual_seed(seed)
    x = torch.randn(*shape).requires_grad_(True)
    y = F.adaptive_avg_pool2d(x, output)
    dy = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, x, dy)
    write(name, "adaptive_avg_pool2d",
          "y = adaptive_avg_pool2d(x, output): windows floor(i*H/OH) .. ceil((i+1)*H/OH)", seed,
          {"x": T(x)}, {"y": T(y)}, {"y": T(dy)}, {"x": T(gx)},
          params={"output": list(output)})


def padded_conv_case(name, shape, weight_shape, pad, stride, seed):
    """F.pad (left, right, top, bottom) then conv2d: what Padding::Asymmetric computes."""
    torch.manual_seed(seed)
    x = torch.randn(*shape).requires_grad_(True)
    w = torch.randn(*weight_shape).requires_grad_(True)
    b = torch.randn(weight_shape[0]).requires_grad_(True)
    y = F.conv2d(F.pad(x, pad), w, b, stride=stride)
    dy = torch.randn(y.shape)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    left, right, top, bottom = pad
    write(name, "conv2d", "y = conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride)",
          seed, {"x": T(x), "weight": T(w), "bias": T(b)}, {"y": T(y)}, {"y": T(dy)},
          {"x": T(gx), "weight": T(gw), "bias": T(gb)},
          params={"top": top, "bottom": bottom, "left": left, "right": right,
                  "stride": list(stride)})


def grouped_conv_case(name, shape, weight_shape, stride, padding, dilation, groups, seed):
    """conv2d with groups; params as the shared conv2d cases plus "groups"."""
    torch.manual_seed(seed)
    x = torch.randn(*shape).requires_grad_(True)
    w = torch.randn(*weight_shape).requires_grad_(True)
    b = torch.randn(weight_shape[0]).requires_grad_(True)
    y = F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    dy = torch.randn(y.shape)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    write(name, "conv2d", "y = conv2d(x, weight, bias, stride, padding, dilation, groups)",
          seed, {"x": T(x), "weight": T(w), "bias": T(b)}, {"y": T(y)}, {"y": T(dy)},
          {"x": T(gx), "weight": T(gw), "bias": T(gb)},
          params={"stride": list(stride), "padding": padding if padding == "same" else list(padding),
                  "dilation": list(dilation), "groups": groups})


def pool_case(name, kind, shape, kernel, stride, padding, seed, dilation=(1, 1), ceil_mode=False,
              count_include_pad=True, coarse=False):
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    if coarse:  # ties inside windows
        x = (x * 2).round()
    x.requires_grad_(True)
    params = {"kernel": list(kernel), "stride": list(stride), "padding": list(padding),
              "dilation": list(dilation), "ceil_mode": ceil_mode}
    outputs = {}
    if kind == "max":
        y, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode,
                                  return_indices=True)
        outputs["indices"] = T(indices)
    else:
        y = F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode,
                         count_include_pad=count_include_pad)
        params["count_include_pad"] = count_include_pad
    outputs = {"y": T(y), **outputs}
    dy = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, x, dy)
    write(name, kind + "_pool2d", f"y = {kind}_pool2d(x, ...) with the params", seed,
          {"x": T(x)}, outputs, {"y": T(dy)}, {"x": T(gx)}, params=params)


def optim_case(name, cls, kwargs, seed, steps=4):
    """Steps of torch.optim on one parameter with fixed gradients; the final state by name."""
    torch.manual_seed(seed)
    param = torch.randn(3, 5)
    grads = [torch.randn(3, 5) for _ in range(steps)]
    p = param.clone().requires_grad_(True)
    opt = cls([p], **kwargs)
    after = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        after.append(p.detach().clone())
    state = {k: T(v) for k, v in opt.state[p].items() if k != "step"}
    hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.defaults.items()}
    write(name, "optimizer", f"torch.optim.{cls.__name__}({kwargs}) on one (3, 5) parameter: "
          f"{steps} steps with fixed grads", seed,
          {"param": T(param), "grads_per_step": [T(g) for g in grads]},
          {"param_after_step": [T(a) for a in after], "final_state": state}, {}, {},
          params={"optimizer": cls.__name__, "hyperparams": hyper})


def batch_norm_running_case(name, momentum, seed, batches=3):
    """Running statistics over several training batches (momentum None: cumulative average),
    num_batches_tracked, the last batch's biased variance, then eval mode."""
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(3))
        bn.bias.copy_(torch.randn(3))
    weight, bias = bn.weight.detach().clone(), bn.bias.detach().clone()
    xs = [torch.randn(2, 3, 4, 5) * 2 + 1 for _ in range(batches)]
    means, variances = [], []
    bn.train()
    for x in xs:
        bn(x)
        means.append(T(bn.running_mean))
        variances.append(T(bn.running_var))
    batch_var = xs[-1].var(dim=(0, 2, 3), unbiased=False)
    bn.eval()
    x_eval = torch.randn(2, 3, 4, 5)
    y_eval = bn(x_eval)
    write(name, "batch_norm2d", f"BatchNorm2d(3, momentum={momentum}): {batches} training batches, "
          "then eval", seed,
          {"x_batches": [T(x) for x in xs], "weight": T(weight), "bias": T(bias), "x_eval": T(x_eval)},
          {"running_mean_after": means, "running_var_after": variances,
           "num_batches_tracked": T(bn.num_batches_tracked.reshape(1)), "batch_var": T(batch_var),
           "y_eval": T(y_eval)}, {}, {}, params={"momentum": momentum, "eps": bn.eps})


def bn_state_dict_case(seed):
    """A conv → batch norm → ReLU → linear network's state_dict as PyTorch writes it to
    safetensors (num_batches_tracked int64 included), then one more SGD step in training
    mode from there."""
    from collections import OrderedDict
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    net = torch.nn.Sequential(OrderedDict(
        conv=torch.nn.Conv2d(2, 3, 3, padding=1, bias=False), bn=torch.nn.BatchNorm2d(3),
        relu=torch.nn.ReLU(), flatten=torch.nn.Flatten(), fc=torch.nn.Linear(3 * 5 * 5, 4)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(4, 2, 5, 5)
        loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(OUT, "bn_state_dict.safetensors"))
    x, labels = torch.randn(4, 2, 5, 5), torch.tensor([3, 1, 0, 2])
    loss = F.cross_entropy(net(x), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = {k: (T(v.reshape(1)) if v.dtype == torch.int64 else T(v)) for k, v in net.state_dict().items()}
    write("bn_state_dict_resume", "state_dict",
          "bn_state_dict.safetensors (after 2 SGD steps), then one more step (lr 0.1, train mode)",
          seed, {"x": T(x), "labels": T(labels)}, {"loss": T(loss.reshape(1)), "state_after": after},
          {}, {}, params={"lr": 0.1})


def main():
    torch.set_num_threads(1)
    torch.manual_seed(5000)
    log_softmax_case("log_softmax_n4_k10", torch.randn(4, 10) * 3, 5000)
    torch.manual_seed(5001)
    # Logits of ±100 in one row, a tie, a single class: exp() would overflow unshifted.
    x = torch.tensor([[100.0, -100.0, 0.0, 99.5, -50.0],
                      [-100.0, -100.0, -100.0, -100.0, -100.0],
                      [88.0, 90.0, -3.0, 90.0, 1e-3]])
    log_softmax_case("log_softmax_extreme_n3_k5", x, 5001)
    torch.manual_seed(5002)
    log_softmax_case("log_softmax_n7_k1", torch.randn(7, 1), 5002)
    torch.manual_seed(5003)
    nll_case("nll_n6_k5", torch.randn(6, 5) * 2, torch.tensor([0, 4, 2, 2, 1, 3]), 5003)
    torch.manual_seed(5004)
    nll_case("nll_extreme_n3_k4",
             torch.tensor([[100.0, -100.0, 0.0, 5.0], [-100.0, 100.0, 100.0, 0.0], [1.0, 2.0, 3.0, 4.0]]),
             torch.tensor([1, 2, 3]), 5004)
    # Windows that overlap (7 → 3), that do not divide (10 → 4), upsampling (3 → 5),
    # global (→ 1×1), and a non-square mix.
    adaptive_case("adaptive_avgpool2d_h7w7_o3x3", (2, 3, 7, 7), (3, 3), 5005)
    adaptive_case("adaptive_avgpool2d_h10w9_o4x2", (1, 2, 10, 9), (4, 2), 5006)
    adaptive_case("adaptive_avgpool2d_h3w4_o5x7", (2, 1, 3, 4), (5, 7), 5007)
    adaptive_case("adaptive_avgpool2d_h6w5_o1x1", (3, 2, 6, 5), (1, 1), 5008)
    # TensorFlow "SAME" with stride 2 on an even input pads (0, 1); others pad more on one side.
    padded_conv_case("asympad_conv2d_h8w8_k3_s2_p0101", (2, 3, 8, 8), (4, 3, 3, 3), (0, 1, 0, 1), (2, 2), 5009)
    padded_conv_case("asympad_conv2d_h7w9_k5x3_s1_p2103", (1, 2, 7, 9), (3, 2, 5, 3), (2, 1, 0, 3), (1, 1), 5010)
    padded_conv_case("asympad_conv2d_h6w6_k3_s1_p3000", (2, 1, 6, 6), (2, 1, 3, 3), (3, 0, 0, 0), (1, 1), 5011)
    # Two groups (ResNeXt/AlexNet style), depthwise (MobileNet), depthwise with a channel
    # multiplier, strided and dilated.
    grouped_conv_case("conv2d_groups2_h7w9_k3_s1_p1", (2, 4, 7, 9), (6, 2, 3, 3), (1, 1), (1, 1), (1, 1), 2, 5012)
    grouped_conv_case("conv2d_depthwise_h8w8_k3_s1_same", (2, 5, 8, 8), (5, 1, 3, 3), (1, 1), "same", (1, 1), 5, 5013)
    grouped_conv_case("conv2d_depthwise_m2_h9w7_k3_s2_p1", (1, 3, 9, 7), (6, 1, 3, 3), (2, 2), (1, 1), (1, 1), 3, 5014)
    grouped_conv_case("conv2d_groups3_h8w10_k5x3_s2x1_p2x1_d1x2", (2, 6, 8, 10), (9, 2, 5, 3), (2, 1), (2, 1), (1, 2), 3, 5015)
    # ceil_mode: a last, partial window (overhanging the padded input: PyTorch's divisor rule),
    # a window dropped because it would start in the right padding; dilated max pooling.
    pool_case("maxpool2d_ceil_k3s2_h8w9", "max", (2, 2, 8, 9), (3, 3), (2, 2), (0, 0), 5016, ceil_mode=True)
    pool_case("maxpool2d_ceil_k2s2p1_h5w6", "max", (1, 3, 5, 6), (2, 2), (2, 2), (1, 1), 5017, ceil_mode=True,
              coarse=True)
    pool_case("maxpool2d_dil2_k3s1p1_h9w8", "max", (2, 2, 9, 8), (3, 3), (1, 1), (1, 1), 5018, dilation=(2, 2))
    pool_case("maxpool2d_dil2x3_ceil_k2s2_h9w11", "max", (1, 2, 9, 11), (2, 2), (2, 2), (1, 0), 5019,
              dilation=(2, 3), ceil_mode=True, coarse=True)
    pool_case("avgpool2d_ceil_k3s2p1_h6w7", "avg", (2, 2, 6, 7), (3, 3), (2, 2), (1, 1), 5020, ceil_mode=True)
    pool_case("avgpool2d_ceil_k3s2p1_h6w7_excludepad", "avg", (2, 2, 6, 7), (3, 3), (2, 2), (1, 1), 5021,
              ceil_mode=True, count_include_pad=False)
    pool_case("avgpool2d_ceil_k2s3_h8w7", "avg", (1, 2, 8, 7), (2, 2), (3, 3), (0, 0), 5022, ceil_mode=True)
    # Every optimizer option PyTorch's single-tensor rules take.
    optim_case("optim_sgd_nesterov", torch.optim.SGD,
               {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-2}, 5023)
    optim_case("optim_sgd_dampening_options", torch.optim.SGD,
               {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-3}, 5024)
    optim_case("optim_adagrad_options", torch.optim.Adagrad,
               {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.4, "eps": 1e-6,
                "weight_decay": 1e-2}, 5025)
    optim_case("optim_adam_amsgrad", torch.optim.Adam,
               {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-2, "amsgrad": True},
               5026, steps=6)
    optim_case("optim_adamw_amsgrad", torch.optim.AdamW,
               {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, 5027, steps=6)
    batch_norm_running_case("bn_running_cumulative", None, 5028)
    batch_norm_running_case("bn_running_momentum03", 0.3, 5029)
    bn_state_dict_case(5030)


if __name__ == "__main__":
    main()
