//! Adaptive average pooling to any output size (`shaders/adaptive_pool.wgsl`), PyTorch's
//! `adaptive_avg_pool2d`: output row `i` averages input rows `⌊i·H/OH⌋ .. ⌈(i+1)·H/OH⌉`,
//! columns likewise. With a CPU reference and the backward pass.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

use super::pool2d::global_avg_pool;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, workgroups};
use crate::tensor::Tensor;
use crate::value::Value;

const OP: &str = "adaptive_avg_pool2d";

/// Adaptive average pooling to an `output = (OH, OW)` of at least 1×1 (larger than the input
/// too: windows then repeat input pixels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptiveAvgPool2d {
    /// The output's height and width.
    pub output: (usize, usize),
}

/// Mirrors `Params` in shaders/adaptive_pool.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdaptiveParams {
    total: u32,
    _pad: [u32; 3],
}

/// The window `[start, end)` of output `i` along an axis of `n` inputs and `out` outputs.
fn window(i: usize, n: usize, out: usize) -> (usize, usize) {
    ((i * n) / out, ((i + 1) * n).div_ceil(out))
}

impl AdaptiveAvgPool2d {
    /// Pools to `(oh, ow)`.
    pub fn new(oh: usize, ow: usize) -> Self {
        Self { output: (oh, ow) }
    }

    /// `[N, C, OH, OW]` for `x [N, C, H, W]`, checked.
    pub fn shape(&self, x: &[usize]) -> Result<[usize; 4]> {
        let [n, c, h, w] = super::nchw(OP, x)?;
        let (oh, ow) = self.output;
        let fits = |d: usize| u32::try_from(d).is_ok();
        if oh == 0 || ow == 0 || ![h, w, oh, ow].into_iter().all(fits) {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!(
                    "output {:?} must be at least 1×1 (and sizes below 2^32)",
                    self.output
                ),
            });
        }
        Ok([n, c, oh, ow])
    }

    fn run(
        &self,
        gpu: &Gpu,
        x_shape: &[usize],
        entry: &str,
        src: &Tensor,
        dst: &Tensor,
    ) -> Result<()> {
        let [_, _, oh, ow] = self.shape(x_shape)?;
        let (h, w) = (x_shape[2], x_shape[3]);
        // The forward kernel loops over an output's window, the backward one over the
        // outputs whose windows hold a pixel: within the loop bound, or an error.
        let most = |n: usize, out: usize| n.div_ceil(out) + 1;
        let loops = if entry == "forward" {
            most(h, oh) * most(w, ow)
        } else {
            most(oh, h) * most(ow, w)
        };
        if loops > MAX_LOOP_ITERATIONS {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!(
                    "{h}×{w} to {oh}×{ow} loops over more than {MAX_LOOP_ITERATIONS} values per \
                     output or input pixel, past the GPU kernels' loop bound: pool in two steps"
                ),
            });
        }
        let params = AdaptiveParams {
            total: u32::try_from(dst.len()).map_err(|_| Error::InvalidArgument {
                op: OP,
                detail: format!("{} outputs do not fit one dispatch", dst.len()),
            })?,
            _pad: [0; 3],
        };
        let constants = [("H", h), ("W", w), ("OH", oh), ("OW", ow)].map(|(n, v)| (n, v as u32));
        let pipeline = gpu.specialized(
            "adaptive_pool",
            entry,
            || include_str!("../../shaders/adaptive_pool.wgsl").into(),
            &constants,
        )?;
        gpu.run_pass(OP, |pass| {
            gpu.encode(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &[src.binding(), dst.binding()],
                workgroups(dst.len() as u64),
            )
        })
    }

    /// Pools `x` on the GPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shape = self.shape(x.shape())?;
        if self.output == (1, 1) {
            // A mean per plane: summed across a workgroup's lanes, for planes of any size.
            return global_avg_pool(x)?.reshape(&shape);
        }
        let y = Tensor::uninit(x.gpu(), &shape)?;
        self.run(x.gpu(), x.shape(), "forward", x, &y)?;
        Ok(y)
    }

    /// `∂L/∂x` from `dy = ∂L/∂y`: each output's gradient spread evenly over its window.
    pub fn backward(&self, x_shape: &[usize], dy: &Tensor) -> Result<Tensor> {
        let out = self.shape(x_shape)?;
        if dy.shape() != out {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![dy.shape().to_vec(), out.to_vec()],
                detail: format!("dy is {:?}, the output is {out:?}", dy.shape()),
            });
        }
        let dx = Tensor::uninit(dy.gpu(), x_shape)?;
        self.run(dy.gpu(), x_shape, "backward", dy, &dx)?;
        Ok(dx)
    }

    /// CPU reference of [`AdaptiveAvgPool2d::forward`], from the definition.
    pub fn forward_cpu(&self, x: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let [n, c, oh, ow] = self.shape(x.shape())?;
        let (h, w) = (x.shape()[2], x.shape()[3]);
        let mut out = super::host_output(OP, &[n, c, oh, ow])?;
        for (i, value) in out.indexed_iter_mut() {
            let ((y0, y1), (x0, x1)) = (window(i[2], h, oh), window(i[3], w, ow));
            let mut sum = 0.0f64;
            for y in y0..y1 {
                for xx in x0..x1 {
                    sum += f64::from(x[[i[0], i[1], y, xx]]);
                }
            }
            *value = (sum / ((y1 - y0) * (x1 - x0)) as f64) as f32;
        }
        Ok(out)
    }

    /// CPU reference of [`AdaptiveAvgPool2d::backward`].
    pub fn backward_cpu(&self, x_shape: &[usize], dy: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let [n, c, oh, ow] = self.shape(x_shape)?;
        if dy.shape() != [n, c, oh, ow] {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![dy.shape().to_vec(), vec![n, c, oh, ow]],
                detail: format!("dy is {:?}, the output is {:?}", dy.shape(), [n, c, oh, ow]),
            });
        }
        let (h, w) = (x_shape[2], x_shape[3]);
        let mut dx = ArrayD::<f32>::zeros(IxDyn(x_shape));
        for (i, &g) in dy.indexed_iter() {
            let ((y0, y1), (x0, x1)) = (window(i[2], h, oh), window(i[3], w, ow));
            let share = g / ((y1 - y0) * (x1 - x0)) as f32;
            for y in y0..y1 {
                for xx in x0..x1 {
                    dx[[i[0], i[1], y, xx]] += share;
                }
            }
        }
        Ok(dx)
    }
}

impl Value {
    /// Adaptive average pooling of this `[N, C, H, W]` value, on its device.
    pub fn adaptive_avg_pool2d(&self, spec: &AdaptiveAvgPool2d) -> Result<Value> {
        self.map(|x| spec.forward(x), |x| spec.forward_cpu(&x.view()))
    }

    /// `∂L/∂x` of [`Value::adaptive_avg_pool2d`] of this value `x`, from `dy`.
    pub fn adaptive_avg_pool2d_backward(
        &self,
        spec: &AdaptiveAvgPool2d,
        dy: &Value,
    ) -> Result<Value> {
        let x_shape = self.shape();
        dy.map(
            |dy| spec.backward(x_shape, dy),
            |dy| spec.backward_cpu(x_shape, &dy.view()),
        )
    }
}
