//! Normalisation layers: `BatchNorm2d` (per channel, running statistics for eval) and
//! `LayerNorm` (per sample over the trailing dimensions).

use crate::error::{Error, Result};
use crate::graph::{Backward, BackwardArgs, ChannelNorm, Ctx, Forward, Layer, StateInit, Value};
use crate::nn::activation::fusable;
use crate::nn::init::InitRng;
use crate::ops::batch_norm::{self, batches_state};
use crate::ops::layer_norm;
use crate::value::Activation;

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

/// The error for a layer handed another number of state tensors than it owns.
fn state_count(layer: &'static str, owned: usize, given: usize) -> Error {
    Error::InvalidArgument {
        op: layer,
        detail: format!("owns {owned} state tensors, was given {given}"),
    }
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
                shapes: vec![shape.to_vec()],
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
        self.forward_activated(ctx, inputs, state, Activation::None)
    }

    fn absorbs_activation(&self, activation: Activation) -> bool {
        fusable(activation)
    }

    fn forward_activated(
        &self,
        ctx: Ctx,
        inputs: &[&Value],
        state: &mut [Value],
        activation: Activation,
    ) -> Result<Forward> {
        let x = inputs[0];
        let spec = batch_norm::BatchNorm2d {
            activation,
            ..self.spec
        };
        let out = match state {
            [gamma, beta, mean, var, count] if ctx.training => {
                x.batch_norm_train(&spec, [&*gamma, &*beta], mean, var, count)?
            }
            [gamma, beta, mean, var, _] => {
                x.batch_norm_eval(&spec, [&*gamma, &*beta], mean, var)?
            }
            _ => return Err(state_count("BatchNorm2d", 5, state.len())),
        };
        Ok(Forward {
            y: out.y,
            saved: vec![out.mean, out.rstd],
        })
    }

    fn eval_channel_norm<'a>(&self, state: &'a [Value]) -> Option<ChannelNorm<'a>> {
        let [gamma, beta, mean, var, _] = state else {
            return None;
        };
        Some(ChannelNorm {
            gamma,
            beta,
            mean,
            var,
            eps: self.spec.eps,
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let g = args.inputs[0].batch_norm_backward(
            &batch_norm::BatchNorm2d {
                activation: args.activation_to_take(Activation::None),
                ..self.spec
            },
            [&args.state[0], &args.state[1]],
            [&args.saved[0], &args.saved[1]],
            args.dy,
            args.ctx.training,
        )?;
        Ok(Backward {
            inputs: vec![Some(g.x)],
            state: vec![Some(g.gamma), Some(g.beta), None, None, None],
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
                shapes: vec![x.to_vec(), self.shape.clone()],
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

    fn forward(&self, ctx: Ctx, inputs: &[&Value], state: &mut [Value]) -> Result<Forward> {
        self.forward_activated(ctx, inputs, state, Activation::None)
    }

    fn absorbs_activation(&self, activation: Activation) -> bool {
        fusable(activation)
    }

    fn forward_activated(
        &self,
        _ctx: Ctx,
        inputs: &[&Value],
        state: &mut [Value],
        activation: Activation,
    ) -> Result<Forward> {
        let spec = layer_norm::LayerNorm {
            activation,
            ..self.spec
        };
        let out = inputs[0].layer_norm(&spec, &state[0], &state[1])?;
        Ok(Forward {
            y: out.y,
            saved: vec![out.mean, out.rstd],
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let g = args.inputs[0].layer_norm_backward(
            &layer_norm::LayerNorm {
                activation: args.activation_to_take(Activation::None),
                ..self.spec
            },
            [&args.state[0], &args.state[1]],
            [&args.saved[0], &args.saved[1]],
            args.dy,
        )?;
        Ok(Backward {
            inputs: vec![Some(g.x)],
            state: vec![Some(g.gamma), Some(g.beta)],
        })
    }
}
