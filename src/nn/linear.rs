//! `Linear` layer: `act(x·Wᵀ + b)` with `W` `[out, in]` as in PyTorch.

use crate::error::{Error, Result};
use crate::graph::{Backward, BackwardArgs, Ctx, Forward, Layer, StateInit, Value};
use crate::nn::activation::{check_fused, fusable};
use crate::nn::init::{Init, InitRng};
use crate::value::Activation;

/// A fully connected layer on `[N, in]` inputs.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Activation fused after the bias.
    pub activation: Activation,
    /// Weight initialisation.
    pub init: Init,
}

impl Linear {
    /// `in_features → out_features`, no activation.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        Self {
            in_features,
            out_features,
            activation: Activation::None,
            init: Init::default(),
        }
    }

    /// `? → out_features`: the input size is taken from the model's input shape when it is
    /// built with `Sequential::build_for`.
    pub fn lazy(out_features: usize) -> Self {
        Self::new(0, out_features)
    }

    /// With this activation fused after the bias.
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// With this weight initialisation.
    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
}

impl Layer for Linear {
    fn describe(&self) -> String {
        format!("Linear({}→{})", self.in_features, self.out_features)
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        // `fit_input` has checked the input is [N, in_features].
        Ok(vec![inputs[0][0], self.out_features])
    }

    fn fit_input(&mut self, input: &[usize]) -> Result<()> {
        let features = match input {
            [_, features] => *features,
            _ => {
                return Err(Error::ShapeMismatch {
                    op: "Linear",
                    shapes: vec![input.to_vec()],
                    detail: format!(
                        "the input is {input:?}; a linear layer takes [N, features]: put a \
                         Flatten before it"
                    ),
                });
            }
        };
        if self.in_features == 0 {
            self.in_features = features;
        } else if self.in_features != features {
            return Err(Error::ShapeMismatch {
                op: "Linear",
                shapes: vec![input.to_vec()],
                detail: format!(
                    "built for {} inputs, the layer before gives {features} (input {input:?}); \
                     use Linear::new({features}, {}) or Linear::lazy({})",
                    self.in_features, self.out_features, self.out_features
                ),
            });
        }
        Ok(())
    }

    fn needs_input_shape(&self) -> bool {
        self.in_features == 0
    }

    fn init_state(&self, rng: &mut dyn FnMut(&'static str) -> InitRng) -> Result<Vec<StateInit>> {
        check_fused(self.activation, "Linear")?;
        let (weight, bias) = self.init.weight_and_bias(
            rng,
            &[self.out_features, self.in_features],
            self.out_features,
            (self.in_features, self.out_features),
        )?;
        Ok(vec![
            StateInit {
                name: "weight",
                value: weight,
                trainable: true,
                counter: false,
            },
            StateInit {
                name: "bias",
                value: bias,
                trainable: true,
                counter: false,
            },
        ])
    }

    fn forward(&self, ctx: Ctx, inputs: &[&Value], state: &mut [Value]) -> Result<Forward> {
        self.forward_activated(ctx, inputs, state, self.activation)
    }

    fn is_plain_linear(&self) -> bool {
        self.activation == Activation::None
    }

    fn output_activation(&self) -> Activation {
        self.activation
    }

    fn takes_bias_gradient(&self) -> bool {
        true
    }

    fn absorbs_activation(&self, activation: Activation) -> bool {
        self.activation == Activation::None && fusable(activation)
    }

    fn forward_activated(
        &self,
        _ctx: Ctx,
        inputs: &[&Value],
        state: &mut [Value],
        activation: Activation,
    ) -> Result<Forward> {
        Ok(Forward {
            y: inputs[0].linear(&state[0], Some(&state[1]), activation)?,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        let activation = args.activation_to_take(self.activation);
        let g = match args.dy_sum.filter(|_| activation == Activation::None) {
            Some(sum) => args.inputs[0].linear_backward_summed(&args.state[0], args.dy, sum)?,
            None => args.inputs[0].linear_backward(&args.state[0], args.y, args.dy, activation)?,
        };
        Ok(Backward {
            inputs: vec![Some(g.x).filter(|_| args.needs.inputs)],
            state: vec![Some(g.weight), Some(g.bias)],
        })
    }
}
