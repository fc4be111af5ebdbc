//! Trains ResNet-20 from scratch on CIFAR-10 ("CIFAR-10, A. Krizhevsky, V. Nair, G. Hinton,
//! 2009"; fetch it with `scripts/fetch_cifar10.sh DIR`) with the usual recipe: SGD with
//! Nesterov momentum 0.9, weight decay 5e-4 on the weights only (not on batch norm or
//! biases), a one-cycle (or cosine) schedule stepped per batch, batch 128, random crops of
//! the 4-pixel-padded image and horizontal flips, made by a loader thread while the GPU
//! trains. `benches/cifar10_pytorch.py` runs the same recipe in PyTorch.
//!
//! ```text
//! cargo run --release --example cifar10 -- --data DIR [--epochs 1] [--batch-size 128]
//!     [--lr 0.1] [--schedule one-cycle|cosine] [--weight-decay 5e-4]
//!     [--label-smoothing 0] [--clip-grad-norm F] [--train-limit N] [--seed 1]
//!     [--save PATH] [--resume PATH] [--stop-after EPOCH] [--device gpu|cpu]
//!     [--augment-on device|host] [--json]
//! ```
//! Prints the test accuracy after each epoch; with `--json`, one JSON line at the end (the
//! progress bar goes quiet). `--save` writes a training checkpoint (model, optimizer state,
//! step counts) after every epoch; `--resume` continues from one, at the epoch it ended.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use wgcnn::data::{Augmentation, Cifar10, Loader, LoaderOptions};
use wgcnn::models::resnet20;
use wgcnn::train::{LrSchedule, StepOutput, evaluate_on, train_step_with};
use wgcnn::{Device, Normalize, Optimizer, ParamGroup};

mod common;
use common::Where;

/// ResNet-20 from scratch on CIFAR-10.
#[derive(Parser, Debug)]
struct Args {
    /// CIFAR-10 as scripts/fetch_cifar10.sh leaves it, or its cifar-10-batches-bin/.
    #[arg(long)]
    data: PathBuf,
    /// Passes over the training set (the schedule spans them all).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate (one-cycle's maximum, cosine's start).
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// The learning-rate schedule, stepped after every batch.
    #[arg(long, value_enum, default_value_t = ScheduleArg::OneCycle)]
    schedule: ScheduleArg,
    /// Weight decay of the convolution and linear weights (none on norms and biases).
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f32,
    /// Cross-entropy's label smoothing.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Clip the gradients to this global norm before each update.
    #[arg(long)]
    clip_grad_norm: Option<f32>,
    /// Train on only the first N training images (quick runs).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Seed of the initial weights, the order and the augmentation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write a training checkpoint here after every epoch.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Continue from a training checkpoint written by --save (same flags otherwise).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop after this epoch (a long run in parts: --save, then --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Where to train: the GPU (WGPU_BACKEND / WGPU_ADAPTER_NAME pick it) or the CPU
    /// reference path.
    #[arg(long, value_enum, default_value_t = Where::Gpu)]
    device: Where,
    /// Where the crops and flips are made: cut by the device's normalisation kernel (the
    /// loader thread only gathers images and draws windows), or by the loader thread.
    /// The same images either way.
    #[arg(long, value_enum, default_value_t = AugmentOn::Device)]
    augment_on: AugmentOn,
    /// One JSON line of figures at the end (the progress bar goes quiet).
    #[arg(long)]
    json: bool,
}

/// `--schedule` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ScheduleArg {
    /// OneCycleLR with PyTorch's defaults (warm-up over 30 %, cosine down to lr/25e4, the
    /// momentum cycled between 0.95 and 0.85).
    OneCycle,
    /// CosineAnnealingLR from lr to 0.
    Cosine,
}

/// `--augment-on` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum AugmentOn {
    /// The device, fused with the normalisation (`LoaderOptions::augment_on_device`).
    Device,
    /// The loader thread, on the host.
    Host,
}

/// One epoch's figures.
struct EpochFigures {
    train_loss: f64,
    train_accuracy: f64,
    test_accuracy: f64,
    test_top5: f64,
    seconds: f64,
    loader_wait: f64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = common::device_at(args.device)?;
    let load_start = Instant::now();
    let Cifar10 { mut train, test } = Cifar10::load(&args.data)?;
    if let Some(limit) = args.train_limit {
        train = train.first(limit)?;
    }
    let load_seconds = load_start.elapsed().as_secs_f64();
    let train = Arc::new(train);
    let normalize = Normalize::new(&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616])?;

    let mut model = resnet20(10)?.build(device.clone(), args.seed)?;
    let rule = Optimizer::sgd(args.lr)
        .momentum(0.9)
        .nesterov(true)
        .weight_decay(args.weight_decay);
    let mut optimizer = model.optimizer(rule)?;
    optimizer.add_param_group(ParamGroup::vectors().weight_decay(0.0))?;
    optimizer.set_max_grad_norm(args.clip_grad_norm)?;
    let steps_per_epoch = train.len().div_ceil(args.batch_size);
    let total_steps = steps_per_epoch * args.epochs;
    let schedule = match args.schedule {
        ScheduleArg::OneCycle => LrSchedule::one_cycle(args.lr, total_steps),
        ScheduleArg::Cosine => LrSchedule::Cosine {
            t_max: total_steps,
            eta_min: 0.0,
        },
    };
    let mut first_epoch = 0;
    if let Some(path) = &args.resume {
        model.load_training(&mut optimizer, path)?;
        let done = optimizer.steps() as usize;
        if !done.is_multiple_of(steps_per_epoch) {
            return Err(format!(
                "{} ended after step {done}, inside an epoch of {steps_per_epoch} steps: resume \
                 with the batch size and training set it was written with",
                path.display()
            )
            .into());
        }
        first_epoch = done / steps_per_epoch;
    }
    let augmentation = Augmentation::new()
        .random_crop((32, 32), 4)?
        .horizontal_flip(0.5)?;
    let loader_options = LoaderOptions::new(args.batch_size)
        .seed(args.seed)
        .augmentation(augmentation)
        .augment_on_device(args.augment_on == AugmentOn::Device);
    let loader_rate = loader_alone(&train, &loader_options)?;
    if !args.json {
        println!(
            "ResNet-20 ({} parameters) on {}: {} training images (loaded in {load_seconds:.2} s), \
             batch {}, {} epochs, loader alone {loader_rate:.0} images/s",
            model.parameter_count(),
            device.name(),
            train.len(),
            args.batch_size,
            args.epochs
        );
    }

    let mut figures = Vec::new();
    let last_epoch = args.stop_after.unwrap_or(args.epochs).min(args.epochs);
    for epoch in first_epoch..last_epoch {
        let bar = common::epoch_bar(steps_per_epoch, epoch, args.epochs, args.json)?;
        let start = Instant::now();
        let mut loader = Loader::epoch(train.clone(), &loader_options, epoch as u64)?;
        let mut pending: Vec<(StepOutput, usize)> = Vec::new();
        let (mut loss_sum, mut correct_sum) = (0.0, 0.0);
        let mut since = (Instant::now(), 0usize);
        for step in 0..steps_per_epoch {
            let Some(batch) = loader.next() else { break };
            let batch = batch?;
            let global = epoch * steps_per_epoch + step;
            optimizer.set_lr(schedule.lr(args.lr, global)?)?;
            if let Some(momentum) = schedule.momentum(global)? {
                optimizer.set_momentum(momentum)?;
            }
            let out = train_step_with(
                &mut model,
                &mut optimizer,
                |d| batch.upload(d, &normalize),
                |logits, _| {
                    logits.softmax_cross_entropy_smoothed(&batch.labels, args.label_smoothing)
                },
            )?;
            pending.push((out, batch.len()));
            since.1 += batch.len();
            // Reading the losses back waits for the GPU: every 20 steps, not every step.
            if (step + 1) % 20 == 0 || step + 1 == steps_per_epoch {
                let (mut loss, mut correct, mut count) = (0.0, 0.0, 0);
                for (out, size) in pending.drain(..) {
                    loss += f64::from(out.loss.scalar()?) * size as f64;
                    correct += f64::from(out.correct.scalar()?);
                    count += size;
                }
                (loss_sum, correct_sum) = (loss_sum + loss, correct_sum + correct);
                let rate = since.1 as f64 / since.0.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "loss {:.3} acc {:.3} {rate:.0} img/s",
                    loss / count as f64,
                    correct / count as f64
                ));
                since = (Instant::now(), 0);
            }
            bar.set_position(step as u64 + 1);
        }
        let seconds = start.elapsed().as_secs_f64();
        let loader_wait = loader.wait_seconds();
        bar.finish_and_clear();
        let evaluation = evaluate_on(&mut model, &test, &normalize, 500)?;
        if let Some(path) = &args.save {
            model.save_training(&optimizer, path)?;
        }
        let n = train.len() as f64;
        let epoch_figures = EpochFigures {
            train_loss: loss_sum / n,
            train_accuracy: correct_sum / n,
            test_accuracy: evaluation.accuracy,
            test_top5: evaluation.top5_accuracy,
            seconds,
            loader_wait,
        };
        let line = format!(
            "epoch {}: train loss {:.4} accuracy {:.2}%, test accuracy {:.2}% (top-5 {:.2}%), \
             {seconds:.1} s ({:.0} images/s, waited {loader_wait:.2} s for the loader)",
            epoch + 1,
            epoch_figures.train_loss,
            100.0 * epoch_figures.train_accuracy,
            100.0 * evaluation.accuracy,
            100.0 * evaluation.top5_accuracy,
            n / seconds
        );
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
        figures.push(epoch_figures);
    }
    if args.json {
        println!(
            "{}",
            json_line(&args, &device, &figures, train.len(), loader_rate)
        );
    }
    Ok(())
}

/// Images per second the loader makes alone (gathering, cropping, flipping) over up to 20
/// batches of an epoch no one trains on.
fn loader_alone(train: &Arc<wgcnn::data::Dataset>, options: &LoaderOptions) -> wgcnn::Result<f64> {
    let start = Instant::now();
    let mut images = 0;
    for batch in Loader::epoch(train.clone(), options, u64::MAX)?.take(20) {
        images += batch?.len();
    }
    Ok(images as f64 / start.elapsed().as_secs_f64())
}

/// The run's figures as one JSON object: the last epoch's, means over the epochs run, and
/// the curve.
fn json_line(
    args: &Args,
    device: &Device,
    figures: &[EpochFigures],
    train_images: usize,
    loader_rate: f64,
) -> String {
    let runs = figures.len().max(1) as f64;
    let mean = |f: fn(&EpochFigures) -> f64| figures.iter().map(f).sum::<f64>() / runs;
    let last = |f: fn(&EpochFigures) -> f64| figures.last().map_or(f64::NAN, f);
    let epoch_seconds = mean(|e| e.seconds);
    let curve: Vec<String> = figures
        .iter()
        .map(|e| format!("{:.4}", e.test_accuracy))
        .collect();
    format!(
        "{{\"epochs\":{},\"test_accuracy\":{:.4},\"test_top5_accuracy\":{:.4},\
         \"train_loss\":{:.4},\"train_accuracy\":{:.4},\"train_images_per_sec\":{:.1},\
         \"epoch_seconds\":{epoch_seconds:.2},\"loader_wait_seconds\":{:.3},\
         \"loader_images_per_sec\":{loader_rate:.0},\"test_accuracy_per_epoch\":[{}],\
         \"device\":{:?},\"augment_on\":\"{:?}\",\"batch_size\":{},\"lr\":{},\
         \"schedule\":\"{:?}\"}}",
        args.epochs,
        last(|e| e.test_accuracy),
        last(|e| e.test_top5),
        last(|e| e.train_loss),
        last(|e| e.train_accuracy),
        train_images as f64 / epoch_seconds,
        mean(|e| e.loader_wait),
        curve.join(","),
        device.name(),
        args.augment_on,
        args.batch_size,
        args.lr,
        args.schedule
    )
}
