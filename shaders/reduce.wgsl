// Sums x viewed as [outer][mid][inner] over outer and inner:
// out[m] (+)= scale · Σ_a Σ_i x[a][m][i].
// One workgroup per output element: 64 invocations stride over the outer·inner terms, then a
// tree reduction in workgroup memory. Used for bias and batched weight gradients.

// mid and inner are baked in per pipeline (a layer's shape), so the index arithmetic
// divides by constants; outer (usually the batch) stays a parameter.
override MID: u32;
override INNER: u32;

struct Params {
    outer: u32, accumulate: u32, scale: f32, _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let m = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if m >= MID { return; }
    let terms = p.outer * INNER;
    var sum = 0.0;
    for (var t = lane; t < terms; t += 64u) {
        let a = t / INNER;
        let i = t % INNER;
        sum += x[(a * MID + m) * INNER + i];
    }
    partial[lane] = sum;
    workgroupBarrier();
    for (var width = 32u; width > 0u; width /= 2u) {
        if lane < width { partial[lane] += partial[lane + width]; }
        workgroupBarrier();
    }
    if lane == 0u {
        var total = p.scale * partial[0];
        if p.accumulate != 0u { total += out[m]; }
        out[m] = total;
    }
}

// The same sum with one invocation per output element: for many outputs of few terms each
// (adding up partial results), where a workgroup per output would mostly wait at barriers.
@compute @workgroup_size(64)
fn per_output(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let m = gid.x + gid.y * nwg.x * 64u;
    if m >= MID { return; }
    var sum = 0.0;
    for (var a = 0u; a < p.outer; a++) {
        for (var i = 0u; i < INNER; i++) {
            sum += x[(a * MID + m) * INNER + i];
        }
    }
    var total = p.scale * sum;
    if p.accumulate != 0u { total += out[m]; }
    out[m] = total;
}
