//! Learning-rate schedules with PyTorch's semantics (`torch.optim.lr_scheduler`), as pure
//! functions of the step: `schedule.lr(base_lr, step)` is the rate PyTorch's scheduler gives
//! after `step` calls of `scheduler.step()`. A step is whatever the caller counts (a batch or
//! an epoch); `GraphOptimizer::set_lr` applies the rate, and `GraphOptimizer::set_momentum`
//! the momentum a one-cycle schedule cycles (`schedule.momentum(step)`).

use crate::error::{Error, Result};

/// A learning-rate schedule (each variant names its PyTorch twin).
#[derive(Clone, Debug, PartialEq)]
pub enum LrSchedule {
    /// `StepLR(step_size, gamma)`: `base · gamma^⌊step / step_size⌋`.
    Step {
        /// Steps between decays.
        step_size: usize,
        /// The factor of each decay.
        gamma: f32,
    },
    /// `MultiStepLR(milestones, gamma)`: `base · gamma^(milestones passed)`.
    MultiStep {
        /// The steps at which the rate decays, ascending.
        milestones: Vec<usize>,
        /// The factor of each decay.
        gamma: f32,
    },
    /// `CosineAnnealingLR(t_max, eta_min)`: from `base` down to `eta_min` along a half
    /// cosine over `t_max` steps (and back up after, as PyTorch's closed form).
    Cosine {
        /// Steps of the half period.
        t_max: usize,
        /// The lowest rate.
        eta_min: f32,
    },
    /// `LinearLR(start_factor, end_factor, total_iters)`: the factor moves linearly from
    /// `start_factor` to `end_factor` over `total_iters` steps, then stays (a linear warm-up
    /// with `end_factor` 1).
    Linear {
        /// The factor at step 0.
        start_factor: f32,
        /// The factor from `total_iters` on.
        end_factor: f32,
        /// Steps of the ramp.
        total_iters: usize,
    },
    /// `OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy='cos', div_factor,
    /// final_div_factor, base_momentum, max_momentum)`, two phases: from `max_lr /
    /// div_factor` up to `max_lr` over the first `pct_start` of the steps, then down to
    /// `max_lr / (div_factor · final_div_factor)`, both along half cosines, the momentum
    /// (SGD's, or Adam's β₁) going the other way between `max_momentum` and
    /// `base_momentum`. `base_lr` is ignored, as in PyTorch.
    OneCycle {
        /// The peak rate.
        max_lr: f32,
        /// Steps of the whole cycle (more steps are an error in PyTorch; here they stay at
        /// the last rate).
        total_steps: usize,
        /// Share of the steps spent rising (PyTorch: 0.3).
        pct_start: f32,
        /// `max_lr / initial rate` (PyTorch: 25).
        div_factor: f32,
        /// `initial rate / final rate` (PyTorch: 1e4).
        final_div_factor: f32,
        /// `(base_momentum, max_momentum)` to cycle (PyTorch: (0.85, 0.95)), or `None` for
        /// `cycle_momentum=False`.
        momentum: Option<(f32, f32)>,
    },
    /// `SequentialLR([LinearLR(start_factor, 1, warmup), then], milestones=[warmup])`: a
    /// linear warm-up over `warmup` steps, then `then` from its own step 0.
    Warmup {
        /// Steps of the warm-up.
        warmup: usize,
        /// The factor at step 0.
        start_factor: f32,
        /// The schedule after the warm-up.
        then: Box<LrSchedule>,
    },
}

impl LrSchedule {
    /// `OneCycleLR` with PyTorch's defaults (`pct_start` 0.3, `div_factor` 25,
    /// `final_div_factor` 1e4, momentum cycled between 0.95 and 0.85).
    pub fn one_cycle(max_lr: f32, total_steps: usize) -> Self {
        Self::OneCycle {
            max_lr,
            total_steps,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            momentum: Some((0.85, 0.95)),
        }
    }

    /// This schedule after a linear warm-up of `warmup` steps from `start_factor`.
    pub fn after_warmup(self, warmup: usize, start_factor: f32) -> Self {
        Self::Warmup {
            warmup,
            start_factor,
            then: Box::new(self),
        }
    }

    /// The rate after `step` scheduler steps from `base_lr`; an error for parameters
    /// PyTorch refuses too (a zero period, factors out of range, milestones not ascending).
    pub fn lr(&self, base_lr: f32, step: usize) -> Result<f32> {
        self.validate()?;
        Ok(self.rate(f64::from(base_lr), step) as f32)
    }

    /// The momentum after `step` scheduler steps where the schedule cycles it (one-cycle; a
    /// warm-up before it holds its first momentum, as PyTorch's OneCycleLR sets it when
    /// made), else `None` (leave the optimizer's as it is). A warm-up before a one-cycle
    /// schedule is not checked against PyTorch: its SequentialLR scales OneCycleLR's own
    /// initial rate during the warm-up and jumps at the milestone.
    pub fn momentum(&self, step: usize) -> Result<Option<f32>> {
        self.validate()?;
        Ok(self.cycled_momentum(step).map(|m| m as f32))
    }

    fn cycled_momentum(&self, step: usize) -> Option<f64> {
        match self {
            Self::OneCycle {
                total_steps,
                pct_start,
                momentum: Some((base, max)),
                ..
            } => {
                let (base, max) = (f64::from(*base), f64::from(*max));
                Some(match one_cycle_phase(*total_steps, *pct_start, step) {
                    (true, done) => half_cosine(max, base, done),
                    (false, done) => half_cosine(base, max, done),
                })
            }
            // PyTorch's OneCycleLR sets its first momentum when it is made, before the
            // warm-up that SequentialLR runs first.
            Self::Warmup { warmup, then, .. } => then.cycled_momentum(step.saturating_sub(*warmup)),
            _ => None,
        }
    }

    fn rate(&self, base: f64, step: usize) -> f64 {
        let t = step as f64;
        match self {
            Self::Step { step_size, gamma } => {
                base * f64::from(*gamma).powi((step / step_size) as i32)
            }
            Self::MultiStep { milestones, gamma } => {
                let passed = milestones.partition_point(|&m| m <= step);
                base * f64::from(*gamma).powi(passed as i32)
            }
            Self::Cosine { t_max, eta_min } => {
                let eta_min = f64::from(*eta_min);
                let phase = std::f64::consts::PI * t / *t_max as f64;
                eta_min + (base - eta_min) * (1.0 + phase.cos()) / 2.0
            }
            Self::Linear {
                start_factor,
                end_factor,
                total_iters,
            } => {
                let (start, end) = (f64::from(*start_factor), f64::from(*end_factor));
                let done = (step.min(*total_iters) as f64) / (*total_iters).max(1) as f64;
                base * (start + (end - start) * done)
            }
            Self::OneCycle {
                max_lr,
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
                ..
            } => {
                let max = f64::from(*max_lr);
                let initial = max / f64::from(*div_factor);
                let last = initial / f64::from(*final_div_factor);
                match one_cycle_phase(*total_steps, *pct_start, step) {
                    (true, done) => half_cosine(initial, max, done),
                    (false, done) => half_cosine(max, last, done),
                }
            }
            Self::Warmup {
                warmup,
                start_factor,
                then,
            } => {
                if step < *warmup {
                    let start = f64::from(*start_factor);
                    base * (start + (1.0 - start) * t / *warmup as f64)
                } else {
                    then.rate(base, step - warmup)
                }
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |detail: String| {
            Err(Error::InvalidArgument {
                op: "learning-rate schedule",
                detail,
            })
        };
        match self {
            Self::Step { step_size: 0, .. } => bad("StepLR needs a step_size of at least 1".into()),
            Self::MultiStep { milestones, .. } if !milestones.is_sorted() => bad(format!(
                "MultiStepLR's milestones {milestones:?} must be ascending"
            )),
            Self::Cosine { t_max: 0, .. } => {
                bad("CosineAnnealingLR needs a t_max of at least 1".into())
            }
            Self::Linear {
                start_factor,
                end_factor,
                total_iters,
            } if !(*start_factor > 0.0
                && *start_factor <= 1.0
                && (0.0..=1.0).contains(end_factor)
                && *total_iters > 0) =>
            {
                bad(format!(
                    "LinearLR needs 0 < start_factor ≤ 1, 0 ≤ end_factor ≤ 1 and total_iters ≥ 1; \
                     got {start_factor}, {end_factor}, {total_iters}"
                ))
            }
            Self::OneCycle {
                momentum: Some((base, max)),
                ..
            } if !(base.is_finite() && max.is_finite() && *base >= 0.0 && *max >= 0.0) => {
                bad(format!(
                    "OneCycleLR cycles momentum between base {base} and max {max}: give \
                     finite values of at least 0"
                ))
            }
            Self::OneCycle {
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
                ..
            } if *total_steps < 2
                || !(*pct_start > 0.0 && *pct_start < 1.0)
                || f64::from(*pct_start) * (*total_steps as f64) < 2.0
                || *div_factor <= 0.0
                || *final_div_factor <= 0.0 =>
            {
                bad(format!(
                    "OneCycleLR needs total_steps·pct_start ≥ 2 with 0 < pct_start < 1 and \
                     positive div factors; got total_steps {total_steps}, pct_start {pct_start}, \
                     div_factor {div_factor}, final_div_factor {final_div_factor}"
                ))
            }
            Self::Warmup {
                warmup,
                start_factor,
                then,
            } => {
                if *warmup == 0 || !(*start_factor > 0.0 && *start_factor <= 1.0) {
                    return bad(format!(
                        "a warm-up needs at least 1 step and 0 < start_factor ≤ 1; got \
                         {warmup} steps from {start_factor}"
                    ));
                }
                then.validate()
            }
            _ => Ok(()),
        }
    }
}

/// Where step `step` of a one-cycle schedule is: in the rise (`true`) or the fall, and how
/// far through it, in `[0, 1]`. PyTorch's phase ends: the rise ends at step pct·total − 1,
/// the fall at total − 1 (later steps stay there).
fn one_cycle_phase(total_steps: usize, pct_start: f32, step: usize) -> (bool, f64) {
    let rise_end = f64::from(pct_start) * total_steps as f64 - 1.0;
    let fall_end = total_steps as f64 - 1.0;
    let t = (step as f64).min(fall_end);
    if t <= rise_end {
        (true, t / rise_end)
    } else {
        (false, (t - rise_end) / (fall_end - rise_end))
    }
}

/// From `from` to `to` along a half cosine, `done` of the way (PyTorch's `_annealing_cos`).
fn half_cosine(from: f64, to: f64, done: f64) -> f64 {
    to + (from - to) * (1.0 + (std::f64::consts::PI * done).cos()) / 2.0
}
