//! Activation layers (ReLU, LeakyReLU, Sigmoid, Tanh, ReLU6), and the gradient through an
//! activation fused into a conv or linear layer.

use ndarray::Zip;

use crate::error::{Error, Result};
use crate::graph::{Backward, BackwardArgs, Ctx, Forward, Layer, Value};
use crate::ops::Activation;
use crate::ops::reduce::activation_backward_and_sum;
use crate::tensor::Tensor;

/// An elementwise activation as a layer of its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Activate(pub Activation);

/// `max(0, x)`.
pub fn relu() -> Activate {
    Activate(Activation::Relu)
}

/// `x` for `x > 0`, else `slope · x`.
pub fn leaky_relu(slope: f32) -> Activate {
    Activate(Activation::LeakyRelu(slope))
}

/// `1 / (1 + e^-x)`.
pub fn sigmoid() -> Activate {
    Activate(Activation::Sigmoid)
}

/// `tanh(x)`.
pub fn tanh() -> Activate {
    Activate(Activation::Tanh)
}

/// `min(max(x, 0), 6)`: PyTorch's `nn.ReLU6` (MobileNetV2, EfficientNet-Lite).
pub fn relu6() -> Activate {
    Activate(Activation::Relu6)
}

impl Layer for Activate {
    fn describe(&self) -> String {
        format!("{:?}", self.0)
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Ok(inputs[0].to_vec())
    }

    fn forward(&self, _ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        let y = match inputs[0] {
            Value::Gpu(x) => Value::Gpu(self.0.forward(x)?),
            Value::Cpu(x) => Value::Cpu(x.mapv(|v| self.0.apply(v))),
        };
        Ok(Forward {
            y,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let dx = match args.inputs[0] {
            Value::Gpu(x) => Value::Gpu(self.0.backward(x, args.y.gpu()?, args.dy.gpu()?)?),
            Value::Cpu(x) => {
                let mut dx = args.dy.cpu()?.clone();
                Zip::from(&mut dx)
                    .and(x)
                    .and(args.y.cpu()?)
                    .for_each(|d, &x, &y| *d *= self.0.derivative(x, y));
                Value::Cpu(dx)
            }
        };
        Ok(Backward {
            inputs: vec![Some(dx)],
            state: Vec::new(),
        })
    }
}

/// Refuses an activation that `layer` cannot fuse: the fused gradient is read from the
/// output (see [`pre_activation_grad`]), and a leaky ReLU with a negative slope has positive
/// outputs on both sides of 0, so its gradient would silently be wrong.
pub(crate) fn check_fused(activation: Activation, layer: &'static str) -> Result<()> {
    match activation {
        Activation::LeakyRelu(slope) if slope < 0.0 || slope.is_nan() => {
            Err(Error::InvalidArgument {
                op: layer,
                detail: format!(
                    "a fused leaky ReLU needs a slope of at least 0 (got {slope}): its gradient is \
                 read from the layer's output, whose sign is the input's only then; add \
                 nn::leaky_relu({slope}) as a layer of its own instead"
                ),
            })
        }
        _ => Ok(()),
    }
}

/// The GPU side of [`pre_activation_grad`] for a layer with a bias: the pre-activation
/// gradient `dz` and the bias gradient (`Σ dz` over `dims` = `[outer][channels][inner]`
/// except the channels) in one kernel that reads `dy` and `y` once. `None` without an
/// activation: then `dz` is `dy` and the layer's op sums the bias gradient itself.
pub(crate) fn pre_activation_and_bias_grad(
    activation: Activation,
    y: &Tensor,
    dy: &Tensor,
    dims: (usize, usize, usize),
) -> Result<Option<(Tensor, Tensor)>> {
    if activation == Activation::None {
        return Ok(None);
    }
    activation_backward_and_sum(activation, y, dy, dims).map(Some)
}

/// `∂L/∂(pre-activation)` for an activation fused into a layer, from its output `y`: every
/// supported activation's derivative can be read from `y` (ReLU and leaky ReLU are positive
/// exactly where their input is). `None` for no activation: `dy` passes through.
pub(crate) fn pre_activation_grad(
    activation: Activation,
    y: &Value,
    dy: &Value,
) -> Result<Option<Value>> {
    if activation == Activation::None {
        return Ok(None);
    }
    Ok(Some(match y {
        Value::Gpu(y) => Value::Gpu(activation.backward(y, y, dy.gpu()?)?),
        Value::Cpu(y) => {
            let mut d = dy.cpu()?.clone();
            Zip::from(&mut d)
                .and(y)
                .for_each(|d, &y| *d *= activation.derivative(y, y));
            Value::Cpu(d)
        }
    }))
}
