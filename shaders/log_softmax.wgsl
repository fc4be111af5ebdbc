// log_softmax over the last axis, stable for logits of any magnitude (the row maximum is
// subtracted before exp), its backward pass, and the negative log-likelihood loss on it.
// One invocation per row; labels are u32 class indices.

struct Params {
    rows: u32, classes: u32, scale: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// backward: y holds log_softmax's output, dy the gradient of the loss by it.
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;
// nll: x holds log-probabilities.
@group(0) @binding(5) var<storage, read> labels: array<u32>;
@group(0) @binding(6) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(7) var<storage, read_write> row_correct: array<f32>;

// y = x − max − log Σ exp(x − max)
@compute @workgroup_size(WORKGROUP_SMALL)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = small_invocation_index(gid, nwg);
    if r >= p.rows { return; }
    let base = r * p.classes;
    var top = x[base];
    for (var j = 1u; j < p.classes; j++) { top = max(top, x[base + j]); }
    var sum = 0.0;
    for (var j = 0u; j < p.classes; j++) { sum += exp(x[base + j] - top); }
    let shift = top + log(sum);
    for (var j = 0u; j < p.classes; j++) { y[base + j] = x[base + j] - shift; }
}

// dx = dy − exp(y) · Σ dy
@compute @workgroup_size(WORKGROUP_SMALL)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = small_invocation_index(gid, nwg);
    if r >= p.rows { return; }
    let base = r * p.classes;
    var total = 0.0;
    for (var j = 0u; j < p.classes; j++) { total += dy[base + j]; }
    for (var j = 0u; j < p.classes; j++) { dx[base + j] = dy[base + j] - exp(y[base + j]) * total; }
}

// Per row: the loss −x[label], the gradient −scale at the label (0 elsewhere), and whether
// the first arg-max is the label.
@compute @workgroup_size(WORKGROUP_SMALL)
fn nll(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = small_invocation_index(gid, nwg);
    if r >= p.rows { return; }
    let base = r * p.classes;
    let label = labels[r];
    var best = 0u;
    for (var j = 1u; j < p.classes; j++) {
        if x[base + j] > x[base + best] { best = j; }
    }
    row_loss[r] = -x[base + label];
    row_correct[r] = select(0.0, 1.0, best == label);
    for (var j = 0u; j < p.classes; j++) { dx[base + j] = select(0.0, -p.scale, j == label); }
}

// ---- The same per workgroup, for rows too long for one invocation's loops: one workgroup
// per row, its lanes striding over the classes (rows.wgsl's trees add them up).

@compute @workgroup_size(WORKGROUP)
fn forward_wide(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = row_of(wid, nwg);
    if r >= p.rows { return; }   // uniform across the workgroup
    let base = r * p.classes;
    var top = x[base];
    for (var j = lane; j < p.classes; j += WORKGROUP) { top = max(top, x[base + j]); }
    let row_top = row_max(lane, top);
    var sum = 0.0;
    for (var j = lane; j < p.classes; j += WORKGROUP) { sum += exp(x[base + j] - row_top); }
    let shift = row_top + log(row_sum(lane, sum));
    for (var j = lane; j < p.classes; j += WORKGROUP) { y[base + j] = x[base + j] - shift; }
}

@compute @workgroup_size(WORKGROUP)
fn backward_wide(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = row_of(wid, nwg);
    if r >= p.rows { return; }
    let base = r * p.classes;
    var total = 0.0;
    for (var j = lane; j < p.classes; j += WORKGROUP) { total += dy[base + j]; }
    let row_total = row_sum(lane, total);
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        dx[base + j] = dy[base + j] - exp(y[base + j]) * row_total;
    }
}

@compute @workgroup_size(WORKGROUP)
fn nll_wide(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = row_of(wid, nwg);
    if r >= p.rows { return; }
    let base = r * p.classes;
    let label = labels[r];
    var top = x[base];
    var best = 0u;
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        if x[base + j] > top { top = x[base + j]; best = j; }
    }
    let row_best = row_argmax(lane, top, best);
    for (var j = lane; j < p.classes; j += WORKGROUP) { dx[base + j] = select(0.0, -p.scale, j == label); }
    if lane == 0u {
        row_loss[r] = -x[base + label];
        row_correct[r] = select(0.0, 1.0, row_best == label);
    }
}
