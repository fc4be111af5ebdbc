//! Inference: logits and predictions of a model on GPU and CPU, any batch size, scalar reads.

use crate::common;

use common::{gpu, random};
use wgcnn::prelude::*;

fn model(device: Device) -> Graph {
    Sequential::new()
        .add(
            "conv",
            Conv2d::new(1, 4, (3, 3)).activation(Activation::Relu),
        )
        .add("pool", max_pool2d(2))
        .add("drop", Dropout::new(0.5, 3).unwrap())
        .add("flatten", Flatten)
        .add("fc", Linear::new(4 * 4 * 4, 10))
        .build(device, 11)
        .unwrap()
}

#[test]
fn predictions_agree_on_gpu_and_cpu_for_any_batch_size() {
    let Some(gpu) = gpu() else { return };
    // 600 images: three chunks of up to 256.
    let images = random(&[600, 1, 10, 10], 1);
    let mut on_gpu = model(Device::Gpu(gpu.clone()));
    let mut on_cpu = model(Device::Cpu);
    let logits = on_gpu.logits(&images).unwrap();
    let want = on_cpu.logits(&images).unwrap();
    assert_eq!(logits.shape(), [600, 10]);
    let diff = (&logits - &want)
        .mapv(f32::abs)
        .fold(0.0f32, |m, &d| m.max(d));
    assert!(diff < 1e-4, "GPU and CPU logits differ by {diff}");
    // Evaluation mode: no dropout, so a second call gives the same logits.
    assert_eq!(on_gpu.logits(&images).unwrap(), logits);
    // Chunks change nothing: the first image alone gives its row.
    let first = on_gpu
        .logits(
            &images
                .slice(ndarray::s![0..1, .., .., ..])
                .to_owned()
                .into_dyn(),
        )
        .unwrap();
    assert_eq!(first.row(0), logits.row(0));

    let predictions = on_gpu.predict(&images).unwrap();
    for (i, row) in logits.rows().into_iter().enumerate() {
        let best = row
            .iter()
            .enumerate()
            .fold(0, |b, (k, &v)| if v > row[b] { k } else { b });
        assert_eq!(predictions.classes[i], best, "image {i}");
        let p = predictions.probabilities.row(i);
        assert!((p.sum() - 1.0).abs() < 1e-5, "image {i}: {p}");
        // Softmax ratios follow the logits: p_k / p_best = exp(l_k − l_best).
        for k in 0..10 {
            let want = f64::from(row[k] - row[best]).exp();
            let got = f64::from(p[k]) / f64::from(p[best]);
            assert!((got - want).abs() < 1e-5, "image {i}, class {k}");
        }
        assert_eq!(predictions.confidence(i), Some(p[best]));
    }
    assert_eq!(predictions.confidence(600), None);
    assert_eq!(
        on_cpu.predict(&images).unwrap().classes,
        predictions.classes
    );
}

#[test]
fn bad_inference_inputs_are_errors() {
    let mut on_cpu = model(Device::Cpu);
    let err = on_cpu
        .logits(&ArrayD::zeros(IxDyn(&[0, 1, 10, 10])))
        .unwrap_err();
    assert!(err.to_string().contains("at least one image"), "{err}");
    let err = on_cpu
        .logits(&ArrayD::zeros(IxDyn(&[2, 3, 10, 10])))
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn images_holding_nan_are_refused_by_name() {
    for device in common::devices() {
        let mut m = model(device.clone());
        let mut x = random(&[5, 1, 10, 10], 4);
        x[[1, 0, 3, 3]] = f32::NAN;
        x[[4, 0, 0, 9]] = f32::INFINITY;
        let err = m.predict(&x).unwrap_err().to_string();
        assert!(err.contains("2 of 5 images"), "{}: {err}", device.name());
        assert!(err.contains("images 1, 4"), "{}: {err}", device.name());
        x[[1, 0, 3, 3]] = 0.5;
        x[[4, 0, 0, 9]] = 0.5;
        assert_eq!(m.predict(&x).unwrap().classes.len(), 5);
    }
}

#[test]
fn scalars_read_without_indexing() {
    let Some(gpu) = gpu() else { return };
    let one = Tensor::from_array(gpu, &ndarray::arr1(&[2.5f32])).unwrap();
    assert_eq!(one.scalar().unwrap(), 2.5);
    assert_eq!(Value::Gpu(one).scalar().unwrap(), 2.5);
    assert_eq!(
        Value::Cpu(ndarray::arr0(-1.0f32).into_dyn())
            .scalar()
            .unwrap(),
        -1.0
    );
    let two = Tensor::from_array(gpu, &ndarray::arr1(&[1.0f32, 2.0])).unwrap();
    let err = two.scalar().unwrap_err();
    assert!(err.to_string().contains("one element"), "{err}");
}

#[test]
fn a_summary_lists_every_layer_with_its_output_shape_and_parameters() {
    let Some(gpu) = gpu() else { return };
    for device in [Device::Gpu(gpu.clone()), Device::Cpu] {
        let mut model = lenet5(LeNetOptions::default())
            .unwrap()
            .build(device.clone(), 1)
            .unwrap();
        let summary = model.summary(&[1, 1, 28, 28]).unwrap();
        let shapes: Vec<Vec<usize>> = summary
            .output_shapes()
            .into_iter()
            .map(|s| s.unwrap().to_vec())
            .collect();
        let want: Vec<Vec<usize>> = vec![
            vec![1, 6, 24, 24],
            vec![1, 6, 12, 12],
            vec![1, 16, 8, 8],
            vec![1, 16, 4, 4],
            vec![1, 256],
            vec![1, 120],
            vec![1, 84],
            vec![1, 10],
        ];
        assert_eq!(shapes, want);
        assert_eq!(summary.trainable(), model.parameter_count());
        assert_eq!(
            summary.trainable(),
            6 * 25 + 6 + 16 * 150 + 16 + 256 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
        );
        assert_eq!(summary.non_trainable(), 0);
        let table = summary.to_string();
        for needle in [
            "conv1 (",
            "[1, 6, 24, 24]",
            "fc3 (",
            "[1, 10]",
            "44426 trainable",
        ] {
            assert!(table.contains(needle), "{needle:?} missing from\n{table}");
        }
        // Display on the model itself: the shapes of the last forward pass.
        assert!(model.to_string().contains("[1, 16, 4, 4]"), "{model}");
        // A frozen layer's parameters move to the other column.
        model.freeze("conv1", true).unwrap();
        let frozen = model.summary(&[2, 1, 28, 28]).unwrap();
        assert_eq!(frozen.non_trainable(), 156);
        assert_eq!(frozen.trainable(), summary.trainable() - 156);
        // A shape the model cannot take: an error naming the layer.
        let err = model.summary(&[1, 3, 28, 28]).unwrap_err();
        assert!(err.to_string().contains("conv1"), "{err}");
        assert!(model.summary(&[]).is_err());
    }
    // Batch norm's running statistics count as other state.
    let options = LeNetOptions {
        batch_norm: true,
        ..LeNetOptions::default()
    };
    let mut model = lenet5(options).unwrap().build(Device::Cpu, 1).unwrap();
    let summary = model.summary(&[1, 1, 28, 28]).unwrap();
    assert_eq!(summary.non_trainable(), 2 * (6 + 16));
}

#[test]
fn layers_size_themselves_from_the_input_shape() {
    let Some(gpu) = gpu() else { return };
    let layers = || {
        Sequential::new()
            .add(
                "conv1",
                Conv2d::new(1, 6, (5, 5)).activation(Activation::Relu),
            )
            .add("pool1", max_pool2d(2))
            .add(
                "conv2",
                Conv2d::new(6, 16, (5, 5)).activation(Activation::Relu),
            )
            .add("pool2", max_pool2d(2))
            .add("flatten", Flatten)
            .add("fc1", Linear::lazy(120).activation(Activation::Relu))
            .add("fc2", Linear::lazy(84).activation(Activation::Relu))
            .add("fc3", Linear::lazy(10))
    };
    for device in [Device::Gpu(gpu.clone()), Device::Cpu] {
        let mut model = layers()
            .build_for(&[64, 1, 28, 28], device.clone(), 1)
            .unwrap();
        let mut lenet = lenet5(LeNetOptions::default())
            .unwrap()
            .build(device, 1)
            .unwrap();
        // The same sizes as LeNet-5 built by hand, hence the same seeded weights.
        assert_eq!(model.parameter_count(), lenet.parameter_count());
        let x = random(&[3, 1, 28, 28], 9);
        assert_eq!(model.logits(&x).unwrap(), lenet.logits(&x).unwrap());
    }
    // Without an input shape the lazy layers cannot be built.
    let err = layers().build(Device::Cpu, 1).err().unwrap();
    assert!(err.to_string().contains("build_for"), "{err}");
    // Sizes that do not fit are errors naming the layer, before any data runs.
    let wrong = Sequential::new()
        .add("flatten", Flatten)
        .add("fc", Linear::new(100, 10));
    let err = wrong
        .build_for(&[1, 1, 28, 28], Device::Cpu, 1)
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("\"fc\"") && message.contains("784"),
        "{message}"
    );
    let err = Sequential::new()
        .add("conv", Conv2d::new(3, 4, (3, 3)))
        .build_for(&[1, 1, 28, 28], Device::Cpu, 1)
        .err()
        .unwrap();
    assert!(err.to_string().contains("\"conv\""), "{err}");
    let err = Sequential::new()
        .add("fc", Linear::lazy(3))
        .build_for(&[1, 1, 28, 28], Device::Cpu, 1)
        .err()
        .unwrap();
    assert!(err.to_string().contains("Flatten"), "{err}");
}
