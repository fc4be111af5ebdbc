//! Signed-gradient attack steps (`shaders/attack.wgsl`): FGSM and the PGD step, on images
//! in any value range (e.g. normalised pixels, whose valid range is `[(0-μ)/σ, (1-μ)/σ]`).

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, Zip};

use crate::error::{Error, Result};
use crate::gpu::shared::workgroups;
use crate::tensor::Tensor;
use crate::value::Value;

const OP: &str = "attack";

/// One step `clamp(clamp(x + step·sign(g), origin ± radius), range)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SignedStep {
    /// Size of the move along the gradient's sign.
    pub step: f32,
    /// Largest distance from the origin (the attack's ε).
    pub radius: f32,
    /// Valid value range `(lo, hi)`.
    pub range: (f32, f32),
}

/// Mirrors `Params` in shaders/attack.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttackParams {
    total: u32,
    step: f32,
    radius: f32,
    lo: f32,
    hi: f32,
    _pad: [u32; 3],
}

impl SignedStep {
    /// FGSM: one step of ε from the clean image.
    pub fn fgsm(epsilon: f32, range: (f32, f32)) -> Self {
        Self {
            step: epsilon,
            radius: epsilon,
            range,
        }
    }

    fn check(&self, shapes: [&[usize]; 3]) -> Result<()> {
        let (lo, hi) = self.range;
        if !(self.step.is_finite() && self.radius >= 0.0 && lo <= hi) {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!(
                    "step {} must be finite, radius {} non-negative and range {lo}..{hi} ordered",
                    self.step, self.radius
                ),
            });
        }
        if shapes[1] != shapes[0] || shapes[2] != shapes[0] {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: shapes.iter().map(|s| s.to_vec()).collect(),
                detail: format!(
                    "x {:?}, gradient {:?} and origin {:?} must have one shape",
                    shapes[0], shapes[1], shapes[2]
                ),
            });
        }
        Ok(())
    }

    /// The step on the GPU; `origin` is the clean image (`x` itself for FGSM).
    pub fn apply(&self, x: &Tensor, grad: &Tensor, origin: &Tensor) -> Result<Tensor> {
        self.check([x.shape(), grad.shape(), origin.shape()])?;
        let gpu = x.gpu();
        grad.check_same_gpu(OP, gpu)?;
        origin.check_same_gpu(OP, gpu)?;
        let out = Tensor::uninit(gpu, x.shape())?;
        let params = AttackParams {
            total: x.len() as u32,
            step: self.step,
            radius: self.radius,
            lo: self.range.0,
            hi: self.range.1,
            _pad: [0; 3],
        };
        let pipeline = gpu.pipeline("attack", "main", || {
            include_str!("../../shaders/attack.wgsl").into()
        })?;
        gpu.run_pass(OP, |pass| {
            gpu.encode(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &[x.binding(), grad.binding(), origin.binding(), out.binding()],
                workgroups(x.len() as u64),
            )
        })?;
        Ok(out)
    }

    /// CPU reference of [`SignedStep::apply`].
    pub fn apply_cpu(
        &self,
        x: &ArrayViewD<'_, f32>,
        grad: &ArrayViewD<'_, f32>,
        origin: &ArrayViewD<'_, f32>,
    ) -> Result<ArrayD<f32>> {
        self.check([x.shape(), grad.shape(), origin.shape()])?;
        let mut out = x.to_owned();
        Zip::from(&mut out)
            .and(grad)
            .and(origin)
            .for_each(|v, &g, &o| {
                let sign = if g > 0.0 {
                    1.0
                } else if g < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                let moved = *v + self.step * sign;
                // max/min rather than clamp: no panic on NaN input.
                *v = moved
                    .max(o - self.radius)
                    .min(o + self.radius)
                    .max(self.range.0)
                    .min(self.range.1);
            });
        Ok(out)
    }
}

impl Value {
    /// One signed-gradient step of these images from `grad`, projected back into the ball
    /// around `origin` and the range, on their device.
    pub fn signed_step(&self, step: &SignedStep, grad: &Value, origin: &Value) -> Result<Value> {
        self.map(
            |x| step.apply(x, grad.gpu()?, origin.gpu()?),
            |x| step.apply_cpu(&x.view(), &grad.cpu()?.view(), &origin.cpu()?.view()),
        )
    }
}
