//! The knowledge-distillation loss (`shaders/distill.wgsl`), fused per row:
//! `α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1-α)·CE(student, labels)`, mean
//! over the batch (PyTorch's `KLDivLoss(reduction="batchmean")` and `CrossEntropyLoss`),
//! with its gradient with respect to the student's logits. The teacher gets no gradient.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};

use super::rows::{RowKernel, row_kernel};
use super::softmax_cross_entropy::{CrossEntropy, check, per_row_to_totals, upload_labels};
use crate::error::{Error, Result};
use crate::gpu::shared::small_workgroups;
use crate::tensor::Tensor;
use crate::value::Value;

const OP: &str = "distillation";

/// The loss's weights: `alpha` on the soft (teacher) term, `1 - alpha` on the labels, and
/// the softening temperature.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    /// Weight of the teacher term, in `[0, 1]`.
    pub alpha: f32,
    /// Temperature `T > 0` (softmax of `logits / T`).
    pub temperature: f32,
}

/// Mirrors `Params` in shaders/distill.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DistillParams {
    rows: u32,
    classes: u32,
    scale: f32,
    alpha: f32,
    temperature: f32,
    _pad: [u32; 3],
}

impl Distillation {
    fn check(&self, student: &[usize], teacher: &[usize], labels: &[usize]) -> Result<usize> {
        let valid = (0.0..=1.0).contains(&self.alpha)
            && self.temperature.is_finite()
            && self.temperature > 0.0;
        if !valid {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!(
                    "alpha {} must lie in [0, 1] and the temperature {} must be positive",
                    self.alpha, self.temperature
                ),
            });
        }
        if student != teacher {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![student.to_vec(), teacher.to_vec()],
                detail: format!("student logits {student:?}, teacher logits {teacher:?}"),
            });
        }
        Ok(check(student, labels)?.0)
    }

    /// Loss, gradient with respect to `student` and the student's correct count.
    pub fn forward(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        labels: &[usize],
    ) -> Result<CrossEntropy<Tensor>> {
        let rows = self.check(student.shape(), teacher.shape(), labels)?;
        let gpu = student.gpu();
        teacher.check_same_gpu(OP, gpu)?;
        let labels = upload_labels(gpu, labels)?;
        let grad = Tensor::uninit(gpu, student.shape())?;
        let row_loss = Tensor::uninit(gpu, &[rows])?;
        let row_correct = Tensor::uninit(gpu, &[rows])?;
        let params = DistillParams {
            rows: rows as u32,
            classes: student.shape()[1] as u32,
            scale: 1.0 / rows as f32,
            alpha: self.alpha,
            temperature: self.temperature,
            _pad: [0; 3],
        };
        // Seven passes over a row (three log-sum-exps of two, then the gradient), and a
        // tree per sum in the wide kernel: eight to be safe.
        let classes = student.shape()[1];
        let (entry, groups) = match row_kernel(OP, classes, 8)? {
            RowKernel::PerInvocation => ("main", small_workgroups(rows as u64)),
            RowKernel::PerWorkgroup => ("main_wide", rows as u64),
        };
        let pipeline = gpu.pipeline("distill", entry, || {
            [
                include_str!("../../shaders/rows.wgsl"),
                include_str!("../../shaders/distill.wgsl"),
            ]
            .concat()
        })?;
        gpu.run_pass(OP, |pass| {
            let bindings = [
                student.binding(),
                teacher.binding(),
                labels.binding(),
                grad.binding(),
                row_loss.binding(),
                row_correct.binding(),
            ];
            gpu.encode(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &bindings,
                groups,
            )
        })?;
        per_row_to_totals(grad, &row_loss, &row_correct)
    }

    /// CPU reference of [`Distillation::forward`], from the definition, in f64.
    pub fn forward_cpu(
        &self,
        student: &ArrayViewD<'_, f32>,
        teacher: &ArrayViewD<'_, f32>,
        labels: &[usize],
    ) -> Result<CrossEntropy<ArrayD<f32>>> {
        let rows = self.check(student.shape(), teacher.shape(), labels)?;
        let (alpha, t) = (f64::from(self.alpha), f64::from(self.temperature));
        let softmax = |row: &[f64]| {
            let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v - top).exp()).sum();
            row.iter()
                .map(|v| (v - top).exp() / sum)
                .collect::<Vec<_>>()
        };
        let mut grad = student.to_owned();
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for (((s, tr), mut g), &label) in student
            .axis_iter(Axis(0))
            .zip(teacher.axis_iter(Axis(0)))
            .zip(grad.axis_iter_mut(Axis(0)))
            .zip(labels)
        {
            let s: Vec<f64> = s.iter().map(|&v| f64::from(v)).collect();
            let scaled = |v: &[f64]| v.iter().map(|x| x / t).collect::<Vec<_>>();
            let teacher: Vec<f64> = tr.iter().map(|&v| f64::from(v)).collect();
            let (q, pt, ps) = (
                softmax(&scaled(&s)),
                softmax(&scaled(&teacher)),
                softmax(&s),
            );
            let kl: f64 = pt
                .iter()
                .zip(&q)
                .filter(|(p, _)| **p > 0.0)
                .map(|(p, q)| p * (p.ln() - q.ln()))
                .sum();
            loss += alpha * t * t * kl - (1.0 - alpha) * ps[label].ln();
            let top = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            correct += usize::from(s.iter().position(|&v| v == top) == Some(label));
            for (j, out) in g.iter_mut().enumerate() {
                let hard = ps[j] - f64::from(u8::from(j == label));
                *out = ((alpha * t * (q[j] - pt[j]) + (1.0 - alpha) * hard) / rows as f64) as f32;
            }
        }
        let scalar = |v: f64| ArrayD::from_elem(IxDyn(&[1]), v as f32);
        Ok(CrossEntropy {
            loss: scalar(loss / rows as f64),
            grad_logits: grad,
            correct: scalar(correct as f64),
        })
    }
}

impl Value {
    /// The distillation loss of these student logits against the `teacher`'s and `labels`,
    /// on their device: loss, its gradient for the student, and the correct count.
    pub fn distillation(
        &self,
        spec: &Distillation,
        teacher: &Value,
        labels: &[usize],
    ) -> Result<CrossEntropy<Value>> {
        Ok(match self {
            Value::Gpu(s) => spec.forward(s, teacher.gpu()?, labels)?.map(Value::from),
            Value::Cpu(s) => spec
                .forward_cpu(&s.view(), &teacher.cpu()?.view(), labels)?
                .map(Value::from),
        })
    }
}
