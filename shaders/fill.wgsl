// Tensor::full: every element of dst set to p.value on the device, with no host copy or
// staging buffer (whose allocation failing would cost the whole device).

struct Params {
    total: u32, value: f32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WORKGROUP)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i < p.total {
        dst[i] = p.value;
    }
}
