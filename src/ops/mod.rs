//! Operations: each file holds one op's shape rules, CPU reference and GPU dispatch.

pub mod activation;
pub mod add;
pub mod attack;
pub mod batch_norm;
pub mod conv2d;
mod conv_direct;
mod conv_weight_grad;
pub mod distillation;
pub mod dropout;
pub mod layer_norm;
pub mod linear;
pub mod matmul;
pub(crate) mod norm;
pub mod normalize;
pub mod pool2d;
pub(crate) mod reduce;
pub mod softmax_cross_entropy;

pub use activation::Activation;
