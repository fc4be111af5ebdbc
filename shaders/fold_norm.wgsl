// A convolution followed by batch norm in evaluation mode, as one convolution:
//   scale[o] = γ[o] / sqrt(var[o] + eps)
//   w'[o][…] = w[o][…] · scale[o]
//   b'[o]    = (b[o] − mean[o]) · scale[o] + β[o]      (b = 0 without a bias)
// One invocation per weight; the first of each filter also writes its bias.

struct Params {
    filters: u32, per_filter: u32, eps: f32, has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read> mean: array<f32>;
@group(0) @binding(6) var<storage, read> variance: array<f32>;
@group(0) @binding(7) var<storage, read_write> folded_weight: array<f32>;
@group(0) @binding(8) var<storage, read_write> folded_bias: array<f32>;

@compute @workgroup_size(WORKGROUP)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.filters * p.per_filter { return; }
    let o = i / p.per_filter;
    let scale = gamma[o] / sqrt(variance[o] + p.eps);
    folded_weight[i] = weight[i] * scale;
    if i % p.per_filter == 0u {
        var b = 0.0;
        if p.has_bias != 0u { b = bias[o]; }
        folded_bias[o] = (b - mean[o]) * scale + beta[o];
    }
}
