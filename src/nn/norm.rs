//! Normalisation layers: `BatchNorm2d` (per channel, running statistics for eval) and
//! `LayerNorm` (per sample over the trailing dimensions).

use crate::error::{Error, Result};
use crate::graph::{Backward, BackwardArgs, Ctx, Forward, Layer, StateInit, Value};
use crate::nn::init::InitRng;
use crate::ops::batch_norm::{self, BatchNormCpu, batches_state, batches_tracked};
use crate::ops::layer_norm;

fn state(
    rng: &mut dyn FnMut(&'static str) -> InitRng,
    name: &'static str,
    shape: &[usize],
    fill: f32,
    trainable: bool,
) -> Result<StateInit> {
    Ok(StateInit {
        name,
        value: rng(name).filled(shape, fill)?,
        trainable,
        counter: false,
    })
}

fn one_d(value: &Value) -> Result<ndarray::ArrayView1<'_, f32>> {
    value
        .cpu()?
        .view()
        .into_dimensionality()
        .map_err(|e| crate::Error::ShapeMismatch {
            op: "batch norm",
            detail: e.to_string(),
        })
}

/// Batch normalisation over `[N, C, H, W]` per channel; state `weight` (γ), `bias` (β),
/// `running_mean`, `running_var` and `num_batches_tracked` (int64 in checkpoints), named and
/// updated as in PyTorch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm2d {
    /// Channels.
    pub channels: usize,
    /// eps and momentum.
    pub spec: batch_norm::BatchNorm2d,
}

impl BatchNorm2d {
    /// Over `channels` channels, PyTorch's eps and momentum.
    pub fn new(channels: usize) -> Self {
        Self {
            channels,
            spec: batch_norm::BatchNorm2d::default(),
        }
    }

    /// With this momentum; `None` keeps cumulative averages (PyTorch's `momentum=None`).
    pub fn momentum(mut self, momentum: Option<f32>) -> Self {
        self.spec.momentum = momentum;
        self
    }

    /// With this eps.
    pub fn eps(mut self, eps: f32) -> Self {
        self.spec.eps = eps;
        self
    }
}

impl Layer for BatchNorm2d {
    fn describe(&self) -> String {
        format!("BatchNorm2d({})", self.channels)
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        match inputs[0] {
            [_, c, _, _] if *c == self.channels => Ok(inputs[0].to_vec()),
            shape => Err(Error::ShapeMismatch {
                op: "BatchNorm2d",
                detail: format!(
                    "built for [N, {}, H, W] inputs, the layer before gives {shape:?}",
                    self.channels
                ),
            }),
        }
    }

    fn init_state(&self, rng: &mut dyn FnMut(&'static str) -> InitRng) -> Result<Vec<StateInit>> {
        let c = [self.channels];
        Ok(vec![
            state(rng, "weight", &c, 1.0, true)?,
            state(rng, "bias", &c, 0.0, true)?,
            state(rng, "running_mean", &c, 0.0, false)?,
            state(rng, "running_var", &c, 1.0, false)?,
            StateInit {
                name: "num_batches_tracked",
                value: batches_state(0),
                trainable: false,
                counter: true,
            },
        ])
    }

    fn forward(&self, ctx: Ctx, inputs: &[&Value], state: &mut [Value]) -> Result<Forward> {
        let out = match inputs[0] {
            Value::Gpu(x) => {
                let [g, b, m, v, count] = [0, 1, 2, 3, 4].map(|i| state[i].gpu());
                let out = if ctx.training {
                    self.spec.forward_train(x, g?, b?, m?, v?, count?)?
                } else {
                    self.spec.forward_eval(x, g?, b?, m?, v?)?
                };
                [out.y, out.mean, out.rstd].map(Value::Gpu)
            }
            Value::Cpu(x) => {
                let (g, b, m, v) = (
                    one_d(&state[0])?,
                    one_d(&state[1])?,
                    one_d(&state[2])?,
                    one_d(&state[3])?,
                );
                let out = if ctx.training {
                    let before = batches_tracked(state[4].cpu()?);
                    let (out, mean, var) =
                        BatchNormCpu::forward_train(&self.spec, &x.view(), &g, &b, &m, &v, before)?;
                    state[2] = Value::Cpu(mean.into_dyn());
                    state[3] = Value::Cpu(var.into_dyn());
                    state[4] = Value::Cpu(batches_state(before.saturating_add(1)));
                    out
                } else {
                    BatchNormCpu::forward_eval(&self.spec, &x.view(), &g, &b, &m, &v)?
                };
                [out.y, out.mean, out.rstd].map(Value::Cpu)
            }
        };
        let [y, mean, rstd] = out;
        Ok(Forward {
            y,
            saved: vec![mean, rstd],
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let (x, gamma, saved, training) = (
            args.inputs[0],
            &args.state[0],
            args.saved,
            args.ctx.training,
        );
        let [dx, dgamma, dbeta] = match x {
            Value::Gpu(x) => {
                let g = self.spec.backward(
                    x,
                    gamma.gpu()?,
                    saved[0].gpu()?,
                    saved[1].gpu()?,
                    args.dy.gpu()?,
                    training,
                )?;
                [g.x, g.gamma, g.beta].map(Value::Gpu)
            }
            Value::Cpu(x) => {
                let g = BatchNormCpu::backward(
                    &x.view(),
                    &one_d(gamma)?,
                    &one_d(&saved[0])?,
                    &one_d(&saved[1])?,
                    &args.dy.cpu()?.view(),
                    training,
                )?;
                [g.x, g.gamma, g.beta].map(Value::Cpu)
            }
        };
        Ok(Backward {
            inputs: vec![Some(dx)],
            state: vec![Some(dgamma), Some(dbeta), None, None, None],
        })
    }
}

/// Layer normalisation over the trailing dimensions `shape` (e.g. `[C, H, W]`); state
/// `weight` (γ) and `bias` (β) of that shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// The normalised trailing dimensions.
    pub shape: Vec<usize>,
    /// eps.
    pub spec: layer_norm::LayerNorm,
}

impl LayerNorm {
    /// Normalising over the trailing dimensions `shape`.
    pub fn new(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            spec: layer_norm::LayerNorm::default(),
        }
    }
}

impl Layer for LayerNorm {
    fn describe(&self) -> String {
        format!("LayerNorm({:?})", self.shape)
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let x = inputs[0];
        if x.len() <= self.shape.len() || !x.ends_with(&self.shape) {
            return Err(Error::ShapeMismatch {
                op: "LayerNorm",
                detail: format!(
                    "normalises trailing dimensions {:?}, the layer before gives {x:?}",
                    self.shape
                ),
            });
        }
        Ok(x.to_vec())
    }

    fn init_state(&self, rng: &mut dyn FnMut(&'static str) -> InitRng) -> Result<Vec<StateInit>> {
        Ok(vec![
            state(rng, "weight", &self.shape, 1.0, true)?,
            state(rng, "bias", &self.shape, 0.0, true)?,
        ])
    }

    fn forward(&self, _ctx: Ctx, inputs: &[&Value], state: &mut [Value]) -> Result<Forward> {
        let [y, mean, rstd] = match inputs[0] {
            Value::Gpu(x) => {
                let out = self.spec.forward(x, state[0].gpu()?, state[1].gpu()?)?;
                [out.y, out.mean, out.rstd].map(Value::Gpu)
            }
            Value::Cpu(x) => {
                let out = self.spec.forward_cpu(
                    &x.view(),
                    &state[0].cpu()?.view(),
                    &state[1].cpu()?.view(),
                )?;
                [out.y, out.mean, out.rstd].map(Value::Cpu)
            }
        };
        Ok(Forward {
            y,
            saved: vec![mean, rstd],
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let (gamma, saved) = (&args.state[0], args.saved);
        let [dx, dgamma, dbeta] = match args.inputs[0] {
            Value::Gpu(x) => {
                let g = self.spec.backward(
                    x,
                    gamma.gpu()?,
                    saved[0].gpu()?,
                    saved[1].gpu()?,
                    args.dy.gpu()?,
                )?;
                [g.x, g.gamma, g.beta].map(Value::Gpu)
            }
            Value::Cpu(x) => {
                let g = self.spec.backward_cpu(
                    &x.view(),
                    &gamma.cpu()?.view(),
                    saved[0].cpu()?,
                    saved[1].cpu()?,
                    &args.dy.cpu()?.view(),
                )?;
                [g.x, g.gamma, g.beta].map(Value::Cpu)
            }
        };
        Ok(Backward {
            inputs: vec![Some(dx)],
            state: vec![Some(dgamma), Some(dbeta)],
        })
    }
}
