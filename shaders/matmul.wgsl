// C[b] = act(op(A)[b] · op(B)[b] + bias): the portable family's packed-vec4 kernel. A 64×64
// block of C per workgroup of 16×16 invocations, each owning 4 rows × one vec4 of 4 columns;
// K in tiles of 32 staged in workgroup memory as vec4s, [k][four rows] of A and [k][four
// columns] of B, so a K step is two vec4 loads from workgroup memory and four vec4 FMAs.
//
// Tiles are loaded as quads of four neighbours along each operand's contiguous axis
// (`a_quad`, `b_quad` from shaders/matmul_operands.wgsl: A_ALONG_K, B_ALONG_N), so that
// neighbouring lanes read neighbouring memory whether an operand is transposed or not; dense
// operands whose quads are aligned are read as vec4s. Only the tiles at the edges of C or of
// the K range check bounds (`edge`, uniform across the workgroup). One dispatch sums the K
// range [k_begin, k_end): a K past the loop bound runs as passes, each adding to C
// (ADD_TO_C), the last one adding the bias and applying the activation (FINISH).
//
// SPLIT_K sums a batched product over its batch (a weight gradient, Σ_n dy[n]·col[n]ᵀ) as
// one product over K' = batch·K: the dispatch's batch index is a slice of K' instead, each
// slice's sum stored as C[slice] (partial sums added up afterwards), and K index k reads
// image k / k_inner at k % k_inner of the operands.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    a_row: u32, a_col: u32, a_batch: u32,   // element strides of op(A) as an M×K matrix
    b_row: u32, b_col: u32, b_batch: u32,   // element strides of op(B) as a K×N matrix
    tiles_m: u32, tiles_n: u32, total_tiles: u32,
    bias_mode: u32,                         // BIAS_NONE, BIAS_PER_COLUMN (bias[n]), BIAS_PER_ROW (bias[m])
    activation: u32, slope: f32,
    k_begin: u32, k_end: u32,               // this pass's K range (a multiple of TK from 0)
    first_image: u32,                       // an implicit B's first image (conv_implicit.wgsl)
    k_inner: u32,                           // SPLIT_K: K per image (K' = batch · k_inner)
    k_slice: u32,                           // SPLIT_K: K' per slice (a multiple of TK)
    _pad: u32,
}

// 1: add this pass's sums to C's (the passes before wrote them).
override ADD_TO_C: u32 = 0u;
// 1: add the bias and apply the activation (the last pass); 0: store the raw sums.
override FINISH: u32 = 1u;
// 1: A's quads run along K (A stored row-major, M×K); 0: along M (A given transposed).
override A_ALONG_K: u32 = 1u;
// 1: B's quads run along N (B stored row-major, K×N); 0: along K (B given transposed).
override B_ALONG_N: u32 = 1u;
// 1: the batch's products summed as slices of K' = batch·K (see above).
override SPLIT_K: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

const TILE: u32 = 64u;
const TK: u32 = 32u;
var<workgroup> a_tile: array<array<vec4<f32>, 16>, TK>;   // [k][m / 4]
var<workgroup> b_tile: array<array<vec4<f32>, 16>, TK>;   // [k][n / 4]
// The end of this workgroup's K range (the operands' edge checks read it).
var<private> k_end: u32;

// The image of the operands that K index `k` of product `batch` reads, and its K within it.
fn image_of(batch: u32, k: u32) -> u32 {
    if SPLIT_K == 1u { return k / p.k_inner; }
    return batch;
}
fn k_within(k: u32) -> u32 {
    if SPLIT_K == 1u { return k % p.k_inner; }
    return k;
}

// Quad `q` (0..512) of this K tile's 64×32 slice of A into a_tile.
fn stage_a(batch: u32, m0: u32, k0: u32, q: u32, edge: bool) {
    if A_ALONG_K == 1u {
        // Eight quads per row: lanes step along K.
        let row = q / 8u;
        let kk = (q % 8u) * 4u;
        let v = a_quad(batch, m0 + row, k0 + kk, edge);
        for (var j = 0u; j < 4u; j++) { a_tile[kk + j][row / 4u][row % 4u] = v[j]; }
    } else {
        // Sixteen quads per K step: lanes step along M.
        a_tile[q / 16u][q % 16u] = a_quad(batch, m0 + (q % 16u) * 4u, k0 + q / 16u, edge);
    }
}

// Quad `q` (0..512) of this K tile's 32×64 slice of B into b_tile.
fn stage_b(batch: u32, n0: u32, k0: u32, q: u32, edge: bool) {
    if B_ALONG_N == 1u {
        b_tile[q / 16u][q % 16u] = b_quad(batch, k0 + q / 16u, n0 + (q % 16u) * 4u, edge);
    } else {
        let col = q / 8u;
        let kk = (q % 8u) * 4u;
        let v = b_quad(batch, k0 + kk, n0 + col, edge);
        for (var j = 0u; j < 4u; j++) { b_tile[kk + j][col / 4u][col % 4u] = v[j]; }
    }
}

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
    let inside = m0 + TILE <= p.m && n0 + TILE <= p.n;
    var k_begin = p.k_begin;
    k_end = p.k_end;
    if SPLIT_K == 1u {
        k_begin = batch * p.k_slice;
        k_end = min(k_begin + p.k_slice, p.k_end);
    }

    var acc: array<vec4<f32>, 4>;
    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        let edge = !inside || k0 + TK > k_end;
        for (var i = 0u; i < 2u; i++) {
            stage_a(batch, m0, k0, lindex + i * 256u, edge);
            stage_b(batch, n0, k0, lindex + i * 256u, edge);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let av = a_tile[kk][lid.y];
            let bv = b_tile[kk][lid.x];
            acc[0] = fma(vec4<f32>(av.x), bv, acc[0]);
            acc[1] = fma(vec4<f32>(av.y), bv, acc[1]);
            acc[2] = fma(vec4<f32>(av.z), bv, acc[2]);
            acc[3] = fma(vec4<f32>(av.w), bv, acc[3]);
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
