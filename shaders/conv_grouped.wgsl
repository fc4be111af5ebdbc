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
    partial[lane] = sum;
    workgroupBarrier();
    for (var half = WORKGROUP_SMALL / 2u; half > 0u; half >>= 1u) {
        if lane < half {
            partial[lane] += partial[lane + half];
        }
        workgroupBarrier();
    }
    if valid && lane == 0u {
        // Later passes add to the earlier ones' sums.
        dst[index] = partial[0] + select(0.0, dst[index], p.first_image > 0u);
    }
}
