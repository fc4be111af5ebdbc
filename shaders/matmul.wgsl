// C[b] = act(op(A)[b] · op(B)[b] + bias), the classic GPU design: a 64×64 block tile staged
// in workgroup memory, 16 K-steps at a time, and a 4×4 register micro-tile per invocation.
// Operands are read through strides, so transposed and broadcast operands need no copies
// (B through `b_at`: shaders/matmul_operands.wgsl, or shaders/conv_implicit.wgsl's windows);
// every load and store is guarded, so any M, N, K works. One dispatch sums the K range
// [k_begin, k_end): a K past the loop bound runs as passes, each adding to C (ADD_TO_C), the
// last one adding the bias and applying the activation (FINISH).

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    a_row: u32, a_col: u32, a_batch: u32,   // element strides of op(A) as an M×K matrix
    b_row: u32, b_col: u32, b_batch: u32,   // element strides of op(B) as a K×N matrix
    tiles_m: u32, tiles_n: u32, total_tiles: u32,
    bias_mode: u32,                         // BIAS_NONE, BIAS_PER_COLUMN (bias[n]), BIAS_PER_ROW (bias[m])
    activation: u32, slope: f32,
    k_begin: u32, k_end: u32,               // this pass's K range (a multiple of TK from 0)
    first_image: u32, _pad: u32,            // an implicit B's first image (conv_implicit.wgsl)
}

// 1: add this pass's sums to C's (the passes before wrote them).
override ADD_TO_C: u32 = 0u;
// 1: add the bias and apply the activation (the last pass); 0: store the raw sums.
override FINISH: u32 = 1u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

const TILE: u32 = 64u;
const TK: u32 = 16u;
var<workgroup> a_tile: array<array<f32, 64>, 16>;   // [k][m]
var<workgroup> b_tile: array<array<f32, 64>, 16>;   // [k][n]

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lindex: u32,
) {
    let tile = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if tile >= p.total_tiles { return; }
    let tn = tile % p.tiles_n;
    let tm = (tile / p.tiles_n) % p.tiles_m;
    let batch = tile / (p.tiles_n * p.tiles_m);
    let m0 = tm * TILE;
    let n0 = tn * TILE;
    let a_base = batch * p.a_batch;

    var acc: array<array<f32, 4>, 4>;
    for (var k0 = p.k_begin; k0 < p.k_end; k0 += TK) {
        // 256 invocations load the 16×64 slices of A and B, 4 elements each.
        for (var i = 0u; i < 4u; i++) {
            let e = lindex + i * 256u;
            let kk = e / TILE;
            let mm = e % TILE;
            let gk = k0 + kk;
            var av = 0.0;
            if m0 + mm < p.m && gk < p.k_end { av = a[a_base + (m0 + mm) * p.a_row + gk * p.a_col]; }
            a_tile[kk][mm] = av;
            var bv = 0.0;
            if n0 + mm < p.n && gk < p.k_end { bv = b_at(batch, gk, n0 + mm); }
            b_tile[kk][mm] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = a_tile[kk][lid.y * 4u + i];
                bv[i] = b_tile[kk][lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(av[i], bv[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }

    let c_base = batch * p.m * p.n;
    for (var i = 0u; i < 4u; i++) {
        let row = m0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + lid.x * 4u + j;
            if row < p.m && col < p.n {
                let at = c_base + row * p.n + col;
                var v = acc[i][j];
                if ADD_TO_C == 1u { v += c[at]; }
                if FINISH == 1u {
                    if p.bias_mode == BIAS_PER_COLUMN { v += bias[col]; }
                    if p.bias_mode == BIAS_PER_ROW { v += bias[row]; }
                    v = activate(v, p.activation, p.slope);
                }
                c[at] = v;
            }
        }
    }
}
