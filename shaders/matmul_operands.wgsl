// Operand sources for shaders/matmul_subgroup.wgsl, one per operand chosen per pipeline:
// `load_a(i)` and `load_b(i)` return vec4 number `i` of the dense packed operand. An
// implicit-GEMM B (shaders/conv_implicit.wgsl) replaces `storage_b` / `texture_b`.

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
fn store(batch: u32, row: u32, col: u32, value: f32) {
    if row < p.m && col < p.n {
        var at = (batch * p.m + row) * p.n + col;
        if TRANSPOSE_C == 1u { at = (batch * p.n + col) * p.m + row; }
        var v = value;
        if ADD_TO_C == 1u { v += c[at]; }
        if FINISH == 1u { v = finish(row, col, v); }
        c[at] = v;
    }
}

//- store_vec4
// For row-major outputs with N a multiple of 4: one vec4 store per 4 columns.
@group(0) @binding(4) var<storage, read_write> c: array<vec4<f32>>;
fn store4(batch: u32, row: u32, col4: u32, value: vec4<f32>) {
    if row < p.m && col4 < p.n4 {
        let col = col4 * 4u;
        let at = (batch * p.m + row) * p.n4 + col4;
        var v = value;
        if ADD_TO_C == 1u { v += c[at]; }
        if FINISH == 1u {
            v = vec4<f32>(
                finish(row, col, v.x),
                finish(row, col + 1u, v.y),
                finish(row, col + 2u, v.z),
                finish(row, col + 3u, v.w),
            );
        }
        c[at] = v;
    }
}

//- tiled_b
// For shaders/matmul.wgsl: op(B)[batch][k][n] through B's strides.
@group(0) @binding(2) var<storage, read> b: array<f32>;
fn b_at(batch: u32, k: u32, n: u32) -> f32 {
    return b[batch * p.b_batch + k * p.b_row + n * p.b_col];
}
