//! The IDX reader on the shipped MNIST files, its errors, and seeded shuffling.

use std::path::PathBuf;

use wgcnn::data::{Mnist, read_idx_images, read_idx_labels, shuffled_indices};

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

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgcnn-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn header(magic: u32, dims: &[u32]) -> Vec<u8> {
    std::iter::once(magic)
        .chain(dims.iter().copied())
        .flat_map(u32::to_be_bytes)
        .collect()
}

#[test]
fn malformed_files_are_clear_errors() {
    let mut good = header(0x803, &[2, 2, 3]);
    good.extend([7u8; 12]);
    let images = read_idx_images(temp_file("good-images", &good)).unwrap();
    assert_eq!((images.count, images.rows, images.cols), (2, 2, 3));
    assert_eq!(images.image(1), &[7; 6]);

    let err =
        read_idx_images(temp_file("labels-as-images", &header(0x801, &[0, 0, 0]))).unwrap_err();
    assert!(
        err.to_string()
            .contains("wrong magic number 0x00000801, expected 0x00000803"),
        "{err}"
    );
    let err = read_idx_images(temp_file("truncated", &good[..good.len() - 1])).unwrap_err();
    assert!(
        err.to_string().contains("truncated or padded: 27 bytes"),
        "{err}"
    );
    let err = read_idx_labels(temp_file("tiny", &[0, 0])).unwrap_err();
    assert!(
        err.to_string()
            .contains("shorter than the 8-byte IDX header"),
        "{err}"
    );
    let err = read_idx_labels(temp_file("bad-gzip", &[0x1f, 0x8b, 1, 2, 3])).unwrap_err();
    assert!(err.to_string().contains("corrupt gzip data"), "{err}");
    let err = read_idx_labels("/no/such/dir/labels").unwrap_err();
    assert!(
        err.to_string()
            .contains("/no/such/dir/labels: cannot read the file"),
        "{err}"
    );

    // A set whose label count differs from its image count.
    let dir = temp_file("train-images-idx3-ubyte", &good)
        .parent()
        .unwrap()
        .to_path_buf();
    let mut labels = header(0x801, &[3]);
    labels.extend([1u8, 2, 3]);
    temp_file("train-labels-idx1-ubyte", &labels);
    let err = Mnist::load(&dir).unwrap_err();
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
