//! Adversarial examples and adversarial training.
//!
//! Part 1: LeNet-5 trained normally and LeNet-5 trained on clean + FGSM images, both
//! attacked on the test set with FGSM (ε = 0.1, 0.2 in pixel units) and PGD (ε = 0.1, 10
//! steps of ε/4). Part 2: two models trained against each other in one loop, a small
//! generator and discriminator on MNIST; writes a PNG of generated digits.
//!
//! `cargo run --release --example adversarial -- [--train-images 10000] [--test-images 1000]
//!     [--train-epsilon 0.15] [--gan-steps 400] [--gan-only] [--device gpu|cpu] [--data DIR]
//!     [--json]`

mod common;

use clap::Parser;
use common::{CommonArgs, fit, subset};
use wgcnn::data::{Images, shuffled_indices};
use wgcnn::nn::{Flatten, Init, LeNetOptions, Linear, Sequential, lenet5};
use wgcnn::train::{
    Attack, adversarial_train_step, attack, cross_entropy, discriminator_step, generator_step,
    image_batch, label_batch,
};
use wgcnn::{Activation, Device, Graph, Mode, Normalize, Optimizer, Value};

/// MNIST normalisation: pixel p becomes (p - 0.1307) / 0.3081, so ε in pixels is ε / 0.3081
/// here and the valid range is the image of [0, 1].
const STD: f32 = 0.3081;
const RANGE: (f32, f32) = (-0.1307 / STD, (1.0 - 0.1307) / STD);

/// Accuracy on `images` as they are and under each attack.
fn robustness(
    model: &mut Graph,
    images: &Images,
    labels: &[u8],
    attacks: &[Attack],
) -> wgcnn::Result<Vec<f64>> {
    let device = model.device().clone();
    let normalize = Normalize::mnist();
    let mut correct = vec![0.0; attacks.len() + 1];
    let order: Vec<usize> = (0..images.count).collect();
    for batch in order.chunks(250) {
        let x = image_batch(&device, images, batch, &normalize)?;
        let targets = label_batch(labels, batch)?;
        for (slot, kind) in std::iter::once(None)
            .chain(attacks.iter().map(Some))
            .enumerate()
        {
            let input = match kind {
                None => x.duplicate()?,
                Some(&kind) => attack(model, &x, &targets, kind, RANGE)?,
            };
            let logits = model.forward(input, Mode::Eval)?;
            let ce = cross_entropy(logits, &targets)?;
            correct[slot] += f64::from(ce.correct.to_array()?[[0]]);
        }
    }
    Ok(correct
        .into_iter()
        .map(|c| c / images.count as f64)
        .collect())
}

/// Uniform noise in [-1, 1) for the generator, from a counter-based hash.
fn noise(device: &Device, n: usize, dim: usize, step: usize) -> wgcnn::Result<Value> {
    let mut state = (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let values = ndarray::ArrayD::from_shape_simple_fn(ndarray::IxDyn(&[n, dim]), || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / 8_388_608.0 - 1.0
    });
    device.upload(values)
}

/// Generator and discriminator in alternation; returns (the discriminator's accuracy and
/// the fraction of samples that fooled it) over the last 50 steps, and a few samples.
fn gan(
    device: &Device,
    images: &Images,
    steps: usize,
    say: &dyn Fn(String),
) -> wgcnn::Result<(f64, f64, ndarray::ArrayD<f32>)> {
    let leaky = Activation::LeakyRelu(0.2);
    let latent = 32;
    let mut generator = Sequential::new()
        .add("fc1", Linear::new(latent, 128).activation(leaky))
        .add("fc2", Linear::new(128, 784).activation(Activation::Tanh))
        .build(device.clone(), 11)?;
    let mut discriminator = Sequential::new()
        .add("flatten", Flatten)
        .add("fc1", Linear::new(784, 128).activation(leaky))
        .add("fc2", Linear::new(128, 2))
        .build(device.clone(), 12)?;
    let adam = |lr| Optimizer::adam(lr).betas(0.5, 0.999);
    // The generator learns faster than the discriminator, which otherwise wins outright.
    let mut opt_g = generator.optimizer(adam(5e-4))?;
    let mut opt_d = discriminator.optimizer(adam(2e-4))?;
    // Real digits in [-1, 1], the generator's tanh range.
    let to_unit = Normalize::new(&[0.5], &[0.5])?;
    let batch = 64;
    let order = shuffled_indices(images.count, 3, 0);
    let mut recent = Vec::new();
    for step in 0..steps {
        let start = (step * batch) % (images.count - batch);
        let real = &order[start..start + batch];
        let d = discriminator_step(
            &mut discriminator,
            &mut generator,
            &mut opt_d,
            |dev| image_batch(dev, images, real, &to_unit),
            |dev| noise(dev, batch, latent, 2 * step),
        )?;
        let g = generator_step(
            &mut generator,
            &mut discriminator,
            &mut opt_g,
            |dev| noise(dev, batch, latent, 2 * step + 1),
            1,
        )?;
        if step + 50 >= steps || (step + 1) % 100 == 0 {
            let d_accuracy = f64::from(d.correct.to_array()?[[0]]) / (2 * batch) as f64;
            let fooled = f64::from(g.correct.to_array()?[[0]]) / batch as f64;
            if (step + 1) % 100 == 0 {
                say(format!(
                    "  step {:>4}: discriminator accuracy {:.2}, generator loss {:.3}, fooled {:.2}",
                    step + 1,
                    d_accuracy,
                    g.loss.to_array()?[[0]],
                    fooled
                ));
            }
            if step + 50 >= steps {
                recent.push((d_accuracy, fooled));
            }
        }
    }
    let n = recent.len().max(1) as f64;
    let samples = generator
        .forward(noise(device, 16, latent, usize::MAX)?, Mode::Eval)?
        .to_array()?;
    Ok((
        recent.iter().map(|r| r.0).sum::<f64>() / n,
        recent.iter().map(|r| r.1).sum::<f64>() / n,
        samples,
    ))
}

/// A 4×4 grid of 28×28 samples in [-1, 1] as a PNG.
fn save_grid(
    path: &std::path::Path,
    samples: &ndarray::ArrayD<f32>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut grid = image::GrayImage::new(4 * 28, 4 * 28);
    for (k, sample) in samples.outer_iter().take(16).enumerate() {
        for (i, &v) in sample.iter().enumerate() {
            let (x, y) = ((k % 4) * 28 + i % 28, (k / 4) * 28 + i / 28);
            let byte = ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0) as u8;
            grid.put_pixel(x as u32, y as u32, image::Luma([byte]));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    grid.save(path)?;
    Ok(())
}

/// FGSM and PGD attacks on a standard and an adversarially trained LeNet-5, then a small
/// generator/discriminator pair trained in alternation.
#[derive(Parser, Debug)]
struct Args {
    /// Training images for both classifiers.
    #[arg(long, default_value_t = 10_000)]
    train_images: usize,
    /// Test images the attacks run on.
    #[arg(long, default_value_t = 1_000)]
    test_images: usize,
    /// ε of the FGSM examples used in adversarial training.
    #[arg(long, default_value_t = 0.15)]
    train_epsilon: f32,
    /// Steps of the generator/discriminator game.
    #[arg(long, default_value_t = 400)]
    gan_steps: usize,
    /// Only the generator/discriminator part.
    #[arg(long)]
    gan_only: bool,
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

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let json = args.json;
    let train_images = args.train_images;
    let test_images = args.test_images;
    let train_epsilon = args.train_epsilon;
    let gan_steps = args.gan_steps;
    let device = common::device(&args.common)?;
    let data = common::mnist(&args.common)?;
    let say = |line: String| {
        if !json {
            println!("{line}")
        }
    };
    let (train, train_labels) = subset(
        &data.train_images,
        &data.train_labels,
        |_| true,
        train_images / 10,
        |d| d,
    );
    if args.gan_only {
        let (d_accuracy, fooled, samples) = gan(&device, &train, gan_steps, &|l| println!("{l}"))?;
        let grid = std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/gan_samples.png"
        ));
        save_grid(&grid, &samples)?;
        println!("discriminator accuracy {d_accuracy:.3}, fooled {fooled:.3}");
        return Ok(());
    }
    let test = data.test_images.first(test_images);
    let test_labels = &data.test_labels[..test.count];
    let attacks = [
        Attack::Fgsm { epsilon: 0.1 / STD },
        Attack::Fgsm { epsilon: 0.2 / STD },
        Attack::Pgd {
            epsilon: 0.1 / STD,
            alpha: 0.025 / STD,
            steps: 10,
        },
    ];

    let lr = 6e-3;
    let options = LeNetOptions {
        init: Init::PyTorch,
        ..LeNetOptions::default()
    };
    let mut standard = lenet5(options)?.build(device.clone(), 1)?;
    let mut opt = standard.optimizer(Optimizer::adam(lr))?;
    let standard_seconds = fit(&mut standard, &mut opt, &train, &train_labels, lr, 1, 64, 1)?;

    let mut robust = lenet5(options)?.build(device.clone(), 1)?;
    let mut opt = robust.optimizer(Optimizer::adam(lr))?;
    let normalize = Normalize::mnist();
    let start = std::time::Instant::now();
    let total = train.count.div_ceil(64);
    for (step, batch) in shuffled_indices(train.count, 1, 0).chunks(64).enumerate() {
        opt.set_lr(common::cosine(lr, step, total))?;
        adversarial_train_step(
            &mut robust,
            &mut opt,
            |d| image_batch(d, &train, batch, &normalize),
            &label_batch(&train_labels, batch)?,
            Attack::Fgsm {
                epsilon: train_epsilon / STD,
            },
            RANGE,
        )?;
    }
    if let Device::Gpu(gpu) = &device {
        gpu.synchronize()?;
    }
    let robust_seconds = start.elapsed().as_secs_f64();

    let standard_scores = robustness(&mut standard, &test, test_labels, &attacks)?;
    let robust_scores = robustness(&mut robust, &test, test_labels, &attacks)?;
    say(format!(
        "{} training images, {} test images; accuracy clean / FGSM ε=0.1 / FGSM ε=0.2 / PGD ε=0.1 (10 steps):",
        train.count, test.count
    ));
    for (name, scores, seconds) in [
        ("standard", &standard_scores, standard_seconds),
        (
            &*format!("adversarial (FGSM ε={train_epsilon})"),
            &robust_scores,
            robust_seconds,
        ),
    ] {
        let cells: Vec<String> = scores
            .iter()
            .map(|s| format!("{:6.2}%", 100.0 * s))
            .collect();
        say(format!(
            "  {name:<28} {}   (trained in {seconds:.1} s)",
            cells.join(" ")
        ));
    }

    say(format!(
        "generator vs discriminator, {gan_steps} steps of 64:"
    ));
    let (d_accuracy, fooled, samples) = gan(&device, &train, gan_steps, &say)?;
    let grid = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/gan_samples.png"
    ));
    save_grid(&grid, &samples)?;
    say(format!("  samples: {}", grid.display()));

    if json {
        println!(
            "{{\"clean_accuracy_standard\":{:.4},\"fgsm_accuracy_standard\":{:.4},\"fgsm02_accuracy_standard\":{:.4},\"pgd_accuracy_standard\":{:.4},\"clean_accuracy_robust\":{:.4},\"fgsm_accuracy_robust\":{:.4},\"fgsm02_accuracy_robust\":{:.4},\"pgd_accuracy_robust\":{:.4},\"train_images\":{},\"test_images\":{},\"train_epsilon\":{train_epsilon},\"gan_steps\":{gan_steps},\"gan_discriminator_accuracy\":{d_accuracy:.4},\"gan_fooled_fraction\":{fooled:.4},\"device\":{:?}}}",
            standard_scores[0],
            standard_scores[1],
            standard_scores[2],
            standard_scores[3],
            robust_scores[0],
            robust_scores[1],
            robust_scores[2],
            robust_scores[3],
            train.count,
            test.count,
            device.name()
        );
    }
    Ok(())
}
