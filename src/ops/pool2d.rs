//! Max and average pooling (`shaders/pool.wgsl`), and global average pooling.
//!
//! Max pooling sends each window's gradient only to its maximum (the first one in
//! row-major order on ties, as PyTorch); average pooling sends `delta / (M1·M2)` to every
//! element of the window (or divides by the in-bounds count with `count_include_pad: false`).
//! Overlapping windows add up.

use bytemuck::{Pod, Zeroable};
use ndarray::{Array4, ArrayD, ArrayView4, ArrayViewD, Ix4};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::Tensor;

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
/// each window as a flat `h·W + w` index within its plane (as f32), for the backward pass.
#[derive(Debug)]
pub struct Pooled<T> {
    /// `[N, C, OH, OW]`.
    pub y: T,
    /// Max pooling only.
    pub argmax: Option<T>,
}

fn invalid(detail: String) -> Error {
    Error::InvalidArgument {
        op: "pool2d",
        detail,
    }
}

impl Pool2d {
    /// Max pooling with stride = window and no padding.
    pub fn max(kernel: (usize, usize)) -> Self {
        Self {
            kind: PoolKind::Max,
            kernel,
            stride: kernel,
            padding: (0, 0),
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
        }
    }

    /// Checks `x [N, C, H, W]` against the hyper-parameters.
    pub fn shape(&self, x: &[usize]) -> Result<Pool2dShape> {
        let [n, c, h, w] = super::nchw("pool2d", x)?;
        let ((kh, kw), (sh, sw), (ph, pw)) = (self.kernel, self.stride, self.padding);
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
        // ph > kh / 2 is 2·ph > kh without the overflow of 2·ph.
        if ph > kh / 2 || pw > kw / 2 {
            return Err(invalid(format!(
                "padding {:?} must be at most half the window {:?}",
                self.padding, self.kernel
            )));
        }
        if kh > h + 2 * ph || kw > w + 2 * pw {
            return Err(invalid(format!(
                "window {:?} is larger than the padded input {}×{}",
                self.kernel,
                h + 2 * ph,
                w + 2 * pw
            )));
        }
        Ok(Pool2dShape {
            n,
            c,
            h,
            w,
            oh: (h + 2 * ph - kh) / sh + 1,
            ow: (w + 2 * pw - kw) / sw + 1,
        })
    }

    /// Pools `x` on the GPU.
    pub fn forward(&self, x: &Tensor) -> Result<Pooled<Tensor>> {
        let gpu = x.gpu();
        let shape = self.shape(x.shape())?;
        let y = Tensor::uninit(gpu, &shape.output())?;
        match self.kind {
            PoolKind::Max => {
                let argmax = Tensor::uninit(gpu, &shape.output())?;
                self.run(gpu, &shape, "max_forward", &[x, &y, &argmax], y.len())?;
                Ok(Pooled {
                    y,
                    argmax: Some(argmax),
                })
            }
            PoolKind::Avg { .. } => {
                self.run(gpu, &shape, "avg_forward", &[x, &y], y.len())?;
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
        let gpu = dy.gpu();
        let shape = self.shape(x_shape)?;
        check_dy(&shape, dy.shape())?;
        let dx = Tensor::uninit(gpu, x_shape)?;
        // Windows that tile the input: one invocation per window instead of per pixel.
        let tiled = self.stride == self.kernel
            && self.padding == (0, 0)
            && shape.oh * self.kernel.0 == shape.h
            && shape.ow * self.kernel.1 == shape.w;
        let (entry, total) = if tiled {
            ("_tiled", dy.len())
        } else {
            ("", dx.len())
        };
        match (self.kind, argmax) {
            (PoolKind::Max, Some(argmax)) => {
                argmax.check_same_gpu("pool2d", gpu)?;
                check_dy(&shape, argmax.shape())?;
                let entry = format!("max_backward{entry}");
                self.run(gpu, &shape, &entry, &[dy, &dx, argmax], total)?;
            }
            (PoolKind::Max, None) => {
                return Err(invalid(
                    "max pooling backward needs the arg-max from forward".into(),
                ));
            }
            (PoolKind::Avg { .. }, _) => {
                let entry = format!("avg_backward{entry}");
                self.run(gpu, &shape, &entry, &[dy, &dx], total)?
            }
        }
        Ok(dx)
    }

    fn run(
        &self,
        gpu: &Gpu,
        shape: &Pool2dShape,
        entry: &str,
        tensors: &[&Tensor],
        total: usize,
    ) -> Result<()> {
        let count_include_pad = match self.kind {
            PoolKind::Avg { count_include_pad } => count_include_pad,
            PoolKind::Max => true,
        };
        let params = PoolParams {
            total: total as u32,
            _pad: [0; 3],
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
            ("COUNT_INCLUDE_PAD", usize::from(count_include_pad)),
        ]
        .map(|(name, value)| (name, value as u32));
        let pipeline = gpu.specialized(
            "pool",
            entry,
            || include_str!("../../shaders/pool.wgsl").into(),
            &constants,
        )?;
        let bindings: Vec<_> = tensors.iter().map(|t| t.binding()).collect();
        gpu.run_pass(entry, |pass| {
            gpu.encode(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &bindings,
                (total as u64).div_ceil(256),
            )
        })
    }
}

fn check_dy(shape: &Pool2dShape, dy: &[usize]) -> Result<()> {
    if dy != shape.output() {
        return Err(Error::ShapeMismatch {
            op: "pool2d",
            detail: format!("dy is {dy:?}, the output is {:?}", shape.output()),
        });
    }
    Ok(())
}

/// Mirrors `Params` in shaders/pool.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PoolParams {
    total: u32,
    _pad: [u32; 3],
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
        let (kh, kw, h, w) = (
            self.kernel.0 as isize,
            self.kernel.1 as isize,
            shape.h as isize,
            shape.w as isize,
        );
        (top..top + kh)
            .flat_map(move |r| (left..left + kw).map(move |c| (r, c)))
            .filter(move |&(r, c)| r >= 0 && c >= 0 && r < h && c < w)
            .map(|(r, c)| (r as usize, c as usize))
    }

    fn divisor(&self, shape: &Pool2dShape, i: usize, j: usize, include_pad: bool) -> f32 {
        if include_pad {
            (self.kernel.0 * self.kernel.1) as f32
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
            detail: format!("expected 4-D, got {:?}", x.shape()),
        })
}

/// CPU reference of [`Pool2d::forward`].
pub fn pool2d_cpu(spec: &Pool2d, x: &ArrayViewD<'_, f32>) -> Result<Pooled<ArrayD<f32>>> {
    let shape = spec.shape(x.shape())?;
    let x = view4(x)?;
    let mut y = Array4::<f32>::zeros(shape.output());
    let mut argmax = Array4::<f32>::zeros(shape.output());
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
                let (v, at) = best.unwrap_or((f32::NEG_INFINITY, 0));
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
                dx[[n, c, at / shape.w, at % shape.w]] += g;
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

/// Global average pooling: `[N, C, H, W]` → `[N, C]`, the mean of each plane.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (spec, shape) = global_window(x.shape())?;
    let y = Tensor::uninit(x.gpu(), &[shape.n, shape.c])?;
    spec.run(x.gpu(), &shape, "avg_forward", &[x, &y], y.len())?;
    Ok(y)
}

/// Backward of [`global_avg_pool`]: each pixel gets `dy[n, c] / (H·W)`.
pub fn global_avg_pool_backward(x_shape: &[usize], dy: &Tensor) -> Result<Tensor> {
    let (spec, shape) = global_window(x_shape)?;
    if dy.shape() != [shape.n, shape.c] {
        return Err(Error::ShapeMismatch {
            op: "global_avg_pool",
            detail: format!(
                "dy is {:?}, expected [{}, {}]",
                dy.shape(),
                shape.n,
                shape.c
            ),
        });
    }
    let dx = Tensor::uninit(dy.gpu(), x_shape)?;
    spec.run(dy.gpu(), &shape, "avg_backward", &[dy, &dx], dx.len())?;
    Ok(dx)
}

/// Global average pooling is average pooling with one window over the whole plane.
fn global_window(x_shape: &[usize]) -> Result<(Pool2d, Pool2dShape)> {
    let plane = match *x_shape {
        [_, _, h, w] => (h, w),
        _ => (1, 1),
    };
    let spec = Pool2d::avg(plane);
    Ok((spec, spec.shape(x_shape)?))
}
