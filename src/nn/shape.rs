//! Layers that move data without arithmetic on it: `Flatten`, `Dropout`, and `Add` (a
//! residual sum of two values).

use crate::error::Result;
use crate::graph::{Backward, BackwardArgs, Ctx, Forward, Layer, Value};
use crate::nn::activation::fusable;
use crate::ops::dropout;
use crate::value::Activation;

/// `[N, d1, d2, …]` → `[N, d1·d2·…]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flatten;

impl Layer for Flatten {
    fn describe(&self) -> String {
        "Flatten".into()
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let (n, rest) = inputs[0].split_first().unwrap_or((&0, &[]));
        Ok(vec![*n, rest.iter().product()])
    }

    fn forward(&self, _ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        let Some((&n, rest)) = inputs[0].shape().split_first() else {
            return Err(crate::Error::ShapeMismatch {
                op: "Flatten",
                shapes: vec![inputs[0].shape().to_vec()],
                detail: "the input needs a batch dimension".into(),
            });
        };
        let flat = [n, rest.iter().product()];
        Ok(Forward {
            y: inputs[0].reshaped("Flatten", &flat)?,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        Ok(Backward {
            inputs: vec![Some(args.dy.reshaped("Flatten", args.inputs[0].shape())?)],
            state: Vec::new(),
        })
    }
}

/// Inverted dropout; the mask depends on the seed and the training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout(pub dropout::Dropout);

impl Dropout {
    /// Drops each element with probability `rate` in training.
    pub fn new(rate: f32, seed: u32) -> Result<Self> {
        Ok(Self(dropout::Dropout::new(rate, seed)?))
    }

    fn apply(&self, value: &Value, ctx: Ctx) -> Result<Value> {
        value.dropout(&self.0, ctx.step, ctx.training)
    }
}

impl Layer for Dropout {
    fn describe(&self) -> String {
        format!("Dropout({})", self.0.rate)
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Ok(inputs[0].to_vec())
    }

    fn forward(&self, ctx: Ctx, inputs: &[&Value], _state: &mut [Value]) -> Result<Forward> {
        Ok(Forward {
            y: self.apply(inputs[0], ctx)?,
            saved: Vec::new(),
        })
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        // The mask is a function of (seed, step, index): the same map as forward.
        Ok(Backward {
            inputs: vec![Some(self.apply(args.dy, args.ctx)?)],
            state: Vec::new(),
        })
    }
}

/// `a + b` of two values of one shape (a residual connection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Add;

impl Layer for Add {
    fn describe(&self) -> String {
        "Add".into()
    }

    fn arity(&self) -> usize {
        2
    }

    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        if inputs[0] != inputs[1] {
            return Err(crate::Error::ShapeMismatch {
                op: "Add",
                shapes: vec![inputs[0].to_vec(), inputs[1].to_vec()],
                detail: format!(
                    "adds values of one shape, got {:?} and {:?} (a residual branch that \
                     changes channels or stride needs a downsample on the shortcut)",
                    inputs[0], inputs[1]
                ),
            });
        }
        Ok(inputs[0].to_vec())
    }

    fn forward(&self, ctx: Ctx, inputs: &[&Value], state: &mut [Value]) -> Result<Forward> {
        self.forward_activated(ctx, inputs, state, Activation::None)
    }

    fn absorbs_activation(&self, activation: Activation) -> bool {
        fusable(activation)
    }

    fn sums_inputs(&self) -> bool {
        true
    }

    fn forward_activated(
        &self,
        _ctx: Ctx,
        inputs: &[&Value],
        _state: &mut [Value],
        activation: Activation,
    ) -> Result<Forward> {
        Ok(Forward {
            y: inputs[0].add_activated(inputs[1], activation)?,
            saved: Vec::new(),
        })
    }

    fn sums_output_gradients(&self) -> bool {
        true
    }

    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward> {
        // The derivative read from the output, as for every fused activation.
        let activation = args.activation_to_take(Activation::None);
        let [da, db] = args.y.add_backward(args.dy, args.dy_more, activation)?;
        Ok(Backward {
            inputs: vec![Some(da), Some(db)],
            state: Vec::new(),
        })
    }
}
