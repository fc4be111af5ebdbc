// Grouped convolution (groups > 1; depthwise when groups = channels), driven by
// src/ops/conv_grouped.rs: filter o sees only the C/G input channels of its group
// g = o / (O/G), so each output is a short sum that one invocation computes directly (no
// im2col buffer, which for a depthwise layer would be all copies and no reuse).
// Any stride, dilation and padding (top/left given; bottom/right implied by the output size).
// Weights are [O][C/G][KH][KW], as in PyTorch.

// The layer's shape, baked in per pipeline (WGSL `override` constants) so that the index
// arithmetic divides by constants: on lavapipe a division by a runtime value is a scalar
// loop over the lanes, which cost this kernel 4× its time. The batch size stays a parameter.
override C: u32;
override H: u32;
override W: u32;
override O: u32;
override KH: u32;
override KW: u32;
override OH: u32;
override OW: u32;
override SH: u32;
override SW: u32;
override PAD_TOP: u32;
override PAD_LEFT: u32;
override DH: u32;
override DW: u32;
override GROUPS: u32;
override ACT: u32;
override HAS_BIAS: u32;

// n images from first_image on (the weight gradient runs in passes over runs of images;
// the other kernels take the whole batch, first_image 0).
struct Params {
    n: u32, total: u32, slope: f32, first_image: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;

fn weight_index(oc: u32, ci: u32, ky: u32, kx: u32) -> u32 {
    return ((oc * (C / GROUPS) + ci) * KH + ky) * KW + kx;
}

// src = x [N][C][H][W], dst = y [N][O][OH][OW]: one invocation per output.
@compute @workgroup_size(WORKGROUP_SMALL)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    let ox = index % OW;
    let oy = (index / OW) % OH;
    let oc = (index / (OW * OH)) % O;
    let n = index / (OW * OH * O);
    let per_group = C / GROUPS;
    let first_channel = (oc / (O / GROUPS)) * per_group;
    var sum = 0.0;
    for (var ci = 0u; ci < per_group; ci++) {
        let plane = (n * C + first_channel + ci) * H;
        for (var ky = 0u; ky < KH; ky++) {
            let iy = i32(oy * SH + ky * DH) - i32(PAD_TOP);
            if iy < 0 || iy >= i32(H) { continue; }
            for (var kx = 0u; kx < KW; kx++) {
                let ix = i32(ox * SW + kx * DW) - i32(PAD_LEFT);
                if ix < 0 || ix >= i32(W) { continue; }
                sum += src[(plane + u32(iy)) * W + u32(ix)] * weight[weight_index(oc, ci, ky, kx)];
            }
        }
    }
    if HAS_BIAS != 0u {
        sum += bias[oc];
    }
    dst[index] = activate(sum, ACT, p.slope);
}

// src = dy [N][O][OH][OW], dst = dx [N][C][H][W]: one invocation per input pixel gathers
// every output of its group whose window covered it.
@compute @workgroup_size(WORKGROUP_SMALL)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    let ix = index % W;
    let iy = (index / W) % H;
    let channel = (index / (W * H)) % C;
    let n = index / (W * H * C);
    let per_group = C / GROUPS;
    let filters = O / GROUPS;
    let group = channel / per_group;
    let ci = channel % per_group;
    var sum = 0.0;
    for (var f = 0u; f < filters; f++) {
        let oc = group * filters + f;
        let plane = (n * O + oc) * OH;
        for (var ky = 0u; ky < KH; ky++) {
            let t = i32(iy + PAD_TOP) - i32(ky * DH);
            if t < 0 || t % i32(SH) != 0 { continue; }
            let oy = u32(t) / SH;
            if oy >= OH { continue; }
            for (var kx = 0u; kx < KW; kx++) {
                let u = i32(ix + PAD_LEFT) - i32(kx * DW);
                if u < 0 || u % i32(SW) != 0 { continue; }
                let ox = u32(u) / SW;
                if ox >= OW { continue; }
                sum += src[(plane + oy) * OW + ox] * weight[weight_index(oc, ci, ky, kx)];
            }
        }
    }
    dst[index] = sum;
}

// dst = y [N][O][OH][OW] from the grouped im2col + matmul path: y = act(y + bias[o]) in
// place (that path's batched product has no per-group bias epilogue).
@compute @workgroup_size(WORKGROUP_SMALL)
fn bias_activation(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    var value = dst[index];
    if HAS_BIAS != 0u {
        value += bias[(index / (OH * OW)) % O];
    }
    dst[index] = activate(value, ACT, p.slope);
}

var<workgroup> partial: array<f32, WORKGROUP_SMALL>;

// The sum of `value` over the workgroup's lanes, returned to every lane (a tree in
// `partial`; the last barrier lets the next call reuse it).
fn workgroup_sum(value: f32, lane: u32) -> f32 {
    partial[lane] = value;
    workgroupBarrier();
    for (var half = WORKGROUP_SMALL / 2u; half > 0u; half >>= 1u) {
        if lane < half {
            partial[lane] += partial[lane + half];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

// src = x, weight = dy (bound in the weight slot), dst = dW [O][C/G][KH][KW]: one workgroup
// per weight, its WORKGROUP_SMALL (64) lanes striding over the N·OH·OW products and adding up in a tree.
@compute @workgroup_size(WORKGROUP_SMALL)
fn weight_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = wid.x + wid.y * nwg.x;
    let valid = index < p.total;
    let kx = index % KW;
    let ky = (index / KW) % KH;
    let per_group = C / GROUPS;
    let ci = (index / (KW * KH)) % per_group;
    let oc = index / (KW * KH * per_group);
    let channel = (oc / (O / GROUPS)) * per_group + ci;
    let positions = OH * OW;
    var sum = 0.0;
    if valid {
        for (var t = lane; t < p.n * positions; t += WORKGROUP_SMALL) {
            let n = p.first_image + t / positions;
            let oy = (t % positions) / OW;
            let ox = t % OW;
            let iy = i32(oy * SH + ky * DH) - i32(PAD_TOP);
            let ix = i32(ox * SW + kx * DW) - i32(PAD_LEFT);
            if iy < 0 || iy >= i32(H) || ix < 0 || ix >= i32(W) { continue; }
            let g = weight[((n * O + oc) * OH + oy) * OW + ox];
            sum += g * src[((n * C + channel) * H + u32(iy)) * W + u32(ix)];
        }
    }
    let total = workgroup_sum(sum, lane);
    if valid && lane == 0u {
        // Later passes add to the earlier ones' sums.
        dst[index] = total + select(0.0, dst[index], p.first_image > 0u);
    }
}

// Depthwise layers (one filter per channel: GROUPS = C = O) read each input row once per
// block of DEPTHWISE_BLOCK outputs instead of once per output, and keep the filter's taps
// in registers.
const DEPTHWISE_BLOCK: u32 = 8u;
// The input gradient at stride 1 runs `depthwise_rows` over dy with the taps rotated by 180°.
override FLIP: u32 = 0u;

// The inputs a block of outputs meets along one kernel row, first to last, and the most
// that are loaded once into registers for all its taps (wider blocks load per tap).
override SEGMENT: u32 = (DEPTHWISE_BLOCK - 1u) * SW + (KW - 1u) * DW + 1u;
const SEGMENT_MAX: u32 = 32u;

fn row_value(row: u32, ix: i32) -> f32 {
    if ix < 0 || ix >= i32(W) { return 0.0; }
    return src[row + u32(ix)];
}

fn tap(c: u32, ky: u32, kx: u32) -> f32 {
    if FLIP != 0u {
        return weight[(c * KH + KH - 1u - ky) * KW + KW - 1u - kx];
    }
    return weight[(c * KH + ky) * KW + kx];
}

// Output rows per invocation of the depthwise row kernels (1 or MAX_OUT_ROWS): each input
// row is read once for all the output rows it meets.
override OUT_ROWS: u32 = 1u;
const MAX_OUT_ROWS: u32 = 2u;

// The kernel row at which input row `i` of a block (counted from the first output row's
// first input row) meets the block's output row `r`, or KH where it does not.
fn kernel_row(i: u32, r: u32) -> u32 {
    if i < r * SH || (i - r * SH) % DH != 0u { return KH; }
    return min((i - r * SH) / DH, KH);
}

// src = x [N][C][H][W], dst = y [N][C][OH][OW]: one invocation per DEPTHWISE_BLOCK outputs
// along each of OUT_ROWS rows, invocations running over [N][C][OH / OUT_ROWS][blocks].
@compute @workgroup_size(WORKGROUP_SMALL)
fn depthwise_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    let blocks = (OW + DEPTHWISE_BLOCK - 1u) / DEPTHWISE_BLOCK;
    let row_blocks = (OH + OUT_ROWS - 1u) / OUT_ROWS;
    let ox = (index % blocks) * DEPTHWISE_BLOCK;
    let first_row = ((index / blocks) % row_blocks) * OUT_ROWS;
    let plane = index / (blocks * row_blocks);
    let c = plane % C;
    // sums[2r + h]: output row first_row + r, outputs ox + 4h … ox + 4h + 3.
    var sums: array<vec4<f32>, 2u * MAX_OUT_ROWS>;
    let left = i32(ox * SW) - i32(PAD_LEFT);
    for (var i = 0u; i < (OUT_ROWS - 1u) * SH + (KH - 1u) * DH + 1u; i++) {
        let iy = i32(first_row * SH + i) - i32(PAD_TOP);
        // Rows between a dilated filter's taps, or past the input, serve no output.
        var used = false;
        for (var r = 0u; r < OUT_ROWS; r++) { used = used || kernel_row(i, r) < KH; }
        if !used || iy < 0 || iy >= i32(H) { continue; }
        let row = (plane * H + u32(iy)) * W;
        if SEGMENT <= SEGMENT_MAX {
            // The row's inputs under the block, each loaded once for all taps and outputs.
            var segment: array<f32, SEGMENT_MAX>;
            for (var k = 0u; k < SEGMENT; k++) { segment[k] = row_value(row, left + i32(k)); }
            for (var r = 0u; r < OUT_ROWS; r++) {
                let ky = kernel_row(i, r);
                if ky >= KH { continue; }
                for (var kx = 0u; kx < KW; kx++) {
                    let w = tap(c, ky, kx);
                    for (var h = 0u; h < 2u; h++) {
                        let at = kx * DW + 4u * h * SW;
                        let values = vec4<f32>(
                            segment[at], segment[at + SW], segment[at + 2u * SW], segment[at + 3u * SW],
                        );
                        sums[2u * r + h] += values * w;
                    }
                }
            }
            continue;
        }
        // Wider blocks (dilated or strided filters): a load per tap.
        for (var r = 0u; r < OUT_ROWS; r++) {
            let ky = kernel_row(i, r);
            if ky >= KH { continue; }
            for (var kx = 0u; kx < KW; kx++) {
                let w = tap(c, ky, kx);
                let step = i32(SW);
                for (var h = 0u; h < 2u; h++) {
                    let ix = left + i32(kx * DW) + 4 * i32(h) * step;
                    let values = vec4<f32>(
                        row_value(row, ix),
                        row_value(row, ix + step),
                        row_value(row, ix + 2 * step),
                        row_value(row, ix + 3 * step),
                    );
                    sums[2u * r + h] += values * w;
                }
            }
        }
    }
    var b = 0.0;
    if HAS_BIAS != 0u { b = bias[c]; }
    for (var r = 0u; r < OUT_ROWS; r++) {
        if first_row + r >= OH { break; }
        let out = (plane * OH + first_row + r) * OW + ox;
        for (var j = 0u; j < DEPTHWISE_BLOCK; j++) {
            if ox + j < OW {
                dst[out + j] = activate(sums[2u * r + j / 4u][j % 4u] + b, ACT, p.slope);
            }
        }
    }
}

// A depthwise input gradient at a stride that divides DEPTHWISE_BLOCK (2, 4 or 8): one
// invocation per DEPTHWISE_BLOCK inputs along a row of dx, each dy row they meet loaded
// once as the DX_SEGMENT values under the block. Input ix0 + j meets tap kx where
// e = PAD_LEFT + j − kx·DW is a multiple of SW, at output ix0 / SW + e / SW; with ix0 a
// multiple of SW both tests fold to constants once the loops unroll. DX_SHIFT (a multiple
// of SW at least the filter's reach) keeps e in unsigned arithmetic.
override DX_SHIFT: u32 = ((KW - 1u) * DW + SW - 1u) / SW * SW;
override DX_FIRST: u32 = (PAD_LEFT + DX_SHIFT - (KW - 1u) * DW + SW - 1u) / SW;
override DX_SEGMENT: u32 = (PAD_LEFT + DX_SHIFT + DEPTHWISE_BLOCK - 1u) / SW - DX_FIRST + 1u;
const DX_SEGMENT_MAX: u32 = 16u;

// src = dy [N][C][OH][OW], dst = dx [N][C][H][W], invocations over [N][C][H][blocks].
@compute @workgroup_size(WORKGROUP_SMALL)
fn depthwise_rows_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    let blocks = (W + DEPTHWISE_BLOCK - 1u) / DEPTHWISE_BLOCK;
    let ix0 = (index % blocks) * DEPTHWISE_BLOCK;
    let iy = (index / blocks) % H;
    let plane = index / (blocks * H);
    let c = plane % C;
    var sums = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var ky = 0u; ky < KH; ky++) {
        let t = i32(iy + PAD_TOP) - i32(ky * DH);
        if t < 0 || t % i32(SH) != 0 || u32(t) / SH >= OH { continue; }
        let row = (plane * OH + u32(t) / SH) * OW;
        // Outputs ix0 / SW + DX_FIRST + k − DX_SHIFT / SW, zero past either end.
        var segment: array<f32, DX_SEGMENT_MAX>;
        for (var k = 0u; k < DX_SEGMENT; k++) {
            let ox = i32(ix0 / SW + DX_FIRST + k) - i32(DX_SHIFT / SW);
            var value = 0.0;
            if ox >= 0 && ox < i32(OW) { value = src[row + u32(ox)]; }
            segment[k] = value;
        }
        for (var kx = 0u; kx < KW; kx++) {
            let w = tap(c, ky, kx);
            for (var j = 0u; j < DEPTHWISE_BLOCK; j++) {
                let e = PAD_LEFT + j + DX_SHIFT - kx * DW;
                if e % SW == 0u {
                    sums[j / 4u][j % 4u] += segment[e / SW - DX_FIRST] * w;
                }
            }
        }
    }
    let out = (plane * H + iy) * W + ix0;
    for (var j = 0u; j < DEPTHWISE_BLOCK; j++) {
        if ix0 + j < W {
            dst[out + j] = sums[j / 4u][j % 4u];
        }
    }
}

// Depthwise: room for a filter of up to 7×7 taps.
const DEPTHWISE_MAX_TAPS: u32 = 49u;

// src = x, weight = dy (bound in the weight slot), dst = dW [C][1][KH][KW]: CHANNEL_LANES
// lanes per channel; each lane walks its share of the N·OH·(OW / DEPTHWISE_BLOCK) blocks of outputs
// along a row, reading the block's dy once and each kernel row's SEGMENT of inputs once
// (where it is at most SEGMENT_MAX wide, else per tap) for all its taps, then the taps are
// added up across the lanes.
@compute @workgroup_size(WORKGROUP_SMALL)
fn depthwise_weight_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let first_channel = (wid.x + wid.y * nwg.x) * CHANNELS_PER_GROUP;
    let c = first_channel + lane / CHANNEL_LANES;
    let valid = c < C;
    let blocks = (OW + DEPTHWISE_BLOCK - 1u) / DEPTHWISE_BLOCK;
    let per_image = OH * blocks;
    var sums: array<f32, DEPTHWISE_MAX_TAPS>;
    if valid {
        for (var t = lane % CHANNEL_LANES; t < p.n * per_image; t += CHANNEL_LANES) {
            let n = p.first_image + t / per_image;
            let oy = (t % per_image) / blocks;
            let ox = (t % blocks) * DEPTHWISE_BLOCK;
            let dy_row = ((n * C + c) * OH + oy) * OW + ox;
            // The block's dy, zero past the row's end.
            var g: array<f32, DEPTHWISE_BLOCK>;
            for (var j = 0u; j < DEPTHWISE_BLOCK; j++) {
                if ox + j < OW { g[j] = weight[dy_row + j]; }
            }
            let plane = (n * C + c) * H;
            let left = i32(ox * SW) - i32(PAD_LEFT);
            for (var ky = 0u; ky < KH; ky++) {
                let iy = i32(oy * SH + ky * DH) - i32(PAD_TOP);
                if iy < 0 || iy >= i32(H) { continue; }
                let row = (plane + u32(iy)) * W;
                if SEGMENT <= SEGMENT_MAX {
                    var segment: array<f32, SEGMENT_MAX>;
                    for (var k = 0u; k < SEGMENT; k++) { segment[k] = row_value(row, left + i32(k)); }
                    for (var kx = 0u; kx < KW; kx++) {
                        for (var j = 0u; j < DEPTHWISE_BLOCK; j++) {
                            sums[ky * KW + kx] += g[j] * segment[j * SW + kx * DW];
                        }
                    }
                    continue;
                }
                for (var kx = 0u; kx < KW; kx++) {
                    for (var j = 0u; j < DEPTHWISE_BLOCK; j++) {
                        let ix = left + i32(j * SW + kx * DW);
                        sums[ky * KW + kx] += g[j] * row_value(row, ix);
                    }
                }
            }
        }
    }
    store_tap_sums(sums, lane, first_channel);
}

// Every lane's sum of every tap, [tap][lane], for the column sums of `store_tap_sums`.
var<workgroup> tap_partials: array<f32, DEPTHWISE_MAX_TAPS * WORKGROUP_SMALL>;

// Lanes per channel in the depthwise weight gradients (a power of two dividing the
// workgroup): one subgroup on CPU adapters, whose workgroups then serve several channels
// (see `channel_lanes` in conv_grouped.rs).
override CHANNEL_LANES: u32 = WORKGROUP_SMALL;
override CHANNELS_PER_GROUP: u32 = WORKGROUP_SMALL / CHANNEL_LANES;

// dW (+)= Σ over each unit's CHANNEL_LANES lanes of their `sums`, for the workgroup's units
// from `first_unit` on. A unit is a run of FILTER_RUN filters of a group and one channel of
// that group (units over [O / FILTER_RUN][C / GROUPS]; a depthwise layer's: one channel),
// its sums every tap of its first filter, then of the next. Every lane's sums go to
// workgroup memory, then one lane per unit and sum adds up its run (one barrier in all; a
// tree per tap took eight, and on lavapipe either tree cost N1 C672 14² 5×5 10 of its 17 ms).
fn store_tap_sums(sums: array<f32, DEPTHWISE_MAX_TAPS>, lane: u32, first_unit: u32) {
    let taps = KH * KW;
    let per_group = C / GROUPS;
    let units = O / FILTER_RUN * per_group;
    for (var k = 0u; k < FILTER_RUN * taps; k++) {
        tap_partials[k * WORKGROUP_SMALL + lane] = sums[k];
    }
    workgroupBarrier();
    for (var q = lane; q < CHANNELS_PER_GROUP * FILTER_RUN * taps; q += WORKGROUP_SMALL) {
        let slot = q / (FILTER_RUN * taps);
        let k = q % (FILTER_RUN * taps);
        let u = first_unit + slot;
        if u < units {
            let run = k * WORKGROUP_SMALL + slot * CHANNEL_LANES;
            var total = 0.0;
            for (var l = 0u; l < CHANNEL_LANES; l++) {
                total += tap_partials[run + l];
            }
            let o = u / per_group * FILTER_RUN + k / taps;
            let i = (o * per_group + u % per_group) * taps + k % taps;
            // Later passes add to the earlier ones' sums.
            dst[i] = total + select(0.0, dst[i], p.first_image > 0u);
        }
    }
}

// depthwise_rows over whole vec4s (stride 1, no dilation, W and OW multiples of 4, a left
// padding of at most 4 and a filter at most PAD_LEFT + 5 wide): an invocation's QUADS vec4s
// of outputs along each of OUT_ROWS rows read their inputs as the QUADS + 2 aligned vec4s
// around them (the one before, their own, the one after) instead of 4·QUADS·KW scalars, each
// input row once for all the output rows it meets (OUT_ROWS + KH − 1 rows, not OUT_ROWS·KH),
// and store whole vec4s.
override QUADS: u32 = 1u;
const MAX_QUADS: u32 = 2u;

@group(0) @binding(5) var<storage, read> src4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> dst4: array<vec4<f32>>;

fn row_quad(row: u32, quad: i32) -> vec4<f32> {
    if quad < 0 || quad >= i32(W / 4u) { return vec4<f32>(0.0); }
    return src4[row + u32(quad)];
}

// Input columns 4·first_quad − 4 … 4·(first_quad + QUADS) + 3 of a row, in order.
fn row_values(row: u32, first_quad: u32) -> array<f32, 16> {
    var values: array<f32, 16>;
    for (var q = 0u; q < QUADS + 2u; q++) {
        let quad = row_quad(row, i32(first_quad + q) - 1);
        for (var k = 0u; k < 4u; k++) {
            values[4u * q + k] = quad[k];
        }
    }
    return values;
}

// The four inputs that outputs 4·q … 4·q + 3 of the block meet at tap kx.
fn window(values: array<f32, 16>, q: u32, kx: u32) -> vec4<f32> {
    let first = 4u * q + 4u - PAD_LEFT + kx;
    return vec4<f32>(values[first], values[first + 1u], values[first + 2u], values[first + 3u]);
}

// Block `index` of the vec4 row kernels, over [planes (or runs and images)][OH / OUT_ROWS]
// [OW / (4·QUADS)]: its first vec4 of outputs along a row, its first output row, and the
// index of what comes before them.
struct RowBlock { quad: u32, row: u32, rest: u32 }

fn row_block(index: u32) -> RowBlock {
    let blocks = OW / (4u * QUADS);
    let row_blocks = (OH + OUT_ROWS - 1u) / OUT_ROWS;
    return RowBlock(index % blocks * QUADS, index / blocks % row_blocks * OUT_ROWS, index / (blocks * row_blocks));
}

// The row blocks of one output plane.
fn plane_row_blocks() -> u32 {
    return (OH + OUT_ROWS - 1u) / OUT_ROWS * (OW / (4u * QUADS));
}

@compute @workgroup_size(WORKGROUP_SMALL)
fn depthwise_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = row_block(index);
    let first_quad = block.quad;
    let first_row = block.row;
    let plane = block.rest;
    let c = plane % C;
    // sums[r·QUADS + q]: output row first_row + r, vec4 first_quad + q.
    var sums: array<vec4<f32>, MAX_QUADS * MAX_OUT_ROWS>;
    for (var i = 0u; i < OUT_ROWS + KH - 1u; i++) {
        let iy = i32(first_row + i) - i32(PAD_TOP);
        if iy < 0 || iy >= i32(H) { continue; }
        let values = row_values((plane * H + u32(iy)) * (W / 4u), first_quad);
        for (var r = 0u; r < OUT_ROWS; r++) {
            let ky = kernel_row(i, r);
            if ky >= KH { continue; }
            for (var kx = 0u; kx < KW; kx++) {
                let w = tap(c, ky, kx);
                for (var q = 0u; q < QUADS; q++) {
                    sums[r * QUADS + q] += window(values, q, kx) * w;
                }
            }
        }
    }
    var b = 0.0;
    if HAS_BIAS != 0u { b = bias[c]; }
    for (var r = 0u; r < OUT_ROWS; r++) {
        if first_row + r >= OH { break; }
        let out = (plane * OH + first_row + r) * (OW / 4u) + first_quad;
        for (var q = 0u; q < QUADS; q++) {
            let sum = sums[r * QUADS + q] + vec4<f32>(b);
            dst4[out + q] = vec4<f32>(
                activate(sum.x, ACT, p.slope),
                activate(sum.y, ACT, p.slope),
                activate(sum.z, ACT, p.slope),
                activate(sum.w, ACT, p.slope),
            );
        }
    }
}

// Filters of one group an invocation of `grouped_rows4` computes (src/ops/conv_grouped.rs:
// 4, 2 or 1, dividing O / GROUPS).
override FILTER_RUN: u32 = 1u;
const MAX_FILTER_RUN: u32 = 4u;
// The most taps a `grouped_rows4` invocation holds per channel (5×5).
const GROUPED_MAX_TAPS: u32 = 25u;
// `grouped_rows4`'s weights (`grouped_bank`): per run of FILTER_RUN filters and channel of
// their group, KH·KW vec4s, one per tap, holding the run's filters' weights side by side
// (zero past FILTER_RUN), so that an invocation loads a channel's taps as KH·KW vec4s.
@group(0) @binding(8) var<storage, read> bank4: array<vec4<f32>>;

// Tap (ky, kx) of filter oc for its group's input channel ci; with FLIP, of the input
// gradient's filters, which `grouped_rows4` runs as a grouped convolution of dy (C and O
// swapped: oc is a channel of x, ci a filter of its group) over the weights [C][O/G][KH][KW]
// rotated by 180°: filter g·(C/G) + ci's tap for its group's channel oc % (O/G).
fn grouped_tap(oc: u32, ci: u32, ky: u32, kx: u32) -> f32 {
    if FLIP != 0u {
        let forward_filter = oc / (O / GROUPS) * (C / GROUPS) + ci;
        return weight[((forward_filter * (O / GROUPS) + oc % (O / GROUPS)) * KH + KH - 1u - ky) * KW + KW - 1u - kx];
    }
    return weight[weight_index(oc, ci, ky, kx)];
}

// dst4 = the bank above from the weights, one invocation per vec4 (with FLIP: the input
// gradient's rotated filters, as `grouped_tap` reads them).
@compute @workgroup_size(WORKGROUP_SMALL)
fn grouped_bank(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    let tap = index % (KH * KW);
    let ci = index / (KH * KW) % (C / GROUPS);
    let o0 = index / (KH * KW * (C / GROUPS)) * FILTER_RUN;
    var taps = vec4<f32>(0.0);
    for (var f = 0u; f < FILTER_RUN; f++) {
        taps[f] = grouped_tap(o0 + f, ci, tap / KW, tap % KW);
    }
    dst4[index] = taps;
}

// A grouped convolution with several channels and filters a group (not depthwise) on
// depthwise_rows4's shapes: one invocation per FILTER_RUN filters of a group, QUADS vec4s
// of outputs along each of OUT_ROWS rows, invocations over [N][O / FILTER_RUN][OH /
// OUT_ROWS][blocks]. Per channel of the group, each input row is loaded once (QUADS + 2
// vec4s) for every filter, tap and output row it serves, and each tap as one vec4 of the
// bank (the run's filters side by side) per output row, where one output per invocation
// (`forward`) loads an input and a weight per product. (Holding a channel's taps in an
// array for both output rows was slower on lavapipe: 9.3 ms against 4.4.)
@compute @workgroup_size(WORKGROUP_SMALL)
fn grouped_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = small_invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = row_block(index);
    let first_quad = block.quad;
    let first_row = block.row;
    let o0 = block.rest % (O / FILTER_RUN) * FILTER_RUN;
    let n = block.rest / (O / FILTER_RUN);
    let per_group = C / GROUPS;
    let first_channel = o0 / (O / GROUPS) * per_group;
    // sums[(f·OUT_ROWS + r)·QUADS + q]: filter o0 + f, output row first_row + r, vec4
    // first_quad + q.
    var sums: array<vec4<f32>, MAX_FILTER_RUN * MAX_OUT_ROWS * MAX_QUADS>;
    for (var ci = 0u; ci < per_group; ci++) {
        let plane = n * C + first_channel + ci;
        let bank_first = (o0 / FILTER_RUN * per_group + ci) * KH * KW;
        for (var i = 0u; i < OUT_ROWS + KH - 1u; i++) {
            let iy = i32(first_row + i) - i32(PAD_TOP);
            if iy < 0 || iy >= i32(H) { continue; }
            let values = row_values((plane * H + u32(iy)) * (W / 4u), first_quad);
            for (var r = 0u; r < OUT_ROWS; r++) {
                let ky = kernel_row(i, r);
                if ky >= KH { continue; }
                for (var kx = 0u; kx < KW; kx++) {
                    let w = bank4[bank_first + ky * KW + kx];
                    for (var q = 0u; q < QUADS; q++) {
                        let inputs = window(values, q, kx);
                        for (var f = 0u; f < FILTER_RUN; f++) {
                            sums[(f * OUT_ROWS + r) * QUADS + q] += inputs * w[f];
                        }
                    }
                }
            }
        }
    }
    for (var f = 0u; f < FILTER_RUN; f++) {
        var b = 0.0;
        if HAS_BIAS != 0u { b = bias[o0 + f]; }
        for (var r = 0u; r < OUT_ROWS; r++) {
            if first_row + r >= OH { break; }
            let out = ((n * O + o0 + f) * OH + first_row + r) * (OW / 4u) + first_quad;
            for (var q = 0u; q < QUADS; q++) {
                let sum = sums[(f * OUT_ROWS + r) * QUADS + q] + vec4<f32>(b);
                dst4[out + q] = vec4<f32>(
                    activate(sum.x, ACT, p.slope),
                    activate(sum.y, ACT, p.slope),
                    activate(sum.z, ACT, p.slope),
                    activate(sum.w, ACT, p.slope),
                );
            }
        }
    }
}

@group(0) @binding(7) var<storage, read> dy4: array<vec4<f32>>;

// depthwise_weight_grad over whole vec4s (depthwise_rows4's shapes): each lane takes QUADS
// vec4s of outputs along each of OUT_ROWS rows at a time, dy as OUT_ROWS·QUADS loads and the
// OUT_ROWS + KH − 1 input rows they meet as QUADS + 2 each.
@compute @workgroup_size(WORKGROUP_SMALL)
fn depthwise_weight_grad4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let first_channel = (wid.x + wid.y * nwg.x) * CHANNELS_PER_GROUP;
    let c = first_channel + lane / CHANNEL_LANES;
    let valid = c < C;
    var sums: array<f32, DEPTHWISE_MAX_TAPS>;
    if valid {
        for (var t = lane % CHANNEL_LANES; t < p.n * plane_row_blocks(); t += CHANNEL_LANES) {
            let block = row_block(t);
            let first_quad = block.quad;
    let first_row = block.row;
            let plane = (p.first_image + block.rest) * C + c;
            // Output rows past OH (an odd OH's last block) keep g zero and are skipped below.
            var g: array<vec4<f32>, MAX_QUADS * MAX_OUT_ROWS>;
            for (var r = 0u; r < OUT_ROWS; r++) {
                if first_row + r >= OH { break; }
                let dy_row = (plane * OH + first_row + r) * (OW / 4u) + first_quad;
                for (var q = 0u; q < QUADS; q++) {
                    g[r * QUADS + q] = dy4[dy_row + q];
                }
            }
            for (var i = 0u; i < OUT_ROWS + KH - 1u; i++) {
                let iy = i32(first_row + i) - i32(PAD_TOP);
                if iy < 0 || iy >= i32(H) { continue; }
                let values = row_values((plane * H + u32(iy)) * (W / 4u), first_quad);
                for (var r = 0u; r < OUT_ROWS; r++) {
                    let ky = kernel_row(i, r);
                    if ky >= KH || first_row + r >= OH { continue; }
                    for (var kx = 0u; kx < KW; kx++) {
                        for (var q = 0u; q < QUADS; q++) {
                            sums[ky * KW + kx] += dot(window(values, q, kx), g[r * QUADS + q]);
                        }
                    }
                }
            }
        }
    }
    store_tap_sums(sums, lane, first_channel);
}

// grouped_rows4's weight gradient: CHANNEL_LANES lanes per unit (a run of FILTER_RUN filters
// and one channel of their group; units over [O / FILTER_RUN][C / GROUPS]), each lane taking
// QUADS vec4s of outputs along each of OUT_ROWS rows at a time: the run's dy there
// (FILTER_RUN·OUT_ROWS·QUADS loads) and the channel's input rows they meet (QUADS + 2 each),
// summed into every tap of every filter of the run; then `store_tap_sums`.
@compute @workgroup_size(WORKGROUP_SMALL)
fn grouped_weight_grad4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let per_group = C / GROUPS;
    let units = O / FILTER_RUN * per_group;
    let first_unit = (wid.x + wid.y * nwg.x) * CHANNELS_PER_GROUP;
    let unit = first_unit + lane / CHANNEL_LANES;
    let o0 = unit / per_group * FILTER_RUN;
    let channel = o0 / (O / GROUPS) * per_group + unit % per_group;
    let taps = KH * KW;
    var sums: array<f32, DEPTHWISE_MAX_TAPS>;
    if unit < units {
        for (var t = lane % CHANNEL_LANES; t < p.n * plane_row_blocks(); t += CHANNEL_LANES) {
            let block = row_block(t);
            let first_quad = block.quad;
    let first_row = block.row;
            let image = p.first_image + block.rest;
            // Output rows past OH (an odd OH's last block) keep g zero and are skipped below.
            var g: array<vec4<f32>, MAX_FILTER_RUN * MAX_OUT_ROWS * MAX_QUADS>;
            for (var f = 0u; f < FILTER_RUN; f++) {
                for (var r = 0u; r < OUT_ROWS; r++) {
                    if first_row + r >= OH { break; }
                    let dy_row = ((image * O + o0 + f) * OH + first_row + r) * (OW / 4u) + first_quad;
                    for (var q = 0u; q < QUADS; q++) {
                        g[(f * OUT_ROWS + r) * QUADS + q] = dy4[dy_row + q];
                    }
                }
            }
            for (var i = 0u; i < OUT_ROWS + KH - 1u; i++) {
                let iy = i32(first_row + i) - i32(PAD_TOP);
                if iy < 0 || iy >= i32(H) { continue; }
                let values = row_values(((image * C + channel) * H + u32(iy)) * (W / 4u), first_quad);
                for (var r = 0u; r < OUT_ROWS; r++) {
                    let ky = kernel_row(i, r);
                    if ky >= KH || first_row + r >= OH { continue; }
                    for (var kx = 0u; kx < KW; kx++) {
                        for (var q = 0u; q < QUADS; q++) {
                            let inputs = window(values, q, kx);
                            for (var f = 0u; f < FILTER_RUN; f++) {
                                sums[f * taps + ky * KW + kx] += dot(inputs, g[(f * OUT_ROWS + r) * QUADS + q]);
                            }
                        }
                    }
                }
            }
        }
    }
    store_tap_sums(sums, lane, first_unit);
}
