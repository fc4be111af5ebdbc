// One signed-gradient step of an adversarial attack:
//   out = clamp(clamp(x + step·sign(g), origin − radius, origin + radius), lo, hi)
// FGSM is one step from the clean image (origin = x, step = radius = ε); PGD repeats
// steps of α from the current image, projected back to the ε-ball around the clean one.
// sign(0) = 0, as in PyTorch.

struct Params {
    total: u32, step: f32, radius: f32, lo: f32,
    hi: f32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> origin: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WORKGROUP)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let moved = x[i] + p.step * sign(g[i]);
    let projected = clamp(moved, origin[i] - p.radius, origin[i] + p.radius);
    out[i] = clamp(projected, p.lo, p.hi);
}
