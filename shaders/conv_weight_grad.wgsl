// The portable weight-gradient kernel (after conv_weight_grad_common.wgsl), generated per
// (kernel height, kernel width, block) by src/ops/conv_weight_grad.rs; the work is never split.
// One workgroup per (o, c) pair. Each invocation walks blocks of BLOCK outputs along a row,
// loads the block's dy values and, per kernel row, the input segment they see once, and
// keeps the KH·KW partial sums in registers; the workgroup then adds its 64 partial sums.

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let pair = wg.x + wg.y * nwg.x;
    // Uniform per workgroup: the whole group leaves together, before any barrier.
    if pair >= O * C { return; }
    let o = pair / C;
    let c = pair % C;
{{DECLS}}
    for (var t = lane; t < p.work; t += 64u) {
        let block = t % BLOCKS;
        let rest = t / BLOCKS;
        let oy = rest % OH;
        let n = rest / OH;
        let ox0 = block * {{BLOCK}}u;
        let dy_row = ((n * O + o) * OH + oy) * OW + ox0;
        let left = i32(ox0) - i32(PAD_LEFT);
{{BODY}}
    }
{{STORE}}
    workgroupBarrier();
    if lane < TAPS {
        var sum = 0.0;
        for (var i = 0u; i < 64u; i++) {
            sum += partial[i * TAPS + lane];
        }
        dw[pair * TAPS + lane] = sum;
    }
}
