//! Which elementwise function a layer applies last: the codes the kernels switch on and
//! the scalar formulas the CPU references use. The kernels are in `ops::activation`.

use crate::gpu::shared::activation_code;

/// An activation applied elementwise, e.g. fused into a matmul epilogue.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Activation {
    /// The identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `x` for positive `x`, else `slope · x`.
    LeakyRelu(f32),
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `min(max(x, 0), 6)` (PyTorch's `ReLU6`, `hardtanh(x, 0, 6)`), MobileNet's activation.
    Relu6,
}

impl Activation {
    /// The code the WGSL `activate` function switches on (shaders/epilogue.wgsl), from
    /// `gpu::shared`, which writes the same codes into every kernel as `ACT_*`.
    pub(crate) fn code(self) -> u32 {
        match self {
            Activation::None => activation_code::NONE,
            Activation::Relu => activation_code::RELU,
            Activation::LeakyRelu(_) => activation_code::LEAKY_RELU,
            Activation::Sigmoid => activation_code::SIGMOID,
            Activation::Tanh => activation_code::TANH,
            Activation::Relu6 => activation_code::RELU6,
        }
    }

    /// For kernels that take ReLU as a uniform, so that layers with and without it share a
    /// pipeline (shaders/epilogue.wgsl's `activate_or_relu`): the activation their `override`
    /// constant applies, and whether the uniform adds ReLU.
    pub(crate) fn relu_as_uniform(self) -> (Activation, bool) {
        match self {
            Activation::Relu => (Activation::None, true),
            other => (other, false),
        }
    }

    pub(crate) fn slope(self) -> f32 {
        match self {
            Activation::LeakyRelu(slope) => slope,
            _ => 0.0,
        }
    }

    /// The CPU reference of the same function.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            // Not x.max(0.0), which turns NaN into 0: NaN must show, as in PyTorch.
            Activation::Relu => {
                if x <= 0.0 {
                    0.0
                } else {
                    x
                }
            }
            Activation::LeakyRelu(slope) => {
                if x > 0.0 {
                    x
                } else {
                    slope * x
                }
            }
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            // clamp keeps NaN, as PyTorch does.
            Activation::Relu6 => x.clamp(0.0, 6.0),
        }
    }

    /// The derivative at `x` (with `y = act(x)`): the CPU reference of the backward pass.
    pub fn derivative(self, x: f32, y: f32) -> f32 {
        match self {
            Activation::None => 1.0,
            // PyTorch's rule: only x ≤ 0 blocks the gradient (NaN passes it on).
            Activation::Relu => {
                if x <= 0.0 {
                    0.0
                } else {
                    1.0
                }
            }
            Activation::LeakyRelu(slope) => {
                if x > 0.0 {
                    1.0
                } else {
                    slope
                }
            }
            Activation::Sigmoid => y * (1.0 - y),
            Activation::Tanh => 1.0 - y * y,
            // hardtanh_backward: only 0 < x < 6 passes the gradient (NaN does not).
            Activation::Relu6 => {
                if x > 0.0 && x < 6.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}
