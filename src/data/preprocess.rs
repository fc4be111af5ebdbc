//! Image preprocessing as torchvision does it: `Resize(shorter side)` with antialiased
//! bilinear resampling, `CenterCrop`, scaling to floats and `Normalize`, on `[C, H, W]`
//! images of bytes or floats, and decoding photos (EXIF orientation applied) into them.
//!
//! A pretrained network only sees the inputs it was trained on when the pixels are prepared
//! the same way, so each step follows torchvision's arithmetic, not just its idea:
//! bytes are resampled with PyTorch's fixed-point weights (its uint8 CPU path, PIL's method),
//! floats with its float32 weights; sizes, crop offsets and padding use its rounding rules.

#[cfg(feature = "image")]
use std::path::Path;

use ndarray::{Array3, ArrayView3, Axis};

use crate::error::{Error, Result};

const OP: &str = "preprocess";

/// ImageNet's per-channel mean of `x / 255` (RGB), as torchvision's classification models use it.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation of `x / 255` (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

mod sealed {
    use ndarray::{Array3, ArrayView3, Axis};

    use crate::error::Result;

    /// The per-type resampling arithmetic (kept private: the rules are torchvision's).
    pub trait Resample: Copy + Default {
        fn resample(image: ArrayView3<'_, Self>, axis: Axis, size: usize) -> Result<Array3<Self>>;
        fn to_f32(self) -> f32;
    }
}

/// A pixel type the preprocessing works on: `u8` (resampled in fixed point and rounded back
/// to bytes, as torchvision does for uint8 tensors) or `f32` (resampled in float32).
pub trait Sample: sealed::Resample {}
impl Sample for u8 {}
impl Sample for f32 {}

/// The input range and weights that make one output position along an axis.
struct Taps<W> {
    start: usize,
    weights: Vec<W>,
}

/// PyTorch's antialiased bilinear filter: a triangle over ±1 output pixel, which is
/// ±`scale` input pixels when shrinking (so every input pixel contributes) and ±1 when
/// enlarging. In f64, as PyTorch computes the weights it then turns into integers.
fn taps_f64(input: usize, output: usize) -> (Vec<Taps<f64>>, f64) {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let max_taps = support.ceil() as i64 * 2 + 1;
    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut max_weight = 0.0f64;
    let taps = (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // Truncation toward zero, as C++'s static_cast<int64_t>.
            let start = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(input as i64);
            let len = (end - start).clamp(0, max_taps);
            let mut weights: Vec<f64> = (0..len)
                .map(|j| triangle_f64(((j + start) as f64 - center + 0.5) * inv))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            max_weight = weights.iter().fold(max_weight, |m, &w| m.max(w));
            Taps {
                start: start as usize,
                weights,
            }
        })
        .collect();
    (taps, max_weight)
}

fn triangle_f64(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// The f64 weights as integers with the most fraction bits (up to 22) that keep the largest
/// weight within an i16: PyTorch's uint8 path (`_compute_index_ranges_int16_weights`).
fn taps_i32(input: usize, output: usize) -> (Vec<Taps<i32>>, u32) {
    let (taps, max_weight) = taps_f64(input, output);
    let mut precision = 0u32;
    while precision < 22
        && ((0.5 + max_weight * f64::from(1u32 << (precision + 1))) as i32) < 1 << 15
    {
        precision += 1;
    }
    let one = f64::from(1u32 << precision);
    let taps = taps
        .into_iter()
        .map(|t| Taps {
            start: t.start,
            weights: t
                .weights
                .iter()
                .map(|&w| {
                    let v = w * one;
                    if v < 0.0 {
                        (v - 0.5) as i32
                    } else {
                        (v + 0.5) as i32
                    }
                })
                .collect(),
        })
        .collect();
    (taps, precision)
}

/// The same filter in float32 with PyTorch's mix of float and double steps (its float
/// kernel stores the scale, centre and weights as float but adds C++'s double `0.5`s), so
/// that the weights come out bit for bit as PyTorch's.
fn taps_f32(input: usize, output: usize) -> Vec<Taps<f32>> {
    let scale = input as f32 / output as f32;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let max_taps = f64::from(support).ceil() as i64 * 2 + 1;
    let inv = if scale >= 1.0 {
        (1.0 / f64::from(scale)) as f32
    } else {
        1.0
    };
    (0..output)
        .map(|i| {
            let center = (f64::from(scale) * (i as f64 + 0.5)) as f32;
            let start = (f64::from(center - support) + 0.5) as i64;
            let start = start.max(0);
            let end = ((f64::from(center + support) + 0.5) as i64).min(input as i64);
            let len = (end - start).clamp(0, max_taps);
            let mut weights: Vec<f32> = (0..len)
                .map(|j| {
                    let x = (f64::from((j + start) as f32 - center) + 0.5) * f64::from(inv);
                    let x = (x as f32).abs();
                    if x < 1.0 { 1.0 - x } else { 0.0 }
                })
                .collect();
            let total = weights.iter().fold(0.0f32, |t, &w| t + w);
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps {
                start: start as usize,
                weights,
            }
        })
        .collect()
}

/// One separable pass along `axis` (1 = rows, 2 = columns): each output value is
/// `finish(Σ mac(acc, input, weight))` over its taps, starting from `init`.
fn resample_axis<T: Copy, W: Copy, A: Copy>(
    image: ArrayView3<'_, T>,
    axis: Axis,
    taps: &[Taps<W>],
    init: A,
    mac: impl Fn(A, T, W) -> A,
    finish: impl Fn(A) -> T,
) -> Result<Array3<T>> {
    let (channels, height, width) = image.dim();
    // Logical (row-major) order, whatever the view's strides.
    let src: Vec<T> = image.iter().copied().collect();
    let size = taps.len();
    let mut out = Vec::with_capacity(src.len() / image.len_of(axis).max(1) * size);
    if axis == Axis(2) {
        for line in src.chunks_exact(width) {
            for t in taps {
                let acc = t
                    .weights
                    .iter()
                    .enumerate()
                    .fold(init, |acc, (k, &w)| mac(acc, line[t.start + k], w));
                out.push(finish(acc));
            }
        }
    } else {
        let mut acc = vec![init; width];
        for plane in src.chunks_exact(height * width) {
            for t in taps {
                acc.fill(init);
                for (k, &w) in t.weights.iter().enumerate() {
                    let row = &plane[(t.start + k) * width..][..width];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a = mac(*a, v, w);
                    }
                }
                out.extend(acc.iter().map(|&a| finish(a)));
            }
        }
    }
    let shape = if axis == Axis(2) {
        (channels, height, size)
    } else {
        (channels, size, width)
    };
    Array3::from_shape_vec(shape, out).map_err(shape_error)
}

impl sealed::Resample for u8 {
    fn resample(image: ArrayView3<'_, u8>, axis: Axis, size: usize) -> Result<Array3<u8>> {
        let (taps, precision) = taps_i32(image.len_of(axis), size);
        // i32 cannot overflow: the weights sum to about 2^precision ≤ 2^22, times 255.
        let shift = precision;
        resample_axis(
            image,
            axis,
            &taps,
            (1i32 << precision) >> 1,
            |acc, v, w| acc + i32::from(v) * w,
            |acc| (acc >> shift).clamp(0, 255) as u8,
        )
    }

    fn to_f32(self) -> f32 {
        f32::from(self)
    }
}

impl sealed::Resample for f32 {
    fn resample(image: ArrayView3<'_, f32>, axis: Axis, size: usize) -> Result<Array3<f32>> {
        let taps = taps_f32(image.len_of(axis), size);
        resample_axis(
            image,
            axis,
            &taps,
            0.0f32,
            |acc, v, w| acc + v * w,
            |acc| acc,
        )
    }

    fn to_f32(self) -> f32 {
        self
    }
}

/// The `(height, width)` that torchvision's `Resize(size)` gives an image of
/// `height × width`: the shorter side becomes `size` and the longer
/// `int(size * long / short)` (truncated, as Python's `int`).
pub fn resized_size(height: usize, width: usize, size: usize) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || size == 0 {
        return Err(invalid(format!(
            "resize of a {height}×{width} image to a shorter side of {size}: the image and the \
             size must be at least 1"
        )));
    }
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python's float division of the exact product, then truncation.
    let new_long = ((size as f64 * long as f64) / short as f64) as usize;
    Ok(if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    })
}

/// Resizes `[C, H, W]` so that its shorter side is `size`, as torchvision's
/// `resize(image, size, antialias=True)` (bilinear) does for a uint8 or float32 tensor.
pub fn resize_shorter<T: Sample>(image: ArrayView3<'_, T>, size: usize) -> Result<Array3<T>> {
    check_image(image.shape())?;
    let (_, height, width) = image.dim();
    resize(image, resized_size(height, width, size)?)
}

/// Resizes `[C, H, W]` to exactly `(height, width)` with antialiased bilinear resampling:
/// columns first, then rows, each pass skipped where the size does not change (as PyTorch).
/// Bytes are rounded back to bytes after each pass, as PyTorch's uint8 path does.
pub fn resize<T: Sample>(
    image: ArrayView3<'_, T>,
    (height, width): (usize, usize),
) -> Result<Array3<T>> {
    check_image(image.shape())?;
    if height == 0 || width == 0 {
        return Err(invalid(format!(
            "resize to {height}×{width}: the output must be at least 1×1"
        )));
    }
    let (channels, h, w) = image.dim();
    checked_len(channels, height.max(h), width)?;
    let columns = if w != width {
        Some(T::resample(image, Axis(2), width)?)
    } else {
        None
    };
    let view = columns.as_ref().map_or(image, |c| c.view());
    if h != height {
        T::resample(view, Axis(1), height)
    } else {
        Ok(view.to_owned())
    }
}

/// Cuts the central `(height, width)` out of `[C, H, W]` as torchvision's `center_crop`:
/// the offset is `round((H - height) / 2)` with Python's round-half-to-even, and a crop
/// larger than the image is padded with zeros first (`floor` of half the excess on the
/// top/left, the rest on the bottom/right).
pub fn center_crop<T: Copy + Default>(
    image: ArrayView3<'_, T>,
    (height, width): (usize, usize),
) -> Result<Array3<T>> {
    check_image(image.shape())?;
    if height == 0 || width == 0 {
        return Err(invalid(format!(
            "center crop of {height}×{width}: the crop must be at least 1×1"
        )));
    }
    let (channels, h, w) = image.dim();
    checked_len(channels, height, width)?;
    // Where the image's first row and column land in the crop (positive: padding) or which
    // row and column of the image the crop starts at (negative).
    let offset = |crop: usize, size: usize| -> i64 {
        if crop > size {
            ((crop - size) / 2) as i64
        } else {
            -(((size - crop) as f64 / 2.0).round_ties_even() as i64)
        }
    };
    let (top, left) = (offset(height, h), offset(width, w));
    let mut out = Array3::from_elem((channels, height, width), T::default());
    for ((c, y, x), value) in out.indexed_iter_mut() {
        let (sy, sx) = (y as i64 - top, x as i64 - left);
        if (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx) {
            *value = image[[c, sy as usize, sx as usize]];
        }
    }
    Ok(out)
}

/// `(x * scale - mean[c]) / std[c]` in float32, as torchvision's `ToDtype(float32,
/// scale=True)` (`scale` = 1/255) and `Normalize(mean, std)` compute it. One mean and std
/// apply to every channel; a one-channel image given three of each becomes three channels
/// (torch's broadcasting, which is how a greyscale image meets an RGB model).
pub fn normalize<T: Sample>(
    image: ArrayView3<'_, T>,
    scale: f32,
    mean: &[f32],
    std: &[f32],
) -> Result<Array3<f32>> {
    check_image(image.shape())?;
    check_stats(mean, std)?;
    let (channels, height, width) = image.dim();
    let out_channels = match (channels, mean.len()) {
        (c, k) if c == k || k == 1 => c,
        (1, k) => k,
        (c, k) => {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: Vec::new(),
                detail: format!(
                    "{k} means and standard deviations for an image of {c} channels; give one \
                     per channel, or one for all"
                ),
            });
        }
    };
    Ok(Array3::from_shape_fn(
        (out_channels, height, width),
        |(c, y, x)| {
            let v = image[[c.min(channels - 1), y, x]].to_f32();
            let k = c.min(mean.len() - 1);
            (v * scale - mean[k]) / std[k]
        },
    ))
}

/// A preprocessing pipeline: torchvision's `Compose([Resize(s), CenterCrop(h, w),
/// ToDtype(float32, scale=True), Normalize(mean, std)])`, with the scaling and the
/// statistics as plain numbers so that any model's convention fits.
///
/// ```
/// use wgcnn::data::Preprocess;
/// use wgcnn::ndarray::Array3;
///
/// # fn main() -> wgcnn::Result<()> {
/// let image = Array3::from_shape_fn((3, 300, 400), |(c, y, x)| ((c * 50 + y + x) % 256) as u8);
/// let input = Preprocess::imagenet().apply(&image)?;
/// assert_eq!(input.dim(), (3, 224, 224));
/// // Any other recipe, e.g. a resize to 232 before the crop:
/// let custom = Preprocess::new().resize(232)?.center_crop(224, 224)?.normalize([0.5; 3], [0.5; 3])?;
/// assert_eq!(custom.apply(&image)?.dim(), (3, 224, 224));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    resize: Option<usize>,
    crop: Option<(usize, usize)>,
    scale: f32,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Default for Preprocess {
    fn default() -> Self {
        Self::new()
    }
}

impl Preprocess {
    /// No resize, no crop, bytes scaled to 0–1, mean 0 and std 1: torchvision's `ToTensor`.
    pub fn new() -> Self {
        Self {
            resize: None,
            crop: None,
            scale: 1.0 / 255.0,
            mean: vec![0.0],
            std: vec![1.0],
        }
    }

    /// torchvision's ImageNet classification recipe: shorter side to 256, central 224×224,
    /// `x / 255` normalised with ImageNet's mean and std.
    pub fn imagenet() -> Self {
        Self {
            resize: Some(256),
            crop: Some((224, 224)),
            scale: 1.0 / 255.0,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        }
    }

    /// EfficientNet-Lite's recipe (the TensorFlow Lite models): shorter side to 224, central
    /// 224×224, `(x - 127) / 128` on bytes 0–255.
    pub fn efficientnet_lite() -> Self {
        Self {
            resize: Some(224),
            crop: Some((224, 224)),
            scale: 1.0,
            mean: vec![127.0; 3],
            std: vec![128.0; 3],
        }
    }

    /// Resize so that the shorter side is `shorter_side` (at least 1).
    pub fn resize(mut self, shorter_side: usize) -> Result<Self> {
        if shorter_side == 0 {
            return Err(invalid(
                "resize to a shorter side of 0: give at least 1".to_string(),
            ));
        }
        self.resize = Some(shorter_side);
        Ok(self)
    }

    /// Cut the central `height × width` (each at least 1; padded with zeros where the
    /// image is smaller).
    pub fn center_crop(mut self, height: usize, width: usize) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(invalid(format!(
                "center crop of {height}×{width}: the crop must be at least 1×1"
            )));
        }
        self.crop = Some((height, width));
        Ok(self)
    }

    /// Multiply each byte by `scale` before normalising: 1/255 (the default) for statistics
    /// of 0–1 images, 1 for statistics of 0–255 bytes.
    pub fn scale(mut self, scale: f32) -> Result<Self> {
        if !(scale.is_finite() && scale != 0.0) {
            return Err(invalid(format!(
                "scale {scale}: give a finite, non-zero factor (1/255 maps bytes to 0–1)"
            )));
        }
        self.scale = scale;
        Ok(self)
    }

    /// Per-channel `mean` and `std` of the scaled values (one of each for every channel, or
    /// one for all channels); every std positive.
    pub fn normalize(mut self, mean: impl AsRef<[f32]>, std: impl AsRef<[f32]>) -> Result<Self> {
        check_stats(mean.as_ref(), std.as_ref())?;
        self.mean = mean.as_ref().to_vec();
        self.std = std.as_ref().to_vec();
        Ok(self)
    }

    /// The centre crop's `(height, width)`, if the recipe crops.
    pub fn crop(&self) -> Option<(usize, usize)> {
        self.crop
    }

    /// The resize and crop only, on bytes: for a `Dataset` of bytes that is normalised on
    /// the device.
    pub fn resize_crop(&self, image: &Array3<u8>) -> Result<Array3<u8>> {
        let resized = match self.resize {
            Some(size) => resize_shorter(image.view(), size)?,
            None => {
                check_image(image.shape())?;
                image.clone()
            }
        };
        match self.crop {
            Some(crop) => center_crop(resized.view(), crop),
            None => Ok(resized),
        }
    }

    /// Every step on a `[C, H, W]` byte image: the model's input `[C', h, w]` (`C'` = 3 for
    /// a greyscale image and three means).
    pub fn apply(&self, image: &Array3<u8>) -> Result<Array3<f32>> {
        let cropped = self.resize_crop(image)?;
        normalize(cropped.view(), self.scale, &self.mean, &self.std)
    }

    /// Decodes `path` as RGB ([`load_image`]) and applies every step.
    #[cfg(feature = "image")]
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Array3<f32>> {
        self.apply(&load_image(path)?)
    }

    /// The images at `paths` as one batch `[N, 3, h, w]`: they must come out the same size,
    /// which a center crop ensures.
    #[cfg(feature = "image")]
    pub fn load_batch<P: AsRef<Path>>(&self, paths: &[P]) -> Result<ndarray::ArrayD<f32>> {
        if paths.is_empty() {
            return Err(invalid(
                "load_batch of no paths: give at least one image".to_string(),
            ));
        }
        let images = paths
            .iter()
            .map(|p| self.load(p))
            .collect::<Result<Vec<_>>>()?;
        let first = images[0].dim();
        if let Some((i, other)) = images.iter().enumerate().find(|(_, a)| a.dim() != first) {
            return Err(Error::ShapeMismatch {
                op: OP,
                shapes: vec![other.shape().to_vec(), images[0].shape().to_vec()],
                detail: format!(
                    "image {i} ({}) came out {:?}, the first {first:?}; add a center_crop so \
                     every image has the same size",
                    paths[i].as_ref().display(),
                    other.dim()
                ),
            });
        }
        let views: Vec<_> = images.iter().map(|a| a.view()).collect();
        ndarray::stack(Axis(0), &views)
            .map(|batch| batch.into_dyn())
            .map_err(shape_error)
    }
}

/// Decodes a PNG or JPEG into RGB bytes `[3, H, W]`, with the EXIF orientation applied (a
/// phone photo taken upright comes out upright), greyscale replicated to three channels and
/// an alpha channel dropped.
#[cfg(feature = "image")]
pub fn load_image(path: impl AsRef<Path>) -> Result<Array3<u8>> {
    use image::ImageDecoder;

    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .and_then(image::ImageReader::with_guessed_format)
        .map_err(|e| Error::data_io(path, "cannot read the file; check the path", e))?;
    let undecodable = |e: image::ImageError| {
        Error::data(
            path,
            format!("not an image this build can decode ({e}); give an intact PNG or JPEG file"),
        )
    };
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let orientation = decoder.orientation().map_err(undecodable)?;
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    image.apply_orientation(orientation);
    let rgb = image.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    let interleaved =
        Array3::from_shape_vec((height, width, 3), rgb.into_raw()).map_err(shape_error)?;
    // Interleaved HWC to planar CHW.
    Ok(interleaved
        .permuted_axes([2, 0, 1])
        .as_standard_layout()
        .into_owned())
}

fn check_image(shape: &[usize]) -> Result<()> {
    match shape.iter().position(|&d| d == 0) {
        Some(axis) => Err(Error::EmptyDimension {
            op: OP,
            shape: shape.to_vec(),
            axis,
        }),
        None => Ok(()),
    }
}

fn check_stats(mean: &[f32], std: &[f32]) -> Result<()> {
    if mean.is_empty() || mean.len() != std.len() {
        return Err(invalid(format!(
            "{} means and {} standard deviations: give one of each per channel (or one for all)",
            mean.len(),
            std.len()
        )));
    }
    if let Some(bad) = mean.iter().find(|m| !m.is_finite()) {
        return Err(invalid(format!("mean {bad} must be finite")));
    }
    if let Some(bad) = std.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
        return Err(invalid(format!(
            "standard deviation {bad} must be positive and finite (use 1 to leave a channel as is)"
        )));
    }
    Ok(())
}

/// Refuses outputs whose element count overflows, before anything is allocated.
fn checked_len(channels: usize, height: usize, width: usize) -> Result<()> {
    match channels
        .checked_mul(height)
        .and_then(|n| n.checked_mul(width))
    {
        Some(_) => Ok(()),
        None => Err(invalid(format!(
            "an output of {channels}×{height}×{width} values is too large"
        ))),
    }
}

fn invalid(detail: String) -> Error {
    Error::InvalidArgument { op: OP, detail }
}

fn shape_error(e: ndarray::ShapeError) -> Error {
    Error::ShapeMismatch {
        op: OP,
        shapes: Vec::new(),
        detail: e.to_string(),
    }
}
