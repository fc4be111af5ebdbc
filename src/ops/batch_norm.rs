//! Batch normalisation over `[N, C, H, W]`: statistics per channel over (N, H, W), learnable
//! γ and β per channel, running averages for eval mode (as PyTorch: momentum or, with
//! `momentum: None`, the cumulative average over `num_batches_tracked`; unbiased running
//! variance). GPU kernels in `shaders/norm.wgsl` via `norm.rs`.
//!
//! With an `activation` the layer applies it last (the graph has it run the activation layer
//! after it so): the output is `act(norm(x))`, and the backward pass takes `dy` back through
//! it as it reads it, recomputing the output from x (GPU); the CPU path composes the
//! references.
//!
//! `num_batches_tracked` is a one-element tensor holding the bits of a `u32` (checkpoints
//! save it as int64): the GPU counts batches without a readback, exactly to 2³² − 1.

use ndarray::{Array1, ArrayD, ArrayView1, ArrayViewD, Axis, Ix4};

use super::norm::{self, Grid, Grouping, Settings};
use crate::error::{Error, Result};
use crate::ops::activation::through_activation_cpu;
use crate::tensor::Tensor;
use crate::value::{Activation, Value};

const OP: &str = "batch_norm2d";

/// Batch-norm hyper-parameters; the default is PyTorch's (eps 1e-5, momentum 0.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm2d {
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Weight of the new batch in the running averages; `None` makes them cumulative
    /// averages over every tracked batch (PyTorch's `momentum=None`).
    pub momentum: Option<f32>,
    /// Applied to the output last (`Activation::None`: none).
    pub activation: Activation,
}

impl Default for BatchNorm2d {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: Some(0.1),
            activation: Activation::None,
        }
    }
}

/// A count as the bits of the one-element `num_batches_tracked` state.
pub fn batches_tracked(state: &ArrayD<f32>) -> u32 {
    state.iter().next().map_or(0, |v| v.to_bits())
}

/// The one-element `num_batches_tracked` state holding `count`.
pub fn batches_state(count: u32) -> ArrayD<f32> {
    ndarray::arr0(f32::from_bits(count)).into_dyn()
}

/// What the forward pass keeps for backward: the output and the statistics it used.
#[derive(Debug)]
pub struct Normalized<T> {
    /// The normalised, scaled and shifted output.
    pub y: T,
    /// Mean per group (channel or sample).
    pub mean: T,
    /// `1 / sqrt(var + eps)` per group.
    pub rstd: T,
    /// The batch's biased variance per group (training mode: what normalised the batch).
    pub var: Option<T>,
}

impl<T> Normalized<T> {
    /// The same results as another type (tensors or arrays as values).
    pub(crate) fn map<U>(self, f: impl Fn(T) -> U) -> Normalized<U> {
        Normalized {
            y: f(self.y),
            mean: f(self.mean),
            rstd: f(self.rstd),
            var: self.var.map(&f),
        }
    }
}

/// Gradients of a normalisation layer.
#[derive(Debug)]
pub struct NormGrads<T> {
    /// `∂L/∂x`.
    pub x: T,
    /// `∂L/∂γ`.
    pub gamma: T,
    /// `∂L/∂β`.
    pub beta: T,
}

impl<T> NormGrads<T> {
    /// The same gradients as another type (tensors or arrays as values).
    pub(crate) fn map<U>(self, f: impl Fn(T) -> U) -> NormGrads<U> {
        NormGrads {
            x: f(self.x),
            gamma: f(self.gamma),
            beta: f(self.beta),
        }
    }
}

/// Training needs more than one value per channel (else the variance is 0/0).
fn check_training(grouping: &Grouping, x: &[usize]) -> Result<()> {
    if grouping.outer * grouping.inner < 2 {
        return Err(Error::InvalidArgument {
            op: OP,
            detail: format!(
                "expected more than 1 value per channel when training, got input size {x:?}; use a larger batch or eval mode"
            ),
        });
    }
    Ok(())
}

fn check_counter(batches: &[usize]) -> Result<()> {
    if batches.iter().product::<usize>() != 1 {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![batches.to_vec()],
            detail: format!("num_batches_tracked holds one count, got shape {batches:?}"),
        });
    }
    Ok(())
}

fn grouping(x: &[usize], params: &[&[usize]]) -> Result<Grouping> {
    let [n, c, h, w] = super::nchw(OP, x)?;
    if let Some(bad) = params.iter().find(|p| **p != [c]) {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![bad.to_vec(), vec![c]],
            detail: format!("γ, β and running statistics must be [{c}], got {bad:?}"),
        });
    }
    Ok(Grouping {
        outer: n,
        groups: c,
        inner: h * w,
        affine_per_inner: false,
    })
}

impl BatchNorm2d {
    fn settings(&self, training: bool) -> Settings {
        Settings {
            eps: self.eps,
            momentum: self.momentum.unwrap_or(0.0),
            cumulative: self.momentum.is_none(),
            update_running: training,
            training,
            activation: self.activation,
            run_groups: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        let momentum_ok = self.momentum.is_none_or(|m| (0.0..=1.0).contains(&m));
        if !(self.eps.is_finite() && self.eps >= 0.0 && momentum_ok) {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!(
                    "eps {} must be finite and non-negative, momentum {:?} in [0, 1] or None",
                    self.eps, self.momentum
                ),
            });
        }
        Ok(())
    }

    /// Training mode: normalises with the batch statistics, updates the running averages
    /// in place and counts the batch in `num_batches_tracked`.
    pub fn forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        num_batches_tracked: &Tensor,
    ) -> Result<Normalized<Tensor>> {
        self.validate()?;
        check_counter(num_batches_tracked.shape())?;
        let grouping = grouping(
            x.shape(),
            &[
                gamma.shape(),
                beta.shape(),
                running_mean.shape(),
                running_var.shape(),
            ],
        )?;
        check_training(&grouping, x.shape())?;
        let gpu = x.gpu();
        let c = grouping.groups;
        let (mean, rstd, var) = (
            Tensor::uninit(gpu, &[c])?,
            Tensor::uninit(gpu, &[c])?,
            Tensor::uninit(gpu, &[c])?,
        );
        let settings = self.settings(true);
        norm::launch(
            gpu,
            grouping,
            settings,
            "stats",
            Grid::PerGroup,
            &[
                (norm::X, x),
                (norm::MEAN, &mean),
                (norm::RSTD, &rstd),
                (norm::VAR, &var),
                (norm::RUNNING_MEAN, running_mean),
                (norm::RUNNING_VAR, running_var),
                (norm::BATCHES, num_batches_tracked),
            ],
        )?;
        norm::launch(
            gpu,
            grouping,
            settings,
            "count_batch",
            Grid::Single,
            &[(norm::BATCHES, num_batches_tracked)],
        )?;
        let y = norm::normalize(
            gpu,
            grouping,
            [x, gamma, beta, &mean, &rstd],
            self.activation,
        )?;
        Ok(Normalized {
            y,
            mean,
            rstd,
            var: Some(var),
        })
    }

    /// Eval mode: normalises with the running statistics.
    pub fn forward_eval(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
    ) -> Result<Normalized<Tensor>> {
        let grouping = grouping(
            x.shape(),
            &[
                gamma.shape(),
                beta.shape(),
                running_mean.shape(),
                running_var.shape(),
            ],
        )?;
        let gpu = x.gpu();
        let (mean, rstd) = (
            Tensor::uninit(gpu, &[grouping.groups])?,
            Tensor::uninit(gpu, &[grouping.groups])?,
        );
        norm::launch(
            gpu,
            grouping,
            self.settings(false),
            "eval_stats",
            Grid::GroupThreads,
            &[
                (norm::MEAN, &mean),
                (norm::RSTD, &rstd),
                (norm::RUNNING_MEAN, running_mean),
                (norm::RUNNING_VAR, running_var),
            ],
        )?;
        let y = norm::normalize(
            gpu,
            grouping,
            [x, gamma, beta, &mean, &rstd],
            self.activation,
        )?;
        Ok(Normalized {
            y,
            mean,
            rstd,
            var: None,
        })
    }

    /// Gradients from `dy` (after the activation, if any), with the statistics the forward
    /// pass used; in training mode they flow through the batch mean and variance too.
    pub fn backward(
        &self,
        x: &Tensor,
        [gamma, beta]: [&Tensor; 2],
        [mean, rstd]: [&Tensor; 2],
        dy: &Tensor,
        training: bool,
    ) -> Result<NormGrads<Tensor>> {
        let grouping = grouping(
            x.shape(),
            &[gamma.shape(), beta.shape(), mean.shape(), rstd.shape()],
        )?;
        let [dx, dgamma, dbeta] = norm::backward(
            OP,
            grouping,
            (training, self.activation),
            [x, gamma, beta, mean, rstd, dy],
        )?;
        Ok(NormGrads {
            x: dx,
            gamma: dgamma,
            beta: dbeta,
        })
    }
}

/// A CPU training step's output and the updated running mean and variance.
pub type CpuTrainStep = (Normalized<ArrayD<f32>>, Array1<f32>, Array1<f32>);

// The CPU references: statistics per channel from the definition, in f64.

fn channel_stats(x: &ArrayViewD<'_, f32>) -> Result<(Array1<f32>, Array1<f32>, Array1<f32>)> {
    let x4 = x
        .view()
        .into_dimensionality::<Ix4>()
        .map_err(|e| Error::ShapeMismatch {
            op: OP,
            shapes: vec![x.shape().to_vec()],
            detail: e.to_string(),
        })?;
    let c = x4.shape()[1];
    let (mut mean, mut var, mut unbiased) = (Array1::zeros(c), Array1::zeros(c), Array1::zeros(c));
    for (ch, plane) in x4.axis_iter(Axis(1)).enumerate() {
        let n = plane.len() as f64;
        let mu = plane.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let ss = plane
            .iter()
            .map(|&v| (f64::from(v) - mu).powi(2))
            .sum::<f64>();
        mean[ch] = mu as f32;
        var[ch] = (ss / n) as f32;
        unbiased[ch] = (ss / (n - 1.0).max(1.0)) as f32;
    }
    Ok((mean, var, unbiased))
}

/// `act((x − mean)·rstd·γ + β)` per channel.
fn scale_shift(
    activation: Activation,
    x: &ArrayViewD<'_, f32>,
    [gamma, beta]: [&ArrayView1<'_, f32>; 2],
    [mean, rstd]: [&ArrayView1<'_, f32>; 2],
) -> ArrayD<f32> {
    let mut y = x.to_owned();
    for ((i, v), xv) in y.indexed_iter_mut().zip(x.iter()) {
        let c = i[1];
        *v = activation.apply((xv - mean[c]) * rstd[c] * gamma[c] + beta[c]);
    }
    y
}

/// Training-mode forward after `batches_before` tracked batches; returns the output
/// and the updated running mean and variance (the caller counts the batch).
pub fn batch_norm_train_cpu(
    spec: &BatchNorm2d,
    x: &ArrayViewD<'_, f32>,
    gamma: &ArrayView1<'_, f32>,
    beta: &ArrayView1<'_, f32>,
    running_mean: &ArrayView1<'_, f32>,
    running_var: &ArrayView1<'_, f32>,
    batches_before: u32,
) -> Result<CpuTrainStep> {
    spec.validate()?;
    let grouping = grouping(
        x.shape(),
        &[
            gamma.shape(),
            beta.shape(),
            running_mean.shape(),
            running_var.shape(),
        ],
    )?;
    check_training(&grouping, x.shape())?;
    let (mean, var, unbiased) = channel_stats(x)?;
    let rstd = var.mapv(|v| 1.0 / (v + spec.eps).sqrt());
    let m = spec
        .momentum
        .unwrap_or_else(|| 1.0 / (batches_before as f32 + 1.0));
    let new_mean = running_mean.mapv(|r| (1.0 - m) * r) + &mean.mapv(|v| m * v);
    let new_var = running_var.mapv(|r| (1.0 - m) * r) + &unbiased.mapv(|v| m * v);
    let y = scale_shift(
        spec.activation,
        x,
        [gamma, beta],
        [&mean.view(), &rstd.view()],
    );
    Ok((
        Normalized {
            y,
            mean: mean.into_dyn(),
            rstd: rstd.into_dyn(),
            var: Some(var.into_dyn()),
        },
        new_mean,
        new_var,
    ))
}

/// Eval-mode forward with the running statistics.
pub fn batch_norm_eval_cpu(
    spec: &BatchNorm2d,
    x: &ArrayViewD<'_, f32>,
    gamma: &ArrayView1<'_, f32>,
    beta: &ArrayView1<'_, f32>,
    running_mean: &ArrayView1<'_, f32>,
    running_var: &ArrayView1<'_, f32>,
) -> Result<Normalized<ArrayD<f32>>> {
    grouping(
        x.shape(),
        &[
            gamma.shape(),
            beta.shape(),
            running_mean.shape(),
            running_var.shape(),
        ],
    )?;
    let mean = running_mean.to_owned();
    let rstd = running_var.mapv(|v| 1.0 / (v + spec.eps).sqrt());
    let y = scale_shift(
        spec.activation,
        x,
        [gamma, beta],
        [&mean.view(), &rstd.view()],
    );
    Ok(Normalized {
        y,
        mean: mean.into_dyn(),
        rstd: rstd.into_dyn(),
        var: None,
    })
}

/// Backward from the saved statistics (through them in training mode), `dy` at the
/// normalised output (before any activation: `Value::batch_norm_backward` takes it through
/// first).
pub fn batch_norm_backward_cpu(
    x: &ArrayViewD<'_, f32>,
    gamma: &ArrayView1<'_, f32>,
    mean: &ArrayView1<'_, f32>,
    rstd: &ArrayView1<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
    training: bool,
) -> Result<NormGrads<ArrayD<f32>>> {
    let g = grouping(x.shape(), &[gamma.shape(), mean.shape(), rstd.shape()])?;
    if dy.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![dy.shape().to_vec(), x.shape().to_vec()],
            detail: format!("dy is {:?}, x is {:?}", dy.shape(), x.shape()),
        });
    }
    let count = (g.outer * g.inner) as f64;
    let mut sum_dy = vec![0f64; g.groups];
    let mut sum_dy_xhat = vec![0f64; g.groups];
    for ((i, &d), &xv) in dy.indexed_iter().zip(x.iter()) {
        let c = i[1];
        sum_dy[c] += f64::from(d);
        sum_dy_xhat[c] += f64::from(d) * f64::from((xv - mean[c]) * rstd[c]);
    }
    let mut dx = x.to_owned();
    for ((i, out), (&xv, &d)) in dx.indexed_iter_mut().zip(x.iter().zip(dy.iter())) {
        let c = i[1];
        let xhat = f64::from((xv - mean[c]) * rstd[c]);
        let gy = f64::from(d) * f64::from(gamma[c]);
        let scale = f64::from(rstd[c]);
        *out = if training {
            let gamma = f64::from(gamma[c]);
            (scale * (gy - gamma * sum_dy[c] / count - xhat * gamma * sum_dy_xhat[c] / count))
                as f32
        } else {
            (gy * scale) as f32
        };
    }
    let to_array =
        |v: Vec<f64>| Array1::from(v.into_iter().map(|s| s as f32).collect::<Vec<_>>()).into_dyn();
    Ok(NormGrads {
        x: dx,
        gamma: to_array(sum_dy_xhat),
        beta: to_array(sum_dy),
    })
}

/// A per-channel value as the 1-D view the CPU references take.
fn channels(value: &Value) -> Result<ArrayView1<'_, f32>> {
    value
        .cpu()?
        .view()
        .into_dimensionality()
        .map_err(|e| Error::ShapeMismatch {
            op: OP,
            shapes: vec![value.shape().to_vec()],
            detail: format!("a per-channel tensor is {:?}: {e}", value.shape()),
        })
}

impl Value {
    /// Batch normalisation of this `[N, C, H, W]` value in training mode, on its device:
    /// normalises with the batch statistics, updates the running averages and counts the
    /// batch in `count` (`num_batches_tracked`).
    pub fn batch_norm_train(
        &self,
        spec: &BatchNorm2d,
        [gamma, beta]: [&Value; 2],
        running_mean: &mut Value,
        running_var: &mut Value,
        count: &mut Value,
    ) -> Result<Normalized<Value>> {
        Ok(match self {
            Value::Gpu(x) => spec
                .forward_train(
                    x,
                    gamma.gpu()?,
                    beta.gpu()?,
                    running_mean.gpu()?,
                    running_var.gpu()?,
                    count.gpu()?,
                )?
                .map(Value::from),
            Value::Cpu(x) => {
                let before = batches_tracked(count.cpu()?);
                let (out, mean, var) = batch_norm_train_cpu(
                    spec,
                    &x.view(),
                    &channels(gamma)?,
                    &channels(beta)?,
                    &channels(running_mean)?,
                    &channels(running_var)?,
                    before,
                )?;
                *running_mean = mean.into_dyn().into();
                *running_var = var.into_dyn().into();
                *count = batches_state(before.saturating_add(1)).into();
                out.map(Value::from)
            }
        })
    }

    /// Batch normalisation of this `[N, C, H, W]` value in eval mode (the running
    /// statistics), on its device.
    pub fn batch_norm_eval(
        &self,
        spec: &BatchNorm2d,
        [gamma, beta]: [&Value; 2],
        running_mean: &Value,
        running_var: &Value,
    ) -> Result<Normalized<Value>> {
        Ok(match self {
            Value::Gpu(x) => spec
                .forward_eval(
                    x,
                    gamma.gpu()?,
                    beta.gpu()?,
                    running_mean.gpu()?,
                    running_var.gpu()?,
                )?
                .map(Value::from),
            Value::Cpu(x) => batch_norm_eval_cpu(
                spec,
                &x.view(),
                &channels(gamma)?,
                &channels(beta)?,
                &channels(running_mean)?,
                &channels(running_var)?,
            )?
            .map(Value::from),
        })
    }

    /// The gradients of batch normalisation of this value `x` from `dy` (after
    /// `spec.activation`), with the `mean` and `rstd` its forward pass used (the batch's in
    /// training, the running ones in eval).
    pub fn batch_norm_backward(
        &self,
        spec: &BatchNorm2d,
        [gamma, beta]: [&Value; 2],
        [mean, rstd]: [&Value; 2],
        dy: &Value,
        training: bool,
    ) -> Result<NormGrads<Value>> {
        Ok(match self {
            Value::Gpu(x) => spec
                .backward(
                    x,
                    [gamma.gpu()?, beta.gpu()?],
                    [mean.gpu()?, rstd.gpu()?],
                    dy.gpu()?,
                    training,
                )?
                .map(Value::from),
            Value::Cpu(x) => {
                let affine = [&channels(gamma)?, &channels(beta)?];
                let statistics = [&channels(mean)?, &channels(rstd)?];
                let dy = dy.cpu()?.view();
                // Through the activation first, from the output recomputed.
                let dz = match spec.activation {
                    Activation::None => None,
                    activation => {
                        let y = scale_shift(activation, &x.view(), affine, statistics);
                        Some(through_activation_cpu(activation, &y.view(), &dy)?)
                    }
                };
                let dz = dz.as_ref().map_or(dy, |dz| dz.view());
                let [gamma, _] = affine;
                let [mean, rstd] = statistics;
                batch_norm_backward_cpu(&x.view(), gamma, mean, rstd, &dz, training)?
                    .map(Value::from)
            }
        })
    }
}
