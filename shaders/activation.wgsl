// Elementwise activations (codes and forward formulas in epilogue.wgsl) and their
// derivatives, plus a numerically stable softmax over the last axis, forward and backward.

struct Params {
    total: u32, _pad: u32, slope: f32, row: u32,   // row: softmax row length
}

@group(0) @binding(0) var<uniform> p: Params;

// The elementwise kernels' activation (an `Activation::code`), baked in per pipeline: a
// `switch` on a uniform's value costs every case's masked lanes on lavapipe.
override ACT: u32 = 0u;

// The elementwise kernels loop over vec4s with the grid's stride (`grid_stride`, one
// invocation per few vec4s: `elementwise_workgroups` in src/gpu/shared.rs), and reads stay
// contiguous across the lanes. Tensors are bound in whole vec4s (their buffers' size
// classes are multiples of 16 bytes); p.total counts vec4s, and the values computed in the
// padding past the last element are never read.

// ---- forward: dst = act(src)
@group(0) @binding(7) var<storage, read> src4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> dst4: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = invocation_index(gid, nwg); i < p.total; i += grid_stride(nwg)) {
        dst4[i] = activate_vec4(src4[i], ACT, p.slope);
    }
}

// ---- backward: dx = dy · act'(x), with act' written through y where that is cheaper.
@group(0) @binding(9) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read> y4: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dx4: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = invocation_index(gid, nwg); i < p.total; i += grid_stride(nwg)) {
        var d = vec4<f32>(1.0);
        switch ACT {
            // PyTorch's rule: only x ≤ 0 blocks the gradient (NaN passes it on).
            case ACT_RELU: { d = select(vec4<f32>(1.0), vec4<f32>(0.0), x4[i] <= vec4<f32>(0.0)); }
            case ACT_LEAKY_RELU: { d = select(vec4<f32>(p.slope), vec4<f32>(1.0), x4[i] > vec4<f32>(0.0)); }
            case ACT_SIGMOID: { let y = y4[i]; d = y * (1.0 - y); }
            case ACT_TANH: { let y = y4[i]; d = 1.0 - y * y; }
            case ACT_RELU6: { let x = x4[i]; d = select(vec4<f32>(0.0), vec4<f32>(1.0), (x > vec4<f32>(0.0)) & (x < vec4<f32>(6.0))); }
            default: {}
        }
        dx4[i] = dy4[i] * d;
    }
}

// ---- softmax: rows of f32
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(4) var<storage, read> y: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;

// ---- softmax over rows of length p.row; p.total counts rows.
@compute @workgroup_size(WORKGROUP)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = invocation_index(gid, nwg);
    if r >= p.total { return; }
    let base = r * p.row;
    var top = src[base];
    for (var j = 1u; j < p.row; j++) { top = max(top, src[base + j]); }
    var sum = 0.0;
    for (var j = 0u; j < p.row; j++) { sum += exp(src[base + j] - top); }
    for (var j = 0u; j < p.row; j++) { dst[base + j] = exp(src[base + j] - top) / sum; }
}

// dx = y ⊙ (dy − Σ_j dy_j y_j), row by row.
@compute @workgroup_size(WORKGROUP)
fn softmax_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = invocation_index(gid, nwg);
    if r >= p.total { return; }
    let base = r * p.row;
    var dot = 0.0;
    for (var j = 0u; j < p.row; j++) { dot += dy[base + j] * y[base + j]; }
    for (var j = 0u; j < p.row; j++) { dx[base + j] = y[base + j] * (dy[base + j] - dot); }
}

// ---- The same per workgroup, for rows too long for one invocation's loops: one workgroup
// per row, its lanes striding over it (rows.wgsl's trees add them up).
@compute @workgroup_size(WORKGROUP)
fn softmax_wide(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = row_of(wid, nwg);
    if r >= p.total { return; }   // uniform across the workgroup
    let base = r * p.row;
    var top = src[base];
    for (var j = lane; j < p.row; j += WORKGROUP) { top = max(top, src[base + j]); }
    let row_top = row_max(lane, top);
    var sum = 0.0;
    for (var j = lane; j < p.row; j += WORKGROUP) { sum += exp(src[base + j] - row_top); }
    let row_total = row_sum(lane, sum);
    for (var j = lane; j < p.row; j += WORKGROUP) {
        dst[base + j] = exp(src[base + j] - row_top) / row_total;
    }
}

@compute @workgroup_size(WORKGROUP)
fn softmax_backward_wide(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = row_of(wid, nwg);
    if r >= p.total { return; }
    let base = r * p.row;
    var dot = 0.0;
    for (var j = lane; j < p.row; j += WORKGROUP) { dot += dy[base + j] * y[base + j]; }
    let row_dot = row_sum(lane, dot);
    for (var j = lane; j < p.row; j += WORKGROUP) { dx[base + j] = y[base + j] * (dy[base + j] - row_dot); }
}
