//! Optimizers as GPU kernels (`shaders/optim.wgsl`) with CPU references, following PyTorch's
//! update rules and options: SGD (momentum, dampening, Nesterov), AdaGrad (lr_decay,
//! initial_accumulator_value), Adam, AdamW and AMSGrad, each with weight decay. Parameters are
//! updated in place; the state has PyTorch's names and can be saved and restored.

use std::fmt::Write;

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, IxDyn, Zip};

use crate::error::{Error, Result};
use crate::gpu::Generated;
use crate::gpu::shared::{optimizer_kind, workgroups};
use crate::tensor::Tensor;
use crate::value::{Device, Value, mixed_devices};

/// SGD: `p -= lr·g`, with optional momentum (PyTorch's buffer: `b = m·b + (1-dampening)·g`,
/// `b = g` on the first step), Nesterov's variant and weight decay. Build it with
/// [`Optimizer::sgd`] and the methods below, as PyTorch's keyword arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor (0 for plain SGD).
    pub momentum: f32,
    /// Dampening of the gradient in the momentum buffer.
    pub dampening: f32,
    /// Nesterov momentum (needs momentum and no dampening, as in PyTorch).
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
}

impl Sgd {
    /// With this momentum factor.
    pub fn momentum(self, momentum: f32) -> Self {
        Self { momentum, ..self }
    }

    /// With this dampening of the momentum buffer's gradient term.
    pub fn dampening(self, dampening: f32) -> Self {
        Self { dampening, ..self }
    }

    /// With Nesterov momentum on or off.
    pub fn nesterov(self, nesterov: bool) -> Self {
        Self { nesterov, ..self }
    }

    /// With this L2 penalty.
    pub fn weight_decay(self, weight_decay: f32) -> Self {
        Self {
            weight_decay,
            ..self
        }
    }
}

/// AdaGrad: `s += g²; p -= clr·g / (√s + eps)` with `clr = lr / (1 + (t-1)·lr_decay)` and
/// `s` starting at `initial_accumulator_value`, as PyTorch's `Adagrad`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaGrad {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the learning rate with the step count.
    pub lr_decay: f32,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
    /// The sum of squares before the first step.
    pub initial_accumulator_value: f32,
    /// Added to the denominator.
    pub eps: f32,
}

impl AdaGrad {
    /// With this learning-rate decay.
    pub fn lr_decay(self, lr_decay: f32) -> Self {
        Self { lr_decay, ..self }
    }

    /// With this L2 penalty.
    pub fn weight_decay(self, weight_decay: f32) -> Self {
        Self {
            weight_decay,
            ..self
        }
    }

    /// With the sum of squares starting at this value.
    pub fn initial_accumulator_value(self, initial_accumulator_value: f32) -> Self {
        Self {
            initial_accumulator_value,
            ..self
        }
    }

    /// With this eps.
    pub fn eps(self, eps: f32) -> Self {
        Self { eps, ..self }
    }
}

/// Adam with bias correction (`decoupled`: AdamW, the decay applied to the weights), and
/// optionally AMSGrad (the running maximum of the second moment in the denominator).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// Decays of the first and second moments.
    pub betas: (f32, f32),
    /// Added to the denominator.
    pub eps: f32,
    /// L2 penalty (Adam) or decoupled decay (AdamW).
    pub weight_decay: f32,
    /// AMSGrad.
    pub amsgrad: bool,
    /// AdamW.
    pub decoupled: bool,
}

impl Adam {
    /// With these moment decays.
    pub fn betas(self, beta1: f32, beta2: f32) -> Self {
        Self {
            betas: (beta1, beta2),
            ..self
        }
    }

    /// With this eps.
    pub fn eps(self, eps: f32) -> Self {
        Self { eps, ..self }
    }

    /// With this weight decay (L2 for Adam, decoupled for AdamW).
    pub fn weight_decay(self, weight_decay: f32) -> Self {
        Self {
            weight_decay,
            ..self
        }
    }

    /// With AMSGrad on or off.
    pub fn amsgrad(self, amsgrad: bool) -> Self {
        Self { amsgrad, ..self }
    }
}

/// An optimizer's rule and hyper-parameters: one of [`Sgd`], [`AdaGrad`], [`Adam`], each
/// built from its constructor here with methods named as PyTorch's arguments:
///
/// ```
/// use wgcnn::Optimizer;
///
/// let sgd = Optimizer::sgd(0.1).momentum(0.9).nesterov(true).weight_decay(5e-4);
/// let adam = Optimizer::adam(1e-3).betas(0.9, 0.99).eps(1e-6).amsgrad(true);
/// let adagrad = Optimizer::adagrad(0.1).lr_decay(1e-3).initial_accumulator_value(0.1);
/// assert_eq!(Optimizer::from(adam).state_names(), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]);
/// # let _ = (sgd, adagrad);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// SGD with momentum, dampening, Nesterov and weight decay.
    Sgd(Sgd),
    /// AdaGrad.
    AdaGrad(AdaGrad),
    /// Adam, AdamW, AMSGrad.
    Adam(Adam),
}

impl From<Sgd> for Optimizer {
    fn from(rule: Sgd) -> Self {
        Self::Sgd(rule)
    }
}

impl From<AdaGrad> for Optimizer {
    fn from(rule: AdaGrad) -> Self {
        Self::AdaGrad(rule)
    }
}

impl From<Adam> for Optimizer {
    fn from(rule: Adam) -> Self {
        Self::Adam(rule)
    }
}

impl Optimizer {
    /// Plain SGD (PyTorch's defaults for everything but the learning rate).
    pub fn sgd(lr: f32) -> Sgd {
        Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// SGD with momentum.
    pub fn momentum(lr: f32, momentum: f32) -> Sgd {
        Self::sgd(lr).momentum(momentum)
    }

    /// AdaGrad with PyTorch's defaults (eps 1e-10).
    pub fn adagrad(lr: f32) -> AdaGrad {
        AdaGrad {
            lr,
            lr_decay: 0.0,
            weight_decay: 0.0,
            initial_accumulator_value: 0.0,
            eps: 1e-10,
        }
    }

    /// Adam with PyTorch's defaults for the betas and eps.
    pub fn adam(lr: f32) -> Adam {
        Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            decoupled: false,
        }
    }

    /// AdamW (decoupled weight decay).
    pub fn adamw(lr: f32, weight_decay: f32) -> Adam {
        Adam {
            weight_decay,
            decoupled: true,
            ..Self::adam(lr)
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Self::Sgd(Sgd { lr, .. })
            | Self::AdaGrad(AdaGrad { lr, .. })
            | Self::Adam(Adam { lr, .. }) => lr,
        }
    }

    /// The same rule with another learning rate (for schedules).
    pub fn with_lr(mut self, new: f32) -> Self {
        match &mut self {
            Self::Sgd(Sgd { lr, .. })
            | Self::AdaGrad(AdaGrad { lr, .. })
            | Self::Adam(Adam { lr, .. }) => *lr = new,
        }
        self
    }

    /// The same rule with another momentum (SGD's) or first beta (Adam's β₁), as PyTorch's
    /// OneCycleLR cycles them; AdaGrad has neither (an error), and SGD keeps its momentum
    /// buffer only while the momentum is above 0 (made without one, or set to 0: an error).
    pub fn with_momentum(self, momentum: f32) -> Result<Self> {
        let refuse = |detail: String| {
            Err(Error::InvalidArgument {
                op: "optimizer",
                detail,
            })
        };
        match self {
            // Its buffer stays: a momentum of 0 would drop it from the rule's state.
            Self::Sgd(_) if momentum <= 0.0 => refuse(format!(
                "momentum {momentum} for SGD made with one: give a momentum above 0"
            )),
            Self::Sgd(r) if r.momentum > 0.0 => Ok(Self::Sgd(Sgd { momentum, ..r })),
            Self::Adam(r) => Ok(Self::Adam(Adam {
                betas: (momentum, r.betas.1),
                ..r
            })),
            Self::Sgd(_) => refuse(
                "SGD made without momentum keeps no momentum buffer: give it a momentum \
                 (Optimizer::sgd(lr).momentum(0.9)) to have it cycled"
                    .into(),
            ),
            Self::AdaGrad(_) => refuse("AdaGrad has no momentum or β₁ to cycle".into()),
        }
    }

    /// The same rule with another weight decay (for parameter groups).
    pub fn with_weight_decay(mut self, new: f32) -> Self {
        match &mut self {
            Self::Sgd(Sgd { weight_decay, .. })
            | Self::AdaGrad(AdaGrad { weight_decay, .. })
            | Self::Adam(Adam { weight_decay, .. }) => *weight_decay = new,
        }
        self
    }

    /// PyTorch's names of the state each parameter gets, in the order
    /// [`OptimizerState::state`] holds it (none for SGD without momentum).
    pub fn state_names(&self) -> &'static [&'static str] {
        match *self {
            Self::Sgd(Sgd { momentum: 0.0, .. }) => &[],
            Self::Sgd(_) => &["momentum_buffer"],
            Self::AdaGrad(_) => &["sum"],
            Self::Adam(Adam { amsgrad: false, .. }) => &["exp_avg", "exp_avg_sq"],
            Self::Adam(Adam { amsgrad: true, .. }) => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        }
    }

    /// The state of a parameter of this shape before the first step.
    pub fn initial_state(&self, shape: &[usize]) -> Vec<ArrayD<f32>> {
        self.state_names()
            .iter()
            .map(|_| ArrayD::from_elem(IxDyn(shape), self.initial_fill()))
            .collect()
    }

    /// What every state tensor holds before the first step.
    fn initial_fill(&self) -> f32 {
        match *self {
            Self::AdaGrad(rule) => rule.initial_accumulator_value,
            _ => 0.0,
        }
    }

    fn validate(&self) -> Result<()> {
        let (lr, others) = match *self {
            Self::Sgd(r) => (r.lr, [r.momentum, r.dampening, r.weight_decay, 0.0]),
            Self::AdaGrad(r) => (
                r.lr,
                [
                    r.eps,
                    r.weight_decay,
                    r.lr_decay,
                    r.initial_accumulator_value,
                ],
            ),
            Self::Adam(r) => (r.lr, [r.eps, r.weight_decay, 0.0, 0.0]),
        };
        let invalid = |detail: String| {
            Err(Error::InvalidArgument {
                op: "optimizer",
                detail: format!("{self:?}: {detail}"),
            })
        };
        if !(lr.is_finite() && lr >= 0.0) || others.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
            return invalid("rates, decays and eps must be finite and non-negative".into());
        }
        match *self {
            Self::Adam(Adam {
                betas: (beta1, beta2),
                ..
            }) if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) => {
                invalid("betas must be in [0, 1)".into())
            }
            Self::Sgd(r) if r.nesterov && (r.momentum <= 0.0 || r.dampening != 0.0) => {
                invalid("Nesterov momentum requires a momentum and zero dampening".into())
            }
            _ => Ok(()),
        }
    }

    /// The uniform parameters of step `t` (from 1).
    /// The rule's number in shaders/optim.wgsl (`KIND`).
    fn kind(&self) -> u32 {
        match self {
            Self::Sgd(_) => optimizer_kind::SGD,
            Self::AdaGrad(_) => optimizer_kind::ADAGRAD,
            Self::Adam(_) => optimizer_kind::ADAM,
        }
    }

    fn params(&self, t: u32) -> OptimParams {
        let mut params = OptimParams {
            first_step: u32::from(t == 1),
            ..OptimParams::zeroed()
        };
        match *self {
            Self::Sgd(r) => {
                (
                    params.lr,
                    params.momentum,
                    params.dampening,
                    params.weight_decay,
                ) = (r.lr, r.momentum, r.dampening, r.weight_decay);
                params.nesterov = u32::from(r.nesterov);
            }
            Self::AdaGrad(r) => {
                (params.lr, params.eps, params.weight_decay) = (r.lr, r.eps, r.weight_decay);
                // PyTorch's clr, in f64 as the bias corrections below.
                let decayed = 1.0 + f64::from(t - 1) * f64::from(r.lr_decay);
                params.step_size = (f64::from(r.lr) / decayed) as f32;
            }
            Self::Adam(r) => {
                let (beta1, beta2) = r.betas;
                (
                    params.lr,
                    params.beta1,
                    params.beta2,
                    params.eps,
                    params.weight_decay,
                ) = (r.lr, beta1, beta2, r.eps, r.weight_decay);
                params.decoupled = u32::from(r.decoupled);
                params.amsgrad = u32::from(r.amsgrad);
                let t = i32::try_from(t).unwrap_or(i32::MAX);
                params.step_size = (f64::from(r.lr) / (1.0 - f64::from(beta1).powi(t))) as f32;
                params.bias_correction2_sqrt = (1.0 - f64::from(beta2).powi(t)).sqrt() as f32;
            }
        }
        params
    }

    /// CPU reference: one update of `param` at step `t` (from 1) with its state (as
    /// [`Optimizer::initial_state`] makes it before the first step), element by element as
    /// the kernel does.
    pub fn update_cpu(
        &self,
        t: u32,
        param: &mut ArrayD<f32>,
        grad: &ArrayD<f32>,
        state: &mut [ArrayD<f32>],
    ) -> Result<()> {
        self.validate()?;
        if param.shape() != grad.shape()
            || state.len() != self.state_names().len()
            || state.iter().any(|s| s.shape() != param.shape())
        {
            return Err(Error::ShapeMismatch {
                op: "optimizer",
                shapes: vec![param.shape().to_vec(), grad.shape().to_vec()],
                detail: format!(
                    "param {:?} and grad {:?} must match, with {} state arrays ({:?}) of that shape; got {}",
                    param.shape(),
                    grad.shape(),
                    self.state_names().len(),
                    self.state_names(),
                    state.len()
                ),
            });
        }
        let (p, kind) = (self.params(t), self.kind());
        // Slots the rule does not use (never read, as the kernel's placeholders).
        let mut spare: Vec<ArrayD<f32>> = (state.len()..3)
            .map(|_| ArrayD::zeros(param.raw_dim()))
            .collect();
        let mut slots = state.iter_mut().chain(spare.iter_mut());
        let (Some(s1), Some(s2), Some(s3)) = (slots.next(), slots.next(), slots.next()) else {
            return Err(Error::InvalidArgument {
                op: "optimizer",
                detail: "more than three state arrays".into(),
            });
        };
        Zip::from(param)
            .and(grad)
            .and(s1)
            .and(s2)
            .and(s3)
            .for_each(|w, &g, s1, s2, s3| {
                let mut g = g;
                if p.decoupled != 0 {
                    *w *= 1.0 - p.lr * p.weight_decay;
                } else if p.weight_decay != 0.0 {
                    g += p.weight_decay * *w;
                }
                match kind {
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
                        *w -= p.step_size * g / (s1.sqrt() + p.eps);
                    }
                    _ => {
                        *s1 += (1.0 - p.beta1) * (g - *s1);
                        *s2 = *s2 * p.beta2 + (1.0 - p.beta2) * g * g;
                        let mut second = *s2;
                        if p.amsgrad != 0 {
                            *s3 = s3.max(*s2);
                            second = *s3;
                        }
                        *w -= p.step_size * *s1 / (second.sqrt() / p.bias_correction2_sqrt + p.eps);
                    }
                }
            });
        Ok(())
    }
}

/// Mirrors `Params` in shaders/optim.wgsl up to its table of tensors.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct OptimParams {
    first_step: u32,
    nesterov: u32,
    decoupled: u32,
    amsgrad: u32,
    lr: f32,
    momentum: f32,
    dampening: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    _pad: [u32; 3],
}

/// Parameters one optimizer dispatch updates at most (fewer where the device binds fewer
/// storage buffers per kernel); more take further dispatches. Each parameter is a `case` of
/// loads and stores in the kernel, whose compile grows with them: Adam's took 30, 65, 90 and
/// 200 ms of JIT on lavapipe for 1, 2, 4 and 8 parameters (with Mesa's cache off, on the
/// Xeon host), the 8-parameter one a tenth of LeNet's cold first step. At 4, LeNet's eight
/// small parameters take two dispatches of one pipeline instead of one.
const MOST_TENSORS_PER_DISPATCH: usize = 4;

/// Parameters at least this long get an optimizer dispatch of their own. Every workgroup of a
/// shared dispatch runs every parameter's `case` (on lavapipe with its lanes masked off, at
/// about 0.8 ns per element and case), so a large parameter sharing one pays for all the
/// others' cases: LeNet's update took 0.50 ms as one dispatch of 10 parameters, 0.17 ms for
/// one parameter of the same total length.
const SOLO_ELEMENTS: usize = 4096;

/// One generated update kernel: shaders/optim.wgsl for `tensors` parameters with `slots`
/// state tensors each (the rule is its `KIND` override).
#[derive(Debug)]
struct UpdateKernel {
    tensors: usize,
    slots: usize,
}

impl Generated for UpdateKernel {
    fn source(&self) -> String {
        optim_source(self.tensors, self.slots)
    }
}

/// The source of an [`UpdateKernel`]: per parameter its bindings and the `case`s that load
/// and store one vec4 of it (the update itself runs once, between them).
fn optim_source(tensors: usize, slots: usize) -> String {
    let (mut bindings, mut loads, mut stores) = (String::new(), String::new(), String::new());
    let names = ["s1", "s2", "s3"];
    for k in 0..tensors {
        let first = 1 + k * (2 + slots);
        let _ = writeln!(
            bindings,
            "@group(0) @binding({first}) var<storage, read_write> param_{k}: array<vec4<f32>>;\n\
             @group(0) @binding({}) var<storage, read> grad_{k}: array<vec4<f32>>;",
            first + 1
        );
        let mut load = format!("param_{k}[i]");
        let mut store = format!("param_{k}[i] = s.w;");
        for (j, name) in names.iter().enumerate() {
            if j < slots {
                let _ = writeln!(
                    bindings,
                    "@group(0) @binding({}) var<storage, read_write> state_{k}_{j}: array<vec4<f32>>;",
                    first + 2 + j
                );
                load.push_str(&format!(", state_{k}_{j}[i]"));
                store.push_str(&format!(" state_{k}_{j}[i] = s.{name};"));
            } else {
                load.push_str(", vec4<f32>(0.0)");
            }
        }
        let _ = writeln!(
            loads,
            "        case {k}u: {{ slots = Slots({load}); gradient = grad_{k}[i]; }}"
        );
        let _ = writeln!(stores, "        case {k}u: {{ {store} }}");
    }
    include_str!("../shaders/optim.wgsl")
        .replace("{{TENSORS}}", &tensors.to_string())
        .replace("{{BINDINGS}}", &bindings)
        .replace("{{LOADS}}", &loads)
        .replace("{{STORES}}", &stores)
}

/// Options for some of the parameters, as PyTorch's parameter groups: the parameters a
/// group selects (by name pattern, or every vector) take its weight decay and a multiple of
/// the optimizer's learning rate, which schedules then move with it (as PyTorch's schedulers
/// scale each group's own rate). The first group that selects a parameter applies; the
/// others keep the rule's own options.
///
/// ```
/// use wgcnn::{Optimizer, ParamGroup};
///
/// // The usual recipe: no weight decay on biases and norms' weights and shifts.
/// let no_decay = ParamGroup::vectors().weight_decay(0.0);
/// assert!(no_decay.selects("layer1.0.bn1.weight", &[16]));
/// assert!(!no_decay.selects("layer1.0.conv1.weight", &[16, 16, 3, 3]));
/// // Or by name: `*` stands for any run of characters.
/// let head = ParamGroup::named(&["fc.*"]).lr_scale(10.0);
/// assert!(head.selects("fc.bias", &[10]) && !head.selects("conv1.weight", &[16, 3, 3, 3]));
/// # let _ = Optimizer::sgd(0.1);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    select: Select,
    weight_decay: Option<f32>,
    lr_scale: f32,
}

#[derive(Clone, Debug, PartialEq)]
enum Select {
    Names(Vec<String>),
    Vectors,
}

impl ParamGroup {
    /// The parameters whose full names (`layer1.0.bn1.weight`) match any of `patterns`,
    /// where `*` matches any run of characters.
    pub fn named(patterns: &[&str]) -> Self {
        Self::new(Select::Names(
            patterns.iter().map(|p| p.to_string()).collect(),
        ))
    }

    /// Every parameter of at most one dimension: biases and the norms' γ and β, what "no
    /// weight decay on BatchNorm and biases" leaves out.
    pub fn vectors() -> Self {
        Self::new(Select::Vectors)
    }

    fn new(select: Select) -> Self {
        Self {
            select,
            weight_decay: None,
            lr_scale: 1.0,
        }
    }

    /// The group's weight decay, in place of the rule's.
    pub fn weight_decay(self, weight_decay: f32) -> Self {
        Self {
            weight_decay: Some(weight_decay),
            ..self
        }
    }

    /// The group's learning rate as a multiple of the optimizer's.
    pub fn lr_scale(self, lr_scale: f32) -> Self {
        Self { lr_scale, ..self }
    }

    /// Whether the parameter `name` of `shape` belongs to the group.
    pub fn selects(&self, name: &str, shape: &[usize]) -> bool {
        match &self.select {
            Select::Names(patterns) => patterns.iter().any(|p| glob_matches(p, name)),
            Select::Vectors => shape.len() <= 1,
        }
    }

    /// `rule` with the group's options.
    fn apply(&self, rule: Optimizer) -> Optimizer {
        let rule = rule.with_lr(rule.lr() * self.lr_scale);
        match self.weight_decay {
            Some(decay) => rule.with_weight_decay(decay),
            None => rule,
        }
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn glob_matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// An optimizer rule with its per-parameter state (the tensors of
/// [`Optimizer::state_names`], created on a parameter's first step): on the GPU as
/// [`GpuOptimizer`], on the host as [`CpuOptimizer`].
///
/// State is kept by parameter name, as PyTorch keys it by parameter: freezing a layer,
/// unfreezing it later, replacing a head or loading weights after the optimizer exists keep
/// each parameter's state (its own step count included, which bias correction follows) with
/// that parameter; a parameter seen for the first time starts fresh, and one whose shape
/// changed under its name is an error naming it.
pub struct OptimizerState<T> {
    rule: Optimizer,
    groups: Vec<ParamGroup>,
    max_grad_norm: Option<f32>,
    step: u32,
    params: Vec<ParamState<T>>,
}

/// One parameter's optimizer state.
struct ParamState<T> {
    name: String,
    shape: Vec<usize>,
    /// Updates this parameter has had: bias correction and SGD's first momentum step follow
    /// it, as PyTorch keeps `step` per parameter.
    step: u32,
    slots: Vec<T>,
}

/// A parameter's saved optimizer state: its name, its own step count and its state tensors
/// in the order of [`Optimizer::state_names`].
pub type NamedState = (String, u32, Vec<ArrayD<f32>>);

/// An optimizer with its per-parameter state on the GPU.
pub type GpuOptimizer = OptimizerState<Tensor>;

/// The CPU reference of [`GpuOptimizer`]: the same rule and state, on host arrays.
pub type CpuOptimizer = OptimizerState<ArrayD<f32>>;

impl<T> OptimizerState<T> {
    /// A fresh optimizer (state is created on each parameter's first step).
    pub fn new(rule: impl Into<Optimizer>) -> Result<Self> {
        let rule = rule.into();
        rule.validate()?;
        Ok(Self {
            rule,
            groups: Vec::new(),
            max_grad_norm: None,
            step: 0,
            params: Vec::new(),
        })
    }

    /// The rule and its hyper-parameters.
    pub fn rule(&self) -> Optimizer {
        self.rule
    }

    /// Changes the momentum (SGD) or β₁ (Adam) from the next step on, for schedules that
    /// cycle it ([`crate::train::LrSchedule::momentum`]); the state is kept.
    pub fn set_momentum(&mut self, momentum: f32) -> Result<()> {
        let rule = self.rule.with_momentum(momentum)?;
        rule.validate()?;
        self.rule = rule;
        Ok(())
    }

    /// Adds a parameter group (after those added before: the first that selects a
    /// parameter applies). Its options are checked against the rule's.
    pub fn add_param_group(&mut self, group: ParamGroup) -> Result<()> {
        if !(group.lr_scale.is_finite() && group.lr_scale >= 0.0) {
            return Err(Error::InvalidArgument {
                op: "optimizer",
                detail: format!(
                    "learning-rate scale {}: give a finite, non-negative multiple",
                    group.lr_scale
                ),
            });
        }
        group.apply(self.rule).validate()?;
        self.groups.push(group);
        Ok(())
    }

    /// Clips the gradients to a global norm of at most `max_norm` before each update
    /// ([`crate::Graph::update`] does; PyTorch's `clip_grad_norm_` before `step`), or not
    /// (`None`, the default).
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f32>) -> Result<()> {
        if let Some(max) = max_norm
            && !(max.is_finite() && max > 0.0)
        {
            return Err(Error::InvalidArgument {
                op: "optimizer",
                detail: format!("max gradient norm {max}: give a finite value above zero"),
            });
        }
        self.max_grad_norm = max_norm;
        Ok(())
    }

    /// The norm gradients are clipped to before each update, if any.
    pub fn max_grad_norm(&self) -> Option<f32> {
        self.max_grad_norm
    }

    /// The rule for the parameter `name` of `shape`: its group's, or the optimizer's own,
    /// with the group's number (0: none, then 1 for the first group, …).
    fn rule_of(&self, name: &str, shape: &[usize]) -> (usize, Optimizer) {
        match self.groups.iter().position(|g| g.selects(name, shape)) {
            Some(i) => (i + 1, self.groups[i].apply(self.rule)),
            None => (0, self.rule),
        }
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

    /// The state of the `index`-th parameter this optimizer has seen, in the order of
    /// [`Optimizer::state_names`]; `None` before its first step.
    pub fn state(&self, index: usize) -> Option<&[T]> {
        self.params.get(index).map(|p| p.slots.as_slice())
    }

    /// The state of the parameter called `name`, and its own step count.
    pub fn state_of(&self, name: &str) -> Option<(u32, &[T])> {
        let param = self.params.iter().find(|p| p.name == name)?;
        Some((param.step, &param.slots))
    }

    /// Drops the state of the parameters called `names` (new parameters under old names:
    /// their next step starts fresh).
    pub fn forget(&mut self, names: &[String]) {
        self.params.retain(|p| !names.contains(&p.name));
    }

    /// For each parameter of this step, the index of its state: found by name (its shape
    /// checked) or created by `fresh`. Then every one of them counts one more step.
    fn prepare(
        &mut self,
        params: &[(&str, &[usize])],
        grads: &[&[usize]],
        mut fresh: impl FnMut(&[usize]) -> Result<Vec<T>>,
    ) -> Result<Vec<usize>> {
        if params.len() != grads.len() {
            return Err(Error::ShapeMismatch {
                op: "optimizer",
                shapes: Vec::new(),
                detail: format!("{} parameters, {} gradients", params.len(), grads.len()),
            });
        }
        let mut indices = Vec::with_capacity(params.len());
        for (&(name, shape), &grad) in params.iter().zip(grads) {
            if shape != grad {
                return Err(Error::ShapeMismatch {
                    op: "optimizer",
                    shapes: vec![shape.to_vec(), grad.to_vec()],
                    detail: format!("parameter {name} {shape:?} has a gradient of shape {grad:?}"),
                });
            }
            if indices.iter().any(|&i: &usize| self.params[i].name == name) {
                return Err(Error::InvalidArgument {
                    op: "optimizer",
                    detail: format!("parameter {name} is passed twice in one step"),
                });
            }
            let index = match self.params.iter().position(|p| p.name == name) {
                // Without state tensors (plain SGD) there is nothing a new shape could misfit.
                Some(i) if !self.params[i].slots.is_empty() && self.params[i].shape != shape => {
                    return Err(Error::ShapeMismatch {
                        op: "optimizer",
                        shapes: vec![shape.to_vec(), self.params[i].shape.clone()],
                        detail: format!(
                            "parameter {name} is {shape:?}, its optimizer state {:?}: a layer \
                             replaced under the same name needs a new optimizer, or the old \
                             layer's shape",
                            self.params[i].shape
                        ),
                    });
                }
                Some(i) => i,
                None => {
                    self.params.push(ParamState {
                        name: name.to_string(),
                        shape: shape.to_vec(),
                        step: 0,
                        slots: fresh(shape)?,
                    });
                    self.params.len() - 1
                }
            };
            indices.push(index);
        }
        self.step += 1;
        for &i in &indices {
            self.params[i].step += 1;
        }
        Ok(indices)
    }

    fn check_restored(&self, state: &[NamedState]) -> Result<()> {
        let names = self.rule.state_names();
        if let Some((name, _, slots)) = state.iter().find(|(_, _, s)| s.len() != names.len()) {
            return Err(Error::ShapeMismatch {
                op: "optimizer",
                shapes: Vec::new(),
                detail: format!(
                    "the rule keeps {} state tensors per parameter ({names:?}), the saved state of {name} has {}",
                    names.len(),
                    slots.len()
                ),
            });
        }
        Ok(())
    }
}

/// Positional names for the positional `step` forms: parameter `i` is `"i"`.
fn positional(count: usize) -> Vec<String> {
    (0..count).map(|i| i.to_string()).collect()
}

impl GpuOptimizer {
    /// Updates every parameter in place from its gradient; parameter `i` keeps its state
    /// under the name `"i"` (so pass the same parameters in the same order at every step, or
    /// use [`GpuOptimizer::step_named`]).
    pub fn step(&mut self, params: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        let names = positional(params.len());
        let named: Vec<(&str, &Tensor)> = names
            .iter()
            .map(String::as_str)
            .zip(params.iter().copied())
            .collect();
        self.step_named(&named, grads)
    }

    /// Updates every parameter in place from its gradient, its state found by its name.
    pub fn step_named(&mut self, params: &[(&str, &Tensor)], grads: &[&Tensor]) -> Result<()> {
        let shapes: Vec<(&str, &[usize])> = params.iter().map(|(n, p)| (*n, p.shape())).collect();
        let grad_shapes: Vec<&[usize]> = grads.iter().map(|g| g.shape()).collect();
        let (slots, fill) = (self.rule.state_names().len(), self.rule.initial_fill());
        let Some(gpu) = params.first().map(|(_, p)| p.gpu().clone()) else {
            self.step += 1;
            return Ok(());
        };
        let indices = self.prepare(&shapes, &grad_shapes, |shape| {
            (0..slots)
                .map(|_| Tensor::full(&gpu, shape, fill))
                .collect()
        })?;
        let kind = self.rule.kind();
        let bindable = gpu.limits().max_storage_buffers_per_shader_stage as usize / (2 + slots);
        let per_dispatch = bindable.clamp(1, MOST_TENSORS_PER_DISPATCH);
        // Parameters of SOLO_ELEMENTS or more get a dispatch each; the rest share them, among
        // those at the same step count (their bias corrections are the dispatch's) in the
        // same parameter group (its options are the dispatch's).
        let rules: Vec<(usize, Optimizer)> = params
            .iter()
            .map(|(name, p)| self.rule_of(name, p.shape()))
            .collect();
        let mut dispatches: Vec<Vec<usize>> = Vec::new();
        let mut shared: Vec<((u32, usize), Vec<usize>)> = Vec::new();
        for (k, &i) in indices.iter().enumerate() {
            let key = (self.params[i].step, rules[k].0);
            if params[k].1.len() >= SOLO_ELEMENTS {
                dispatches.push(vec![k]);
            } else if let Some((_, members)) = shared.iter_mut().find(|(s, _)| *s == key) {
                members.push(k);
            } else {
                shared.push((key, vec![k]));
            }
        }
        for (_, members) in shared {
            dispatches.extend(members.chunks(per_dispatch).map(<[usize]>::to_vec));
        }
        gpu.run_pass("optimizer step", |pass| {
            for members in dispatches {
                let count = members.len();
                let step = self.params[indices[members[0]]].step;
                let rule = bytemuck::bytes_of(&rules[members[0]].1.params(step)).to_vec();
                let kernel = UpdateKernel {
                    tensors: count,
                    slots,
                };
                let pipeline = gpu.generated(&kernel, "main", &[("KIND", kind)])?;
                // The table of tensors: each one's first workgroup and length in vec4s.
                let (mut table, mut groups) = (Vec::with_capacity(4 * count), 0u64);
                let mut bindings = Vec::with_capacity(count * (2 + slots));
                for k in members {
                    let (p, g) = (params[k].1, grads[k]);
                    let state = &self.params[indices[k]].slots;
                    let vec4s = p.len().div_ceil(4) as u64;
                    table.extend([groups, vec4s, 0, 0].map(|v| v as u32));
                    groups += workgroups(vec4s);
                    bindings.extend([p.binding_vec4(), g.binding_vec4()]);
                    bindings.extend(state.iter().map(Tensor::binding_vec4));
                }
                if groups > u64::from(u32::MAX) {
                    return Err(Error::InvalidArgument {
                        op: "optimizer",
                        detail: format!(
                            "{groups} workgroups for one update; use smaller parameters"
                        ),
                    });
                }
                let mut uniform = rule;
                uniform.extend_from_slice(bytemuck::cast_slice(&table));
                gpu.encode(pass, &pipeline, &uniform, &bindings, groups)?;
            }
            Ok(())
        })
    }

    /// The state as host arrays: per parameter, its name, its step count and its tensors.
    pub fn state_arrays(&self) -> Result<Vec<NamedState>> {
        self.params
            .iter()
            .map(|p| {
                let slots = p
                    .slots
                    .iter()
                    .map(Tensor::to_array)
                    .collect::<Result<_>>()?;
                Ok((p.name.clone(), p.step, slots))
            })
            .collect()
    }

    /// Replaces the step count and the state (as [`Self::state_arrays`] gives it) on `gpu`,
    /// to resume a run.
    pub fn restore(
        &mut self,
        gpu: &crate::gpu::Gpu,
        step: u32,
        state: Vec<NamedState>,
    ) -> Result<()> {
        self.check_restored(&state)?;
        self.params = state
            .into_iter()
            .map(|(name, step, slots)| {
                Ok(ParamState {
                    shape: slots
                        .first()
                        .map_or_else(Vec::new, |a: &ArrayD<f32>| a.shape().to_vec()),
                    slots: slots
                        .iter()
                        .map(|a| Tensor::from_array(gpu, a))
                        .collect::<Result<_>>()?,
                    name,
                    step,
                })
            })
            .collect::<Result<_>>()?;
        self.step = step;
        Ok(())
    }
}

impl CpuOptimizer {
    /// Updates every parameter in place; parameter `i` keeps its state under the name `"i"`
    /// (see [`CpuOptimizer::step_named`]).
    pub fn step(&mut self, params: &mut [&mut ArrayD<f32>], grads: &[&ArrayD<f32>]) -> Result<()> {
        let names = positional(params.len());
        let mut named: Vec<(&str, &mut ArrayD<f32>)> = names
            .iter()
            .map(String::as_str)
            .zip(params.iter_mut().map(|p| &mut **p))
            .collect();
        self.step_named(&mut named, grads)
    }

    /// Updates every parameter in place, its state found by its name.
    pub fn step_named(
        &mut self,
        params: &mut [(&str, &mut ArrayD<f32>)],
        grads: &[&ArrayD<f32>],
    ) -> Result<()> {
        let shapes: Vec<(&str, Vec<usize>)> = params
            .iter()
            .map(|(n, p)| (*n, p.shape().to_vec()))
            .collect();
        let shapes: Vec<(&str, &[usize])> =
            shapes.iter().map(|(n, s)| (*n, s.as_slice())).collect();
        let grad_shapes: Vec<&[usize]> = grads.iter().map(|g| g.shape()).collect();
        let rule = self.rule;
        let indices = self.prepare(&shapes, &grad_shapes, |shape| Ok(rule.initial_state(shape)))?;
        for (((name, p), g), i) in params.iter_mut().zip(grads).zip(indices) {
            let (_, rule) = self.rule_of(name, p.shape());
            let state = &mut self.params[i];
            rule.update_cpu(state.step, p, g, &mut state.slots)?;
        }
        Ok(())
    }

    /// The state: per parameter, its name, its step count and its tensors.
    pub fn state_arrays(&self) -> Result<Vec<NamedState>> {
        Ok(self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.step, p.slots.clone()))
            .collect())
    }

    /// Replaces the step count and the state, to resume a run.
    pub fn restore(&mut self, step: u32, state: Vec<NamedState>) -> Result<()> {
        self.check_restored(&state)?;
        self.params = state
            .into_iter()
            .map(|(name, step, slots)| ParamState {
                shape: slots.first().map_or_else(Vec::new, |a| a.shape().to_vec()),
                name,
                step,
                slots,
            })
            .collect();
        self.step = step;
        Ok(())
    }
}

/// An optimizer on the model's device.
pub enum GraphOptimizer {
    /// State and update kernels on the GPU.
    Gpu(GpuOptimizer),
    /// The CPU reference.
    Cpu(CpuOptimizer),
}

impl GraphOptimizer {
    /// An optimizer following `rule` for values on `device`.
    pub fn new(device: &Device, rule: impl Into<Optimizer>) -> Result<Self> {
        Ok(match device {
            Device::Gpu(_) => GraphOptimizer::Gpu(GpuOptimizer::new(rule)?),
            Device::Cpu => GraphOptimizer::Cpu(CpuOptimizer::new(rule)?),
        })
    }

    /// Drops the state of the parameters `names` (a replaced layer's): they start fresh.
    pub(crate) fn forget(&mut self, names: &[String]) {
        match self {
            GraphOptimizer::Gpu(opt) => opt.forget(names),
            GraphOptimizer::Cpu(opt) => opt.forget(names),
        }
    }

    /// One step of the parameters `params`, named `names`, from their gradients `grads`,
    /// on the optimizer's device (a value on the other one is an error).
    pub(crate) fn step_values(
        &mut self,
        names: &[&str],
        params: &mut [&mut Value],
        grads: &[&Value],
    ) -> Result<()> {
        match self {
            GraphOptimizer::Gpu(opt) => {
                let params = names
                    .iter()
                    .zip(params.iter())
                    .map(|(n, p)| Ok((*n, p.gpu()?)))
                    .collect::<Result<Vec<_>>>()?;
                let grads = grads.iter().map(|g| g.gpu()).collect::<Result<Vec<_>>>()?;
                opt.step_named(&params, &grads)
            }
            GraphOptimizer::Cpu(opt) => {
                let grads = grads.iter().map(|g| g.cpu()).collect::<Result<Vec<_>>>()?;
                let mut params = names
                    .iter()
                    .zip(params.iter_mut())
                    .map(|(n, p)| Ok((*n, p.cpu_mut()?)))
                    .collect::<Result<Vec<_>>>()?;
                opt.step_named(&mut params, &grads)
            }
        }
    }

    /// Changes the learning rate from the next step on (for schedules; parameter groups
    /// keep their multiple of it).
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        match self {
            GraphOptimizer::Gpu(opt) => opt.set_lr(lr),
            GraphOptimizer::Cpu(opt) => opt.set_lr(lr),
        }
    }

    /// Changes the momentum (SGD) or β₁ (Adam) from the next step on (one-cycle schedules).
    pub fn set_momentum(&mut self, momentum: f32) -> Result<()> {
        match self {
            GraphOptimizer::Gpu(opt) => opt.set_momentum(momentum),
            GraphOptimizer::Cpu(opt) => opt.set_momentum(momentum),
        }
    }

    /// Adds a parameter group: see [`ParamGroup`].
    pub fn add_param_group(&mut self, group: ParamGroup) -> Result<()> {
        match self {
            GraphOptimizer::Gpu(opt) => opt.add_param_group(group),
            GraphOptimizer::Cpu(opt) => opt.add_param_group(group),
        }
    }

    /// Clips gradients by global norm before each update: see
    /// [`OptimizerState::set_max_grad_norm`].
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f32>) -> Result<()> {
        match self {
            GraphOptimizer::Gpu(opt) => opt.set_max_grad_norm(max_norm),
            GraphOptimizer::Cpu(opt) => opt.set_max_grad_norm(max_norm),
        }
    }

    /// The norm gradients are clipped to before each update, if any.
    pub fn max_grad_norm(&self) -> Option<f32> {
        match self {
            GraphOptimizer::Gpu(opt) => opt.max_grad_norm(),
            GraphOptimizer::Cpu(opt) => opt.max_grad_norm(),
        }
    }

    /// The rule and its hyper-parameters.
    pub fn rule(&self) -> Optimizer {
        match self {
            GraphOptimizer::Gpu(opt) => opt.rule(),
            GraphOptimizer::Cpu(opt) => opt.rule(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        match self {
            GraphOptimizer::Gpu(opt) => opt.steps(),
            GraphOptimizer::Cpu(opt) => opt.steps(),
        }
    }

    /// The per-parameter state on the host (empty before the first step).
    pub fn state_arrays(&self) -> Result<Vec<NamedState>> {
        match self {
            GraphOptimizer::Gpu(opt) => opt.state_arrays(),
            GraphOptimizer::Cpu(opt) => opt.state_arrays(),
        }
    }

    /// Replaces the step count and the state, on `device`.
    pub(crate) fn restore(
        &mut self,
        device: &Device,
        step: u32,
        state: Vec<NamedState>,
    ) -> Result<()> {
        match (self, device) {
            (GraphOptimizer::Gpu(opt), Device::Gpu(gpu)) => opt.restore(gpu, step, state),
            (GraphOptimizer::Cpu(opt), Device::Cpu) => opt.restore(step, state),
            _ => Err(mixed_devices()),
        }
    }
}
