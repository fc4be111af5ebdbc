//! Training: the step (forward, loss, backward, update as one submission), evaluation,
//! checkpoints (the model alone, or with the optimizer to resume a run), learning-rate
//! schedules, knowledge distillation and adversarial training.

mod adversarial;
mod checkpoint;
mod distill;
mod predict;
mod pth;
mod resume;
mod schedule;
mod trainer;

pub use adversarial::{
    Attack, adversarial_train_step, attack, discriminator_step, generator_step, input_gradient,
};
pub use checkpoint::{Checkpoint, LoadReport, check_names_and_shapes};
pub use distill::{distill_step, distillation_loss};
pub use predict::Predictions;
pub use schedule::LrSchedule;
pub use trainer::{
    EpochStats, Evaluation, StepOutput, cross_entropy, evaluate, evaluate_on, image_batch,
    label_batch, top_k_correct, train_epoch, train_epoch_on, train_step, train_step_with,
};
