// Elementwise sums: `add` writes out = act(a + b) (residual connections, with the activation
// after them: ACT, an `Activation::code`; epilogue.wgsl is put in front); `accumulate` adds
// a into out in place (a value that feeds several nodes sums their gradients); `backward`
// is add's gradient for both of its inputs. src/value/add.rs puts in front the inputs a, b
// and more with `load_a(i)` and its kin: vec4 number i, from storage or, where the adapter's
// calibration prefers them, textures. p.total counts vec4s; what lands in the padding past
// the last element is never read. All walk whole vec4s with the grid's stride, as
// activation.wgsl's elementwise kernels do (runs of consecutive vec4s per lane, as
// norm.wgsl's take, were slower here on lavapipe).

struct Params {
    total: u32, slope: f32, _pad1: u32, _pad2: u32,   // slope: leaky ReLU's, with ACT
}

override ACT: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = invocation_index(gid, nwg); i < p.total; i += grid_stride(nwg)) {
        out[i] = activate_vec4(load_a(i) + load_b(i), ACT, p.slope);
    }
}

@compute @workgroup_size(WORKGROUP)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = invocation_index(gid, nwg); i < p.total; i += grid_stride(nwg)) {
        out[i] += load_a(i);
    }
}

// `backward`: out = out2 = act'(y)·(dy + more), the gradient of act(a + b) for a and for b,
// from the forward output y (bound as a) and dy (as b). With PARTS 2, `more` is a second
// part of dy that the executor left for this pass to add (the value fed two nodes: a
// residual block's output), so that summing the parts, taking them through the activation
// and handing the result to both inputs is one pass over the tensor instead of three.
override PARTS: u32 = 1u;

@group(0) @binding(5) var<storage, read_write> out2: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = invocation_index(gid, nwg); i < p.total; i += grid_stride(nwg)) {
        var d = load_b(i);
        if PARTS == 2u { d += load_more(i); }
        if ACT != 0u { d *= activation_derivative_vec4(load_a(i), ACT, p.slope); }
        out[i] = d;
        out2[i] = d;
    }
}
