//! Crops and flips fused with input normalisation (`shaders/crop_flip.wgsl`): each image's
//! window ([`CropFlip`], drawn on the host by `data::Augmentation::crop_flip`) read from the
//! stored images, bytes or floats, out-of-image pixels the crop's fill, then
//! `(x − mean[c]) / std[c]`. What `data::Batch::upload` runs when a loader leaves its crops
//! and flips to the device (`LoaderOptions::augment_on_device`): the host only gathers
//! images and draws three numbers per image.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayView4};

use super::Normalize;
use super::normalize::{NormalizeKernel, packed_bytes};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::shared::workgroups;
use crate::tensor::{Tensor, gpu_word};
use crate::value::{Device, Value};

const OP: &str = "crop_flip";

/// Where a crop-and-flip chain reads an image: output pixel `(y, x)` is source pixel
/// `(top + y, left + x)`, or `(top + y, left + width − 1 − x)` when `flipped` (`width` the
/// output's); a source pixel outside the image is the crop's fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    /// The window's first row in the source (negative inside the top padding).
    pub top: i64,
    /// The window's first column in the source (negative inside the left padding).
    pub left: i64,
    /// Whether the window is read right to left.
    pub flipped: bool,
}

/// A batch's crops and flips, left for the device: one window per image of the stored
/// images' shape `source`, each giving an output of `size`.
#[derive(Clone, Debug, PartialEq)]
pub struct CropFlips {
    /// The stored images' `[C, H, W]`.
    pub source: [usize; 3],
    /// Each output image's `(height, width)`.
    pub size: (usize, usize),
    /// One window per image, in the batch's order.
    pub windows: Vec<CropFlip>,
    /// What pixels outside an image read, as a byte (float images read `fill / 255`).
    pub fill: u8,
}

/// Mirrors `Params` in shaders/crop_flip.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CropFlipParams {
    total: u32,
    channels: u32,
    out_h: u32,
    out_w: u32,
    in_h: u32,
    in_w: u32,
    fill_byte: u32,
    fill_value: f32,
}

impl CropFlips {
    /// The output shape `[N, C, height, width]`, after checking that `images` are one
    /// `source` image per window and `normalize` has one statistic per channel.
    pub fn output_shape(&self, images: &[usize], normalize: &Normalize) -> Result<[usize; 4]> {
        let [c, h, w] = self.source;
        let n = self.windows.len();
        let (oh, ow) = self.size;
        if [n, c, h, w, oh, ow].contains(&0) {
            return Err(invalid(format!(
                "{n} windows of {oh}×{ow} on images of {c}×{h}×{w}: every size must be at \
                 least 1"
            )));
        }
        if images != [n, c, h, w] {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![images.to_vec(), vec![n, c, h, w]],
                detail: format!(
                    "images {images:?} for {n} windows on images of {c}×{h}×{w}: give one \
                     stored image per window"
                ),
            });
        }
        // Source indices travel to the kernel as i32, with −1 meaning "the fill", and so do
        // the windows' offsets.
        let stored = n * c * h * w;
        if i32::try_from(stored).is_err() {
            return Err(invalid(format!(
                "{stored} source pixels: the device takes at most 2^31 − 1 per batch; use \
                 smaller batches"
            )));
        }
        if let Some(far) = self.windows.iter().find(|window| {
            [window.top, window.left]
                .iter()
                .any(|v| v.unsigned_abs() > (1 << 30))
        }) {
            return Err(invalid(format!(
                "a window at {far:?}: offsets past ±2^30 reach no pixel of an image the device \
                 takes"
            )));
        }
        if normalize.mean().len() != c {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![images.to_vec()],
                detail: format!(
                    "{c} channels normalised with {} statistics: give one per channel",
                    normalize.mean().len()
                ),
            });
        }
        Ok([n, c, oh, ow])
    }

    /// The windows cut from image bytes `[N, C, H, W]`, flipped, scaled by 1/255 and
    /// normalised on the GPU: `[N, C, height, width]`. The bytes go up four to a word.
    pub fn from_bytes(
        &self,
        gpu: &Gpu,
        images: &ArrayView4<'_, u8>,
        normalize: &Normalize,
    ) -> Result<Tensor> {
        let source = packed_bytes(gpu, images)?;
        self.run(gpu, images.shape(), normalize, &source, true)
    }

    /// [`CropFlips::from_bytes`] for float images (already in the model's scale).
    pub fn from_floats(
        &self,
        gpu: &Gpu,
        images: &ArrayView4<'_, f32>,
        normalize: &Normalize,
    ) -> Result<Tensor> {
        let values: Vec<f32> = images.iter().copied().collect();
        let source = Tensor::from_words(gpu, bytemuck::cast_slice(&values))?;
        self.run(gpu, images.shape(), normalize, &source, false)
    }

    /// [`CropFlips::from_bytes`] on `device`: the GPU's kernel or the CPU reference.
    pub fn bytes_on(
        &self,
        device: &Device,
        images: &ArrayView4<'_, u8>,
        normalize: &Normalize,
    ) -> Result<Value> {
        match device.gpu() {
            Some(gpu) => Ok(self.from_bytes(gpu, images, normalize)?.into()),
            None => Ok(self.from_bytes_cpu(images, normalize)?.into()),
        }
    }

    /// [`CropFlips::from_floats`] on `device`.
    pub fn floats_on(
        &self,
        device: &Device,
        images: &ArrayView4<'_, f32>,
        normalize: &Normalize,
    ) -> Result<Value> {
        match device.gpu() {
            Some(gpu) => Ok(self.from_floats(gpu, images, normalize)?.into()),
            None => Ok(self.from_floats_cpu(images, normalize)?.into()),
        }
    }

    fn run(
        &self,
        gpu: &Gpu,
        images: &[usize],
        normalize: &Normalize,
        source: &Tensor,
        from_bytes: bool,
    ) -> Result<Tensor> {
        let shape = self.output_shape(images, normalize)?;
        let [c, h, w] = self.source;
        let mut words = Vec::with_capacity(4 * self.windows.len());
        for window in &self.windows {
            // output_shape checked that the offsets fit.
            let at = |v: i64| {
                i32::try_from(v).map_err(|_| invalid(format!("window offset {v} is past i32")))
            };
            words.extend([
                at(window.top)?,
                at(window.left)?,
                i32::from(window.flipped),
                0,
            ]);
        }
        let windows = Tensor::from_words(gpu, bytemuck::cast_slice(&words))?;
        let (mean, inv_std) = normalize.statistics(gpu)?;
        let dst = Tensor::uninit(gpu, &shape)?;
        let params = CropFlipParams {
            total: gpu_word(OP, dst.len())?,
            channels: gpu_word(OP, c)?,
            out_h: gpu_word(OP, shape[2])?,
            out_w: gpu_word(OP, shape[3])?,
            in_h: gpu_word(OP, h)?,
            in_w: gpu_word(OP, w)?,
            fill_byte: u32::from(self.fill),
            fill_value: f32::from(self.fill) / 255.0,
        };
        let entry = if from_bytes {
            "from_bytes"
        } else {
            "from_floats"
        };
        let kernel = NormalizeKernel {
            crop_flip: true,
            from_bytes,
        };
        let pipeline = gpu.generated(&kernel, entry, &[])?;
        let bindings = [
            mean.binding(),
            inv_std.binding(),
            windows.binding(),
            dst.binding(),
            source.binding(),
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

    /// CPU reference of [`CropFlips::from_bytes`].
    pub fn from_bytes_cpu(
        &self,
        images: &ArrayView4<'_, u8>,
        normalize: &Normalize,
    ) -> Result<ArrayD<f32>> {
        self.cut_cpu(images, normalize, |b| f32::from(b) / 255.0)
    }

    /// CPU reference of [`CropFlips::from_floats`].
    pub fn from_floats_cpu(
        &self,
        images: &ArrayView4<'_, f32>,
        normalize: &Normalize,
    ) -> Result<ArrayD<f32>> {
        self.cut_cpu(images, normalize, |v| v)
    }

    fn cut_cpu<T: Copy>(
        &self,
        images: &ArrayView4<'_, T>,
        normalize: &Normalize,
        unit: fn(T) -> f32,
    ) -> Result<ArrayD<f32>> {
        let shape = self.output_shape(images.shape(), normalize)?;
        let [_, h, w] = self.source;
        let ow = shape[3];
        let fill = f32::from(self.fill) / 255.0;
        let (mean, std) = (normalize.mean(), normalize.std());
        let mut out = super::host_output(OP, &shape)?;
        for (at, value) in out.indexed_iter_mut() {
            let (n, ch, y, x) = (at[0], at[1], at[2], at[3]);
            let window = self.windows[n];
            let sy = window.top + y as i64;
            let sx = if window.flipped {
                window.left + (ow - 1 - x) as i64
            } else {
                window.left + x as i64
            };
            let inside = (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx);
            let v = if inside {
                unit(images[[n, ch, sy as usize, sx as usize]])
            } else {
                fill
            };
            *value = (v - mean[ch]) / std[ch];
        }
        Ok(out)
    }
}

fn invalid(detail: String) -> Error {
    Error::InvalidArgument { op: OP, detail }
}
