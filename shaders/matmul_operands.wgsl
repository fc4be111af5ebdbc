// Operand sources, one per operand chosen per pipeline. For shaders/matmul_subgroup.wgsl,
// `load_a(i)` and `load_b(i)` return vec4 number `i` of the dense packed operand; for
// shaders/matmul.wgsl, `a_quad` and `b_quad` return four neighbours along the operand's
// contiguous axis (`tiled_*` sections). An implicit-GEMM B (shaders/conv_implicit.wgsl)
// replaces `storage_b` / `texture_b` / `tiled_b`.

//- storage_a
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
fn load_a(i: u32) -> vec4<f32> { return a[i]; }

//- storage_b
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
fn load_b(i: u32) -> vec4<f32> { return b[i]; }

//- texel
// Texel `i` lies at (i mod TEXTURE_WIDTH, i / TEXTURE_WIDTH): see `OperandTexture`.
const TEXTURE_WIDTH_LOG2: u32 = {{TEXTURE_WIDTH_LOG2}}u;
fn texel(t: texture_2d<f32>, i: u32) -> vec4<f32> {
    let mask = (1u << TEXTURE_WIDTH_LOG2) - 1u;
    return textureLoad(t, vec2<u32>(i & mask, i >> TEXTURE_WIDTH_LOG2), 0);
}

//- texture_a
@group(0) @binding(1) var a: texture_2d<f32>;
fn load_a(i: u32) -> vec4<f32> { return texel(a, i); }

//- texture_b
@group(0) @binding(2) var b: texture_2d<f32>;
fn load_b(i: u32) -> vec4<f32> { return texel(b, i); }

//- store_scalar
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
fn store(batch: u32, row: u32, col: u32, value: f32, bias: f32) {
    if row < p.m && col < p.n {
        var at = (batch * p.m + row) * p.n + col;
        if TRANSPOSE_C == 1u { at = (batch * p.n + col) * p.m + row; }
        var v = value;
        if ADD_TO_C == 1u { v += c[at]; }
        if FINISH == 1u { v = finish(v + bias); }
        c[at] = v;
    }
}

//- store_vec4
// For row-major outputs with N a multiple of 4: one vec4 store per 4 columns.
@group(0) @binding(4) var<storage, read_write> c: array<vec4<f32>>;
fn store4(batch: u32, row: u32, col4: u32, value: vec4<f32>, bias: vec4<f32>) {
    if row < p.m && col4 < p.n4 {
        let at = (batch * p.m + row) * p.n4 + col4;
        var v = value;
        if ADD_TO_C == 1u { v += c[at]; }
        if FINISH == 1u { v = finish4(v + bias); }
        c[at] = v;
    }
}

//- store_vec4_rows
// For transposed outputs (C[b] stored [n][m]) with M a multiple of 4: a lane's four rows
// (from a multiple of 4) at one column as one vec4, next to its neighbour lanes' rows.
@group(0) @binding(4) var<storage, read_write> c: array<vec4<f32>>;
fn store4_rows(batch: u32, row: u32, col: u32, value: vec4<f32>, bias: vec4<f32>) {
    if row < p.m && col < p.n {
        let at = ((batch * p.n + col) * p.m + row) / 4u;
        var v = value;
        if ADD_TO_C == 1u { v += c[at]; }
        if FINISH == 1u { v = finish4(v + bias); }
        c[at] = v;
    }
}

//- tiled_b
// For shaders/matmul.wgsl: op(B)[batch][k][n] through B's strides (`b_quads` makes quads).
@group(0) @binding(2) var<storage, read> b: array<f32>;
fn b_at(batch: u32, k: u32, n: u32) -> f32 {
    return b[batch * p.b_batch + k * p.b_row + n * p.b_col];
}

//- b_quads
// For shaders/matmul.wgsl: four neighbours of op(B) along its contiguous axis from `b_at`
// (a buffer's, or a convolution's windows), each checked where the tile is at an edge.
fn b_checked(batch: u32, k: u32, n: u32, edge: bool) -> f32 {
    if edge && (k >= k_end || n >= p.n) { return 0.0; }
    return b_at(image_of(batch, k), k_within(k), n);
}
fn b_quad(batch: u32, k: u32, n: u32, edge: bool) -> vec4<f32> {
    if B_ALONG_N == 1u {
        return vec4<f32>(
            b_checked(batch, k, n, edge),
            b_checked(batch, k, n + 1u, edge),
            b_checked(batch, k, n + 2u, edge),
            b_checked(batch, k, n + 3u, edge),
        );
    }
    return vec4<f32>(
        b_checked(batch, k, n, edge),
        b_checked(batch, k + 1u, n, edge),
        b_checked(batch, k + 2u, n, edge),
        b_checked(batch, k + 3u, n, edge),
    );
}

//- tiled_b4
// For shaders/matmul.wgsl: a dense B whose contiguous axis is a multiple of 4, one vec4
// load per quad (a quad is wholly inside or wholly outside, and within one image).
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
fn b_quad(batch: u32, k: u32, n: u32, edge: bool) -> vec4<f32> {
    if edge && (k >= k_end || n >= p.n) { return vec4<f32>(0.0); }
    return b[(image_of(batch, k) * p.b_batch + k_within(k) * p.b_row + n * p.b_col) / 4u];
}

//- tiled_a
// For shaders/matmul.wgsl: four neighbours of op(A) along its contiguous axis through A's
// strides, each checked where the tile is at an edge.
@group(0) @binding(1) var<storage, read> a: array<f32>;
fn a_checked(batch: u32, row: u32, k: u32, edge: bool) -> f32 {
    if edge && (row >= p.m || k >= k_end) { return 0.0; }
    return a[image_of(batch, k) * p.a_batch + row * p.a_row + k_within(k) * p.a_col];
}
fn a_quad(batch: u32, row: u32, k: u32, edge: bool) -> vec4<f32> {
    if A_ALONG_K == 1u {
        return vec4<f32>(
            a_checked(batch, row, k, edge),
            a_checked(batch, row, k + 1u, edge),
            a_checked(batch, row, k + 2u, edge),
            a_checked(batch, row, k + 3u, edge),
        );
    }
    return vec4<f32>(
        a_checked(batch, row, k, edge),
        a_checked(batch, row + 1u, k, edge),
        a_checked(batch, row + 2u, k, edge),
        a_checked(batch, row + 3u, k, edge),
    );
}

//- tiled_a4
// For shaders/matmul.wgsl: a dense A whose contiguous axis is a multiple of 4, one vec4
// load per quad.
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
fn a_quad(batch: u32, row: u32, k: u32, edge: bool) -> vec4<f32> {
    if edge && (row >= p.m || k >= k_end) { return vec4<f32>(0.0); }
    return a[(image_of(batch, k) * p.a_batch + row * p.a_row + k_within(k) * p.a_col) / 4u];
}
