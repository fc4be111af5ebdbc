//! `Loader`: an epoch's batches gathered and augmented (or their crops and flips drawn, for
//! the device to cut) on a background thread, a bounded number ahead of the training step
//! that takes them, so that the device never waits for the host while the host keeps up.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::augment::Augmentation;
use super::dataset::{Batch, Dataset};
use super::shuffled_indices;
use crate::error::{Error, Result};

const OP: &str = "loader";

/// How a [`Loader`] cuts a dataset into batches (PyTorch's `DataLoader` options).
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderOptions {
    /// Images per batch (the last one may hold fewer, unless `drop_last`).
    pub batch_size: usize,
    /// Seeds the order (`shuffled_indices(len, seed, epoch)`) and every augmentation draw.
    pub seed: u64,
    /// A new permutation each epoch; without it the set's own order (evaluation).
    pub shuffle: bool,
    /// Leave out a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Batches made ahead of the one being used, at most (the thread then waits).
    pub prefetch: usize,
    /// Transforms applied to each image, seeded by (seed, epoch, image index).
    pub augmentation: Option<Augmentation>,
    /// Leave the augmentation's crops and flips to the device: the thread gathers the
    /// stored images and draws each one's window, [`Batch::upload`] cuts and flips them in
    /// the normalisation kernel. Only for crops and flips
    /// ([`Augmentation::is_crop_flip`]); the same images either way. Without an
    /// augmentation it changes nothing.
    pub augment_on_device: bool,
}

impl LoaderOptions {
    /// Shuffled batches of `batch_size`, seed 0, four ahead, no augmentation.
    pub fn new(batch_size: usize) -> Self {
        Self {
            batch_size,
            seed: 0,
            shuffle: true,
            drop_last: false,
            prefetch: 4,
            augmentation: None,
            augment_on_device: false,
        }
    }

    /// Sets [`LoaderOptions::seed`].
    pub fn seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    /// Sets [`LoaderOptions::shuffle`].
    pub fn shuffle(self, shuffle: bool) -> Self {
        Self { shuffle, ..self }
    }

    /// Sets [`LoaderOptions::drop_last`].
    pub fn drop_last(self, drop_last: bool) -> Self {
        Self { drop_last, ..self }
    }

    /// Sets [`LoaderOptions::prefetch`].
    pub fn prefetch(self, prefetch: usize) -> Self {
        Self { prefetch, ..self }
    }

    /// Sets [`LoaderOptions::augment_on_device`].
    pub fn augment_on_device(self, augment_on_device: bool) -> Self {
        Self {
            augment_on_device,
            ..self
        }
    }

    /// Sets [`LoaderOptions::augmentation`].
    pub fn augmentation(self, augmentation: Augmentation) -> Self {
        Self {
            augmentation: Some(augmentation),
            ..self
        }
    }
}

/// One epoch's batches, made on a background thread at most `prefetch` ahead; an iterator
/// of [`Batch`]es in the epoch's order. Dropping it stops the thread.
///
/// ```
/// use std::sync::Arc;
/// use wgcnn::prelude::*;
///
/// # fn main() -> wgcnn::Result<()> {
/// let pixels = (0..10 * 3 * 4 * 4).map(|v| v as u8).collect();
/// let data = Arc::new(Dataset::new([10, 3, 4, 4], Pixels::U8(pixels), vec![0; 10], None)?);
/// let options = LoaderOptions::new(4).seed(7);
/// let loader = Loader::epoch(data, &options, 0)?;
/// assert_eq!(loader.len(), 3);
/// let seen: Vec<usize> = loader.map(|b| Ok(b?.indices)).collect::<wgcnn::Result<Vec<_>>>()?.concat();
/// assert_eq!(seen, shuffled_indices(10, 7, 0));
/// # Ok(())
/// # }
/// ```
pub struct Loader {
    batches: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    remaining: usize,
    waited: Duration,
}

impl Loader {
    /// Starts making epoch `epoch`'s batches of `data`.
    pub fn epoch(data: Arc<Dataset>, options: &LoaderOptions, epoch: u64) -> Result<Self> {
        if options.batch_size == 0 || options.prefetch == 0 {
            return Err(Error::InvalidArgument {
                op: OP,
                detail: format!(
                    "batch size {} and prefetch {}: both must be at least 1",
                    options.batch_size, options.prefetch
                ),
            });
        }
        if let Some(augment) = &options.augmentation {
            let [_, c, h, w] = data.shape();
            augment.output_shape([c, h, w])?;
            if options.augment_on_device {
                augment.crop_flip([c, h, w], options.seed, epoch, 0)?;
            }
        }
        let order = if options.shuffle {
            shuffled_indices(data.len(), options.seed, epoch)
        } else {
            (0..data.len()).collect()
        };
        let mut batches: Vec<Vec<usize>> = order
            .chunks(options.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if options.drop_last && batches.last().is_some_and(|b| b.len() < options.batch_size) {
            batches.pop();
        }
        let remaining = batches.len();
        let (sender, receiver) = sync_channel(options.prefetch);
        let augmentation = options
            .augmentation
            .clone()
            .map(|augment| EpochAugmentation {
                augment,
                seed: options.seed,
                epoch,
                on_device: options.augment_on_device,
            });
        let worker = std::thread::Builder::new()
            .name("wgcnn-loader".into())
            .spawn(move || make_batches(&data, batches, augmentation.as_ref(), &sender))
            .map_err(|e| Error::InvalidArgument {
                op: OP,
                detail: format!("could not start the loader thread: {e}"),
            })?;
        Ok(Self {
            batches: Some(receiver),
            worker: Some(worker),
            remaining,
            waited: Duration::ZERO,
        })
    }

    /// Batches still to come this epoch.
    pub fn len(&self) -> usize {
        self.remaining
    }

    /// Whether the epoch's batches are all taken.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// Seconds the caller has waited for a batch that was not ready yet: near zero when the
    /// loader keeps ahead of training.
    pub fn wait_seconds(&self) -> f64 {
        self.waited.as_secs_f64()
    }
}

/// An epoch's augmentation and where it runs.
struct EpochAugmentation {
    augment: Augmentation,
    seed: u64,
    epoch: u64,
    on_device: bool,
}

/// The loader thread: each batch gathered, augmented (or its windows drawn) and sent, until
/// the epoch ends or the [`Loader`] is dropped.
fn make_batches(
    data: &Dataset,
    batches: Vec<Vec<usize>>,
    augmentation: Option<&EpochAugmentation>,
    sender: &SyncSender<Result<Batch>>,
) {
    for indices in batches {
        let batch = match augmentation {
            Some(a) if a.on_device => data.crop_flip_batch(&indices, (&a.augment, a.seed, a.epoch)),
            Some(a) => data.host_batch(&indices, Some((&a.augment, a.seed, a.epoch))),
            None => data.host_batch(&indices, None),
        };
        let failed = batch.is_err();
        if sender.send(batch).is_err() || failed {
            return;
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.remaining == 0 {
            return None;
        }
        let receiver = self.batches.as_ref()?;
        let start = Instant::now();
        let batch = receiver.recv();
        self.waited += start.elapsed();
        let batch = batch.unwrap_or_else(|_| {
            // The thread ended without sending: it panicked (say with what) or never ran.
            let why = match self.worker.take().map(JoinHandle::join) {
                Some(Err(panic)) => panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into()),
                _ => "no reason given".into(),
            };
            Err(Error::InvalidArgument {
                op: OP,
                detail: format!("the loader thread stopped before the epoch's end: {why}"),
            })
        });
        // After an error the thread has stopped: the epoch ends with it.
        self.remaining = if batch.is_ok() { self.remaining - 1 } else { 0 };
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel first makes a thread blocked on a full one return.
        self.batches = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
