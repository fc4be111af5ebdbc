//! Max and average pooling (`shaders/pool.wgsl`), and global average pooling.
//!
//! Max pooling sends each window's gradient only to its maximum (the first one in
//! row-major order on ties, as PyTorch); average pooling sends `delta / (M1·M2)` to every
//! element of the window (or divides by the in-bounds count with `count_include_pad: false`).
//! Overlapping windows add up. Output sizes, `ceil_mode` and the divisor of windows that
//! overhang the edge follow PyTorch exactly; max pooling takes a dilation.

use bytemuck::{Pod, Zeroable};
use ndarray::{Array4, ArrayD, ArrayView4, ArrayViewD, Ix4};

use super::activation::through_activation_cpu;
use super::adaptive_pool::AdaptiveAvgPool2d;
use super::reduce::sum_axes;
use crate::error::{Error, Result};
use crate::gpu::Commands;
use crate::gpu::Generated;
use crate::gpu::dispatch::Resource;
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, workgroups};
use crate::gpu::texture::{Texel, TextureInputs, scalar_input, vec4_input};
use crate::tensor::Tensor;
use crate::value::{Activation, Value};

/// Which statistic a window takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The largest element.
    Max,
    /// The mean; `count_include_pad` divides by the full window even where it covers padding.
    Avg {
        /// PyTorch's default is true.
        count_include_pad: bool,
    },
}

/// A pooling layer's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2d {
    /// Max or average.
    pub kind: PoolKind,
    /// Window `(M1, M2)`.
    pub kernel: (usize, usize),
    /// Step between windows; usually the window itself.
    pub stride: (usize, usize),
    /// Padding `(rows, columns)` on each side, at most half the window.
    pub padding: (usize, usize),
    /// Spacing of the window's taps `(dh, dw)`, at least 1; above 1 for max pooling only
    /// (PyTorch's `avg_pool2d` has none).
    pub dilation: (usize, usize),
    /// Round the output size up, so that a last, partial window covers the remainder (it
    /// must start inside the input or the left/top padding, as in PyTorch). Average pooling
    /// divides such a window by its part inside the padded input.
    pub ceil_mode: bool,
}

/// The checked sizes of one pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dShape {
    /// Batch.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl Pool2dShape {
    /// `[N, C, OH, OW]`.
    pub fn output(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }
}

/// What the forward pass returns: the pooled tensor and, for max pooling, the arg-max of
/// each window as a flat `h·W + w` index within its plane, for the backward pass. The arg-max
/// is held as f32 (exact: planes are limited to 2²⁴ pixels); [`Pooled::indices`] gives the
/// integers, as PyTorch's `return_indices`. A window whose dilated taps all fall in the
/// padding is -inf with index `H·W` (no element; its gradient goes nowhere).
#[derive(Debug)]
pub struct Pooled<T> {
    /// `[N, C, OH, OW]`.
    pub y: T,
    /// Max pooling only.
    pub argmax: Option<T>,
}

impl Pooled<ArrayD<f32>> {
    /// The arg-max as integers (max pooling only).
    pub fn indices(&self) -> Option<ArrayD<i64>> {
        self.argmax.as_ref().map(|a| a.mapv(|v| v as i64))
    }
}

impl Pooled<Tensor> {
    /// The arg-max read back as integers (max pooling only).
    pub fn indices(&self) -> Result<Option<ArrayD<i64>>> {
        self.argmax
            .as_ref()
            .map(|a| Ok(a.to_array()?.mapv(|v| v as i64)))
            .transpose()
    }
}

/// The largest plane whose flat indices f32 holds exactly.
const MAX_PLANE: usize = 1 << 24;

fn invalid(detail: String) -> Error {
    Error::InvalidArgument {
        op: "pool2d",
        detail,
    }
}

/// PyTorch's output size along one axis (`pooling_output_shape`), or `None` when the window
/// does not fit or a size overflows.
fn output_size(
    size: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
    ceil_mode: bool,
) -> Option<usize> {
    let span = dilation.checked_mul(kernel - 1)?.checked_add(1)?;
    let padded = size.checked_add(pad.checked_mul(2)?)?;
    let room = padded.checked_sub(span)?;
    let steps = if ceil_mode {
        room.div_ceil(stride)
    } else {
        room / stride
    };
    // A last window must start inside the input or its left padding.
    let too_far = ceil_mode && steps * stride >= size + pad;
    Some(steps + 1 - usize::from(too_far))
}

impl Pool2d {
    /// Max pooling with stride = window and no padding.
    pub fn max(kernel: (usize, usize)) -> Self {
        Self {
            kind: PoolKind::Max,
            kernel,
            stride: kernel,
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode: false,
        }
    }

    /// Average pooling with stride = window, no padding, padding counted.
    pub fn avg(kernel: (usize, usize)) -> Self {
        Self {
            kind: PoolKind::Avg {
                count_include_pad: true,
            },
            kernel,
            stride: kernel,
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode: false,
        }
    }

    /// With this stride.
    pub fn stride(mut self, stride: (usize, usize)) -> Self {
        self.stride = stride;
        self
    }

    /// With this padding on each side.
    pub fn padding(mut self, padding: (usize, usize)) -> Self {
        self.padding = padding;
        self
    }

    /// With this dilation (max pooling).
    pub fn dilation(mut self, dilation: (usize, usize)) -> Self {
        self.dilation = dilation;
        self
    }

    /// With the output size rounded up (PyTorch's `ceil_mode=True`).
    pub fn ceil_mode(mut self, ceil_mode: bool) -> Self {
        self.ceil_mode = ceil_mode;
        self
    }

    /// Checks `x [N, C, H, W]` against the hyper-parameters.
    pub fn shape(&self, x: &[usize]) -> Result<Pool2dShape> {
        let [n, c, h, w] = super::nchw("pool2d", x)?;
        let ((kh, kw), (sh, sw), (ph, pw)) = (self.kernel, self.stride, self.padding);
        let (dh, dw) = self.dilation;
        if kh == 0 || kw == 0 {
            return Err(invalid(format!(
                "window {:?} must be at least 1×1",
                self.kernel
            )));
        }
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
        if self.dilation != (1, 1) && self.kind != PoolKind::Max {
            return Err(invalid(format!(
                "dilation {:?} applies to max pooling only (average pooling has none, as in PyTorch)",
                self.dilation
            )));
        }
        // ph > kh / 2 is 2·ph > kh without the overflow of 2·ph.
        if ph > kh / 2 || pw > kw / 2 {
            return Err(invalid(format!(
                "padding {:?} must be at most half the window {:?}",
                self.padding, self.kernel
            )));
        }
        // The kernels compute positions in signed 32-bit words, all below the padded sizes:
        // larger values are refused, not truncated or wrapped negative.
        let padded = [
            h.checked_add(ph.saturating_mul(2)),
            w.checked_add(pw.saturating_mul(2)),
        ];
        if [kh, kw, sh, sw, dh, dw]
            .into_iter()
            .map(Some)
            .chain(padded)
            .any(|v| v.is_none_or(|v| i32::try_from(v).is_err()))
        {
            return Err(invalid(format!(
                "window {:?}, stride {:?}, dilation {:?} or the padded input ({:?} padding) is over the 31-bit range the GPU kernels index with",
                self.kernel, self.stride, self.dilation, self.padding
            )));
        }
        let (Some(oh), Some(ow)) = (
            output_size(h, kh, sh, ph, dh, self.ceil_mode),
            output_size(w, kw, sw, pw, dw, self.ceil_mode),
        ) else {
            return Err(invalid(format!(
                "window {:?} with dilation {:?} does not fit the input {h}×{w} padded by {:?}",
                self.kernel, self.dilation, self.padding
            )));
        };
        if h.checked_mul(w).is_none_or(|pixels| pixels > MAX_PLANE) {
            return Err(invalid(format!(
                "planes of {h}×{w} exceed the {MAX_PLANE} pixels whose arg-max indices are exact; pool tiles of the image"
            )));
        }
        Ok(Pool2dShape { n, c, h, w, oh, ow })
    }

    /// The GPU kernels loop over a window's taps per output, and over the windows holding
    /// a pixel per input pixel of the backward pass: both within the loop bound.
    fn check_loop_bound(&self) -> Result<()> {
        let ((kh, kw), (sh, sw), (dh, dw)) = (self.kernel, self.stride, self.dilation);
        let windows_per_pixel = |k: usize, s: usize, d: usize| ((k - 1) * d + 1).div_ceil(s);
        if kh * kw > MAX_LOOP_ITERATIONS
            || windows_per_pixel(kh, sh, dh) * windows_per_pixel(kw, sw, dw) > MAX_LOOP_ITERATIONS
        {
            return Err(invalid(format!(
                "window {:?} (stride {:?}, dilation {:?}) loops over more than {MAX_LOOP_ITERATIONS} \
                 values per output or input pixel, past the GPU kernels' loop bound; for a mean \
                 over whole planes use GlobalAvgPool or AdaptiveAvgPool2d",
                self.kernel, self.stride, self.dilation
            )));
        }
        Ok(())
    }

    /// Pools `x` on the GPU.
    pub fn forward(&self, x: &Tensor) -> Result<Pooled<Tensor>> {
        self.pool(x, true)
    }

    /// The pooled values alone, for inference: max pooling stores no arg-max, which only
    /// a backward pass reads.
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.pool(x, false)?.y)
    }

    /// Pools `x`, max pooling keeping its arg-max or not (`indices`).
    fn pool(&self, x: &Tensor, indices: bool) -> Result<Pooled<Tensor>> {
        let gpu = x.gpu();
        let shape = self.shape(x.shape())?;
        self.check_loop_bound()?;
        let y = Tensor::uninit(gpu, &shape.output())?;
        match self.kind {
            PoolKind::Max => {
                let argmax = indices
                    .then(|| Tensor::uninit(gpu, &shape.output()))
                    .transpose()?;
                // Without indices the output fills the arg-max's (unwritten) binding.
                let slot = argmax.as_ref().unwrap_or(&y);
                if self.quads(&shape) || self.row_quads(&shape) {
                    let tensors = [(5, x), (6, &y), (7, slot)];
                    let quads = y.len() / 4;
                    let entry = if self.quads(&shape) {
                        "max_forward_quads"
                    } else {
                        "max_forward_row_quads"
                    };
                    self.run(&shape, entry, &tensors, quads, NONE, indices)?;
                } else {
                    let tensors = [(1, x), (2, &y), (3, slot)];
                    self.run(&shape, "max_forward", &tensors, y.len(), NONE, indices)?;
                }
                Ok(Pooled { y, argmax })
            }
            PoolKind::Avg { .. } => {
                let tensors = [(1, x), (2, &y)];
                self.run(&shape, "avg_forward", &tensors, y.len(), NONE, false)?;
                Ok(Pooled { y, argmax: None })
            }
        }
    }

    /// `∂L/∂x` from `dy = ∂L/∂y`; max pooling needs the forward pass's arg-max.
    pub fn backward(
        &self,
        x_shape: &[usize],
        dy: &Tensor,
        argmax: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.backward_gated(x_shape, dy, argmax, None)
    }

    /// Max pooling's backward taken on through `activation`, the one that produced its input:
    /// the gradient before that activation, `∂L/∂x · act'(x)`. Each window's maximum `y`
    /// (this pooling's output) is the activation's output at the arg-max, so the kernel
    /// scales `dy` by `act'(y)` as it loads it, and the producing layer needs no pass of its
    /// own for the activation.
    pub fn backward_through(
        &self,
        x_shape: &[usize],
        dy: &Tensor,
        argmax: &Tensor,
        (activation, y): (Activation, &Tensor),
    ) -> Result<Tensor> {
        if self.kind != PoolKind::Max {
            return Err(invalid(
                "only max pooling takes the gradient through the activation before it: \
                 average pooling needs that activation's output at every input"
                    .into(),
            ));
        }
        y.check_same_gpu("pool2d", dy.gpu())?;
        check_dy(&self.shape(x_shape)?, y.shape())?;
        self.backward_gated(x_shape, dy, Some(argmax), Some((activation, y)))
    }

    fn backward_gated(
        &self,
        x_shape: &[usize],
        dy: &Tensor,
        argmax: Option<&Tensor>,
        gate: Option<(Activation, &Tensor)>,
    ) -> Result<Tensor> {
        let gpu = dy.gpu();
        let shape = self.shape(x_shape)?;
        check_dy(&shape, dy.shape())?;
        self.check_loop_bound()?;
        let dx = Tensor::uninit(gpu, x_shape)?;
        // Windows that tile the input: one invocation per window instead of per pixel.
        let tiled = self.stride == self.kernel
            && self.padding == (0, 0)
            && self.dilation == (1, 1)
            && shape.oh * self.kernel.0 == shape.h
            && shape.ow * self.kernel.1 == shape.w;
        let (entry, total) = if tiled {
            ("_tiled", dy.len())
        } else {
            ("", dx.len())
        };
        let activation = gate.map_or(Activation::None, |(activation, _)| activation);
        match (self.kind, argmax) {
            (PoolKind::Max, Some(argmax)) => {
                argmax.check_same_gpu("pool2d", gpu)?;
                check_dy(&shape, argmax.shape())?;
                if self.quads(&shape) {
                    let mut tensors = vec![(5, dy), (6, &dx), (9, argmax)];
                    tensors.extend(gate.map(|(_, y)| (8, y)));
                    let quads = dy.len() / 4;
                    let entry = "max_backward_quads";
                    self.run(&shape, entry, &tensors, quads, activation, false)?;
                } else {
                    let entry = format!("max_backward{entry}");
                    let mut tensors = vec![(1, dy), (2, &dx), (3, argmax)];
                    tensors.extend(gate.map(|(_, y)| (4, y)));
                    self.run(&shape, &entry, &tensors, total, activation, false)?;
                }
            }
            (PoolKind::Max, None) => {
                return Err(invalid(
                    "max pooling backward needs the arg-max from forward".into(),
                ));
            }
            (PoolKind::Avg { .. }, _) => {
                let entry = format!("avg_backward{entry}");
                let tensors = [(1, dy), (2, &dx)];
                self.run(&shape, &entry, &tensors, total, NONE, false)?
            }
        }
        Ok(dx)
    }

    /// Whether max pooling takes the `_quads` kernels: 2×2 windows at stride 2 that tile the
    /// input, rows of whole vec4s of outputs (see shaders/pool.wgsl).
    fn quads(&self, shape: &Pool2dShape) -> bool {
        self.kernel == (2, 2)
            && self.stride == (2, 2)
            && self.padding == (0, 0)
            && self.dilation == (1, 1)
            && shape.h == 2 * shape.oh
            && shape.w == 2 * shape.ow
            && shape.ow.is_multiple_of(4)
    }

    /// Whether max pooling's forward pass takes `max_forward_row_quads`: rows of inputs and
    /// outputs of whole vec4s, and four neighbouring windows' inputs along a row within its
    /// `ROW_VEC4S_MAX` vec4s. ResNet's 3×3 pooling at stride 2 (N8 64×112² on lavapipe):
    /// 11.4 ms with a load per tap.
    fn row_quads(&self, shape: &Pool2dShape) -> bool {
        let span = 3 * self.stride.1 + (self.kernel.1 - 1) * self.dilation.1 + 1;
        let skew = (4 - self.padding.1 % 4) % 4;
        self.kind == PoolKind::Max
            && shape.w.is_multiple_of(4)
            && shape.ow.is_multiple_of(4)
            && (skew + span).div_ceil(4) <= ROW_VEC4S_MAX
    }

    /// Runs `entry` over `total` items with each tensor at its binding number (the `_quads`
    /// entries bind theirs, at 5 and up, as vec4s; the first tensor's context runs it); max
    /// pooling's backward entries take the gradient through `activation`, and its forward
    /// entries store the arg-max where `keep_argmax`.
    fn run(
        &self,
        shape: &Pool2dShape,
        entry: &str,
        tensors: &[(u32, &Tensor)],
        total: usize,
        activation: Activation,
        keep_argmax: bool,
    ) -> Result<()> {
        let Some(&(_, first)) = tensors.first() else {
            return Err(invalid(format!("{entry} given no tensors")));
        };
        let gpu = first.gpu();
        let count_include_pad = match self.kind {
            PoolKind::Avg { count_include_pad } => count_include_pad,
            PoolKind::Max => true,
        };
        let params = PoolParams {
            total: total as u32,
            slope: activation.slope(),
            _pad: [0; 2],
        };
        let constants = [
            ("H", shape.h),
            ("W", shape.w),
            ("OH", shape.oh),
            ("OW", shape.ow),
            ("KH", self.kernel.0),
            ("KW", self.kernel.1),
            ("SH", self.stride.0),
            ("SW", self.stride.1),
            ("PAD_TOP", self.padding.0),
            ("PAD_LEFT", self.padding.1),
            ("DH", self.dilation.0),
            ("DW", self.dilation.1),
            ("COUNT_INCLUDE_PAD", usize::from(count_include_pad)),
            ("ACT", activation.code() as usize),
            ("KEEP_ARGMAX", usize::from(keep_argmax)),
        ]
        .map(|(name, value)| (name, value as u32));
        // The `_quads` kernels read their inputs through textures where this context reads
        // operands so (all of them or none).
        let quads = entry.ends_with("_quads");
        let inputs = TextureInputs::new(
            tensors
                .iter()
                .copied()
                .filter(|(number, _)| quads && QUAD_INPUTS.contains(number)),
            Texel::Vec4,
        )?;
        let gated = activation != Activation::None;
        let kernel = PoolKernel {
            textures: inputs.textures(),
            gated,
        };
        let pipeline = gpu.generated(&kernel, entry, &constants)?;
        let resources: Vec<_> = tensors
            .iter()
            .map(|&(number, t)| {
                let resource = match inputs.view(number) {
                    Some(view) => Resource::Texture(view),
                    None if number >= 5 => Resource::Buffer(t.binding_vec4()),
                    None => Resource::Buffer(t.binding()),
                };
                (number, resource)
            })
            .collect();
        let copies = |commands: &mut Commands<'_>| {
            inputs.copy(commands);
            Ok(())
        };
        gpu.run_pass_after(entry, copies, |pass| {
            gpu.encode_resources(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &resources,
                workgroups(total as u64),
            )
        })
    }
}

fn check_dy(shape: &Pool2dShape, dy: &[usize]) -> Result<()> {
    if dy != shape.output() {
        return Err(Error::ShapeMismatch {
            op: "pool2d",
            shapes: vec![dy.to_vec(), shape.output().to_vec()],
            detail: format!("dy is {dy:?}, the output is {:?}", shape.output()),
        });
    }
    Ok(())
}

/// The most vec4s of a row `max_forward_row_quads` holds (`values` in shaders/pool.wgsl).
const ROW_VEC4S_MAX: usize = 8;

/// The bindings of the `_quads` kernels' inputs: x or dy, the forward output, the arg-max.
const QUAD_INPUTS: [u32; 3] = [5, 8, 9];

/// One generated pooling kernel: everything its source depends on.
#[derive(Debug)]
struct PoolKernel {
    /// The quads kernels' inputs through textures.
    textures: bool,
    /// Max pooling's backward through the activation before it.
    gated: bool,
}

impl Generated for PoolKernel {
    fn source(&self) -> String {
        [
            include_str!("../../shaders/epilogue.wgsl"),
            &pool_inputs(self.textures, self.gated),
            include_str!("../../shaders/pool.wgsl"),
        ]
        .concat()
    }
}

/// The declarations of inputs shaders/pool.wgsl reads through functions: the `_quads`
/// kernels' vec4s, from storage or textures; and the forward output (`load_pooled`,
/// `load_pooled4`) only where max pooling's backward takes the gradient through an
/// activation (elsewhere they are never called and bind nothing).
fn pool_inputs(textures: bool, gated: bool) -> String {
    let mut out = vec4_input("src4", 5, textures) + &vec4_input("best4", 9, textures);
    if gated {
        out += &scalar_input("pooled", 4, false);
        out += &vec4_input("pooled4", 8, textures);
    } else {
        out += "fn load_pooled(i: u32) -> f32 { return 1.0; }\n";
        out += "fn load_pooled4(i: u32) -> vec4<f32> { return vec4<f32>(1.0); }\n";
    }
    out
}

/// No activation to take the gradient through (every pass but max pooling's backward).
const NONE: Activation = Activation::None;

/// Mirrors `Params` in shaders/pool.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PoolParams {
    total: u32,
    slope: f32,
    _pad: [u32; 2],
}

impl Pool2d {
    /// The in-bounds input cells of window `(i, j)`, row-major.
    fn window(
        &self,
        shape: &Pool2dShape,
        i: usize,
        j: usize,
    ) -> impl Iterator<Item = (usize, usize)> {
        let top = (i * self.stride.0) as isize - self.padding.0 as isize;
        let left = (j * self.stride.1) as isize - self.padding.1 as isize;
        let (h, w) = (shape.h as isize, shape.w as isize);
        let (dh, dw) = (self.dilation.0 as isize, self.dilation.1 as isize);
        let (kh, kw) = (self.kernel.0 as isize, self.kernel.1 as isize);
        (0..kh)
            .flat_map(move |p| (0..kw).map(move |q| (top + p * dh, left + q * dw)))
            .filter(move |&(r, c)| r >= 0 && c >= 0 && r < h && c < w)
            .map(|(r, c)| (r as usize, c as usize))
    }

    /// PyTorch's divisor: the window clipped to the padded input (a `ceil_mode` window can
    /// overhang it) with `count_include_pad`, else its cells inside the input.
    fn divisor(&self, shape: &Pool2dShape, i: usize, j: usize, include_pad: bool) -> f32 {
        if include_pad {
            let extent = |start: usize, kernel: usize, size: usize, pad: usize| {
                (start + kernel).min(size + 2 * pad) - start
            };
            let rows = extent(i * self.stride.0, self.kernel.0, shape.h, self.padding.0);
            let cols = extent(j * self.stride.1, self.kernel.1, shape.w, self.padding.1);
            (rows * cols) as f32
        } else {
            self.window(shape, i, j).count() as f32
        }
    }
}

fn view4<'a>(x: &'a ArrayViewD<'a, f32>) -> Result<ArrayView4<'a, f32>> {
    x.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| Error::ShapeMismatch {
            op: "pool2d",
            shapes: vec![x.shape().to_vec()],
            detail: format!("expected 4-D, got {:?}", x.shape()),
        })
}

/// CPU reference of [`Pool2d::forward`].
pub fn pool2d_cpu(spec: &Pool2d, x: &ArrayViewD<'_, f32>) -> Result<Pooled<ArrayD<f32>>> {
    let shape = spec.shape(x.shape())?;
    let x = view4(x)?;
    let output = || {
        super::host_output("pool2d", &shape.output())?
            .into_dimensionality::<Ix4>()
            .map_err(|e| invalid(e.to_string()))
    };
    let (mut y, mut argmax) = (output()?, output()?);
    for ((n, c, i, j), out) in y.indexed_iter_mut() {
        let cells = spec.window(&shape, i, j);
        match spec.kind {
            PoolKind::Max => {
                // Strict `>` keeps the first maximum; NaN wins, as in PyTorch.
                let mut best: Option<(f32, usize)> = None;
                for (r, col) in cells {
                    let v = x[[n, c, r, col]];
                    if best.is_none_or(|(b, _)| v > b || (v.is_nan() && !b.is_nan())) {
                        best = Some((v, r * shape.w + col));
                    }
                }
                // A window whose dilated taps all fall in the padding: -inf, and the index
                // H·W, past the plane (no input gets its gradient).
                let (v, at) = best.unwrap_or((f32::NEG_INFINITY, shape.h * shape.w));
                *out = v;
                argmax[[n, c, i, j]] = at as f32;
            }
            PoolKind::Avg { count_include_pad } => {
                *out = cells.map(|(r, col)| x[[n, c, r, col]]).sum::<f32>()
                    / spec.divisor(&shape, i, j, count_include_pad);
            }
        }
    }
    let argmax = (spec.kind == PoolKind::Max).then(|| argmax.into_dyn());
    Ok(Pooled {
        y: y.into_dyn(),
        argmax,
    })
}

/// CPU reference of [`Pool2d::backward`].
pub fn pool2d_backward_cpu(
    spec: &Pool2d,
    x_shape: &[usize],
    dy: &ArrayViewD<'_, f32>,
    argmax: Option<&ArrayViewD<'_, f32>>,
) -> Result<ArrayD<f32>> {
    let shape = spec.shape(x_shape)?;
    check_dy(&shape, dy.shape())?;
    let dy = view4(dy)?;
    let mut dx = Array4::<f32>::zeros([shape.n, shape.c, shape.h, shape.w]);
    for ((n, c, i, j), &g) in dy.indexed_iter() {
        match spec.kind {
            PoolKind::Max => {
                let argmax = argmax.ok_or_else(|| {
                    invalid("max pooling backward needs the arg-max from forward".into())
                })?;
                let at = argmax[[n, c, i, j]] as usize;
                if at < shape.h * shape.w {
                    dx[[n, c, at / shape.w, at % shape.w]] += g;
                }
            }
            PoolKind::Avg { count_include_pad } => {
                let share = g / spec.divisor(&shape, i, j, count_include_pad);
                for (r, col) in spec.window(&shape, i, j) {
                    dx[[n, c, r, col]] += share;
                }
            }
        }
    }
    Ok(dx.into_dyn())
}

/// Global average pooling: `[N, C, H, W]` → `[N, C]`, the mean of each plane, summed as
/// `sum_axes` sums (a workgroup's lanes per plane where the plane is large, so a plane of
/// any size stays within the loop bound).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = super::nchw(GLOBAL, x.shape())?;
    let y = Tensor::uninit(x.gpu(), &[n, c])?;
    sum_axes(
        x.gpu(),
        x,
        (1, n * c, h * w),
        &y,
        1.0 / (h * w) as f32,
        false,
    )?;
    Ok(y)
}

/// Backward of [`global_avg_pool`]: each pixel gets `dy[n, c] / (H·W)` (adaptive pooling's
/// backward to one output, which reads one value per pixel).
pub fn global_avg_pool_backward(x_shape: &[usize], dy: &Tensor) -> Result<Tensor> {
    let [n, c, _, _] = global_dy(x_shape, dy.shape())?;
    AdaptiveAvgPool2d::new(1, 1).backward(x_shape, &dy.copy_as(&[n, c, 1, 1])?)
}

/// `x_shape`, checked against `dy [N, C]`.
fn global_dy(x_shape: &[usize], dy: &[usize]) -> Result<[usize; 4]> {
    let [n, c, h, w] = super::nchw(GLOBAL, x_shape)?;
    if dy != [n, c] {
        return Err(Error::ShapeMismatch {
            op: GLOBAL,
            shapes: vec![dy.to_vec(), vec![n, c]],
            detail: format!("dy is {dy:?}, expected [{n}, {c}]"),
        });
    }
    Ok([n, c, h, w])
}

const GLOBAL: &str = "global_avg_pool";

/// CPU reference of [`global_avg_pool`].
pub fn global_avg_pool_cpu(x: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
    let [n, c, h, w] = super::nchw(GLOBAL, x.shape())?;
    let x = view4(x)?;
    let plane = (h * w) as f64;
    Ok(ArrayD::from_shape_fn(ndarray::IxDyn(&[n, c]), |i| {
        let sum: f64 = x
            .slice(ndarray::s![i[0], i[1], .., ..])
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        (sum / plane) as f32
    }))
}

/// CPU reference of [`global_avg_pool_backward`].
pub fn global_avg_pool_backward_cpu(
    x_shape: &[usize],
    dy: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    let [_, _, h, w] = global_dy(x_shape, dy.shape())?;
    let scale = 1.0 / (h * w) as f32;
    Ok(ArrayD::from_shape_fn(ndarray::IxDyn(x_shape), |i| {
        dy[[i[0], i[1]]] * scale
    }))
}

impl Value {
    /// Pools this `[N, C, H, W]` value on its device (with the arg-max for max pooling).
    pub fn pool2d(&self, spec: &Pool2d) -> Result<Pooled<Value>> {
        Ok(match self {
            Value::Gpu(x) => {
                let p = spec.forward(x)?;
                Pooled {
                    y: p.y.into(),
                    argmax: p.argmax.map(Value::from),
                }
            }
            Value::Cpu(x) => {
                let p = pool2d_cpu(spec, &x.view())?;
                Pooled {
                    y: p.y.into(),
                    argmax: p.argmax.map(Value::from),
                }
            }
        })
    }

    /// The pooled values alone, for inference (see [`Pool2d::forward_inference`]).
    pub fn pool2d_inference(&self, spec: &Pool2d) -> Result<Value> {
        Ok(match self {
            Value::Gpu(x) => spec.forward_inference(x)?.into(),
            Value::Cpu(x) => pool2d_cpu(spec, &x.view())?.y.into(),
        })
    }

    /// `∂L/∂x` of pooling this value `x`, from `dy = ∂L/∂y` and the forward arg-max (max
    /// pooling); with `through` = (activation, this pooling's output `y`), taken on through
    /// the activation that produced `x` (see [`Pool2d::backward_through`]).
    pub fn pool2d_backward(
        &self,
        spec: &Pool2d,
        dy: &Value,
        argmax: Option<&Value>,
        through: Option<(Activation, &Value)>,
    ) -> Result<Value> {
        let x_shape = self.shape();
        dy.map(
            |dy| {
                let argmax = argmax.map(Value::gpu).transpose()?;
                match (argmax, through) {
                    (Some(argmax), Some((activation, y))) => {
                        spec.backward_through(x_shape, dy, argmax, (activation, y.gpu()?))
                    }
                    _ => spec.backward(x_shape, dy, argmax),
                }
            },
            |dy| {
                let argmax = argmax.map(|a| a.cpu().map(|a| a.view())).transpose()?;
                let dz = match through {
                    Some((activation, y)) => {
                        through_activation_cpu(activation, &y.cpu()?.view(), &dy.view())?
                    }
                    None => dy.clone(),
                };
                pool2d_backward_cpu(spec, x_shape, &dz.view(), argmax.as_ref())
            },
        )
    }

    /// Global average pooling of this `[N, C, H, W]` value: `[N, C]`, on its device.
    pub fn global_avg_pool(&self) -> Result<Value> {
        self.map(global_avg_pool, |x| global_avg_pool_cpu(&x.view()))
    }

    /// `∂L/∂x` of [`Value::global_avg_pool`] of this value `x`, from `dy`.
    pub fn global_avg_pool_backward(&self, dy: &Value) -> Result<Value> {
        let x_shape = self.shape();
        dy.map(
            |dy| global_avg_pool_backward(x_shape, dy),
            |dy| global_avg_pool_backward_cpu(x_shape, &dy.view()),
        )
    }
}
