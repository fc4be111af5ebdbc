//! The IDX reader on the shipped MNIST files, its errors, seeded shuffling, augmentation
//! (crops and flips move pixels and nothing else, every position is reachable, seeded runs
//! repeat) and the loader (every image once per epoch in the seeded order, however slowly
//! it is taken).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::common;

use common::Scratch;
use wgcnn::data::{
    Augmentation, Dataset, Loader, LoaderOptions, Mnist, Pixels, read_idx_images, read_idx_labels,
    resize, shuffled_indices,
};
use wgcnn::ndarray::{Array3, s};

fn mnist_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist")
}

#[test]
fn the_shipped_mnist_matches_its_published_facts() {
    let mnist = Mnist::load(mnist_dir()).unwrap();
    assert_eq!(
        (
            mnist.train_images.count,
            mnist.train_images.rows,
            mnist.train_images.cols
        ),
        (60_000, 28, 28)
    );
    assert_eq!(mnist.test_images.count, 10_000);
    let counts = |labels: &[u8]| {
        (0..10u8)
            .map(|d| labels.iter().filter(|&&l| l == d).count())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        counts(&mnist.train_labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        counts(&mnist.test_labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(&mnist.train_labels[..8], &[5, 0, 4, 1, 9, 2, 1, 3]);
    assert_eq!(&mnist.test_labels[..8], &[7, 2, 1, 0, 4, 1, 4, 9]);
    let n = mnist.train_images.pixels.len() as f64;
    let mean = mnist
        .train_images
        .pixels
        .iter()
        .map(|&p| f64::from(p) / 255.0)
        .sum::<f64>()
        / n;
    let var = mnist
        .train_images
        .pixels
        .iter()
        .map(|&p| (f64::from(p) / 255.0 - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!((mean - 0.1307).abs() < 5e-5, "{mean}");
    assert!((var.sqrt() - 0.3081).abs() < 5e-5, "{}", var.sqrt());
}

fn header(magic: u32, dims: &[u32]) -> Vec<u8> {
    std::iter::once(magic)
        .chain(dims.iter().copied())
        .flat_map(u32::to_be_bytes)
        .collect()
}

#[test]
fn malformed_files_are_clear_errors() {
    let scratch = Scratch::new("data-test");
    let mut good = header(0x803, &[2, 2, 3]);
    good.extend([7u8; 12]);
    let images = read_idx_images(scratch.file("good-images", &good)).unwrap();
    assert_eq!((images.count, images.rows, images.cols), (2, 2, 3));
    assert_eq!(images.image(1), &[7; 6]);

    let err =
        read_idx_images(scratch.file("labels-as-images", &header(0x801, &[0, 0, 0]))).unwrap_err();
    assert!(
        err.to_string()
            .contains("wrong magic number 0x00000801, expected 0x00000803"),
        "{err}"
    );
    let err = read_idx_images(scratch.file("truncated", &good[..good.len() - 1])).unwrap_err();
    assert!(
        err.to_string().contains("truncated or padded: 27 bytes"),
        "{err}"
    );
    let err = read_idx_labels(scratch.file("tiny", &[0, 0])).unwrap_err();
    assert!(
        err.to_string()
            .contains("shorter than the 8-byte IDX header"),
        "{err}"
    );
    let err = read_idx_labels(scratch.file("bad-gzip", &[0x1f, 0x8b, 1, 2, 3])).unwrap_err();
    assert!(err.to_string().contains("corrupt gzip data"), "{err}");
    let err = read_idx_labels("/no/such/dir/labels").unwrap_err();
    assert!(
        err.to_string()
            .contains("/no/such/dir/labels: cannot read the file"),
        "{err}"
    );

    // A set whose label count differs from its image count.
    scratch.file("train-images-idx3-ubyte", &good);
    let mut labels = header(0x801, &[3]);
    labels.extend([1u8, 2, 3]);
    scratch.file("train-labels-idx1-ubyte", &labels);
    let err = Mnist::load(scratch.path()).unwrap_err();
    assert!(
        err.to_string().contains("3 labels for the 2 images"),
        "{err}"
    );
    let err = Mnist::load("/no/such/dir").unwrap_err();
    assert!(err.to_string().contains("cannot read the file"), "{err}");
}

#[test]
fn shuffling_is_a_seeded_permutation() {
    let a = shuffled_indices(1000, 7, 0);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_eq!(a, shuffled_indices(1000, 7, 0));
    assert_ne!(a, shuffled_indices(1000, 7, 1));
    assert_ne!(a, shuffled_indices(1000, 8, 0));
    assert_ne!(a, (0..1000).collect::<Vec<_>>());
}

/// A `[3, 5, 7]` float image whose every pixel is different (its own position).
fn distinct_image() -> Array3<f32> {
    Array3::from_shape_fn((3, 5, 7), |(c, y, x)| 1.0 + (c * 100 + y * 10 + x) as f32)
}

#[test]
fn a_padded_random_crop_is_a_window_of_the_padded_image() {
    let image = distinct_image();
    let augment = Augmentation::new().random_crop((4, 6), 2).unwrap();
    let (ph, pw) = (5 + 4, 7 + 4);
    let mut padded = Array3::<f32>::zeros((3, ph, pw));
    padded.slice_mut(s![.., 2..7, 2..9]).assign(&image);
    let mut positions = HashSet::new();
    for index in 0..2000 {
        let out = augment.apply(image.view(), 3, 0, index).unwrap();
        assert_eq!(out.dim(), (3, 4, 6));
        // The one window of the padded image it is.
        let found: Vec<(usize, usize)> = (0..=ph - 4)
            .flat_map(|t| (0..=pw - 6).map(move |l| (t, l)))
            .filter(|&(t, l)| padded.slice(s![.., t..t + 4, l..l + 6]) == out)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "image {index} is no window of the padded image"
        );
        positions.insert(found[0]);
    }
    // All (9 − 4 + 1) × (11 − 6 + 1) positions come up.
    assert_eq!(positions.len(), 36);
}

#[test]
fn a_flip_mirrors_the_rows_as_often_as_asked() {
    let image = distinct_image();
    let mirrored = image.slice(s![.., .., ..;-1]).to_owned();
    for (p, low, high) in [(0.0, 0, 0), (1.0, 1000, 1000), (0.5, 430, 570)] {
        let augment = Augmentation::new().horizontal_flip(p).unwrap();
        let mut flips = 0;
        for index in 0..1000 {
            let out = augment.apply(image.view(), 11, 2, index).unwrap();
            if out == mirrored {
                flips += 1;
            } else {
                assert_eq!(out, image, "neither the image nor its mirror");
            }
        }
        assert!(
            (low..=high).contains(&flips),
            "p {p}: {flips} flips of 1000"
        );
    }
}

#[test]
fn augmentation_repeats_by_seed_epoch_and_image() {
    let image = Array3::from_shape_fn((3, 32, 32), |(c, y, x)| (c * 70 + y * 3 + x) as u8);
    let augment = Augmentation::new()
        .random_crop((32, 32), 4)
        .unwrap()
        .horizontal_flip(0.5)
        .unwrap();
    let draw = |seed, epoch, index| augment.apply(image.view(), seed, epoch, index).unwrap();
    let first: Vec<_> = (0..20).map(|i| draw(1, 0, i)).collect();
    assert_eq!(first, (0..20).map(|i| draw(1, 0, i)).collect::<Vec<_>>());
    let differ = |other: Vec<Array3<u8>>| first.iter().zip(&other).filter(|(a, b)| a != b).count();
    assert!(
        differ((0..20).map(|i| draw(1, 1, i)).collect()) > 10,
        "epochs draw alike"
    );
    assert!(
        differ((0..20).map(|i| draw(2, 0, i)).collect()) > 10,
        "seeds draw alike"
    );
    assert!(
        differ((1..21).map(|i| draw(1, 0, i)).collect()) > 10,
        "images draw alike"
    );
}

#[test]
fn a_random_resized_crop_resizes_a_region_of_the_asked_area_and_ratio() {
    // Pixels that are their own column: the region's columns show through the resize.
    let image = Array3::from_shape_fn((1, 40, 60), |(_, _, x)| x as f32 / 59.0);
    // The whole image when scale and ratio allow only it: a plain resize.
    let whole = Augmentation::new()
        .random_resized_crop((20, 30), (1.0, 1.0), (1.5, 1.5))
        .unwrap();
    let expected = resize(image.view(), (20, 30)).unwrap();
    assert_eq!(whole.apply(image.view(), 0, 0, 0).unwrap(), expected);
    // Small regions: the output spans a narrow band of columns, somewhere else each time.
    let small = Augmentation::new()
        .random_resized_crop((8, 8), (0.05, 0.1), (0.75, 1.33))
        .unwrap();
    let mut lefts = HashSet::new();
    for index in 0..200 {
        let out = small.apply(image.view(), 5, 0, index).unwrap();
        assert_eq!(out.dim(), (1, 8, 8));
        let (low, high) = out
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        // A region of at most 0.1 × 2400 px and ratio ≤ 4/3 is at most 18 columns wide.
        assert!(
            (high - low) * 59.0 <= 18.0,
            "image {index}: columns {low}..{high}"
        );
        lefts.insert((low * 59.0).round() as i64 / 10);
    }
    assert!(lefts.len() >= 5, "regions sit in {} places", lefts.len());
}

#[test]
fn augmentation_refuses_what_cannot_be_done() {
    let image = distinct_image();
    let big = Augmentation::new().random_crop((10, 7), 2).unwrap();
    let err = big.apply(image.view(), 0, 0, 0).unwrap_err().to_string();
    assert!(
        err.contains("does not fit a 5×7 image padded by 2"),
        "{err}"
    );
    for err in [
        Augmentation::new().random_crop((0, 3), 1).unwrap_err(),
        Augmentation::new().horizontal_flip(1.5).unwrap_err(),
        Augmentation::new()
            .random_resized_crop((8, 8), (0.5, 1.5), (1.0, 1.0))
            .unwrap_err(),
        Augmentation::new()
            .random_resized_crop((8, 8), (0.5, 0.2), (1.0, 1.0))
            .unwrap_err(),
    ] {
        assert!(err.to_string().contains("augmentation"), "{err}");
    }
}

/// 103 grey 2×2 images of floats, image i holding the value i (label i mod 4).
fn numbered_set() -> Arc<Dataset> {
    let pixels = (0..103).flat_map(|i| [i as f32; 4]).collect();
    let labels = (0..103).map(|i| i % 4).collect();
    Arc::new(Dataset::new([103, 1, 2, 2], Pixels::F32(pixels), labels, None).unwrap())
}

#[test]
fn a_slow_consumer_sees_every_image_once_per_epoch_in_the_seeded_order() {
    let data = numbered_set();
    let options = LoaderOptions::new(10).seed(9).prefetch(2);
    for epoch in 0..2 {
        let loader = Loader::epoch(data.clone(), &options, epoch).unwrap();
        assert_eq!(loader.len(), 11);
        let mut seen = Vec::new();
        for batch in loader {
            let batch = batch.unwrap();
            std::thread::sleep(Duration::from_millis(3));
            let Pixels::F32(pixels) = &batch.pixels else {
                panic!("float pixels became bytes")
            };
            for (k, &i) in batch.indices.iter().enumerate() {
                assert_eq!(
                    pixels[4 * k..4 * k + 4],
                    [i as f32; 4],
                    "image {i}'s pixels"
                );
                assert_eq!(batch.labels[k], i % 4, "image {i}'s label");
            }
            seen.extend(batch.indices);
        }
        assert_eq!(seen, shuffled_indices(103, 9, epoch), "epoch {epoch}");
    }
    // drop_last and an unshuffled order.
    let ordered = LoaderOptions::new(10).shuffle(false).drop_last(true);
    let seen: Vec<usize> = Loader::epoch(data.clone(), &ordered, 0)
        .unwrap()
        .flat_map(|b| b.unwrap().indices)
        .collect();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
}

#[test]
fn the_loader_augments_as_the_dataset_does_and_stops_when_dropped() {
    let pixels = (0..40 * 3 * 8 * 8).map(|v| (v * 7 % 256) as u8).collect();
    let data =
        Arc::new(Dataset::new([40, 3, 8, 8], Pixels::U8(pixels), vec![1; 40], None).unwrap());
    let augment = Augmentation::new()
        .random_crop((6, 6), 1)
        .unwrap()
        .horizontal_flip(0.5)
        .unwrap();
    let options = LoaderOptions::new(16).seed(4).augmentation(augment.clone());
    for batch in Loader::epoch(data.clone(), &options, 3).unwrap() {
        let batch = batch.unwrap();
        assert_eq!(batch.shape, [batch.indices.len(), 3, 6, 6]);
        let expected = data
            .host_batch(&batch.indices, Some((&augment, 4, 3)))
            .unwrap();
        assert_eq!(batch, expected);
    }
    // Dropped after one batch with the thread blocked on a full channel: no hang.
    let mut loader = Loader::epoch(data.clone(), &options.clone().prefetch(1), 0).unwrap();
    assert!(loader.next().unwrap().is_ok());
    drop(loader);
    // Options and augmentations that cannot work are errors before any thread starts.
    for (options, needle) in [
        (LoaderOptions::new(0), "at least 1"),
        (LoaderOptions::new(4).prefetch(0), "at least 1"),
        (
            LoaderOptions::new(4).augmentation(Augmentation::new().random_crop((9, 9), 0).unwrap()),
            "does not fit",
        ),
    ] {
        let err = Loader::epoch(data.clone(), &options, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn a_selection_is_a_set_of_its_own() {
    let data = numbered_set();
    let picked = data.select(&[5, 2, 5]).unwrap();
    assert_eq!(picked.shape(), [3, 1, 2, 2]);
    assert_eq!(picked.labels(), [1, 2, 1]);
    assert_eq!(picked.classes(), data.classes());
    let batch = picked.host_batch(&[1], None).unwrap();
    assert_eq!(batch.pixels, Pixels::F32(vec![2.0; 4]));
    assert_eq!(data.first(1000).unwrap(), *data);
    assert_eq!(data.first(3).unwrap().labels(), [0, 1, 2]);
    let err = data.select(&[103]).unwrap_err().to_string();
    assert!(
        err.contains("image 103 requested, the set has 103"),
        "{err}"
    );
}
