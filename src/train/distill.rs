//! Knowledge distillation: a student trains on a blend of the labels and a teacher's
//! softened outputs. The teacher runs forward only, in eval mode, inside the student's step:
//! its logits stay on the GPU and it keeps no values for backward.

use super::trainer::{StepOutput, train_step_with};
use crate::error::Result;
use crate::graph::{Device, Graph, GraphOptimizer, Mode, Value};
use crate::ops::distillation::Distillation;
use crate::ops::softmax_cross_entropy::CrossEntropy;

/// The distillation loss of `student` logits against `teacher` logits and `labels`, on
/// their device.
pub fn distillation_loss(
    spec: Distillation,
    student: &Value,
    teacher: &Value,
    labels: &[usize],
) -> Result<CrossEntropy<Value>> {
    student.distillation(&spec, teacher, labels)
}

/// One student step under `teacher`: teacher forward (eval), student forward, distillation
/// loss, student backward and update — one submission on a GPU.
pub fn distill_step(
    student: &mut Graph,
    teacher: &mut Graph,
    optimizer: &mut GraphOptimizer,
    input: impl FnOnce(&Device) -> Result<Value>,
    labels: &[usize],
    spec: Distillation,
) -> Result<StepOutput> {
    train_step_with(student, optimizer, input, |logits, x| {
        let soft = teacher.forward(x.duplicate()?, Mode::Eval)?;
        distillation_loss(spec, logits, soft, labels)
    })
}
