//! Data augmentation as torchvision names it — `RandomCrop` with padding,
//! `RandomHorizontalFlip`, `RandomResizedCrop` — on `[C, H, W]` images of bytes or floats,
//! on the host. Every draw comes from a stream derived from (seed, epoch, image index), so a
//! run repeats exactly whatever thread or batch an image lands in.
//!
//! The transforms are drawn on the host. Crops and flips can also be cut on the device,
//! inside the normalisation kernel (`LoaderOptions::augment_on_device`, `ops::CropFlips`):
//! the host then only gathers stored images and draws a window per image. Resized crops
//! resample, and run on the host, in the loader's thread (`data::Loader`).

use ndarray::{Array3, ArrayView3, s};

use super::SplitMix;
use super::preprocess::{Sample, resize};
use crate::error::{Error, Result};
use crate::ops::CropFlip;

const OP: &str = "augmentation";

/// One random transform.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// Pad every side with `fill`, then cut `size` at a uniformly drawn position.
    Crop {
        size: (usize, usize),
        padding: usize,
        fill: u8,
    },
    /// Mirror left to right with probability `p`.
    Flip { p: f64 },
    /// Cut a region of random area and aspect ratio and resize it to `size`.
    ResizedCrop {
        size: (usize, usize),
        scale: (f64, f64),
        log_ratio: (f64, f64),
    },
}

/// A chain of random transforms applied in order, seeded per image.
///
/// ```
/// use wgcnn::data::Augmentation;
/// use wgcnn::ndarray::Array3;
///
/// # fn main() -> wgcnn::Result<()> {
/// // CIFAR-10's usual recipe: pad by 4, crop 32×32 back, flip half of the images.
/// let augment = Augmentation::new().random_crop((32, 32), 4)?.horizontal_flip(0.5)?;
/// let image = Array3::from_shape_fn((3, 32, 32), |(c, y, x)| (c * 50 + y + x) as u8);
/// let once = augment.apply(image.view(), 7, 0, 42)?;
/// assert_eq!(once, augment.apply(image.view(), 7, 0, 42)?); // seeded: it repeats
/// assert_eq!(augment.output_shape([3, 32, 32])?, [3, 32, 32]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Augmentation {
    steps: Vec<Step>,
}

impl Augmentation {
    /// No transform (images pass unchanged).
    pub fn new() -> Self {
        Self::default()
    }

    /// torchvision's `RandomCrop(size, padding)`: zeros around every side, then a `size`
    /// window at a position drawn uniformly among all that fit.
    pub fn random_crop(self, size: (usize, usize), padding: usize) -> Result<Self> {
        self.random_crop_filled(size, padding, 0)
    }

    /// [`Augmentation::random_crop`] padding with `fill` (torchvision's `fill`, in bytes;
    /// float images are padded with `fill / 255`).
    pub fn random_crop_filled(
        self,
        size: (usize, usize),
        padding: usize,
        fill: u8,
    ) -> Result<Self> {
        check_size("random crop", size)?;
        Ok(self.then(Step::Crop {
            size,
            padding,
            fill,
        }))
    }

    /// torchvision's `RandomHorizontalFlip(p)`.
    pub fn horizontal_flip(self, p: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(invalid(format!(
                "flip probability {p}: give a probability in [0, 1]"
            )));
        }
        Ok(self.then(Step::Flip { p }))
    }

    /// torchvision's `RandomResizedCrop(size, scale, ratio)`: a region of `scale` of the
    /// image's area (drawn uniformly) and an aspect ratio drawn log-uniformly from `ratio`,
    /// at a uniform position, up to ten tries before a centre crop; then resized to `size`
    /// with antialiased bilinear resampling ([`super::resize`]).
    pub fn random_resized_crop(
        self,
        size: (usize, usize),
        scale: (f64, f64),
        ratio: (f64, f64),
    ) -> Result<Self> {
        check_size("random resized crop", size)?;
        let ordered = |(low, high): (f64, f64)| low > 0.0 && low <= high && high.is_finite();
        if !ordered(scale) || scale.1 > 1.0 || !ordered(ratio) {
            return Err(invalid(format!(
                "random resized crop with scale {scale:?} and ratio {ratio:?}: give \
                 0 < low ≤ high for each, the scale at most 1 (torchvision's defaults are \
                 (0.08, 1.0) and (3/4, 4/3))"
            )));
        }
        Ok(self.then(Step::ResizedCrop {
            size,
            scale,
            log_ratio: (ratio.0.ln(), ratio.1.ln()),
        }))
    }

    fn then(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// The shape `[C, H, W]` images of `shape` come out as; an error where a crop does not
    /// fit its (padded) input.
    pub fn output_shape(&self, [channels, height, width]: [usize; 3]) -> Result<[usize; 3]> {
        let mut size = (height, width);
        for step in &self.steps {
            size = match *step {
                Step::Crop {
                    size: crop,
                    padding,
                    ..
                } => {
                    let padded = (size.0 + 2 * padding, size.1 + 2 * padding);
                    if crop.0 > padded.0 || crop.1 > padded.1 {
                        return Err(invalid(format!(
                            "a random crop of {}×{} does not fit a {}×{} image padded by \
                             {padding}: crop smaller or pad more",
                            crop.0, crop.1, size.0, size.1
                        )));
                    }
                    crop
                }
                Step::Flip { .. } => size,
                Step::ResizedCrop { size: out, .. } => out,
            };
        }
        Ok([channels, size.0, size.1])
    }

    /// Image `index` of a set, augmented for `epoch` of a run seeded with `seed`.
    pub fn apply<T: Augmentable>(
        &self,
        image: ArrayView3<'_, T>,
        seed: u64,
        epoch: u64,
        index: usize,
    ) -> Result<Array3<T>> {
        let (c, h, w) = image.dim();
        if c == 0 || h == 0 || w == 0 {
            return Err(invalid(format!(
                "an image of {c}×{h}×{w}: every dimension must be at least 1"
            )));
        }
        self.output_shape([c, h, w])?;
        let mut rng = image_stream(seed, epoch, index);
        let mut out = image.to_owned();
        for step in &self.steps {
            let (_, h, w) = out.dim();
            out = match step.draw(&mut rng, (h, w)) {
                Draw::Crop {
                    top,
                    left,
                    size,
                    padding,
                    fill,
                } => padded_window(out.view(), padding, T::from_byte(fill), (top, left), size),
                Draw::Flip(true) => out.slice(s![.., .., ..;-1]).to_owned(),
                Draw::Flip(false) => out,
                Draw::ResizedCrop {
                    top,
                    left,
                    region,
                    size,
                } => resize(
                    out.slice(s![.., top..top + region.0, left..left + region.1]),
                    size,
                )?,
            };
        }
        Ok(out)
    }

    /// Whether [`Augmentation::crop_flip`] can express this chain as one window on the
    /// source image: flips and at most one crop. Resized crops resample, and after a second
    /// crop the pixels outside the first one's window, though inside the image, would read
    /// the fill.
    pub fn is_crop_flip(&self) -> bool {
        let crops = self.steps.iter().filter(|s| matches!(s, Step::Crop { .. }));
        crops.count() <= 1
            && !self
                .steps
                .iter()
                .any(|s| matches!(s, Step::ResizedCrop { .. }))
    }

    /// The value a crop pads with, in bytes (0 without a crop).
    pub fn fill(&self) -> u8 {
        self.steps
            .iter()
            .find_map(|s| match *s {
                Step::Crop { fill, .. } => Some(fill),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Image `index`'s crops and flips for `epoch` under `seed`, as the window of the source
    /// image they leave: the same draws as [`Augmentation::apply`], for a device to apply
    /// (`LoaderOptions::augment_on_device`). An error for a chain that is not
    /// [`Augmentation::is_crop_flip`].
    pub fn crop_flip(
        &self,
        [channels, height, width]: [usize; 3],
        seed: u64,
        epoch: u64,
        index: usize,
    ) -> Result<CropFlip> {
        if !self.is_crop_flip() {
            return Err(self.not_crop_flip());
        }
        self.output_shape([channels, height, width])?;
        let mut rng = image_stream(seed, epoch, index);
        let mut window = CropFlip {
            top: 0,
            left: 0,
            flipped: false,
        };
        let mut size = (height, width);
        for step in &self.steps {
            match step.draw(&mut rng, size) {
                Draw::Crop {
                    top,
                    left,
                    size: cut,
                    padding,
                    ..
                } => {
                    let offset = |at: usize| at as i64 - padding as i64;
                    window.top += offset(top);
                    // Mirrored, the window's left edge in the source is the right one's.
                    window.left += if window.flipped {
                        size.1 as i64 - cut.1 as i64 - offset(left)
                    } else {
                        offset(left)
                    };
                    size = cut;
                }
                Draw::Flip(flip) => window.flipped ^= flip,
                Draw::ResizedCrop { .. } => return Err(self.not_crop_flip()),
            }
        }
        Ok(window)
    }

    fn not_crop_flip(&self) -> Error {
        invalid(format!(
            "{:?} on the device: only crops and flips (at most one crop) run there; leave \
             this augmentation to the loader's thread",
            self.steps
        ))
    }
}

/// What one step drew for one image, with what applying it needs.
enum Draw {
    Crop {
        top: usize,
        left: usize,
        size: (usize, usize),
        padding: usize,
        fill: u8,
    },
    Flip(bool),
    ResizedCrop {
        top: usize,
        left: usize,
        region: (usize, usize),
        size: (usize, usize),
    },
}

impl Step {
    /// This step's draws for an input of `(height, width)`: [`Augmentation::apply`] and
    /// [`Augmentation::crop_flip`] share them, so the host and the device cannot drift.
    fn draw(&self, rng: &mut SplitMix, (height, width): (usize, usize)) -> Draw {
        match *self {
            Step::Crop {
                size,
                padding,
                fill,
            } => {
                let top = rng.below(height + 2 * padding - size.0 + 1);
                let left = rng.below(width + 2 * padding - size.1 + 1);
                Draw::Crop {
                    top,
                    left,
                    size,
                    padding,
                    fill,
                }
            }
            Step::Flip { p } => Draw::Flip(rng.uniform(0.0, 1.0) < p),
            Step::ResizedCrop {
                size,
                scale,
                log_ratio,
            } => {
                let (top, left, h, w) = resized_crop_region(rng, height, width, scale, log_ratio);
                Draw::ResizedCrop {
                    top,
                    left,
                    region: (h, w),
                    size,
                }
            }
        }
    }
}

/// A pixel type augmentation works on: bytes or floats in `[0, 1]`.
pub trait Augmentable: Sample {
    /// A fill given in bytes, in this type's scale.
    fn from_byte(byte: u8) -> Self;
}

impl Augmentable for u8 {
    fn from_byte(byte: u8) -> Self {
        byte
    }
}

impl Augmentable for f32 {
    fn from_byte(byte: u8) -> Self {
        f32::from(byte) / 255.0
    }
}

/// The draws for image `index` in `epoch` under `seed`: one stream per image, so that
/// threads and batch boundaries change nothing.
fn image_stream(seed: u64, epoch: u64, index: usize) -> SplitMix {
    let mut mix = SplitMix::new(seed);
    let key = mix.next_u64() ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    SplitMix::new(key ^ (index as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25))
}

/// The `size` window at `(top, left)` of `image` padded by `padding` on every side.
fn padded_window<T: Copy>(
    image: ArrayView3<'_, T>,
    padding: usize,
    fill: T,
    (top, left): (usize, usize),
    size: (usize, usize),
) -> Array3<T> {
    let (c, h, w) = image.dim();
    Array3::from_shape_fn((c, size.0, size.1), |(ch, y, x)| {
        // Coordinates in the image, or outside it (padding).
        let (sy, sx) = (
            (y + top).wrapping_sub(padding),
            (x + left).wrapping_sub(padding),
        );
        if sy < h && sx < w {
            image[[ch, sy, sx]]
        } else {
            fill
        }
    })
}

/// torchvision's `RandomResizedCrop.get_params`: `(top, left, height, width)`.
fn resized_crop_region(
    rng: &mut SplitMix,
    height: usize,
    width: usize,
    scale: (f64, f64),
    log_ratio: (f64, f64),
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    for _ in 0..10 {
        let target = area * rng.uniform(scale.0, scale.1);
        let ratio = rng.uniform(log_ratio.0, log_ratio.1).exp();
        let w = (target * ratio).sqrt().round_ties_even() as usize;
        let h = (target / ratio).sqrt().round_ties_even() as usize;
        if (1..=width).contains(&w) && (1..=height).contains(&h) {
            return (rng.below(height - h + 1), rng.below(width - w + 1), h, w);
        }
    }
    // A centre crop with the ratio clamped into range.
    let (low, high) = (log_ratio.0.exp(), log_ratio.1.exp());
    let input = width as f64 / height as f64;
    let (h, w) = if input < low {
        ((width as f64 / low).round_ties_even() as usize, width)
    } else if input > high {
        (height, (height as f64 * high).round_ties_even() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    ((height - h) / 2, (width - w) / 2, h, w)
}

fn check_size(what: &str, (height, width): (usize, usize)) -> Result<()> {
    if height == 0 || width == 0 {
        return Err(invalid(format!(
            "{what} to {height}×{width}: the output must be at least 1×1"
        )));
    }
    Ok(())
}

fn invalid(detail: String) -> Error {
    Error::InvalidArgument { op: OP, detail }
}
