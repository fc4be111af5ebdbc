// C[b] = act(A[b] · B[b] + bias) for CPU adapters such as lavapipe, where every buffer or
// workgroup-memory load is a costly per-lane gather but subgroup broadcasts are cheap.
// Each lane owns ROWS whole output rows × COLS columns in registers; its A rows are read once
// as vec4s along K; the subgroup's shared B block (4 K-steps × COLS columns) is loaded once,
// spread over the lanes as vec4s, and handed to every lane with subgroupBroadcast.
// A is dense [batch][m][k4] vec4s and B dense [batch][4·k4][n4] vec4s (zero-padded by the
// pack kernel where needed). Rust generates the unrolled parts marked `{{…}}` (see
// src/ops/matmul.rs); ROWS, COLS and SUBGROUP are baked in as constants.

struct Params {
    m: u32, n: u32, k4: u32, n4: u32,
    a_batch: u32, b_batch: u32,             // batch strides in vec4s (0 = shared operand)
    tiles_m: u32, tiles_n: u32, total_tiles: u32,
    bias_mode: u32,                         // 0 none, 1 per column (bias[n]), 2 per row (bias[m])
    activation: u32, slope: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

const ROWS: u32 = {{ROWS}}u;
const COLS: u32 = {{COLS}}u;
const SUBGROUP: u32 = {{SUBGROUP}}u;
const SUBGROUPS_PER_GROUP: u32 = {{SUBGROUPS_PER_GROUP}}u;

fn store(batch: u32, row: u32, col: u32, value: f32) {
    if row < p.m && col < p.n {
        var v = value;
        if p.bias_mode == 1u { v += bias[col]; }
        if p.bias_mode == 2u { v += bias[row]; }
        c[(batch * p.m + row) * p.n + col] = activate(v, p.activation, p.slope);
    }
}

@compute @workgroup_size({{GROUP_SIZE}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lindex: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let tile = (wid.x + wid.y * nwg.x) * SUBGROUPS_PER_GROUP + lindex / SUBGROUP;
    // The whole subgroup shares a tile, so this exit keeps the broadcasts below uniform.
    if tile >= p.total_tiles { return; }
    let tn = tile % p.tiles_n;
    let tm = (tile / p.tiles_n) % p.tiles_m;
    let batch = tile / (p.tiles_n * p.tiles_m);
    let row0 = (tm * SUBGROUP + lane) * ROWS;
    let col4 = tn * (COLS / 4u);
    let a_base = batch * p.a_batch;
    let b_base = batch * p.b_batch;
    let b_step = 4u * p.n4;

    // Rows past M and columns past N read clamped (valid) addresses; their results are never stored.
{{SETUP}}
    for (var k = 0u; k < p.k4; k++) {
{{BODY}}
    }
{{STORE}}
}
