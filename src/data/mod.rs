//! Data: `Dataset` (labelled images of any size and channel count, from memory, MNIST,
//! CIFAR-10 or a folder of images), the IDX format of MNIST (and Fashion-MNIST), seeded
//! shuffling, and torchvision's image preprocessing (`Preprocess`: resize, center crop,
//! normalise; photos decoded with their EXIF orientation).

mod augment;
mod cifar;
mod dataset;
mod idx;
mod loader;
mod preprocess;

pub use crate::ops::{CropFlip, CropFlips};
pub use augment::{Augmentable, Augmentation};
pub use cifar::{Cifar10, read_batches as read_cifar_batches};
pub use dataset::{Batch, Dataset, FolderOptions, IMAGE_EXTENSIONS, Pixels};
pub use idx::{Images, Mnist, read_idx_images, read_idx_labels};
pub use loader::{Loader, LoaderOptions};
#[cfg(feature = "image")]
pub use preprocess::load_image;
pub use preprocess::{
    IMAGENET_MEAN, IMAGENET_STD, Preprocess, Sample, center_crop, normalize, resize,
    resize_shorter, resized_size,
};

/// A permutation of `0..n` for `epoch` under `seed` (Fisher–Yates on SplitMix64): the same
/// seed and epoch always give the same order, each epoch a different one.
pub fn shuffled_indices(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix::new(seed ^ epoch.wrapping_mul(SplitMix::GAMMA));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// SplitMix64: a small, fast generator whose streams are cheap to derive from a few numbers
/// (the shuffles' and the augmentations' seeds), so that every draw can be reproduced.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix {
    state: u64,
}

impl SplitMix {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n ≥ 1`; the modulo's bias is below 2⁻⁴⁰ for the sizes here).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `[low, high)`.
    pub(crate) fn uniform(&mut self, low: f64, high: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        low + (high - low) * unit
    }
}
