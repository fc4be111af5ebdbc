// The direct convolution's filter bank (src/ops/conv_direct.rs), rebuilt from the layer's
// OIHW weights and bias before each direct pass so that it follows the optimizer's updates.
// The kernel's loops run over (channel c, kernel row); for each, the weights of every
// filter o and kernel column (o·KW + column) lie together in a row of ROW floats (a
// multiple of 4, zero past FILTERS·KW), so that a few vec4 loads fetch a whole row. Kernel
// rows and columns keep the weights' own order; the input gradient's kernel reads them
// flipped. The bias (zero without one) follows the rows. One invocation per float.

override C: u32;         // the channels the kernel loops over
override FILTERS: u32;   // the outputs it computes per position
override KH: u32;
override KW: u32;
override ROW: u32;
// 1 for the input gradient's bank: w[c][o] (c over the layer's filters, o over its
// channels) instead of w[o][c].
override FLIPPED: u32;

struct Params {
    total: u32, has_bias: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> bank: array<f32>;

@compute @workgroup_size(WORKGROUP)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let rows = C * KH;
    if index >= rows * ROW {
        let o = index - rows * ROW;
        bank[index] = select(0.0, bias[min(o, FILTERS - 1u)], p.has_bias != 0u && o < FILTERS);
        return;
    }
    let f = index % ROW;
    if f >= FILTERS * KW {
        bank[index] = 0.0;
        return;
    }
    let row = index / ROW;
    let c = row / KH;
    let kr = row % KH;
    let o = f / KW;
    let kc = f % KW;
    let pair = select(o * C + c, c * FILTERS + o, FLIPPED != 0u);
    bank[index] = w[(pair * KH + kr) * KW + kc];
}
