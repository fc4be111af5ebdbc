//! Activation layers (ReLU, LeakyReLU, Sigmoid, Tanh, ReLU6), and the gradient through an
//! activation fused into a conv or linear layer.

use crate::error::{Error, Result};
use crate::graph::{Backward, BackwardArgs, Ctx, Forward, Layer, Value};
use crate::value::Activation;

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

    fn activation_only(&self) -> Option<Activation> {
        Some(self.0)
    }

    fn forward(&self, _ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        Ok(Forward {
            y: inputs[0].activate(self.0)?,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        Ok(Backward {
            inputs: vec![Some(
                args.inputs[0].activation_backward(self.0, args.y, args.dy)?,
            )],
            state: Vec::new(),
        })
    }
}

/// Whether a layer can apply `activation` itself and take its gradient from its output
/// (see [`check_fused`]).
pub(crate) fn fusable(activation: Activation) -> bool {
    check_fused(activation, "").is_ok()
}

/// Refuses an activation that `layer` cannot fuse: the fused gradient is read from the
/// output (see `ops::activation::through_activation_cpu`), and a leaky ReLU with a negative slope has positive
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
