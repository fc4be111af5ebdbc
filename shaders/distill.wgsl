// Knowledge distillation loss, fused per row of logits:
//   loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-α)·CE(s, label)
//   ∂loss/∂s = α·T·(softmax(s/T) − softmax(t/T)) + (1-α)·(softmax(s) − onehot)
// (both times `scale` = 1/N: the mean over the batch, PyTorch's "batchmean"), and whether
// the student's first arg-max equals the label. Labels are u32 class indices.

struct Params {
    rows: u32, classes: u32, scale: f32, alpha: f32,
    temperature: f32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> student: array<f32>;
@group(0) @binding(2) var<storage, read> teacher: array<f32>;
@group(0) @binding(3) var<storage, read> labels: array<u32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> row_correct: array<f32>;

// log Σ exp(scale·v) over the row at `base` of `which` (0 = student, 1 = teacher).
fn log_sum_exp(base: u32, which: u32, scale: f32) -> f32 {
    var top = -3.4e38;
    for (var j = 0u; j < p.classes; j++) {
        top = max(top, scale * select(student[base + j], teacher[base + j], which == 1u));
    }
    var sum = 0.0;
    for (var j = 0u; j < p.classes; j++) {
        sum += exp(scale * select(student[base + j], teacher[base + j], which == 1u) - top);
    }
    return top + log(sum);
}

// Logit `i` (the label's where `is_label`): stores its gradient and returns its KL term,
// given the row's log-sum-exps (of the student, and of both at temperature T).
fn column(i: u32, is_label: bool, lse: f32, lse_student: f32, lse_teacher: f32) -> f32 {
    let inv_t = 1.0 / p.temperature;
    let s = student[i];
    let log_pt = teacher[i] * inv_t - lse_teacher;
    let log_q = s * inv_t - lse_student;
    let pt = exp(log_pt);
    let soft = p.alpha * p.temperature * (exp(log_q) - pt);
    let hard = (1.0 - p.alpha) * (exp(s - lse) - select(0.0, 1.0, is_label));
    grad[i] = (soft + hard) * p.scale;
    return pt * (log_pt - log_q);
}

@compute @workgroup_size(WORKGROUP_SMALL)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = small_invocation_index(gid, nwg);
    if r >= p.rows { return; }
    let base = r * p.classes;
    let label = labels[r];
    let inv_t = 1.0 / p.temperature;
    let lse = log_sum_exp(base, 0u, 1.0);
    let lse_student = log_sum_exp(base, 0u, inv_t);
    let lse_teacher = log_sum_exp(base, 1u, inv_t);
    var kl = 0.0;
    var best = 0u;
    for (var j = 0u; j < p.classes; j++) {
        if student[base + j] > student[base + best] { best = j; }
        kl += column(base + j, j == label, lse, lse_student, lse_teacher);
    }
    let ce = lse - student[base + label];
    row_loss[r] = p.alpha * p.temperature * p.temperature * kl + (1.0 - p.alpha) * ce;
    row_correct[r] = select(0.0, 1.0, best == label);
}

// ---- The same per workgroup, for rows too long for one invocation's loops: one workgroup
// per row, its lanes striding over the classes (rows.wgsl's trees add them up).

// log Σ exp(scale·v) over the row at `base` of `which`, every lane taking part.
fn log_sum_exp_wide(lane: u32, base: u32, which: u32, scale: f32) -> f32 {
    var top = scale * select(student[base], teacher[base], which == 1u);
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        top = max(top, scale * select(student[base + j], teacher[base + j], which == 1u));
    }
    let row_top = row_max(lane, top);
    var sum = 0.0;
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        sum += exp(scale * select(student[base + j], teacher[base + j], which == 1u) - row_top);
    }
    return row_top + log(row_sum(lane, sum));
}

@compute @workgroup_size(WORKGROUP)
fn main_wide(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = row_of(wid, nwg);
    if r >= p.rows { return; }   // uniform across the workgroup
    let base = r * p.classes;
    let label = labels[r];
    let inv_t = 1.0 / p.temperature;
    let lse = log_sum_exp_wide(lane, base, 0u, 1.0);
    let lse_student = log_sum_exp_wide(lane, base, 0u, inv_t);
    let lse_teacher = log_sum_exp_wide(lane, base, 1u, inv_t);
    var kl = 0.0;
    var top = student[base];
    var best = 0u;
    for (var j = lane; j < p.classes; j += WORKGROUP) {
        let s = student[base + j];
        if s > top { top = s; best = j; }
        kl += column(base + j, j == label, lse, lse_student, lse_teacher);
    }
    let row_kl = row_sum(lane, kl);
    let row_best = row_argmax(lane, top, best);
    if lane == 0u {
        let ce = lse - student[base + label];
        row_loss[r] = p.alpha * p.temperature * p.temperature * row_kl + (1.0 - p.alpha) * ce;
        row_correct[r] = select(0.0, 1.0, row_best == label);
    }
}
