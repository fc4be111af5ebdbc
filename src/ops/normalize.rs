//! Input normalisation per channel, `(x − mean[c]) / std[c]` on NCHW data
//! (`shaders/normalize.wgsl`), from f32 tensors or straight from image bytes (÷255 on the
//! GPU, so uploads are a quarter of the size).

use bytemuck::{Pod, Zeroable};
use ndarray::{Array1, ArrayD, ArrayView4, ArrayViewD};

use crate::error::{Error, Result};
use crate::gpu::shared::workgroups;
use crate::gpu::{Generated, Gpu};
use crate::tensor::Tensor;
use crate::value::{Device, Value};

const OP: &str = "normalize";

/// Per-channel statistics, e.g. MNIST's `Normalize::new(&[0.1307], &[0.3081])`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// Mirrors `Params` in shaders/normalize.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NormalizeParams {
    total: u32,
    channels: u32,
    plane: u32,
    _pad: u32,
}

/// A normalisation kernel, plain or cutting crops and flips (`ops/crop_flip.rs`), whose
/// source is f32 values or image bytes packed four to a word (`{{SRC_TYPE}}` in its shader).
#[derive(Debug)]
pub(super) struct NormalizeKernel {
    /// The shader of crops and flips, not the plain one.
    pub(super) crop_flip: bool,
    /// The source is u8 pixels packed four to a word.
    pub(super) from_bytes: bool,
}

impl Generated for NormalizeKernel {
    fn source(&self) -> String {
        let element = if self.from_bytes { "u32" } else { "f32" };
        let shader = if self.crop_flip {
            include_str!("../../shaders/crop_flip.wgsl")
        } else {
            include_str!("../../shaders/normalize.wgsl")
        };
        shader.replace("{{SRC_TYPE}}", element)
    }
}

impl Normalize {
    /// MNIST's statistics: mean 0.1307, standard deviation 0.3081.
    pub fn mnist() -> Self {
        Self {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }

    /// One mean and one positive standard deviation per channel.
    pub fn new(mean: &[f32], std: &[f32]) -> Result<Self> {
        if mean.is_empty() || mean.len() != std.len() {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!(
                    "{} means and {} standard deviations; give one of each per channel",
                    mean.len(),
                    std.len()
                ),
            });
        }
        if let Some(bad) = std.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!("standard deviation {bad} must be positive and finite"),
            });
        }
        Ok(Self {
            mean: mean.to_vec(),
            std: std.to_vec(),
        })
    }

    /// The mean per channel.
    pub(crate) fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// The standard deviation per channel.
    pub(crate) fn std(&self) -> &[f32] {
        &self.std
    }

    fn check(&self, shape: &[usize]) -> Result<(usize, usize)> {
        match *shape {
            [_, c, h, w] if c == self.mean.len() => Ok((c, h * w)),
            _ => Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![shape.to_vec()],
                detail: format!(
                    "input must be [N, {}, H, W], got {shape:?}",
                    self.mean.len()
                ),
            }),
        }
    }

    fn run(&self, gpu: &Gpu, shape: &[usize], entry: &str, src: &Tensor) -> Result<Tensor> {
        let (channels, plane) = self.check(shape)?;
        let dst = Tensor::uninit(gpu, shape)?;
        let (mean, inv_std) = self.statistics(gpu)?;
        let params = NormalizeParams {
            total: dst.len() as u32,
            channels: channels as u32,
            plane: plane as u32,
            _pad: 0,
        };
        let kernel = NormalizeKernel {
            crop_flip: false,
            from_bytes: entry == "from_bytes",
        };
        let pipeline = gpu.generated(&kernel, entry, &[])?;
        let bindings = [
            mean.binding(),
            inv_std.binding(),
            dst.binding(),
            src.binding(),
        ];
        gpu.run_pass(OP, |pass| {
            gpu.encode(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &bindings,
                workgroups(dst.len() as u64),
            )
        })?;
        Ok(dst)
    }

    /// The means and the reciprocal standard deviations, on the GPU.
    pub(super) fn statistics(&self, gpu: &Gpu) -> Result<(Tensor, Tensor)> {
        let mean = Tensor::from_array(gpu, &Array1::from(self.mean.clone()))?;
        let inv_std = Tensor::from_array(
            gpu,
            &self.std.iter().map(|s| 1.0 / s).collect::<Array1<f32>>(),
        )?;
        Ok((mean, inv_std))
    }

    /// Normalises an f32 `[N, C, H, W]` tensor.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x.gpu(), x.shape(), "from_floats", x)
    }

    /// Uploads image bytes `[N, C, H, W]` and normalises `byte / 255` on the GPU.
    pub fn from_bytes(&self, gpu: &Gpu, images: &ArrayView4<'_, u8>) -> Result<Tensor> {
        self.run(
            gpu,
            images.shape(),
            "from_bytes",
            &packed_bytes(gpu, images)?,
        )
    }

    /// Image bytes `[N, C, H, W]` as normalised values `byte / 255` on `device` (on a GPU
    /// the bytes are uploaded as they are and scaled there).
    pub fn bytes_on(&self, device: &Device, images: &ArrayView4<'_, u8>) -> Result<Value> {
        match device.gpu() {
            Some(gpu) => Ok(self.from_bytes(gpu, images)?.into()),
            None => Ok(self.from_bytes_cpu(images)?.into()),
        }
    }

    /// CPU reference of [`Normalize::from_bytes`].
    pub fn from_bytes_cpu(&self, images: &ArrayView4<'_, u8>) -> Result<ArrayD<f32>> {
        let floats = images.mapv(|b| f32::from(b) / 255.0).into_dyn();
        self.forward_cpu(&floats.view())
    }

    /// CPU reference of [`Normalize::forward`].
    pub fn forward_cpu(&self, x: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let (channels, plane) = self.check(x.shape())?;
        let values = x.iter().enumerate().map(|(i, &v)| {
            let c = (i / plane) % channels;
            (v - self.mean[c]) / self.std[c]
        });
        ArrayD::from_shape_vec(x.raw_dim(), values.collect()).map_err(|e| Error::ShapeMismatch {
            op: OP,
            shapes: vec![x.shape().to_vec()],
            detail: e.to_string(),
        })
    }
}

/// Image bytes on the GPU, four to a 32-bit word (the last one padded with zeros): the
/// tensor only carries them, the shaders read u32.
pub(super) fn packed_bytes(gpu: &Gpu, images: &ArrayView4<'_, u8>) -> Result<Tensor> {
    let mut bytes: Vec<u8> = images.iter().copied().collect();
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    Tensor::from_words(gpu, &bytemuck::pod_collect_to_vec::<u8, u32>(&bytes))
}

impl Value {
    /// This `[N, C, H, W]` value normalised per channel, on its device.
    pub fn normalize(&self, spec: &Normalize) -> Result<Value> {
        self.map(|x| spec.forward(x), |x| spec.forward_cpu(&x.view()))
    }
}
