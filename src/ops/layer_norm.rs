//! Layer normalisation over the trailing dimensions (e.g. C, H, W) of each sample, with
//! element-wise affine γ, β of those dimensions' shape; biased variance, as PyTorch.
//! GPU kernels in `shaders/norm.wgsl` via `norm.rs`. An `activation` is applied last, as
//! batch norm's (see `batch_norm.rs`).

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use super::batch_norm::{NormGrads, Normalized};
use super::norm::{self, Grid, Grouping, Settings};
use crate::error::{Error, Result};
use crate::ops::activation::through_activation_cpu;
use crate::tensor::Tensor;
use crate::value::{Activation, Value};

const OP: &str = "layer_norm";

/// Layer-norm hyper-parameters; the default eps is PyTorch's 1e-5.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNorm {
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Applied to the output last (`Activation::None`: none).
    pub activation: Activation,
}

impl Default for LayerNorm {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            activation: Activation::None,
        }
    }
}

/// Samples are the leading dimensions; γ's shape names the normalised trailing ones.
fn grouping(x: &[usize], gamma: &[usize], beta: &[usize]) -> Result<Grouping> {
    if gamma != beta || gamma.is_empty() || gamma.len() > x.len() || !x.ends_with(gamma) {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![gamma.to_vec(), beta.to_vec(), x.to_vec()],
            detail: format!(
                "γ {gamma:?} and β {beta:?} must equal the trailing dimensions of x {x:?}"
            ),
        });
    }
    if let Some(axis) = x.iter().position(|&d| d == 0) {
        return Err(Error::EmptyDimension {
            op: OP,
            shape: x.to_vec(),
            axis,
        });
    }
    let inner: usize = gamma.iter().product();
    Ok(Grouping {
        outer: 1,
        groups: x.iter().product::<usize>() / inner,
        inner,
        affine_per_inner: true,
    })
}

fn array(shape: &[usize], values: Vec<f32>) -> Result<ArrayD<f32>> {
    ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| Error::ShapeMismatch {
        op: OP,
        shapes: vec![shape.to_vec()],
        detail: e.to_string(),
    })
}

impl LayerNorm {
    /// Normalises each sample of `x` over γ's dimensions, then scales and shifts.
    pub fn forward(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Normalized<Tensor>> {
        let grouping = grouping(x.shape(), gamma.shape(), beta.shape())?;
        let gpu = x.gpu();
        let g = grouping.groups;
        let (mean, rstd, var) = (
            Tensor::uninit(gpu, &[g])?,
            Tensor::uninit(gpu, &[g])?,
            Tensor::uninit(gpu, &[g])?,
        );
        let settings = Settings {
            eps: self.eps,
            activation: self.activation,
            ..Settings::default()
        };
        // No running statistics: the variance buffer stands in for the unused bindings.
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
                (norm::RUNNING_MEAN, &var),
                (norm::RUNNING_VAR, &var),
                (norm::BATCHES, &var),
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
            var: Some(var),
        })
    }

    /// Gradients from `dy` (after the activation, if any) through the per-sample statistics.
    pub fn backward(
        &self,
        x: &Tensor,
        [gamma, beta]: [&Tensor; 2],
        [mean, rstd]: [&Tensor; 2],
        dy: &Tensor,
    ) -> Result<NormGrads<Tensor>> {
        let grouping = grouping(x.shape(), gamma.shape(), beta.shape())?;
        let [dx, dgamma, dbeta] = norm::backward(
            OP,
            grouping,
            (true, self.activation),
            [x, gamma, beta, mean, rstd, dy],
        )?;
        Ok(NormGrads {
            x: dx,
            gamma: dgamma,
            beta: dbeta,
        })
    }

    /// CPU reference of [`LayerNorm::forward`], statistics in f64.
    pub fn forward_cpu(
        &self,
        x: &ArrayViewD<'_, f32>,
        gamma: &ArrayViewD<'_, f32>,
        beta: &ArrayViewD<'_, f32>,
    ) -> Result<Normalized<ArrayD<f32>>> {
        let g = grouping(x.shape(), gamma.shape(), beta.shape())?;
        let data: Vec<f32> = x.iter().copied().collect();
        let (mut means, mut rstds, mut vars) = (vec![], vec![], vec![]);
        for sample in data.chunks(g.inner) {
            let n = sample.len() as f64;
            let mu = sample.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = sample
                .iter()
                .map(|&v| (f64::from(v) - mu).powi(2))
                .sum::<f64>()
                / n;
            means.push(mu as f32);
            rstds.push((1.0 / (var + f64::from(self.eps)).sqrt()) as f32);
            vars.push(var as f32);
        }
        let (mean, rstd) = (array(&[g.groups], means)?, array(&[g.groups], rstds)?);
        Ok(Normalized {
            y: self.normalized_cpu(x, [gamma, beta], [&mean, &rstd])?,
            mean,
            rstd,
            var: Some(array(&[g.groups], vars)?),
        })
    }

    /// `act((x − mean)·rstd·γ + β)` per sample, with the given statistics.
    fn normalized_cpu(
        &self,
        x: &ArrayViewD<'_, f32>,
        [gamma, beta]: [&ArrayViewD<'_, f32>; 2],
        [mean, rstd]: [&ArrayD<f32>; 2],
    ) -> Result<ArrayD<f32>> {
        let g = grouping(x.shape(), gamma.shape(), beta.shape())?;
        let affine: Vec<(f32, f32)> = gamma.iter().copied().zip(beta.iter().copied()).collect();
        let y = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (s, (w, b)) = (i / g.inner, affine[i % g.inner]);
                self.activation.apply((v - mean[[s]]) * rstd[[s]] * w + b)
            })
            .collect();
        array(x.shape(), y)
    }

    /// CPU reference of [`LayerNorm::backward`], `dy` at the normalised output (before any
    /// activation: `Value::layer_norm_backward` takes it through first).
    pub fn backward_cpu(
        &self,
        x: &ArrayViewD<'_, f32>,
        gamma: &ArrayViewD<'_, f32>,
        mean: &ArrayD<f32>,
        rstd: &ArrayD<f32>,
        dy: &ArrayViewD<'_, f32>,
    ) -> Result<NormGrads<ArrayD<f32>>> {
        let g = grouping(x.shape(), gamma.shape(), gamma.shape())?;
        if dy.shape() != x.shape() {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![dy.shape().to_vec(), x.shape().to_vec()],
                detail: format!("dy is {:?}, x is {:?}", dy.shape(), x.shape()),
            });
        }
        let (xs, dys): (Vec<f32>, Vec<f32>) =
            (x.iter().copied().collect(), dy.iter().copied().collect());
        let affine_shape = gamma.shape().to_vec();
        let gamma: Vec<f32> = gamma.iter().copied().collect();
        let (mut dx, mut dgamma, mut dbeta) = (
            vec![0f32; xs.len()],
            vec![0f64; g.inner],
            vec![0f64; g.inner],
        );
        for s in 0..g.groups {
            let (mu, rstd) = (mean[[s]], rstd[[s]]);
            let range = s * g.inner..(s + 1) * g.inner;
            let xhat: Vec<f64> = xs[range.clone()]
                .iter()
                .map(|&v| f64::from((v - mu) * rstd))
                .collect();
            let gy: Vec<f64> = dys[range.clone()]
                .iter()
                .zip(&gamma)
                .map(|(&d, &w)| f64::from(d) * f64::from(w))
                .collect();
            let n = g.inner as f64;
            let mean_gy = gy.iter().sum::<f64>() / n;
            let mean_gy_xhat = gy.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n;
            for k in 0..g.inner {
                dx[s * g.inner + k] =
                    (f64::from(rstd) * (gy[k] - mean_gy - xhat[k] * mean_gy_xhat)) as f32;
                dgamma[k] += f64::from(dys[s * g.inner + k]) * xhat[k];
                dbeta[k] += f64::from(dys[s * g.inner + k]);
            }
        }
        let narrow = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect();
        Ok(NormGrads {
            x: array(x.shape(), dx)?,
            gamma: array(&affine_shape, narrow(dgamma))?,
            beta: array(&affine_shape, narrow(dbeta))?,
        })
    }
}

impl Value {
    /// Layer normalisation of this value over the trailing dimensions of γ, on its device.
    pub fn layer_norm(
        &self,
        spec: &LayerNorm,
        gamma: &Value,
        beta: &Value,
    ) -> Result<Normalized<Value>> {
        Ok(match self {
            Value::Gpu(x) => spec.forward(x, gamma.gpu()?, beta.gpu()?)?.map(Value::from),
            Value::Cpu(x) => spec
                .forward_cpu(&x.view(), &gamma.cpu()?.view(), &beta.cpu()?.view())?
                .map(Value::from),
        })
    }

    /// The gradients of layer normalisation of this value `x` from `dy` (after
    /// `spec.activation`), with the per-sample `mean` and `rstd` of its forward pass.
    pub fn layer_norm_backward(
        &self,
        spec: &LayerNorm,
        [gamma, beta]: [&Value; 2],
        [mean, rstd]: [&Value; 2],
        dy: &Value,
    ) -> Result<NormGrads<Value>> {
        Ok(match self {
            Value::Gpu(x) => spec
                .backward(
                    x,
                    [gamma.gpu()?, beta.gpu()?],
                    [mean.gpu()?, rstd.gpu()?],
                    dy.gpu()?,
                )?
                .map(Value::from),
            Value::Cpu(x) => {
                let (x, gamma, dy) = (x.view(), gamma.cpu()?.view(), dy.cpu()?.view());
                let statistics = [mean.cpu()?, rstd.cpu()?];
                // Through the activation first, from the output recomputed from the saved
                // statistics.
                let dz = match spec.activation {
                    Activation::None => None,
                    activation => {
                        let affine = [&gamma, &beta.cpu()?.view()];
                        let y = spec.normalized_cpu(&x, affine, statistics)?;
                        Some(through_activation_cpu(activation, &y.view(), &dy)?)
                    }
                };
                let dz = dz.as_ref().map_or(dy, |dz| dz.view());
                let [mean, rstd] = statistics;
                spec.backward_cpu(&x, &gamma, mean, rstd, &dz)?
                    .map(Value::from)
            }
        })
    }
}
