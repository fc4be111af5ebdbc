//! Resuming a training run: the model's state, the optimizer's state and both step counts in
//! one safetensors file (written atomically, as every checkpoint), so that stopping and
//! resuming gives the weights that not stopping gives.
//!
//! Names: the model's own (`conv1.weight`, …); the optimizer's state per trained tensor under
//! PyTorch's state names (`optimizer.conv1.weight.exp_avg`, `….momentum_buffer`, `….sum`,
//! `….max_exp_avg_sq`) with each parameter's own step count (`optimizer.conv1.weight.step`,
//! as PyTorch keeps `step` per parameter); the counts as int64 scalars (`optimizer.step`,
//! `graph.step`, which seeds the dropout masks).

use std::path::Path;

use ndarray::{ArrayD, arr0};

use super::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::{Graph, GraphOptimizer};

const OPTIMIZER: &str = "optimizer.";
const OPTIMIZER_STEP: &str = "optimizer.step";
const GRAPH_STEP: &str = "graph.step";

/// Whether `checkpoint` is a training checkpoint (it holds an optimizer's state).
pub(crate) fn is_training_checkpoint(checkpoint: &Checkpoint) -> bool {
    checkpoint
        .integers
        .iter()
        .any(|(n, _)| n == OPTIMIZER_STEP || n == GRAPH_STEP)
        || checkpoint
            .tensors
            .iter()
            .any(|(n, _)| n.starts_with(OPTIMIZER))
}

/// The rule whose state tensors per parameter are `slots` (PyTorch's names).
fn rule_keeping(slots: &[&str]) -> &'static str {
    match slots {
        [] => "SGD without momentum",
        ["momentum_buffer"] => "SGD with momentum",
        ["sum"] => "AdaGrad",
        ["exp_avg", "exp_avg_sq"] => "Adam or AdamW",
        ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] => "Adam or AdamW with amsgrad",
        _ => "an unknown rule",
    }
}

fn mismatch(detail: String) -> Error {
    Error::ShapeMismatch {
        op: "training checkpoint",
        shapes: Vec::new(),
        detail,
    }
}

/// The step count stored under `name`.
fn count(checkpoint: &Checkpoint, name: &str) -> Result<u32> {
    let value = checkpoint
        .get_integer(name)
        .filter(|t| t.len() == 1)
        .and_then(|t| t.iter().next().copied())
        .ok_or_else(|| {
            mismatch(format!(
                "no {name:?} count: not a checkpoint written by Graph::save_training"
            ))
        })?;
    u32::try_from(value).map_err(|_| mismatch(format!("{name:?} is {value}, not a step count")))
}

impl Graph {
    /// The model's state, `optimizer`'s state and the step counts, as one checkpoint.
    pub fn training_checkpoint(&self, optimizer: &GraphOptimizer) -> Result<Checkpoint> {
        let model = self.checkpoint()?;
        let slots = optimizer.rule().state_names();
        let mut tensors = model.tensors;
        let mut integers = model.integers;
        for (name, step, arrays) in optimizer.state_arrays()? {
            for (slot, array) in slots.iter().zip(arrays) {
                tensors.push((format!("{OPTIMIZER}{name}.{slot}"), array));
            }
            let key = format!("{OPTIMIZER}{name}.step");
            integers.push((key, arr0(i64::from(step)).into_dyn()));
        }
        for (name, value) in [
            (OPTIMIZER_STEP, optimizer.steps()),
            (GRAPH_STEP, self.steps()),
        ] {
            integers.push((name.into(), arr0(i64::from(value)).into_dyn()));
        }
        Checkpoint::with_integers(tensors, integers)
    }

    /// Saves the model, `optimizer`'s state and the step counts to `path` atomically.
    ///
    /// ```
    /// use wgcnn::prelude::*;
    ///
    /// # fn main() -> wgcnn::Result<()> {
    /// let layers = || Sequential::new().add("flatten", Flatten).add("fc", Linear::lazy(2));
    /// let mut model = layers().build_for(&[4, 1, 2, 2], Device::Cpu, 1)?;
    /// let mut adam = model.optimizer(Optimizer::adam(1e-2))?;
    /// let x = ArrayD::from_shape_fn(IxDyn(&[4, 1, 2, 2]), |d| d[0] as f32 - d[3] as f32);
    /// let labels = [0, 1, 1, 0];
    /// wgcnn::train::train_step(&mut model, &mut adam, |d| d.upload(x.clone()), &labels)?;
    /// # // A name of its own per process: two test runs at once would share it.
    /// # let name = format!("wgcnn-doc-training-{}.safetensors", std::process::id());
    /// let path = std::env::temp_dir().join(name);
    /// model.save_training(&adam, &path)?;
    ///
    /// // Later, or in another process: the same layers, a fresh optimizer, then resume.
    /// let mut resumed = layers().build_for(&[4, 1, 2, 2], Device::Cpu, 9)?;
    /// let mut resumed_adam = resumed.optimizer(Optimizer::adam(1e-2))?;
    /// resumed.load_training(&mut resumed_adam, &path)?;
    /// assert_eq!(resumed_adam.steps(), 1);
    /// # std::fs::remove_file(path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn save_training(&self, optimizer: &GraphOptimizer, path: impl AsRef<Path>) -> Result<()> {
        self.training_checkpoint(optimizer)?.save(path)
    }

    /// Restores what [`Graph::training_checkpoint`] holds into this model and `optimizer`
    /// (built with the same layers and rule). Everything is checked first: a missing,
    /// unexpected or differently shaped tensor is an error that lists each difference, and
    /// then neither the model nor the optimizer has changed.
    pub fn load_training_checkpoint(
        &mut self,
        optimizer: &mut GraphOptimizer,
        checkpoint: &Checkpoint,
    ) -> Result<()> {
        let (optimizer_step, graph_step) = (
            count(checkpoint, OPTIMIZER_STEP)?,
            count(checkpoint, GRAPH_STEP)?,
        );
        let saved: Vec<&(String, ArrayD<f32>)> = checkpoint
            .tensors
            .iter()
            .filter(|(name, _)| name.starts_with(OPTIMIZER))
            .collect();
        let slots = optimizer.rule().state_names();
        let mut problems = Vec::new();
        let mut state = Vec::new();
        // Every trainable parameter (frozen ones too) the checkpoint holds state for: all of
        // the rule's tensors at its shape, and its own step count (older files kept only
        // the optimizer's).
        let mut used = 0;
        for (name, shape) in self.trainable() {
            let prefix = format!("{OPTIMIZER}{name}.");
            let step_key = format!("{prefix}step");
            let has_state = saved.iter().any(|(n, _)| {
                n.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('.'))
            }) || checkpoint.get_integer(&step_key).is_some();
            if !has_state {
                continue;
            }
            let mut arrays = Vec::new();
            for slot in slots {
                let key = format!("{prefix}{slot}");
                match saved.iter().find(|(n, _)| *n == key) {
                    None => problems.push(format!("missing {key:?}")),
                    Some((_, a)) if a.shape() != shape.as_slice() => problems.push(format!(
                        "{key:?} is {:?}, the parameter is {shape:?}",
                        a.shape()
                    )),
                    Some((_, a)) => arrays.push(a.clone()),
                }
            }
            used += slots.len();
            let step = match checkpoint.get_integer(&step_key) {
                Some(_) => count(checkpoint, &step_key)?,
                None => optimizer_step,
            };
            state.push((name, step, arrays));
        }
        if saved.len() > used {
            problems.push(format!(
                "{} optimizer tensors for {used} expected ({:?} per trained tensor): a different rule or model?",
                saved.len(),
                slots
            ));
        }
        if optimizer_step > 0 && state.is_empty() && !slots.is_empty() {
            problems.push("no optimizer state for any parameter of this model".into());
        }
        if !problems.is_empty() {
            // Another rule than the run's is the usual cause: name both.
            let mut kept: Vec<&str> = saved
                .iter()
                .filter_map(|(n, _)| n.rsplit('.').next())
                .collect();
            kept.sort_unstable();
            kept.dedup();
            let mut wanted = slots.to_vec();
            wanted.sort_unstable();
            if kept != wanted {
                problems.push(format!(
                    "the checkpoint keeps {kept:?} per parameter, the state of {}; this \
                     optimizer ({}) keeps {wanted:?}: resume with the rule the run was saved \
                     with",
                    rule_keeping(&kept),
                    rule_keeping(&wanted)
                ));
            }
            return Err(mismatch(problems.join("; ")));
        }
        let model = Checkpoint::with_integers(
            checkpoint
                .tensors
                .iter()
                .filter(|(name, _)| !name.starts_with(OPTIMIZER))
                .cloned()
                .collect(),
            checkpoint
                .integers
                .iter()
                .filter(|(name, _)| !name.starts_with(OPTIMIZER) && name != GRAPH_STEP)
                .cloned()
                .collect(),
        )?;
        self.load_checkpoint(&model)?;
        optimizer.restore(&self.device().clone(), optimizer_step, state)?;
        self.set_steps(graph_step);
        Ok(())
    }

    /// Reads a file written by [`Graph::save_training`] and resumes from it (see
    /// [`Graph::load_training_checkpoint`]).
    pub fn load_training(
        &mut self,
        optimizer: &mut GraphOptimizer,
        path: impl AsRef<Path>,
    ) -> Result<()> {
        self.load_training_checkpoint(optimizer, &Checkpoint::load(path)?)
    }
}
