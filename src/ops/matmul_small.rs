//! The small matmul kernel (`shaders/matmul_small.wgsl`): a 4×4 block of C per invocation,
//! the operands read through their strides as they lie. On CPU adapters the subgroup kernel
//! costs a small product more than its arithmetic: a pack pass per transposed or unaligned
//! operand, and 110–170 ms of lavapipe's JIT per structurally distinct variant (a
//! classifier's last layer, 64×84 → 10, needed three: scalar stores, a transposed run, a
//! packed B). This kernel has one variant per activation (and kind of K pass), its other
//! choices uniforms. The CPU reference is `matmul_cpu`, shared with the other kernels.

use bytemuck::{Pod, Zeroable};

use super::matmul::{KPass, Matmul, MatmulShape, checked_u32};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::gpu::dispatch::Binding;
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, small_workgroups};

/// Products of at most this many multiply-adds (`batch·M·N·K`) take the small kernel where
/// the subgroup one would run: set to cover LeNet's last layer (64×84 → 10: 53,760) and
/// ResNet-20's at batch 128 (81,920), forward and backward, not measured as a crossover.
/// Larger products go on needing the subgroup kernel's variants anyway (LeNet's fc1 and
/// fc2), and its broadcasts load less: here every float of both operands is a lane's own
/// load, half of one per multiply-add.
pub(crate) const SMALL_MULTIPLY_ADDS: usize = 1 << 17;

/// Rows and columns of C per invocation (the shader's four sums of four).
const BLOCK: usize = 4;

/// Mirrors `Params` in shaders/matmul_small.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SmallParams {
    m: u32,
    n: u32,
    slope: f32,
    blocks: u32,
    blocks_m: u32,
    blocks_n: u32,
    a_batch: u32,
    a_row: u32,
    a_k: u32,
    b_batch: u32,
    b_k: u32,
    b_col: u32,
    k_begin: u32,
    k_end: u32,
    bias_mode: u32,
    relu: u32,
}

fn source() -> String {
    [
        include_str!("../../shaders/epilogue.wgsl"),
        include_str!("../../shaders/matmul_small.wgsl"),
    ]
    .concat()
}

impl Matmul {
    /// The product on the small kernel, added to what `out` holds if `accumulate`; a K past
    /// the loop bound runs as passes, each adding to C.
    pub(super) fn run_small(
        &self,
        gpu: &Gpu,
        shape: &MatmulShape,
        [a, b, bias, out]: [Binding<'_>; 4],
        accumulate: bool,
    ) -> Result<()> {
        let (m, k, n) = (shape.m, shape.k, shape.n);
        let (a_row, a_k) = if self.trans_a { (1, m) } else { (k, 1) };
        let (b_k, b_col) = if self.trans_b { (1, k) } else { (n, 1) };
        let (activation, relu) = self.activation.relu_as_uniform();
        let (blocks_m, blocks_n) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
        let blocks = checked_u32((shape.batch * blocks_m * blocks_n) as u64)?;
        // Sizes and strides within one operand, which one binding holds: under 2^32.
        let params = SmallParams {
            m: m as u32,
            n: n as u32,
            blocks,
            blocks_m: blocks_m as u32,
            blocks_n: blocks_n as u32,
            slope: self.activation.slope(),
            a_batch: if shape.a_batched { (m * k) as u32 } else { 0 },
            a_row: a_row as u32,
            a_k: a_k as u32,
            b_batch: if shape.b_batched { (k * n) as u32 } else { 0 },
            b_k: b_k as u32,
            b_col: b_col as u32,
            bias_mode: self.bias_mode(),
            relu: u32::from(relu),
            k_begin: 0,
            k_end: 0,
        };
        let passes = KPass::split(k as u32, MAX_LOOP_ITERATIONS, accumulate);
        let pipelines = passes
            .iter()
            .map(|k_pass| {
                let [add_to_c, finish] = k_pass.constants();
                let constants = [("ACTIVATION", activation.code()), add_to_c, finish];
                gpu.specialized("matmul_small", "main", source, &constants)
            })
            .collect::<Result<Vec<_>>>()?;
        gpu.run_pass("matmul", |pass| {
            for (k_pass, pipeline) in passes.iter().zip(&pipelines) {
                let params = SmallParams {
                    k_begin: k_pass.begin,
                    k_end: k_pass.end,
                    ..params
                };
                gpu.encode(
                    pass,
                    pipeline,
                    bytemuck::bytes_of(&params),
                    &[a, b, bias, out],
                    small_workgroups(u64::from(blocks)),
                )?;
            }
            Ok(())
        })
    }
}
