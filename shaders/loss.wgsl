// Softmax cross-entropy with integer labels, fused and stable: per row, the log-sum-exp
// (row maximum subtracted), the loss against the target q = (1 − ε)·onehot + ε/K (label
// smoothing ε, PyTorch's `label_smoothing`; ε = 0 is −log softmax(z)[label]):
// Σ_j q_j (lse − z_j) = lse − (1 − ε)·z[label] − ε/K·Σ_j z_j, the gradient (softmax − q)·scale,
// and whether the first arg-max equals the label.
// A batch of at most WORKGROUP rows and 65,536 logits is one workgroup that also sums the mean
// loss and the correct count (`main_small`); larger ones store per-row values (`main`) that
// `totals` sums, as it does for the other losses' (log_softmax.wgsl's nll, distill.wgsl).

struct Params {
    rows: u32, classes: u32, scale: f32,
    first_row: u32,   // `totals`: this pass sums rows first_row..rows, adding to the passes before
    smoothing: f32,   // ε
    _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(5) var<storage, read_write> row_correct: array<f32>;
@group(0) @binding(6) var<storage, read_write> loss: array<f32>;      // [1]: scale · Σ losses
@group(0) @binding(7) var<storage, read_write> correct: array<f32>;   // [1]: Σ correct

// Row r's loss and whether its first arg-max is the label; stores its gradient.
fn row(r: u32) -> vec2<f32> {
    let base = r * p.classes;
    let label = labels[r];
    var top = logits[base];
    var best = 0u;
    for (var j = 1u; j < p.classes; j++) {
        let z = logits[base + j];
        if z > top { top = z; best = j; }
    }
    var sum = 0.0;
    var logit_sum = 0.0;
    for (var j = 0u; j < p.classes; j++) {
        let z = logits[base + j];
        sum += exp(z - top);
        logit_sum += z;
    }
    let lse = top + log(sum);
    let off = p.smoothing / f32(p.classes);
    let on = 1.0 - p.smoothing + off;
    for (var j = 0u; j < p.classes; j++) {
        let prob = exp(logits[base + j] - lse);
        grad[base + j] = (prob - select(off, on, j == label)) * p.scale;
    }
    var loss = lse - logits[base + label];
    // Only with smoothing: 0 · (an infinite logit or sum) would make the plain loss NaN.
    if p.smoothing != 0.0 { loss -= off * logit_sum - p.smoothing * logits[base + label]; }
    return vec2<f32>(loss, select(0.0, 1.0, best == label));
}

@compute @workgroup_size(WORKGROUP_SMALL)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = small_invocation_index(gid, nwg);
    if r >= p.rows { return; }
    let v = row(r);
    row_loss[r] = v.x;
    row_correct[r] = v.y;
}

var<workgroup> partial: array<vec2<f32>, WORKGROUP>;

// Adds up the workgroup's (loss, correct) pairs in `partial` and stores the totals.
fn store_totals(i: u32) {
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if i < half { partial[i] += partial[i + half]; }
        workgroupBarrier();
    }
    if i == 0u {
        var before = vec2<f32>(0.0);
        if p.first_row > 0u { before = vec2<f32>(loss[0], correct[0]); }
        loss[0] = before.x + partial[0].x * p.scale;
        correct[0] = before.y + partial[0].y;
    }
}

// A batch of at most WORKGROUP rows, a row a lane: the gradient and the totals (also the
// first half of linear_cross_entropy.wgsl's `head_small`).
fn small_batch(i: u32) {
    var v = vec2<f32>(0.0);
    if i < p.rows { v = row(i); }
    partial[i] = v;
    store_totals(i);
}

@compute @workgroup_size(WORKGROUP)
fn main_small(@builtin(local_invocation_index) i: u32) {
    small_batch(i);
}

@compute @workgroup_size(WORKGROUP)
fn totals(@builtin(local_invocation_index) i: u32) {
    var v = vec2<f32>(0.0);
    for (var r = p.first_row + i; r < p.rows; r += WORKGROUP) {
        v += vec2<f32>(row_loss[r], row_correct[r]);
    }
    partial[i] = v;
    store_totals(i);
}

// Rows too long for one invocation's loops (`main` reads each logit three times): one
// workgroup per row, its lanes striding over the classes (rows.wgsl's trees add them up).
// Per-row values for `totals`, as `main`.
@compute @workgroup_size(WORKGROUP)
fn main_wide(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = row_of(wid, nwg);
    // Uniform across the workgroup, so the barriers in the trees stay in uniform control flow.
    if r >= p.rows { return; }
    let base = r * p.classes;
    // Every lane starts from class 0, so each has a value; strict > keeps first indices.
    var top = logits[base];
    var best = 0u;
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        let z = logits[base + j];
        if z > top { top = z; best = j; }
    }
    let row_best = row_argmax(lane, top, best);
    let row_top = logits[base + row_best];
    var sum = 0.0;
    var logit_sum = 0.0;
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        let z = logits[base + j];
        sum += exp(z - row_top);
        logit_sum += z;
    }
    let lse = row_top + log(row_sum(lane, sum));
    let all_logits = row_sum(lane, logit_sum);
    let label = labels[r];
    let off = p.smoothing / f32(p.classes);
    let on = 1.0 - p.smoothing + off;
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        let prob = exp(logits[base + j] - lse);
        grad[base + j] = (prob - select(off, on, j == label)) * p.scale;
    }
    if lane == 0u {
        var loss = lse - logits[base + label];
        if p.smoothing != 0.0 { loss -= off * all_logits - p.smoothing * logits[base + label]; }
        row_loss[r] = loss;
        row_correct[r] = select(0.0, 1.0, row_best == label);
    }
}
