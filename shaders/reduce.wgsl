// Sums x viewed as [outer][mid][inner] over outer and inner:
// out[m] (+)= scale · Σ_a Σ_i x[a][m][i].
// `main`: one workgroup per output element, WORKGROUP_SMALL invocations striding over the
// outer·inner terms (in runs of RUN), then a tree reduction in workgroup memory.
// `per_output`: one invocation per output, for many short sums. `columns4`: one invocation
// per COLUMN_RUN vec4s of neighbouring outputs where inner is 1 and there are many (per-image
// weight gradients): vec4 reads of each slice in turn. Used for bias and batched weight
// gradients.
// src/ops/reduce.rs fills in the `{{…}}` parts per variant:
// - Elem is f32, or vec4<f32> where inner is a multiple of 4 (then INNER counts vec4s and
//   each per-lane access moves four terms);
// - TERM returns x's term, or for the gated variant dz = dy · act'(y) (x holds dy, `gate` the
//   activation's output y), which it also stores into `gated`: an activation's backward pass
//   fused with the bias gradient that sums it.

// inner is baked in per pipeline, so the index arithmetic divides by a constant; mid, which
// only multiplies and bounds, and outer (usually the batch) are parameters: one pipeline
// sums every layer's bias gradient of one inner size.
override INNER: u32;
// The gated variant's activation (an `Activation::code`).
override ACT: u32 = 0u;
// `main`: terms a lane adds one after the other, dividing INNER (src/ops/reduce.rs picks it:
// on CPU adapters runs of neighbouring terms cost less than terms spread across the lanes).
override RUN: u32 = 1u;

alias Elem = {{ELEM}};

// A pass sums the outer slices first_outer .. first_outer + outer: long sums run as several
// passes, each accumulating, so that no lane loops past the bound.
struct Params {
    outer: u32, accumulate: u32, scale: f32, slope: f32,
    first_outer: u32, mid: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> gate: array<Elem>;
@group(0) @binding(4) var<storage, read_write> gated: array<Elem>;

var<workgroup> partial: array<f32, WORKGROUP_SMALL>;

// act'(x) written through y = act(x).
fn derivative(y: Elem) -> Elem {
    switch ACT {
        case ACT_RELU: { return select(Elem(1.0), Elem(0.0), y <= Elem(0.0)); }   // NaN passes, as in PyTorch
        case ACT_LEAKY_RELU: { return select(Elem(p.slope), Elem(1.0), y > Elem(0.0)); }
        case ACT_SIGMOID: { return y * (1.0 - y); }
        case ACT_TANH: { return 1.0 - y * y; }
        case ACT_RELU6: { return select(Elem(0.0), Elem(1.0), (y > Elem(0.0)) & (y < Elem(6.0))); }   // ReLU6
        default: { return Elem(1.0); }
    }
}

fn term(index: u32) -> Elem {
{{TERM}}
}

fn total(v: Elem) -> f32 {
{{TOTAL}}
}

fn finish(m: u32, sum: f32) {
    var result = p.scale * sum;
    if p.accumulate != 0u { result += out[m]; }
    out[m] = result;
}

@compute @workgroup_size(WORKGROUP_SMALL)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let m = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if m >= p.mid { return; }
    let terms = p.outer * INNER;
    var sum = Elem(0.0);
    for (var t = lane * RUN; t < terms; t += WORKGROUP_SMALL * RUN) {
        let a = p.first_outer + t / INNER;
        let first = (a * p.mid + m) * INNER + t % INNER;
        for (var k = 0u; k < RUN; k++) {
            sum += term(first + k);
        }
    }
    partial[lane] = total(sum);
    workgroupBarrier();
    for (var width = WORKGROUP_SMALL / 2u; width > 0u; width /= 2u) {
        if lane < width { partial[lane] += partial[lane + width]; }
        workgroupBarrier();
    }
    if lane == 0u { finish(m, partial[0]); }
}

@compute @workgroup_size(WORKGROUP_SMALL)
fn per_output(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let m = small_invocation_index(gid, nwg);
    if m >= p.mid { return; }
    var sum = Elem(0.0);
    for (var a = p.first_outer; a < p.first_outer + p.outer; a++) {
        for (var i = 0u; i < INNER; i++) {
            sum += term((a * p.mid + m) * INNER + i);
        }
    }
    finish(m, total(sum));
}

// inner = 1, mid a multiple of 4: x as [outer][mid / 4] vec4s, out as vec4s (and in the
// gated variant y and dz as vec4s at bindings 3 and 4).
// The neighbouring vec4s of outputs a lane sums (src/ops/reduce.rs: on CPU adapters a lane's
// neighbouring reads cost less than reads spread across the lanes).
const COLUMN_RUN: u32 = {{COLUMN_RUN}}u;
@group(0) @binding(5) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> out4: array<vec4<f32>>;

// x4's vec4 at `index`; in the gated variant (Elem is then vec4) dz = dy · act'(y) from
// `gate`, stored into `gated` as well.
fn column_term(index: u32) -> vec4<f32> {
{{COLUMN_TERM}}
}

@compute @workgroup_size(WORKGROUP_SMALL)
fn columns4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = small_invocation_index(gid, nwg) * COLUMN_RUN;
    if first >= p.mid / 4u { return; }
    var sums: array<vec4<f32>, COLUMN_RUN>;
    for (var a = p.first_outer; a < p.first_outer + p.outer; a++) {
        for (var k = 0u; k < COLUMN_RUN; k++) {
            sums[k] += column_term(a * (p.mid / 4u) + first + k);
        }
    }
    for (var k = 0u; k < COLUMN_RUN; k++) {
        var result = p.scale * sums[k];
        if p.accumulate != 0u { result += out4[first + k]; }
        out4[first + k] = result;
    }
}
