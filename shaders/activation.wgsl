// Elementwise activations (codes and forward formulas in epilogue.wgsl) and their
// derivatives, plus a numerically stable softmax over the last axis, forward and backward.

struct Params {
    total: u32, code: u32, slope: f32, row: u32,   // row: softmax row length
}

@group(0) @binding(0) var<uniform> p: Params;

fn linear_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// The elementwise kernels loop over the elements with the grid's stride: fewer, longer
// invocations (src/ops/activation.rs launches one per ELEMENTS_PER_INVOCATION elements) cost
// less per element on CPU adapters, and reads stay contiguous across the lanes.
fn grid_stride(nwg: vec3<u32>) -> u32 {
    return nwg.x * nwg.y * 256u;
}

// ---- forward: dst = act(src)
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = linear_index(gid, nwg); i < p.total; i += grid_stride(nwg)) {
        dst[i] = activate(src[i], p.code, p.slope);
    }
}

// ---- backward: dx = dy · act'(x), with act' written through y where that is cheaper.
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> y: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = linear_index(gid, nwg); i < p.total; i += grid_stride(nwg)) {
        var d = 1.0;
        switch p.code {
            case 1u: { d = select(0.0, 1.0, x[i] > 0.0); }
            case 2u: { d = select(p.slope, 1.0, x[i] > 0.0); }
            case 3u: { d = y[i] * (1.0 - y[i]); }
            case 4u: { d = 1.0 - y[i] * y[i]; }
            default: {}
        }
        dx[i] = dy[i] * d;
    }
}

// ---- softmax over rows of length p.row; p.total counts rows.
@compute @workgroup_size(256)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_index(gid, nwg);
    if r >= p.total { return; }
    let base = r * p.row;
    var top = src[base];
    for (var j = 1u; j < p.row; j++) { top = max(top, src[base + j]); }
    var sum = 0.0;
    for (var j = 0u; j < p.row; j++) { sum += exp(src[base + j] - top); }
    for (var j = 0u; j < p.row; j++) { dst[base + j] = exp(src[base + j] - top) / sum; }
}

// dx = y ⊙ (dy − Σ_j dy_j y_j), row by row.
@compute @workgroup_size(256)
fn softmax_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_index(gid, nwg);
    if r >= p.total { return; }
    let base = r * p.row;
    var dot = 0.0;
    for (var j = 0u; j < p.row; j++) { dot += dy[base + j] * y[base + j]; }
    for (var j = 0u; j < p.row; j++) { dx[base + j] = y[base + j] * (dy[base + j] - dot); }
}
