//! Operations: each file holds one op's shape rules, CPU reference and GPU dispatch.

pub mod activation;
pub mod conv2d;
pub mod dropout;
pub mod linear;
pub mod matmul;
pub mod normalize;
pub mod pool2d;
pub(crate) mod reduce;
pub mod softmax_cross_entropy;

pub use activation::Activation;
