//! Optimizers as GPU kernels (`shaders/optim.wgsl`) with CPU references, following PyTorch's
//! update rules: SGD (momentum, dampening, Nesterov), AdaGrad, Adam and AdamW, each with
//! weight decay. Parameters are updated in place.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, Zip};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An optimizer's rule and hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `p -= lr·g`, with optional momentum (PyTorch's buffer: `b = m·b + (1-dampening)·g`,
    /// `b = g` on the first step) and Nesterov's variant.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor (0 for plain SGD).
        momentum: f32,
        /// Dampening of the gradient in the momentum buffer.
        dampening: f32,
        /// Nesterov momentum.
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// `s += g²; p -= lr·g / (√s + eps)`.
    AdaGrad {
        /// Learning rate.
        lr: f32,
        /// Added to the denominator.
        eps: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// Adam with bias correction; `decoupled` makes it AdamW (decay applied to the weights).
    Adam {
        /// Learning rate.
        lr: f32,
        /// Decay of the first moment.
        beta1: f32,
        /// Decay of the second moment.
        beta2: f32,
        /// Added to the denominator.
        eps: f32,
        /// L2 penalty (Adam) or decoupled decay (AdamW).
        weight_decay: f32,
        /// AdamW.
        decoupled: bool,
    },
}

impl Optimizer {
    /// Plain SGD.
    pub fn sgd(lr: f32) -> Self {
        Self::Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// SGD with momentum.
    pub fn momentum(lr: f32, momentum: f32) -> Self {
        Self::Sgd {
            lr,
            momentum,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// AdaGrad with PyTorch's eps.
    pub fn adagrad(lr: f32) -> Self {
        Self::AdaGrad {
            lr,
            eps: 1e-10,
            weight_decay: 0.0,
        }
    }

    /// Adam with PyTorch's defaults for the betas and eps.
    pub fn adam(lr: f32) -> Self {
        Self::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }

    /// AdamW (decoupled weight decay).
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        Self::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decoupled: true,
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Self::Sgd { lr, .. } | Self::AdaGrad { lr, .. } | Self::Adam { lr, .. } => lr,
        }
    }

    /// The same rule with another learning rate (for schedules).
    pub fn with_lr(mut self, new: f32) -> Self {
        match &mut self {
            Self::Sgd { lr, .. } | Self::AdaGrad { lr, .. } | Self::Adam { lr, .. } => *lr = new,
        }
        self
    }

    fn validate(&self) -> Result<()> {
        let (lr, others) = match *self {
            Self::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                ..
            } => (lr, [momentum, dampening, weight_decay]),
            Self::AdaGrad {
                lr,
                eps,
                weight_decay,
            } => (lr, [eps, weight_decay, 0.0]),
            Self::Adam {
                lr,
                eps,
                weight_decay,
                ..
            } => (lr, [eps, weight_decay, 0.0]),
        };
        let betas_ok = match *self {
            Self::Adam { beta1, beta2, .. } => {
                (0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)
            }
            _ => true,
        };
        if !(lr.is_finite() && lr >= 0.0)
            || others.iter().any(|v| !(v.is_finite() && *v >= 0.0))
            || !betas_ok
        {
            return Err(Error::InvalidArgument {
                op: "optimizer",
                detail: format!(
                    "{self:?}: rates and decays must be finite and non-negative, betas in [0, 1)"
                ),
            });
        }
        Ok(())
    }

    /// The uniform parameters of step `t` (from 1).
    fn params(&self, total: usize, t: u32) -> OptimParams {
        let mut params = OptimParams {
            total: total as u32,
            first_step: u32::from(t == 1),
            ..OptimParams::zeroed()
        };
        match *self {
            Self::Sgd {
                lr,
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => {
                (
                    params.lr,
                    params.momentum,
                    params.dampening,
                    params.weight_decay,
                ) = (lr, momentum, dampening, weight_decay);
                params.nesterov = u32::from(nesterov);
            }
            Self::AdaGrad {
                lr,
                eps,
                weight_decay,
            } => {
                params.kind = 1;
                (params.lr, params.eps, params.weight_decay) = (lr, eps, weight_decay);
            }
            Self::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
            } => {
                params.kind = 2;
                (
                    params.lr,
                    params.beta1,
                    params.beta2,
                    params.eps,
                    params.weight_decay,
                ) = (lr, beta1, beta2, eps, weight_decay);
                params.decoupled = u32::from(decoupled);
                let t = i32::try_from(t).unwrap_or(i32::MAX);
                params.step_size = (f64::from(lr) / (1.0 - f64::from(beta1).powi(t))) as f32;
                params.bias_correction2_sqrt = (1.0 - f64::from(beta2).powi(t)).sqrt() as f32;
            }
        }
        params
    }

    /// CPU reference: one update of `param` at step `t` (from 1) with two state arrays
    /// (zeros before the first step), element by element as the kernel does.
    pub fn update_cpu(
        &self,
        t: u32,
        param: &mut ArrayD<f32>,
        grad: &ArrayD<f32>,
        state: &mut [ArrayD<f32>; 2],
    ) -> Result<()> {
        self.validate()?;
        if param.shape() != grad.shape() || state.iter().any(|s| s.shape() != param.shape()) {
            return Err(Error::ShapeMismatch {
                op: "optimizer",
                detail: format!(
                    "param {:?} and grad {:?} (and state) must match",
                    param.shape(),
                    grad.shape()
                ),
            });
        }
        let p = self.params(param.len(), t);
        let [s1, s2] = state;
        Zip::from(param)
            .and(grad)
            .and(s1)
            .and(s2)
            .for_each(|w, &g, s1, s2| {
                let mut g = g;
                if p.decoupled != 0 {
                    *w *= 1.0 - p.lr * p.weight_decay;
                } else if p.weight_decay != 0.0 {
                    g += p.weight_decay * *w;
                }
                match p.kind {
                    0 => {
                        if p.momentum != 0.0 {
                            let buf = if p.first_step != 0 {
                                g
                            } else {
                                p.momentum * *s1 + (1.0 - p.dampening) * g
                            };
                            *s1 = buf;
                            g = if p.nesterov != 0 {
                                g + p.momentum * buf
                            } else {
                                buf
                            };
                        }
                        *w -= p.lr * g;
                    }
                    1 => {
                        *s1 += g * g;
                        *w -= p.lr * g / (s1.sqrt() + p.eps);
                    }
                    _ => {
                        *s1 += (1.0 - p.beta1) * (g - *s1);
                        *s2 = *s2 * p.beta2 + (1.0 - p.beta2) * g * g;
                        *w -= p.step_size * *s1 / (s2.sqrt() / p.bias_correction2_sqrt + p.eps);
                    }
                }
            });
        Ok(())
    }
}

/// Mirrors `Params` in shaders/optim.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct OptimParams {
    total: u32,
    kind: u32,
    first_step: u32,
    nesterov: u32,
    lr: f32,
    momentum: f32,
    dampening: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decoupled: u32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    _pad: [u32; 2],
}

/// An optimizer rule with its per-parameter state (two tensors per parameter, created zeroed
/// on the first step): on the GPU as [`GpuOptimizer`], on the host as [`CpuOptimizer`].
pub struct OptimizerState<T> {
    rule: Optimizer,
    step: u32,
    state: Vec<[T; 2]>,
}

/// An optimizer with its per-parameter state on the GPU.
pub type GpuOptimizer = OptimizerState<Tensor>;

/// The CPU reference of [`GpuOptimizer`]: the same rule and state, on host arrays.
pub type CpuOptimizer = OptimizerState<ArrayD<f32>>;

impl<T> OptimizerState<T> {
    /// A fresh optimizer (state is created, zeroed, on the first step).
    pub fn new(rule: Optimizer) -> Result<Self> {
        rule.validate()?;
        Ok(Self {
            rule,
            step: 0,
            state: Vec::new(),
        })
    }

    /// Changes the learning rate from the next step on (the state is kept).
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        let rule = self.rule.with_lr(lr);
        rule.validate()?;
        self.rule = rule;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// The state tensors of parameter `index` (momentum/sum/exp_avg, exp_avg_sq).
    pub fn state(&self, index: usize) -> Option<&[T; 2]> {
        self.state.get(index)
    }

    /// Fails unless there is one gradient per parameter and, after the first step, the same
    /// number of parameters as before.
    fn check_counts(&self, params: usize, grads: usize) -> Result<()> {
        if params != grads || (!self.state.is_empty() && self.state.len() != params) {
            return Err(Error::ShapeMismatch {
                op: "optimizer",
                detail: format!(
                    "{params} parameters, {grads} gradients, state for {}",
                    self.state.len()
                ),
            });
        }
        Ok(())
    }
}

impl GpuOptimizer {
    /// Updates every parameter in place from its gradient; the same parameters, in the same
    /// order, must be passed at every step.
    pub fn step(&mut self, params: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        self.check_counts(params.len(), grads.len())?;
        for (p, g) in params.iter().zip(grads) {
            if p.shape() != g.shape() {
                return Err(Error::ShapeMismatch {
                    op: "optimizer",
                    detail: format!(
                        "parameter {:?} has a gradient of shape {:?}",
                        p.shape(),
                        g.shape()
                    ),
                });
            }
        }
        if self.state.is_empty() {
            for p in params {
                self.state.push([
                    Tensor::full(p.gpu(), p.shape(), 0.0)?,
                    Tensor::full(p.gpu(), p.shape(), 0.0)?,
                ]);
            }
        }
        self.step += 1;
        let Some(first) = params.first() else {
            return Ok(());
        };
        let gpu = first.gpu();
        let pipeline = gpu.pipeline("optim", "main", || {
            include_str!("../shaders/optim.wgsl").into()
        })?;
        gpu.run_pass("optimizer step", |pass| {
            for ((p, g), [s1, s2]) in params.iter().zip(grads).zip(&self.state) {
                // Whole vec4s: see shaders/optim.wgsl.
                let vec4s = p.len().div_ceil(4);
                let params = self.rule.params(vec4s, self.step);
                let bindings = [p, g, s1, s2].map(|t| t.binding_vec4());
                gpu.encode(
                    pass,
                    &pipeline,
                    bytemuck::bytes_of(&params),
                    &bindings,
                    (vec4s as u64).div_ceil(256),
                )?;
            }
            Ok(())
        })
    }
}

impl CpuOptimizer {
    /// Updates every parameter in place; the same parameters, in the same order, must be
    /// passed at every step.
    pub fn step(&mut self, params: &mut [&mut ArrayD<f32>], grads: &[&ArrayD<f32>]) -> Result<()> {
        self.check_counts(params.len(), grads.len())?;
        if self.state.is_empty() {
            self.state = params
                .iter()
                .map(|p| [ArrayD::zeros(p.raw_dim()), ArrayD::zeros(p.raw_dim())])
                .collect();
        }
        self.step += 1;
        for ((p, g), state) in params.iter_mut().zip(grads).zip(&mut self.state) {
            self.rule.update_cpu(self.step, p, g, state)?;
        }
        Ok(())
    }
}
