// C = act(op(A) · op(B) + bias) for products too small to pay for the subgroup kernel: a
// 4×4 block of C per invocation, each operand read through its strides as it lies (either
// one transposed, no pack pass), and every choice but the activation a uniform, so that one
// short pipeline serves a model's small products (a classifier's last layer, forward and
// backward). Needs shaders/epilogue.wgsl.

override ACTIVATION: u32;
// A K past the loop bound runs as passes: each after the first adds its sums to C's
// (ADD_TO_C), the last alone adds the bias and applies the activation (FINISH).
override ADD_TO_C: u32 = 0u;
override FINISH: u32 = 1u;

// Mirrors `SmallParams` in src/ops/matmul_small.rs. Element `[image][row][k]` of op(A) is at
// `image·a_batch + row·a_row + k·a_k`, `[image][k][col]` of op(B) at
// `image·b_batch + k·b_k + col·b_col` (a batch stride of 0 shares the operand).
struct Params {
    m: u32, n: u32, slope: f32,
    // 4×4 blocks of C: per image, down its rows, across its columns.
    blocks: u32, blocks_m: u32, blocks_n: u32,
    a_batch: u32, a_row: u32, a_k: u32,
    b_batch: u32, b_k: u32, b_col: u32,
    // This dispatch's share of K (a pass within the loop bound).
    k_begin: u32, k_end: u32,
    // A `BIAS_*` code, and whether ReLU follows the activation.
    bias_mode: u32, relu: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// A and B (bindings 1 and 2) and their `load_a` / `load_b`: storage buffers, or on CPU
// adapters uniform copies where both fit (see `SmallReads`).
{{OPERANDS}}
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// `p.relu`, set by `main` behind `opaque_zero` (lavapipe would otherwise compile a copy of
// the kernel per value of a uniform that alone decides a branch).
var<private> relu: bool;

// Stores row `row` of the block from column `col` on, where it lies inside C: the sums,
// added to C's values with ADD_TO_C; on the last pass with `bias4` (the row's and the
// columns' bias, loaded once by `main`) and the activation.
fn store_row(image: u32, row: u32, col: u32, sums: vec4<f32>, bias4: vec4<f32>) {
    if row >= p.m { return; }
    let first = (image * p.m + row) * p.n + col;
    for (var i = 0u; i < 4u; i++) {
        let index = first + i;
        var sum = sums[i];
        if ADD_TO_C == 1u {
            sum += c[min(index, arrayLength(&c) - 1u)];
        }
        if FINISH == 1u {
            sum = activate_or_relu(sum + bias4[i], ACTIVATION, p.slope, relu);
        }
        if col + i < p.n {
            c[index] = sum;
        }
    }
}

// Each invocation owns a 4×4 block of C: per K step four loads of each operand serve its
// sixteen sums (one output per invocation loaded two values per multiply-add, and lavapipe
// gathers every float lane by lane).
@compute @workgroup_size(WORKGROUP_SMALL)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let block = small_invocation_index(gid, nwg);
    if block >= p.blocks { return; }
    let opaque = opaque_zero(nwg);
    relu = p.relu + opaque != 0u;
    let bias_mode = p.bias_mode + opaque;
    let col = (block % p.blocks_n) * 4u;
    let rows = block / p.blocks_n;
    let row = (rows % p.blocks_m) * 4u;
    let image = rows / p.blocks_m;
    // Rows and columns past C's read its last one's (a valid address); their sums are
    // never stored.
    let rows4 = min(vec4<u32>(row) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u));
    let cols4 = min(vec4<u32>(col) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u));
    var a_at = image * p.a_batch + rows4 * p.a_row + p.k_begin * p.a_k;
    var b_at = image * p.b_batch + cols4 * p.b_col + p.k_begin * p.b_k;
    var sums0 = vec4<f32>();
    var sums1 = vec4<f32>();
    var sums2 = vec4<f32>();
    var sums3 = vec4<f32>();
    for (var k = p.k_begin + opaque; k < p.k_end; k++) {
        let bk = vec4<f32>(load_b(b_at.x), load_b(b_at.y), load_b(b_at.z), load_b(b_at.w));
        sums0 = fma(vec4<f32>(load_a(a_at.x)), bk, sums0);
        sums1 = fma(vec4<f32>(load_a(a_at.y)), bk, sums1);
        sums2 = fma(vec4<f32>(load_a(a_at.z)), bk, sums2);
        sums3 = fma(vec4<f32>(load_a(a_at.w)), bk, sums3);
        a_at += p.a_k;
        b_at += p.b_k;
    }
    // The bias of the block's columns and rows (a valid element where none applies),
    // selected, not branched on: branches in the sixteen inlined stores made lavapipe's
    // compile of this kernel as long as the subgroup kernel's.
    let last_bias = arrayLength(&bias) - 1u;
    let by_column = bias_mode == BIAS_PER_COLUMN;
    let by_row = bias_mode == BIAS_PER_ROW;
    let column_bias = select(vec4<f32>(), vec4<f32>(bias[min(cols4.x, last_bias)],
        bias[min(cols4.y, last_bias)], bias[min(cols4.z, last_bias)], bias[min(cols4.w, last_bias)]),
        by_column);
    let row_bias = select(vec4<f32>(), vec4<f32>(bias[min(rows4.x, last_bias)],
        bias[min(rows4.y, last_bias)], bias[min(rows4.z, last_bias)], bias[min(rows4.w, last_bias)]),
        by_row);
    store_row(image, row, col, sums0, column_bias + row_bias.x);
    store_row(image, row + 1u, col, sums1, column_bias + row_bias.y);
    store_row(image, row + 2u, col, sums2, column_bias + row_bias.z);
    store_row(image, row + 3u, col, sums3, column_bias + row_bias.w);
}
