//! `C = act(op(A) · op(B) + bias)`: batched, either operand transposed, fused epilogue.
//!
//! Two GPU kernel families, picked per adapter (see `MatmulPlan`): a workgroup-memory
//! tiled kernel for real GPUs (`shaders/matmul.wgsl`) and a subgroup-broadcast kernel for
//! CPU adapters such as lavapipe (`shaders/matmul_subgroup.wgsl`), where workgroup memory
//! is slower than none. The subgroup kernel reads its operands from storage buffers or
//! from textures, as [`Gpu::operand_reads`] found faster on the adapter. The CPU reference
//! uses ndarray's `dot`.

use std::fmt::{self, Write as _};

use bytemuck::{Pod, Zeroable};
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, Axis, Ix2, IxDyn, s};

use super::Activation;
use super::matmul_small::SMALL_MULTIPLY_ADDS;
use super::reduce::sum_axes;
use crate::error::{Error, Result};
use crate::gpu::Commands;
use crate::gpu::Gpu;
use crate::gpu::dispatch::{Binding, Resource};
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, bias_mode, workgroups};
use crate::gpu::texture::{TEXTURE_WIDTH_LOG2, Texel};
use crate::gpu::{Generated, OperandReads, OperandTexture, wgsl_section};
use crate::tensor::{Operand, Tensor};

const OP: &str = "matmul";

/// Products with fewer outputs than this run the subgroup kernel's smallest tile (but for
/// small weight gradients read as they lie: `Matmul::plan_for`).
const SMALL_PRODUCT: usize = 65_536;

/// K steps per tile of the tiled kernel (`TK` in shaders/matmul.wgsl).
const TILED_K_STEP: usize = 32;

/// Loop iterations per K tile of the tiled kernel: its K steps, one of the tile loop, two
/// staging steps and the four lanes of each of their two transposing writes (were none
/// unrolled).
const TILED_LOOPS_PER_K_TILE: usize = TILED_K_STEP + 1 + 2 + 2 * 2 * 4;

/// The most of K one tiled dispatch sums within the loop bound (a multiple of the K tile).
const TILED_K_PER_PASS: usize = MAX_LOOP_ITERATIONS / TILED_LOOPS_PER_K_TILE * TILED_K_STEP;

/// One dispatch's share of the inner dimension: a K past the loop bound runs as passes over
/// ranges of it, each after the first adding its sums to C's, the last alone adding the bias
/// and applying the activation (the kernels' `ADD_TO_C` and `FINISH` overrides).
#[derive(Clone, Copy, Debug)]
pub(super) struct KPass {
    pub(super) begin: u32,
    pub(super) end: u32,
    add_to_c: bool,
    finish: bool,
}

impl KPass {
    /// `0..len` (in the kernel's K units) in passes of at most `per_pass`; with
    /// `accumulate` the first adds to C's content too.
    pub(super) fn split(len: u32, per_pass: usize, accumulate: bool) -> Vec<KPass> {
        let per_pass = per_pass as u32;
        let passes = len.div_ceil(per_pass);
        (0..passes)
            .map(|i| KPass {
                begin: i * per_pass,
                end: len.min((i + 1) * per_pass),
                add_to_c: i > 0 || accumulate,
                finish: i + 1 == passes,
            })
            .collect()
    }

    /// The override constants that choose the pass's store.
    pub(super) fn constants(&self) -> [(&'static str, u32); 2] {
        [
            ("ADD_TO_C", u32::from(self.add_to_c)),
            ("FINISH", u32::from(self.finish)),
        ]
    }
}

/// A B operand that the kernels compute as they read it (implicit GEMM, ops/conv_implicit.rs):
/// element `[image][row][col]` (of B, or of Bᵀ with `trans_b`) is the `window_value` of one
/// section of shaders/conv_implicit.wgsl, read from `source` from image `first_image` on,
/// with the layer's shape as that shader's override constants.
pub(crate) struct Window<'a> {
    /// The tensor B is read from (x, or dy for the input gradient).
    pub(crate) source: Binding<'a>,
    /// The stored shape `[images, rows, cols]` (B's, or Bᵀ's with `trans_b`).
    pub(crate) shape: [usize; 3],
    /// The image of `source` that B's image 0 reads.
    pub(crate) first_image: u32,
    /// The section of shaders/conv_implicit.wgsl that defines `window_value`.
    pub(crate) section: &'static str,
    /// The shader's override constants.
    pub(crate) constants: Vec<(&'static str, u32)>,
}

/// The shader part of a `section` of shaders/conv_implicit.wgsl that defines `b_at`
/// (`reader` = `tiled_b`) or `load_b` (`subgroup_b`).
fn window_source(section: &str, reader: &str) -> String {
    let parts = include_str!("../../shaders/conv_implicit.wgsl");
    [
        wgsl_section(parts, "window"),
        wgsl_section(parts, section),
        wgsl_section(parts, reader),
    ]
    .concat()
}

/// A window's override constants with the layout the kernel reads it in: `transposed` (B
/// read down the stored matrix's columns) and the dense `[rows, vec4s per row]` per image
/// that the subgroup kernel steps through.
fn window_layout(
    window: &Window<'_>,
    transposed: u32,
    [rows, vec4s]: [usize; 2],
) -> Vec<(&'static str, u32)> {
    let layout = [
        ("B_TRANSPOSED", transposed),
        ("B_ROWS_PADDED", rows as u32),
        ("B_COLS4", vec4s as u32),
    ];
    [&window.constants[..], &layout].concat()
}

/// Where B comes from: a buffer, or a convolution's windows.
#[derive(Clone, Copy)]
enum SourceB<'a, 'w> {
    Buffer(Operand<'a>),
    Window(&'w Window<'a>),
}

/// Where a fused bias is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BiasAxis {
    /// No bias.
    #[default]
    None,
    /// `bias[n]` added to column `n` (a bias of length N: linear layers).
    PerColumn,
    /// `bias[m]` added to row `m` (a bias of length M: convolution as `W · col`).
    PerRow,
}

/// Which kernel runs; `Auto` follows the context's kernel family (`Gpu::kernel_family`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelChoice {
    /// The subgroup kernel in the CPU-adapter family where subgroups have a fixed size of
    /// 4–32 (the small kernel there for products of at most 2^17 multiply-adds), the tiled
    /// one elsewhere.
    #[default]
    Auto,
    /// The packed-vec4 tiled kernel in workgroup memory (the portable family's).
    Tiled,
    /// The subgroup-broadcast kernel (CPU adapters) reading storage buffers; needs the
    /// SUBGROUP feature.
    Subgroup,
    /// The subgroup-broadcast kernel reading its operands through textures (falls back to
    /// storage buffers for operands larger than the device's largest texture).
    SubgroupTexture,
    /// A 4×4 block of C per invocation, operands read as they lie (what `Auto` takes for
    /// small products where it would take the subgroup kernel); not for a B read through a
    /// convolution's windows.
    Small,
}

/// The kernel that a matmul runs, as the perf report shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPlan {
    /// The portable packed-vec4 kernel: a 64×64 block of C per workgroup, 4 rows × a vec4 of
    /// columns per invocation, K tiles of 32 in workgroup memory.
    Tiled,
    /// Each lane owns `rows` output rows × `cols` columns; B is shared by broadcast.
    Subgroup {
        /// Output rows per lane.
        rows: u32,
        /// Output columns per lane (a multiple of the subgroup size).
        cols: u32,
        /// The adapter's subgroup size.
        subgroup: u32,
        /// Computes `Cᵀ = op(B)ᵀ·op(A)ᵀ` and stores it transposed: for products with
        /// fewer rows than one subgroup tile (e.g. convolutions with few filters).
        transposed: bool,
        /// Reads A and B through textures instead of storage buffers.
        textures: bool,
    },
    /// A 4×4 block of C per invocation, each operand read through its strides (no pack).
    Small,
}

impl fmt::Display for MatmulPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatmulPlan::Tiled => write!(f, "vec4-64x64k32"),
            MatmulPlan::Subgroup {
                rows,
                cols,
                transposed,
                textures,
                ..
            } => {
                let tex = if *textures { "-tex" } else { "" };
                let t = if *transposed { "-t" } else { "" };
                write!(f, "subgroup{tex}-r{rows}c{cols}{t}")
            }
            MatmulPlan::Small => write!(f, "small"),
        }
    }
}

/// The sizes of one matmul, checked: `op(A)` is M×K, `op(B)` is K×N, over `batch` pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatmulShape {
    /// Number of products (1 for 2-D operands).
    pub batch: usize,
    /// Rows of the output.
    pub m: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Columns of the output.
    pub n: usize,
    /// Whether A has a batch dimension (else it is shared by every product).
    pub a_batched: bool,
    /// Whether B has a batch dimension (else it is shared by every product).
    pub b_batched: bool,
    /// The output shape: `[M, N]` or `[batch, M, N]`.
    pub out: Vec<usize>,
}

impl MatmulShape {
    /// Whether the product has fewer outputs than [`SMALL_PRODUCT`].
    fn is_small(&self) -> bool {
        self.batch * self.m * self.n < SMALL_PRODUCT
    }

    /// Floating-point operations (multiply and add counted apart).
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

/// A matrix product with its options. `Matmul::default()` is the plain `A · B`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Matmul {
    /// Use `Aᵀ` (A is stored K×M).
    pub trans_a: bool,
    /// Use `Bᵀ` (B is stored N×K).
    pub trans_b: bool,
    /// Where the bias goes, if any.
    pub bias: BiasAxis,
    /// Applied after the bias.
    pub activation: Activation,
    /// Kernel family override (tests and benchmarks).
    pub kernel: KernelChoice,
}

fn split_batch(name: &str, shape: &[usize]) -> Result<(Option<usize>, usize, usize)> {
    match *shape {
        [rows, cols] => Ok((None, rows, cols)),
        [batch, rows, cols] => Ok((Some(batch), rows, cols)),
        _ => Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![shape.to_vec()],
            detail: format!("{name} must be 2-D or 3-D (batch first), got {shape:?}"),
        }),
    }
}

impl Matmul {
    /// Checks the operand shapes against the options and returns the product's sizes.
    pub fn shape(&self, a: &[usize], b: &[usize], bias: Option<&[usize]>) -> Result<MatmulShape> {
        for shape in [a, b] {
            if let Some(axis) = shape.iter().position(|&d| d == 0) {
                return Err(Error::EmptyDimension {
                    op: OP,
                    shape: shape.to_vec(),
                    axis,
                });
            }
        }
        let (a_batch, a_rows, a_cols) = split_batch("A", a)?;
        let (b_batch, b_rows, b_cols) = split_batch("B", b)?;
        let (m, k) = if self.trans_a {
            (a_cols, a_rows)
        } else {
            (a_rows, a_cols)
        };
        let (k_b, n) = if self.trans_b {
            (b_cols, b_rows)
        } else {
            (b_rows, b_cols)
        };
        if k != k_b {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![a.to_vec(), b.to_vec()],
                detail: format!(
                    "inner dimensions differ: op(A) is {m}×{k} (A {a:?}, trans_a={}), \
                     op(B) is {k_b}×{n} (B {b:?}, trans_b={})",
                    self.trans_a, self.trans_b
                ),
            });
        }
        let batch = match (a_batch, b_batch) {
            (Some(x), Some(y)) if x != y => {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    shapes: vec![a.to_vec(), b.to_vec()],
                    detail: format!("batch sizes differ: A {a:?}, B {b:?}"),
                });
            }
            (Some(x), _) | (None, Some(x)) => x,
            (None, None) => 1,
        };
        let expected_bias = match self.bias {
            BiasAxis::None => None,
            BiasAxis::PerColumn => Some(n),
            BiasAxis::PerRow => Some(m),
        };
        match (expected_bias, bias) {
            (None, None) => {}
            (Some(len), Some(shape)) if shape == [len] => {}
            (expected, given) => {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    shapes: given.map(<[usize]>::to_vec).into_iter().collect(),
                    detail: format!(
                        "bias {:?} expects a 1-D bias of length {expected:?}, got {given:?}",
                        self.bias
                    ),
                });
            }
        }
        let out = if a_batch.is_some() || b_batch.is_some() {
            vec![batch, m, n]
        } else {
            vec![m, n]
        };
        Ok(MatmulShape {
            batch,
            m,
            k,
            n,
            a_batched: a_batch.is_some(),
            b_batched: b_batch.is_some(),
            out,
        })
    }

    /// The kernel this product would run with on `gpu`.
    pub fn plan(&self, gpu: &Gpu, shape: &MatmulShape) -> Result<MatmulPlan> {
        self.plan_for(gpu, shape, false)
    }

    /// The plan for a B read from a convolution's windows (`implicit_b`) or from a buffer:
    /// an implicit B is never the left operand (no transposed run) nor in a texture.
    fn plan_for(&self, gpu: &Gpu, shape: &MatmulShape, implicit_b: bool) -> Result<MatmulPlan> {
        let subgroup = gpu.fixed_subgroup_size().filter(|s| (4..=32).contains(s));
        let use_subgroup = match self.kernel {
            KernelChoice::Tiled => false,
            KernelChoice::Auto => gpu.cpu_kernels() && subgroup.is_some(),
            KernelChoice::Subgroup | KernelChoice::SubgroupTexture => true,
            KernelChoice::Small if implicit_b => {
                return Err(Error::InvalidArgument {
                    op: OP,
                    detail: "the small kernel reads B from a buffer, not through a \
                             convolution's windows; use KernelChoice::Auto"
                        .into(),
                });
            }
            KernelChoice::Small => return Ok(MatmulPlan::Small),
        };
        if !use_subgroup {
            return Ok(MatmulPlan::Tiled);
        }
        let multiply_adds = shape.batch * shape.m * shape.n * shape.k;
        if self.kernel == KernelChoice::Auto && !implicit_b && multiply_adds <= SMALL_MULTIPLY_ADDS
        {
            return Ok(MatmulPlan::Small);
        }
        let subgroup = subgroup.ok_or_else(|| Error::InvalidArgument {
            op: OP,
            detail: "the subgroup kernel needs an adapter with subgroups of a fixed size \
                     from 4 to 32; use KernelChoice::Auto or Tiled"
                .into(),
        })?;
        // Small products (a linear layer at batch 64) pay for a large register tile twice:
        // few tiles to spread over the threads, and up to a second of shader compilation per
        // variant for its unrolled body. They get 2 rows × 16 columns a lane: LeNet's nine
        // products took 0.87 ms a step against 1.28 with 1 × 8 and 0.89 with 4 × 32, MNIST's
        // cold first step 1.77 s against 1.52 and 2.6. Their A given transposed is packed
        // (one pass), except in a small weight gradient:
        let small = shape.is_small();
        // Whether the product runs transposed at `rows` rows a lane.
        let runs_transposed = |rows: u32| {
            // A tile spans subgroup·rows output rows: a product with fewer rows and more
            // columns runs transposed, so that its long side fills the lanes.
            let few_rows = shape.m < (subgroup * rows) as usize;
            // A K that is not a multiple of 4 has B (K×N) packed into vec4 rows; run
            // transposed, B is read as it lies (as A's columns, see `SubgroupKernel::a_cols`)
            // and only A (M×K) is packed: an im2col product of a 7×7 RGB stem, 64×147×12544,
            // took 18 ms against 4.7.
            let unaligned_k = !self.trans_b
                && !shape.k.is_multiple_of(4)
                && shape.n.is_multiple_of(4)
                && rows == 4;
            !implicit_b && (few_rows || unaligned_k) && shape.n > shape.m
        };
        // A small product with A given transposed, M a multiple of 4 and no epilogue (e.g. a
        // linear layer's weight gradient) takes 4 rows a lane where that run is not
        // transposed, so that `run_subgroup` reads its A as it lies (`a_cols`) instead of
        // packing it in a pass of its own. LeNet's step took 0.23–0.26 ms less (its fc1 and
        // fc2 weight gradients; alternated in one process), the MNIST example's cold first
        // step about 0.1 s more (lavapipe's JIT of the 4-row kernel, with no epilogue,
        // 170–220 ms, of the pack's ~20). Four rows for its input gradients too took 0.05 ms
        // more off the step and put 0.07 s more of JIT on a first step near its 2 s target.
        let reads_a_columns = self.trans_a
            && shape.m.is_multiple_of(4)
            && !self.has_epilogue()
            && !runs_transposed(4);
        // A convolution's windows read as B are gathers, a costly per-lane load per float:
        // eight rows a lane share each twice as far as four (ResNet's 7×7 stem at batch 8,
        // 3→64 at 224²: 44 ms with 8 rows × 16 columns against 49–56 with 4 × 32).
        let wide_rows = implicit_b && !small && !self.trans_a && shape.m >= (subgroup * 8) as usize;
        let rows = match (small, wide_rows) {
            (true, _) if reads_a_columns => 4,
            (true, _) => 2,
            (false, true) => 8,
            (false, false) => 4,
        };
        let transposed = runs_transposed(rows);
        let n = if transposed { shape.m } else { shape.n };
        // Wide column tiles share each broadcast B value across more FMAs; narrow outputs
        // would waste them.
        let cols = if n <= 8 {
            8
        } else if n <= 16 || small || wide_rows {
            16
        } else {
            32
        };
        let want_textures = match self.kernel {
            KernelChoice::SubgroupTexture => true,
            KernelChoice::Auto => gpu.operand_reads()? == OperandReads::Texture,
            KernelChoice::Tiled | KernelChoice::Subgroup | KernelChoice::Small => false,
        };
        // The packed operands of the product as run (transposed: B is the left operand).
        let (k4, m4, n4) = (
            shape.k.div_ceil(4),
            shape.m.div_ceil(4),
            shape.n.div_ceil(4),
        );
        let a_batches = if shape.a_batched { shape.batch } else { 1 };
        let b_batches = if shape.b_batched { shape.batch } else { 1 };
        let texels = if transposed {
            [b_batches * shape.n * k4, a_batches * 4 * k4 * m4]
        } else {
            [a_batches * shape.m * k4, b_batches * 4 * k4 * n4]
        };
        let textures = want_textures
            && texels
                .iter()
                .take(if implicit_b { 1 } else { 2 })
                .all(|&t| gpu.fits_operand_texture(t as u64));
        Ok(MatmulPlan::Subgroup {
            rows,
            cols: cols.max(subgroup),
            subgroup,
            transposed,
            textures,
        })
    }

    /// `act(op(A) · op(B) + bias)` on the GPU, into a new tensor.
    pub fn forward(&self, a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let shape = self.shape(a.shape(), b.shape(), bias.map(Tensor::shape))?;
        let mut out = Tensor::uninit(a.gpu(), &shape.out)?;
        self.forward_into(a, b, bias, &mut out)?;
        Ok(out)
    }

    /// Like [`Matmul::forward`], writing into `out`; returns the kernel that ran.
    pub fn forward_into(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<MatmulPlan> {
        let gpu = a.gpu().clone();
        for t in [Some(b), bias, Some(&*out)].into_iter().flatten() {
            t.check_same_gpu(OP, &gpu)?;
        }
        self.run(
            &gpu,
            a.operand(),
            b.operand(),
            bias.map(Tensor::operand),
            out.operand(),
        )
    }

    /// Runs the product on operands given as buffers with shapes (views of tensors).
    pub(crate) fn run(
        &self,
        gpu: &Gpu,
        a: Operand<'_>,
        b: Operand<'_>,
        bias: Option<Operand<'_>>,
        out: Operand<'_>,
    ) -> Result<MatmulPlan> {
        self.run_with(gpu, a, SourceB::Buffer(b), bias, (out, false))
    }

    /// [`Matmul::run`] adding the product to what `out` holds (a residual sum) before the
    /// bias and the activation.
    pub(crate) fn run_adding(
        &self,
        gpu: &Gpu,
        a: Operand<'_>,
        b: Operand<'_>,
        bias: Option<Operand<'_>>,
        out: Operand<'_>,
    ) -> Result<MatmulPlan> {
        self.run_with(gpu, a, SourceB::Buffer(b), bias, (out, true))
    }

    /// Runs the product with B read from a convolution's windows (implicit GEMM): no
    /// column buffer.
    pub(crate) fn run_window(
        &self,
        gpu: &Gpu,
        a: Operand<'_>,
        b: &Window<'_>,
        bias: Option<Operand<'_>>,
        out: Operand<'_>,
    ) -> Result<MatmulPlan> {
        self.run_with(gpu, a, SourceB::Window(b), bias, (out, false))
    }

    /// `out = Σ_b op(A)[b] · op(B)[b]` (`out` holds `[M, N]` in any shape): a batched
    /// product summed over its batch, as weight gradients are. The tiled kernel runs it as
    /// one split-K product over K' = batch·K in slices that fill the adapter
    /// ([`Gpu::target_workgroups`]), their partial sums `[slices, M, N]` added up by
    /// `sum_axes` (as many as the slices, whatever the batch; one slice writes `out`
    /// directly). Returns `false`, having run nothing,
    /// where the plan is another kernel's: the caller sums per-image products instead.
    pub(crate) fn run_summed(
        &self,
        gpu: &Gpu,
        a: Operand<'_>,
        b: Operand<'_>,
        out: &Tensor,
    ) -> Result<bool> {
        self.summed_with(gpu, a, SourceB::Buffer(b), out)
    }

    /// [`Matmul::run_summed`] with B read from a convolution's windows.
    pub(crate) fn run_window_summed(
        &self,
        gpu: &Gpu,
        a: Operand<'_>,
        b: &Window<'_>,
        out: &Tensor,
    ) -> Result<bool> {
        self.summed_with(gpu, a, SourceB::Window(b), out)
    }

    fn summed_with(
        &self,
        gpu: &Gpu,
        a: Operand<'_>,
        b: SourceB<'_, '_>,
        out: &Tensor,
    ) -> Result<bool> {
        let (b_shape, window) = match b {
            SourceB::Buffer(b) => (b.shape, None),
            SourceB::Window(window) => (&window.shape[..], Some(window)),
        };
        let shape = self.shape(a.shape, b_shape, None)?;
        if !(shape.a_batched && shape.b_batched) || out.len() != shape.m * shape.n {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![a.shape.to_vec(), b_shape.to_vec(), out.shape().to_vec()],
                detail: "a product summed over its batch takes batched operands into an \
                         output of M·N values"
                    .into(),
            });
        }
        if self.plan_for(gpu, &shape, window.is_some())? != MatmulPlan::Tiled {
            return Ok(false);
        }
        let split = SplitK::choose(gpu, &shape)?;
        let b = match b {
            SourceB::Buffer(b) => b.binding,
            SourceB::Window(window) => window.source,
        };
        let partials = if split.slices > 1 {
            Some(Tensor::uninit(
                gpu,
                &[split.slices as usize, shape.m, shape.n],
            )?)
        } else {
            None
        };
        let c = partials.as_ref().unwrap_or(out).binding();
        let bindings = [a.binding, b, a.binding, c];
        self.run_tiled(gpu, &shape, bindings, (window, false), Some(split))?;
        if let Some(partials) = &partials {
            let dims = (split.slices as usize, shape.m * shape.n, 1);
            sum_axes(gpu, partials, dims, out, 1.0, false)?;
        }
        Ok(true)
    }

    /// The product into `out`, added to its content if `accumulate`.
    fn run_with(
        &self,
        gpu: &Gpu,
        a: Operand<'_>,
        b: SourceB<'_, '_>,
        bias: Option<Operand<'_>>,
        (out, accumulate): (Operand<'_>, bool),
    ) -> Result<MatmulPlan> {
        let (b_shape, window) = match b {
            SourceB::Buffer(b) => (b.shape, None),
            SourceB::Window(window) => (&window.shape[..], Some(window)),
        };
        let shape = self.shape(a.shape, b_shape, bias.map(|x| x.shape))?;
        if out.shape != shape.out.as_slice() {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![out.shape.to_vec(), shape.out.to_vec()],
                detail: format!("output is {:?}, the product is {:?}", out.shape, shape.out),
            });
        }
        let plan = self.plan_for(gpu, &shape, window.is_some())?;
        // Without a bias, A stands in for the unused (read-only) bias binding.
        let bias = bias.unwrap_or(a).binding;
        let b = match b {
            SourceB::Buffer(b) => b.binding,
            SourceB::Window(window) => window.source,
        };
        let (a, out) = (a.binding, out.binding);
        match plan {
            MatmulPlan::Tiled => {
                self.run_tiled(gpu, &shape, [a, b, bias, out], (window, accumulate), None)?
            }
            MatmulPlan::Small => self.run_small(gpu, &shape, [a, b, bias, out], accumulate)?,
            MatmulPlan::Subgroup {
                transposed: false, ..
            } => self.run_subgroup(gpu, &shape, plan, [a, b, bias, out], (window, accumulate))?,
            MatmulPlan::Subgroup {
                transposed: true, ..
            } => {
                // Cᵀ = op(B)ᵀ · op(A)ᵀ: B becomes the left operand, rows and columns trade places.
                let swapped = Matmul {
                    trans_a: !self.trans_b,
                    trans_b: !self.trans_a,
                    bias: match self.bias {
                        BiasAxis::PerRow => BiasAxis::PerColumn,
                        BiasAxis::PerColumn => BiasAxis::PerRow,
                        BiasAxis::None => BiasAxis::None,
                    },
                    ..*self
                };
                let swapped_shape = MatmulShape {
                    m: shape.n,
                    n: shape.m,
                    a_batched: shape.b_batched,
                    b_batched: shape.a_batched,
                    ..shape.clone()
                };
                let bindings = [b, a, bias, out];
                swapped.run_subgroup(gpu, &swapped_shape, plan, bindings, (None, accumulate))?
            }
        }
        Ok(plan)
    }

    fn run_tiled(
        &self,
        gpu: &Gpu,
        shape: &MatmulShape,
        bindings: [Binding<'_>; 4],
        (window, accumulate): (Option<&Window<'_>>, bool),
        split: Option<SplitK>,
    ) -> Result<()> {
        let (m, k, n) = (shape.m as u32, shape.k as u32, shape.n as u32);
        let (a_row, a_col) = if self.trans_a { (1, m) } else { (k, 1) };
        let (b_row, b_col) = if self.trans_b { (1, k) } else { (n, 1) };
        let tiles_m = m.div_ceil(64);
        let tiles_n = n.div_ceil(64);
        // Split K: one product over the batch's K, its slices in place of the batch.
        let batch = split.map_or(shape.batch as u32, |s| s.slices);
        let k_total = match split {
            Some(_) => checked_u32(shape.batch as u64 * u64::from(k))?,
            None => k,
        };
        let total_tiles = checked_u32(tiles_m as u64 * tiles_n as u64 * u64::from(batch))?;
        let params = TiledParams {
            m,
            n,
            k,
            batch,
            a_row,
            a_col,
            a_batch: if shape.a_batched { m * k } else { 0 },
            b_row,
            b_col,
            b_batch: if shape.b_batched { k * n } else { 0 },
            tiles_m,
            tiles_n,
            total_tiles,
            bias_mode: self.bias_mode(),
            activation: self.activation.code(),
            slope: self.activation.slope(),
            k_begin: 0,
            k_end: k_total,
            first_image: window.map_or(0, |w| w.first_image),
            k_inner: k,
            k_slice: split.map_or(0, |s| s.slice),
            _pad: 0,
        };
        // Each operand's quads run along its contiguous axis; where that axis is a multiple
        // of 4, a dense operand is read as aligned vec4s.
        let a_along_k = !self.trans_a;
        let b_along_n = !self.trans_b;
        let a_vec4 = if a_along_k { k } else { m }.is_multiple_of(4);
        let b_vec4 = window.is_none() && if b_along_n { n } else { k }.is_multiple_of(4);
        let operands = include_str!("../../shaders/matmul_operands.wgsl");
        let a_quad = wgsl_section(operands, if a_vec4 { "tiled_a4" } else { "tiled_a" });
        let b_quad = match window {
            Some(window) => {
                window_source(window.section, "tiled_b") + wgsl_section(operands, "b_quads")
            }
            None if b_vec4 => wgsl_section(operands, "tiled_b4").to_string(),
            None => [
                wgsl_section(operands, "tiled_b"),
                wgsl_section(operands, "b_quads"),
            ]
            .concat(),
        };
        let source = || {
            [
                include_str!("../../shaders/epilogue.wgsl"),
                a_quad,
                &b_quad,
                include_str!("../../shaders/matmul.wgsl"),
            ]
            .concat()
        };
        let key = format!(
            "matmul_tiled_a{}_b{}",
            if a_vec4 { "4" } else { "1" },
            match window {
                Some(window) => window.section,
                None if b_vec4 => "4",
                None => "1",
            }
        );
        let layout = [
            ("A_ALONG_K", u32::from(a_along_k)),
            ("B_ALONG_N", u32::from(b_along_n)),
            ("SPLIT_K", u32::from(split.is_some())),
        ];
        // A window is read element by element: `B_TRANSPOSED` picks the order, the dense
        // layout is the subgroup kernel's.
        let operand_constants = match window {
            Some(w) => [
                &layout[..],
                &window_layout(w, u32::from(self.trans_b), [0, 0]),
            ]
            .concat(),
            None => layout.to_vec(),
        };
        // A split product's slices are each within one pass's share of K.
        let passes = match split {
            Some(_) => KPass::split(k_total, k_total.max(1) as usize, accumulate),
            None => KPass::split(k, TILED_K_PER_PASS, accumulate),
        };
        gpu.run_pass("matmul", |pass| {
            for k_pass in &passes {
                let constants = [&k_pass.constants()[..], &operand_constants].concat();
                let pipeline = gpu.specialized(&key, "main", source, &constants)?;
                let params = TiledParams {
                    k_begin: k_pass.begin,
                    k_end: k_pass.end,
                    ..params
                };
                gpu.encode(
                    pass,
                    &pipeline,
                    bytemuck::bytes_of(&params),
                    &bindings,
                    u64::from(total_tiles),
                )?;
            }
            Ok(())
        })
    }

    /// Runs the subgroup kernel of `plan` on `shape` as given (a transposed plan's caller
    /// has already swapped the operands).
    fn run_subgroup(
        &self,
        gpu: &Gpu,
        shape: &MatmulShape,
        plan: MatmulPlan,
        [a, b, bias, out]: [Binding<'_>; 4],
        (window, accumulate): (Option<&Window<'_>>, bool),
    ) -> Result<()> {
        let MatmulPlan::Subgroup {
            rows,
            cols,
            subgroup,
            transposed,
            textures,
        } = plan
        else {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!("run_subgroup called with the {plan} plan"),
            });
        };
        let (m, k, n) = (shape.m, shape.k, shape.n);
        let (k4, n4) = (k.div_ceil(4), n.div_ceil(4));
        let a_batches = if shape.a_batched { shape.batch } else { 1 };
        let b_batches = if shape.b_batched { shape.batch } else { 1 };
        // B given transposed ([N][K], a linear layer's weight) with rows of whole vec4s is
        // read as it lies: each lane loads a column's four K values and the kernel turns them
        // into the rows it broadcasts (no pack).
        let b_rows = self.trans_b && k % 4 == 0;
        // A given transposed ([K][M]) with M a multiple of 4 is read as it lies: each lane
        // loads its four rows' values at four K steps and transposes them in registers.
        let a_cols = self.trans_a && m.is_multiple_of(4) && rows == 4;
        let a_dense = if a_cols {
            [a_batches, k, m]
        } else {
            [a_batches, m, 4 * k4]
        };
        let b_dense = if b_rows {
            [b_batches, n, 4 * k4]
        } else {
            [b_batches, 4 * k4, 4 * n4]
        };
        let (a_row, a_col) = if self.trans_a { (1, m) } else { (k, 1) };
        let (b_row, b_col) = if self.trans_b { (1, k) } else { (n, 1) };
        let a_pack = PackParams::new([m, k, m, 4 * k4], [a_row, a_col, m * k], a_batches);
        let b_pack = PackParams::new([k, n, 4 * k4, 4 * n4], [b_row, b_col, k * n], b_batches);
        // The kernel reads dense, vec4-aligned operands: those that are not dense already
        // are packed (into a buffer or a texture); dense ones are read as they are or copied
        // into a texture.
        let a_is_dense = a_cols || (!self.trans_a && k % 4 == 0);
        // An implicit B is read from its source as the dense layout would be (no pack).
        let b_is_dense = window.is_some() || b_rows || (!self.trans_b && k % 4 == 0 && n % 4 == 0);
        let texture = |dense: [usize; 3]| {
            gpu.operand_texture(dense.iter().product::<usize>() as u64 / 4, Texel::Vec4)
        };
        let packed = if textures {
            Packed::Textures(Box::new((
                texture(a_dense)?,
                window.is_none().then(|| texture(b_dense)).transpose()?,
            )))
        } else {
            Packed::Buffers(
                (!a_is_dense)
                    .then(|| Tensor::uninit(gpu, &a_dense))
                    .transpose()?,
                (!b_is_dense)
                    .then(|| Tensor::uninit(gpu, &b_dense))
                    .transpose()?,
            )
        };

        let tiles_m = m.div_ceil(subgroup as usize * rows as usize);
        let tiles_n = n.div_ceil(cols as usize);
        let total_tiles = checked_u32((tiles_m * tiles_n * shape.batch) as u64)?;
        let subgroups_per_group = 64 / subgroup;
        let (activation, relu) = self.activation.relu_as_uniform();
        let params = SubgroupParams {
            m: m as u32,
            n: n as u32,
            k4: k4 as u32,
            n4: n4 as u32,
            a_batch: if shape.a_batched {
                (a_dense[1] * a_dense[2] / 4) as u32
            } else {
                0
            },
            b_batch: if shape.b_batched {
                (b_dense[1] * b_dense[2] / 4) as u32
            } else {
                0
            },
            tiles_m: tiles_m as u32,
            tiles_n: tiles_n as u32,
            total_tiles,
            slope: self.activation.slope(),
            k: k as u32,
            m4: m.div_ceil(4) as u32,
            k4_begin: 0,
            k4_end: k4 as u32,
            first_image: window.map_or(0, |w| w.first_image),
            // A wide product walks its tiles down the rows first: each block of B's columns
            // serves every row while in cache, and A, the smaller, is read again per block
            // (ResNet-18's layer2 im2col product 128×1152×6272: 32 ms against 43 walking the
            // columns first; square and tall products within 3 % either way).
            rows_first: u32::from(m < n),
            bias_rows: u32::from(self.bias == BiasAxis::PerRow),
            relu: u32::from(relu),
            _pad: [0; 2],
        };
        // A small product with no bias and no activation stores its sums as they are: a
        // kernel with no epilogue (no bias binding, its last pass compiled as the others are
        // with FINISH = 0) costs lavapipe's JIT less: LeNet's weight-gradient kernel 168–222
        // ms against 217–258 with one, its input-gradient kernel 97–124 against 116–134.
        // Larger products keep one, so that one pipeline serves a model's products with and
        // without (without it for them too, ResNet-18's cold first step at batch 1 compiled
        // 36 pipelines against 35, 4.3–4.6 s against 4.1–4.2).
        let epilogue = !shape.is_small() || self.has_epilogue();
        let kernel = SubgroupKernel {
            rows,
            cols,
            subgroup,
            subgroups_per_group,
            textures,
            store: if !transposed && n.is_multiple_of(4) {
                StoreC::Columns4
            } else if transposed && rows == 4 && m.is_multiple_of(4) {
                StoreC::Rows4
            } else {
                StoreC::Scalar
            },
            a_cols,
            b_rows,
            window: window.map(|w| w.section),
            epilogue,
        };
        // An implicit B steps through the dense layout: its rows as they lie (B's, or a
        // transposed B's read as rows), or B's rows gathered down Bᵀ's columns.
        let window_constants = match window {
            Some(w) => window_layout(
                w,
                u32::from(self.trans_b && !b_rows),
                [b_dense[1], b_dense[2] / 4],
            ),
            None => Vec::new(),
        };
        // One K step per loop iteration: passes of at most the loop bound of steps.
        let passes = KPass::split(k4 as u32, MAX_LOOP_ITERATIONS, accumulate);
        let pipelines = passes
            .iter()
            .map(|k_pass| {
                let [add_to_c, (name, finish)] = k_pass.constants();
                let finish = (name, finish & u32::from(epilogue));
                let epilogue = [
                    ("ACTIVATION", activation.code()),
                    ("BIAS_COLUMNS", u32::from(self.bias == BiasAxis::PerColumn)),
                    ("TRANSPOSE_C", u32::from(transposed)),
                    add_to_c,
                    finish,
                ];
                gpu.generated(
                    &kernel,
                    "main",
                    &[&epilogue[..], &window_constants].concat(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let pack_entry = if textures { "to_texture" } else { "main" };

        let copies = |commands: &mut Commands<'_>| {
            if let Packed::Textures(textures) = &packed {
                let (a_tex, b_tex) = &**textures;
                for (dense, src, tex, sizes) in [
                    (a_is_dense, a, Some(a_tex), a_dense),
                    (b_is_dense, b, b_tex.as_ref(), b_dense),
                ] {
                    if let Some(tex) = tex.filter(|_| dense) {
                        let texels = sizes.iter().product::<usize>() as u64 / 4;
                        tex.copy_from(commands.encoder(), src, texels);
                    }
                }
            }
            Ok(())
        };
        gpu.run_pass_after("matmul", copies, |pass| {
            let mut pack = |params: &PackParams, src: Binding<'_>, dst: Resource<'_>| {
                let (number, per_invocation) = match dst {
                    Resource::Buffer(_) => (2, 1),
                    Resource::Texture(_) => (3, 4),
                };
                let pipeline =
                    gpu.specialized("pack", pack_entry, pack_source, &params.constants)?;
                gpu.encode_resources(
                    pass,
                    &pipeline,
                    bytemuck::cast_slice(&params.uniform()),
                    &[(1, Resource::Buffer(src)), (number, dst)],
                    workgroups(u64::from(params.total).div_ceil(per_invocation)),
                )
            };
            let (a_use, b_use) = match &packed {
                Packed::Textures(textures) => {
                    let (a_tex, b_tex) = &**textures;
                    if !a_is_dense {
                        pack(&a_pack, a, Resource::Texture(&a_tex.view))?;
                    }
                    // An implicit B has no texture: it reads its source buffer.
                    let b_use = match b_tex {
                        Some(b_tex) => {
                            if !b_is_dense {
                                pack(&b_pack, b, Resource::Texture(&b_tex.view))?;
                            }
                            Resource::Texture(&b_tex.view)
                        }
                        None => Resource::Buffer(b),
                    };
                    (Resource::Texture(&a_tex.view), b_use)
                }
                Packed::Buffers(a_buf, b_buf) => {
                    if let Some(t) = a_buf {
                        pack(&a_pack, a, Resource::Buffer(t.binding()))?;
                    }
                    if let Some(t) = b_buf {
                        pack(&b_pack, b, Resource::Buffer(t.binding()))?;
                    }
                    (
                        Resource::Buffer(a_buf.as_ref().map_or(a, Tensor::binding)),
                        Resource::Buffer(b_buf.as_ref().map_or(b, Tensor::binding)),
                    )
                }
            };
            for (k_pass, pipeline) in passes.iter().zip(&pipelines) {
                let params = SubgroupParams {
                    k4_begin: k_pass.begin,
                    k4_end: k_pass.end,
                    ..params
                };
                let resources = [
                    (1, a_use),
                    (2, b_use),
                    (4, Resource::Buffer(out)),
                    (3, Resource::Buffer(bias)),
                ];
                gpu.encode_resources(
                    pass,
                    pipeline,
                    bytemuck::bytes_of(&params),
                    &resources[..if epilogue { 4 } else { 3 }],
                    u64::from(total_tiles).div_ceil(u64::from(subgroups_per_group)),
                )?;
            }
            Ok(())
        })
    }

    /// Whether the product adds a bias or applies an activation after its sums.
    fn has_epilogue(&self) -> bool {
        self.bias != BiasAxis::None || self.activation != Activation::None
    }

    pub(super) fn bias_mode(&self) -> u32 {
        match self.bias {
            BiasAxis::None => bias_mode::NONE,
            BiasAxis::PerColumn => bias_mode::PER_COLUMN,
            BiasAxis::PerRow => bias_mode::PER_ROW,
        }
    }
}

pub(super) fn checked_u32(value: u64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::InvalidArgument {
        op: OP,
        detail: format!("{value} tiles do not fit one dispatch; split the batch"),
    })
}

/// How the tiled kernel slices K' = batch·K of a product summed over its batch.
#[derive(Clone, Copy, Debug)]
struct SplitK {
    slices: u32,
    /// K' per slice: a multiple of the K tile within one pass's share of the loop bound.
    slice: u32,
}

impl SplitK {
    /// Enough slices to fill the adapter with workgroups and keep each within the loop
    /// bound, no more than K' has K tiles nor than one binding holds partial sums of.
    fn choose(gpu: &Gpu, shape: &MatmulShape) -> Result<Self> {
        let total = shape.batch * shape.k;
        let tiles = shape.m.div_ceil(64) * shape.n.div_ceil(64);
        let partial = (shape.m * shape.n) as u64 * 4;
        let fewest = total.div_ceil(TILED_K_PER_PASS).max(1);
        gpu.check_buffer_size("a split product's partial sums", fewest as u64 * partial)?;
        let fit = (gpu.limits().max_storage_buffer_binding_size / partial).max(1) as usize;
        let wanted = gpu
            .target_workgroups()
            .div_ceil(tiles)
            .min(total.div_ceil(TILED_K_STEP))
            .min(fit)
            .max(fewest);
        let slice = total.div_ceil(wanted).next_multiple_of(TILED_K_STEP);
        Ok(Self {
            slices: checked_u32(total.div_ceil(slice) as u64)?,
            slice: checked_u32(slice as u64)?,
        })
    }
}

/// Mirrors `Params` in shaders/matmul.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TiledParams {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_row: u32,
    a_col: u32,
    a_batch: u32,
    b_row: u32,
    b_col: u32,
    b_batch: u32,
    tiles_m: u32,
    tiles_n: u32,
    total_tiles: u32,
    bias_mode: u32,
    activation: u32,
    slope: f32,
    k_begin: u32,
    k_end: u32,
    first_image: u32,
    k_inner: u32,
    k_slice: u32,
    _pad: u32,
}

/// Mirrors `Params` in shaders/matmul_subgroup.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SubgroupParams {
    m: u32,
    n: u32,
    k4: u32,
    n4: u32,
    a_batch: u32,
    b_batch: u32,
    tiles_m: u32,
    tiles_n: u32,
    total_tiles: u32,
    slope: f32,
    k: u32,
    m4: u32,
    k4_begin: u32,
    k4_end: u32,
    first_image: u32,
    rows_first: u32,
    bias_rows: u32,
    relu: u32,
    _pad: [u32; 2],
}

/// The operands a subgroup matmul reads, packed where needed.
enum Packed {
    /// A as a texture, and B too unless it is an implicit one.
    Textures(Box<(OperandTexture, Option<OperandTexture>)>),
    /// Dense copies of the operands that were not dense already.
    Buffers(Option<Tensor>, Option<Tensor>),
}

/// shaders/pack.wgsl with the texture width filled in.
fn pack_source() -> String {
    include_str!("../../shaders/pack.wgsl")
        .replace("{{TEXTURE_WIDTH_LOG2}}", &TEXTURE_WIDTH_LOG2.to_string())
}

/// One pack: the operand's shape and strides (the pack kernel's override constants) and its
/// length in elements, padded.
struct PackParams {
    constants: [(&'static str, u32); 7],
    total: u32,
}

impl PackParams {
    fn new(sizes: [usize; 4], strides: [usize; 3], batches: usize) -> Self {
        let [rows, cols, rows_out, cols_out] = sizes.map(|x| x as u32);
        let [row_stride, col_stride, batch_stride] = strides.map(|x| x as u32);
        Self {
            constants: [
                ("ROWS", rows),
                ("COLS", cols),
                ("ROWS_OUT", rows_out),
                ("COLS_OUT", cols_out),
                ("ROW_STRIDE", row_stride),
                ("COL_STRIDE", col_stride),
                ("BATCH_STRIDE", batch_stride),
            ],
            total: (batches * sizes[2] * sizes[3]) as u32,
        }
    }

    /// Mirrors `Params` in shaders/pack.wgsl.
    fn uniform(&self) -> [u32; 4] {
        [self.total, 0, 0, 0]
    }
}

/// `src` seen as `[outer, inner, rest]` copied dense as `[inner, outer·rest]` by the pack
/// kernel: a convolution's filters `[O][C][KH·KW]` as the input gradient's `[C][O·KH·KW]`.
pub(crate) fn swap_leading_axes(
    gpu: &Gpu,
    src: &Tensor,
    [outer, inner, rest]: [usize; 3],
) -> Result<Tensor> {
    let out = Tensor::uninit(gpu, &[inner, outer * rest])?;
    // One pack batch per `inner` index, whose rows are the `outer` ones.
    let params = PackParams::new([outer, rest, outer, rest], [inner * rest, 1, rest], inner);
    let pipeline = gpu.specialized("pack", "main", pack_source, &params.constants)?;
    gpu.run_pass("pack", |pass| {
        gpu.encode_resources(
            pass,
            &pipeline,
            bytemuck::cast_slice(&params.uniform()),
            &[
                (1, Resource::Buffer(src.binding())),
                (2, Resource::Buffer(out.binding())),
            ],
            workgroups(u64::from(params.total)),
        )
    })?;
    Ok(out)
}

/// One generated subgroup kernel: everything its source depends on (the epilogue choices
/// are `override` constants set per pipeline).
#[derive(Debug)]
struct SubgroupKernel {
    rows: u32,
    cols: u32,
    subgroup: u32,
    subgroups_per_group: u32,
    /// Operands through textures instead of storage buffers.
    textures: bool,
    /// How C is stored.
    store: StoreC,
    /// A read as its transpose's rows ([K][M], M a multiple of 4, four rows per lane) instead
    /// of dense [M][K]: per four K steps, four vec4 loads as the dense layout takes.
    a_cols: bool,
    /// B read as its transpose's rows ([N][K], K a multiple of 4) instead of dense [K][N].
    b_rows: bool,
    /// B read through a convolution's windows: the section of shaders/conv_implicit.wgsl.
    window: Option<&'static str>,
    /// A bias or an activation to apply: without, C takes the sums as they are.
    epilogue: bool,
}

/// How the subgroup kernel stores C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreC {
    /// One float at a time.
    Scalar,
    /// Row-major output with N a multiple of 4: one vec4 per 4 columns of a row.
    Columns4,
    /// Transposed output (`[n][m]`) with M a multiple of 4 and four rows a lane: one vec4 per
    /// column of the lane's rows, so that a subgroup's lanes write one contiguous run.
    Rows4,
}

/// The CPU reference: `act(op(A) · op(B) + bias)` with ndarray's `dot`, batch by batch.
pub fn matmul_cpu(
    spec: &Matmul,
    a: &ArrayViewD<'_, f32>,
    b: &ArrayViewD<'_, f32>,
    bias: Option<&ArrayViewD<'_, f32>>,
) -> Result<ArrayD<f32>> {
    let shape = spec.shape(a.shape(), b.shape(), bias.map(|x| x.shape()))?;
    let mut out = ArrayD::<f32>::zeros(IxDyn(&[shape.batch, shape.m, shape.n]));
    for i in 0..shape.batch {
        let a_i = cpu_matrix(a, shape.a_batched, i, spec.trans_a)?;
        let b_i = cpu_matrix(b, shape.b_batched, i, spec.trans_b)?;
        let mut c: Array2<f32> = a_i.dot(&b_i);
        if let Some(bias) = bias {
            let bias = bias
                .view()
                .into_dimensionality::<ndarray::Ix1>()
                .map_err(shape_error)?;
            match spec.bias {
                BiasAxis::PerColumn => c += &bias.slice(s![ndarray::NewAxis, ..]),
                BiasAxis::PerRow => c += &bias.slice(s![.., ndarray::NewAxis]),
                BiasAxis::None => {}
            }
        }
        c.mapv_inplace(|x| spec.activation.apply(x));
        out.index_axis_mut(Axis(0), i).assign(&c);
    }
    out.into_shape_with_order(IxDyn(&shape.out))
        .map_err(shape_error)
}

/// Matrix `i` of a (possibly batched) operand, transposed if asked.
fn cpu_matrix<'a>(
    x: &ArrayViewD<'a, f32>,
    batched: bool,
    i: usize,
    trans: bool,
) -> Result<ArrayView2<'a, f32>> {
    let view = if batched {
        x.clone().index_axis_move(Axis(0), i)
    } else {
        x.clone()
    };
    let view = view.into_dimensionality::<Ix2>().map_err(shape_error)?;
    Ok(if trans { view.reversed_axes() } else { view })
}

fn shape_error(e: ndarray::ShapeError) -> Error {
    Error::ShapeMismatch {
        op: OP,
        shapes: Vec::new(),
        detail: e.to_string(),
    }
}
impl Generated for SubgroupKernel {
    /// Fills in the unrolled parts of shaders/matmul_subgroup.wgsl.
    fn source(&self) -> String {
        let Self {
            rows,
            cols,
            subgroup,
            subgroups_per_group,
            ..
        } = *self;
        let col_groups = cols / 4;
        // Per 4 K-steps the subgroup loads 4 × col_groups vec4s of B, `loads` per lane (as
        // rows of B, or as columns: four K values of one column each).
        let loads = 4 * col_groups / subgroup;
        let mut setup = String::new();
        let mut body = String::new();
        let mut store = String::new();
        if self.a_cols {
            let _ = writeln!(setup, "    let a_col = a_base + min(row0 / 4u, p.m4 - 1u);");
        } else {
            for r in 0..rows {
                let _ = writeln!(
                    setup,
                    "    let a_row_{r} = a_base + min(row0 + {r}u, p.m - 1u) * p.k4;"
                );
            }
        }
        for j in 0..loads {
            let v = format!("(lane + {}u)", subgroup * j);
            let _ = if self.b_rows {
                writeln!(
                    setup,
                    "    let b_off_{j} = b_base + min(col4 * 4u + {v}, p.n - 1u) * p.k4;"
                )
            } else {
                writeln!(
                    setup,
                    "    let b_off_{j} = b_base + ({v} / {col_groups}u) * p.n4 + min(col4 + {v} % {col_groups}u, p.n4 - 1u);"
                )
            };
        }
        for r in 0..rows {
            for g in 0..col_groups {
                let _ = writeln!(setup, "    var acc_{r}_{g} = vec4<f32>(0.0);");
            }
        }
        let components = ["x", "y", "z", "w"];
        if self.a_cols {
            // Four K steps of the lane's four rows, then row r across them. Past K they are
            // zero: B's padding is zero there too, but an infinite A value times it is NaN.
            for kk in 0..4 {
                let _ = writeln!(
                    body,
                    "        let at_{kk} = select(vec4<f32>(0.0), load_a(a_col + min(4u * k + {kk}u, p.k - 1u) * p.m4), 4u * k + {kk}u < p.k);"
                );
            }
            for (r, component) in components.iter().enumerate().take(rows as usize) {
                let _ = writeln!(
                    body,
                    "        let a_{r} = vec4<f32>(at_0.{component}, at_1.{component}, at_2.{component}, at_3.{component});"
                );
            }
        } else {
            for r in 0..rows {
                let _ = writeln!(body, "        let a_{r} = load_a(a_row_{r} + k);");
            }
        }
        for j in 0..loads {
            let step = if self.b_rows { "k" } else { "k * b_step" };
            let _ = writeln!(body, "        let bl_{j} = load_b(b_off_{j} + {step});");
        }
        if self.b_rows {
            // Column c's four K values, then row kk of each group of four columns.
            for c in 0..cols {
                let _ = writeln!(
                    body,
                    "        let bc_{c} = subgroupBroadcast(bl_{}, {}u);",
                    c / subgroup,
                    c % subgroup
                );
            }
        }
        for (kk, component) in components.iter().enumerate() {
            for g in 0..col_groups {
                let v = kk as u32 * col_groups + g;
                let _ = if self.b_rows {
                    let row: Vec<String> = (4 * g..4 * g + 4)
                        .map(|c| format!("bc_{c}.{component}"))
                        .collect();
                    writeln!(
                        body,
                        "        let bb_{kk}_{g} = vec4<f32>({});",
                        row.join(", ")
                    )
                } else {
                    writeln!(
                        body,
                        "        let bb_{kk}_{g} = subgroupBroadcast(bl_{}, {}u);",
                        v / subgroup,
                        v % subgroup
                    )
                };
                for r in 0..rows {
                    let _ = writeln!(
                        body,
                        "        acc_{r}_{g} = fma(vec4<f32>(a_{r}.{component}), bb_{kk}_{g}, acc_{r}_{g});"
                    );
                }
            }
        }
        // Without an epilogue the bias is never read: the kernel has no binding for it, and
        // lavapipe no loads of it to compile.
        let bias = |at: String, applies: &str| {
            if self.epilogue {
                format!("bias_at({at}, {applies})")
            } else {
                "0.0".into()
            }
        };
        for r in 0..rows {
            let bias = bias(format!("row0 + {r}u"), "bias_rows");
            let _ = writeln!(store, "    let bias_row_{r} = {bias};");
        }
        for c in 0..cols {
            let bias = bias(format!("col4 * 4u + {c}u"), "BIAS_COLUMNS == 1u");
            let _ = writeln!(store, "    let bias_col_{c} = {bias};");
        }
        // Per stored value, its row's bias plus its column's (one of them zero).
        let columns4 = |g: u32| {
            (4 * g..4 * g + 4)
                .map(|c| format!("bias_col_{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.store {
            StoreC::Rows4 => {
                for g in 0..col_groups {
                    for (i, component) in components.iter().enumerate() {
                        let column: Vec<String> =
                            (0..4).map(|r| format!("acc_{r}_{g}.{component}")).collect();
                        let _ = writeln!(
                            store,
                            "    store4_rows(batch, row0, (col4 + {g}u) * 4u + {i}u, vec4<f32>({}), vec4<f32>(bias_row_0, bias_row_1, bias_row_2, bias_row_3) + bias_col_{});",
                            column.join(", "),
                            4 * g + i as u32
                        );
                    }
                }
            }
            StoreC::Columns4 => {
                for r in 0..rows {
                    for g in 0..col_groups {
                        let _ = writeln!(
                            store,
                            "    store4(batch, row0 + {r}u, col4 + {g}u, acc_{r}_{g}, bias_row_{r} + vec4<f32>({}));",
                            columns4(g)
                        );
                    }
                }
            }
            StoreC::Scalar => {
                for r in 0..rows {
                    for g in 0..col_groups {
                        for (i, component) in components.iter().enumerate() {
                            let _ = writeln!(
                                store,
                                "    store(batch, row0 + {r}u, (col4 + {g}u) * 4u + {i}u, acc_{r}_{g}.{component}, bias_row_{r} + bias_col_{});",
                                4 * g + i as u32
                            );
                        }
                    }
                }
            }
        }
        let parts = include_str!("../../shaders/matmul_operands.wgsl");
        let (a, b) = if self.textures {
            ("texture_a", "texture_b")
        } else {
            ("storage_a", "storage_b")
        };
        let texel = if self.textures {
            wgsl_section(parts, "texel")
        } else {
            ""
        };
        let b = match self.window {
            Some(section) => window_source(section, "subgroup_b"),
            None => wgsl_section(parts, b).to_string(),
        };
        let operands = [texel, wgsl_section(parts, a), &b]
            .concat()
            .replace("{{TEXTURE_WIDTH_LOG2}}", &TEXTURE_WIDTH_LOG2.to_string());
        let output = wgsl_section(
            parts,
            match self.store {
                StoreC::Scalar => "store_scalar",
                StoreC::Columns4 => "store_vec4",
                StoreC::Rows4 => "store_vec4_rows",
            },
        );
        let kernel = include_str!("../../shaders/matmul_subgroup.wgsl")
            .replace("{{OPERANDS}}", &operands)
            .replace("{{OUTPUT}}", output)
            .replace("{{ROWS}}", &rows.to_string())
            .replace("{{COLS}}", &cols.to_string())
            .replace("{{SUBGROUP}}", &subgroup.to_string())
            .replace("{{SUBGROUPS_PER_GROUP}}", &subgroups_per_group.to_string())
            .replace(
                "{{GROUP_SIZE}}",
                &(subgroup * subgroups_per_group).to_string(),
            )
            .replace("{{SETUP}}", &setup)
            .replace("{{BODY}}", &body)
            .replace("{{STORE}}", &store);
        [include_str!("../../shaders/epilogue.wgsl"), &kernel].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;
    use crate::test_support::{gpu, max_abs_diff, random};

    /// A batched product summed over its batch as split-K slices, against the sum of the
    /// CPU's per-image products: each operand transposed or not, shapes that fill no tile,
    /// an image's K not a multiple of 4 (quads element by element) nor of the K tile
    /// (slices that cross images), a K' past one pass's share (two slices at least,
    /// whatever the adapter's target), and an output poisoned with NaN.
    #[test]
    fn summed_products_match_the_cpu() {
        let Some(gpu) = gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        for (batch, m, k, n) in [
            (3, 5, 7, 9),
            (40, 16, 37, 144),
            (8, 70, 64, 68),
            (600, 6, 25, 20),
        ] {
            for (trans_a, trans_b) in [(false, true), (false, false), (true, false), (true, true)] {
                let spec = Matmul {
                    trans_a,
                    trans_b,
                    kernel: KernelChoice::Tiled,
                    ..Matmul::default()
                };
                let a_shape = if trans_a {
                    [batch, k, m]
                } else {
                    [batch, m, k]
                };
                let b_shape = if trans_b {
                    [batch, n, k]
                } else {
                    [batch, k, n]
                };
                let (a, b) = (random(&a_shape, 1), random(&b_shape, 2));
                let products = matmul_cpu(&spec, &a.view(), &b.view(), None).unwrap();
                let want = products.sum_axis(Axis(0)).into_dyn();
                let (ta, tb) = (
                    Tensor::from_array(&gpu, &a).unwrap(),
                    Tensor::from_array(&gpu, &b).unwrap(),
                );
                let out = Tensor::full(&gpu, &[m, n], f32::NAN).unwrap();
                let ran = spec
                    .run_summed(&gpu, ta.operand(), tb.operand(), &out)
                    .unwrap();
                assert!(ran, "the tiled kernel sums over the batch");
                let got = out.to_array().unwrap();
                let tolerance = 1e-5 + 4.0 * f32::EPSILON * (batch * k) as f32;
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= tolerance,
                    "{batch}×{m}×{k}×{n} trans {trans_a}/{trans_b}: off by {diff}"
                );
            }
        }
        let big = MatmulShape {
            batch: 600,
            m: 6,
            k: 25,
            n: 20,
            a_batched: true,
            b_batched: true,
            out: vec![600, 6, 20],
        };
        assert!(SplitK::choose(&gpu, &big).unwrap().slices >= 2);
    }

    /// A product added to what C holds (a pointwise convolution's residual sum), the bias
    /// and ReLU applied after the sum, with each way of storing C on the subgroup kernel:
    /// vec4s along a row, a transposed run's vec4s down four rows, and floats (a small
    /// product's two-row tile); and on the small kernel, with blocks that C's edges cut.
    #[test]
    fn products_added_to_c_match_the_cpu() {
        let Some(gpu) = gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let epilogue = Matmul {
            bias: BiasAxis::PerRow,
            activation: Activation::Relu,
            ..Matmul::default()
        };
        let mut cases = vec![
            ((5, 7, 9), KernelChoice::Small, None, epilogue),
            ((8, 12, 100), KernelChoice::Small, None, epilogue),
        ];
        if let Some(subgroup) = gpu.fixed_subgroup_size() {
            let rows = (4 * subgroup) as usize;
            let subgroup = KernelChoice::Subgroup;
            cases.extend([
                ((rows + 8, 12, 2048), subgroup, Some(false), epilogue),
                ((8, 12, 8192), subgroup, Some(true), epilogue),
                ((8, 12, 100), subgroup, Some(true), epilogue),
                // A small product with no epilogue: its kernel has none to add C in either.
                ((8, 12, 100), subgroup, Some(true), Matmul::default()),
                ((rows + 4, 12, 36), subgroup, Some(false), Matmul::default()),
            ]);
        }
        for ((m, k, n), kernel, transposed, spec) in cases {
            let spec = Matmul { kernel, ..spec };
            let (a, b) = (random(&[m, k], 1), random(&[k, n], 2));
            let (c, bias) = (random(&[m, n], 3), random(&[m], 4));
            let product = matmul_cpu(&Matmul::default(), &a.view(), &b.view(), None).unwrap();
            let mut want = product.into_shape_with_order(IxDyn(&[m, n])).unwrap() + &c;
            for ((row, _), v) in want
                .view_mut()
                .into_dimensionality::<ndarray::Ix2>()
                .unwrap()
                .indexed_iter_mut()
            {
                if spec.bias == BiasAxis::PerRow {
                    *v = (*v + bias[row]).max(0.0);
                }
            }
            let tensor = |x: &ArrayD<f32>| Tensor::from_array(&gpu, x).unwrap();
            let (ta, tb, tbias, out) = (tensor(&a), tensor(&b), tensor(&bias), tensor(&c));
            let tbias = (spec.bias == BiasAxis::PerRow).then(|| tbias.operand());
            let plan = spec
                .run_adding(&gpu, ta.operand(), tb.operand(), tbias, out.operand())
                .unwrap();
            match transposed {
                Some(transposed) => assert!(
                    matches!(plan, MatmulPlan::Subgroup { transposed: t, .. } if t == transposed),
                    "{plan}"
                ),
                None => assert_eq!(plan, MatmulPlan::Small),
            }
            let got = out.to_array().unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= 1e-5, "{plan} {m}×{k}×{n}: off by {diff}");
        }
    }
}
