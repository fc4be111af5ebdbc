// Elementwise sums: `add` writes out = a + b (residual connections); `accumulate` adds
// src into dst in place (a value that feeds several nodes sums their gradients).

struct Params {
    total: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

@compute @workgroup_size(WORKGROUP)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    out[i] = a[i] + b[i];
}

@compute @workgroup_size(WORKGROUP)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    out[i] += a[i];
}
