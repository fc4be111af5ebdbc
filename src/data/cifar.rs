//! CIFAR-10 in its binary version (`cifar-10-batches-bin`; "CIFAR-10, A. Krizhevsky, V. Nair,
//! G. Hinton, 2009"): records of one label byte and 3,072 pixel bytes, the R, G and B planes
//! of a 32×32 photo, in five training files of 10,000 records and one test file, with the class
//! names in `batches.meta.txt`. `scripts/fetch_cifar10.sh DIR` downloads and checks them.

use std::path::{Path, PathBuf};

use super::dataset::{Dataset, Pixels};
use crate::error::{Error, Result};

/// Bytes of one record: the label, then 3 × 32 × 32 pixels.
const RECORD: usize = 1 + PIXELS;
const PIXELS: usize = 3 * 32 * 32;
const CLASSES: usize = 10;
const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const TEST_FILE: &str = "test_batch.bin";
const META_FILE: &str = "batches.meta.txt";

/// The training and test sets of CIFAR-10, each a `[N, 3, 32, 32]` byte [`Dataset`] whose
/// classes are named by `batches.meta.txt` (airplane, automobile, …).
#[derive(Clone, Debug, PartialEq)]
pub struct Cifar10 {
    /// The 50,000 training photos (the five `data_batch_*.bin`, in order).
    pub train: Dataset,
    /// The 10,000 test photos (`test_batch.bin`).
    pub test: Dataset,
}

impl Cifar10 {
    /// Loads `dir` as `scripts/fetch_cifar10.sh DIR` leaves it, or its
    /// `cifar-10-batches-bin/` itself.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = batches_dir(dir.as_ref());
        let classes = read_classes(&dir.join(META_FILE))?;
        let train: Vec<PathBuf> = TRAIN_FILES.iter().map(|f| dir.join(f)).collect();
        Ok(Self {
            train: read_batches(&train, &classes)?,
            test: read_batches(&[dir.join(TEST_FILE)], &classes)?,
        })
    }
}

/// `dir/cifar-10-batches-bin` where it exists, else `dir`.
fn batches_dir(dir: &Path) -> PathBuf {
    let inner = dir.join("cifar-10-batches-bin");
    if inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::data_io(
            path,
            "cannot read this CIFAR-10 file (scripts/fetch_cifar10.sh DIR downloads the set)",
            e,
        )
    })
}

/// The ten class names, one per non-empty line.
fn read_classes(path: &Path) -> Result<Vec<String>> {
    let text = String::from_utf8(read_file(path)?)
        .map_err(|_| Error::data(path, "the class names are not UTF-8 text"))?;
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect();
    if classes.len() != CLASSES {
        return Err(Error::data(
            path,
            format!(
                "{} class names; CIFAR-10 has {CLASSES}, one per line",
                classes.len()
            ),
        ));
    }
    Ok(classes)
}

/// The records of `paths`, in order, as one dataset.
pub fn read_batches(paths: &[PathBuf], classes: &[String]) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let bytes = read_file(path)?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
            return Err(Error::data(
                path,
                format!(
                    "{} bytes, not a whole number of {RECORD}-byte records (a label byte and \
                     {PIXELS} pixels): truncated or not CIFAR-10's binary version",
                    bytes.len()
                ),
            ));
        }
        for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
            let label = usize::from(record[0]);
            if label >= classes.len() {
                return Err(Error::data(
                    path,
                    format!(
                        "record {i} has label {label}, not one of the {} classes",
                        classes.len()
                    ),
                ));
            }
            labels.push(label);
            pixels.extend_from_slice(&record[1..]);
        }
    }
    Dataset::new(
        [labels.len(), 3, 32, 32],
        Pixels::U8(pixels),
        labels,
        Some(classes.to_vec()),
    )
}
