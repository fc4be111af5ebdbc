//! The fault catalogue: NaN that shows, bad input that returns an `Error`, never a panic.

use crate::common;

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
        let before = checked.checkpoint().unwrap();
        let err = train_step(
            &mut checked,
            &mut sgd,
            |d| d.upload(poisoned.clone()),
            &labels,
        )
        .err()
        .unwrap();
        match &err {
            Error::NonFinite {
                what,
                step,
                update_skipped,
            } => {
                assert_eq!(what, "the output of node \"conv1\"", "{name}");
                assert_eq!(*step, 2, "{name}");
                assert!(*update_skipped, "{name}");
            }
            other => panic!("{name}: {other}"),
        }
        assert!(err.to_string().contains("check the batch for NaN"), "{err}");
        assert!(err.to_string().contains("the update was skipped"), "{err}");
        // The update did not run: every weight is as before the step, none is NaN, and the
        // next clean step trains from there.
        assert_eq!(checked.checkpoint().unwrap(), before, "{name}");
        let next = train_step(&mut checked, &mut sgd, |d| d.upload(clean.clone()), &labels);
        assert!(next.unwrap().loss_is_finite().unwrap(), "{name}");
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

/// 10¹⁰ parameters: an error naming the layer and the size, before anything is allocated
/// (it used to abort the process with "memory allocation of 40000000000 bytes failed").
/// On a GPU that is over the buffer limit; on the CPU path the host refuses the allocation,
/// shown here with 2⁵¹ bytes (beyond any address space) so that a large host cannot grant it.
#[test]
fn a_layer_too_large_for_the_device_or_host_is_an_error() {
    use wgcnn::nn::{Flatten, Linear, Sequential};
    for device in devices() {
        let (features, size) = match device {
            Device::Gpu(_) => ((100_000, 100_000), "40000000000"),
            Device::Cpu => ((1 << 25, 1 << 24), "2251799813685248"),
        };
        let err = Sequential::new()
            .add("flatten", Flatten)
            .add("huge", Linear::new(features.0, features.1))
            .build(device.clone(), 0)
            .err()
            .unwrap()
            .to_string();
        let shape = format!("huge.weight [{}, {}]", features.1, features.0);
        assert!(err.contains(&shape), "{}: {err}", device.name());
        assert!(err.contains(size), "{}: {err}", device.name());
    }
    // A size whose byte count overflows usize.
    let err = Sequential::new()
        .add("flatten", Flatten)
        .add("absurd", Linear::new(usize::MAX / 2, 4))
        .build(Device::Cpu, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("absurd.weight") && err.contains("more elements than fit"),
        "{err}"
    );
}

#[test]
fn a_label_index_past_the_end_is_an_error() {
    let labels = vec![1u8; 10_000];
    let err = wgcnn::train::label_batch(&labels, &[3, 10_000])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("label 10000 requested, the set has 10000"),
        "{err}"
    );
    assert_eq!(
        wgcnn::train::label_batch(&labels, &[0, 9_999]).unwrap(),
        vec![1, 1]
    );
}

/// An IDX header of 2³¹ × 2³¹ × 4 on a 16-byte file: the size product used to wrap to 0,
/// the file was accepted, and reading an image panicked.
#[test]
fn an_idx_header_whose_sizes_overflow_is_refused() {
    let mut bytes = vec![0, 0, 8, 3];
    for dim in [1u32 << 31, 1 << 31, 4] {
        bytes.extend_from_slice(&dim.to_be_bytes());
    }
    let path = std::env::temp_dir().join(format!("wgcnn-overflow-{}.idx", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let err = wgcnn::data::read_idx_images(&path).unwrap_err().to_string();
    assert!(err.contains("overflow"), "{err}");
    std::fs::remove_file(path).ok();
}

/// A save killed between writing and renaming leaves its own temporary file; the next save
/// removes it (its process is gone) and leaves none of its own.
#[test]
fn the_next_save_removes_a_stale_temporary_file() {
    let dir = std::env::temp_dir().join(format!("wgcnn-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    // The name a save of a process that no longer exists (pid 4194304 is past Linux's
    // limit) leaves behind.
    let stale = dir.join(".model.safetensors.4194304.0.tmp");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let model = lenet5(LeNetOptions::default())
        .unwrap()
        .build(Device::Cpu, 1)
        .unwrap();
    model.save(&path).unwrap();
    if std::path::Path::new("/proc/self").exists() {
        assert!(!stale.exists(), "the stale temporary file is gone");
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1 + usize::from(stale.exists())
    );
    assert_eq!(
        wgcnn::train::Checkpoint::load(&path).unwrap(),
        model.checkpoint().unwrap()
    );
    std::fs::remove_dir_all(dir).ok();
}

/// The CPU references size their outputs from hyper-parameters: one the host cannot hold is
/// an error (sizes past 2⁴⁷ bytes, beyond any address space, so no host can grant them).
#[test]
fn cpu_references_refuse_outputs_the_host_cannot_hold() {
    use wgcnn::ops::{AdaptiveAvgPool2d, Conv2d};
    let x = random(&[1, 1, 2, 2], 1);
    let err = AdaptiveAvgPool2d::new(1 << 23, 1 << 23)
        .forward_cpu(&x.view())
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the host can allocate"), "{err}");
    let spec = Conv2d {
        padding: wgcnn::Padding::Explicit(1 << 29, 1 << 29),
        ..Conv2d::default()
    };
    let w = random(&[1, 1, 1, 1], 2);
    let err = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the host can allocate"), "{err}");
}
