//! Helpers shared by the technique examples: common flags, data subsets, training and accuracy.

#![allow(dead_code)]

use wgcnn::data::{Images, Mnist, shuffled_indices};
use wgcnn::graph::GraphOptimizer;
use wgcnn::train::{evaluate, image_batch, label_batch, train_step};
use wgcnn::{Device, Gpu, Graph, Normalize, Result};

/// The flags every technique example takes (flattened into each example's own).
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Where to run: the GPU, or the CPU reference path.
    #[arg(long, value_enum, default_value_t = Where::Gpu)]
    pub device: Where,
    /// MNIST's directory (the four IDX files, gzipped or raw).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"))]
    pub data: String,
}

/// `--device` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    /// The GPU adapter that WGPU_BACKEND / WGPU_ADAPTER_NAME pick.
    Gpu,
    /// The CPU reference path.
    Cpu,
}

/// The device `--device` names.
pub fn device(args: &CommonArgs) -> Result<Device> {
    device_at(args.device)
}

/// The device of a `--device` value.
pub fn device_at(place: Where) -> Result<Device> {
    Ok(match place {
        Where::Cpu => Device::Cpu,
        Where::Gpu => Device::Gpu(Gpu::new()?),
    })
}

/// The progress bar of epoch `epoch` (from 0) of `epochs`, `steps` long: position, the
/// caller's message (loss, accuracy, images/s), elapsed time and ETA; hidden when `quiet`
/// (`--json`).
pub fn epoch_bar(
    steps: usize,
    epoch: usize,
    epochs: usize,
    quiet: bool,
) -> std::result::Result<indicatif::ProgressBar, indicatif::style::TemplateError> {
    let bar = indicatif::ProgressBar::new(steps as u64);
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(indicatif::ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} {msg} {elapsed_precise} eta {eta}",
    )?);
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    Ok(bar)
}

/// MNIST from `--data`.
pub fn mnist(args: &CommonArgs) -> Result<Mnist> {
    Mnist::load(&args.data)
}

/// The images whose label passes `keep`, at most `per_class` of each label, with labels
/// mapped through `relabel`.
pub fn subset(
    images: &Images,
    labels: &[u8],
    keep: impl Fn(u8) -> bool,
    per_class: usize,
    relabel: impl Fn(u8) -> u8,
) -> (Images, Vec<u8>) {
    let mut counts = [0usize; 256];
    let mut chosen = Vec::new();
    for (i, &label) in labels.iter().enumerate() {
        if keep(label) && counts[usize::from(label)] < per_class {
            counts[usize::from(label)] += 1;
            chosen.push(i);
        }
    }
    let new_labels = chosen.iter().map(|&i| relabel(labels[i])).collect();
    (images.select(&chosen), new_labels)
}

/// The cosine schedule: `lr` at the start, 0 at the end of `total` steps.
pub fn cosine(lr: f32, step: usize, total: usize) -> f32 {
    let progress = step as f64 / total.max(1) as f64;
    (f64::from(lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
}

/// Trains `epochs` epochs of mini-batches, the learning rate following a cosine from `lr` to
/// 0 step by step; returns the seconds spent training.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    images: &Images,
    labels: &[u8],
    lr: f32,
    epochs: usize,
    batch_size: usize,
    seed: u64,
) -> Result<f64> {
    let normalize = Normalize::mnist();
    let total = epochs * images.count.div_ceil(batch_size);
    let start = std::time::Instant::now();
    let mut step = 0;
    for epoch in 0..epochs {
        for batch in shuffled_indices(images.count, seed, epoch as u64).chunks(batch_size) {
            optimizer.set_lr(cosine(lr, step, total))?;
            train_step(
                model,
                optimizer,
                |d| image_batch(d, images, batch, &normalize),
                &label_batch(labels, batch)?,
            )?;
            step += 1;
        }
    }
    // The steps were only submitted: wait for them before taking the time.
    if let Device::Gpu(gpu) = model.device() {
        gpu.synchronize()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Test accuracy in `[0, 1]`.
pub fn accuracy(model: &mut Graph, images: &Images, labels: &[u8]) -> Result<f64> {
    Ok(evaluate(model, images, labels, &Normalize::mnist(), 500)?.accuracy)
}
