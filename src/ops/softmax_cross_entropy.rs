//! Softmax cross-entropy over integer labels with mean reduction and optional label
//! smoothing, fused and stable (`shaders/loss.wgsl`): one pass gives the loss, the gradient
//! of the logits and the number of correct predictions.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, Axis};

use super::rows::{RowKernel, row_kernel};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::shared::{WORKGROUP, small_workgroups, terms_per_pass};
use crate::tensor::{Tensor, gpu_word};
use crate::value::Value;

const OP: &str = "softmax_cross_entropy";

/// The results of [`softmax_cross_entropy`]; nothing is read back until asked.
#[derive(Debug)]
pub struct CrossEntropy<T> {
    /// Mean loss, shape `[1]`.
    pub loss: T,
    /// `∂loss/∂logits = (softmax − q) / N`, shaped like the logits (`q` the target: the
    /// one-hot label, smoothed).
    pub grad_logits: T,
    /// How many rows have their first arg-max at the label, shape `[1]`.
    pub correct: T,
}

impl<T> CrossEntropy<T> {
    /// The same results as another type (tensors or arrays as values).
    pub(crate) fn map<U>(self, f: impl Fn(T) -> U) -> CrossEntropy<U> {
        CrossEntropy {
            loss: f(self.loss),
            grad_logits: f(self.grad_logits),
            correct: f(self.correct),
        }
    }
}

impl Value {
    /// Softmax cross-entropy (mean over the batch) of these `[N, classes]` logits against
    /// `labels`, on their device: the loss, its gradient and the count of correct rows.
    pub fn softmax_cross_entropy(&self, labels: &[usize]) -> Result<CrossEntropy<Value>> {
        self.softmax_cross_entropy_smoothed(labels, 0.0)
    }

    /// [`Value::softmax_cross_entropy`] against labels smoothed by `label_smoothing` ε in
    /// `[0, 1]` (PyTorch's `CrossEntropyLoss(label_smoothing=ε)`: the target puts `1 − ε` on
    /// the label and spreads `ε` evenly over all classes).
    pub fn softmax_cross_entropy_smoothed(
        &self,
        labels: &[usize],
        label_smoothing: f32,
    ) -> Result<CrossEntropy<Value>> {
        Ok(match self {
            Value::Gpu(x) => {
                softmax_cross_entropy_smoothed(x, labels, label_smoothing)?.map(Value::from)
            }
            Value::Cpu(x) => {
                softmax_cross_entropy_smoothed_cpu(&x.view(), labels, label_smoothing)?
                    .map(Value::from)
            }
        })
    }
}

/// `labels` on the GPU as the u32 words the loss kernels read: exact for every class index
/// (`check` has refused any at or past the class count, itself a u32).
pub(crate) fn upload_labels(gpu: &Gpu, labels: &[usize]) -> Result<Tensor> {
    let words = labels
        .iter()
        .map(|&l| gpu_word("labels", l))
        .collect::<Result<Vec<u32>>>()?;
    Tensor::from_words(gpu, &words)
}

pub(crate) fn check(logits: &[usize], labels: &[usize]) -> Result<(usize, usize)> {
    let &[rows, classes] = logits else {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![logits.to_vec()],
            detail: format!("logits must be [N, K], got {logits:?}"),
        });
    };
    if rows == 0 || classes == 0 {
        return Err(Error::EmptyDimension {
            op: OP,
            shape: logits.to_vec(),
            axis: usize::from(rows != 0),
        });
    }
    if labels.len() != rows {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![logits.to_vec(), vec![labels.len()]],
            detail: format!("{} labels for {rows} rows of logits", labels.len()),
        });
    }
    if let Some((i, &bad)) = labels.iter().enumerate().find(|&(_, &l)| l >= classes) {
        return Err(Error::InvalidArgument {
            op: OP,
            detail: format!("label {bad} at row {i} is not below the {classes} classes"),
        });
    }
    Ok((rows, classes))
}

/// Mirrors `Params` in shaders/loss.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
pub(crate) struct LossParams {
    pub(crate) rows: u32,
    pub(crate) classes: u32,
    pub(crate) scale: f32,
    pub(crate) first_row: u32,
    pub(crate) smoothing: f32,
    pub(crate) pad: [u32; 3],
}

/// A label smoothing PyTorch accepts: in `[0, 1]`.
fn check_smoothing(label_smoothing: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::InvalidArgument {
            op: OP,
            detail: format!("label smoothing {label_smoothing}: give a value in [0, 1]"),
        });
    }
    Ok(())
}

/// Batches up to this many rows are one workgroup that sums the loss and the correct count
/// too: one dispatch in all (shaders/loss.wgsl `main_small`)…
const ONE_GROUP_ROWS: usize = WORKGROUP as usize;

/// …when they hold at most this many logits: one workgroup runs on one thread of a CPU
/// adapter, which costs more than a second dispatch once there are many logits (lavapipe,
/// 2 threads: 64 rows of 1000 classes 0.58 ms in one group against 0.70 ms in two passes).
const ONE_GROUP_LOGITS: usize = 65_536;

/// Loss, gradient and correct count for `logits [N, K]` and `labels` (each below K).
pub fn softmax_cross_entropy(logits: &Tensor, labels: &[usize]) -> Result<CrossEntropy<Tensor>> {
    softmax_cross_entropy_smoothed(logits, labels, 0.0)
}

/// [`softmax_cross_entropy`] with label smoothing `label_smoothing` (ε in `[0, 1]`).
pub fn softmax_cross_entropy_smoothed(
    logits: &Tensor,
    labels: &[usize],
    label_smoothing: f32,
) -> Result<CrossEntropy<Tensor>> {
    let (rows, classes) = check(logits.shape(), labels)?;
    check_smoothing(label_smoothing)?;
    // Three passes over a row: the maximum, the exponentials, the gradient.
    let kernel = row_kernel(OP, classes, 3)?;
    let gpu = logits.gpu();
    let labels = upload_labels(gpu, labels)?;
    let grad = Tensor::uninit(gpu, logits.shape())?;
    let params = LossParams {
        rows: rows as u32,
        classes: classes as u32,
        scale: 1.0 / rows as f32,
        smoothing: label_smoothing,
        ..LossParams::default()
    };
    let run = |entry: &str, outputs: [(u32, &Tensor); 2], groups: u64| {
        let pipeline = gpu.pipeline("loss", entry, loss_source)?;
        gpu.run_pass(OP, |pass| {
            let [first, second] = outputs.map(|(number, t)| (number, t.binding()));
            let bindings = [
                (1, logits.binding()),
                (2, labels.binding()),
                (3, grad.binding()),
                first,
                second,
            ];
            let params = bytemuck::bytes_of(&params);
            gpu.encode_at(pass, &pipeline, params, &bindings, groups)
        })
    };
    if kernel == RowKernel::PerInvocation
        && rows <= ONE_GROUP_ROWS
        && rows * classes <= ONE_GROUP_LOGITS
    {
        let loss = Tensor::uninit(gpu, &[1])?;
        let correct = Tensor::uninit(gpu, &[1])?;
        run("main_small", [(6, &loss), (7, &correct)], 1)?;
        return Ok(CrossEntropy {
            loss,
            grad_logits: grad,
            correct,
        });
    }
    let row_loss = Tensor::uninit(gpu, &[rows])?;
    let row_correct = Tensor::uninit(gpu, &[rows])?;
    match kernel {
        RowKernel::PerInvocation => run(
            "main",
            [(4, &row_loss), (5, &row_correct)],
            small_workgroups(rows as u64),
        )?,
        RowKernel::PerWorkgroup => run(
            "main_wide",
            [(4, &row_loss), (5, &row_correct)],
            rows as u64,
        )?,
    }
    per_row_to_totals(grad, &row_loss, &row_correct)
}

pub(crate) fn loss_source() -> String {
    [
        include_str!("../../shaders/rows.wgsl"),
        include_str!("../../shaders/loss.wgsl"),
    ]
    .concat()
}

/// The batch's mean loss and correct count from per-row values, with the gradient: one
/// workgroup sums both (shaders/loss.wgsl `totals`).
pub(crate) fn per_row_to_totals(
    grad: Tensor,
    row_loss: &Tensor,
    row_correct: &Tensor,
) -> Result<CrossEntropy<Tensor>> {
    let gpu = grad.gpu();
    let rows = row_loss.len();
    let loss = Tensor::uninit(gpu, &[1])?;
    let correct = Tensor::uninit(gpu, &[1])?;
    let scale = 1.0 / rows as f32;
    // One workgroup's lanes stride over the rows: in passes of rows within the loop bound,
    // each adding to the totals before.
    let per_pass = terms_per_pass(WORKGROUP);
    let pipeline = gpu.pipeline("loss", "totals", loss_source)?;
    gpu.run_pass(OP, |pass| {
        let bindings = [
            (4, row_loss.binding()),
            (5, row_correct.binding()),
            (6, loss.binding()),
            (7, correct.binding()),
        ];
        for first in (0..rows).step_by(per_pass) {
            let params = LossParams {
                rows: gpu_word(OP, rows.min(first + per_pass))?,
                scale,
                first_row: gpu_word(OP, first)?,
                ..LossParams::default()
            };
            gpu.encode_at(pass, &pipeline, bytemuck::bytes_of(&params), &bindings, 1)?;
        }
        Ok(())
    })?;
    Ok(CrossEntropy {
        loss,
        grad_logits: grad,
        correct,
    })
}

/// CPU reference of [`softmax_cross_entropy`], from the definition.
pub fn softmax_cross_entropy_cpu(
    logits: &ArrayViewD<'_, f32>,
    labels: &[usize],
) -> Result<CrossEntropy<ArrayD<f32>>> {
    softmax_cross_entropy_smoothed_cpu(logits, labels, 0.0)
}

/// CPU reference of [`softmax_cross_entropy_smoothed`]: the loss `Σ_j q_j·(lse − z_j)`
/// against the target `q = (1 − ε)·onehot + ε/K`.
pub fn softmax_cross_entropy_smoothed_cpu(
    logits: &ArrayViewD<'_, f32>,
    labels: &[usize],
    label_smoothing: f32,
) -> Result<CrossEntropy<ArrayD<f32>>> {
    let (rows, classes) = check(logits.shape(), labels)?;
    check_smoothing(label_smoothing)?;
    let target = |j: usize, label: usize| {
        label_smoothing / classes as f32 + f32::from(u8::from(j == label)) * (1.0 - label_smoothing)
    };
    let mut grad = logits.to_owned();
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for ((row, mut g), &label) in logits
        .axis_iter(Axis(0))
        .zip(grad.axis_iter_mut(Axis(0)))
        .zip(labels)
    {
        let top = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lse = top + row.iter().map(|&z| (z - top).exp()).sum::<f32>().ln();
        loss += f64::from(lse - row[label]);
        // Only with smoothing: 0 · (lse − an infinite logit) would make the plain loss NaN.
        if label_smoothing != 0.0 {
            let eps = f64::from(label_smoothing);
            let mean = row.iter().map(|&z| f64::from(lse - z)).sum::<f64>() / classes as f64;
            loss += eps * (mean - f64::from(lse - row[label]));
        }
        let first_max = row.iter().position(|&z| z == top).unwrap_or(0);
        correct += usize::from(first_max == label);
        for (j, v) in g.iter_mut().enumerate() {
            *v = ((*v - lse).exp() - target(j, label)) / rows as f32;
        }
    }
    let scalar = |v: f32| ArrayD::from_elem(ndarray::IxDyn(&[1]), v);
    Ok(CrossEntropy {
        loss: scalar((loss / rows as f64) as f32),
        grad_logits: grad,
        correct: scalar(correct as f32),
    })
}
