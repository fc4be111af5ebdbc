//! Classifies image files with a LeNet-5 checkpoint saved by the MNIST example.
//!
//! `cargo run --release --example mnist -- --save target/lenet.safetensors`, then
//! `cargo run --release --example predict -- --checkpoint target/lenet.safetensors [--json]
//! [--batch-norm] [--device gpu|cpu] IMAGE...`
//!
//! Each image (PNG or JPEG) is read as greyscale, resized to 28×28, inverted when it is dark
//! on light (MNIST digits are light on dark), scaled to [0, 1] and normalised with MNIST's
//! mean and standard deviation, as the model saw its training images.

mod common;

use clap::Parser;
use common::CommonArgs;
use wgcnn::nn::{LeNetOptions, lenet5};
use wgcnn::prelude::{Array4, ArrayD};

/// Classifies PNG or JPEG files with a LeNet-5 checkpoint saved by the MNIST example.
#[derive(Parser, Debug)]
struct Args {
    /// The safetensors checkpoint (`mnist -- --save PATH`).
    #[arg(long)]
    checkpoint: String,
    /// The checkpoint's model has batch norm (`mnist -- --batch-norm`).
    #[arg(long)]
    batch_norm: bool,
    /// One JSON line: {"predictions":[{"file":…,"class":…,"probability":…}]}.
    #[arg(long)]
    json: bool,
    /// The images to classify.
    #[arg(required = true)]
    images: Vec<String>,
    #[command(flatten)]
    common: CommonArgs,
}

/// MNIST's pixel mean and standard deviation (`Normalize::mnist`).
const MEAN: f32 = 0.1307;
const STD: f32 = 0.3081;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The images as one normalised `[N, 1, 28, 28]` batch.
fn load_images(paths: &[String]) -> Result<ArrayD<f32>, Box<dyn std::error::Error>> {
    let mut batch = Array4::<f32>::zeros((paths.len(), 1, 28, 28));
    for (i, path) in paths.iter().enumerate() {
        let grey = image::open(path)
            .map_err(|e| format!("{path}: {e}"))?
            .to_luma8();
        let grey = image::imageops::resize(&grey, 28, 28, image::imageops::FilterType::Triangle);
        let mean = grey.pixels().map(|p| f32::from(p.0[0])).sum::<f32>() / (28.0 * 28.0);
        let invert = mean > 127.5;
        for (x, y, p) in grey.enumerate_pixels() {
            let mut v = f32::from(p.0[0]) / 255.0;
            if invert {
                v = 1.0 - v;
            }
            batch[[i, 0, y as usize, x as usize]] = (v - MEAN) / STD;
        }
    }
    Ok(batch.into_dyn())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let options = LeNetOptions {
        batch_norm: args.batch_norm,
        ..LeNetOptions::default()
    };
    let mut model = lenet5(options)?.build(common::device(&args.common)?, 0)?;
    model.load(&args.checkpoint)?;
    let predictions = model.predict(&load_images(&args.images)?)?;
    let rows = args.images.iter().zip(&predictions.classes).enumerate();
    if args.json {
        let entries: Vec<String> = rows
            .map(|(i, (file, class))| {
                format!(
                    "{{\"file\":{file:?},\"class\":{class},\"probability\":{:.4}}}",
                    predictions.confidence(i).unwrap_or(f32::NAN)
                )
            })
            .collect();
        println!("{{\"predictions\":[{}]}}", entries.join(","));
    } else {
        println!("{:<40} {:>5} {:>11}", "file", "class", "probability");
        for (i, (file, class)) in rows {
            let p = predictions.confidence(i).unwrap_or(f32::NAN);
            println!("{file:<40} {class:>5} {p:>11.4}");
        }
    }
    Ok(())
}
