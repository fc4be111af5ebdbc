// Parameter updates following PyTorch's single-tensor rules: SGD (momentum, dampening,
// Nesterov), AdaGrad (lr_decay) and Adam/AdamW/AMSGrad, each with weight decay.
// Step-dependent scalars (Adam's bias corrections, AdaGrad's decayed rate) are computed on the
// host in f64.
//
// One dispatch updates up to TENSORS parameters (a dispatch costs about as much as a small
// update on CPU adapters): src/optim.rs generates, per parameter k, its bindings (param_k,
// grad_k and one buffer per state slot), a `case k` that loads its vec4 number i and one that
// stores the result; `update` runs once between the two switches (a copy per case cost
// lavapipe, which runs every case with its lanes masked off, the math of each and ~90 ms of
// JIT for LeNet's 8 shared parameters). Four elements per invocation: the tensors are bound in
// whole vec4s, and on CPU adapters a per-lane access costs about the same for one float or four.

// 0 SGD, 1 AdaGrad, 2 Adam.
override KIND: u32;

struct Params {
    first_step: u32, nesterov: u32, decoupled: u32, amsgrad: u32,
    lr: f32, momentum: f32, dampening: f32, weight_decay: f32,
    beta1: f32, beta2: f32, eps: f32, step_size: f32,
    bias_correction2_sqrt: f32, _pad0: u32, _pad1: u32, _pad2: u32,
    // Per parameter: x = its first workgroup, y = its length in vec4s.
    tensors: array<vec4<u32>, {{TENSORS}}>,
}

@group(0) @binding(0) var<uniform> p: Params;
{{BINDINGS}}

// A parameter's values and state at one vec4: momentum / sum / exp_avg, exp_avg_sq,
// max_exp_avg_sq (zeros where the rule keeps fewer; never stored then).
struct Slots {
    w: vec4<f32>, s1: vec4<f32>, s2: vec4<f32>, s3: vec4<f32>,
}

fn update(slots: Slots, gradient: vec4<f32>) -> Slots {
    var s = slots;
    var g = gradient;
    if p.decoupled != 0u {
        s.w *= 1.0 - p.lr * p.weight_decay;
    } else if p.weight_decay != 0.0 {
        g += p.weight_decay * s.w;
    }
    switch KIND {
        case OPT_SGD: {
            if p.momentum != 0.0 {
                var buf = g;
                if p.first_step == 0u { buf = p.momentum * s.s1 + (1.0 - p.dampening) * g; }
                s.s1 = buf;
                if p.nesterov != 0u { g += p.momentum * buf; } else { g = buf; }
            }
            s.w -= p.lr * g;
        }
        case OPT_ADAGRAD: {
            s.s1 += g * g;
            s.w -= p.step_size * g / (sqrt(s.s1) + p.eps);
        }
        default: {   // OPT_ADAM
            s.s1 += (1.0 - p.beta1) * (g - s.s1);
            s.s2 = s.s2 * p.beta2 + (1.0 - p.beta2) * g * g;
            var second = s.s2;
            if p.amsgrad != 0u {
                second = max(s.s3, s.s2);
                s.s3 = second;
            }
            s.w -= p.step_size * s.s1 / (sqrt(second) / p.bias_correction2_sqrt + p.eps);
        }
    }
    return s;
}

@compute @workgroup_size(WORKGROUP)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lindex: u32,
) {
    let group = wid.x + wid.y * nwg.x;
    // The parameter this workgroup updates: the last whose first workgroup is not after it.
    var k = 0u;
    for (var j = 1u; j < {{TENSORS}}u; j++) {
        if group >= p.tensors[j].x { k = j; }
    }
    let i = (group - p.tensors[k].x) * WORKGROUP + lindex;
    if i >= p.tensors[k].y { return; }
    // The parameter's vec4 and state, updated once, stored back.
    var slots = Slots(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var gradient = vec4<f32>(0.0);
    switch k {
{{LOADS}}
        default: {}
    }
    let s = update(slots, gradient);
    switch k {
{{STORES}}
        default: {}
    }
}
