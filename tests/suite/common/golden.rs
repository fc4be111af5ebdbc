//! Reading the PyTorch golden cases in tests/golden/.

use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

/// One golden case file.
pub struct Case {
    pub name: String,
    pub json: Value,
}

/// Every case whose file name starts with `prefix`.
pub fn cases(prefix: &str) -> Vec<Case> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("tests/golden exists")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no golden cases start with {prefix}");
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
            Case {
                name,
                json: serde_json::from_str(&text).unwrap(),
            }
        })
        .collect()
}

/// A stored pair such as `"stride": [2, 1]`.
pub fn pair(value: &Value) -> (usize, usize) {
    let v = value.as_array().unwrap();
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    )
}

/// A stored tensor as an f32 array.
pub fn tensor(value: &Value) -> ArrayD<f32> {
    let shape: Vec<usize> = value["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data: Vec<f32> = value["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap()
}

/// Checks `got` against `expected` with rtol/atol; names the worst element on failure.
pub fn assert_close(what: &str, got: &ArrayD<f32>, expected: &ArrayD<f32>, rtol: f32, atol: f32) {
    assert_eq!(got.shape(), expected.shape(), "{what}: shapes");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let excess = (g - e).abs() - (atol + rtol * e.abs());
        if excess.is_nan() || excess > worst.0 {
            worst = (
                if excess.is_nan() {
                    f32::INFINITY
                } else {
                    excess
                },
                i,
            );
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{what}: element {} is {} but expected {}",
        worst.1,
        got.iter().nth(worst.1).unwrap(),
        expected.iter().nth(worst.1).unwrap()
    );
}

/// The LeNet golden's initial parameters as PyTorch made them, in its parameter order
/// (`tests/golden/lenet_params_init.f32le.bin`, little-endian f32).
pub fn lenet_init_values() -> Vec<f32> {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/lenet_params_init.f32le.bin"
    ))
    .unwrap();
    bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The LeNet golden's parameter names, in PyTorch's parameter order.
pub const LENET_NAMES: [&str; 10] = [
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "fc3.weight",
    "fc3.bias",
];

/// Their shapes: OIHW convolutions, `[out, in]` linear weights.
pub const LENET_SHAPES: [&[usize]; 10] = [
    &[6, 1, 5, 5],
    &[6],
    &[16, 6, 5, 5],
    &[16],
    &[120, 256],
    &[120],
    &[84, 120],
    &[84],
    &[10, 84],
    &[10],
];

/// [`lenet_init_values`] split into named tensors, like a PyTorch state dict.
pub fn lenet_init_state() -> Vec<(String, ArrayD<f32>)> {
    let values = lenet_init_values();
    let mut offset = 0;
    let state = LENET_NAMES
        .iter()
        .zip(LENET_SHAPES)
        .map(|(name, shape)| {
            let len: usize = shape.iter().product();
            let data = values[offset..offset + len].to_vec();
            offset += len;
            (
                name.to_string(),
                ArrayD::from_shape_vec(IxDyn(shape), data).unwrap(),
            )
        })
        .collect();
    assert_eq!(offset, values.len());
    state
}
