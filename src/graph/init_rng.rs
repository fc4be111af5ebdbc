//! The seeded stream each state tensor is initialised from. Each tensor draws from its own
//! stream, seeded by the model seed and the tensor's full name, so equal seeds give equal
//! weights and adding a layer leaves the other layers' initial weights unchanged.

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::host_vec;

/// A SplitMix64 stream for one tensor, which also checks the tensor's size before it is
/// allocated (against the GPU's buffer limit when it will live there, and the host's memory).
pub struct InitRng {
    state: u64,
    name: String,
    gpu: Option<Gpu>,
}

impl InitRng {
    /// The stream of the tensor called `name` under the model `seed`.
    pub fn for_tensor(seed: u64, name: &str) -> Self {
        // FNV-1a over the name, mixed with the seed.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self {
            state: seed ^ hash.rotate_left(17),
            name: name.to_string(),
            gpu: None,
        }
    }

    /// Checks sizes against `gpu`'s buffer limit too (the tensor will be uploaded there).
    pub(crate) fn for_gpu(mut self, gpu: Option<&Gpu>) -> Self {
        self.gpu = gpu.cloned();
        self
    }

    /// Room for the elements of a tensor of `shape`, and their count, allocated only if it
    /// can exist: an error names the tensor and its size instead of aborting the process
    /// (`Linear::new(100_000, 100_000)` asks for 40 GB).
    fn allocate(&self, shape: &[usize]) -> Result<(Vec<f32>, usize)> {
        host_vec("initialisation", &self.name, shape, |bytes| {
            match &self.gpu {
                Some(gpu) => gpu.check_buffer_size(&format!("{} {shape:?}", self.name), bytes),
                None => Ok(()),
            }
        })
    }

    /// An array of `shape` filled with `value` (running statistics, scales).
    pub fn filled(&self, shape: &[usize], value: f32) -> Result<ArrayD<f32>> {
        let (mut values, count) = self.allocate(shape)?;
        values.resize(count, value);
        shaped(shape, values)
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An array of `shape` uniform in `[-bound, bound)`.
    pub fn uniform(&mut self, shape: &[usize], bound: f32) -> Result<ArrayD<f32>> {
        let (mut values, count) = self.allocate(shape)?;
        for _ in 0..count {
            let unit = (self.next_u64() >> 40) as f32 / 16_777_216.0;
            values.push((2.0 * unit - 1.0) * bound);
        }
        shaped(shape, values)
    }
}

fn shaped(shape: &[usize], values: Vec<f32>) -> Result<ArrayD<f32>> {
    ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| Error::ShapeMismatch {
        op: "initialisation",
        shapes: vec![shape.to_vec()],
        detail: e.to_string(),
    })
}
