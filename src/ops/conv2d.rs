//! 2-D convolution (cross-correlation, as in every CNN library), forward and backward.
//!
//! `y[n,o,i,j] = b[o] + Σ_{c,p,q} w[o,c,p,q] · xpad[n, g·C/G + c, i·sh + p·dh, j·sw + q·dw]`
//! where filter `o` belongs to group `g = o / (O/G)` and sees only its group's `C/G` channels
//! (`G = 1`: every channel; `G = C`: depthwise).
//!
//! GPU: im2col (`shaders/im2col.wgsl`) then the matmul `W[O][C·KH·KW] · col[n]`, with the
//! bias and activation fused into its epilogue. Backward: `dcol = Wᵀ · dy` then col2im (a
//! gather, one invocation per input pixel), `dW = Σ_n dy[n] · col[n]ᵀ`, `db = Σ dy`.
//! Batches are processed in chunks whose col buffer fits the device's binding limit. Images
//! whose positions are not a multiple of 4 (7×7) lie side by side instead, one product over
//! every image's columns forward, for dW and for dcol (`images_side_by_side`).
//! Grouped convolutions with short sums per group (depthwise) run direct kernels
//! (`conv_grouped`); with long ones, the same im2col with one product per image and group:
//! the weights repeated per image make `A` batched like `col`, `[images·G, O/G, C/G·KH·KW]`.
//! CPU: the direct nested sums of the formula.

use bytemuck::{Pod, Zeroable};
use ndarray::{Array1, Array4, ArrayD, ArrayView4, ArrayViewD, Ix4};

use super::Activation;
use super::PoolKind;
use super::activation::through_activation_cpu;
use super::conv_direct;
use super::conv_grouped;
use super::conv_implicit;
use super::conv_plan::{BackwardKernels, ConvKernel, GradientsNeeded};
use super::conv_weight_grad::{self, Gate, WeightAndBias};
use super::conv_winograd;
use super::matmul::{BiasAxis, KernelChoice, Matmul};
use super::pool2d::{Pool2d, Pooled};
use super::reduce::{activation_backward_and_sum, sum_axes};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, workgroups};
use crate::tensor::{Tensor, gpu_word};
use crate::value::Value;
use crate::value::add::add_activated;

const OP: &str = "conv2d";

/// Largest col buffer one chunk may use, below the device's own binding limit.
const CHUNK_BYTES: u64 = 64 << 20;

/// Zero padding of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// `(rows, columns)` of zeros on each side.
    Explicit(usize, usize),
    /// Output as large as the input (stride 1 only); an odd total puts the extra row and
    /// column at the bottom and right, as PyTorch does.
    Same,
    /// Each side on its own, as `F.pad(x, (left, right, top, bottom))` before a convolution
    /// gives, or TensorFlow's "SAME" with a stride.
    Asymmetric {
        /// Rows of zeros above.
        top: usize,
        /// Rows of zeros below.
        bottom: usize,
        /// Columns of zeros on the left.
        left: usize,
        /// Columns of zeros on the right.
        right: usize,
    },
}

/// Padding so large that the padded size overflows: an error instead of a wrap.
fn too_large(padding: usize) -> Error {
    invalid(format!("padding {padding} is too large for any input"))
}

/// A convolution's hyper-parameters. The default is stride 1, no padding, no dilation, one
/// group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2d {
    /// `(sh, sw)`, each at least 1.
    pub stride: (usize, usize),
    /// Zero padding.
    pub padding: Padding,
    /// `(dh, dw)`, each at least 1.
    pub dilation: (usize, usize),
    /// Applied after the bias, fused into the matmul (forward only; backward expects none).
    pub activation: Activation,
    /// Channel groups `G`, dividing both channel counts: filter `o` sees only the `C/G` input
    /// channels of its group, and the weight is `[O, C/G, KH, KW]` (PyTorch's `groups`).
    /// `G = C` is a depthwise convolution (`O = m·C` for a channel multiplier `m`).
    pub groups: usize,
    /// Forces a kernel family on each pass that can run it (tests, benchmarks); `None`, the
    /// default, lets [`Conv2d::plan`] choose (measured per shape, or the fixed order under
    /// `Tuning::Fixed`: [`crate::gpu::Tuning`]). Passes it cannot run choose as usual.
    pub kernel: Option<ConvKernel>,
}

impl Default for Conv2d {
    fn default() -> Self {
        Self {
            stride: (1, 1),
            padding: Padding::Explicit(0, 0),
            dilation: (1, 1),
            activation: Activation::None,
            groups: 1,
            kernel: None,
        }
    }
}

/// The checked sizes of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dShape {
    /// Batch size.
    pub n: usize,
    /// Input channels (all groups).
    pub c: usize,
    /// Channel groups (1 for an ordinary convolution).
    pub groups: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels (filters, all groups).
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Zero rows above the input.
    pub pad_top: usize,
    /// Zero columns left of the input.
    pub pad_left: usize,
}

impl Conv2dShape {
    /// The output shape `[N, O, OH, OW]`.
    pub fn output(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }

    /// Taps per filter, `C/G·KH·KW`: the matmul's K.
    pub fn taps(&self) -> usize {
        self.c / self.groups * self.kh * self.kw
    }

    /// Rows of an image's im2col buffer, `C·KH·KW` (every group's taps).
    fn col_rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// A 1×1 convolution at stride 1 without padding: its im2col buffer would be the input
    /// itself, so the matmul reads `x` (and writes `y`, `dx`) directly.
    pub(crate) fn pointwise(&self, spec: &Conv2d) -> bool {
        self.groups == 1
            && (self.kh, self.kw) == (1, 1)
            && spec.stride == (1, 1)
            && (self.oh, self.ow) == (self.h, self.w)
    }

    /// col2im's entry: `col2im` walks every tap (`KH·(KW + 1)` iterations, unrolled for
    /// small kernels), `col2im_windows` the output windows that hold a pixel (the rows, and in
    /// each the columns, `shaders/im2col.wgsl`'s `window_range` finds), for kernels whose taps
    /// would pass the loop bound; an error if that passes it too.
    fn col2im_entry(&self, spec: &Conv2d) -> Result<&'static str> {
        if self.kh * (self.kw + 1) <= MAX_LOOP_ITERATIONS {
            return Ok("col2im");
        }
        let hits = |out: usize, taps: usize, stride: usize, dilation: usize| {
            out.min((taps - 1) * dilation / stride + 1)
        };
        let rows = hits(self.oh, self.kh, spec.stride.0, spec.dilation.0);
        let cols = hits(self.ow, self.kw, spec.stride.1, spec.dilation.1);
        if rows * (cols + 1) > MAX_LOOP_ITERATIONS {
            return Err(invalid(format!(
                "the input gradient of a {}×{} kernel over {}×{} outputs gathers more than \
                 {MAX_LOOP_ITERATIONS} windows per input pixel, past the GPU kernels' loop \
                 bound: use a kernel spanning fewer pixels (size × dilation) or a larger stride",
                self.kh, self.kw, self.oh, self.ow
            )));
        }
        Ok("col2im_windows")
    }

    /// Output positions per image, `OH·OW`.
    pub fn positions(&self) -> usize {
        self.oh * self.ow
    }

    /// Floating-point operations of the forward pass.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.o * self.positions() * self.taps()) as f64
    }
}

fn invalid(detail: String) -> Error {
    Error::InvalidArgument { op: OP, detail }
}

/// Fails unless `value` fits the signed 32-bit positions the GPU kernels compute.
fn gpu_index(value: usize) -> Result<()> {
    if i32::try_from(value).is_err() {
        return Err(invalid(format!(
            "{value} is over the GPU kernels' 31-bit index range; use a smaller stride, padding or dilation"
        )));
    }
    Ok(())
}

/// Output size along one axis, or an error if the dilated kernel does not fit.
fn output_size(
    axis: &str,
    size: usize,
    pads: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
) -> Result<usize> {
    let overflow = || {
        invalid(format!(
            "the {axis} sizes overflow: kernel {kernel}, dilation {dilation}, padding {pads}"
        ))
    };
    let span = dilation
        .checked_mul(kernel - 1)
        .and_then(|s| s.checked_add(1))
        .ok_or_else(overflow)?;
    let padded = size.checked_add(pads).ok_or_else(overflow)?;
    if span > padded {
        return Err(invalid(format!(
            "the kernel spans {span} {axis} (size {kernel}, dilation {dilation}) but the padded input has only {padded}; pad more or use a smaller kernel"
        )));
    }
    Ok((padded - span) / stride + 1)
}

impl Conv2d {
    /// Checks `x [N,C,H,W]`, `weight [O,C/G,KH,KW]` and `bias [O]` and returns the sizes.
    pub fn shape(
        &self,
        x: &[usize],
        weight: &[usize],
        bias: Option<&[usize]>,
    ) -> Result<Conv2dShape> {
        let (sh, sw) = self.stride;
        let (dh, dw) = self.dilation;
        if sh == 0 || sw == 0 {
            return Err(invalid(format!(
                "stride {:?} must be at least 1 on both axes",
                self.stride
            )));
        }
        if dh == 0 || dw == 0 {
            return Err(invalid(format!(
                "dilation {:?} must be at least 1 on both axes",
                self.dilation
            )));
        }
        let (&[n, c, h, w], &[o, c_w, kh, kw]) = (x, weight) else {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![x.to_vec(), weight.to_vec()],
                detail: format!(
                    "input must be [N, C, H, W] and weight [O, C/groups, KH, KW]; got {x:?} and {weight:?}"
                ),
            });
        };
        let groups = self.groups;
        for shape in [x, weight] {
            if let Some(axis) = shape.iter().position(|&d| d == 0) {
                return Err(Error::EmptyDimension {
                    op: OP,
                    shape: shape.to_vec(),
                    axis,
                });
            }
        }
        if groups == 0 || !c.is_multiple_of(groups) || !o.is_multiple_of(groups) {
            return Err(invalid(format!(
                "groups {groups} must be at least 1 and divide both the {c} input channels and the {o} filters"
            )));
        }
        if c / groups != c_w {
            let per_group = if groups == 1 {
                String::new()
            } else {
                format!(" per group ({c} channels / {groups} groups)")
            };
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![x.to_vec(), weight.to_vec()],
                detail: format!(
                    "input has {} channels{per_group} but the weight expects {c_w} (input {x:?}, weight {weight:?})",
                    c / groups
                ),
            });
        }
        if let Some(bias) = bias
            && bias != [o]
        {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![bias.to_vec(), vec![o]],
                detail: format!("bias must be [{o}] (one per filter), got {bias:?}"),
            });
        }
        let (pad_top, pad_rows, pad_left, pad_cols) = match self.padding {
            Padding::Explicit(ph, pw) => (
                ph,
                ph.checked_mul(2).ok_or_else(|| too_large(ph))?,
                pw,
                pw.checked_mul(2).ok_or_else(|| too_large(pw))?,
            ),
            Padding::Asymmetric {
                top,
                bottom,
                left,
                right,
            } => (
                top,
                top.checked_add(bottom).ok_or_else(|| too_large(bottom))?,
                left,
                left.checked_add(right).ok_or_else(|| too_large(right))?,
            ),
            Padding::Same => {
                if self.stride != (1, 1) {
                    return Err(invalid("padding Same needs stride (1, 1)".into()));
                }
                let rows = dh * (kh - 1);
                let cols = dw * (kw - 1);
                (rows / 2, rows, cols / 2, cols)
            }
        };
        // The GPU kernels compute positions in signed 32-bit words, all below the padded
        // sizes: larger values are refused on both paths alike (they used to be truncated by
        // `as u32`, or wrapped negative).
        let padded = (h.checked_add(pad_rows), w.checked_add(pad_cols));
        for value in [sh, sw, dh, dw, groups] {
            gpu_index(value)?;
        }
        for value in [padded.0, padded.1] {
            gpu_index(value.ok_or_else(|| too_large(pad_rows.max(pad_cols)))?)?;
        }
        let oh = output_size("rows", h, pad_rows, kh, sh, dh)?;
        let ow = output_size("columns", w, pad_cols, kw, sw, dw)?;
        Ok(Conv2dShape {
            n,
            c,
            groups,
            h,
            w,
            o,
            kh,
            kw,
            oh,
            ow,
            pad_top,
            pad_left,
        })
    }

    /// `act(conv(x, weight) + bias)` on the GPU.
    pub fn forward(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_reusing(x, (weight, bias), None, None)?.0)
    }

    /// [`Conv2d::forward`] for weights that stay fixed over many passes (an evaluation
    /// model's folded state), `act(conv(x, weight) + bias + residual)`: `filters` are what
    /// an earlier pass transformed (Winograd's `U`), used where this pass plans the same
    /// transform; Winograd adds the residual in its epilogue, a pointwise matmul to a copy of
    /// the residual, other kernels in a pass after.
    /// Returns the output and the filters this pass transformed, if it did: keep them for
    /// the next pass.
    pub fn forward_reusing(
        &self,
        x: &Tensor,
        (weight, bias): (&Tensor, Option<&Tensor>),
        filters: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (out, made, _) = self.forward_keeping(x, (weight, bias), (filters, residual), None)?;
        Ok((out, made))
    }

    /// The forward pass of a training step: the output, and what the backward pass may
    /// take from it ([`Conv2d::backward_saved`]): Winograd's transformed input tiles, kept
    /// where this shape's weight gradient plans the same transform and the batch ran as one
    /// chunk; the weight gradient then skips its own input transform (on lavapipe, N8
    /// 64→64 56² with F(4×4): forward + backward 47 → 43 ms), for holding them, 2.25×
    /// (F(4×4)) or 4× (F(2×2)) the input, until then. Its kernel is tuned with that saving
    /// counted, so it may differ from [`Conv2d::forward`]'s.
    pub fn forward_saving(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_saving_for(x, (weight, bias), true)
    }

    /// [`Conv2d::forward_saving`] for a backward pass that computes the input gradient or
    /// not (`input_grad`: not for a network's first layer), whose plan it follows.
    pub(crate) fn forward_saving_for(
        &self,
        x: &Tensor,
        (weight, bias): (&Tensor, Option<&Tensor>),
        input_grad: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let shape = self.shape(x.shape(), weight.shape(), bias.map(Tensor::shape))?;
        let needs = GradientsNeeded {
            input: input_grad,
            bias: bias.is_some(),
        };
        let plan = self.training_forward_kernel(x.gpu(), &shape, needs)?;
        let (out, _, saved) = self.forward_keeping(x, (weight, bias), (None, None), Some(plan))?;
        Ok((out, saved))
    }

    /// The forward pass followed by a 2×2 max pooling at stride 2, in one kernel, where the
    /// direct kernel runs the layer sharing weights through subgroups (CPU adapters reading
    /// storage, blocks of whole vec4s dividing the rows, an even output) and `pool` is such
    /// a pooling: its output and, with `argmax`, the windows' arg-max, as
    /// [`Pool2d::forward`] gives them, without storing the convolution's output (LeNet's
    /// first layer: 221,184 floats a step, and a pass of the pooling's own). `training` is
    /// `Some(input_grad)` in a training step, whose forward kernel it follows
    /// ([`Conv2d::forward_saving`]). `None` where the fused kernel does not take the layer
    /// or the pooling: run the two ops.
    pub fn forward_pooled(
        &self,
        x: &Tensor,
        (weight, bias): (&Tensor, Option<&Tensor>),
        pool: &Pool2d,
        (training, argmax): (Option<bool>, bool),
    ) -> Result<Option<Pooled<Tensor>>> {
        let gpu = x.gpu().clone();
        for t in [Some(weight), bias].into_iter().flatten() {
            t.check_same_gpu(OP, &gpu)?;
        }
        let shape = self.shape(x.shape(), weight.shape(), bias.map(Tensor::shape))?;
        let halves = pool.kind == PoolKind::Max
            && pool.kernel == (2, 2)
            && pool.stride == (2, 2)
            && pool.padding == (0, 0)
            && pool.dilation == (1, 1);
        if !halves || !conv_direct::pools(&gpu, self, &shape) {
            return Ok(None);
        }
        let kernel = match training {
            Some(input) => {
                let needs = GradientsNeeded {
                    input,
                    bias: bias.is_some(),
                };
                match self.training_forward_kernel(&gpu, &shape, needs)? {
                    (kernel, false) => kernel,
                    (_, true) => return Ok(None),
                }
            }
            None => self.forward_kernel(&gpu, &shape)?,
        };
        if kernel != ConvKernel::Direct {
            return Ok(None);
        }
        let [n, o, oh, ow] = shape.output();
        let pooled_shape = [n, o, oh / 2, ow / 2];
        let y = Tensor::uninit(&gpu, &pooled_shape)?;
        let kept = argmax
            .then(|| Tensor::uninit(&gpu, &pooled_shape))
            .transpose()?;
        conv_direct::forward_pooled(self, &shape, (x, weight, bias), &y, kept.as_ref())?;
        Ok(Some(Pooled { y, argmax: kept }))
    }

    /// [`Conv2d::forward_reusing`] through `plan` (the kernel, and whether it keeps
    /// Winograd's input tiles: see [`Conv2d::forward_saving`]), or the forward pass's own
    /// kernel keeping none: the output, the filters made, the tiles kept.
    fn forward_keeping(
        &self,
        x: &Tensor,
        (weight, bias): (&Tensor, Option<&Tensor>),
        (filters, residual): (Option<&Tensor>, Option<&Tensor>),
        plan: Option<(ConvKernel, bool)>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let gpu = x.gpu().clone();
        for t in [Some(weight), bias, filters, residual]
            .into_iter()
            .flatten()
        {
            t.check_same_gpu(OP, &gpu)?;
        }
        let shape = self.shape(x.shape(), weight.shape(), bias.map(Tensor::shape))?;
        if let Some(r) = residual.filter(|r| r.shape() != shape.output()) {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![r.shape().to_vec(), shape.output().to_vec()],
                detail: format!(
                    "the residual added to the output is {:?}, the output {:?}",
                    r.shape(),
                    shape.output()
                ),
            });
        }
        let (kernel, keep) = match plan {
            Some(plan) => plan,
            None => (self.forward_kernel(&gpu, &shape)?, false),
        };
        if let (ConvKernel::Pointwise, Some(residual)) = (kernel, residual) {
            // The matmul adds its product to the residual it finds in the output.
            let out = residual.copy_as(residual.shape())?;
            self.pointwise(&shape, (x, weight, bias), &out, true)?;
            return Ok((out, None, None));
        }
        let out = Tensor::uninit(&gpu, &shape.output())?;
        let Some(tile) = kernel.winograd_tile() else {
            let Some(residual) = residual else {
                self.forward_with(kernel, &shape, (x, weight, bias), &out)?;
                return Ok((out, None, None));
            };
            let linear = Conv2d {
                activation: Activation::None,
                ..*self
            };
            linear.forward_with(kernel, &shape, (x, weight, bias), &out)?;
            return Ok((add_activated(&out, residual, self.activation)?, None, None));
        };
        let run = |filters: &Tensor| {
            let operands = (x, filters, bias, residual);
            conv_winograd::forward_transformed(self, &shape, operands, &out, (tile, keep))
        };
        match filters.filter(|f| conv_winograd::fits_filters(&shape, tile, f)) {
            Some(filters) => {
                let kept = run(filters)?;
                Ok((out, None, kept))
            }
            None => {
                let made = conv_winograd::forward_filters(self, &shape, weight, tile)?;
                let kept = run(&made)?;
                Ok((out, Some(made), kept))
            }
        }
    }

    /// A 1×1 convolution at stride 1 as one matmul per image, `W · x[n]`, written in place;
    /// with `accumulate` added to what `out` holds.
    fn pointwise(
        &self,
        shape: &Conv2dShape,
        (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
        out: &Tensor,
        accumulate: bool,
    ) -> Result<()> {
        let matmul = Matmul {
            bias: if bias.is_some() {
                BiasAxis::PerRow
            } else {
                BiasAxis::None
            },
            activation: self.activation,
            ..Matmul::default()
        };
        let (n, c, o, hw) = (shape.n, shape.c, shape.o, shape.positions());
        let (a_shape, b_shape, out_shape) = ([o, c], [n, c, hw], [n, o, hw]);
        let run = if accumulate {
            Matmul::run_adding
        } else {
            Matmul::run
        };
        run(
            &matmul,
            x.gpu(),
            weight.operand_as(&a_shape),
            x.operand_as(&b_shape),
            bias.map(Tensor::operand),
            out.operand_as(&out_shape),
        )?;
        Ok(())
    }

    /// The forward pass of checked `shape` through `kernel` into `out`.
    pub(crate) fn forward_with(
        &self,
        kernel: ConvKernel,
        shape: &Conv2dShape,
        (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
        out: &Tensor,
    ) -> Result<()> {
        let (gpu, shape) = (x.gpu().clone(), *shape);
        if kernel == ConvKernel::GroupedDirect {
            return conv_grouped::forward(self, &shape, x, weight, bias, out);
        }
        if kernel == ConvKernel::Direct {
            return conv_direct::forward(self, &shape, x, weight, bias, out);
        }
        if let Some(tile) = kernel.winograd_tile() {
            return conv_winograd::forward(self, &shape, (x, weight, bias), out, tile);
        }
        if kernel == ConvKernel::ImplicitGemm {
            return conv_implicit::forward(
                self,
                &shape,
                (x, weight, bias),
                out,
                KernelChoice::Auto,
            );
        }
        if kernel == ConvKernel::Pointwise {
            return self.pointwise(&shape, (x, weight, bias), out, false);
        }
        // Groups: bias and activation after the product (their bias differs per group).
        let fused = shape.groups == 1;
        let matmul = Matmul {
            bias: if bias.is_some() && fused {
                BiasAxis::PerRow
            } else {
                BiasAxis::None
            },
            activation: if fused {
                self.activation
            } else {
                Activation::None
            },
            ..Matmul::default()
        };
        let (g, positions) = (shape.groups, shape.positions());
        for (first, count) in chunks(&gpu, &shape, false)? {
            let side_by_side = images_side_by_side(&shape, count);
            let col = self.im2col(&gpu, &shape, x, (first, count), side_by_side)?;
            let y = Tensor::uninit(&gpu, &[count, shape.o, positions])?;
            let weights = GroupWeights::new(&gpu, &shape, weight, count)?;
            let (b_shape, y_shape) = if side_by_side {
                (
                    [1, shape.taps(), count * positions],
                    [1, shape.o, count * positions],
                )
            } else {
                (
                    [count * g, shape.taps(), positions],
                    [count * g, shape.o / g, positions],
                )
            };
            matmul.run(
                &gpu,
                weights.operand(),
                col.operand_as(&b_shape),
                bias.filter(|_| fused).map(Tensor::operand),
                y.operand_as(&y_shape),
            )?;
            if side_by_side {
                let entry = "columns_to_images";
                self.run_im2col_kernel(&gpu, &shape, entry, (&y, out), (first, count))?;
                continue;
            }
            let image = (shape.o * shape.positions()) as u64 * 4;
            gpu.copy(
                (y.buffer(), 0),
                (out.buffer(), first as u64 * image),
                count as u64 * image,
            )?;
        }
        if !fused && (bias.is_some() || self.activation != Activation::None) {
            conv_grouped::bias_activation(self, &shape, bias, out)?;
        }
        Ok(())
    }

    /// Gradients of `L` given `dy = ∂L/∂y` (no activation): `(dx, dweight, dbias)`.
    pub fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        dy: &Tensor,
    ) -> Result<Conv2dGrads<Tensor>> {
        self.backward_saved(x, weight, dy, None)
    }

    /// [`Conv2d::backward`] with what [`Conv2d::forward_saving`] kept (`saved`): the weight
    /// gradient takes Winograd's input tiles from it where it plans the same tile, and
    /// transforms `x` itself otherwise. A `saved` tensor that is no such tiles of this
    /// shape is an error.
    pub fn backward_saved(
        &self,
        x: &Tensor,
        weight: &Tensor,
        dy: &Tensor,
        saved: Option<&Tensor>,
    ) -> Result<Conv2dGrads<Tensor>> {
        let needs = GradientsNeeded {
            input: true,
            bias: true,
        };
        let (dx, weight, bias) = self.gradients(x, weight, dy, (None, saved), needs)?;
        let x = dx.ok_or_else(|| invalid("the input gradient was not computed".into()))?;
        let bias = bias.ok_or_else(|| invalid("the bias gradient was not computed".into()))?;
        Ok(Conv2dGrads { x, weight, bias })
    }

    /// `(dweight, dbias)` only, for a layer whose input needs no gradient (the first layer
    /// of a network): skips `Wᵀ·dy` and col2im, most of the backward pass's traffic.
    pub fn backward_weights(
        &self,
        x: &Tensor,
        weight: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let needs = GradientsNeeded {
            input: false,
            bias: true,
        };
        let (_, weight, bias) = self.gradients(x, weight, dy, (None, None), needs)?;
        let bias = bias.ok_or_else(|| invalid("the bias gradient was not computed".into()))?;
        Ok((weight, bias))
    }

    /// [`Conv2d::gradients`] of a layer (no activation of its own) whose output a 2×2 max
    /// pooling at stride 2 alone read, from that pooling's gradient `dy`, output `y` and
    /// `argmax`, taken back through `activation` (the one the pooling took): where the direct
    /// weight gradient runs this shape it reads them in place of the layer's `dz` (storing
    /// `dz` for the input gradient only), and the pooling needs no backward pass of its own.
    /// `None` elsewhere: run the pooling's backward, then [`Conv2d::gradients`].
    pub(crate) fn gradients_pooled(
        &self,
        (x, weight): (&Tensor, &Tensor),
        (dy, y, argmax): (&Tensor, &Tensor, &Tensor),
        activation: Activation,
        needs: GradientsNeeded,
    ) -> Result<Option<Gradients>> {
        let gpu = x.gpu().clone();
        let shape = self.shape(x.shape(), weight.shape(), None)?;
        for t in [weight, dy, y, argmax] {
            t.check_same_gpu(OP, &gpu)?;
        }
        let pooled = [shape.n, shape.o, shape.oh / 2, shape.ow / 2];
        if [dy, y, argmax].iter().any(|t| t.shape() != pooled) {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![
                    dy.shape().to_vec(),
                    y.shape().to_vec(),
                    argmax.shape().to_vec(),
                ],
                detail: format!(
                    "the pooling's dy, output and arg-max must be {pooled:?}, half the \
                     layer's output {:?}",
                    shape.output()
                ),
            });
        }
        if self.activation != Activation::None
            || !conv_weight_grad::pooled_fits(&shape)
            || !conv_weight_grad::eligible(self, &shape)
        {
            return Ok(None);
        }
        // Planned as the layer's backward after the pooling's would be (the same tuning key).
        let plan = self.backward_kernels(&gpu, &shape, needs, None)?;
        if plan.weight_grad != ConvKernel::Direct {
            return Ok(None);
        }
        let gate = Some((activation, y, Some(argmax)));
        self.direct_gradients((&shape, plan), (x, weight, dy), gate, needs)
            .map(Some)
    }

    /// The backward pass through the direct weight gradient: dW and db from `dy`, through
    /// `gate` = (activation, y, and the arg-max of the max pooling whose gradient and output
    /// `dy` and `y` are, if so) where given, storing `dz` where the input gradient is wanted;
    /// then `dx` from `dz` (or `dy`).
    fn direct_gradients(
        &self,
        (shape, plan): (&Conv2dShape, BackwardKernels),
        (x, weight, dy): (&Tensor, &Tensor, &Tensor),
        gate: Option<(Activation, &Tensor, Option<&Tensor>)>,
        needs: GradientsNeeded,
    ) -> Result<Gradients> {
        let gpu = x.gpu();
        let (dweight, dbias) = (
            Tensor::uninit(gpu, weight.shape())?,
            Tensor::uninit(gpu, &[shape.o])?,
        );
        let dz = match gate {
            Some(_) if needs.input => Some(Tensor::uninit(gpu, &shape.output())?),
            _ => None,
        };
        let gate = gate.map(|(activation, y, argmax)| Gate {
            activation,
            y,
            dz: dz.as_ref(),
            argmax,
        });
        let out = WeightAndBias {
            weight: &dweight,
            bias: &dbias,
        };
        conv_weight_grad::weight_and_bias_grad(shape, x, dy, gate, out)?;
        let dx = match needs.input {
            true => {
                let dz = dz.as_ref().unwrap_or(dy);
                self.input_and_weight_gradients(x, weight, dz, (shape, plan), true, false)?
                    .0
            }
            false => None,
        };
        Ok((dx, dweight, needs.bias.then_some(dbias)))
    }

    /// `(dx if input_grad, dweight, dbias if bias_grad)` from `dy`, through `gate` =
    /// (activation, the layer's output y) for a layer with an activation fused in (see
    /// `nn::Conv2d`). Where the direct weight-gradient kernel takes the shape, it applies the
    /// activation's derivative as it reads `dy` and sums the bias gradient as well: one pass,
    /// and `dz` is stored only when the input gradient needs it. Elsewhere a layer without a
    /// bias (a ResNet's, batch norm following) skips the sum over `dy`. `saved`: what
    /// [`Conv2d::forward_saving`] kept.
    pub(crate) fn gradients(
        &self,
        x: &Tensor,
        weight: &Tensor,
        dy: &Tensor,
        (gate, saved): (Option<(Activation, &Tensor)>, Option<&Tensor>),
        needs: GradientsNeeded,
    ) -> Result<Gradients> {
        let gpu = x.gpu().clone();
        for t in [Some(weight), Some(dy), saved].into_iter().flatten() {
            t.check_same_gpu(OP, &gpu)?;
        }
        let shape = self.shape(x.shape(), weight.shape(), None)?;
        self.check_backward(&shape, dy.shape())?;
        if let Some(saved) = saved.filter(|v| conv_winograd::saved_tiles(&shape, v).is_none()) {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![saved.shape().to_vec(), x.shape().to_vec()],
                detail: format!(
                    "the saved tensor {:?} is not the Winograd input tiles of x {:?}: pass what \
                     forward_saving returned for this x, or None",
                    saved.shape(),
                    x.shape()
                ),
            });
        }
        let gate = gate.filter(|(activation, _)| *activation != Activation::None);
        if let Some((_, y)) = gate {
            y.check_same_gpu(OP, &gpu)?;
            if y.shape() != dy.shape() {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    shapes: vec![y.shape().to_vec(), dy.shape().to_vec()],
                    detail: format!("y is {:?}, dy is {:?}", y.shape(), dy.shape()),
                });
            }
        }
        let activation = gate.map(|(activation, _)| activation);
        let kernels = self.backward_kernels(&gpu, &shape, needs, activation)?;
        self.gradients_with(kernels, (&shape, x, weight, dy), (gate, saved), needs)
    }

    /// The backward pass of checked shapes through `kernels`; `saved` as
    /// [`conv_winograd::saved_tiles`] accepts it.
    pub(crate) fn gradients_with(
        &self,
        kernels: BackwardKernels,
        (shape, x, weight, dy): (&Conv2dShape, &Tensor, &Tensor, &Tensor),
        (gate, saved): (Option<(Activation, &Tensor)>, Option<&Tensor>),
        needs: GradientsNeeded,
    ) -> Result<Gradients> {
        let input_grad = needs.input;
        let (gpu, shape) = (x.gpu().clone(), *shape);
        let dims = (shape.n, shape.o, shape.positions());
        let plan = kernels;
        if plan.weight_grad == ConvKernel::Direct {
            let gate = gate.map(|(activation, y)| (activation, y, None));
            return self.direct_gradients((&shape, plan), (x, weight, dy), gate, needs);
        }
        // Elsewhere the activation's backward pass comes first, fused with the bias sum.
        let (dz, dbias) = match gate {
            Some((activation, y)) => {
                let (dz, dbias) = activation_backward_and_sum(activation, y, dy, dims)?;
                (Some(dz), needs.bias.then_some(dbias))
            }
            // Winograd's weight gradient sums it from its transformed dy (below).
            None if needs.bias && plan.weight_grad.winograd_tile().is_some() => {
                (None, Some(Tensor::uninit(&gpu, &[shape.o])?))
            }
            None if needs.bias => {
                let dbias = Tensor::uninit(&gpu, &[shape.o])?;
                sum_axes(&gpu, dy, dims, &dbias, 1.0, false)?;
                (None, Some(dbias))
            }
            None => (None, None),
        };
        let dz = dz.as_ref().unwrap_or(dy);
        if matches!(
            plan.weight_grad,
            ConvKernel::Winograd | ConvKernel::Winograd4 | ConvKernel::ImplicitGemm
        ) {
            let dweight = Tensor::uninit(&gpu, weight.shape())?;
            if let Some(tile) = plan.weight_grad.winograd_tile() {
                let bias_sum = dbias.as_ref().filter(|_| gate.is_none());
                let grads = (&dweight, bias_sum);
                conv_winograd::weight_grad(self, &shape, (x, dz), grads, (tile, saved))?;
            } else {
                conv_implicit::weight_grad(self, &shape, (x, dz), &dweight, KernelChoice::Auto)?;
            }
            let (dx, _) =
                self.input_and_weight_gradients(x, weight, dz, (&shape, plan), input_grad, false)?;
            return Ok((dx, dweight, dbias));
        }
        let (dx, dweight) =
            self.input_and_weight_gradients(x, weight, dz, (&shape, plan), input_grad, true)?;
        let dweight =
            dweight.ok_or_else(|| invalid("the weight gradient was not computed".into()))?;
        Ok((dx, dweight, dbias))
    }

    /// `dx` if `input_grad` and `dweight` if `weight_grad`, from the pre-activation `dy`.
    fn input_and_weight_gradients(
        &self,
        x: &Tensor,
        weight: &Tensor,
        dy: &Tensor,
        (shape, plan): (&Conv2dShape, BackwardKernels),
        input_grad: bool,
        weight_grad: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gpu = x.gpu().clone();
        let shape = *shape;
        let (o, taps, positions) = (shape.o, shape.taps(), shape.positions());
        let dx = if input_grad {
            Some(Tensor::uninit(&gpu, x.shape())?)
        } else {
            None
        };
        let grouped_dx = plan.input_grad == ConvKernel::GroupedDirect;
        if grouped_dx && let Some(dx) = &dx {
            conv_grouped::backward_data(self, &shape, dy, weight, dx)?;
        }
        if grouped_dx && plan.weight_grad == ConvKernel::GroupedDirect {
            let dweight = weight_grad
                .then(|| Tensor::uninit(&gpu, weight.shape()))
                .transpose()?;
            if let Some(dweight) = &dweight {
                conv_grouped::weight_grad(self, &shape, x, dy, dweight)?;
            }
            return Ok((dx, dweight));
        }
        // Small filter banks at stride 1 (direct), 3×3 at stride 1 (Winograd) and any
        // one-group layer (implicit GEMM): dx without a dcol buffer or col2im.
        let convolved_dx = grouped_dx
            || match (&dx, plan.input_grad, plan.input_grad.winograd_tile()) {
                (Some(dx), ConvKernel::Direct, _) => {
                    conv_direct::backward_data(&shape, dy, weight, dx)?;
                    true
                }
                (Some(dx), _, Some(tile)) => {
                    conv_winograd::backward_data(self, &shape, (dy, weight), dx, tile)?;
                    true
                }
                (Some(dx), ConvKernel::ImplicitGemm, _) => {
                    conv_implicit::backward_data(self, &shape, dy, weight, dx, KernelChoice::Auto)?;
                    true
                }
                _ => false,
            };
        let dweight = weight_grad
            .then(|| Tensor::uninit(&gpu, weight.shape()))
            .transpose()?;
        let col2im_dx = dx.as_ref().filter(|_| !convolved_dx);
        if dweight.is_none() && col2im_dx.is_none() {
            return Ok((dx, dweight));
        }
        let pointwise = if weight_grad {
            plan.weight_grad
        } else {
            plan.input_grad
        };
        if pointwise == ConvKernel::Pointwise {
            // No im2col, no col2im: x is the col buffer and dx the dcol one.
            let (n, c, hw) = (shape.n, shape.c, positions);
            let (x3, dy3, w2) = ([n, c, hw], [n, o, hw], [o, c]);
            if let Some(dweight) = &dweight {
                let nt = Matmul {
                    trans_b: true,
                    ..Matmul::default()
                };
                let (dy_op, x_op) = (dy.operand_as(&dy3), x.operand_as(&x3));
                // One split-K product on the tiled kernel, per-image products otherwise.
                if !nt.run_summed(&gpu, dy_op, x_op, dweight)? {
                    let per_image = Tensor::uninit(&gpu, &[n, o, c])?;
                    nt.run(&gpu, dy_op, x_op, None, per_image.operand())?;
                    sum_axes(&gpu, &per_image, (n, o * c, 1), dweight, 1.0, false)?;
                }
            }
            if let Some(dx) = col2im_dx {
                let tn = Matmul {
                    trans_a: true,
                    ..Matmul::default()
                };
                let (w_op, dy_op) = (weight.operand_as(&w2), dy.operand_as(&dy3));
                tn.run(&gpu, w_op, dy_op, None, dx.operand_as(&x3))?;
            }
            return Ok((dx, dweight));
        }

        let g = shape.groups;
        let image_in = (shape.c * shape.h * shape.w) as u64 * 4;
        let partials = dweight.is_some();
        for (index, (first, count)) in chunks(&gpu, &shape, partials)?.into_iter().enumerate() {
            // One product per image and group: dy as [images·G, O/G, positions], col as
            // [images·G, C/G·KH·KW, positions].
            let (dy_shape, col_shape) =
                ([count * g, o / g, positions], [count * g, taps, positions]);
            // A chunk of the whole batch reads dy and writes dx where they are; others copy
            // their images out and back. Images side by side read dy as they lay it out.
            let whole = count == shape.n;
            let side_by_side = images_side_by_side(&shape, count);
            let dy_copy = match side_by_side {
                true => None,
                false => chunk_copy(dy, (first, count))?,
            };
            let dy_chunk = dy_copy.as_ref().unwrap_or(dy);
            let dy_columns = match side_by_side {
                true => Some(self.images_to_columns(&shape, dy, (first, count))?),
                false => None,
            };
            if let (Some(dweight), Some(dy_columns)) = (&dweight, &dy_columns) {
                // dW += dy · colᵀ over every image's columns at once (K = images · P).
                let operands = (x, dy_columns, dweight);
                self.weight_grad_side_by_side(&shape, operands, (first, count), index > 0)?;
            } else if let Some(dweight) = &dweight {
                // dW += Σ_n dy[n] · col[n]ᵀ
                let col = self.im2col(&gpu, &shape, x, (first, count), false)?;
                let per_image = Tensor::uninit(&gpu, &[count * g, o / g, taps])?;
                let nt = Matmul {
                    trans_b: true,
                    ..Matmul::default()
                };
                nt.run(
                    &gpu,
                    dy_chunk.operand_as(&dy_shape),
                    col.operand_as(&col_shape),
                    None,
                    per_image.operand(),
                )?;
                drop(col);
                sum_axes(
                    &gpu,
                    &per_image,
                    (count, o * taps, 1),
                    dweight,
                    1.0,
                    index > 0,
                )?;
            }
            let Some(dx) = col2im_dx else { continue };
            // dx = col2im(Wᵀ · dy[n]), or of Wᵀ · dy over the images side by side.
            let tn = Matmul {
                trans_a: true,
                ..Matmul::default()
            };
            let (dcol, entry) = match &dy_columns {
                Some(dy_columns) => {
                    let dcol = Tensor::uninit(&gpu, &[taps, count * positions])?;
                    let w_shape = [o, taps];
                    let w_op = weight.operand_as(&w_shape);
                    tn.run(&gpu, w_op, dy_columns.operand(), None, dcol.operand())?;
                    (dcol, "col2im_side_by_side")
                }
                None => {
                    let dcol = Tensor::uninit(&gpu, &[count * g, taps, positions])?;
                    let weights = GroupWeights::new(&gpu, &shape, weight, count)?;
                    let dy_op = dy_chunk.operand_as(&dy_shape);
                    tn.run(&gpu, weights.operand(), dy_op, None, dcol.operand())?;
                    (dcol, "col2im")
                }
            };
            if whole {
                self.run_im2col_kernel(&gpu, &shape, entry, (&dcol, dx), (0, count))?;
                continue;
            }
            let dx_chunk = Tensor::uninit(&gpu, &[count, shape.c, shape.h, shape.w])?;
            self.run_im2col_kernel(&gpu, &shape, entry, (&dcol, &dx_chunk), (0, count))?;
            gpu.copy(
                (dx_chunk.buffer(), 0),
                (dx.buffer(), first as u64 * image_in),
                count as u64 * image_in,
            )?;
        }
        Ok((dx, dweight))
    }

    /// Images `first..first + count` of `dy` side by side, `[O][images·P]`.
    fn images_to_columns(
        &self,
        shape: &Conv2dShape,
        dy: &Tensor,
        (first, count): (usize, usize),
    ) -> Result<Tensor> {
        let gpu = dy.gpu();
        let dy_columns = Tensor::uninit(gpu, &[shape.o, count * shape.positions()])?;
        let entry = "images_to_columns";
        self.run_im2col_kernel(gpu, shape, entry, (dy, &dy_columns), (first, count))?;
        Ok(dy_columns)
    }

    /// `dweight (+)= dy · colᵀ` for images `first..first + count`, both laid side by side
    /// (`[O][images][P]`, `[C·KH·KW][images][P]`): one product whose sums run over every
    /// image's positions, where per image they would be K = P (not a multiple of 4: both
    /// operands packed) and a sum over the images after. ResNet-18 N8 layer4's 3×3 stride 2,
    /// 512×2304 from 8 images of 49 positions: 28 ms against 52–57 for the per-image products
    /// alone.
    fn weight_grad_side_by_side(
        &self,
        shape: &Conv2dShape,
        (x, dy_columns, dweight): (&Tensor, &Tensor, &Tensor),
        (first, count): (usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let gpu = x.gpu();
        let columns = count * shape.positions();
        let col = self.im2col(gpu, shape, x, (first, count), true)?;
        let nt = Matmul {
            trans_b: true,
            ..Matmul::default()
        };
        let (col_shape, dw_shape) = ([shape.taps(), columns], [shape.o, shape.taps()]);
        let (a, b, out) = (
            dy_columns.operand(),
            col.operand_as(&col_shape),
            dweight.operand_as(&dw_shape),
        );
        if accumulate {
            nt.run_adding(gpu, a, b, None, out)?;
        } else {
            nt.run(gpu, a, b, None, out)?;
        }
        Ok(())
    }

    /// The layer's windows as the override constants that im2col.wgsl and
    /// conv_implicit.wgsl declare (sizes, kernel, stride, padding, dilation), then `more`.
    pub(crate) fn window_constants(
        &self,
        shape: &Conv2dShape,
        more: &[(&'static str, usize)],
    ) -> Result<Vec<(&'static str, u32)>> {
        let window = [
            ("C", shape.c),
            ("H", shape.h),
            ("W", shape.w),
            ("KH", shape.kh),
            ("KW", shape.kw),
            ("OH", shape.oh),
            ("OW", shape.ow),
            ("SH", self.stride.0),
            ("SW", self.stride.1),
            ("PAD_TOP", shape.pad_top),
            ("PAD_LEFT", shape.pad_left),
            ("DH", self.dilation.0),
            ("DW", self.dilation.1),
        ];
        window
            .iter()
            .chain(more)
            .map(|&(name, value)| gpu_word(OP, value).map(|v| (name, v)))
            .collect()
    }

    fn check_backward(&self, shape: &Conv2dShape, dy: &[usize]) -> Result<()> {
        if self.activation != Activation::None {
            return Err(invalid("backward takes the gradient before the activation: use Activation::None and the activation's own backward".into()));
        }
        if dy != shape.output() {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![dy.to_vec(), shape.output().to_vec()],
                detail: format!("dy is {dy:?}, the output is {:?}", shape.output()),
            });
        }
        Ok(())
    }

    /// The windows of images `first..first + count` of `x` as col `[count][C·KH·KW][P]`, or
    /// with `side_by_side` as `[C·KH·KW][count][P]` (one product over every image's columns).
    fn im2col(
        &self,
        gpu: &Gpu,
        shape: &Conv2dShape,
        x: &Tensor,
        (first, count): (usize, usize),
        side_by_side: bool,
    ) -> Result<Tensor> {
        let col = Tensor::uninit(gpu, &[count, shape.col_rows(), shape.positions()])?;
        let entry = if side_by_side {
            "im2col_side_by_side"
        } else {
            "im2col"
        };
        self.run_im2col_kernel(gpu, shape, entry, (x, &col), (first, count))?;
        Ok(col)
    }

    fn run_im2col_kernel(
        &self,
        gpu: &Gpu,
        shape: &Conv2dShape,
        entry: &str,
        (src, dst): (&Tensor, &Tensor),
        (first, count): (usize, usize),
    ) -> Result<()> {
        let (entry, side_by_side) = match entry {
            "col2im" => (shape.col2im_entry(self)?, false),
            "col2im_side_by_side" => (shape.col2im_entry(self)?, true),
            "im2col_side_by_side" => ("im2col", true),
            _ => (entry, false),
        };
        // Output rows of whole vec4s: four positions per invocation (`im2col4`).
        let quads = entry == "im2col" && !side_by_side && shape.ow.is_multiple_of(4);
        let (entry, total, dst_binding) = if quads {
            ("im2col4", dst.len() / 4, (3, dst.binding_vec4()))
        } else if entry == "columns_to_images" || entry == "images_to_columns" {
            (
                entry,
                count * shape.o * shape.positions(),
                (2, dst.binding()),
            )
        } else {
            (entry, dst.len(), (2, dst.binding()))
        };
        let params = Im2colParams {
            images: gpu_word(OP, count)?,
            first_image: gpu_word(OP, first)?,
            total: gpu_word(OP, total)?,
            _pad: 0,
        };
        let constants = match entry {
            "columns_to_images" | "images_to_columns" => {
                self.window_constants(shape, &[("O", shape.o)])?
            }
            _ => self.window_constants(shape, &[("SIDE_BY_SIDE", usize::from(side_by_side))])?,
        };
        let pipeline = gpu.specialized(
            "im2col",
            entry,
            || include_str!("../../shaders/im2col.wgsl").into(),
            &constants,
        )?;
        gpu.run_pass(entry, |pass| {
            gpu.encode_at(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &[(1, src.binding()), dst_binding],
                workgroups(total as u64),
            )
        })
    }
}

/// The gradients of a convolution.
#[derive(Debug)]
pub struct Conv2dGrads<T> {
    /// `∂L/∂x`, shaped like x.
    pub x: T,
    /// `∂L/∂weight`, shaped like the weight.
    pub weight: T,
    /// `∂L/∂bias`, `[O]`.
    pub bias: T,
}

/// The weights as the matmul's `A`: `[O, C·KH·KW]` for one group; for several,
/// `[images·G, O/G, C/G·KH·KW]`, the weights copied once per image of the chunk so that each
/// (image, group) product finds its group's filters at its own batch index.
struct GroupWeights<'a> {
    weight: &'a Tensor,
    repeated: Option<Tensor>,
    shape: [usize; 3],
}

impl<'a> GroupWeights<'a> {
    fn new(gpu: &Gpu, shape: &Conv2dShape, weight: &'a Tensor, images: usize) -> Result<Self> {
        let g = shape.groups;
        if g == 1 {
            return Ok(Self {
                weight,
                repeated: None,
                shape: [1, shape.o, shape.taps()],
            });
        }
        let repeated = Tensor::uninit(gpu, &[images * g, shape.o / g, shape.taps()])?;
        for image in 0..images {
            gpu.copy(
                (weight.buffer(), 0),
                (repeated.buffer(), image as u64 * weight.bytes()),
                weight.bytes(),
            )?;
        }
        Ok(Self {
            weight,
            shape: [images * g, shape.o / g, shape.taps()],
            repeated: Some(repeated),
        })
    }

    fn operand(&self) -> crate::tensor::Operand<'_> {
        match &self.repeated {
            Some(repeated) => repeated.operand_as(&self.shape),
            // Unbatched: shared by every image.
            None => self.weight.operand_as(&self.shape[1..]),
        }
    }
}

/// Whether im2col lays a chunk of `count` images side by side, one product over all their
/// columns (forward, dW and dcol), rather than running one product per image: for one group
/// and several images whose positions are not a multiple of 4, whose columns would be packed
/// into vec4s and their outputs stored one by one. ResNet-18's
/// layer4 at batch 8 (7×7 outputs), forward with bias and ReLU: the 3×3 stride-2 256→512
/// 23 ms side by side against 29 per image, its 1×1 downsampling 3.2 against 8.1. Aligned
/// images keep their products: layer3's 3×3 stride 2 (14×14 outputs) took 21–27 ms side by
/// side against 20.5, the products' working set outgrowing the cache.
fn images_side_by_side(shape: &Conv2dShape, count: usize) -> bool {
    shape.groups == 1 && count > 1 && !shape.positions().is_multiple_of(4)
}

/// The most bytes one chunk's buffer may take: below the device's binding limit.
pub(crate) fn chunk_limit(gpu: &Gpu) -> u64 {
    CHUNK_BYTES.min(gpu.limits().max_storage_buffer_binding_size)
}

/// Splits the batch into runs of images whose col buffer fits one binding, and, for the
/// weight gradient (`partials`), whose per-image products `[O, C/G·KH·KW]` do too: summed
/// chunk by chunk, no buffer grows with the batch (ResNet-50's layer4 3×3 at batch 32
/// would otherwise take 302 MB of partials).
///
/// The sizes leave room for the matmul's packing of a chunk's col buffer (reading from
/// storage, an unaligned one is copied with its rows padded to whole vec4s and its columns
/// to a multiple of 4): a chunk of 19 images 3×63² (27 rows) filled an 8 MiB buffer as
/// im2col wrote it, and its pack did not fit.
fn chunks(gpu: &Gpu, shape: &Conv2dShape, partials: bool) -> Result<Vec<(usize, usize)>> {
    let rows = shape.col_rows().next_multiple_of(4) as u64;
    let col = rows * shape.positions() as u64 * 4;
    let partial = (shape.o * shape.taps()) as u64 * 4;
    let per_image = if partials { col.max(partial) } else { col };
    let padded_columns = 3 * rows * 4;
    let limit = chunk_limit(gpu).saturating_sub(padded_columns);
    gpu.check_buffer_size("the im2col buffer of one image", per_image + padded_columns)?;
    Ok(image_chunks(shape.n, per_image, limit))
}

/// `n` images in runs of as many as fit `limit` bytes at `per_image` each (at least one):
/// (first image, count) per run.
pub(crate) fn image_chunks(n: usize, per_image: u64, limit: u64) -> Vec<(usize, usize)> {
    let images = ((limit / per_image) as usize).clamp(1, n);
    (0..n)
        .step_by(images)
        .map(|first| (first, images.min(n - first)))
        .collect()
}

/// Images `first..first + count` of `t` (batch first) as a tensor of their own, or `None`
/// where they are all of it: a chunk of a batch read in place when it is the whole batch.
pub(crate) fn chunk_copy(t: &Tensor, (first, count): (usize, usize)) -> Result<Option<Tensor>> {
    let n = t.shape().first().copied().unwrap_or(0);
    if count == n {
        return Ok(None);
    }
    let mut shape = t.shape().to_vec();
    shape[0] = count;
    let copy = Tensor::uninit(t.gpu(), &shape)?;
    let image = (t.len() / n) as u64 * 4;
    t.gpu().copy(
        (t.buffer(), first as u64 * image),
        (copy.buffer(), 0),
        count as u64 * image,
    )?;
    Ok(Some(copy))
}

/// Mirrors `Params` in shaders/im2col.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Im2colParams {
    images: u32,
    first_image: u32,
    total: u32,
    _pad: u32,
}

fn view4<'a>(name: &str, x: &'a ArrayViewD<'a, f32>) -> Result<ArrayView4<'a, f32>> {
    x.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| Error::ShapeMismatch {
            op: OP,
            shapes: vec![x.shape().to_vec()],
            detail: format!("{name} must be 4-D, got {:?}", x.shape()),
        })
}

/// The padded input pixel `(i, j)` of `x[n, c]`, zero outside the image.
fn pixel(x: &ArrayView4<'_, f32>, n: usize, c: usize, i: isize, j: isize) -> f32 {
    let (h, w) = (x.shape()[2] as isize, x.shape()[3] as isize);
    if i < 0 || j < 0 || i >= h || j >= w {
        0.0
    } else {
        x[[n, c, i as usize, j as usize]]
    }
}

impl Conv2dShape {
    /// The input channel that channel `c` of filter `o`'s weight reads (its group's `c`-th).
    fn channel(&self, o: usize, c: usize) -> usize {
        o / (self.o / self.groups) * (self.c / self.groups) + c
    }

    /// The padded input row and column that tap `(p, q)` reads for output `(i, j)`.
    fn source(
        &self,
        spec: &Conv2d,
        (i, j): (usize, usize),
        (p, q): (usize, usize),
    ) -> (isize, isize) {
        let row = (i * spec.stride.0 + p * spec.dilation.0) as isize - self.pad_top as isize;
        let col = (j * spec.stride.1 + q * spec.dilation.1) as isize - self.pad_left as isize;
        (row, col)
    }
}

impl Value {
    /// `act(conv(x, weight) + bias)` of this `[N, C, H, W]` input, on its device.
    pub fn conv2d(&self, spec: &Conv2d, weight: &Value, bias: Option<&Value>) -> Result<Value> {
        self.map(
            |x| spec.forward(x, weight.gpu()?, bias.map(Value::gpu).transpose()?),
            |x| {
                let bias = bias.map(|b| b.cpu().map(|b| b.view())).transpose()?;
                conv2d_cpu(spec, &x.view(), &weight.cpu()?.view(), bias.as_ref())
            },
        )
    }

    /// [`Value::conv2d`] in a training step whose backward pass computes this value's
    /// gradient or not (`input_grad`): the output, and on the GPU what
    /// [`Conv2d::forward_saving`] keeps for [`Value::conv2d_backward_saved`].
    pub fn conv2d_saving(
        &self,
        spec: &Conv2d,
        (weight, bias): (&Value, Option<&Value>),
        input_grad: bool,
    ) -> Result<(Value, Option<Value>)> {
        match self {
            Value::Gpu(x) => {
                let bias = bias.map(Value::gpu).transpose()?;
                let (y, saved) = spec.forward_saving_for(x, (weight.gpu()?, bias), input_grad)?;
                Ok((y.into(), saved.map(Value::from)))
            }
            Value::Cpu(_) => Ok((self.conv2d(spec, weight, bias)?, None)),
        }
    }

    /// [`Conv2d::forward_pooled`] of this input on the GPU: a stand-in for the convolution's
    /// output (its shape; its contents never written, so nothing may read them) and the
    /// pooling; `None` on the CPU or where the fused kernel does not take the layer.
    pub(crate) fn conv2d_pooled(
        &self,
        spec: &Conv2d,
        (weight, bias): (&Value, Option<&Value>),
        pool: &Pool2d,
        training_and_argmax: (Option<bool>, bool),
    ) -> Result<Option<(Value, Pooled<Value>)>> {
        let Value::Gpu(x) = self else {
            return Ok(None);
        };
        let bias = bias.map(Value::gpu).transpose()?;
        let state = (weight.gpu()?, bias);
        let Some(pooled) = spec.forward_pooled(x, state, pool, training_and_argmax)? else {
            return Ok(None);
        };
        let shape = spec.shape(x.shape(), state.0.shape(), bias.map(Tensor::shape))?;
        let stand_in = Tensor::uninit(x.gpu(), &shape.output())?;
        Ok(Some((
            stand_in.into(),
            Pooled {
                y: pooled.y.into(),
                argmax: pooled.argmax.map(Value::from),
            },
        )))
    }

    /// [`Value::conv2d`] for weights that stay fixed over many passes, with a `residual`
    /// added before the activation (see [`Conv2d::forward_reusing`]): the output, and the
    /// filters this pass transformed on the GPU, to hand to the next pass as `filters`.
    pub fn conv2d_reusing(
        &self,
        spec: &Conv2d,
        (weight, bias): (&Value, Option<&Value>),
        filters: Option<&Value>,
        residual: Option<&Value>,
    ) -> Result<(Value, Option<Value>)> {
        match self {
            Value::Gpu(x) => {
                let bias = bias.map(Value::gpu).transpose()?;
                let filters = filters.map(Value::gpu).transpose()?;
                let residual = residual.map(Value::gpu).transpose()?;
                let state = (weight.gpu()?, bias);
                let (y, made) = spec.forward_reusing(x, state, filters, residual)?;
                Ok((y.into(), made.map(Value::from)))
            }
            Value::Cpu(_) => {
                let Some(residual) = residual else {
                    return Ok((self.conv2d(spec, weight, bias)?, None));
                };
                let linear = Conv2d {
                    activation: Activation::None,
                    ..*spec
                };
                let y = self.conv2d(&linear, weight, bias)?;
                Ok((y.add_activated(residual, spec.activation)?, None))
            }
        }
    }

    /// `(dx if input_grad, dweight, dbias if bias_grad)` of `y = act(conv(x, weight) + bias)`
    /// (this value is `x`, `act` is `spec.activation`) from `dy = ∂L/∂y` and the output `y`.
    /// On the GPU the activation's derivative is applied as the weight-gradient kernel reads
    /// `dy` where that kernel takes the shape.
    pub fn conv2d_backward(
        &self,
        spec: &Conv2d,
        weight: &Value,
        y: &Value,
        dy: &Value,
        input_grad: bool,
        bias_grad: bool,
    ) -> Result<(Option<Value>, Value, Option<Value>)> {
        self.conv2d_backward_saved(spec, (weight, y, dy), None, (input_grad, bias_grad))
    }

    /// [`Value::conv2d_backward`] with what [`Value::conv2d_saving`] kept (`saved`), for
    /// `(input_grad, bias_grad)`.
    pub fn conv2d_backward_saved(
        &self,
        spec: &Conv2d,
        (weight, y, dy): (&Value, &Value, &Value),
        saved: Option<&Value>,
        (input_grad, bias_grad): (bool, bool),
    ) -> Result<(Option<Value>, Value, Option<Value>)> {
        let linear = Conv2d {
            activation: Activation::None,
            ..*spec
        };
        Ok(match self {
            Value::Gpu(x) => {
                let gate = Some((spec.activation, y.gpu()?));
                let saved = saved.map(Value::gpu).transpose()?;
                let needs = GradientsNeeded {
                    input: input_grad,
                    bias: bias_grad,
                };
                let (dx, dweight, dbias) =
                    linear.gradients(x, weight.gpu()?, dy.gpu()?, (gate, saved), needs)?;
                (dx.map(Value::from), dweight.into(), dbias.map(Value::from))
            }
            Value::Cpu(x) => {
                let dz =
                    through_activation_cpu(spec.activation, &y.cpu()?.view(), &dy.cpu()?.view())?;
                let g = conv2d_backward_cpu(&linear, &x.view(), &weight.cpu()?.view(), &dz.view())?;
                let dbias = bias_grad.then(|| g.bias.into());
                (Some(g.x.into()), g.weight.into(), dbias)
            }
        })
    }
}

impl Value {
    /// [`Value::conv2d_backward_saved`] of a layer whose output the max pooling `pool` alone
    /// read (this value is the layer's input, `y` its output or a stand-in of its shape):
    /// from the pooling's gradient `dy`, output `pooled` and `argmax`, back through the
    /// activation the pooling took from the layer (`through`; `spec` has none left). Where
    /// the direct weight gradient runs the layer it reads them in place of the layer's `dz`
    /// ([`Conv2d::gradients_pooled`]), and the pooling runs no backward pass of its own;
    /// elsewhere, and on the CPU, the pooling's backward runs first.
    pub(crate) fn conv2d_backward_pooled(
        &self,
        spec: &Conv2d,
        (weight, y): (&Value, &Value),
        pool: &Pool2d,
        (dy, pooled, argmax, through): (&Value, &Value, &Value, Activation),
        saved: Option<&Value>,
        (input_grad, bias_grad): (bool, bool),
    ) -> Result<(Option<Value>, Value, Option<Value>)> {
        let windows = *pool == Pool2d::max((2, 2)).stride((2, 2));
        if let (Value::Gpu(x), true) = (self, windows) {
            let needs = GradientsNeeded {
                input: input_grad,
                bias: bias_grad,
            };
            let fused = spec.gradients_pooled(
                (x, weight.gpu()?),
                (dy.gpu()?, pooled.gpu()?, argmax.gpu()?),
                through,
                needs,
            )?;
            if let Some((dx, dweight, dbias)) = fused {
                return Ok((dx.map(Value::from), dweight.into(), dbias.map(Value::from)));
            }
        }
        let gate = (through != Activation::None).then_some((through, pooled));
        let dz = y.pool2d_backward(pool, dy, Some(argmax), gate)?;
        self.conv2d_backward_saved(spec, (weight, y, &dz), saved, (input_grad, bias_grad))
    }
}

/// A convolution's `(dx, dweight, dbias)`, `dx` and `dbias` where wanted.
pub(crate) type Gradients = (Option<Tensor>, Tensor, Option<Tensor>);

/// CPU reference, the course formula: `u[n,o,i,j] = Σ_{p,q,r} x[.., i·l+p, j·l+q, r]·w + b[o]`.
pub fn conv2d_cpu(
    spec: &Conv2d,
    x: &ArrayViewD<'_, f32>,
    weight: &ArrayViewD<'_, f32>,
    bias: Option<&ArrayViewD<'_, f32>>,
) -> Result<ArrayD<f32>> {
    let shape = spec.shape(x.shape(), weight.shape(), bias.map(|b| b.shape()))?;
    let (x, weight) = (view4("x", x)?, view4("weight", weight)?);
    let mut y = super::host_output(OP, &shape.output())?
        .into_dimensionality::<Ix4>()
        .map_err(|e| invalid(e.to_string()))?;
    for ((n, o, i, j), out) in y.indexed_iter_mut() {
        let mut sum = bias.map_or(0.0, |b| b[[o]]);
        for c in 0..shape.c / shape.groups {
            let channel = shape.channel(o, c);
            for p in 0..shape.kh {
                for q in 0..shape.kw {
                    let (row, col) = shape.source(spec, (i, j), (p, q));
                    sum += weight[[o, c, p, q]] * pixel(&x, n, channel, row, col);
                }
            }
        }
        *out = spec.activation.apply(sum);
    }
    Ok(y.into_dyn())
}

/// CPU reference of the backward pass: each output gradient flows back along the taps that
/// produced it; shared weights add up their gradients over every position and image.
pub fn conv2d_backward_cpu(
    spec: &Conv2d,
    x: &ArrayViewD<'_, f32>,
    weight: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
) -> Result<Conv2dGrads<ArrayD<f32>>> {
    let shape = spec.shape(x.shape(), weight.shape(), None)?;
    spec.check_backward(&shape, dy.shape())?;
    let (x, weight, dy) = (view4("x", x)?, view4("weight", weight)?, view4("dy", dy)?);
    let mut dx = Array4::<f32>::zeros(x.raw_dim());
    let mut dweight = Array4::<f32>::zeros(weight.raw_dim());
    let mut dbias = Array1::<f32>::zeros(shape.o);
    for ((n, o, i, j), &g) in dy.indexed_iter() {
        dbias[o] += g;
        for c in 0..shape.c / shape.groups {
            let channel = shape.channel(o, c);
            for p in 0..shape.kh {
                for q in 0..shape.kw {
                    let (row, col) = shape.source(spec, (i, j), (p, q));
                    dweight[[o, c, p, q]] += g * pixel(&x, n, channel, row, col);
                    if row >= 0 && col >= 0 && (row as usize) < shape.h && (col as usize) < shape.w
                    {
                        dx[[n, channel, row as usize, col as usize]] += g * weight[[o, c, p, q]];
                    }
                }
            }
        }
    }
    Ok(Conv2dGrads {
        x: dx.into_dyn(),
        weight: dweight.into_dyn(),
        bias: dbias.into_dyn(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;
    use crate::test_support::{max_abs_diff, random};

    /// A grouped layer's backward pass with the row kernels' dx and im2col + matmul's dW (a
    /// pair the tuner may pick where the row kernels' dW does not fit) against the CPU, with
    /// poisoned outputs; its dx ran through the row kernel's rotated filters.
    #[test]
    fn grouped_rows_dx_with_the_matmul_dw_matches_the_cpu() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let spec = Conv2d {
            padding: Padding::Explicit(1, 1),
            groups: 4,
            ..Conv2d::default()
        };
        let (x, w, dy) = (
            random(&[2, 16, 6, 8], 71),
            random(&[8, 4, 3, 3], 72),
            random(&[2, 8, 6, 8], 73),
        );
        let shape = spec.shape(x.shape(), w.shape(), None).unwrap();
        assert!(conv_grouped::grouped_rows_dx_fit(&spec, &shape));
        let want = conv2d_backward_cpu(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        let up = |a: &ArrayD<f32>| Tensor::from_array(&gpu, a).unwrap();
        drop(Tensor::full(&gpu, x.shape(), f32::NAN).unwrap());
        drop(Tensor::full(&gpu, w.shape(), f32::NAN).unwrap());
        let kernels = BackwardKernels {
            input_grad: ConvKernel::GroupedDirect,
            weight_grad: ConvKernel::Im2colMatmul,
        };
        let needs = GradientsNeeded {
            input: true,
            bias: false,
        };
        let (dx, dw, db) = spec
            .gradients_with(
                kernels,
                (&shape, &up(&x), &up(&w), &up(&dy)),
                (None, None),
                needs,
            )
            .unwrap();
        assert!(db.is_none());
        for (what, got, want) in [
            ("dx", dx.unwrap().to_array().unwrap(), &want.x),
            ("dw", dw.to_array().unwrap(), &want.weight),
        ] {
            let diff = max_abs_diff(&got, want);
            assert!(diff <= 1e-4, "{what}: {diff}");
        }
    }

    /// col2im walks a small kernel's taps, a wide kernel's output windows, and refuses a
    /// kernel whose windows per pixel pass the loop bound too (a shape whose column buffer
    /// only adapters with gigabyte bindings hold, so the GPU tests cannot reach it).
    #[test]
    fn col2im_takes_the_loop_that_stays_within_the_bound() {
        let entry = |spec: Conv2d, x: [usize; 4], w: [usize; 4]| {
            spec.shape(&x, &w, None)
                .and_then(|shape| shape.col2im_entry(&spec))
        };
        let padded = Conv2d {
            padding: Padding::Explicit(1, 1),
            ..Conv2d::default()
        };
        let conv = Conv2d::default();
        let col2im = entry(padded, [8, 64, 56, 56], [64, 64, 3, 3]).unwrap();
        assert_eq!(col2im, "col2im");
        let wide = entry(conv, [1, 2, 2, 70_000], [3, 2, 2, 69_998]).unwrap();
        assert_eq!(wide, "col2im_windows");
        let err = entry(conv, [1, 1, 1, 40_000], [1, 1, 1, 20_000])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("loop bound") && err.contains("dilation"),
            "{err}"
        );
    }
}
