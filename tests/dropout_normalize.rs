//! Dropout (mask statistics, exact scaling, reproducibility, backward) and input
//! normalisation (from floats and from image bytes).

mod common;

use common::{gpu, max_abs_diff, random};
use ndarray::{Array4, ArrayD, IxDyn};
use wgcnn::ops::Dropout;
use wgcnn::{Normalize, Tensor};

#[test]
fn dropout_keeps_one_minus_rate_and_scales_exactly() {
    let Some(gpu) = gpu() else { return };
    let x = ArrayD::from_elem(IxDyn(&[64, 1000]), 1.0f32);
    let tx = Tensor::from_array(gpu, &x).unwrap();
    for rate in [0.0f32, 0.1, 0.5, 0.9] {
        let dropout = Dropout::new(rate, 42).unwrap();
        let y = dropout.forward(&tx, 7, true).unwrap().to_array().unwrap();
        let scale = 1.0 / (1.0 - rate);
        assert!(
            y.iter().all(|&v| v == 0.0 || v == scale),
            "rate {rate}: values other than 0 and 1/(1-p)"
        );
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
        // 64,000 Bernoulli draws: the standard error is at most 0.002.
        assert!(
            (kept - (1.0 - f64::from(rate))).abs() < 0.01,
            "rate {rate}: kept {kept}"
        );
        let mean = y.iter().map(|&v| f64::from(v)).sum::<f64>() / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "rate {rate}: mean {mean}");
        // The CPU twin draws the identical mask.
        assert_eq!(y, dropout.forward_cpu(&x.view(), 7, true).unwrap());
    }
}

#[test]
fn dropout_masks_are_reproducible_and_shared_with_backward() {
    let Some(gpu) = gpu() else { return };
    let x = random(&[10, 100], 1);
    let tx = Tensor::from_array(gpu, &x).unwrap();
    let dropout = Dropout::new(0.3, 9).unwrap();
    let a = dropout.forward(&tx, 3, true).unwrap().to_array().unwrap();
    let b = dropout.forward(&tx, 3, true).unwrap().to_array().unwrap();
    assert_eq!(a, b, "same seed and step, same mask");
    let c = dropout.forward(&tx, 4, true).unwrap().to_array().unwrap();
    assert_ne!(a, c, "another step, another mask");
    let other_seed = Dropout::new(0.3, 10)
        .unwrap()
        .forward(&tx, 3, true)
        .unwrap()
        .to_array()
        .unwrap();
    assert_ne!(a, other_seed);

    let dy = random(&[10, 100], 2);
    let dx = dropout
        .backward(&Tensor::from_array(gpu, &dy).unwrap(), 3, true)
        .unwrap()
        .to_array()
        .unwrap();
    for ((&y, &xv), (&g, &d)) in a.iter().zip(&x).zip(dy.iter().zip(&dx)) {
        if y == 0.0 && xv != 0.0 {
            assert_eq!(d, 0.0, "a dropped element passes no gradient");
        } else {
            assert!((d - g / 0.7).abs() < 1e-6);
        }
    }
    // Eval mode is the identity, forward and backward.
    assert_eq!(
        dropout.forward(&tx, 3, false).unwrap().to_array().unwrap(),
        x
    );
}

#[test]
fn dropout_rate_outside_zero_one_is_an_error() {
    for rate in [-0.1f32, 1.0, 1.5, f32::NAN] {
        let err = Dropout::new(rate, 0).unwrap_err();
        assert!(err.to_string().contains("must lie in [0, 1)"), "{err}");
    }
    let Some(gpu) = gpu() else { return };
    let t = Tensor::full(gpu, &[4], 1.0).unwrap();
    assert!(Dropout { rate: 1.0, seed: 0 }.forward(&t, 0, true).is_err());
}

#[test]
fn normalisation_from_floats_and_from_bytes() {
    let Some(gpu) = gpu() else { return };
    let norm = Normalize::new(&[0.5, 0.25, 0.1], &[0.2, 0.5, 1.0]).unwrap();
    let x = random(&[2, 3, 4, 5], 1);
    let want = norm.forward_cpu(&x.view()).unwrap();
    assert!((want[[1, 1, 2, 3]] - (x[[1, 1, 2, 3]] - 0.25) / 0.5).abs() < 1e-6);
    let got = norm
        .forward(&Tensor::from_array(gpu, &x).unwrap())
        .unwrap()
        .to_array()
        .unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6);

    // 2·3·3·3 = 54 bytes: not a multiple of 4, so the last word is partial.
    let bytes = Array4::from_shape_fn((2, 3, 3, 3), |(n, c, i, j)| {
        ((n * 97 + c * 31 + i * 7 + j * 3) * 13 % 256) as u8
    });
    let got = norm
        .from_bytes(gpu, &bytes.view())
        .unwrap()
        .to_array()
        .unwrap();
    let as_floats = bytes.mapv(|b| f32::from(b) / 255.0).into_dyn();
    assert!(max_abs_diff(&got, &norm.forward_cpu(&as_floats.view()).unwrap()) < 1e-6);

    let mnist = Normalize::new(&[0.1307], &[0.3081]).unwrap();
    let err = mnist.forward_cpu(&x.view()).unwrap_err();
    assert!(
        err.to_string().contains("input must be [N, 1, H, W]"),
        "{err}"
    );
    assert!(
        Normalize::new(&[0.0], &[0.0])
            .unwrap_err()
            .to_string()
            .contains("must be positive")
    );
    assert!(Normalize::new(&[0.0, 1.0], &[1.0]).is_err());
}
