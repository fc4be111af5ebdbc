//! The IDX files of MNIST: a big-endian header (magic 0x00000803 for images, 0x00000801 for
//! labels, then the dimensions) followed by u8 data; gzip-compressed or raw.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Grey images, `count` of `rows × cols` bytes each, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    /// Number of images.
    pub count: usize,
    /// Height.
    pub rows: usize,
    /// Width.
    pub cols: usize,
    /// `count · rows · cols` pixels, 0 (background) to 255.
    pub pixels: Vec<u8>,
}

impl Images {
    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.rows * self.cols;
        &self.pixels[i * size..(i + 1) * size]
    }

    /// The images at `indices`, in that order (indices past the end are skipped).
    pub fn select(&self, indices: &[usize]) -> Images {
        let kept: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| i < self.count)
            .collect();
        Images {
            count: kept.len(),
            rows: self.rows,
            cols: self.cols,
            pixels: kept.iter().flat_map(|&i| self.image(i)).copied().collect(),
        }
    }

    /// The first `n` images (all of them if there are fewer).
    pub fn first(&self, n: usize) -> Images {
        let count = n.min(self.count);
        Images {
            count,
            rows: self.rows,
            cols: self.cols,
            pixels: self.pixels[..count * self.rows * self.cols].to_vec(),
        }
    }
}

/// A training and a test set of labelled images.
#[derive(Clone, Debug)]
pub struct Mnist {
    /// Training images.
    pub train_images: Images,
    /// Training labels, one per image.
    pub train_labels: Vec<u8>,
    /// Test images.
    pub test_images: Images,
    /// Test labels, one per image.
    pub test_labels: Vec<u8>,
}

/// The most that deflate expands its input by.
const MAX_DEFLATE_RATIO: usize = 1032;

/// The file's bytes, gunzipped if they start with the gzip magic.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::data_io(path, "cannot read the file", e))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    // The gzip trailer's last four bytes give the size (mod 2³²): one allocation instead of
    // a doubling series, unless the size is more than deflate can expand the file to or
    // more than the host can give (a corrupt trailer): then the Vec grows as it reads.
    let size = raw
        .last_chunk::<4>()
        .map_or(0, |&bytes| u32::from_le_bytes(bytes) as usize);
    let mut out = Vec::new();
    if size <= raw.len().saturating_mul(MAX_DEFLATE_RATIO) {
        let _ = out.try_reserve_exact(size);
    }
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| Error::data(path, format!("corrupt gzip data: {e}")))?;
    Ok(out)
}

/// Parses the header: magic, then `dims` big-endian u32 sizes; checks the payload length.
fn parse(path: &Path, bytes: &[u8], magic: u32, dims: usize) -> Result<Vec<usize>> {
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(Error::data(
            path,
            format!(
                "truncated: {} bytes, shorter than the {header}-byte IDX header",
                bytes.len()
            ),
        ));
    }
    let word = |i: usize| {
        u32::from_be_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
    if word(0) != magic {
        return Err(Error::data(
            path,
            format!(
                "wrong magic number 0x{:08x}, expected 0x{magic:08x} (is this the right IDX file?)",
                word(0)
            ),
        ));
    }
    let sizes: Vec<usize> = (1..=dims).map(|i| word(i) as usize).collect();
    // Checked: a header of 2³¹ × 2³¹ × 4 must not wrap to a size that matches the file.
    let expected = sizes
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|payload| payload.checked_add(header))
        .ok_or_else(|| {
            Error::data(
                path,
                format!("the header's sizes {sizes:?} overflow: a corrupt or hostile file"),
            )
        })?;
    if bytes.len() != expected {
        return Err(Error::data(
            path,
            format!(
                "truncated or padded: {} bytes, the header {sizes:?} implies {expected}",
                bytes.len()
            ),
        ));
    }
    Ok(sizes)
}

/// Reads an IDX image file (gzip or raw).
pub fn read_idx_images(path: impl AsRef<Path>) -> Result<Images> {
    let path = path.as_ref();
    let mut bytes = read_maybe_gzip(path)?;
    let sizes = parse(path, &bytes, IMAGES_MAGIC, 3)?;
    bytes.drain(..16);
    Ok(Images {
        count: sizes[0],
        rows: sizes[1],
        cols: sizes[2],
        pixels: bytes,
    })
}

/// Reads an IDX label file (gzip or raw).
pub fn read_idx_labels(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let bytes = read_maybe_gzip(path)?;
    parse(path, &bytes, LABELS_MAGIC, 1)?;
    Ok(bytes[8..].to_vec())
}

/// `dir/name.gz` if it exists, else `dir/name`.
fn find(dir: &Path, name: &str) -> PathBuf {
    let gz = dir.join(format!("{name}.gz"));
    if gz.exists() { gz } else { dir.join(name) }
}

impl Mnist {
    /// Loads the four standard files (`train-images-idx3-ubyte[.gz]`, …) from `dir`; works
    /// unchanged for Fashion-MNIST.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let set = |images: &str, labels: &str| -> Result<(Images, Vec<u8>)> {
            let (image_path, label_path) = (find(dir, images), find(dir, labels));
            let images = read_idx_images(&image_path)?;
            let labels = read_idx_labels(&label_path)?;
            if images.count != labels.len() {
                return Err(Error::data(
                    &label_path,
                    format!(
                        "{} labels for the {} images of {}",
                        labels.len(),
                        images.count,
                        image_path.display()
                    ),
                ));
            }
            Ok((images, labels))
        };
        // The test set decompresses on a thread of its own, beside the six times larger
        // training set (after it where no thread can be made).
        let test_set = || set("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte");
        let ((train_images, train_labels), (test_images, test_labels)) =
            std::thread::scope(|scope| {
                let test = std::thread::Builder::new().spawn_scoped(scope, test_set);
                let train = set("train-images-idx3-ubyte", "train-labels-idx1-ubyte");
                let test = match test {
                    Ok(thread) => thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(_) => test_set(),
                };
                Ok::<_, Error>((train?, test?))
            })?;
        Ok(Self {
            train_images,
            train_labels,
            test_images,
            test_labels,
        })
    }
}
