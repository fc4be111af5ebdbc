//! `Conv2d` layer: OIHW weights `[out, in/groups, kh, kw]` and a bias, with an optional fused
//! activation (applied in the matmul epilogue; its gradient is taken from the output).

use crate::error::{Error, Result};
use crate::graph::{
    Backward, BackwardArgs, ChannelNorm, Ctx, Forward, Layer, MaxPool, PooledForward, StateInit,
    Value,
};
use crate::nn::activation::{check_fused, fusable};
use crate::nn::init::{Init, InitRng};
use crate::ops::conv2d::{self, Padding};
use crate::ops::pool2d::Pool2d;
use crate::value::Activation;

/// A 2-D convolution layer.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (filters).
    pub out_channels: usize,
    /// Kernel size `(kh, kw)`.
    pub kernel: (usize, usize),
    /// Stride, padding, dilation and fused activation.
    pub spec: conv2d::Conv2d,
    /// Weight initialisation.
    pub init: Init,
    /// Whether the layer has a bias (not needed before batch norm, which removes it).
    pub bias: bool,
}

impl Conv2d {
    /// `in_channels → out_channels` with a `kh × kw` kernel, stride 1, no padding.
    pub fn new(in_channels: usize, out_channels: usize, kernel: (usize, usize)) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            spec: conv2d::Conv2d::default(),
            init: Init::default(),
            bias: true,
        }
    }

    /// Without a bias (before batch norm, where a bias has no effect).
    pub fn no_bias(mut self) -> Self {
        self.bias = false;
        self
    }

    /// With this stride.
    pub fn stride(mut self, stride: (usize, usize)) -> Self {
        self.spec.stride = stride;
        self
    }

    /// With this padding (`Padding::Same` keeps the size).
    pub fn padding(mut self, padding: Padding) -> Self {
        self.spec.padding = padding;
        self
    }

    /// With `groups` channel groups (PyTorch's `groups`): each filter sees `in/groups`
    /// channels. `groups = in_channels` is a depthwise convolution (MobileNet), with
    /// `out_channels / in_channels` filters per channel.
    pub fn groups(mut self, groups: usize) -> Self {
        self.spec.groups = groups;
        self
    }

    /// With this activation fused after the bias.
    pub fn activation(mut self, activation: Activation) -> Self {
        self.spec.activation = activation;
        self
    }

    /// With this weight initialisation.
    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
}

impl Layer for Conv2d {
    fn output_activation(&self) -> Activation {
        self.spec.activation
    }

    fn describe(&self) -> String {
        let groups = match self.spec.groups {
            1 => String::new(),
            g if g == self.in_channels => ", depthwise".into(),
            g => format!(", {g} groups"),
        };
        format!(
            "Conv2d({}→{}, {}×{}{groups})",
            self.in_channels, self.out_channels, self.kernel.0, self.kernel.1
        )
    }

    fn fit_input(&mut self, input: &[usize]) -> Result<()> {
        let groups = self.spec.groups;
        if groups == 0
            || !self.in_channels.is_multiple_of(groups)
            || !self.out_channels.is_multiple_of(groups)
        {
            return Err(Error::InvalidArgument {
                op: "Conv2d",
                detail: format!(
                    "groups {groups} must be at least 1 and divide both in_channels {} and out_channels {}",
                    self.in_channels, self.out_channels
                ),
            });
        }
        match input {
            [_, c, _, _] if *c == self.in_channels => Ok(()),
            _ => Err(Error::ShapeMismatch {
                op: "Conv2d",
                shapes: vec![input.to_vec()],
                detail: format!(
                    "built for [N, {}, H, W] inputs, the layer before gives {input:?}",
                    self.in_channels
                ),
            }),
        }
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let per_group = self.in_channels / self.spec.groups.max(1);
        let weight = [self.out_channels, per_group, self.kernel.0, self.kernel.1];
        Ok(self.spec.shape(inputs[0], &weight, None)?.output().to_vec())
    }

    fn init_state(&self, rng: &mut dyn FnMut(&'static str) -> InitRng) -> Result<Vec<StateInit>> {
        check_fused(self.spec.activation, "Conv2d")?;
        let (kh, kw) = self.kernel;
        let taps = kh * kw;
        // PyTorch's fans: a filter reads in/groups channels.
        let per_group = self.in_channels / self.spec.groups.max(1);
        let (weight, bias) = self.init.weight_and_bias(
            rng,
            &[self.out_channels, per_group, kh, kw],
            self.out_channels,
            (per_group * taps, self.out_channels * taps),
        )?;
        let mut state = vec![StateInit {
            name: "weight",
            value: weight,
            trainable: true,
            counter: false,
        }];
        if self.bias {
            state.push(StateInit {
                name: "bias",
                value: bias,
                trainable: true,
                counter: false,
            });
        }
        Ok(state)
    }

    fn forward(&self, ctx: Ctx, inputs: &[&Value], state: &mut [Value]) -> Result<Forward> {
        self.forward_activated(ctx, inputs, state, self.spec.activation)
    }

    fn absorbs_activation(&self, activation: Activation) -> bool {
        self.spec.activation == Activation::None && fusable(activation)
    }

    fn forward_activated(
        &self,
        ctx: Ctx,
        inputs: &[&Value],
        state: &mut [Value],
        activation: Activation,
    ) -> Result<Forward> {
        let spec = conv2d::Conv2d {
            activation,
            ..self.spec
        };
        // In training, Winograd's input tiles where the weight gradient transforms the same.
        let (y, saved) = if ctx.training {
            let weights = (&state[0], state.get(1));
            inputs[0].conv2d_saving(&spec, weights, ctx.input_gradient)?
        } else {
            (inputs[0].conv2d(&spec, &state[0], state.get(1))?, None)
        };
        Ok(Forward {
            y,
            saved: saved.into_iter().collect(),
        })
    }

    fn takes_pooled_gradient(&self) -> bool {
        true
    }

    fn forward_pooled(
        &self,
        ctx: Ctx,
        inputs: &[&Value],
        state: &mut [Value],
        pool: &MaxPool,
    ) -> Result<Option<PooledForward>> {
        let pool = max_pool2d(pool);
        // A training step's forward kernel is planned with its backward pass in view.
        let training = ctx.training.then_some(ctx.input_gradient);
        let weights = (&state[0], state.get(1));
        let fused =
            inputs[0].conv2d_pooled(&self.spec, weights, &pool, (training, ctx.backward))?;
        Ok(fused.map(|(stand_in, pooled)| PooledForward {
            producer: Forward {
                y: stand_in,
                saved: Vec::new(),
            },
            pooled: Forward {
                y: pooled.y,
                saved: pooled.argmax.into_iter().collect(),
            },
        }))
    }

    fn fold_channel_norm(
        &self,
        state: &[Value],
        norm: &ChannelNorm<'_>,
    ) -> Result<Option<Vec<Value>>> {
        // A norm after the activation is not a map of the filters.
        if self.spec.activation != Activation::None {
            return Ok(None);
        }
        let statistics = [norm.gamma, norm.beta, norm.mean, norm.var];
        let (weight, bias) = state[0].fold_batch_norm(state.get(1), statistics, norm.eps)?;
        Ok(Some(vec![weight, bias]))
    }

    fn forward_folded(
        &self,
        inputs: &[&Value],
        folded: &mut Vec<Value>,
        residual: Option<&Value>,
        activation: Activation,
    ) -> Result<Value> {
        let spec = conv2d::Conv2d {
            activation,
            ..self.spec
        };
        // [weight, bias, and the filters an earlier pass transformed, if any].
        let (y, made) = match &folded[..] {
            [weight, bias, filters @ ..] => {
                let state = (weight, Some(bias));
                inputs[0].conv2d_reusing(&spec, state, filters.first(), residual)?
            }
            _ => {
                return Err(Error::InvalidArgument {
                    op: "Conv2d",
                    detail: format!(
                        "a folded convolution has a weight and a bias, got {} tensors",
                        folded.len()
                    ),
                });
            }
        };
        if let Some(filters) = made {
            folded.truncate(2);
            folded.push(filters);
        }
        Ok(y)
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        // The activation the gradient still has to go through: none if the layer reading y
        // took it (see `Layer::takes_input_activation`).
        let spec = conv2d::Conv2d {
            activation: args.activation_to_take(self.spec.activation),
            ..self.spec
        };
        // State is the weight, then the bias if the layer has one.
        let has_bias = args.state.len() > 1;
        let wanted = (args.needs.inputs, has_bias);
        let (dx, dweight, dbias) = match &args.dy_pooled {
            Some(pooled) => args.inputs[0].conv2d_backward_pooled(
                &spec,
                (&args.state[0], args.y),
                &max_pool2d(&pooled.pool),
                (args.dy, pooled.y, pooled.argmax, pooled.activation),
                args.saved.first(),
                wanted,
            )?,
            None => args.inputs[0].conv2d_backward_saved(
                &spec,
                (&args.state[0], args.y, args.dy),
                args.saved.first(),
                wanted,
            )?,
        };
        Ok(Backward {
            inputs: vec![dx.filter(|_| args.needs.inputs)],
            state: [Some(dweight), dbias]
                .into_iter()
                .take(args.state.len())
                .collect(),
        })
    }
}

/// The graph's max pooling as the op's.
fn max_pool2d(pool: &MaxPool) -> Pool2d {
    Pool2d {
        kernel: pool.kernel,
        stride: pool.stride,
        padding: pool.padding,
        dilation: pool.dilation,
        ceil_mode: pool.ceil_mode,
        ..Pool2d::max(pool.kernel)
    }
}
