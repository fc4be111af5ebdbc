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

use common::Flags;
use wgcnn::nn::{LeNetOptions, lenet5};
use wgcnn::prelude::{Array4, ArrayD};

const USAGE: &str =
    "usage: predict --checkpoint FILE [--json] [--batch-norm] [--device gpu|cpu] IMAGE...";
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
    let flags = Flags::parse();
    if flags.has("--help") || flags.has("-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let checkpoint: String = flags.get("--checkpoint", String::new());
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Image paths: every argument that is neither a flag nor a flag's value.
    let mut images = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--checkpoint" | "--device" => i += 2,
            a if a.starts_with("--") => i += 1,
            _ => {
                images.push(args[i].clone());
                i += 1;
            }
        }
    }
    if checkpoint.is_empty() || images.is_empty() {
        return Err(USAGE.into());
    }
    let options = LeNetOptions {
        batch_norm: flags.has("--batch-norm"),
        ..LeNetOptions::default()
    };
    let mut model = lenet5(options)?.build(common::device(&flags)?, 0)?;
    model.load(&checkpoint)?;
    let predictions = model.predict(&load_images(&images)?)?;
    let rows = images.iter().zip(&predictions.classes).enumerate();
    if flags.has("--json") {
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
