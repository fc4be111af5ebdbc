//! Pooling layers: max and average pooling (PyTorch's `MaxPool2d` / `AvgPool2d` with
//! stride, padding, dilation and ceil_mode), `AdaptiveAvgPool2d` and `GlobalAvgPool`.

use ndarray::{Axis, IxDyn};

use crate::error::{Error, Result};
use crate::graph::{Backward, BackwardArgs, Ctx, Forward, Layer, Value};
use crate::nn::activation::pre_activation_grad;
use crate::ops::pool2d::{
    Pool2d, global_avg_pool, global_avg_pool_backward, pool2d_backward_cpu, pool2d_cpu,
};
use crate::ops::{self, Activation, PoolKind};

/// Max or average pooling over windows; the max variant saves its arg-max for backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pool(pub Pool2d);

/// Max pooling over `k × k` windows with stride `k`.
pub fn max_pool2d(k: usize) -> Pool {
    Pool(Pool2d::max((k, k)))
}

/// Average pooling over `k × k` windows with stride `k`.
pub fn avg_pool2d(k: usize) -> Pool {
    Pool(Pool2d::avg((k, k)))
}

/// PyTorch's module options, e.g. ResNet's stem `max_pool2d(3).stride(2).padding(1)`.
impl Pool {
    /// With stride `s` on both axes (the default is the kernel size, as in PyTorch).
    pub fn stride(self, s: usize) -> Self {
        Self(self.0.stride((s, s)))
    }

    /// With `p` zeros (max pooling: never chosen) on every side.
    pub fn padding(self, p: usize) -> Self {
        Self(self.0.padding((p, p)))
    }

    /// With dilation `d` on both axes.
    pub fn dilation(self, d: usize) -> Self {
        Self(self.0.dilation((d, d)))
    }

    /// Rounding the output size up (PyTorch's `ceil_mode`).
    pub fn ceil_mode(self, ceil: bool) -> Self {
        Self(self.0.ceil_mode(ceil))
    }
}

impl Layer for Pool {
    fn describe(&self) -> String {
        let p = &self.0;
        let kind = match p.kind {
            PoolKind::Max => "MaxPool2d",
            PoolKind::Avg { .. } => "AvgPool2d",
        };
        let (kh, kw) = p.kernel;
        let mut text = format!("{kind}({kh}×{kw}");
        if p.stride != p.kernel {
            text += &format!(", stride {}×{}", p.stride.0, p.stride.1);
        }
        if p.padding != (0, 0) {
            text += &format!(", padding {}×{}", p.padding.0, p.padding.1);
        }
        if p.dilation != (1, 1) {
            text += &format!(", dilation {}×{}", p.dilation.0, p.dilation.1);
        }
        if p.ceil_mode {
            text += ", ceil_mode";
        }
        text + ")"
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Ok(self.0.shape(inputs[0])?.output().to_vec())
    }

    fn forward(&self, _ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        let (y, argmax) = match inputs[0] {
            Value::Gpu(x) => {
                let p = self.0.forward(x)?;
                (Value::Gpu(p.y), p.argmax.map(Value::Gpu))
            }
            Value::Cpu(x) => {
                let p = pool2d_cpu(&self.0, &x.view())?;
                (Value::Cpu(p.y), p.argmax.map(Value::Cpu))
            }
        };
        Ok(Forward {
            y,
            saved: argmax.into_iter().collect(),
        })
    }

    fn takes_input_activation(&self, _activation: Activation) -> bool {
        self.0.kind == PoolKind::Max
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let shape = args.inputs[0].shape();
        let through = args.input_activation;
        let dx = match args.dy {
            Value::Gpu(dy) => {
                let argmax = args.saved.first().map(Value::gpu).transpose()?;
                Value::Gpu(match argmax {
                    Some(argmax) if through != Activation::None => {
                        let gate = (through, args.y.gpu()?);
                        self.0.backward_through(shape, dy, argmax, gate)?
                    }
                    _ => self.0.backward(shape, dy, argmax)?,
                })
            }
            Value::Cpu(_) => {
                let argmax = args.saved.first().map(Value::cpu).transpose()?;
                let view = argmax.map(|a| a.view());
                let dpre = pre_activation_grad(through, args.y, args.dy)?;
                let dy = dpre.as_ref().unwrap_or(args.dy).cpu()?;
                Value::Cpu(pool2d_backward_cpu(
                    &self.0,
                    shape,
                    &dy.view(),
                    view.as_ref(),
                )?)
            }
        };
        Ok(Backward {
            inputs: vec![Some(dx)],
            state: Vec::new(),
        })
    }
}

/// Global average pooling: `[N, C, H, W]` → `[N, C]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalAvgPool;

fn plane(shape: &[usize]) -> Result<usize> {
    match *shape {
        [_, _, h, w] => Ok(h * w),
        _ => Err(Error::ShapeMismatch {
            op: "GlobalAvgPool",
            detail: format!("the input must be [N, C, H, W], got {shape:?}"),
        }),
    }
}

impl Layer for GlobalAvgPool {
    fn describe(&self) -> String {
        "GlobalAvgPool".into()
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        plane(inputs[0])?;
        Ok(inputs[0][..2].to_vec())
    }

    fn forward(&self, _ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        let y = match inputs[0] {
            Value::Gpu(x) => Value::Gpu(global_avg_pool(x)?),
            Value::Cpu(x) => {
                let plane = plane(x.shape())?;
                let flat = x
                    .to_shape(IxDyn(&[x.shape()[0], x.shape()[1], plane]))
                    .map_err(|e| Error::ShapeMismatch {
                        op: "GlobalAvgPool",
                        detail: e.to_string(),
                    })?;
                Value::Cpu(flat.sum_axis(Axis(2)) / plane as f32)
            }
        };
        Ok(Forward {
            y,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let shape = args.inputs[0].shape();
        let dx = match args.dy {
            Value::Gpu(dy) => Value::Gpu(global_avg_pool_backward(shape, dy)?),
            Value::Cpu(dy) => {
                let scale = 1.0 / plane(shape)? as f32;
                Value::Cpu(ndarray::ArrayD::from_shape_fn(IxDyn(shape), |i| {
                    dy[[i[0], i[1]]] * scale
                }))
            }
        };
        Ok(Backward {
            inputs: vec![Some(dx)],
            state: Vec::new(),
        })
    }
}

/// Average pooling to a fixed output size whatever the input's (PyTorch's
/// `AdaptiveAvgPool2d((oh, ow))`): `[N, C, H, W]` → `[N, C, OH, OW]`. Torchvision's models
/// end with `AdaptiveAvgPool2d(1)` followed by a flatten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptiveAvgPool2d(pub ops::AdaptiveAvgPool2d);

impl AdaptiveAvgPool2d {
    /// Pooling to `oh × ow`.
    pub fn new(oh: usize, ow: usize) -> Self {
        Self(ops::AdaptiveAvgPool2d::new(oh, ow))
    }
}

impl Layer for AdaptiveAvgPool2d {
    fn describe(&self) -> String {
        let (oh, ow) = self.0.output;
        format!("AdaptiveAvgPool2d({oh}×{ow})")
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Ok(self.0.shape(inputs[0])?.to_vec())
    }

    fn forward(&self, _ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        let y = match inputs[0] {
            Value::Gpu(x) => Value::Gpu(self.0.forward(x)?),
            Value::Cpu(x) => Value::Cpu(self.0.forward_cpu(&x.view())?),
        };
        Ok(Forward {
            y,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let shape = args.inputs[0].shape();
        let dx = match args.dy {
            Value::Gpu(dy) => Value::Gpu(self.0.backward(shape, dy)?),
            Value::Cpu(dy) => Value::Cpu(self.0.backward_cpu(shape, &dy.view())?),
        };
        Ok(Backward {
            inputs: vec![Some(dx)],
            state: Vec::new(),
        })
    }
}
