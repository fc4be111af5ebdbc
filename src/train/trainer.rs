//! Training a [`Graph`] classifier: one step is forward, softmax cross-entropy, backward and
//! the optimizer update, recorded as one GPU submission; evaluation runs in eval mode.

use ndarray::Array4;

use crate::data::{Dataset, Images};
use crate::error::{Error, Result};
use crate::graph::{Device, Graph, GraphOptimizer, Mode, Value};
use crate::ops::normalize::Normalize;
use crate::ops::softmax_cross_entropy::CrossEntropy;

/// Softmax cross-entropy (mean over the batch) of `logits` against `labels`, on the
/// logits' device: the loss, its gradient and the count of correct predictions.
pub fn cross_entropy(logits: &Value, labels: &[usize]) -> Result<CrossEntropy<Value>> {
    logits.softmax_cross_entropy(labels)
}

/// A step's loss and correct count, still on the device (`[1]` each): read them back only
/// when they are wanted, so steps need not wait for each other.
pub struct StepOutput {
    /// Mean cross-entropy over the batch.
    pub loss: Value,
    /// Correct predictions in the batch.
    pub correct: Value,
}

impl StepOutput {
    /// Whether the loss is a finite number: a NaN or an infinity anywhere in the step's
    /// forward pass shows here (it reads back only the loss).
    pub fn loss_is_finite(&self) -> Result<bool> {
        Ok(self.loss.scalar()?.is_finite())
    }
}

/// One training step: forward in training mode, cross-entropy, backward, optimizer update.
/// On a GPU everything, the upload of `input` included, is one submission; the loss and
/// the correct count stay on the device until read.
///
/// ```
/// use wgcnn::prelude::*;
///
/// # fn main() -> wgcnn::Result<()> {
/// let mut model = Sequential::new()
///     .add("flatten", Flatten)
///     .add("fc", Linear::lazy(3))
///     .build_for(&[4, 2, 2, 2], Device::Cpu, 1)?; // or Device::Gpu(Gpu::new()?)
/// let mut sgd = model.optimizer(Optimizer::sgd(0.5))?;
/// let x = ArrayD::from_shape_fn(IxDyn(&[4, 2, 2, 2]), |i| i[0] as f32 - 1.5);
/// let labels = [0, 1, 2, 0];
/// let first = train_step(&mut model, &mut sgd, |d| d.upload(x.clone()), &labels)?;
/// let later = train_step(&mut model, &mut sgd, |d| d.upload(x.clone()), &labels)?;
/// assert!(later.loss.scalar()? < first.loss.scalar()?);
/// # Ok(())
/// # }
/// ```
pub fn train_step(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    input: impl FnOnce(&Device) -> Result<Value>,
    labels: &[usize],
) -> Result<StepOutput> {
    // Cross-entropy needs only the logits: no copy of the input is kept. The model runs
    // the loss with its backward pass, fused with its last layer's where it can.
    step(model, optimizer, |model, device| {
        model.forward(input(device)?, Mode::Train)?;
        model.backward_cross_entropy(labels)
    })
}

/// A training step with any loss: `loss(logits, x)` returns the loss, its gradient with
/// respect to the logits and a correct count; `x` is a copy of the input for losses that
/// need it (e.g. a teacher's forward pass). One submission on a GPU.
pub fn train_step_with(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    input: impl FnOnce(&Device) -> Result<Value>,
    loss: impl FnOnce(&Value, &Value) -> Result<CrossEntropy<Value>>,
) -> Result<StepOutput> {
    step(model, optimizer, |model, device| {
        let x = input(device)?;
        // What the loss needs of the input, before the forward pass consumes it.
        let kept = x.duplicate()?;
        let logits = model.forward(x, Mode::Train)?;
        let ce = loss(logits, &kept)?;
        model.check_finite_value("the loss", &ce.loss)?;
        model.backward(ce.grad_logits)?;
        Ok((ce.loss, ce.correct))
    })
}

/// One recorded step: `pass` runs the forward pass, the loss and the backward pass and
/// returns the loss and the correct count; then the optimizer's update.
fn step(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    pass: impl FnOnce(&mut Graph, &Device) -> Result<(Value, Value)>,
) -> Result<StepOutput> {
    let device = model.device().clone();
    let out = device.record(|| {
        let (loss, correct) = pass(model, &device)?;
        model.update(optimizer)?;
        Ok(StepOutput { loss, correct })
    })?;
    // With Graph::set_check_finite: the first non-finite output, gradient or parameter.
    model.check_finite()?;
    Ok(out)
}

/// Mean loss and accuracy over a data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy per image.
    pub loss: f64,
    /// Fraction classified correctly (top-1), in `[0, 1]`.
    pub accuracy: f64,
    /// Fraction whose label is among the five highest logits, in `[0, 1]` (1 with five
    /// classes or fewer).
    pub top5_accuracy: f64,
}

/// How many rows of `logits [N, K]` have their label among their `k` highest logits, ties
/// going to the lower class (so `k = 1` counts the first arg-max, as the loss's count does).
pub fn top_k_correct(logits: &ndarray::ArrayD<f32>, labels: &[usize], k: usize) -> Result<usize> {
    let &[rows, classes] = logits.shape() else {
        return Err(Error::ShapeMismatch {
            op: "top_k_correct",
            shapes: vec![logits.shape().to_vec()],
            detail: "logits must be [N, K]".into(),
        });
    };
    if k == 0 || labels.len() != rows || labels.iter().any(|&l| l >= classes) {
        return Err(Error::InvalidArgument {
            op: "top_k_correct",
            detail: format!(
                "k {k}, {} labels for {rows} rows of {classes} classes: k must be at least 1 \
                 and every label below the class count",
                labels.len()
            ),
        });
    }
    let rows = logits.rows().into_iter().zip(labels);
    Ok(rows
        .filter(|(row, label)| {
            let z = row[**label];
            // The label's rank: classes above it, and equal ones before it.
            let above = row
                .iter()
                .enumerate()
                .filter(|&(j, &v)| v > z || (v == z && j < **label))
                .count();
            above < k
        })
        .count())
}

/// Normalised images `indices` of `images` as an `[n, 1, rows, cols]` value on `device`
/// (bytes are uploaded as they are and scaled on the GPU).
pub fn image_batch(
    device: &Device,
    images: &Images,
    indices: &[usize],
    normalize: &Normalize,
) -> Result<Value> {
    let mut bytes = Vec::with_capacity(indices.len() * images.rows * images.cols);
    for &i in indices {
        if i >= images.count {
            return Err(Error::InvalidArgument {
                op: "image_batch",
                detail: format!("image {i} requested, the set has {}", images.count),
            });
        }
        bytes.extend_from_slice(images.image(i));
    }
    let shape = (indices.len(), 1, images.rows, images.cols);
    let array = Array4::from_shape_vec(shape, bytes).map_err(|e| Error::ShapeMismatch {
        op: "image_batch",
        shapes: vec![vec![shape.0, shape.1, shape.2, shape.3]],
        detail: e.to_string(),
    })?;
    normalize.bytes_on(device, &array.view())
}

/// Mean loss, accuracy and wall time of one pass over a training set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochStats {
    /// Mean training loss per image.
    pub loss: f64,
    /// Training accuracy, in `[0, 1]`.
    pub accuracy: f64,
    /// Seconds the epoch took.
    pub seconds: f64,
}

/// One epoch of mini-batch training over `images` in the order `shuffled_indices(seed,
/// epoch)` gives (batch 1 is online learning; `batch_size ≥ images.count` is full-batch).
/// The losses are read back once, at the end.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    images: &Images,
    labels: &[u8],
    normalize: &Normalize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Result<EpochStats> {
    if images.count == 0 || labels.len() != images.count || batch_size == 0 {
        return Err(Error::InvalidArgument {
            op: "train_epoch",
            detail: format!(
                "{} images, {} labels, batch size {batch_size}: need as many labels as images, at least one, and a batch size ≥ 1",
                images.count,
                labels.len()
            ),
        });
    }
    let data = Dataset::from_images(images, labels)?;
    train_epoch_on(model, optimizer, &data, normalize, batch_size, seed, epoch)
}

/// [`train_epoch`] over any [`Dataset`]: the batches of `data.batches(batch_size, seed,
/// epoch)`, each normalised on the model's device by `normalize`.
pub fn train_epoch_on(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    data: &Dataset,
    normalize: &Normalize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Result<EpochStats> {
    let start = std::time::Instant::now();
    let mut outputs = Vec::new();
    for batch in data.batches(batch_size, seed, epoch)? {
        let targets = data.labels_at(&batch)?;
        let out = train_step(
            model,
            optimizer,
            |d| data.batch(d, &batch, normalize),
            &targets,
        )?;
        outputs.push((out, batch.len()));
    }
    let (mut loss, mut correct) = (0.0, 0.0);
    for (out, size) in outputs {
        loss += f64::from(out.loss.scalar()?) * size as f64;
        correct += f64::from(out.correct.scalar()?);
    }
    let n = data.len() as f64;
    Ok(EpochStats {
        loss: loss / n,
        accuracy: correct / n,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Labels `indices` as class indices; an index past the end is an error.
pub fn label_batch(labels: &[u8], indices: &[usize]) -> Result<Vec<usize>> {
    indices
        .iter()
        .map(|&i| {
            labels
                .get(i)
                .map(|&l| usize::from(l))
                .ok_or_else(|| Error::InvalidArgument {
                    op: "label_batch",
                    detail: format!("label {i} requested, the set has {}", labels.len()),
                })
        })
        .collect()
}

/// Loss and accuracy of `model` in eval mode over `images`, `batch_size` at a time.
pub fn evaluate(
    model: &mut Graph,
    images: &Images,
    labels: &[u8],
    normalize: &Normalize,
    batch_size: usize,
) -> Result<Evaluation> {
    if images.count == 0 || labels.len() != images.count || batch_size == 0 {
        return Err(Error::InvalidArgument {
            op: "evaluate",
            detail: format!(
                "{} images, {} labels, batch size {batch_size}: need as many labels as images, at least one, and a batch size ≥ 1",
                images.count,
                labels.len()
            ),
        });
    }
    evaluate_on(
        model,
        &Dataset::from_images(images, labels)?,
        normalize,
        batch_size,
    )
}

/// [`evaluate`] over any [`Dataset`], in its order, `batch_size` images at a time.
pub fn evaluate_on(
    model: &mut Graph,
    data: &Dataset,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<Evaluation> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument {
            op: "evaluate",
            detail: "the batch size must be at least 1".into(),
        });
    }
    let (mut loss, mut correct, mut top5) = (0.0f64, 0.0f64, 0usize);
    let order: Vec<usize> = (0..data.len()).collect();
    for batch in order.chunks(batch_size) {
        let device = model.device().clone();
        let x = data.batch(&device, batch, normalize)?;
        let labels = data.labels_at(batch)?;
        let logits = model.forward(x, Mode::Eval)?;
        let ce = cross_entropy(logits, &labels)?;
        // The logits come back for top-5 anyway: top-1 is counted from them too.
        let host_logits = logits.to_array()?;
        top5 += top_k_correct(&host_logits, &labels, 5)?;
        correct += top_k_correct(&host_logits, &labels, 1)? as f64;
        loss += f64::from(ce.loss.scalar()?) * batch.len() as f64;
    }
    let n = data.len() as f64;
    Ok(Evaluation {
        loss: loss / n,
        accuracy: correct / n,
        top5_accuracy: top5 as f64 / n,
    })
}
