//! Fine-tunes the ImageNet-pretrained EfficientNet-Lite0 (`scripts/fetch_efficientnet_lite0.sh
//! target/weights`) on CIFAR-10 ("CIFAR-10, A. Krizhevsky, V. Nair, G. Hinton, 2009") upscaled
//! to `--size` pixels, against the same network trained from scratch for the same epochs.
//!
//! Fine-tuning loads the pretrained state by name (the 1000-class `_fc` is reported as
//! mismatched and left new, at 10 classes), freezes everything but `_fc` for
//! `--warmup-epochs`, then unfreezes the whole network at a tenth of the rate. The optimizer
//! is made once, before freezing: the head's momentum carries through the unfreezing.
//! Training images get a random resized crop and a flip; test images a plain resize.
//! `benches/finetune_pytorch.py` runs the same in PyTorch.
//!
//! ```text
//! cargo run --release --example finetune -- --data DIR [--weights PATH] [--size 96]
//!     [--train-images 5000] [--test-images 2000] [--warmup-epochs 1] [--epochs 3]
//!     [--batch-size 32] [--lr 0.05] [--seed 1] [--no-scratch] [--device gpu|cpu] [--json]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use wgcnn::data::{Augmentation, Cifar10, Dataset, Loader, LoaderOptions, Pixels, resize};
use wgcnn::graph::GraphOptimizer;
use wgcnn::models::efficientnet_lite0;
use wgcnn::ndarray::ArrayView3;
use wgcnn::train::{Checkpoint, LrSchedule, evaluate_on, train_step};
use wgcnn::{Graph, Normalize, Optimizer, ParamGroup};

mod common;
use common::Where;

/// EfficientNet-Lite0 fine-tuned from ImageNet on CIFAR-10, against from scratch.
#[derive(Parser, Debug)]
struct Args {
    /// CIFAR-10 as scripts/fetch_cifar10.sh leaves it, or its cifar-10-batches-bin/.
    #[arg(long)]
    data: PathBuf,
    /// The pretrained state dict.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/weights/efficientnet-lite0-57934424.pth"))]
    weights: PathBuf,
    /// Side of the upscaled images.
    #[arg(long, default_value_t = 96)]
    size: usize,
    /// Training images (the first N of the training set).
    #[arg(long, default_value_t = 5000)]
    train_images: usize,
    /// Test images (the first N of the test set).
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
    /// Epochs with everything but the head frozen.
    #[arg(long, default_value_t = 1)]
    warmup_epochs: usize,
    /// Epochs in all (the from-scratch run trains as many).
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Rate of the head's warm-up and of the from-scratch run (the unfrozen network takes a
    /// tenth); each phase follows a cosine down to zero.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Seed of the new weights, the order and the augmentation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the from-scratch run.
    #[arg(long)]
    no_scratch: bool,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = Where::Gpu)]
    device: Where,
    /// One JSON line of figures at the end.
    #[arg(long)]
    json: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// One run's test accuracy after each epoch and its seconds (training and testing).
#[derive(Default)]
struct Run {
    accuracy: Vec<f64>,
    seconds: f64,
}

/// What every phase trains and tests on.
struct Data {
    train: Arc<Dataset>,
    test: Dataset,
    loader: LoaderOptions,
    normalize: Normalize,
}

/// Trains the run's `epochs` at `lr` along a cosine down to zero, testing after each epoch
/// and adding to `run`.
#[allow(clippy::too_many_arguments)]
fn phase(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    data: &Data,
    epochs: std::ops::Range<usize>,
    lr: f32,
    label: &str,
    run: &mut Run,
    say: &dyn Fn(String),
) -> wgcnn::Result<()> {
    let schedule = LrSchedule::Cosine {
        t_max: epochs.len().max(1) * data.train.len().div_ceil(data.loader.batch_size),
        eta_min: 0.0,
    };
    let mut done = 0;
    for epoch in epochs {
        let start = Instant::now();
        let lr = |s| schedule.lr(lr, done + s);
        done += train_epoch(model, optimizer, data, epoch, lr)?;
        let seconds = start.elapsed().as_secs_f64();
        let accuracy = evaluate_on(model, &data.test, &data.normalize, 100)?.accuracy;
        run.seconds += start.elapsed().as_secs_f64();
        say(format!(
            "epoch {} ({label}): test accuracy {:.2}%, {seconds:.1} s training",
            epoch + 1,
            100.0 * accuracy
        ));
        run.accuracy.push(accuracy);
    }
    Ok(())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = common::device_at(args.device)?;
    let cifar = Cifar10::load(&args.data)?;
    let train = Arc::new(cifar.train.first(args.train_images)?);
    let test = upscaled(&cifar.test.first(args.test_images)?, args.size)?;
    // EfficientNet-Lite's input scaling, (x − 127) / 128, as a normalisation of x / 255.
    let normalize = Normalize::new(&[127.0 / 255.0; 3], &[128.0 / 255.0; 3])?;
    let augmentation = Augmentation::new()
        .random_resized_crop((args.size, args.size), (0.35, 1.0), (3.0 / 4.0, 4.0 / 3.0))?
        .horizontal_flip(0.5)?;
    let loader = LoaderOptions::new(args.batch_size)
        .seed(args.seed)
        .augmentation(augmentation);
    let json = args.json;
    let say = move |line: String| match json {
        true => eprintln!("{line}"),
        false => println!("{line}"),
    };

    // Fine-tuning: pretrained backbone, new head; the head alone first, then everything.
    let mut model = efficientnet_lite0(10)?.build(device.clone(), args.seed)?;
    let report = model.load_matching(&Checkpoint::load(&args.weights)?)?;
    say(format!(
        "pretrained: {} tensors loaded, {} left new ({})",
        report.loaded.len(),
        report.mismatched.len() + report.missing.len(),
        report
            .mismatched
            .iter()
            .map(|m| m.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let data = Data {
        train,
        test,
        loader,
        normalize,
    };
    let mut optimizer = sgd(&model, args.lr)?;
    let mut tuned = Run::default();
    let warmup = args.warmup_epochs.min(args.epochs);
    model.freeze_all(true);
    model.freeze("_fc", false)?;
    let head = "fine-tuning, head only";
    phase(
        &mut model,
        &mut optimizer,
        &data,
        0..warmup,
        args.lr,
        head,
        &mut tuned,
        &say,
    )?;
    model.freeze_all(false);
    let all = "fine-tuning, all layers";
    let rest = warmup..args.epochs;
    phase(
        &mut model,
        &mut optimizer,
        &data,
        rest,
        args.lr / 10.0,
        all,
        &mut tuned,
        &say,
    )?;
    let head_steps = optimizer
        .state_arrays()?
        .iter()
        .find(|(name, _, _)| name == "_fc.weight")
        .map_or(0, |(_, steps, _)| *steps);

    // From scratch: the same network and epochs, everything training at `lr` throughout.
    let mut scratch = Run::default();
    if !args.no_scratch {
        let mut model = efficientnet_lite0(10)?.build(device.clone(), args.seed)?;
        let mut optimizer = sgd(&model, args.lr)?;
        let epochs = 0..args.epochs;
        let label = "from scratch";
        phase(
            &mut model,
            &mut optimizer,
            &data,
            epochs,
            args.lr,
            label,
            &mut scratch,
            &say,
        )?;
    }
    if args.json {
        let list = |run: &Run| {
            run.accuracy
                .iter()
                .map(|a| format!("{a:.4}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "{{\"finetuned_test_accuracy\":[{}],\"scratch_test_accuracy\":[{}],\
             \"finetune_seconds\":{:.1},\"scratch_seconds\":{:.1},\"head_optimizer_steps\":{head_steps},\
             \"size\":{},\"train_images\":{},\"test_images\":{},\"epochs\":{},\
             \"warmup_epochs\":{},\"device\":{:?}}}",
            list(&tuned),
            list(&scratch),
            tuned.seconds,
            scratch.seconds,
            args.size,
            data.train.len(),
            data.test.len(),
            args.epochs,
            args.warmup_epochs,
            device.name()
        );
    }
    Ok(())
}

/// SGD with Nesterov momentum 0.9 and weight decay 5e-4 on the weights only.
fn sgd(model: &Graph, lr: f32) -> wgcnn::Result<GraphOptimizer> {
    let rule = Optimizer::sgd(lr)
        .momentum(0.9)
        .nesterov(true)
        .weight_decay(5e-4);
    let mut optimizer = model.optimizer(rule)?;
    optimizer.add_param_group(ParamGroup::vectors().weight_decay(0.0))?;
    Ok(optimizer)
}

/// One epoch from the loader, the rate of its `s`-th step from `lr(s)`; returns its steps.
fn train_epoch(
    model: &mut Graph,
    optimizer: &mut GraphOptimizer,
    data: &Data,
    epoch: usize,
    lr: impl Fn(usize) -> wgcnn::Result<f32>,
) -> wgcnn::Result<usize> {
    let mut step = 0;
    let mut last = None;
    for batch in Loader::epoch(data.train.clone(), &data.loader, epoch as u64)? {
        let batch = batch?;
        optimizer.set_lr(lr(step)?)?;
        let upload = |d: &wgcnn::Device| batch.upload(d, &data.normalize);
        last = Some(train_step(model, optimizer, upload, &batch.labels)?);
        step += 1;
    }
    // Waits for the epoch's last step.
    if let Some(out) = last {
        out.loss.scalar()?;
    }
    Ok(step)
}

/// The images of `data` resized to `size × size` (antialiased bilinear, as torchvision).
fn upscaled(data: &Dataset, size: usize) -> wgcnn::Result<Dataset> {
    let [n, c, h, w] = data.shape();
    let batch = data.host_batch(&(0..n).collect::<Vec<_>>(), None)?;
    let Pixels::U8(pixels) = &batch.pixels else {
        return Err(wgcnn::Error::InvalidArgument {
            op: "upscaled",
            detail: "CIFAR-10's images are bytes".into(),
        });
    };
    let mut out = Vec::with_capacity(n * c * size * size);
    for image in pixels.chunks(c * h * w) {
        let view = ArrayView3::from_shape((c, h, w), image).map_err(|e| {
            wgcnn::Error::InvalidArgument {
                op: "upscaled",
                detail: e.to_string(),
            }
        })?;
        out.extend(resize(view, (size, size))?);
    }
    Dataset::new(
        [n, c, size, size],
        Pixels::U8(out),
        batch.labels,
        Some(data.classes().to_vec()),
    )
}
