// Batch and layer normalisation, forward and backward. x is viewed as [outer][groups][inner]
// and statistics are taken per group over its outer·inner = count elements:
//   batch norm: outer = N, groups = C, inner = H·W, affine parameters indexed by group;
//   layer norm: outer = 1, groups = N, inner = C·H·W, affine parameters indexed by inner.
// Per-group reductions (`stats`, `backward_sums`) run on SPLITS workgroups of GROUP_LANES
// invocations per group, each lane walking a strided share of the group, then a tree in
// workgroup memory. With one split the workgroup stores the group's result; with more (enough
// workgroups to fill the adapter, and enough that no lane walks past the loop bound, chosen by
// src/ops/norm.rs) each stores its partial result and `stats_finish` / `backward_sums_finish`
// combine a group's. The statistics are one pass: each lane sums x − s and (x − s)² around the
// group's first value s (a value of the group, so a mean far from zero costs no precision),
// turns them into (count, mean, M2 = Σ(x − mean)²), and the lanes and splits combine those
// exactly (Chan et al.). (A shift per lane, its own first value, was as precise on random data
// but moved ResNet-20's conv1 weight gradient 1.6e-4 of its scale from PyTorch's, past the
// golden test's 1e-4; the group's shift and no shift stay within 2e-5.)
// Where INNER is a multiple of 4, src/ops/norm.rs runs the `…4` entries instead: the same
// passes over vec4s (x, dy, y, dx, γ, β and layer norm's dγ, dβ bound as arrays of vec4s),
// a quarter of the per-lane loads that bound these kernels on CPU adapters.
// ACT (an `Activation::code`; epilogue.wgsl is put in front) is an activation the norm applies
// last, in place of the activation layer after it (`Layer::absorbs_activation`): `normalize`
// applies it, and the backward entries take dy back through it, recomputing the output from
// x̂, γ and β as they go (no pass of its own, no read of the output).

struct Params {
    outer: u32, groups: u32, inner: u32, affine_per_inner: u32,
    eps: f32, momentum: f32, update_running: u32, training: u32,
    total: u32, cumulative: u32,
    run_groups: u32, _pad3: u32,             // layer norm's dγ, dβ: groups per run
    slope: f32, _pad0: u32, _pad1: u32, _pad2: u32,   // leaky ReLU's, with ACT
}

@group(0) @binding(0) var<uniform> p: Params;

// The layer's sizes, baked in per pipeline so that the per-element index arithmetic divides
// by constants (on lavapipe a division by a runtime value is a loop over the lanes): INNER
// always; GROUPS for batch norm (the channels), 0 for layer norm, whose groups are the batch
// and stay a parameter.
override INNER: u32;
override GROUPS: u32 = 0u;
override ACT: u32 = 0u;

fn inner() -> u32 { return INNER; }
fn groups() -> u32 { return select(p.groups, GROUPS, GROUPS != 0u); }
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(7) var<storage, read_write> var_biased: array<f32>;
@group(0) @binding(8) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(9) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(10) var<storage, read_write> y: array<f32>;
@group(0) @binding(11) var<storage, read_write> sums: array<vec4<f32>>;   // per group: Σg, Σg·x̂, Σdy, Σdy·x̂
@group(0) @binding(12) var<storage, read_write> dx: array<f32>;
@group(0) @binding(13) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(14) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(15) var<storage, read_write> batches: array<u32>;   // num_batches_tracked

const GROUP_LANES: u32 = WORKGROUP_SMALL;
// Workgroups per group of the reductions.
override SPLITS: u32 = 1u;
// Per (group, split), with SPLITS > 1: the statistics' (count, mean, M2, 0), or the four
// backward sums.
@group(0) @binding(24) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> partial: array<vec4<f32>, GROUP_LANES>;

fn count() -> u32 { return p.outer * inner(); }

/// Flat index of the t-th element (t < count) of group g.
fn element(g: u32, t: u32) -> u32 {
    return ((t / inner()) * groups() + g) * inner() + t % inner();
}

// Layer norm's outer is 1: element i's group is i / INNER, with no division by the groups.
fn group_of(i: u32) -> u32 {
    if GROUPS == 0u { return i / inner(); }
    return (i / inner()) % groups();
}

fn affine_index(i: u32) -> u32 {
    return select(group_of(i), i % inner(), p.affine_per_inner != 0u);
}

/// Sums `value` over the workgroup; every invocation gets the total.
fn workgroup_sum(lane: u32, value: vec4<f32>) -> vec4<f32> {
    partial[lane] = value;
    workgroupBarrier();
    for (var width = GROUP_LANES / 2u; width > 0u; width /= 2u) {
        if lane < width { partial[lane] += partial[lane + width]; }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 { return wid.x + wid.y * nwg.x; }

// The moments (count, mean, M2) of two disjoint sets combined (Chan, Golub and LeVeque).
fn combine(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    let n = a.x + b.x;
    if n == 0.0 { return vec4<f32>(0.0); }
    let delta = b.y - a.y;
    let w = b.x / n;
    return vec4<f32>(n, a.y + delta * w, a.z + b.z + delta * delta * a.x * w, 0.0);
}

/// The workgroup's moments combined; every invocation gets them.
fn workgroup_combine(lane: u32, value: vec4<f32>) -> vec4<f32> {
    partial[lane] = value;
    workgroupBarrier();
    for (var width = GROUP_LANES / 2u; width > 0u; width /= 2u) {
        if lane < width { partial[lane] = combine(partial[lane], partial[lane + width]); }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

// The moments of `count` values from their sums around `shift`: s1 = Σ(x − shift),
// s2 = Σ(x − shift)².
fn moments(count: f32, shift: f32, s1: f32, s2: f32) -> vec4<f32> {
    if count == 0.0 { return vec4<f32>(0.0); }
    let d = s1 / count;
    return vec4<f32>(count, shift + d, max(s2 - s1 * d, 0.0), 0.0);
}

// A reduction's workgroup: its group and split, and the first element its lane reads.
struct Share { g: u32, split: u32, first: u32 }

fn share(wid: vec3<u32>, nwg: vec3<u32>, lane: u32) -> Share {
    let id = group_id(wid, nwg);
    let split = id % SPLITS;
    return Share(id / SPLITS, split, split * GROUP_LANES + lane);
}

// The stride of a lane's walk over its group.
fn walk() -> u32 { return SPLITS * GROUP_LANES; }

// Group g's statistics from its moments.
fn store_moments(g: u32, m: vec4<f32>) { store_stats(g, m.y, m.z / m.x); }

// The gradient before ACT from dy after it, at the value whose x̂ this is, with affine element a.
fn through_act(d: f32, xhat: f32, a: u32) -> f32 {
    if ACT == 0u { return d; }
    let y = activate(xhat * gamma[a] + beta[a], ACT, p.slope);
    return d * activation_derivative(y, ACT, p.slope);
}

// Batch statistics (mean and biased variance, in one pass) and the running averages.
@compute @workgroup_size(GROUP_LANES)
fn stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lane: u32) {
    let at = share(wid, nwg, lane);
    if at.g >= groups() { return; }   // uniform across the workgroup
    let n = count();
    let shift = x[element(at.g, 0u)];
    var s1 = 0.0;
    var s2 = 0.0;
    var c = 0.0;
    for (var t = at.first; t < n; t += walk()) {
        let d = x[element(at.g, t)] - shift;
        s1 += d;
        s2 += d * d;
        c += 1.0;
    }
    let m = workgroup_combine(lane, moments(c, shift, s1, s2));
    if lane == 0u { moments_done(at, m); }
}

// A workgroup's moments: the group's statistics, or a split's partial moments.
fn moments_done(at: Share, m: vec4<f32>) {
    if SPLITS == 1u {
        store_moments(at.g, m);
    } else {
        partials[at.g * SPLITS + at.split] = m;
    }
}

// With SPLITS > 1, after `stats`: each group's splits combined.
@compute @workgroup_size(WORKGROUP_SMALL)
fn stats_finish(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x;
    if g >= groups() { return; }
    var m = vec4<f32>(0.0);
    for (var s = 0u; s < SPLITS; s++) { m = combine(m, partials[g * SPLITS + s]); }
    store_moments(g, m);
}

// Group g's mean and biased variance, its rstd and the running averages.
fn store_stats(g: u32, mu: f32, v: f32) {
    let n = count();
    mean[g] = mu;
    var_biased[g] = v;
    rstd[g] = inverseSqrt(v + p.eps);
    if p.update_running != 0u {
        let unbiased = v * f32(n) / f32(max(n, 2u) - 1u);
        // momentum = None in PyTorch: the cumulative average, 1 / (batches so far + this).
        let factor = select(p.momentum, 1.0 / (f32(batches[0]) + 1.0), p.cumulative != 0u);
        running_mean[g] = (1.0 - factor) * running_mean[g] + factor * mu;
        running_var[g] = (1.0 - factor) * running_var[g] + factor * unbiased;
    }
}

// After `stats` (which every group reads it in): one more batch tracked.
@compute @workgroup_size(1)
fn count_batch() {
    if p.update_running != 0u {
        batches[0] = batches[0] + select(1u, 0u, batches[0] == 0xffffffffu);
    }
}

// Eval mode: the statistics are the running ones.
@compute @workgroup_size(WORKGROUP_SMALL)
fn eval_stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x;
    if g >= groups() { return; }
    mean[g] = running_mean[g];
    rstd[g] = inverseSqrt(running_var[g] + p.eps);
}

@compute @workgroup_size(WORKGROUP)
fn normalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let g = group_of(i);
    let a = affine_index(i);
    y[i] = activate((x[i] - mean[g]) * rstd[g] * gamma[a] + beta[a], ACT, p.slope);
}

// Per group: Σ dy·γ, Σ dy·γ·x̂ (for dx) and Σ dy, Σ dy·x̂ (batch norm's dβ, dγ).
@compute @workgroup_size(GROUP_LANES)
fn backward_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lane: u32) {
    let at = share(wid, nwg, lane);
    let g = at.g;
    if g >= groups() { return; }
    let n = count();
    var s = vec4<f32>(0.0);
    for (var t = at.first; t < n; t += walk()) {
        let i = element(g, t);
        let xhat = (x[i] - mean[g]) * rstd[g];
        let d = through_act(dy[i], xhat, affine_index(i));
        let gy = d * gamma[affine_index(i)];
        s += vec4<f32>(gy, gy * xhat, d, d * xhat);
    }
    let total = workgroup_sum(lane, s);
    if lane == 0u { sums_done(at, total); }
}

// A workgroup's backward sums: the group's, or a split's part.
fn sums_done(at: Share, total: vec4<f32>) {
    if SPLITS == 1u {
        sums[at.g] = total;
    } else {
        partials[at.g * SPLITS + at.split] = total;
    }
}

// With SPLITS > 1, after `backward_sums`: each group's splits added up.
@compute @workgroup_size(WORKGROUP_SMALL)
fn backward_sums_finish(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x;
    if g >= groups() { return; }
    var total = vec4<f32>(0.0);
    for (var s = 0u; s < SPLITS; s++) { total += partials[g * SPLITS + s]; }
    sums[g] = total;
}

// Training: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·γ; eval: dx = g·rstd.
@compute @workgroup_size(WORKGROUP)
fn backward_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let g = group_of(i);
    let xhat = (x[i] - mean[g]) * rstd[g];
    let gy = through_act(dy[i], xhat, affine_index(i)) * gamma[affine_index(i)];
    if p.training == 0u {
        dx[i] = gy * rstd[g];
        return;
    }
    let n = f32(count());
    dx[i] = rstd[g] * (gy - sums[g].x / n - xhat * sums[g].y / n);
}

// Layer norm's dγ, dβ: one invocation per (affine element, run of `run_groups` groups, the
// batch), each run's sums in its row of dγ and dβ viewed as [runs][INNER] (src/ops/norm.rs adds
// the rows up where there is more than one run).
@compute @workgroup_size(WORKGROUP_SMALL)
fn affine_grads_per_inner(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    let k = index % inner();
    let first = (index / inner()) * p.run_groups;
    if first >= groups() { return; }
    var dg = 0.0;
    var db = 0.0;
    for (var a = 0u; a < p.outer; a++) {
        for (var g = first; g < min(first + p.run_groups, groups()); g++) {
            let i = (a * groups() + g) * inner() + k;
            let xhat = (x[i] - mean[g]) * rstd[g];
            let d = through_act(dy[i], xhat, k);
            dg += d * xhat;
            db += d;
        }
    }
    dgamma[index] = dg;
    dbeta[index] = db;
}

// Batch norm's dγ, dβ: the per-group sums.
@compute @workgroup_size(WORKGROUP_SMALL)
fn affine_grads_per_group(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x;
    if g >= groups() { return; }
    dgamma[g] = sums[g].w;
    dbeta[g] = sums[g].z;
}

// The vec4 passes (INNER a multiple of 4): vec4 number i of the tensor, INNER4 per row. They
// read x, dy, γ and β through `load_x4`, `load_dy4`, `load_gamma4`, `load_beta4` (bindings
// 16, 17, 20, 21), from storage or, where the adapter's calibration prefers them, textures:
// src/ops/norm.rs puts their declarations in front.
@group(0) @binding(18) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(19) var<storage, read_write> dx4: array<vec4<f32>>;
@group(0) @binding(22) var<storage, read_write> dgamma4: array<vec4<f32>>;
@group(0) @binding(23) var<storage, read_write> dbeta4: array<vec4<f32>>;

fn inner4() -> u32 { return INNER / 4u; }

// The vec4s a lane reads one after the other, inside one row (INNER / 4 is a multiple of
// it; src/ops/norm.rs picks it per pass, 1 on GPUs, whose lanes coalesce neighbouring
// reads). On CPU adapters, where every read is a per-lane gather, a lane's consecutive reads
// cost a fraction of reads spread across the lanes (the reductions' walks ran 2.4× faster in
// runs of 8), and in the element-wise passes the group's statistics, sums and batch norm's γ
// and β are read once per run, not five reads beside each vec4 of x.
override RUN4: u32 = 1u;

fn element4(g: u32, t: u32) -> u32 {
    return ((t / inner4()) * groups() + g) * inner4() + t % inner4();
}

fn group_of4(i: u32) -> u32 { return group_of(4u * i); }

// γ and β over a vec4 of the tensor.
struct Affine4 { gamma: vec4<f32>, beta: vec4<f32> }

// Batch norm's γ and β for group g, each the same over a vec4 (vec4 g / 4 of γ and β holds
// them), read once per group by the caller; layer norm's vary along the row: none here.
fn group_affine4(g: u32) -> Affine4 {
    if GROUPS == 0u { return Affine4(vec4<f32>(0.0), vec4<f32>(0.0)); }
    return Affine4(vec4<f32>(load_gamma4(g / 4u)[g % 4u]), vec4<f32>(load_beta4(g / 4u)[g % 4u]));
}

// γ and β at vec4 i: the group's (`fixed`, batch norm) or the row position's (layer norm).
fn affine_of4(i: u32, fixed: Affine4) -> Affine4 {
    if GROUPS != 0u { return fixed; }
    return Affine4(load_gamma4(i % inner4()), load_beta4(i % inner4()));
}

fn total(v: vec4<f32>) -> f32 { return v.x + v.y + v.z + v.w; }

// `through_act` over a vec4 whose γ and β are `a`.
fn through_act4(d: vec4<f32>, xhat: vec4<f32>, a: Affine4) -> vec4<f32> {
    if ACT == 0u { return d; }
    let y = activate_vec4(xhat * a.gamma + a.beta, ACT, p.slope);
    return d * activation_derivative_vec4(y, ACT, p.slope);
}

@compute @workgroup_size(GROUP_LANES)
fn stats4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let at = share(wid, nwg, lane);
    if at.g >= groups() { return; }
    let n4 = p.outer * inner4();
    let shift = vec4<f32>(load_x4(element4(at.g, 0u)).x);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var c = 0.0;
    for (var t = at.first * RUN4; t < n4; t += RUN4 * walk()) {
        let first = element4(at.g, t);
        for (var k = 0u; k < RUN4; k++) {
            let d = load_x4(first + k) - shift;
            s1 += d;
            s2 += d * d;
        }
        c += f32(RUN4);
    }
    var m = moments(c, shift.x, s1.x, s2.x);
    m = combine(m, moments(c, shift.y, s1.y, s2.y));
    m = combine(m, moments(c, shift.z, s1.z, s2.z));
    m = combine(m, moments(c, shift.w, s1.w, s2.w));
    m = workgroup_combine(lane, m);
    if lane == 0u { moments_done(at, m); }
}

// A run's group, the group's statistics and batch norm's γ and β.
struct Run4 { g: u32, mu: f32, r: f32, fixed: Affine4 }

fn run_at4(first: u32) -> Run4 {
    let g = group_of4(first);
    return Run4(g, mean[g], rstd[g], group_affine4(g));
}

@compute @workgroup_size(WORKGROUP)
fn normalize4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = invocation_index(gid, nwg) * RUN4;
    if first >= p.total / 4u { return; }
    let run = run_at4(first);
    for (var k = 0u; k < RUN4; k++) {
        let i = first + k;
        let a = affine_of4(i, run.fixed);
        y4[i] = activate_vec4((load_x4(i) - run.mu) * run.r * a.gamma + a.beta, ACT, p.slope);
    }
}

@compute @workgroup_size(GROUP_LANES)
fn backward_sums4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lane: u32) {
    let at = share(wid, nwg, lane);
    let g = at.g;
    if g >= groups() { return; }
    let n4 = p.outer * inner4();
    let mu = mean[g];
    let r = rstd[g];
    let fixed = group_affine4(g);
    var sg = vec4<f32>(0.0);
    var sgx = vec4<f32>(0.0);
    var sd = vec4<f32>(0.0);
    var sdx = vec4<f32>(0.0);
    for (var t = at.first * RUN4; t < n4; t += RUN4 * walk()) {
        let first = element4(g, t);
        for (var k = 0u; k < RUN4; k++) {
            let i = first + k;
            let xhat = (load_x4(i) - mu) * r;
            let a = affine_of4(i, fixed);
            let d = through_act4(load_dy4(i), xhat, a);
            let gy = d * a.gamma;
            sg += gy;
            sgx += gy * xhat;
            sd += d;
            sdx += d * xhat;
        }
    }
    let sums4 = workgroup_sum(lane, vec4<f32>(total(sg), total(sgx), total(sd), total(sdx)));
    if lane == 0u { sums_done(at, sums4); }
}

@compute @workgroup_size(WORKGROUP)
fn backward_dx4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = invocation_index(gid, nwg) * RUN4;
    if first >= p.total / 4u { return; }
    let run = run_at4(first);
    // Training's dx = rstd·(g − mean(g) − x̂·mean(g·x̂)); eval's is g·rstd.
    let training = p.training != 0u;
    var mean_gy = 0.0;
    var mean_gyx = 0.0;
    if training {
        let n = f32(count());
        mean_gy = sums[run.g].x / n;
        mean_gyx = sums[run.g].y / n;
    }
    for (var k = 0u; k < RUN4; k++) {
        let i = first + k;
        let xhat = (load_x4(i) - run.mu) * run.r;
        let a = affine_of4(i, run.fixed);
        let gy = through_act4(load_dy4(i), xhat, a) * a.gamma;
        if training {
            dx4[i] = run.r * (gy - mean_gy - xhat * mean_gyx);
        } else {
            dx4[i] = gy * run.r;
        }
    }
}

@compute @workgroup_size(WORKGROUP_SMALL)
fn affine_grads_per_inner4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    let k = index % inner4();
    let first = (index / inner4()) * p.run_groups;
    if first >= groups() { return; }
    var dg = vec4<f32>(0.0);
    var db = vec4<f32>(0.0);
    for (var a = 0u; a < p.outer; a++) {
        for (var g = first; g < min(first + p.run_groups, groups()); g++) {
            let i = (a * groups() + g) * inner4() + k;
            let xhat = (load_x4(i) - mean[g]) * rstd[g];
            let d = through_act4(load_dy4(i), xhat, affine_of4(i, Affine4()));
            dg += d * xhat;
            db += d;
        }
    }
    dgamma4[index] = dg;
    dbeta4[index] = db;
}
