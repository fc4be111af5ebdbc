//! Data: `Dataset` (labelled images of any size and channel count, from memory, MNIST,
//! CIFAR-10 or a folder of images), the IDX format of MNIST (and Fashion-MNIST), seeded
//! shuffling, and torchvision's image preprocessing (`Preprocess`: resize, center crop,
//! normalise; photos decoded with their EXIF orientation).

mod cifar;
mod dataset;
mod idx;
mod preprocess;

pub use cifar::{Cifar10, read_batches as read_cifar_batches};
pub use dataset::{Dataset, FolderOptions, IMAGE_EXTENSIONS, Pixels};
pub use idx::{Images, Mnist, read_idx_images, read_idx_labels};
#[cfg(feature = "image")]
pub use preprocess::load_image;
pub use preprocess::{
    IMAGENET_MEAN, IMAGENET_STD, Preprocess, Sample, center_crop, normalize, resize,
    resize_shorter, resized_size,
};

/// A permutation of `0..n` for `epoch` under `seed` (Fisher–Yates on SplitMix64): the same
/// seed and epoch always give the same order, each epoch a different one.
pub fn shuffled_indices(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
