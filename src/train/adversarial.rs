//! Adversarial examples and adversarial training: the gradient of the loss with respect to
//! the input, FGSM and PGD built on it (GPU kernels in `shaders/attack.wgsl`), and a
//! training step on clean and adversarial images together.

use ndarray::{Axis, concatenate};

use super::trainer::{StepOutput, cross_entropy, train_step_with};
use crate::error::{Error, Result};
use crate::graph::{Device, Graph, GraphOptimizer, Mode, Value};
use crate::ops::attack::SignedStep;
use crate::tensor::Tensor;

/// An attack within an L∞ ball of radius `epsilon`, keeping values in `range`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attack {
    /// One step of ε along the sign of the gradient.
    Fgsm {
        /// Radius of the ball.
        epsilon: f32,
    },
    /// `steps` steps of `alpha`, each projected back into the ball.
    Pgd {
        /// Radius of the ball.
        epsilon: f32,
        /// Size of each step.
        alpha: f32,
        /// Number of steps.
        steps: usize,
    },
}

/// `∂ cross-entropy / ∂x` of `model` in eval mode (no parameter gradients are touched).
pub fn input_gradient(model: &mut Graph, x: Value, labels: &[usize]) -> Result<Value> {
    let logits = model.forward(x, Mode::EvalWithGrad)?;
    let ce = cross_entropy(logits, labels)?;
    model.input_gradient(ce.grad_logits)
}

fn signed_step(step: SignedStep, x: &Value, grad: &Value, origin: &Value) -> Result<Value> {
    Ok(match x {
        Value::Gpu(t) => Value::Gpu(step.apply(t, grad.gpu()?, origin.gpu()?)?),
        Value::Cpu(a) => {
            Value::Cpu(step.apply_cpu(&a.view(), &grad.cpu()?.view(), &origin.cpu()?.view())?)
        }
    })
}

/// Adversarial versions of the images `x` (labelled `labels`) against `model`; values stay
/// in `range` (e.g. the normalised image of pixels 0 and 1).
pub fn attack(
    model: &mut Graph,
    x: &Value,
    labels: &[usize],
    attack: Attack,
    range: (f32, f32),
) -> Result<Value> {
    match attack {
        Attack::Fgsm { epsilon } => {
            let grad = input_gradient(model, x.duplicate()?, labels)?;
            signed_step(SignedStep::fgsm(epsilon, range), x, &grad, x)
        }
        Attack::Pgd {
            epsilon,
            alpha,
            steps,
        } => {
            if steps == 0 {
                return Err(Error::InvalidArgument {
                    op: "pgd",
                    detail: "PGD needs at least one step".into(),
                });
            }
            let step = SignedStep {
                step: alpha,
                radius: epsilon,
                range,
            };
            let mut current = x.duplicate()?;
            for _ in 0..steps {
                let grad = input_gradient(model, current.duplicate()?, labels)?;
                current = signed_step(step, &current, &grad, x)?;
            }
            Ok(current)
        }
    }
}

fn stack(a: &Value, b: &Value) -> Result<Value> {
    Ok(match a {
        Value::Gpu(t) => Value::Gpu(Tensor::concat(t, b.gpu()?)?),
        Value::Cpu(x) => Value::Cpu(concatenate(Axis(0), &[x.view(), b.cpu()?.view()]).map_err(
            |e| Error::ShapeMismatch {
                op: "stack",
                detail: e.to_string(),
            },
        )?),
    })
}

/// One adversarial training step: adversarial examples of the batch are made against the
/// current model, and the model trains on clean and adversarial images together (loss =
/// the mean over both halves). One submission on a GPU; the reported accuracy counts both.
pub fn adversarial_train_step(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    input: impl FnOnce(&Device) -> Result<Value>,
    labels: &[usize],
    kind: Attack,
    range: (f32, f32),
) -> Result<StepOutput> {
    let device = model.device().clone();
    let both: Vec<usize> = labels.iter().chain(labels).copied().collect();
    device.record(|| {
        let x = input(&device)?;
        let adversarial = attack(model, &x, labels, kind, range)?;
        let batch = stack(&x, &adversarial)?;
        // Already inside this recording: the inner step records into it too.
        train_step_with(
            model,
            optimizer,
            |_| Ok(batch),
            |logits, _| cross_entropy(logits, &both),
        )
    })
}
