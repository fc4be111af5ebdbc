//! The CPU reference of every op, on ndarray: readable and formula-faithful, what the
//! tests check the GPU kernels against.
//!
//! One naming rule: the reference of an op is the function named after it (its backward
//! pass `<op>_backward`), taking the op's settings first where it has any, then its inputs
//! as ndarray views, and returning what the GPU op returns with arrays in place of tensors.
//! In the op's own file the same function carries a `_cpu` suffix (or is the settings'
//! `forward_cpu`), beside the kernel it mirrors.

use ndarray::{ArrayD, ArrayView4, ArrayViewD};

use crate::error::Result;
use crate::ops::{
    AdaptiveAvgPool2d, CropFlips, Distillation, Dropout, LayerNorm, NormGrads, Normalize,
    Normalized, SignedStep, softmax_cross_entropy::CrossEntropy,
};
use crate::value::Activation;

pub use crate::ops::activation::{
    activation_backward_cpu as activation_backward, softmax_backward_cpu as softmax_backward,
    softmax_cpu as softmax,
};
pub use crate::ops::batch_norm::{
    batch_norm_backward_cpu as batch_norm_backward, batch_norm_eval_cpu as batch_norm_eval,
    batch_norm_train_cpu as batch_norm_train,
};
pub use crate::ops::conv2d::{conv2d_backward_cpu as conv2d_backward, conv2d_cpu as conv2d};
pub use crate::ops::fold_norm::fold_batch_norm_cpu as fold_batch_norm;
pub use crate::ops::grad_norm::clip_grad_norm_cpu as clip_grad_norm;
pub use crate::ops::linear::{linear_backward_cpu as linear_backward, linear_cpu as linear};
pub use crate::ops::log_softmax::{
    log_softmax_backward_cpu as log_softmax_backward, log_softmax_cpu as log_softmax,
    nll_loss_cpu as nll_loss,
};
pub use crate::ops::matmul::matmul_cpu as matmul;
pub use crate::ops::pool2d::{
    global_avg_pool_backward_cpu as global_avg_pool_backward,
    global_avg_pool_cpu as global_avg_pool, pool2d_backward_cpu as pool2d_backward,
    pool2d_cpu as pool2d,
};
pub use crate::ops::softmax_cross_entropy::softmax_cross_entropy_cpu as softmax_cross_entropy;
pub use crate::ops::softmax_cross_entropy::softmax_cross_entropy_smoothed_cpu as softmax_cross_entropy_smoothed;
pub use crate::value::add::add_backward_cpu as add_backward;
pub use crate::value::add::add_cpu as add;

/// `act(x)` elementwise.
pub fn activation(activation: Activation, x: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
    x.mapv(|v| activation.apply(v))
}

/// Adaptive average pooling to `spec`'s output size.
pub fn adaptive_avg_pool2d(
    spec: &AdaptiveAvgPool2d,
    x: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    spec.forward_cpu(x)
}

/// The input gradient of [`adaptive_avg_pool2d`].
pub fn adaptive_avg_pool2d_backward(
    spec: &AdaptiveAvgPool2d,
    x_shape: &[usize],
    dy: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    spec.backward_cpu(x_shape, dy)
}

/// The distillation loss, its gradient for the student and the correct count.
pub fn distillation(
    spec: &Distillation,
    student: &ArrayViewD<'_, f32>,
    teacher: &ArrayViewD<'_, f32>,
    labels: &[usize],
) -> Result<CrossEntropy<ArrayD<f32>>> {
    spec.forward_cpu(student, teacher, labels)
}

/// Inverted dropout at `step` (its backward pass is the same map of `dy`).
pub fn dropout(
    spec: &Dropout,
    x: &ArrayViewD<'_, f32>,
    step: u32,
    training: bool,
) -> Result<ArrayD<f32>> {
    spec.forward_cpu(x, step, training)
}

/// Layer normalisation over γ's trailing dimensions.
pub fn layer_norm(
    spec: &LayerNorm,
    x: &ArrayViewD<'_, f32>,
    gamma: &ArrayViewD<'_, f32>,
    beta: &ArrayViewD<'_, f32>,
) -> Result<Normalized<ArrayD<f32>>> {
    spec.forward_cpu(x, gamma, beta)
}

/// The gradients of [`layer_norm`] from its saved statistics.
pub fn layer_norm_backward(
    spec: &LayerNorm,
    x: &ArrayViewD<'_, f32>,
    gamma: &ArrayViewD<'_, f32>,
    (mean, rstd): (&ArrayD<f32>, &ArrayD<f32>),
    dy: &ArrayViewD<'_, f32>,
) -> Result<NormGrads<ArrayD<f32>>> {
    spec.backward_cpu(x, gamma, mean, rstd, dy)
}

/// Per-channel normalisation of f32 images.
pub fn normalize(spec: &Normalize, x: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
    spec.forward_cpu(x)
}

/// Per-channel normalisation of `byte / 255`.
pub fn normalize_bytes(spec: &Normalize, images: &ArrayView4<'_, u8>) -> Result<ArrayD<f32>> {
    spec.from_bytes_cpu(images)
}

/// Crops and flips of image bytes, scaled by 1/255 and normalised.
pub fn crop_flip_bytes(
    spec: &CropFlips,
    images: &ArrayView4<'_, u8>,
    normalize: &Normalize,
) -> Result<ArrayD<f32>> {
    spec.from_bytes_cpu(images, normalize)
}

/// Crops and flips of float images, normalised.
pub fn crop_flip_floats(
    spec: &CropFlips,
    images: &ArrayView4<'_, f32>,
    normalize: &Normalize,
) -> Result<ArrayD<f32>> {
    spec.from_floats_cpu(images, normalize)
}

/// One signed-gradient step, projected into the ε-ball around `origin` and the range.
pub fn signed_step(
    step: &SignedStep,
    x: &ArrayViewD<'_, f32>,
    grad: &ArrayViewD<'_, f32>,
    origin: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    step.apply_cpu(x, grad, origin)
}
