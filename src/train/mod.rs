//! Training: the step (forward, loss, backward, update as one submission), evaluation,
//! and checkpoints.

mod checkpoint;
mod trainer;

pub use checkpoint::{Checkpoint, check_names_and_shapes};
pub use trainer::{
    Evaluation, StepOutput, cross_entropy, evaluate, image_batch, label_batch, train_step,
};
