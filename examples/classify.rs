//! Classifies photos with an ImageNet model from PyTorch and prints the top-5 classes.
//!
//! `scripts/fetch_efficientnet_lite0.sh target/weights`, then
//! `cargo run --release --example classify -- --model efficientnet_lite0 --weights
//! target/weights/efficientnet-lite0-57934424.pth [--json] [--device gpu|cpu] IMAGE...`
//!
//! Any model of `wgcnn::models` with 1,000 ImageNet classes works with its PyTorch
//! `state_dict` (`.pth` or `.safetensors`), e.g. `--model resnet18 --weights resnet18.pth`.
//! Each model prepares its photos as it was trained (`Model::preprocess`): EXIF orientation,
//! the shorter side resized with antialiasing, the centre cropped, normalised.

mod common;

use clap::Parser;
use common::CommonArgs;
use wgcnn::models;

/// ImageNet's 1,000 class names in index order (torchvision's list, `data/imagenet`).
const CLASS_NAMES: &str = include_str!("../data/imagenet/classes.txt");

/// Classifies photos with an ImageNet model and its PyTorch weights.
#[derive(Parser, Debug)]
struct Args {
    /// The model (one of wgcnn::models::NAMES).
    #[arg(long, default_value = "efficientnet_lite0")]
    model: String,
    /// Its ImageNet weights: a PyTorch state_dict (.pth, .pt) or a .safetensors file.
    #[arg(long)]
    weights: String,
    /// One JSON line: {"predictions":[{"file":…,"top5":[{"class":…,"name":…,"probability":…}]}]}.
    #[arg(long)]
    json: bool,
    /// The photos (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<String>,
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
    let names: Vec<&str> = CLASS_NAMES.lines().collect();
    let model = models::by_name(&args.model, names.len())?;
    let batch = model.preprocess().load_batch(&args.images)?;
    let mut graph = model.build(common::device(&args.common)?, 0)?;
    graph.load(&args.weights)?;
    let predictions = graph.predict(&batch)?;
    let mut files = Vec::new();
    for (file, row) in args.images.iter().zip(predictions.probabilities.rows()) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top5: Vec<(usize, f32)> = order.iter().take(5).map(|&k| (k, row[k])).collect();
        files.push((file, top5));
    }
    if args.json {
        let predictions: Vec<serde_json::Value> = files
            .iter()
            .map(|(file, top5)| {
                let top5: Vec<serde_json::Value> = top5
                    .iter()
                    .map(|&(class, p)| {
                        serde_json::json!({"class": class, "name": names[class], "probability": p})
                    })
                    .collect();
                serde_json::json!({"file": file, "top5": top5})
            })
            .collect();
        println!("{}", serde_json::json!({ "predictions": predictions }));
    } else {
        for (file, top5) in &files {
            println!("{file}");
            for &(class, p) in top5 {
                println!("  {:6.2} %  {class:4}  {}", 100.0 * p, names[class]);
            }
        }
    }
    Ok(())
}
