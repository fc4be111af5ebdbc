// Input normalisation per channel: y = (x − mean[c]) / std[c] over NCHW data, either from
// f32 values or from image bytes (4 per u32 word, divided by 255 first). Each pipeline is
// built for one entry point, with `src` typed to match.

struct Params {
    total: u32, channels: u32, plane: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> mean: array<f32>;
@group(0) @binding(2) var<storage, read> inv_std: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
// The source's element type is filled in per entry point (f32 or u32): see
// src/ops/normalize.rs.
@group(0) @binding(4) var<storage, read> src: array<{{SRC_TYPE}}>;

fn channel(i: u32) -> u32 {
    return (i / p.plane) % p.channels;
}

@compute @workgroup_size(WORKGROUP)
fn from_floats(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let c = channel(i);
    dst[i] = (f32(src[i]) - mean[c]) * inv_std[c];
}

@compute @workgroup_size(WORKGROUP)
fn from_bytes(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let byte = (u32(src[i / 4u]) >> (8u * (i % 4u))) & 0xffu;
    let c = channel(i);
    dst[i] = (f32(byte) / 255.0 - mean[c]) * inv_std[c];
}
