// The weight gradient of a stride-1 convolution, directly (no im2col), generated per
// (kernel height, kernel width, block) by src/ops/conv_weight_grad.rs, specialised per shape:
//   dW[o, c, ky, kx] = Σ_{n, oy, ox} dy[n, o, oy, ox] · x[n, c, oy + ky - pad_top, ox + kx - pad_left]
// One workgroup per (o, c) pair. Each invocation walks blocks of BLOCK outputs along a row,
// loads the block's dy values and, per kernel row, the input segment they see once, and
// keeps the KH·KW partial sums in registers; the workgroup then adds its 64 partial sums.

// The shape, baked in per pipeline so that the index arithmetic divides by constants.
override C: u32;
override H: u32;
override W: u32;
override O: u32;
override OH: u32;
override OW: u32;
override PAD_TOP: u32;
override PAD_LEFT: u32;
override BLOCKS: u32;

struct Params {
    work: u32, splits: u32, _pad0: u32, _pad1: u32,   // splits: always 1 here
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dw: array<f32>;

const TAPS: u32 = {{TAPS}}u;
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
    @builtin(local_invocation_index) lane: u32,
) {
    let pair = wg.x + wg.y * nwg.x;
    // Uniform per workgroup: the whole group leaves together, before any barrier.
    if pair >= O * C { return; }
    let o = pair / C;
    let c = pair % C;
{{DECLS}}
    for (var t = lane; t < p.work; t += 64u) {
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
    if lane < TAPS {
        var sum = 0.0;
        for (var i = 0u; i < 64u; i++) {
            sum += partial[i * TAPS + lane];
        }
        dw[pair * TAPS + lane] = sum;
    }
}
