//! `log_softmax` over the last axis of `[N, K]` (stable for logits of any size), its
//! backward pass, and the negative log-likelihood loss on log-probabilities
//! (`shaders/log_softmax.wgsl`), with CPU references. `nll_loss(log_softmax(z))` is
//! PyTorch's `cross_entropy(z)`, in two ops.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, Axis};

use super::rows::{RowKernel, row_kernel};
use super::softmax_cross_entropy::{CrossEntropy, check, per_row_to_totals, upload_labels};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::dispatch::Binding;
use crate::gpu::shared::small_workgroups;
use crate::tensor::Tensor;

const OP: &str = "log_softmax";

/// Mirrors `Params` in shaders/log_softmax.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct LogSoftmaxParams {
    rows: u32,
    classes: u32,
    scale: f32,
    _pad: u32,
}

/// `[N, K]`, checked: the sizes of a batch of rows.
fn rows_of(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [rows, classes] if rows > 0 && classes > 0 => Ok((rows, classes)),
        _ => Err(Error::ShapeMismatch {
            op,
            shapes: vec![shape.to_vec()],
            detail: format!("expects [N, K] with N, K ≥ 1, got {shape:?}"),
        }),
    }
}

/// Runs `entry`, which reads each row `passes` times: one invocation per row, or its
/// `_wide` twin (one workgroup per row) where that would pass the loop bound.
fn launch(
    gpu: &Gpu,
    (entry, passes): (&str, usize),
    (rows, classes): (usize, usize),
    scale: f32,
    bindings: &[(u32, Binding<'_>)],
) -> Result<()> {
    let params = LogSoftmaxParams {
        rows: rows as u32,
        classes: classes as u32,
        scale,
        _pad: 0,
    };
    let (entry, groups) = match row_kernel(OP, classes, passes)? {
        RowKernel::PerInvocation => (entry.to_string(), small_workgroups(rows as u64)),
        RowKernel::PerWorkgroup => (format!("{entry}_wide"), rows as u64),
    };
    let pipeline = gpu.pipeline("log_softmax", &entry, || {
        [
            include_str!("../../shaders/rows.wgsl"),
            include_str!("../../shaders/log_softmax.wgsl"),
        ]
        .concat()
    })?;
    gpu.run_pass(OP, |pass| {
        gpu.encode_at(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            bindings,
            groups,
        )
    })
}

/// `log softmax(x)` per row of `x [N, K]` on the GPU.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let dims = rows_of(OP, x.shape())?;
    let y = Tensor::uninit(x.gpu(), x.shape())?;
    launch(
        x.gpu(),
        ("forward", 3),
        dims,
        0.0,
        &[(1, x.binding()), (2, y.binding())],
    )?;
    Ok(y)
}

/// Backward of [`log_softmax`] from its output `y`: `dx = dy − exp(y) · Σ dy` per row.
pub fn log_softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dims = rows_of(OP, y.shape())?;
    dy.check_same_gpu(OP, y.gpu())?;
    if dy.shape() != y.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![dy.shape().to_vec(), y.shape().to_vec()],
            detail: format!("dy is {:?}, y is {:?}", dy.shape(), y.shape()),
        });
    }
    let dx = Tensor::uninit(y.gpu(), y.shape())?;
    launch(
        y.gpu(),
        ("backward", 2),
        dims,
        0.0,
        &[(2, y.binding()), (3, dy.binding()), (4, dx.binding())],
    )?;
    Ok(dx)
}

/// The negative log-likelihood of `labels` under `log_probs [N, K]` (mean over the rows),
/// its gradient by `log_probs` (`−1/N` at each label) and the correct count.
pub fn nll_loss(log_probs: &Tensor, labels: &[usize]) -> Result<CrossEntropy<Tensor>> {
    let (rows, classes) = check(log_probs.shape(), labels)?;
    let gpu = log_probs.gpu();
    let labels = upload_labels(gpu, labels)?;
    let grad = Tensor::uninit(gpu, log_probs.shape())?;
    let row_loss = Tensor::uninit(gpu, &[rows])?;
    let row_correct = Tensor::uninit(gpu, &[rows])?;
    launch(
        gpu,
        ("nll", 2),
        (rows, classes),
        1.0 / rows as f32,
        &[
            (1, log_probs.binding()),
            (4, grad.binding()),
            (5, labels.binding()),
            (6, row_loss.binding()),
            (7, row_correct.binding()),
        ],
    )?;
    per_row_to_totals(grad, &row_loss, &row_correct)
}

/// CPU reference of [`log_softmax`], in f64 per row.
pub fn log_softmax_cpu(x: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
    rows_of(OP, x.shape())?;
    let mut y = x.to_owned();
    for mut row in y.axis_iter_mut(Axis(0)) {
        let top = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f64 = row.iter().map(|&v| f64::from(v - top).exp()).sum();
        let shift = f64::from(top) + sum.ln();
        row.mapv_inplace(|v| (f64::from(v) - shift) as f32);
    }
    Ok(y)
}

/// CPU reference of [`log_softmax_backward`].
pub fn log_softmax_backward_cpu(
    y: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    rows_of(OP, y.shape())?;
    if dy.shape() != y.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![dy.shape().to_vec(), y.shape().to_vec()],
            detail: format!("dy is {:?}, y is {:?}", dy.shape(), y.shape()),
        });
    }
    let mut dx = dy.to_owned();
    for (mut d, yr) in dx.axis_iter_mut(Axis(0)).zip(y.axis_iter(Axis(0))) {
        let total: f32 = d.sum();
        d.zip_mut_with(&yr, |d, &y| *d -= y.exp() * total);
    }
    Ok(dx)
}

/// CPU reference of [`nll_loss`].
pub fn nll_loss_cpu(
    log_probs: &ArrayViewD<'_, f32>,
    labels: &[usize],
) -> Result<CrossEntropy<ArrayD<f32>>> {
    let (rows, _) = check(log_probs.shape(), labels)?;
    let mut grad = ArrayD::zeros(log_probs.raw_dim());
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for ((i, row), &label) in log_probs.axis_iter(Axis(0)).enumerate().zip(labels) {
        loss -= f64::from(row[label]);
        let best = row
            .iter()
            .enumerate()
            .fold(0, |b, (j, &v)| if v > row[b] { j } else { b });
        correct += usize::from(best == label);
        grad[[i, label]] = -1.0 / rows as f32;
    }
    Ok(CrossEntropy {
        loss: ArrayD::from_elem(ndarray::IxDyn(&[1]), (loss / rows as f64) as f32),
        grad_logits: grad,
        correct: ArrayD::from_elem(ndarray::IxDyn(&[1]), correct as f32),
    })
}
