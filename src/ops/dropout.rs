//! Inverted dropout (`shaders/dropout.wgsl`): in training each element is zeroed with
//! probability `rate` and the rest scaled by `1/(1-rate)`, so eval is the identity. The
//! mask comes from a counter-based hash of (seed, step, element index): reproducible, and
//! backward applies the very mask forward used without storing it.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD};

use crate::error::{Error, Result};
use crate::gpu::shared::workgroups;
use crate::tensor::Tensor;
use crate::value::Value;

/// Dropout with a rate in `[0, 1)` and a seed; `step` (e.g. the training step) varies the mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element.
    pub rate: f32,
    /// Seed of the mask sequence.
    pub seed: u32,
}

/// Mirrors `Params` in shaders/dropout.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DropoutParams {
    total: u32,
    seed: u32,
    step: u32,
    rate: f32,
    scale: f32,
    pad: [u32; 3],
}

fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

impl Dropout {
    /// A dropout layer; `rate` must lie in `[0, 1)`.
    pub fn new(rate: f32, seed: u32) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            return Err(Error::InvalidArgument {
                op: "dropout",
                detail: format!("rate {rate} must lie in [0, 1)"),
            });
        }
        Ok(Self { rate, seed })
    }

    /// What kept elements are multiplied by: `1/(1-rate)` in f32, rounded once on the host, so
    /// that every adapter keeps the same values (GPUs divide approximately: `x / (1-rate)`
    /// per element was off in the last bit on NVIDIA).
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.rate)
    }

    /// The uniform draw for element `index` at `step`: the CPU twin of the WGSL hash.
    pub fn uniform(&self, step: u32, index: u32) -> f32 {
        let h = mix(index ^ mix(self.seed ^ mix(step.wrapping_add(0x9e37_79b9))));
        (h >> 8) as f32 / 16_777_216.0
    }

    fn apply(&self, src: &Tensor, step: u32, training: bool) -> Result<Tensor> {
        // Re-check: the fields are public.
        Self::new(self.rate, self.seed)?;
        let gpu = src.gpu();
        let dst = Tensor::uninit(gpu, src.shape())?;
        if !training {
            gpu.copy((src.buffer(), 0), (dst.buffer(), 0), src.bytes())?;
            return Ok(dst);
        }
        let params = DropoutParams {
            total: src.len() as u32,
            seed: self.seed,
            step,
            rate: self.rate,
            scale: self.scale(),
            pad: [0; 3],
        };
        let pipeline = gpu.pipeline("dropout", "main", || {
            include_str!("../../shaders/dropout.wgsl").into()
        })?;
        gpu.run_pass("dropout", |pass| {
            gpu.encode(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &[src.binding(), dst.binding()],
                workgroups(src.len() as u64),
            )
        })?;
        Ok(dst)
    }

    /// `y = mask ⊙ x · scale()` (`scale() = 1/(1-rate)`) in training, `x` in eval.
    pub fn forward(&self, x: &Tensor, step: u32, training: bool) -> Result<Tensor> {
        self.apply(x, step, training)
    }

    /// `dx = mask ⊙ dy · scale()` with the same mask as the forward pass at `step`.
    pub fn backward(&self, dy: &Tensor, step: u32, training: bool) -> Result<Tensor> {
        self.apply(dy, step, training)
    }

    /// CPU reference of [`Dropout::forward`] (and of backward, which is the same map).
    pub fn forward_cpu(
        &self,
        x: &ArrayViewD<'_, f32>,
        step: u32,
        training: bool,
    ) -> Result<ArrayD<f32>> {
        Self::new(self.rate, self.seed)?;
        if !training {
            return Ok(x.to_owned());
        }
        let scale = self.scale();
        let values = x.iter().enumerate().map(|(i, &v)| {
            if self.uniform(step, i as u32) >= self.rate {
                v * scale
            } else {
                0.0
            }
        });
        ArrayD::from_shape_vec(x.raw_dim(), values.collect()).map_err(|e| Error::ShapeMismatch {
            op: "dropout",
            shapes: vec![x.shape().to_vec()],
            detail: e.to_string(),
        })
    }
}

impl Value {
    /// Inverted dropout of this value at `step` (the identity in eval), on its device; the
    /// backward pass is the same map applied to `dy`.
    pub fn dropout(&self, spec: &Dropout, step: u32, training: bool) -> Result<Value> {
        self.map(
            |x| spec.forward(x, step, training),
            |x| spec.forward_cpu(&x.view(), step, training),
        )
    }
}
