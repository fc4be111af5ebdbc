// Softmax cross-entropy fused with the backward pass of the linear layer that produced the
// logits, `logits = x·Wᵀ + b` (src/ops/linear_cross_entropy.rs): one workgroup computes each
// row's loss and gradient as `main_small` does (loss.wgsl, which comes before this file),
// then, from that gradient g, the layer's dx = g·W, dW = gᵀ·x and db = Σ_rows g. A small head
// (LeNet's 84 → 10 at batch 64) then takes one dispatch instead of the loss's, two
// products' and a sum's. Rows of x and W are read as vec4s. Where x is the output of an
// activation that ends a linear layer, the variant with an input gate also takes dx back
// through it and stores that layer's bias gradient (src/ops/linear_cross_entropy.rs fills
// in its lines): one pass fewer again.

// The layer's inputs per row, in vec4s: a constant, so that the index arithmetic folds.
override FEATURES4: u32;

// x4 [rows][FEATURES4] at binding 8 and weight4 [classes][FEATURES4] at 9, in storage or (on
// CPU adapters, where lavapipe reads a uniform buffer at a per-lane index ~16× faster)
// uniform copies of them (src/ops/linear_cross_entropy.rs fills this in):
{{OPERANDS}}
@group(0) @binding(10) var<storage, read_write> dx4: array<vec4<f32>>;  // [rows][FEATURES4]
@group(0) @binding(11) var<storage, read_write> dweight4: array<vec4<f32>>;  // [classes][FEATURES4]
@group(0) @binding(12) var<storage, read_write> dbias: array<f32>;      // [classes]
{{INPUT_DECLS}}

@compute @workgroup_size(WORKGROUP)
fn head_small(@builtin(local_invocation_index) i: u32) {
    small_batch(i);
    // Every lane's gradient rows, stored by `row`, are visible to the whole workgroup now.
    storageBarrier();
    let f4 = FEATURES4;
    for (var o = i; o < p.rows * f4; o += WORKGROUP) {
        let r = o / f4;
        let q = o % f4;
        var sum = vec4<f32>(0.0);
        for (var k = 0u; k < p.classes; k++) {
            sum += grad[r * p.classes + k] * weight4[k * f4 + q];
        }
        dx4[o] = sum{{GATE_DX}};
    }
    for (var o = i; o < p.classes * f4; o += WORKGROUP) {
        let k = o / f4;
        let q = o % f4;
        var sum = vec4<f32>(0.0);
        for (var r = 0u; r < p.rows; r++) {
            sum += grad[r * p.classes + k] * x4[r * f4 + q];
        }
        dweight4[o] = sum;
    }
    for (var k = i; k < p.classes; k += WORKGROUP) {
        var sum = 0.0;
        for (var r = 0u; r < p.rows; r++) {
            sum += grad[r * p.classes + k];
        }
        dbias[k] = sum;
    }
{{INPUT_BIAS}}
}
