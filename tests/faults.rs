//! The fault catalogue: NaN that shows, bad input that returns an `Error`, never a panic.

mod common;

use common::{gpu, random};
use wgcnn::nn::{LeNetOptions, lenet5};
use wgcnn::train::train_step;
use wgcnn::{Device, Error, Optimizer};

fn devices() -> Vec<Device> {
    let mut list = vec![Device::Cpu];
    if let Some(gpu) = gpu() {
        list.push(Device::Gpu(gpu.clone()));
    }
    list
}

/// One NaN pixel used to vanish in ReLU (GPU, fused epilogue and CPU alike): the weights
/// went NaN while the loss still read 2.30. Now the loss shows it, and the opt-in check
/// names the first layer whose output held it.
#[test]
fn a_nan_batch_shows_in_the_loss_and_the_check_names_the_first_layer() {
    let labels: Vec<usize> = (0..8).map(|i| i % 10).collect();
    let clean = random(&[8, 1, 28, 28], 1);
    let mut poisoned = clean.clone();
    poisoned[[3, 0, 14, 14]] = f32::NAN;
    for device in devices() {
        let name = device.name();
        let build = || {
            lenet5(LeNetOptions::default())
                .unwrap()
                .build(device.clone(), 3)
                .unwrap()
        };
        let mut model = build();
        let mut sgd = model.optimizer(Optimizer::sgd(0.1)).unwrap();
        let ok = train_step(&mut model, &mut sgd, |d| d.upload(clean.clone()), &labels).unwrap();
        assert!(ok.loss_is_finite().unwrap(), "{name}");
        let bad = train_step(
            &mut model,
            &mut sgd,
            |d| d.upload(poisoned.clone()),
            &labels,
        )
        .unwrap();
        assert!(
            !bad.loss_is_finite().unwrap(),
            "{name}: the NaN batch must show in the loss"
        );

        let mut checked = build();
        checked.set_check_finite(true);
        let mut sgd = checked.optimizer(Optimizer::sgd(0.1)).unwrap();
        train_step(&mut checked, &mut sgd, |d| d.upload(clean.clone()), &labels).unwrap();
        let err = train_step(
            &mut checked,
            &mut sgd,
            |d| d.upload(poisoned.clone()),
            &labels,
        )
        .err()
        .unwrap();
        match &err {
            Error::NonFinite { what, step } => {
                assert_eq!(what, "the output of node \"conv1\"", "{name}");
                assert_eq!(*step, 2, "{name}");
            }
            other => panic!("{name}: {other}"),
        }
        assert!(err.to_string().contains("check the batch for NaN"), "{err}");
    }
}

/// A parameter that overflows in the update is named as such.
#[test]
fn an_update_that_overflows_is_named() {
    let labels = [0usize, 1, 2, 3];
    let x = random(&[4, 1, 28, 28], 2).mapv(|v| v * 1e3);
    for device in devices() {
        let mut model = lenet5(LeNetOptions::default())
            .unwrap()
            .build(device.clone(), 3)
            .unwrap();
        model.set_check_finite(true);
        let mut sgd = model.optimizer(Optimizer::sgd(3e38)).unwrap();
        let err = train_step(&mut model, &mut sgd, |d| d.upload(x.clone()), &labels)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("after the optimizer step"),
            "{}: {err}",
            device.name()
        );
    }
}
