// Parameter updates, one invocation per element, following PyTorch's single-tensor rules:
// SGD (momentum, dampening, Nesterov), AdaGrad (lr_decay) and Adam/AdamW/AMSGrad, each with
// weight decay. Step-dependent scalars (Adam's bias corrections, AdaGrad's decayed rate) are
// computed on the host in f64.

struct Params {
    total: u32, kind: u32, first_step: u32, nesterov: u32,   // kind: 0 SGD, 1 AdaGrad, 2 Adam
    lr: f32, momentum: f32, dampening: f32, weight_decay: f32,
    beta1: f32, beta2: f32, eps: f32, decoupled: u32,
    step_size: f32, bias_correction2_sqrt: f32, amsgrad: u32, _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> state1: array<vec4<f32>>;   // momentum / sum / exp_avg
@group(0) @binding(4) var<storage, read_write> state2: array<vec4<f32>>;   // exp_avg_sq (Adam)
@group(0) @binding(5) var<storage, read_write> state3: array<vec4<f32>>;   // max_exp_avg_sq (AMSGrad)

// Four elements per invocation (the tensors are bound in whole vec4s; p.total counts vec4s):
// on CPU adapters a per-lane access costs about the same for one float or four.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.total { return; }
    var w = param[i];
    var g = grad[i];
    if p.decoupled != 0u {
        w *= 1.0 - p.lr * p.weight_decay;
    } else if p.weight_decay != 0.0 {
        g += p.weight_decay * w;
    }
    switch p.kind {
        case 0u: {
            if p.momentum != 0.0 {
                var buf = g;
                if p.first_step == 0u { buf = p.momentum * state1[i] + (1.0 - p.dampening) * g; }
                state1[i] = buf;
                if p.nesterov != 0u { g += p.momentum * buf; } else { g = buf; }
            }
            w -= p.lr * g;
        }
        case 1u: {
            let sum = state1[i] + g * g;
            state1[i] = sum;
            w -= p.step_size * g / (sqrt(sum) + p.eps);
        }
        default: {
            let m = state1[i] + (1.0 - p.beta1) * (g - state1[i]);
            let v = state2[i] * p.beta2 + (1.0 - p.beta2) * g * g;
            state1[i] = m;
            state2[i] = v;
            var second = v;
            if p.amsgrad != 0u {
                second = max(state3[i], v);
                state3[i] = second;
            }
            w -= p.step_size * m / (sqrt(second) / p.bias_correction2_sqrt + p.eps);
        }
    }
    param[i] = w;
}
