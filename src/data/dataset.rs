//! `Dataset`: labelled images `[N, C, H, W]` of bytes or floats, from memory, from MNIST, or
//! from a folder with one sub-folder per class; per-channel statistics, seeded batches, and
//! upload as a normalised batch on any device.

#[cfg(feature = "image")]
use std::path::Path;
use std::path::PathBuf;

use ndarray::{Array4, ArrayView3, ArrayView4};

use super::augment::{Augmentable, Augmentation};
use super::{Images, shuffled_indices};
use crate::error::{Error, Result};
use crate::ops::{CropFlips, Normalize};
use crate::value::{Device, Value};

/// The pixels of a dataset, image after image in `[C, H, W]` order.
#[derive(Clone, Debug, PartialEq)]
pub enum Pixels {
    /// Bytes, 0 to 255: uploaded as they are (four per word) and scaled by `1/255` on the
    /// GPU before normalisation.
    U8(Vec<u8>),
    /// Floats, normalised as they are.
    F32(Vec<f32>),
}

impl Pixels {
    fn len(&self) -> usize {
        match self {
            Pixels::U8(p) => p.len(),
            Pixels::F32(p) => p.len(),
        }
    }

    /// Pixel `i` as a float in the scale the model sees before normalisation.
    fn value(&self, i: usize) -> f32 {
        match self {
            Pixels::U8(p) => f32::from(p[i]) / 255.0,
            Pixels::F32(p) => p[i],
        }
    }
}

/// Labelled images `[N, C, H, W]`: what `train_epoch_on`, `evaluate_on` and
/// [`Dataset::batch`] take.
///
/// ```
/// use wgcnn::prelude::*;
///
/// # fn main() -> wgcnn::Result<()> {
/// // Four 2×2 RGB images of bytes: two dark (class 0), two bright (class 1).
/// let pixels = [20u8, 40, 215, 235].iter().flat_map(|&v| [v; 12]).collect();
/// let data = Dataset::new([4, 3, 2, 2], Pixels::U8(pixels), vec![0, 0, 1, 1], None)?;
/// let (mean, std) = data.channel_stats();
/// let normalize = Normalize::new(&mean, &std)?;
/// let mut model = Sequential::new()
///     .add("flatten", Flatten)
///     .add("fc", Linear::lazy(2))
///     .build_for(&data.shape(), Device::Cpu, 1)?;
/// let mut sgd = model.optimizer(Optimizer::sgd(0.5))?;
/// for epoch in 0..20 {
///     train_epoch_on(&mut model, &mut sgd, &data, &normalize, 2, 7, epoch)?;
/// }
/// assert_eq!(evaluate_on(&mut model, &data, &normalize, 4)?.accuracy, 1.0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    shape: [usize; 4],
    pixels: Pixels,
    labels: Vec<usize>,
    classes: Vec<String>,
    /// Files a folder held that are not images (by extension) or are hidden: left out.
    skipped: Vec<PathBuf>,
}

/// How [`Dataset::from_folder_with`] reads a folder of class folders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FolderOptions {
    /// Keep a class folder with no images as a class of its own (its label stays taken, as
    /// torchvision's `allow_empty=True`); by default it is an error naming the folder,
    /// because dropping it would shift every later class's label.
    pub allow_empty_classes: bool,
}

/// The file extensions read as images (torchvision's `IMG_EXTENSIONS`), in any case.
pub const IMAGE_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

impl Dataset {
    /// `shape[0]` images of `shape[1..]` with one label each, below `classes.len()` (class
    /// names, e.g. the folder names; pass `None` to name them by number from the labels).
    pub fn new(
        shape: [usize; 4],
        pixels: Pixels,
        labels: Vec<usize>,
        classes: Option<Vec<String>>,
    ) -> Result<Self> {
        let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if shape.contains(&0) || count != Some(pixels.len()) || labels.len() != shape[0] {
            return Err(invalid(format!(
                "shape {shape:?} needs {} pixels and {} labels, got {} and {}; every dimension \
                 must be at least 1",
                count.map_or("too many".to_string(), |c| c.to_string()),
                shape[0],
                pixels.len(),
                labels.len()
            )));
        }
        let classes = classes.unwrap_or_else(|| {
            let count = labels.iter().max().map_or(0, |&l| l + 1);
            (0..count).map(|c| c.to_string()).collect()
        });
        if let Some((i, &bad)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l >= classes.len())
        {
            return Err(invalid(format!(
                "label {bad} of image {i} is not below the {} classes",
                classes.len()
            )));
        }
        Ok(Self {
            shape,
            pixels,
            labels,
            classes,
            skipped: Vec::new(),
        })
    }

    /// Grey images (MNIST's `Images` and labels) as a one-channel dataset.
    pub fn from_images(images: &Images, labels: &[u8]) -> Result<Self> {
        Self::new(
            [images.count, 1, images.rows, images.cols],
            Pixels::U8(images.pixels.clone()),
            labels.iter().map(|&l| usize::from(l)).collect(),
            None,
        )
    }

    /// The images under `dir`, one sub-folder per class (sorted by name: the first is class
    /// 0, as torchvision's `ImageFolder` numbers them), each converted to `channels` (1 grey,
    /// 3 RGB) and resized to `height × width`. Hidden files and files without an image
    /// extension ([`IMAGE_EXTENSIONS`]) are skipped and listed in [`Dataset::skipped`]; an
    /// image that does not decode, or a class folder that cannot be read or holds no image,
    /// is an error naming it (see [`Dataset::from_folder_with`] to keep empty classes).
    #[cfg(feature = "image")]
    pub fn from_folder(
        dir: impl AsRef<Path>,
        size: (usize, usize),
        channels: usize,
    ) -> Result<Self> {
        Self::from_folder_with(dir, size, channels, FolderOptions::default())
    }

    /// [`Dataset::from_folder`] with `options`.
    #[cfg(feature = "image")]
    pub fn from_folder_with(
        dir: impl AsRef<Path>,
        (height, width): (usize, usize),
        channels: usize,
        options: FolderOptions,
    ) -> Result<Self> {
        if !matches!(channels, 1 | 3) || height == 0 || width == 0 {
            return Err(invalid(format!(
                "{channels} channels of {height}×{width}: give 1 (grey) or 3 (RGB) channels \
                 and a size of at least 1×1"
            )));
        }
        let (h, w) = (dim_u32(height)?, dim_u32(width)?);
        Self::from_class_folders(dir.as_ref(), [channels, height, width], options, |file| {
            let image = image::open(file).map_err(|e| Error::data(file, e.to_string()))?;
            let resized = image.resize_exact(w, h, image::imageops::FilterType::Triangle);
            let interleaved = match channels {
                1 => resized.to_luma8().into_raw(),
                _ => resized.to_rgb8().into_raw(),
            };
            // Interleaved HWC to planar CHW.
            Ok((0..channels)
                .flat_map(|c| interleaved.iter().skip(c).step_by(channels).copied())
                .collect())
        })
    }

    /// The images under `dir`, one sub-folder per class, prepared as `preprocess` prepares
    /// a model's input (RGB with the EXIF orientation applied, torchvision's resize and
    /// centre crop), kept as bytes: batch them with the recipe's normalisation as a
    /// [`Normalize`] (for ImageNet's, `Normalize::new(&IMAGENET_MEAN, &IMAGENET_STD)`).
    /// The recipe must crop, so that every image has one size. Files and folders follow
    /// [`Dataset::from_folder`]'s rules.
    #[cfg(feature = "image")]
    pub fn from_folder_preprocessed(
        dir: impl AsRef<Path>,
        preprocess: &super::Preprocess,
    ) -> Result<Self> {
        let Some((height, width)) = preprocess.crop() else {
            return Err(invalid(
                "the preprocessing has no centre crop, so images keep sizes of their own: \
                 add .center_crop(h, w)"
                    .into(),
            ));
        };
        Self::from_class_folders(
            dir.as_ref(),
            [3, height, width],
            FolderOptions::default(),
            |file| {
                let image = super::load_image(file)?;
                Ok(preprocess.resize_crop(&image)?.into_raw_vec_and_offset().0)
            },
        )
    }

    /// Every image of every class folder under `dir` (sorted by name: the first folder is
    /// class 0, as torchvision's `ImageFolder` numbers them) as `[C, H, W]` bytes, by
    /// `load`. Hidden entries and files without an image extension are skipped (and listed
    /// in [`Dataset::skipped`]); a class folder that cannot be read, or holds no image
    /// (unless `options` allows it), is an error naming it.
    #[cfg(feature = "image")]
    fn from_class_folders(
        dir: &Path,
        [channels, height, width]: [usize; 3],
        options: FolderOptions,
        load: impl Fn(&Path) -> Result<Vec<u8>>,
    ) -> Result<Self> {
        let classes: Vec<PathBuf> = sorted_entries(dir, true)?
            .into_iter()
            .filter(|p| !is_hidden(p))
            .collect();
        if classes.is_empty() {
            return Err(Error::data(
                dir,
                "no class folders: put each class's images in a sub-folder named after it",
            ));
        }
        let (mut pixels, mut labels, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for (label, class_dir) in classes.iter().enumerate() {
            let (images, others): (Vec<PathBuf>, Vec<PathBuf>) = sorted_entries(class_dir, false)?
                .into_iter()
                .partition(|file| !is_hidden(file) && has_image_extension(file));
            skipped.extend(others);
            if images.is_empty() && !options.allow_empty_classes {
                return Err(Error::data(
                    class_dir,
                    format!(
                        "class {label} has no images (extensions {}): add some, remove the \
                         folder, or allow empty classes with FolderOptions",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
            for file in images {
                pixels.extend(load(&file)?);
                labels.push(label);
            }
        }
        if labels.is_empty() {
            return Err(Error::data(dir, "the class folders hold no images"));
        }
        let names = classes
            .iter()
            .map(|p| {
                p.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into())
            })
            .collect();
        let mut data = Self::new(
            [labels.len(), channels, height, width],
            Pixels::U8(pixels),
            labels,
            Some(names),
        )?;
        data.skipped = skipped;
        Ok(data)
    }

    /// The files [`Dataset::from_folder`] left out: hidden ones and those without an image
    /// extension ([`IMAGE_EXTENSIONS`]), e.g. `.DS_Store` or `notes.txt`.
    pub fn skipped(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    /// Whether there are no images (never true for a constructed dataset).
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// `[N, C, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The class of each image.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The class names, by label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Per-channel mean and standard deviation of the pixels (bytes scaled to [0, 1]), for
    /// `Normalize::new` (in f64, population statistics).
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let [n, c, h, w] = self.shape;
        let plane = h * w;
        (0..c)
            .map(|channel| {
                let values = (0..n).flat_map(|i| {
                    let start = (i * c + channel) * plane;
                    (start..start + plane).map(|p| f64::from(self.pixels.value(p)))
                });
                let count = (n * plane) as f64;
                let mean = values.clone().sum::<f64>() / count;
                let var = values.map(|v| (v - mean).powi(2)).sum::<f64>() / count;
                (mean as f32, var.sqrt() as f32)
            })
            .unzip()
    }

    /// The images in the order of `shuffled_indices(len, seed, epoch)`, cut into batches of
    /// `batch_size` (the last may be smaller).
    pub fn batches(&self, batch_size: usize, seed: u64, epoch: u64) -> Result<Vec<Vec<usize>>> {
        if batch_size == 0 {
            return Err(invalid("the batch size must be at least 1".into()));
        }
        let order = shuffled_indices(self.len(), seed, epoch);
        Ok(order.chunks(batch_size).map(<[usize]>::to_vec).collect())
    }

    /// The labels of images `indices`.
    pub fn labels_at(&self, indices: &[usize]) -> Result<Vec<usize>> {
        indices
            .iter()
            .map(|&i| self.labels.get(i).copied().ok_or_else(|| self.missing(i)))
            .collect()
    }

    /// The images `indices` (each below [`Dataset::len`]) as a set of their own, with the
    /// same class names.
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        let batch = self.host_batch(indices, None)?;
        Self::new(
            batch.shape,
            batch.pixels,
            batch.labels,
            Some(self.classes.clone()),
        )
    }

    /// The first `n` images (all of them when there are fewer; `n` 0 is an error, as a set
    /// holds at least one image).
    pub fn first(&self, n: usize) -> Result<Self> {
        self.select(&(0..n.min(self.len())).collect::<Vec<_>>())
    }

    /// Images `indices` as one normalised `[n, C, H, W]` value on `device`: bytes go up as
    /// bytes and are scaled and normalised by a kernel; floats are normalised there too.
    pub fn batch(
        &self,
        device: &Device,
        indices: &[usize],
        normalize: &Normalize,
    ) -> Result<Value> {
        self.host_batch(indices, None)?.upload(device, normalize)
    }

    /// Images `indices` with their labels on the host, each augmented as `augment` says
    /// (the augmentation, the run's seed and the epoch) or as it is.
    pub fn host_batch(
        &self,
        indices: &[usize],
        augment: Option<(&Augmentation, u64, u64)>,
    ) -> Result<Batch> {
        let [_, c, h, w] = self.shape;
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(self.missing(bad));
        }
        let labels = self.labels_at(indices)?;
        let (pixels, [c, h, w]) = match (&self.pixels, augment) {
            (Pixels::U8(all), None) => (Pixels::U8(gather(all, indices, c * h * w)), [c, h, w]),
            (Pixels::F32(all), None) => (Pixels::F32(gather(all, indices, c * h * w)), [c, h, w]),
            (Pixels::U8(all), Some(how)) => {
                let (pixels, shape) = augmented(all, [c, h, w], indices, how)?;
                (Pixels::U8(pixels), shape)
            }
            (Pixels::F32(all), Some(how)) => {
                let (pixels, shape) = augmented(all, [c, h, w], indices, how)?;
                (Pixels::F32(pixels), shape)
            }
        };
        Ok(Batch {
            indices: indices.to_vec(),
            shape: [indices.len(), c, h, w],
            pixels,
            labels,
            crops: None,
        })
    }

    /// Images `indices` as stored, with their labels and the crops and flips `augment`
    /// draws for them (the same as [`Dataset::host_batch`] would apply), for the device to
    /// apply as it uploads ([`Batch::upload`]). An error for an augmentation that is not
    /// crops and flips ([`Augmentation::is_crop_flip`]).
    pub fn crop_flip_batch(
        &self,
        indices: &[usize],
        (augment, seed, epoch): (&Augmentation, u64, u64),
    ) -> Result<Batch> {
        let [_, c, h, w] = self.shape;
        let [_, oh, ow] = augment.output_shape([c, h, w])?;
        let windows = indices
            .iter()
            .map(|&i| augment.crop_flip([c, h, w], seed, epoch, i))
            .collect::<Result<Vec<_>>>()?;
        let stored = self.host_batch(indices, None)?;
        Ok(Batch {
            shape: [indices.len(), c, oh, ow],
            crops: Some(CropFlips {
                source: [c, h, w],
                size: (oh, ow),
                windows,
                fill: augment.fill(),
            }),
            ..stored
        })
    }

    fn missing(&self, i: usize) -> Error {
        invalid(format!("image {i} requested, the set has {}", self.len()))
    }
}

/// Images `indices` of `shape`, augmented, one after another, and their shape after it.
fn augmented<T: Augmentable>(
    all: &[T],
    shape: [usize; 3],
    indices: &[usize],
    (augment, seed, epoch): (&Augmentation, u64, u64),
) -> Result<(Vec<T>, [usize; 3])> {
    let out = augment.output_shape(shape)?;
    let size = shape.iter().product::<usize>();
    let mut pixels = Vec::with_capacity(indices.len() * out.iter().product::<usize>());
    for &i in indices {
        let image =
            ArrayView3::from_shape(shape, &all[i * size..(i + 1) * size]).map_err(shape_error)?;
        pixels.extend(augment.apply(image, seed, epoch, i)?);
    }
    Ok((pixels, out))
}

/// A batch on the host: images `[n, C, H, W]` (after any augmentation), their labels and
/// their indices in the set, ready to upload. With `crops`, the pixels are the images as
/// stored and the device crops and flips them as they upload.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The images' indices in their dataset.
    pub indices: Vec<usize>,
    /// `[n, C, H, W]`, after any augmentation.
    pub shape: [usize; 4],
    /// The pixels, image after image.
    pub pixels: Pixels,
    /// One label per image.
    pub labels: Vec<usize>,
    /// Crops and flips left for the device (`LoaderOptions::augment_on_device`): `pixels`
    /// then hold the stored images, of shape `crops.source`.
    pub crops: Option<CropFlips>,
}

impl Batch {
    /// The images as one normalised value on `device`: bytes go up as bytes (a quarter of
    /// the floats' traffic) and are scaled and normalised by a kernel there, cropped and
    /// flipped by the same kernel when the batch has `crops`.
    pub fn upload(&self, device: &Device, normalize: &Normalize) -> Result<Value> {
        if let Some(crops) = &self.crops {
            let [c, h, w] = crops.source;
            let stored = (self.len(), c, h, w);
            return match &self.pixels {
                Pixels::U8(p) => {
                    let images = ArrayView4::from_shape(stored, p).map_err(shape_error)?;
                    crops.bytes_on(device, &images, normalize)
                }
                Pixels::F32(p) => {
                    let images = ArrayView4::from_shape(stored, p).map_err(shape_error)?;
                    crops.floats_on(device, &images, normalize)
                }
            };
        }
        let [n, c, h, w] = self.shape;
        match &self.pixels {
            Pixels::U8(p) => {
                let array = ArrayView4::from_shape((n, c, h, w), p).map_err(shape_error)?;
                normalize.bytes_on(device, &array)
            }
            Pixels::F32(p) => {
                let array = Array4::from_shape_vec((n, c, h, w), p.clone()).map_err(shape_error)?;
                device.upload(array.into_dyn())?.normalize(normalize)
            }
        }
    }

    /// How many images.
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    /// Whether it holds no image.
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }
}

/// Images `indices` of `size` values each, one after another.
fn gather<T: Copy>(all: &[T], indices: &[usize], size: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(indices.len() * size);
    for &i in indices {
        out.extend_from_slice(&all[i * size..(i + 1) * size]);
    }
    out
}

fn invalid(detail: String) -> Error {
    Error::InvalidArgument {
        op: "dataset",
        detail,
    }
}

fn shape_error(e: ndarray::ShapeError) -> Error {
    Error::ShapeMismatch {
        op: "dataset",
        shapes: Vec::new(),
        detail: e.to_string(),
    }
}

#[cfg(feature = "image")]
fn dim_u32(size: usize) -> Result<u32> {
    u32::try_from(size).map_err(|_| invalid(format!("image size {size} is too large")))
}

/// The sub-folders (`dirs`) or files of `dir`, sorted by name.
/// A name starting with a dot (`.DS_Store`, `.ipynb_checkpoints`).
#[cfg(feature = "image")]
fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

#[cfg(feature = "image")]
fn has_image_extension(path: &Path) -> bool {
    path.extension().is_some_and(|e| {
        let e = e.to_string_lossy().to_ascii_lowercase();
        IMAGE_EXTENSIONS.contains(&e.as_str())
    })
}

#[cfg(feature = "image")]
fn sorted_entries(dir: &Path, dirs: bool) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::data_io(dir, "cannot list", e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| Error::data_io(dir, "cannot list", e))?
            .path();
        if path.is_dir() == dirs {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}
