//! Operations on tensors: each file holds one op's shape rules, CPU reference and GPU
//! dispatch. The op settings here (`ops::Conv2d`, `ops::BatchNorm2d`, …) run single ops; the
//! layers of the same names that a model is built from are in [`crate::nn`].

pub mod activation;
pub mod adaptive_pool;
pub mod attack;
pub mod batch_norm;
pub mod conv2d;
mod conv_direct;
mod conv_grouped;
mod conv_implicit;
pub(crate) mod conv_plan;
mod conv_weight_grad;
mod conv_winograd;
pub mod crop_flip;
pub mod distillation;
pub mod dropout;
pub(crate) mod fold_norm;
pub mod grad_norm;
pub mod layer_norm;
pub mod linear;
pub(crate) mod linear_cross_entropy;
pub mod log_softmax;
pub mod matmul;
mod matmul_small;
pub(crate) mod norm;
pub mod normalize;
pub mod pool2d;
pub(crate) mod reduce;
mod rows;
pub mod softmax_cross_entropy;

pub use crate::value::Activation;
pub use activation::{softmax, softmax_backward};
pub use adaptive_pool::AdaptiveAvgPool2d;
pub use attack::SignedStep;
pub use batch_norm::{BatchNorm2d, NormGrads, Normalized};
pub use conv2d::{Conv2d, Conv2dGrads, Conv2dShape, Padding};
pub use crop_flip::{CropFlip, CropFlips};
pub use distillation::Distillation;
pub use dropout::Dropout;
pub use grad_norm::clip_grad_norm;
pub use layer_norm::LayerNorm;
pub use linear::{LinearGrads, linear, linear_backward};
pub use log_softmax::{log_softmax, log_softmax_backward, nll_loss};
pub use matmul::{BiasAxis, KernelChoice, Matmul, MatmulShape};
pub use normalize::Normalize;
pub use pool2d::{
    Pool2d, Pool2dShape, PoolKind, Pooled, global_avg_pool, global_avg_pool_backward,
};
pub use softmax_cross_entropy::{
    CrossEntropy, softmax_cross_entropy, softmax_cross_entropy_smoothed,
};

/// `x` as `[N, C, H, W]` with every size at least 1, or the error naming `op`.
/// Zeros of `shape` for a CPU reference's output, allocated only if the host can: an output
/// sized by hyper-parameters (a padding of billions) is an error, not an aborted process.
pub(crate) fn host_output(
    op: &'static str,
    shape: &[usize],
) -> crate::error::Result<ndarray::ArrayD<f32>> {
    use crate::error::Error;
    let (mut values, count) = crate::tensor::host_vec(op, "an output", shape, |_| Ok(()))?;
    values.resize(count, 0.0);
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), values).map_err(|e| {
        Error::ShapeMismatch {
            op,
            shapes: vec![shape.to_vec()],
            detail: e.to_string(),
        }
    })
}

pub(crate) fn nchw(op: &'static str, x: &[usize]) -> crate::error::Result<[usize; 4]> {
    use crate::error::Error;
    let &[n, c, h, w] = x else {
        return Err(Error::ShapeMismatch {
            op,
            shapes: vec![x.to_vec()],
            detail: format!("input must be [N, C, H, W], got {x:?}"),
        });
    };
    if let Some(axis) = x.iter().position(|&d| d == 0) {
        return Err(Error::EmptyDimension {
            op,
            shape: x.to_vec(),
            axis,
        });
    }
    Ok([n, c, h, w])
}
