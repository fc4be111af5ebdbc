// The weight gradient of a stride-1 convolution for CPU adapters such as lavapipe, where
// every per-lane buffer load is a costly gather but subgroup broadcasts are cheap. Generated
// per (kernel height, kernel width, block, subgroup size) by src/ops/conv_weight_grad.rs,
// specialised per shape:
//   dW[o, c, ky, kx] = Σ_{n, oy, ox} dy[n, o, oy, ox] · x[n, c, oy + ky - pad_top, ox + kx - pad_left]
// Each lane of a subgroup owns one filter o; the subgroup walks blocks of BLOCK outputs along
// a row together: each lane loads its filter's dy values, the input segment the block sees is
// loaded once per subgroup, spread over the lanes, and handed to every lane with
// subgroupBroadcast. A workgroup covers one (channel, filter group, split) and its subgroups
// take turns over the work; the splits' partial sums are added afterwards (or, with one
// split, written straight to dW). Like the subgroup matmul, it takes the subgroups of a
// one-dimensional workgroup to be consecutive runs of SUBGROUP invocations.

override C: u32;
override H: u32;
override W: u32;
override O: u32;
override OH: u32;
override OW: u32;
override PAD_TOP: u32;
override PAD_LEFT: u32;
override BLOCKS: u32;
override FILTER_GROUPS: u32;   // ⌈O / SUBGROUP⌉

struct Params {
    work: u32, splits: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
// [split][O][C][TAPS]: dW itself when there is one split.
@group(0) @binding(3) var<storage, read_write> dw: array<f32>;

const TAPS: u32 = {{TAPS}}u;
const SUBGROUP: u32 = {{SUBGROUP}}u;
const SUBGROUPS_PER_GROUP: u32 = 64u / SUBGROUP;
var<workgroup> partial: array<f32, {{PARTIALS}}>;

// x[row + ix], zero outside the image (the padding).
fn fetch(row: u32, ix: i32, inside: bool) -> f32 {
    let ok = inside && ix >= 0 && ix < i32(W);
    return select(0.0, x[row + u32(max(ix, 0))], ok);
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lindex: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let group = wg.x + wg.y * nwg.x;
    // Uniform per workgroup: the whole group leaves together, before any barrier.
    if group >= p.splits * C * FILTER_GROUPS { return; }
    let filters = group % FILTER_GROUPS;
    let c = (group / FILTER_GROUPS) % C;
    let split = group / (FILTER_GROUPS * C);
    // Lanes past the last filter read the last filter's dy; their sums are never stored.
    let o = min(filters * SUBGROUP + lane, O - 1u);
{{DECLS}}
    let first = split * SUBGROUPS_PER_GROUP + lindex / SUBGROUP;
    for (var t = first; t < p.work; t += p.splits * SUBGROUPS_PER_GROUP) {
        let block = t % BLOCKS;
        let rest = t / BLOCKS;
        let oy = rest % OH;
        let n = rest / OH;
        let ox0 = block * {{BLOCK}}u;
        let dy_row = ((n * O + o) * OH + oy) * OW + ox0;
        let left = i32(ox0) - i32(PAD_LEFT);
{{BODY}}
    }
{{STORE}}
    workgroupBarrier();
    for (var e = lindex; e < SUBGROUP * TAPS; e += 64u) {
        let l = e / TAPS;
        let tap = e % TAPS;
        let o_out = filters * SUBGROUP + l;
        if o_out < O {
            var sum = 0.0;
            for (var s = 0u; s < SUBGROUPS_PER_GROUP; s++) {
                sum += partial[(s * SUBGROUP + l) * TAPS + tap];
            }
            dw[((split * O + o_out) * C + c) * TAPS + tap] = sum;
        }
    }
}
