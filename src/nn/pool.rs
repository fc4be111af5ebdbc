//! Pooling layers: max and average pooling (PyTorch's `MaxPool2d` / `AvgPool2d` with
//! stride, padding, dilation and ceil_mode), `AdaptiveAvgPool2d` and `GlobalAvgPool`.

use crate::error::{Error, Result};
use crate::graph::{Backward, BackwardArgs, Ctx, Forward, Layer, MaxPool, Value};
use crate::ops::pool2d::{Pool2d, Pooled};
use crate::ops::{self, Activation, PoolKind};

/// Max or average pooling over windows; the max variant saves its arg-max where a backward
/// pass may follow.
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

    fn forward(&self, ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        // Max pooling's arg-max is for the backward pass alone.
        let pooled = if ctx.backward {
            inputs[0].pool2d(&self.0)?
        } else {
            Pooled {
                y: inputs[0].pool2d_inference(&self.0)?,
                argmax: None,
            }
        };
        Ok(Forward {
            y: pooled.y,
            saved: pooled.argmax.into_iter().collect(),
        })
    }

    fn takes_input_activation(&self, _activation: Activation) -> bool {
        self.0.kind == PoolKind::Max
    }

    fn max_pool(&self) -> Option<MaxPool> {
        let p = self.0;
        (p.kind == PoolKind::Max).then_some(MaxPool {
            kernel: p.kernel,
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            ceil_mode: p.ceil_mode,
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let through = args.input_activation;
        let dx = args.inputs[0].pool2d_backward(
            &self.0,
            args.dy,
            args.saved.first(),
            (through != Activation::None).then_some((through, args.y)),
        )?;
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
            shapes: vec![shape.to_vec()],
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
        let y = inputs[0].global_avg_pool()?;
        Ok(Forward {
            y,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let dx = args.inputs[0].global_avg_pool_backward(args.dy)?;
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
        let y = inputs[0].adaptive_avg_pool2d(&self.0)?;
        Ok(Forward {
            y,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let dx = args.inputs[0].adaptive_avg_pool2d_backward(&self.0, args.dy)?;
        Ok(Backward {
            inputs: vec![Some(dx)],
            state: Vec::new(),
        })
    }
}
