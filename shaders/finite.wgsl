// Non-finite detection for Graph::set_check_finite (src/ops/finite.rs): sets flags[p.slot]
// when any of the tensor's p.total elements is NaN or infinite. Every check of a training
// step writes its own slot of one buffer, read back once at the end of the step.

struct Params {
    total: u32, slot: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> flags: array<atomic<u32>>;

@compute @workgroup_size(WORKGROUP)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    var bad = false;
    for (var i = invocation_index(gid, nwg); i < p.total; i += nwg.x * nwg.y * WORKGROUP) {
        // All exponent bits set: an infinity or a NaN. Bits, not `v != v`: WGSL lets
        // compilers assume floats are finite, and on lavapipe that comparison never fired.
        let exponent = bitcast<u32>(x[i]) & 0x7f800000u;
        bad = bad || exponent == 0x7f800000u;
    }
    if bad {
        atomicOr(&flags[p.slot], 1u);
    }
}
