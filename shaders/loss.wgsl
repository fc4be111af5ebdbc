// Softmax cross-entropy with integer labels, fused and stable: per row, the log-sum-exp
// (row maximum subtracted), the loss −log softmax(z)[label], the gradient
// (softmax − onehot)·scale, and whether the first arg-max equals the label.
// Labels are stored as f32 (exact for class ids below 2^24).

struct Params {
    rows: u32, classes: u32, scale: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(5) var<storage, read_write> row_correct: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if r >= p.rows { return; }
    let base = r * p.classes;
    let label = u32(labels[r]);
    var top = logits[base];
    var best = 0u;
    for (var j = 1u; j < p.classes; j++) {
        let z = logits[base + j];
        if z > top { top = z; best = j; }
    }
    var sum = 0.0;
    for (var j = 0u; j < p.classes; j++) { sum += exp(logits[base + j] - top); }
    let lse = top + log(sum);
    row_loss[r] = lse - logits[base + label];
    row_correct[r] = select(0.0, 1.0, best == label);
    for (var j = 0u; j < p.classes; j++) {
        let prob = exp(logits[base + j] - lse);
        grad[base + j] = (prob - select(0.0, 1.0, j == label)) * p.scale;
    }
}
