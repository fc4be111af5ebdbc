//! Adversarial examples and adversarial training: the gradient of the loss with respect to
//! the input, FGSM and PGD built on it (GPU kernels in `shaders/attack.wgsl`), and a
//! training step on clean and adversarial images together.

use super::trainer::{StepOutput, cross_entropy, train_step_with};
use crate::error::{Error, Result};
use crate::graph::{Device, Graph, GraphOptimizer, Mode, Value};
use crate::ops::attack::SignedStep;

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
            x.signed_step(&SignedStep::fgsm(epsilon, range), &grad, x)
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
                current = current.signed_step(&step, &grad, x)?;
            }
            Ok(current)
        }
    }
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
        let batch = x.concat(&adversarial)?;
        // Already inside this recording: the inner step records into it too.
        train_step_with(
            model,
            optimizer,
            |_| Ok(batch),
            |logits, _| cross_entropy(logits, &both),
        )
    })
}

/// Two models trained against each other (a generator and a discriminator): the
/// discriminator's step. It learns to tell `real` images (class 1) from the generator's
/// samples of `noise` (class 0); the generator runs forward only. One submission on a GPU.
pub fn discriminator_step(
    discriminator: &mut Graph,
    generator: &mut Graph,
    optimizer: &mut GraphOptimizer,
    real: impl FnOnce(&Device) -> Result<Value>,
    noise: impl FnOnce(&Device) -> Result<Value>,
) -> Result<StepOutput> {
    let device = discriminator.device().clone();
    device.record(|| {
        let real = real(&device)?;
        let fake = generator.forward(noise(&device)?, Mode::Eval)?;
        // The generator's output under the real images' shape.
        let fake = fake.reshaped("discriminator_step", real.shape())?;
        let labels: Vec<usize> = (0..real.shape()[0])
            .map(|_| 1)
            .chain((0..fake.shape()[0]).map(|_| 0))
            .collect();
        let batch = real.concat(&fake)?;
        train_step_with(
            discriminator,
            optimizer,
            |_| Ok(batch),
            |logits, _| cross_entropy(logits, &labels),
        )
    })
}

/// The generator's step: its samples of `noise` go through the discriminator (eval mode,
/// not updated), the loss is the discriminator's cross-entropy against class `target` (1,
/// "real"), and its gradient flows back through the discriminator's input into the
/// generator, which the optimizer updates. `correct` counts the samples that fooled the
/// discriminator. One submission on a GPU.
pub fn generator_step(
    generator: &mut Graph,
    discriminator: &mut Graph,
    optimizer: &mut GraphOptimizer,
    noise: impl FnOnce(&Device) -> Result<Value>,
    target: usize,
) -> Result<StepOutput> {
    let device = generator.device().clone();
    device.record(|| {
        let fake = generator
            .forward(noise(&device)?, Mode::Train)?
            .duplicate()?;
        let labels = vec![target; fake.shape()[0]];
        let logits = discriminator.forward(fake, Mode::EvalWithGrad)?;
        let ce = cross_entropy(logits, &labels)?;
        let grad = discriminator.input_gradient(ce.grad_logits)?;
        generator.backward(grad)?;
        generator.update(optimizer)?;
        Ok(StepOutput {
            loss: ce.loss,
            correct: ce.correct,
        })
    })
}
