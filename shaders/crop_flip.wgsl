// Crops and flips fused with input normalisation (src/ops/crop_flip.rs). Output pixel
// (n, c, y, x) reads source pixel (top[n] + y, left[n] + x), or (top[n] + y, left[n] +
// out_w − 1 − x) where image n is flipped; outside the source image it reads the fill;
// then (v − mean[c]) / std[c]. The source is f32 values or bytes packed four to a word
// (÷255), its element type filled in per pipeline as in normalize.wgsl.

struct Params {
    total: u32, channels: u32, out_h: u32, out_w: u32,
    // The fill as a byte (from_bytes scales it as it scales the pixels) and as a value.
    in_h: u32, in_w: u32, fill_byte: u32, fill_value: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> mean: array<f32>;
@group(0) @binding(2) var<storage, read> inv_std: array<f32>;
// Per image: top, left, flipped (0 or 1), unused.
@group(0) @binding(3) var<storage, read> windows: array<vec4<i32>>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;
@group(0) @binding(5) var<storage, read> src: array<{{SRC_TYPE}}>;

// The source element output `i` reads (its image's plane `c` of image `n`), or −1 for
// the fill; `c` is returned for the normalisation.
fn source_of(i: u32) -> vec2<i32> {
    let x = i % p.out_w;
    let y = (i / p.out_w) % p.out_h;
    let plane = i / (p.out_w * p.out_h);
    let n = plane / p.channels;
    let c = plane % p.channels;
    let window = windows[n];
    let sy = window.x + i32(y);
    let sx = select(window.y + i32(x), window.y + i32(p.out_w) - 1 - i32(x), window.z != 0);
    if sy < 0 || sx < 0 || sy >= i32(p.in_h) || sx >= i32(p.in_w) {
        return vec2<i32>(-1, i32(c));
    }
    return vec2<i32>(i32((plane * p.in_h + u32(sy)) * p.in_w + u32(sx)), i32(c));
}

@compute @workgroup_size(WORKGROUP)
fn from_floats(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let at = source_of(i);
    var v = p.fill_value;
    if at.x >= 0 { v = f32(src[u32(at.x)]); }
    let c = u32(at.y);
    dst[i] = (v - mean[c]) * inv_std[c];
}

@compute @workgroup_size(WORKGROUP)
fn from_bytes(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let at = source_of(i);
    var byte = p.fill_byte;
    if at.x >= 0 {
        let j = u32(at.x);
        byte = (u32(src[j / 4u]) >> (8u * (j % 4u))) & 0xffu;
    }
    let v = f32(byte) / 255.0;
    let c = u32(at.y);
    dst[i] = (v - mean[c]) * inv_std[c];
}
