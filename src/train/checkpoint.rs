//! Checkpoints in the safetensors format: named f32 tensors, row-major, with PyTorch
//! state-dict names (`features.0.weight`, …), and int64 tensors for counters (batch norm's
//! `num_batches_tracked`, step counts). Writing goes to a temporary file of its own beside
//! the target, synced, then renamed over it (`atomic.rs`), so a failed, killed or concurrent
//! save never leaves a broken file.
//! Loading also reads PyTorch's own `torch.save` files (`pth.rs`), so models trained there
//! load without a conversion step.

use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::pth;
use crate::atomic::write_atomically;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Named tensors on the host, sorted by name.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// `(name, value)` pairs of f32 tensors, sorted by name.
    pub tensors: Vec<(String, ArrayD<f32>)>,
    /// `(name, value)` pairs of int64 tensors (counters), sorted by name.
    pub integers: Vec<(String, ArrayD<i64>)>,
}

impl Checkpoint {
    /// Collects named f32 arrays (names must be unique).
    pub fn new(tensors: Vec<(String, ArrayD<f32>)>) -> Result<Self> {
        Self::with_integers(tensors, Vec::new())
    }

    /// Collects named f32 and int64 arrays (names must be unique across both).
    pub fn with_integers(
        tensors: Vec<(String, ArrayD<f32>)>,
        integers: Vec<(String, ArrayD<i64>)>,
    ) -> Result<Self> {
        let (mut tensors, mut integers) = (tensors, integers);
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        integers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut names: Vec<&str> = tensors
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(integers.iter().map(|(n, _)| n.as_str()))
            .collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidArgument {
                op: "checkpoint",
                detail: format!("the name {:?} appears twice", pair[0]),
            });
        }
        Ok(Self { tensors, integers })
    }

    /// The int64 tensor called `name`.
    pub fn get_integer(&self, name: &str) -> Option<&ArrayD<i64>> {
        self.integers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// Reads named GPU tensors back to the host.
    pub fn from_tensors(tensors: &[(&str, &Tensor)]) -> Result<Self> {
        Self::new(
            tensors
                .iter()
                .map(|(name, t)| Ok((name.to_string(), t.to_array()?)))
                .collect::<Result<_>>()?,
        )
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Writes the checkpoint to `path` atomically (its own temporary file, sync, rename):
    /// readers see the old file or the new one, whatever else saves to `path` meanwhile.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let floats = self.tensors.iter().map(|(name, t)| {
            let data: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, Dtype::F32, t.shape(), data)
        });
        let integers = self.integers.iter().map(|(name, t)| {
            let data: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, Dtype::I64, t.shape(), data)
        });
        let encoded: Vec<_> = floats.chain(integers).collect();
        let views = encoded
            .iter()
            .map(|(name, dtype, shape, data)| {
                Ok((
                    name.as_str(),
                    TensorView::new(*dtype, shape.to_vec(), data)
                        .map_err(|e| Error::data(path, e.to_string()))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let serialized = safetensors::tensor::serialize(views, None)
            .map_err(|e| Error::data(path, format!("cannot serialise: {e}")))?;
        write_atomically(path, &serialized)
            .map_err(|e| Error::data_io(path, "cannot write the checkpoint", e))
    }

    /// Reads a checkpoint: safetensors (as [`Checkpoint::save`] writes, or PyTorch's
    /// `safetensors.torch.save_file`) or PyTorch's `torch.save(model.state_dict(), path)`
    /// (`.pth`/`.pt`), told apart by content, not by the file's name.
    ///
    /// Float tensors (float32; float16, bfloat16 and float64 converted to f32, exactly or
    /// rounded to nearest) land in [`Checkpoint::tensors`], integer ones (int64, int32) in
    /// [`Checkpoint::integers`]. A `.pth` file is read without running its pickle: only
    /// state dicts of tensors load, and a pickled module (`torch.save(model)`) or any other
    /// callable is refused by name. Of a training checkpoint (a dict such as `{"model":
    /// state_dict, "optimizer": ..., "epoch": 3}`) the tensors under `"state_dict"`, else
    /// `"model"`, load. The legacy pre-1.6 torch format and big-endian files are refused
    /// with how to re-save them. Every failure is [`Error::Data`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::data_io(path, "cannot read the checkpoint", e))?;
        if pth::is_zip(&bytes) {
            let (tensors, integers) = pth::load(path, &bytes)?;
            return Self::with_integers(tensors, integers);
        }
        if pth::is_legacy(&bytes) {
            let (tensors, integers) = pth::load_legacy(path, &bytes)?;
            return Self::with_integers(tensors, integers);
        }
        let file = SafeTensors::deserialize(&bytes).map_err(|e| {
            let hint = if pth::looks_like_pickle(&bytes) {
                " (it starts like a bare Python pickle: wgcnn reads torch.save's zip format \
                 and safetensors)"
            } else {
                ""
            };
            Error::data(path, format!("not a valid safetensors file: {e}{hint}"))
        })?;
        let (mut tensors, mut integers) = (Vec::new(), Vec::new());
        for (name, view) in file.tensors() {
            let data = view.data();
            let shape = view.shape();
            match view.dtype() {
                Dtype::F32 => {
                    let values = elements(data, f32::from_le_bytes);
                    tensors.push((name.clone(), shaped(path, &name, shape, values)?));
                }
                Dtype::F16 => {
                    let values = elements(data, |b| pth::f16_to_f32(u16::from_le_bytes(b)));
                    tensors.push((name.clone(), shaped(path, &name, shape, values)?));
                }
                Dtype::BF16 => {
                    let values = elements(data, |b| pth::bf16_to_f32(u16::from_le_bytes(b)));
                    tensors.push((name.clone(), shaped(path, &name, shape, values)?));
                }
                Dtype::F64 => {
                    let values = elements(data, |b| f64::from_le_bytes(b) as f32);
                    tensors.push((name.clone(), shaped(path, &name, shape, values)?));
                }
                Dtype::I64 => {
                    let values = elements(data, i64::from_le_bytes);
                    integers.push((name.clone(), shaped(path, &name, shape, values)?));
                }
                Dtype::I32 => {
                    let values = elements(data, |b| i64::from(i32::from_le_bytes(b)));
                    integers.push((name.clone(), shaped(path, &name, shape, values)?));
                }
                other => {
                    return Err(Error::data(
                        path,
                        format!(
                            "tensor {name:?} is {other:?}; wgcnn reads F32, F16, BF16, F64 \
                             (as f32), I64 and I32 (as int64)"
                        ),
                    ));
                }
            }
        }
        Self::with_integers(tensors, integers)
    }
}

/// Little-endian elements of `N` bytes each.
fn elements<T, const N: usize>(data: &[u8], decode: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .filter_map(|c| c.first_chunk::<N>())
        .map(|c| decode(*c))
        .collect()
}

/// A loaded tensor's values under its shape.
fn shaped<T>(path: &Path, name: &str, shape: &[usize], values: Vec<T>) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(shape), values)
        .map_err(|e| Error::data(path, format!("tensor {name:?}: {e}")))
}

/// Checks a checkpoint against the names and shapes a model expects; the error lists every
/// missing, unexpected and differently shaped tensor.
pub fn check_names_and_shapes(
    checkpoint: &Checkpoint,
    expected: &[(&str, &[usize])],
) -> Result<()> {
    into_result(name_and_shape_problems(checkpoint, expected))
}

fn into_result(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op: "checkpoint",
            shapes: Vec::new(),
            detail: problems.join("; "),
        })
    }
}

/// Each missing, unexpected or differently shaped f32 tensor.
fn name_and_shape_problems(checkpoint: &Checkpoint, expected: &[(&str, &[usize])]) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match checkpoint.get(name) {
            None if checkpoint.get_integer(name).is_some() => problems.push(format!(
                "{name:?} is an integer tensor in the checkpoint, the model keeps it as \
                 float32: save it as floats (PyTorch: `tensor.float()`)"
            )),
            None => problems.push(format!("missing {name:?}")),
            Some(t) if t.shape() != *shape => problems.push(format!(
                "{name:?} is {:?}, the model needs {shape:?}",
                t.shape()
            )),
            Some(_) => {}
        }
    }
    for (name, _) in &checkpoint.tensors {
        if !expected.iter().any(|(n, _)| n == name) {
            problems.push(format!("unexpected {name:?}"));
        }
    }
    problems
}

/// A saved count as the state tensor that holds it (the bits of a `u32`).
fn counter_state(name: &str, saved: &ArrayD<i64>) -> std::result::Result<ArrayD<f32>, String> {
    if saved.iter().any(|&v| u32::try_from(v).is_err()) {
        return Err(format!("{name:?} holds a count outside 0..=u32::MAX"));
    }
    Ok(saved.mapv(|v| f32::from_bits(v as u32)))
}

impl crate::graph::Graph {
    /// All state tensors (`state_dict`), read back to the host; counts (batch norm's
    /// `num_batches_tracked`) as int64, as PyTorch keeps them.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let (mut tensors, mut integers) = (Vec::new(), Vec::new());
        for (name, value) in self.all_state() {
            let array = value.to_array()?;
            if self.is_counter(&name) {
                integers.push((name, array.mapv(|v| i64::from(v.to_bits()))));
            } else {
                tensors.push((name, array));
            }
        }
        Checkpoint::with_integers(tensors, integers)
    }

    /// Saves the state to `path` atomically; the previous file survives a failed save.
    ///
    /// ```
    /// use wgcnn::prelude::*;
    ///
    /// # fn main() -> wgcnn::Result<()> {
    /// let layers = || Sequential::new().add("flatten", Flatten).add("fc", Linear::lazy(2));
    /// let mut model = layers().build_for(&[1, 1, 2, 2], Device::Cpu, 1)?;
    /// # // A name of its own per process: two test runs at once would share it.
    /// # let name = format!("wgcnn-doc-checkpoint-{}.safetensors", std::process::id());
    /// let path = std::env::temp_dir().join(name);
    /// model.save(&path)?; // safetensors, PyTorch state_dict names: fc.weight, fc.bias
    ///
    /// let mut restored = layers().build_for(&[1, 1, 2, 2], Device::Cpu, 2)?; // other seed
    /// restored.load(&path)?;
    /// let x = ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), 0.5f32);
    /// assert_eq!(restored.logits(&x)?, model.logits(&x)?);
    /// # std::fs::remove_file(path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.checkpoint()?.save(path)
    }

    /// Replaces every state tensor with the checkpoint's: names and shapes must match
    /// exactly (the error lists each difference), and nothing changes if they do not. A
    /// count the checkpoint lacks (one written before batch norm kept `num_batches_tracked`)
    /// is left as it is, as PyTorch does for old state dicts.
    pub fn load_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        if super::resume::is_training_checkpoint(checkpoint) {
            return Err(Error::ShapeMismatch {
                op: "checkpoint",
                shapes: Vec::new(),
                detail: "this is a training checkpoint (it holds the optimizer's state too): \
                         resume it with Graph::load_training(path, &mut optimizer), or take \
                         the weights alone with Graph::load_matching"
                    .into(),
            });
        }
        let state: Vec<(String, Vec<usize>)> = self
            .all_state()
            .into_iter()
            .map(|(name, value)| (name, value.shape().to_vec()))
            .collect();
        let (counters, weights): (Vec<_>, Vec<_>) =
            state.iter().partition(|(name, _)| self.is_counter(name));
        let borrowed: Vec<(&str, &[usize])> = weights
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let mut problems = name_and_shape_problems(checkpoint, &borrowed);
        let mut counts = Vec::new();
        for (name, saved) in &checkpoint.integers {
            match counters.iter().find(|(n, _)| n == name) {
                // Named above as a float the checkpoint holds as integers.
                None if weights.iter().any(|(n, _)| n == name) => {}
                None => problems.push(format!("unexpected {name:?}")),
                Some((_, shape)) if saved.shape() != shape.as_slice() => problems.push(format!(
                    "{name:?} is {:?}, the model needs {shape:?}",
                    saved.shape()
                )),
                Some(_) => match counter_state(name, saved) {
                    Ok(value) => counts.push((name, value)),
                    Err(problem) => problems.push(problem),
                },
            }
        }
        into_result(problems)?;
        for (name, value) in &checkpoint.tensors {
            self.set_state(name, value.clone())?;
        }
        for (name, value) in counts {
            self.set_state_raw(name, value)?;
        }
        Ok(())
    }

    /// Loads the state from a file [`Checkpoint::load`] reads: a safetensors file written by
    /// [`Self::save`], or PyTorch's `state_dict` as `.pth` or `.safetensors` (same names and
    /// layouts, as the models of [`crate::models`] have).
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.load_checkpoint(&Checkpoint::load(path)?)
    }
}

/// What [`Graph::load_matching`](crate::graph::Graph::load_matching) did with each tensor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Loaded: same name and shape in the checkpoint and the model.
    pub loaded: Vec<String>,
    /// In the checkpoint but not in the model: ignored.
    pub skipped: Vec<String>,
    /// In both, with different shapes `(name, checkpoint shape, model shape)`: left as the
    /// model had it.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// In the model but not in the checkpoint: left as the model had it.
    pub missing: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "loaded {}: {}",
            self.loaded.len(),
            self.loaded.join(", ")
        )?;
        writeln!(
            f,
            "skipped {}: {}",
            self.skipped.len(),
            self.skipped.join(", ")
        )?;
        let mismatched: Vec<String> = self
            .mismatched
            .iter()
            .map(|(n, c, m)| format!("{n} (checkpoint {c:?}, model {m:?})"))
            .collect();
        writeln!(
            f,
            "mismatched {}: {}",
            mismatched.len(),
            mismatched.join(", ")
        )?;
        write!(
            f,
            "missing {}: {}",
            self.missing.len(),
            self.missing.join(", ")
        )
    }
}

impl crate::graph::Graph {
    /// Loads every tensor whose name and shape match (transfer learning: a model with a
    /// different head takes the rest), and reports what was loaded, skipped, mismatched or
    /// missing.
    pub fn load_matching(&mut self, checkpoint: &Checkpoint) -> Result<LoadReport> {
        let model: Vec<(String, Vec<usize>)> = self
            .all_state()
            .into_iter()
            .map(|(name, value)| (name, value.shape().to_vec()))
            .collect();
        let mut report = LoadReport::default();
        for (name, shape) in &model {
            if self.is_counter(name) {
                let count = checkpoint
                    .get_integer(name)
                    .filter(|t| t.shape() == shape.as_slice());
                match count.map(|t| counter_state(name, t)) {
                    Some(Ok(value)) => {
                        self.set_state_raw(name, value)?;
                        report.loaded.push(name.clone());
                    }
                    Some(Err(problem)) => {
                        return Err(Error::ShapeMismatch {
                            op: "checkpoint",
                            shapes: Vec::new(),
                            detail: problem,
                        });
                    }
                    None => report.missing.push(name.clone()),
                }
                continue;
            }
            match checkpoint.get(name) {
                None => report.missing.push(name.clone()),
                Some(t) if t.shape() != shape.as_slice() => {
                    report
                        .mismatched
                        .push((name.clone(), t.shape().to_vec(), shape.clone()))
                }
                Some(t) => {
                    self.set_state(name, t.clone())?;
                    report.loaded.push(name.clone());
                }
            }
        }
        let names = checkpoint.tensors.iter().map(|(n, _)| n);
        report.skipped = names
            .chain(checkpoint.integers.iter().map(|(n, _)| n))
            .filter(|n| !model.iter().any(|(m, _)| m == *n))
            .cloned()
            .collect();
        Ok(report)
    }
}
