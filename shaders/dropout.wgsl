// Inverted dropout with a counter-based RNG: element i of step `step` under `seed` is kept
// when uniform(seed, step, i) >= rate, and multiplied by scale = 1/(1 - rate), rounded once on
// the host (GPUs divide approximately: x / (1 - rate) was off in the last bit on NVIDIA).
// The mask is a pure function of (seed, step, i), so backward recomputes the forward's mask.

struct Params {
    total: u32, seed: u32, step: u32, rate: f32,
    scale: f32, pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// A 32-bit integer hash with good avalanche (lowbias32).
fn hash(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn draw(i: u32) -> f32 {
    let h = hash(i ^ hash(p.seed ^ hash(p.step + 0x9e3779b9u)));
    return f32(h >> 8u) / 16777216.0;
}

// Forward (src = x, dst = y) and backward (src = dy, dst = dx) are the same map.
@compute @workgroup_size(WORKGROUP)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    dst[i] = select(0.0, src[i] * p.scale, draw(i) >= p.rate);
}
