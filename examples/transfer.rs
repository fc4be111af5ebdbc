//! Transfer learning: LeNet-5 pre-trained on the digits 0–4 lends its convolutional features
//! to a 5–9 classifier trained from only a few labelled images per class.
//!
//! 1. Pre-train on digits 0–4, save a safetensors checkpoint.
//! 2. Build a fresh LeNet-5 with a new five-way head for 5–9, load the checkpoint by name
//!    (the old head is reported as mismatched and left out), freeze the convolutions, and
//!    fine-tune the fully connected classifier on `--per-class` images of each digit.
//! 3. Train the same network from scratch on the same images, for the same epochs.
//!
//! `cargo run --release --example transfer -- [--pretrain-images 15000] [--per-class 20]
//!     [--epochs 15] [--freeze conv1,conv2] [--lr 0.006] [--device gpu|cpu] [--data DIR] [--json]`

mod common;

use clap::Parser;
use common::{CommonArgs, accuracy, fit, subset};
use wgcnn::nn::{Init, LeNetOptions, Linear, lenet5};
use wgcnn::{Graph, Optimizer};

/// Transfer learning from digits 0–4 to 5–9 with few labels, against training from scratch.
#[derive(Parser, Debug)]
struct Args {
    /// Images of digits 0–4 for pre-training.
    #[arg(long, default_value_t = 15_000)]
    pretrain_images: usize,
    /// Labelled images of each digit 5–9 for fine-tuning.
    #[arg(long, default_value_t = 20)]
    per_class: usize,
    /// Fine-tuning epochs (and from-scratch epochs).
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    /// Layers frozen while fine-tuning, comma-separated (empty for none).
    #[arg(long, default_value = "conv1,conv2")]
    freeze: String,
    /// Learning rate of the fine-tuning and from-scratch runs.
    #[arg(long, default_value_t = 6e-3)]
    lr: f32,
    /// One JSON line of results instead of the report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

const OPTIONS: LeNetOptions = LeNetOptions {
    batch_norm: false,
    dropout: 0.0,
    init: Init::PyTorch,
};

fn five_way(device: &wgcnn::Device, seed: u64) -> wgcnn::Result<Graph> {
    let mut model = lenet5(OPTIONS)?.build(device.clone(), seed)?;
    model.replace("fc3", Linear::new(84, 5))?;
    Ok(model)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let json = args.json;
    let pretrain_images = args.pretrain_images;
    let per_class = args.per_class;
    let epochs = args.epochs;
    let frozen = args.freeze.clone();
    let device = common::device(&args.common)?;
    let data = common::mnist(&args.common)?;
    let say = |line: String| {
        if !json {
            println!("{line}")
        }
    };

    // 1. Source task: digits 0–4.
    let (source, source_labels) = subset(
        &data.train_images,
        &data.train_labels,
        |d| d < 5,
        pretrain_images / 5,
        |d| d,
    );
    // The usual ten-way LeNet-5 (only 0–4 occur): its head will not fit the new task.
    let mut pretrained = lenet5(OPTIONS)?.build(device.clone(), 1)?;
    let mut opt = pretrained.optimizer(Optimizer::adam(6e-3))?;
    let seconds = fit(
        &mut pretrained,
        &mut opt,
        &source,
        &source_labels,
        6e-3,
        1,
        64,
        1,
    )?;
    let (source_test, source_test_labels) = subset(
        &data.test_images,
        &data.test_labels,
        |d| d < 5,
        usize::MAX,
        |d| d,
    );
    let source_accuracy = accuracy(&mut pretrained, &source_test, &source_test_labels)?;
    say(format!(
        "pre-trained on {} images of 0–4 in {seconds:.1} s: {:.2}% on the 0–4 test digits",
        source.count,
        100.0 * source_accuracy
    ));
    let checkpoint = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/transfer_0to4.safetensors"
    );
    pretrained.save(checkpoint)?;

    // 2. Target task: digits 5–9, a few images each.
    let (target, target_labels) = subset(
        &data.train_images,
        &data.train_labels,
        |d| d >= 5,
        per_class,
        |d| d - 5,
    );
    let (test, test_labels) = subset(
        &data.test_images,
        &data.test_labels,
        |d| d >= 5,
        usize::MAX,
        |d| d - 5,
    );
    let mut transfer = five_way(&device, 2)?;
    let report = transfer.load_matching(&wgcnn::train::Checkpoint::load(checkpoint)?)?;
    say(format!("loading {checkpoint}:\n{report}"));
    // The new head keeps its fresh weights; the convolutional features stay as they are.
    for frozen in frozen.split(',').filter(|n| !n.is_empty()) {
        transfer.freeze(frozen, true)?;
    }
    let lr = args.lr;
    let train_and_test = |model: &mut Graph| -> wgcnn::Result<(f64, f64)> {
        let mut opt = model.optimizer(Optimizer::adam(lr))?;
        let seconds = fit(model, &mut opt, &target, &target_labels, lr, epochs, 32, 3)?;
        Ok((seconds, accuracy(model, &test, &test_labels)?))
    };
    let (transfer_seconds, transfer_accuracy) = train_and_test(&mut transfer)?;
    // 3. The same network from scratch on the same images.
    let (scratch_seconds, scratch_accuracy) = train_and_test(&mut five_way(&device, 2)?)?;

    say(format!(
        "digits 5–9 from {} labelled images, {epochs} epochs, tested on {} images:",
        target.count, test.count
    ));
    say(format!(
        "  transfer (convolutions frozen): {:.2}%  in {transfer_seconds:.1} s",
        100.0 * transfer_accuracy
    ));
    say(format!(
        "  from scratch:                   {:.2}%  in {scratch_seconds:.1} s",
        100.0 * scratch_accuracy
    ));
    say(format!(
        "  frozen layers saved {:.0}% of the training time",
        100.0 * (1.0 - transfer_seconds / scratch_seconds)
    ));
    if json {
        println!(
            "{{\"transfer_accuracy\":{transfer_accuracy:.4},\"scratch_accuracy\":{scratch_accuracy:.4},\"source_accuracy\":{source_accuracy:.4},\"train_images\":{},\"test_images\":{},\"epochs\":{epochs},\"transfer_seconds\":{transfer_seconds:.2},\"scratch_seconds\":{scratch_seconds:.2},\"pretrain_seconds\":{seconds:.2},\"loaded\":{},\"mismatched\":{},\"device\":{:?}}}",
            target.count,
            test.count,
            report.loaded.len(),
            report.mismatched.len(),
            device.name()
        );
    }
    Ok(())
}
