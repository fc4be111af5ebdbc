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
use crate::gpu::dispatch::{Binding, UniformCopies};
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, small_workgroups};
use crate::gpu::{Generated, Gpu};

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

/// How the small kernel reads A and B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SmallReads {
    /// Lane by lane from their storage buffers (every adapter, and operands past
    /// [`Gpu::uniform_binding_bytes`]).
    Storage,
    /// From uniform copies of them made before the pass, on CPU adapters: lavapipe reads a
    /// uniform buffer at a per-lane index ~16× faster than storage and ~5× faster than a
    /// texture (`lavapipe-probe micro`, AVX2 EPYC: 4.2 against 0.26 and 0.78 G lane-loads/s),
    /// where every float of this kernel is a lane's own load. GPUs serialise a uniform read
    /// whose index differs across lanes, so they keep storage.
    Uniform,
}

impl SmallReads {
    /// Uniform copies on CPU adapters where both operands fit them, storage otherwise.
    fn choose(gpu: &Gpu, a: Binding<'_>, b: Binding<'_>) -> Self {
        if gpu.cpu_kernels() && a.bytes.max(b.bytes) <= gpu.uniform_binding_bytes() {
            Self::Uniform
        } else {
            Self::Storage
        }
    }
}

/// The kernel reading its operands one way; with uniform ones, `vec4s` a binding.
#[derive(Debug)]
struct SmallKernel {
    reads: SmallReads,
    vec4s: u64,
}

impl Generated for SmallKernel {
    fn source(&self) -> String {
        let operands = match self.reads {
            SmallReads::Storage => "@group(0) @binding(1) var<storage, read> a: array<f32>;\n\
                 @group(0) @binding(2) var<storage, read> b: array<f32>;\n\
                 fn load_a(i: u32) -> f32 { return a[i]; }\n\
                 fn load_b(i: u32) -> f32 { return b[i]; }\n"
                .to_string(),
            // A uniform array's elements are 16 bytes apart: floats are read out of vec4s.
            SmallReads::Uniform => format!(
                "@group(0) @binding(1) var<uniform> a: array<vec4<f32>, {0}>;\n\
                 @group(0) @binding(2) var<uniform> b: array<vec4<f32>, {0}>;\n\
                 fn load_a(i: u32) -> f32 {{ return a[i >> 2u][i & 3u]; }}\n\
                 fn load_b(i: u32) -> f32 {{ return b[i >> 2u][i & 3u]; }}\n",
                self.vec4s
            ),
        };
        [
            include_str!("../../shaders/epilogue.wgsl"),
            &include_str!("../../shaders/matmul_small.wgsl").replace("{{OPERANDS}}", &operands),
        ]
        .concat()
    }
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
        let reads = SmallReads::choose(gpu, a, b);
        self.run_small_reading(gpu, shape, [a, b, bias, out], accumulate, reads)
    }

    /// [`Matmul::run_small`] with its operands read `reads`.
    fn run_small_reading(
        &self,
        gpu: &Gpu,
        shape: &MatmulShape,
        [a, b, bias, out]: [Binding<'_>; 4],
        accumulate: bool,
        reads: SmallReads,
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
        let capacity = gpu.uniform_binding_bytes();
        let kernel = SmallKernel {
            reads,
            vec4s: capacity / 16,
        };
        let pipelines = passes
            .iter()
            .map(|k_pass| {
                let [add_to_c, finish] = k_pass.constants();
                let constants = [("ACTIVATION", activation.code()), add_to_c, finish];
                gpu.generated(&kernel, "main", &constants)
            })
            .collect::<Result<Vec<_>>>()?;
        let copies = match reads {
            SmallReads::Storage => UniformCopies::default(),
            SmallReads::Uniform => gpu.uniform_copies(&[a, b])?,
        };
        let (a, b) = (
            copies.binding(0).unwrap_or(a),
            copies.binding(1).unwrap_or(b),
        );
        gpu.run_pass_after(
            "matmul",
            |commands| copies.record(commands),
            |pass| {
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
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use ndarray::ArrayD;

    use super::*;
    use crate::gpu::GpuOptions;
    use crate::ops::Activation;
    use crate::ops::matmul::{BiasAxis, matmul_cpu};
    use crate::tensor::Tensor;
    use crate::test_support::{gpu, max_abs_diff, random};

    /// Both ways of reading the operands, whatever the adapter would pick, against the CPU:
    /// each operand transposed or not, batched or shared, a bias per row or per column,
    /// blocks that C's edges cut, the output poisoned with NaN. The uniform copies run on
    /// any adapter (the choice keeps them to CPU adapters for speed, not correctness).
    #[test]
    fn both_operand_reads_match_the_cpu() {
        let Some(gpu) = gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        // (batch of A, batch of B, M, K, N, bias); a batch of 0 leaves the operand 2-D.
        let cases = [
            (0, 0, 5, 7, 9, BiasAxis::PerColumn),
            (0, 0, 64, 84, 10, BiasAxis::PerColumn),
            (3, 3, 13, 37, 6, BiasAxis::None),
            (4, 0, 6, 11, 17, BiasAxis::PerRow),
            (0, 2, 9, 3, 5, BiasAxis::PerColumn),
        ];
        for (i, &(a_batch, b_batch, m, k, n, bias_axis)) in cases.iter().enumerate() {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let spec = Matmul {
                    trans_a,
                    trans_b,
                    bias: bias_axis,
                    activation: Activation::Relu,
                    ..Matmul::default()
                };
                let dims = |batch: usize, rows: usize, cols: usize| match batch {
                    0 => vec![rows, cols],
                    _ => vec![batch, rows, cols],
                };
                let a_dims = if trans_a {
                    dims(a_batch, k, m)
                } else {
                    dims(a_batch, m, k)
                };
                let b_dims = if trans_b {
                    dims(b_batch, n, k)
                } else {
                    dims(b_batch, k, n)
                };
                let bias_len = if bias_axis == BiasAxis::PerRow { m } else { n };
                let seed = 10 * i as u64;
                let (a, b, bias) = (
                    random(&a_dims, seed + 1),
                    random(&b_dims, seed + 2),
                    random(&[bias_len], seed + 3),
                );
                let with_bias = bias_axis != BiasAxis::None;
                let want = matmul_cpu(
                    &spec,
                    &a.view(),
                    &b.view(),
                    with_bias.then(|| bias.view()).as_ref(),
                )
                .unwrap();
                let bias_shape = [bias_len];
                let shape = spec
                    .shape(&a_dims, &b_dims, with_bias.then_some(&bias_shape[..]))
                    .unwrap();
                let tensor = |x: &ArrayD<f32>| Tensor::from_array(&gpu, x).unwrap();
                let (ta, tb, tbias) = (tensor(&a), tensor(&b), tensor(&bias));
                let bias_binding = if with_bias {
                    tbias.binding()
                } else {
                    ta.binding()
                };
                for reads in [SmallReads::Storage, SmallReads::Uniform] {
                    let out = Tensor::full(&gpu, &shape.out, f32::NAN).unwrap();
                    let bindings = [ta.binding(), tb.binding(), bias_binding, out.binding()];
                    spec.run_small_reading(&gpu, &shape, bindings, false, reads)
                        .unwrap();
                    let got = out.to_array().unwrap();
                    assert_eq!(got.shape(), want.shape());
                    let diff = max_abs_diff(&got, &want);
                    assert!(
                        diff <= 1e-5 * k as f32,
                        "{reads:?} {a_dims:?}·{b_dims:?} trans {trans_a}/{trans_b}: off by {diff}"
                    );
                }
            }
        }
    }

    /// CPU adapters read operands that fit a uniform binding from uniform copies; larger ones,
    /// and every operand on a GPU, from storage.
    #[test]
    fn uniform_copies_only_where_they_fit_on_cpu_adapters() {
        let Some(gpu) = gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let capacity = gpu.uniform_binding_bytes();
        let (small, large) = (
            Tensor::full(&gpu, &[16], 1.0).unwrap(),
            Tensor::full(&gpu, &[capacity as usize / 4 + 1], 1.0).unwrap(),
        );
        let fitting = if gpu.cpu_kernels() {
            SmallReads::Uniform
        } else {
            SmallReads::Storage
        };
        assert_eq!(
            SmallReads::choose(&gpu, small.binding(), small.binding()),
            fitting
        );
        assert_eq!(
            SmallReads::choose(&gpu, small.binding(), large.binding()),
            SmallReads::Storage
        );
        assert_eq!(
            SmallReads::choose(&gpu, large.binding(), small.binding()),
            SmallReads::Storage
        );
    }
}
