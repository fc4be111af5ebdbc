// Direct convolution for small filter banks (stride 1, no dilation), generated per
// (filters, block, kernel width) by src/ops/conv_direct.rs. Each invocation computes BLOCK
// neighbouring outputs of one row for every filter. The weights and bias sit in a uniform
// buffer and are read at lane-uniform addresses (cheap on every adapter, and on lavapipe
// scalar loads instead of per-lane gathers); each input row segment is loaded once and
// reused by all kernel columns and filters, with no im2col buffer in between.

struct Params {
    c: u32, h: u32, w: u32, oh: u32,
    ow: u32, kh: u32, pad_top: u32, pad_left: u32,
    blocks: u32, total: u32, taps: u32, act: u32,
    slope: f32, has_bias: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// Weights OIHW, then the bias.
@group(0) @binding(3) var<uniform> bank: array<vec4<f32>, {{VEC4S}}>;

fn weight(i: u32) -> f32 {
    return bank[i >> 2u][i & 3u];
}

// x[row + ix], zero outside the image (the padding).
fn fetch(row: u32, ix: i32, inside: bool) -> f32 {
    let ok = inside && ix >= 0 && ix < i32(p.w);
    return select(0.0, x[row + u32(max(ix, 0))], ok);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if t >= p.total { return; }
    let block = t % p.blocks;
    let rest = t / p.blocks;
    let oy = rest % p.oh;
    let n = rest / p.oh;
    let ox0 = block * {{BLOCK}}u;
    let left = i32(ox0) - i32(p.pad_left);
{{DECLS}}
    for (var c = 0u; c < p.c; c++) {
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = i32(oy + ky) - i32(p.pad_top);
            let inside = iy >= 0 && iy < i32(p.h);
            let row = ((n * p.c + c) * p.h + u32(max(iy, 0))) * p.w;
            let tap = (c * p.kh + ky) * {{KW}}u;
{{BODY}}
        }
    }
    let plane = p.oh * p.ow;
    let base = n * {{FILTERS}}u * plane + oy * p.ow + ox0;
{{STORES}}
}
