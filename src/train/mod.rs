//! Training support: checkpoints now; the trainer, transfer learning, distillation and
//! adversarial training build on the graph executor.

mod checkpoint;

pub use checkpoint::{Checkpoint, check_names_and_shapes};
