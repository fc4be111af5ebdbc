//! Dropout (mask statistics, exact scaling, reproducibility, backward) and input
//! normalisation (from floats and from image bytes, and with crops and flips on the device:
//! the same images as the host's augmentation).

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{devices, gpu, max_abs_diff, random};
use ndarray::{Array4, ArrayD, IxDyn};
use wgcnn::data::{Augmentation, CropFlip, CropFlips, Dataset, Loader, LoaderOptions, Pixels};
use wgcnn::ops::Dropout;
use wgcnn::{Device, Normalize, Tensor};

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

/// `n` images of `[c, h, w]`, bytes or floats, no two pixels alike in an image.
fn pixel_set(n: usize, [c, h, w]: [usize; 3], bytes: bool) -> Arc<Dataset> {
    let count = n * c * h * w;
    let pixels = if bytes {
        Pixels::U8((0..count).map(|v| (v * 37 % 251) as u8).collect())
    } else {
        Pixels::F32(
            (0..count)
                .map(|v| (v * 37 % 1009) as f32 / 1009.0)
                .collect(),
        )
    };
    let labels = (0..n).map(|i| i % 3).collect();
    Arc::new(Dataset::new([n, c, h, w], pixels, labels, None).unwrap())
}

/// The batch as each device uploads it (output poisoned first) against the host's
/// augmentation of the same images: equal to the bit on the same device (the same
/// arithmetic), and within float rounding of the CPU's.
fn assert_device_crops_match_the_host(
    data: &Dataset,
    augment: &Augmentation,
    norm: &Normalize,
    (seed, epoch): (u64, u64),
) {
    let indices: Vec<usize> = (0..data.len()).rev().collect();
    let on_host = data
        .host_batch(&indices, Some((augment, seed, epoch)))
        .unwrap();
    let want = on_host
        .upload(&Device::Cpu, norm)
        .unwrap()
        .to_array()
        .unwrap();
    let batch = data
        .crop_flip_batch(&indices, (augment, seed, epoch))
        .unwrap();
    assert_eq!(batch.shape, on_host.shape);
    assert_eq!(batch.labels, on_host.labels);
    for device in devices() {
        if let Some(gpu) = device.gpu() {
            drop(Tensor::full(gpu, &batch.shape, f32::NAN).unwrap());
        }
        let got = batch.upload(&device, norm).unwrap().to_array().unwrap();
        let same_device = on_host.upload(&device, norm).unwrap().to_array().unwrap();
        let what = format!("{augment:?} seed {seed} epoch {epoch} on {}", device.name());
        assert_eq!(got, same_device, "{what}");
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 2e-6, "{what}: off the CPU by {diff}");
    }
}

#[test]
fn crops_and_flips_on_the_device_are_the_host_augmentation() {
    let norm = Normalize::new(&[0.5, 0.25, 0.1], &[0.2, 0.5, 1.0]).unwrap();
    let crop_flip = Augmentation::new()
        .random_crop((5, 6), 2)
        .unwrap()
        .horizontal_flip(0.5)
        .unwrap();
    let flip_crop_filled = Augmentation::new()
        .horizontal_flip(0.5)
        .unwrap()
        .random_crop_filled((7, 4), 3, 200)
        .unwrap()
        .horizontal_flip(0.3)
        .unwrap();
    // Shapes that fill no workgroup; odd sizes, a crop larger than the image.
    for (n, shape) in [(9, [3, 7, 9]), (23, [3, 5, 5])] {
        for bytes in [true, false] {
            let data = pixel_set(n, shape, bytes);
            for augment in [&crop_flip, &flip_crop_filled] {
                for run in [(1, 0), (1, 1), (8, 5)] {
                    assert_device_crops_match_the_host(&data, augment, &norm, run);
                }
            }
        }
    }
    // Over many images every window position and both directions come up.
    let data = pixel_set(2000, [3, 7, 9], true);
    let indices: Vec<usize> = (0..2000).collect();
    let batch = data.crop_flip_batch(&indices, (&crop_flip, 3, 0)).unwrap();
    let windows = &batch.crops.as_ref().unwrap().windows;
    let seen: HashSet<(i64, i64, bool)> =
        windows.iter().map(|w| (w.top, w.left, w.flipped)).collect();
    // Every window of the padded image: rows −2..=4, columns −2..=5, each flipped or not.
    let all: HashSet<(i64, i64, bool)> = (-2..=4)
        .flat_map(|t| (-2..=5).flat_map(move |l| [(t, l, false), (t, l, true)]))
        .collect();
    assert_eq!(seen, all);
}

#[test]
fn a_loader_leaving_crops_to_the_device_gives_the_same_images() {
    for device in devices() {
        a_loader_leaving_crops_to_the_device_gives_the_same_images_on(&device);
    }
}

fn a_loader_leaving_crops_to_the_device_gives_the_same_images_on(device: &Device) {
    let data = pixel_set(70, [3, 8, 8], true);
    let norm = Normalize::new(&[0.4, 0.5, 0.6], &[0.25, 0.25, 0.3]).unwrap();
    let augment = Augmentation::new()
        .random_crop((8, 8), 4)
        .unwrap()
        .horizontal_flip(0.5)
        .unwrap();
    let host = LoaderOptions::new(32).seed(2).augmentation(augment);
    let on_device = host.clone().augment_on_device(true);
    let host_batches = Loader::epoch(data.clone(), &host, 1).unwrap();
    let device_batches = Loader::epoch(data.clone(), &on_device, 1).unwrap();
    let mut count = 0;
    for (a, b) in host_batches.zip(device_batches) {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.indices, b.indices);
        assert!(a.crops.is_none() && b.crops.is_some());
        let want = a.upload(device, &norm).unwrap().to_array().unwrap();
        let got = b.upload(device, &norm).unwrap().to_array().unwrap();
        assert_eq!(got, want, "on {}", device.name());
        count += a.len();
    }
    assert_eq!(count, 70);
}

#[test]
fn what_the_device_cannot_crop_is_an_error() {
    let data = pixel_set(4, [3, 8, 8], true);
    let resized = Augmentation::new()
        .random_resized_crop((6, 6), (0.5, 1.0), (0.75, 1.33))
        .unwrap();
    let twice = Augmentation::new()
        .random_crop((8, 8), 1)
        .unwrap()
        .random_crop((6, 6), 1)
        .unwrap();
    for augment in [resized, twice] {
        assert!(!augment.is_crop_flip());
        let options = LoaderOptions::new(2)
            .augmentation(augment.clone())
            .augment_on_device(true);
        let err = Loader::epoch(data.clone(), &options, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("leave this augmentation to the loader's thread"),
            "{err}"
        );
        // The host still does it.
        let host = LoaderOptions::new(2).augmentation(augment);
        assert!(
            Loader::epoch(data.clone(), &host, 0)
                .unwrap()
                .all(|b| b.is_ok())
        );
    }
    // Windows that do not match their pixels or statistics.
    let crops = CropFlips {
        source: [3, 8, 8],
        size: (6, 6),
        windows: vec![
            CropFlip {
                top: 0,
                left: 1,
                flipped: true
            };
            3
        ],
        fill: 0,
    };
    let norm = Normalize::new(&[0.5; 3], &[0.5; 3]).unwrap();
    let two_images = Array4::<u8>::from_elem((2, 3, 8, 8), 7);
    let three_images = Array4::<f32>::from_elem((3, 3, 8, 8), 0.5);
    let grey = Normalize::new(&[0.5], &[0.5]).unwrap();
    let mut empty = crops.clone();
    empty.size = (0, 6);
    for device in devices() {
        let err = crops
            .bytes_on(&device, &two_images.view(), &norm)
            .unwrap_err();
        assert!(
            err.to_string().contains("one stored image per window"),
            "{err}"
        );
        let err = crops
            .floats_on(&device, &three_images.view(), &grey)
            .unwrap_err();
        assert!(err.to_string().contains("one per channel"), "{err}");
        let err = empty
            .floats_on(&device, &three_images.view(), &norm)
            .unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        assert!(
            crops
                .floats_on(&device, &three_images.view(), &norm)
                .is_ok()
        );
    }
}
