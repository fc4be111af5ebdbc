//! Trains LeNet-5 on MNIST (shipped in data/mnist) on the GPU, or on the CPU reference path.
//!
//! ```text
//! cargo run --release --example mnist -- [--epochs 1] [--batch-size 64]
//!     [--optimizer sgd|momentum|adagrad|adam] [--lr F] [--dropout F] [--batch-norm]
//!     [--device gpu|cpu] [--train-limit N] [--data DIR] [--save PATH] [--plot PATH]
//!     [--seed N] [--constant-lr] [--init he|xavier|pytorch] [--json]
//! ```
//! The learning rate follows a cosine from its initial value down to zero over the whole run
//! (`--constant-lr` keeps it fixed).
//! Prints test accuracy after each epoch, draws the loss and accuracy curves into a PNG, and
//! with `--json` ends with one line of figures.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use common::CommonArgs;
use plotters::prelude::*;
use wgcnn::data::shuffled_indices;
use wgcnn::nn::{Init, LeNetOptions, lenet5};
use wgcnn::train::{StepOutput, evaluate, image_batch, label_batch, train_step};
use wgcnn::{Device, Normalize, Optimizer};

mod common;

/// Trains LeNet-5 on MNIST on the GPU (or the CPU reference path), prints the test accuracy
/// after each epoch and draws the curves into a PNG.
#[derive(Parser, Debug)]
struct Args {
    /// Passes over the training set.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    epochs: usize,
    /// Images per step (1: online learning; 60000: full batch).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    batch_size: usize,
    /// The update rule.
    #[arg(long, value_enum, default_value_t = Rule::Adam)]
    optimizer: Rule,
    /// Initial learning rate (default per rule: sgd 0.1, momentum 0.02, adagrad 0.02, adam 0.006).
    #[arg(long)]
    lr: Option<f32>,
    /// Dropout rate after fc1 and fc2 (0: none).
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Batch norm after each convolution.
    #[arg(long)]
    batch_norm: bool,
    /// Train on only the first N training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Save the trained model here (safetensors; `predict --checkpoint` reads it).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Where to draw the loss and accuracy curves.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/mnist.png"))]
    plot: PathBuf,
    /// Seed of the initial weights and of the shuffling.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the learning rate fixed instead of the cosine decay to zero.
    #[arg(long)]
    constant_lr: bool,
    /// Weight initialisation.
    #[arg(long, value_enum, default_value_t = InitArg::Pytorch)]
    init: InitArg,
    /// One JSON line of figures at the end (the progress bar and table go away).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: CommonArgs,
}

/// A count of at least 1.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{text:?} is not a whole number of at least 1")),
    }
}

/// `--optimizer` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// Plain SGD.
    Sgd,
    /// SGD with momentum 0.9.
    Momentum,
    /// AdaGrad.
    Adagrad,
    /// Adam.
    Adam,
}

/// `--init` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum InitArg {
    /// He (Kaiming) normal.
    He,
    /// Xavier (Glorot) uniform.
    Xavier,
    /// PyTorch's default uniform.
    Pytorch,
}

impl From<InitArg> for Init {
    fn from(init: InitArg) -> Self {
        match init {
            InitArg::He => Init::He,
            InitArg::Xavier => Init::Xavier,
            InitArg::Pytorch => Init::PyTorch,
        }
    }
}

fn optimizer(rule: Rule, lr: Option<f32>) -> Optimizer {
    match rule {
        Rule::Sgd => Optimizer::sgd(lr.unwrap_or(0.1)).into(),
        Rule::Momentum => Optimizer::momentum(lr.unwrap_or(0.02), 0.9).into(),
        Rule::Adagrad => Optimizer::adagrad(lr.unwrap_or(0.02)).into(),
        Rule::Adam => Optimizer::adam(lr.unwrap_or(0.006)).into(),
    }
}

/// Per-epoch and per-log-interval figures, for the printout and the plot.
#[derive(Default)]
struct History {
    /// (epoch as a fraction, mean training loss over the interval)
    loss: Vec<(f64, f64)>,
    /// (epoch as a fraction, training accuracy over the interval)
    train_accuracy: Vec<(f64, f64)>,
    /// (epoch, test accuracy)
    test_accuracy: Vec<(f64, f64)>,
}

fn main() {
    let process_start = Instant::now();
    if let Err(e) = run(process_start) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(process_start: Instant) -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let rule = optimizer(args.optimizer, args.lr);
    let device = common::device(&args.common)?;
    let mut mnist = common::mnist(&args.common)?;
    if let Some(limit) = args.train_limit {
        mnist.train_images = mnist.train_images.first(limit);
        mnist.train_labels.truncate(mnist.train_images.count);
    }
    let options = LeNetOptions {
        batch_norm: args.batch_norm,
        dropout: args.dropout,
        init: args.init.into(),
    };
    let mut model = lenet5(options)?.build(device.clone(), args.seed)?;
    let mut opt = model.optimizer(rule)?;
    let normalize = Normalize::mnist();
    let n = mnist.train_images.count;
    let steps_per_epoch = n.div_ceil(args.batch_size);
    if !args.json {
        println!(
            "LeNet-5 ({} parameters) on {} ({n} training images, batch {}, {:?})",
            model.parameter_count(),
            device.name(),
            args.batch_size,
            rule
        );
    }

    // Process start to the end of the first step (shader compilation included), and the
    // pipelines that step compiled.
    let mut first_step: Option<(f64, usize)> = None;
    let mut history = History::default();
    let mut epoch_seconds = Vec::new();
    let log_every = 20;
    for epoch in 0..args.epochs {
        let bar = common::epoch_bar(steps_per_epoch, epoch, args.epochs, args.json)?;
        let order = shuffled_indices(n, args.seed, epoch as u64);
        let start = Instant::now();
        let mut pending: Vec<(StepOutput, usize)> = Vec::new();
        let mut images_since = 0usize;
        let mut since = Instant::now();
        for (step, batch) in order.chunks(args.batch_size).enumerate() {
            if !args.constant_lr {
                let progress = (epoch * steps_per_epoch + step) as f64
                    / (args.epochs * steps_per_epoch) as f64;
                let scale = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                opt.set_lr(rule.lr() * scale as f32)?;
            }
            let labels = label_batch(&mnist.train_labels, batch)?;
            let out = train_step(
                &mut model,
                &mut opt,
                |d: &Device| image_batch(d, &mnist.train_images, batch, &normalize),
                &labels,
            )?;
            if first_step.is_none() {
                out.loss.to_array()?; // waits for the step to finish
                let pipelines = match &device {
                    Device::Gpu(gpu) => gpu.pipelines_compiled(),
                    Device::Cpu => 0,
                };
                first_step = Some((process_start.elapsed().as_secs_f64(), pipelines));
            }
            pending.push((out, batch.len()));
            images_since += batch.len();
            if (step + 1) % log_every == 0 || step + 1 == steps_per_epoch {
                // The only readbacks of the epoch: a few scalars per interval.
                let (mut loss, mut correct, mut count) = (0.0, 0.0, 0usize);
                for (out, size) in pending.drain(..) {
                    loss += f64::from(out.loss.to_array()?[[0]]) * size as f64;
                    correct += f64::from(out.correct.to_array()?[[0]]);
                    count += size;
                }
                let at = epoch as f64 + (step + 1) as f64 / steps_per_epoch as f64;
                history.loss.push((at, loss / count as f64));
                history.train_accuracy.push((at, correct / count as f64));
                let rate = images_since as f64 / since.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "loss {:.4} acc {:.3} {rate:.0} img/s",
                    loss / count as f64,
                    correct / count as f64
                ));
                (images_since, since) = (0, Instant::now());
            }
            bar.set_position(step as u64 + 1);
        }
        let seconds = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        epoch_seconds.push(seconds);
        let test = evaluate(
            &mut model,
            &mnist.test_images,
            &mnist.test_labels,
            &normalize,
            1000,
        )?;
        history
            .test_accuracy
            .push(((epoch + 1) as f64, test.accuracy));
        let line = format!(
            "epoch {}: test accuracy {:.2}% (loss {:.4}), {seconds:.1} s, {:.0} images/s",
            epoch + 1,
            100.0 * test.accuracy,
            test.loss,
            n as f64 / seconds
        );
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    if let Some(path) = &args.save {
        model.save(path)?;
        if !args.json {
            println!("saved {}", path.display());
        }
    }
    plot(&args.plot, &history)?;
    if !args.json {
        println!("curves: {}", args.plot.display());
    }
    if args.json {
        let epoch_mean = epoch_seconds.iter().sum::<f64>() / epoch_seconds.len() as f64;
        let accuracy = history.test_accuracy.last().map_or(0.0, |a| a.1);
        let (first_step_seconds, pipelines) = first_step.unwrap_or((f64::NAN, 0));
        println!(
            "{{\"epochs\":{},\"test_accuracy\":{accuracy:.4},\"train_images_per_sec\":{:.1},\"epoch_seconds\":{epoch_mean:.2},\"first_step_seconds\":{first_step_seconds:.3},\"pipelines\":{pipelines},\"device\":{:?},\"batch_size\":{},\"optimizer\":{:?}}}",
            args.epochs,
            n as f64 / epoch_mean,
            device.name(),
            args.batch_size,
            format!("{:?}", args.optimizer).to_lowercase()
        );
    }
    Ok(())
}

/// Two panels: training loss (left, log scale) and accuracy (right: training per interval
/// in blue, test per epoch in red).
fn plot(path: &std::path::Path, history: &History) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = BitMapBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let end = history.loss.last().map_or(1.0, |p| p.0).max(1.0);
    let top = history.loss.iter().map(|p| p.1).fold(0.1, f64::max);
    let mut loss = ChartBuilder::on(&left)
        .margin(20)
        .build_cartesian_2d(0.0..end, (0.005..top).log_scale())?;
    loss.configure_mesh().disable_x_mesh().draw()?;
    loss.draw_series(LineSeries::new(history.loss.iter().copied(), &BLACK))?;
    let low = history
        .train_accuracy
        .iter()
        .chain(&history.test_accuracy)
        .map(|p| p.1)
        .fold(0.9, f64::min);
    let mut accuracy = ChartBuilder::on(&right)
        .margin(20)
        .build_cartesian_2d(0.0..end, low..1.0)?;
    accuracy.configure_mesh().disable_x_mesh().draw()?;
    accuracy.draw_series(LineSeries::new(
        history.train_accuracy.iter().copied(),
        &BLUE,
    ))?;
    accuracy.draw_series(LineSeries::new(history.test_accuracy.iter().copied(), &RED))?;
    accuracy.draw_series(
        history
            .test_accuracy
            .iter()
            .map(|&p| Circle::new(p, 4, RED.filled())),
    )?;
    root.present()?;
    Ok(())
}
