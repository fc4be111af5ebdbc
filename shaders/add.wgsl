// Elementwise sums: `add` writes out = act(a + b) (residual connections, with the activation
// after them: ACT, an `Activation::code`; epilogue.wgsl is put in front); `accumulate` adds
// src into dst in place (a value that feeds several nodes sums their gradients).

struct Params {
    total: u32, slope: f32, _pad1: u32, _pad2: u32,   // slope: leaky ReLU's, with ACT
}

override ACT: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

@compute @workgroup_size(WORKGROUP)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    out[i] = activate(a[i] + b[i], ACT, p.slope);
}

@compute @workgroup_size(WORKGROUP)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    out[i] += a[i];
}
