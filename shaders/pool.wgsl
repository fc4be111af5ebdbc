// Max and average pooling over KH×KW windows with stride, zero padding and (max pooling)
// dilation; output sizes (ceil_mode included) come from src/ops/pool2d.rs. Their
// backward passes as gathers (one invocation per input pixel, overlapping windows add up),
// or, where the windows tile the input exactly, as one invocation per window.
// Max pooling records the arg-max as the flat index h·W + w within the (n, c) plane, stored
// as f32 (exact below 2^24 pixels); padding never wins, and ties go to the first maximum in
// row-major window order, as in PyTorch.
// Max pooling's backward can also take the gradient through the activation that produced
// its input (ACT, an `Activation::code`; epilogue.wgsl is put in front): the window's
// maximum is that activation's output at the arg-max, so dy · act'(y) there is the gradient
// before the activation, and the producing layer needs no pass of its own for it.

// The shape is baked in per pipeline (src/ops/pool2d.rs sets these), so the index
// arithmetic divides by constants.
override H: u32;
override W: u32;
override OH: u32;
override OW: u32;
override KH: u32;
override KW: u32;
override SH: u32;
override SW: u32;
override PAD_TOP: u32;
override PAD_LEFT: u32;
override DH: u32;
override DW: u32;
override COUNT_INCLUDE_PAD: u32;
override ACT: u32 = 0u;
// 0: max pooling's forward pass stores no arg-max (inference, where no backward pass reads
// it; the output fills the unwritten binding).
override KEEP_ARGMAX: u32 = 1u;

struct Params {
    total: u32, slope: f32, _pad1: u32, _pad2: u32,   // slope: leaky ReLU's, with ACT
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> argmax: array<f32>;
// dy[i] of max pooling, taken through ACT where there is one: `load_pooled(i)` reads the
// forward output (binding 4; src/ops/pool2d.rs declares it only then).
fn max_gradient(i: u32) -> f32 {
    if ACT == 0u { return src[i]; }
    return src[i] * activation_derivative(load_pooled(i), ACT, p.slope);
}

/// In-bounds elements of the window at output (oh, ow), for count_include_pad = false.
fn window_count(oh: u32, ow: u32) -> f32 {
    let top = i32(oh * SH) - i32(PAD_TOP);
    let left = i32(ow * SW) - i32(PAD_LEFT);
    let rows = min(top + i32(KH), i32(H)) - max(top, 0);
    let cols = min(left + i32(KW), i32(W)) - max(left, 0);
    return f32(rows * cols);
}

// PyTorch's rule: with count_include_pad the window clipped to the padded input (a
// ceil_mode window can overhang it), else its cells inside the input.
fn divisor(oh: u32, ow: u32) -> f32 {
    if COUNT_INCLUDE_PAD != 0u {
        let rows = min(oh * SH + KH, H + 2u * PAD_TOP) - oh * SH;
        let cols = min(ow * SW + KW, W + 2u * PAD_LEFT) - ow * SW;
        return f32(rows * cols);
    }
    return window_count(oh, ow);
}

// NaN wins a window, as in PyTorch (is_nan, by the bits, is epilogue.wgsl's).
// src = x [planes][H][W], dst = y [planes][OH][OW], argmax likewise (max only).
@compute @workgroup_size(WORKGROUP)
fn max_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let ow = index % OW;
    let oh = (index / OW) % OH;
    let plane = index / (OW * OH);
    // A window whose dilated taps all fall in the padding is -inf with no arg-max: the index
    // H·W, past the plane, which the backward pass never matches.
    var best = bitcast<f32>(0xff800000u);
    var best_at = H * W;
    var found = false;
    for (var ki = 0u; ki < KH; ki++) {
        let ih = i32(oh * SH + ki * DH) - i32(PAD_TOP);
        if ih < 0 || ih >= i32(H) { continue; }
        for (var kj = 0u; kj < KW; kj++) {
            let iw = i32(ow * SW + kj * DW) - i32(PAD_LEFT);
            if iw < 0 || iw >= i32(W) { continue; }
            let at = u32(ih) * W + u32(iw);
            let v = src[plane * H * W + at];
            if !found || v > best || (is_nan(v) && !is_nan(best)) {
                best = v;
                best_at = at;
                found = true;
            }
        }
    }
    dst[index] = best;
    if KEEP_ARGMAX != 0u { argmax[index] = f32(best_at); }
}

@compute @workgroup_size(WORKGROUP)
fn avg_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let ow = index % OW;
    let oh = (index / OW) % OH;
    let plane = index / (OW * OH);
    var sum = 0.0;
    for (var ki = 0u; ki < KH; ki++) {
        let ih = i32(oh * SH + ki) - i32(PAD_TOP);
        if ih < 0 || ih >= i32(H) { continue; }
        for (var kj = 0u; kj < KW; kj++) {
            let iw = i32(ow * SW + kj) - i32(PAD_LEFT);
            if iw < 0 || iw >= i32(W) { continue; }
            sum += src[(plane * H + u32(ih)) * W + u32(iw)];
        }
    }
    dst[index] = sum / divisor(oh, ow);
}

/// The output windows that contain input row `i` along one axis: [first, last].
fn windows(i: u32, pad: u32, k: u32, s: u32, n: u32) -> vec2<i32> {
    let t = i32(i + pad);
    let first = max(0, (t - i32(k) + i32(s)) / i32(s));
    let last = min(i32(n) - 1, t / i32(s));
    return vec2<i32>(first, last);
}

// src = dy [planes][OH][OW], dst = dx [planes][H][W]; argmax from the forward pass.
@compute @workgroup_size(WORKGROUP)
fn max_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let at = index % (H * W);
    let plane = index / (H * W);
    // Every (window, tap) that lands on this pixel, as col2im finds them (taps are dilated).
    var sum = 0.0;
    for (var ki = 0u; ki < KH; ki++) {
        let t = i32(at / W + PAD_TOP) - i32(ki * DH);
        if t < 0 || t % i32(SH) != 0 || u32(t) / SH >= OH { continue; }
        for (var kj = 0u; kj < KW; kj++) {
            let u = i32(at % W + PAD_LEFT) - i32(kj * DW);
            if u < 0 || u % i32(SW) != 0 || u32(u) / SW >= OW { continue; }
            let out = (plane * OH + u32(t) / SH) * OW + u32(u) / SW;
            if u32(argmax[out]) == at { sum += max_gradient(out); }
        }
    }
    dst[index] = sum;
}

@compute @workgroup_size(WORKGROUP)
fn avg_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let at = index % (H * W);
    let plane = index / (H * W);
    let rows = windows(at / W, PAD_TOP, KH, SH, OH);
    let cols = windows(at % W, PAD_LEFT, KW, SW, OW);
    var sum = 0.0;
    for (var oh = rows.x; oh <= rows.y; oh++) {
        for (var ow = cols.x; ow <= cols.y; ow++) {
            sum += src[(plane * OH + u32(oh)) * OW + u32(ow)] / divisor(u32(oh), u32(ow));
        }
    }
    dst[index] = sum;
}

// The `_tiled` backward passes: windows that tile the input exactly (stride = kernel, no
// padding, no remainder), so each input pixel lies in one window. One invocation per
// window loads dy (and the arg-max) once and writes the window's KH×KW gradients.
// src = dy [planes][OH][OW], dst = dx [planes][H][W].
fn tiled_window(index: u32) -> u32 {
    let ow = index % OW;
    let oh = (index / OW) % OH;
    let plane = index / (OW * OH);
    return (plane * H + oh * KH) * W + ow * KW;
}

@compute @workgroup_size(WORKGROUP)
fn max_backward_tiled(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let corner = tiled_window(index);
    let plane_start = (index / (OW * OH)) * H * W;
    let best = plane_start + u32(argmax[index]);
    let g = max_gradient(index);
    for (var ki = 0u; ki < KH; ki++) {
        for (var kj = 0u; kj < KW; kj++) {
            let at = corner + ki * W + kj;
            dst[at] = select(0.0, g, at == best);
        }
    }
}

@compute @workgroup_size(WORKGROUP)
fn avg_backward_tiled(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let corner = tiled_window(index);
    let g = src[index] / f32(KH * KW);
    for (var ki = 0u; ki < KH; ki++) {
        for (var kj = 0u; kj < KW; kj++) {
            dst[corner + ki * W + kj] = g;
        }
    }
}

// The `_quads` passes: 2×2 windows at stride 2 that tile the input exactly, with rows of
// whole vec4s of outputs (src/ops/pool2d.rs `quads`). One invocation per four neighbouring
// windows of a row: it reads their two input rows as four vec4s and writes values and
// arg-maxes as vec4s, where the per-window passes made a per-lane access per float (on CPU
// adapters one costs about the same for four floats as for one).
// Their inputs come through `load_src4` (x, or dy; binding 5), `load_best4` (the arg-max in
// backward; 9) and `load_pooled4` (the forward output in backward, with ACT; 8): vec4s from
// storage or, where the adapter's calibration prefers them, from textures (src/ops/pool2d.rs
// puts their declarations in front).
@group(0) @binding(6) var<storage, read_write> dst4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> argmax4: array<vec4<f32>>;

// The input vec4 where output quad q's windows start, and their first tap's index in the plane.
fn quad_corner(q: u32) -> vec2<u32> {
    let ow = (q * 4u) % OW;
    let oh = (q * 4u / OW) % OH;
    let plane = q * 4u / (OW * OH);
    return vec2<u32>(((plane * H + 2u * oh) * W + 2u * ow) / 4u, 2u * oh * W + 2u * ow);
}

@compute @workgroup_size(WORKGROUP)
fn max_forward_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = invocation_index(gid, nwg);
    if q >= p.total { return; }
    let corner = quad_corner(q);
    let a = array<vec4<f32>, 2>(load_src4(corner.x), load_src4(corner.x + 1u));
    let b = array<vec4<f32>, 2>(load_src4(corner.x + W / 4u), load_src4(corner.x + W / 4u + 1u));
    var values = vec4<f32>(0.0);
    var indices = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let half = j / 2u;
        let c = (j % 2u) * 2u;
        let m = window_max(a[half][c], a[half][c + 1u], b[half][c], b[half][c + 1u], corner.y + 2u * j, W);
        values[j] = m.x;
        indices[j] = m.y;
    }
    dst4[q] = values;
    if KEEP_ARGMAX != 0u { argmax4[q] = indices; }
}

// Max pooling's forward over four neighbouring outputs of a row for any window, stride,
// padding and dilation, where rows of inputs and outputs are whole vec4s and the four
// windows span few enough inputs (src/ops/pool2d.rs `row_quads`; ResNet's 3×3 at stride 2):
// each kernel row's inputs under the four windows are loaded once as the ROW_VEC4S vec4s
// holding them, where `max_forward` loads every tap of every window alone.
// The inputs under a row of four windows, and how far the first sits into its vec4 (the
// same for every row of four: their first input is a multiple of 4 less PAD_LEFT).
override ROW_SPAN: u32 = 3u * SW + (KW - 1u) * DW + 1u;
override ROW_SKEW: u32 = (4u - PAD_LEFT % 4u) % 4u;
override ROW_VEC4S: u32 = (ROW_SKEW + ROW_SPAN + 3u) / 4u;
const ROW_VEC4S_MAX: u32 = 8u;

@compute @workgroup_size(WORKGROUP)
fn max_forward_row_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = invocation_index(gid, nwg);
    if q >= p.total { return; }
    let ow0 = (q * 4u) % OW;
    let oh = (q * 4u / OW) % OH;
    let plane = q * 4u / (OW * OH);
    // The first input column under the four windows (negative in the padding), and the
    // vec4 holding it (first - ROW_SKEW is a multiple of 4).
    let first = i32(ow0 * SW) - i32(PAD_LEFT);
    let first4 = (first - i32(ROW_SKEW)) / 4;
    // As `max_forward`: -inf and the index H·W past the plane where every tap is padding.
    var best = vec4<f32>(bitcast<f32>(0xff800000u));
    var best_at = vec4<f32>(f32(H * W));
    var found = array<bool, 4>(false, false, false, false);
    for (var ki = 0u; ki < KH; ki++) {
        let ih = i32(oh * SH + ki * DH) - i32(PAD_TOP);
        if ih < 0 || ih >= i32(H) { continue; }
        let row4 = (plane * H + u32(ih)) * (W / 4u);
        var values: array<f32, 32>;
        for (var v = 0u; v < ROW_VEC4S; v++) {
            let at = first4 + i32(v);
            var quad = vec4<f32>(0.0);
            if at >= 0 && at < i32(W / 4u) { quad = load_src4(row4 + u32(at)); }
            for (var k = 0u; k < 4u; k++) { values[4u * v + k] = quad[k]; }
        }
        for (var j = 0u; j < 4u; j++) {
            for (var kj = 0u; kj < KW; kj++) {
                let iw = first + i32(j * SW + kj * DW);
                if iw < 0 || iw >= i32(W) { continue; }
                let v = values[ROW_SKEW + j * SW + kj * DW];
                if !found[j] || v > best[j] || (is_nan(v) && !is_nan(best[j])) {
                    best[j] = v;
                    best_at[j] = f32(u32(ih) * W + u32(iw));
                    found[j] = true;
                }
            }
        }
    }
    dst4[q] = best;
    if KEEP_ARGMAX != 0u { argmax4[q] = best_at; }
}

// src4 = dy, dst4 = dx, best4 (and pooled4, with ACT) from the forward pass.
@compute @workgroup_size(WORKGROUP)
fn max_backward_quads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = invocation_index(gid, nwg);
    if q >= p.total { return; }
    let corner = quad_corner(q);
    var g = load_src4(q);
    if ACT != 0u {
        let y = load_pooled4(q);
        for (var j = 0u; j < 4u; j++) { g[j] *= activation_derivative(y[j], ACT, p.slope); }
    }
    let best = load_best4(q);
    for (var row = 0u; row < 2u; row++) {
        for (var half = 0u; half < 2u; half++) {
            var out = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                let j = half * 2u + c / 2u;
                let at = corner.y + row * W + half * 4u + c;
                out[c] = select(0.0, g[j], u32(best[j]) == at);
            }
            dst4[corner.x + row * (W / 4u) + half] = out;
        }
    }
}
