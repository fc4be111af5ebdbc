// Clipping gradients by their global norm, as PyTorch's clip_grad_norm_ (norm_type 2):
//   norm  = sqrt(Σ over every tensor and element g²)
//   g    *= min(1, max_norm / (norm + 1e-6))
// `squares`: one dispatch per tensor, each workgroup adding the squares of its
// WORKGROUP · PER_LANE elements into partials[first + workgroup]; `finish`: one workgroup adds
// the partials and stores the norm; `scale`: one dispatch per tensor, one element per
// invocation. Every loop is bounded (PER_LANE, and the partials count checked by the caller).
// rows.wgsl is put in front (row_sum: the workgroup's tree).

const PER_LANE: u32 = 64u;

struct Params {
    len: u32,        // elements of this tensor (`squares`, `scale`), partials (`finish`)
    first: u32,      // `squares`: this tensor's first partial
    max_norm: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> norm: array<f32>;   // [1]

@compute @workgroup_size(WORKGROUP)
fn squares(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let group = wid.x + wid.y * nwg.x;
    let start = group * WORKGROUP * PER_LANE;
    // The grid's spare workgroups (past 65,535 along x) own no values; uniform per workgroup.
    if start >= p.len { return; }
    var sum = 0.0;
    for (var k = 0u; k < PER_LANE; k++) {
        let i = start + k * WORKGROUP + lane;
        if i < p.len { sum += grad[i] * grad[i]; }
    }
    let total = row_sum(lane, sum);
    if lane == 0u { partials[p.first + group] = total; }
}

@compute @workgroup_size(WORKGROUP)
fn finish(@builtin(local_invocation_index) lane: u32) {
    var sum = 0.0;
    for (var i = lane; i < p.len; i += WORKGROUP) { sum += partials[i]; }
    let total = row_sum(lane, sum);
    if lane == 0u { norm[0] = sqrt(total); }
}

@compute @workgroup_size(WORKGROUP)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.len { return; }
    grad[i] *= min(1.0, p.max_norm / (norm[0] + 1e-6));
}
