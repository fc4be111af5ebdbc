//! Every error a caller can cause, produced and its message checked.

use crate::common;

use common::{gpu, random};
use ndarray::{ArrayD, IxDyn};
use wgcnn::ops::{BiasAxis, KernelChoice, Matmul};
use wgcnn::{Error, Gpu, GpuOptions, Tensor};

#[test]
fn no_adapter_explains_how_to_get_lavapipe() {
    let options = GpuOptions {
        adapter_name: Some("no-such-adapter-anywhere".into()),
        ..GpuOptions::from_env().unwrap()
    };
    let err = Gpu::with_options(options).unwrap_err();
    assert!(matches!(err, Error::NoAdapter { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("no-such-adapter-anywhere"), "{message}");
    assert!(
        message.contains("apt-get install -y mesa-vulkan-drivers"),
        "{message}"
    );

    let options = GpuOptions {
        backends: wgcnn::wgpu::Backends::empty(),
        ..GpuOptions::default()
    };
    let err = Gpu::with_options(options).unwrap_err();
    assert!(err.to_string().contains("no GPU adapter found"), "{err}");
}

#[test]
fn shape_mismatches_are_reported() {
    let Some(gpu) = gpu() else { return };
    let a = Tensor::from_array(gpu, &random(&[4, 5], 1)).unwrap();
    let b = Tensor::from_array(gpu, &random(&[6, 3], 2)).unwrap();
    let err = Matmul::default().forward(&a, &b, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("inner dimensions differ: op(A) is 4×5"),
        "{err}"
    );

    let a3 = Tensor::from_array(gpu, &random(&[2, 4, 5], 3)).unwrap();
    let b3 = Tensor::from_array(gpu, &random(&[3, 5, 2], 4)).unwrap();
    let err = Matmul::default().forward(&a3, &b3, None).unwrap_err();
    assert!(err.to_string().contains("batch sizes differ"), "{err}");

    let b_ok = Tensor::from_array(gpu, &random(&[5, 2], 5)).unwrap();
    let wrong_bias = Tensor::from_array(gpu, &random(&[3], 6)).unwrap();
    let spec = Matmul {
        bias: BiasAxis::PerColumn,
        ..Matmul::default()
    };
    let err = spec.forward(&a, &b_ok, Some(&wrong_bias)).unwrap_err();
    assert!(
        err.to_string()
            .contains("expects a 1-D bias of length Some(2)"),
        "{err}"
    );
    let err = spec.forward(&a, &b_ok, None).unwrap_err();
    assert!(err.to_string().contains("got None"), "{err}");

    let rank4 = Tensor::from_array(gpu, &random(&[1, 1, 4, 5], 7)).unwrap();
    let err = Matmul::default().forward(&rank4, &b_ok, None).unwrap_err();
    assert!(err.to_string().contains("must be 2-D or 3-D"), "{err}");

    let mut wrong_out = Tensor::full(gpu, &[4, 3], 0.0).unwrap();
    let err = Matmul::default()
        .forward_into(&a, &b_ok, None, &mut wrong_out)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("output is [4, 3], the product is [4, 2]"),
        "{err}"
    );

    let cpu_err = wgcnn::cpu::matmul(
        &Matmul::default(),
        &random(&[4, 5], 1).view(),
        &random(&[6, 3], 2).view(),
        None,
    );
    assert!(matches!(cpu_err, Err(Error::ShapeMismatch { .. })));
}

#[test]
fn empty_dimensions_are_rejected() {
    let Some(gpu) = gpu() else { return };
    let empty = ArrayD::<f32>::zeros(IxDyn(&[3, 0]));
    let err = Tensor::from_array(gpu, &empty).unwrap_err();
    assert!(
        matches!(err, Error::EmptyDimension { axis: 1, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("dimension 1 of shape [3, 0] is zero"),
        "{err}"
    );
    let err = Matmul::default().shape(&[0, 4], &[4, 4], None).unwrap_err();
    assert!(err.to_string().contains("is zero"), "{err}");
}

#[test]
fn tensors_beyond_the_device_limits_are_refused_before_allocating() {
    let Some(gpu) = gpu() else { return };
    let limit = gpu.limits().max_storage_buffer_binding_size;
    let elements = (limit / 4 + 1) as usize;
    let err = Tensor::full(gpu, &[elements], 1.0).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("{} bytes", elements * 4)),
        "{message}"
    );
    assert!(
        message.contains("max_storage_buffer_binding_size"),
        "{message}"
    );
    assert!(message.contains(&limit.to_string()), "{message}");

    let err = Tensor::full(gpu, &[usize::MAX / 2, 4], 1.0).unwrap_err();
    assert!(err.to_string().contains("more elements than fit"), "{err}");
}

/// A context whose buffers are capped (`GpuOptions::buffer_limit`) asks the device for no
/// more, and refuses a tensor past the cap as it would one past the adapter's own limit; a
/// cap too small to run the kernels' parameter buffers is an error that says so.
#[test]
fn a_buffer_limit_caps_tensors_and_too_small_a_cap_is_refused() {
    let Some(gpu) = common::capped_gpu(1 << 20) else {
        return;
    };
    assert_eq!(gpu.limits().max_storage_buffer_binding_size, 1 << 20);
    assert_eq!(gpu.limits().max_buffer_size, 1 << 20);
    let fits = Tensor::from_array(&gpu, &random(&[1 << 18], 3)).unwrap();
    assert_eq!(fits.to_array().unwrap(), random(&[1 << 18], 3));
    let err = Tensor::full(&gpu, &[(1 << 18) + 1], 1.0).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("of 1048576 bytes"), "{err}");

    let options = GpuOptions {
        buffer_limit: Some((1 << 20) - 1),
        ..common::options()
    };
    let err = Gpu::with_options(options).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("buffer_limit"), "{message}");
    assert!(
        message.contains("1048576 bytes (1 MiB) or more"),
        "{message}"
    );
}

#[test]
fn the_subgroup_kernel_needs_subgroups() {
    let Some(gpu) = gpu() else { return };
    let spec = Matmul {
        kernel: KernelChoice::Subgroup,
        ..Matmul::default()
    };
    let shape = spec.shape(&[2, 2], &[2, 2], None).unwrap();
    match gpu.fixed_subgroup_size() {
        Some(_) => assert!(spec.plan(gpu, &shape).is_ok()),
        None => {
            let err = spec.plan(gpu, &shape).unwrap_err();
            assert!(
                err.to_string().contains("subgroups of a fixed size"),
                "{err}"
            );
        }
    }
}

#[test]
fn a_lost_device_turns_into_errors_not_panics() {
    let Some(_) = gpu() else { return };
    // A context of its own, since it is destroyed.
    let gpu = common::new_gpu();
    let a = Tensor::from_array(&gpu, &random(&[3, 3], 1)).unwrap();
    gpu.simulate_device_loss();
    let err = Matmul::default().forward(&a, &a, None).unwrap_err();
    assert!(matches!(err, Error::DeviceLost { .. }), "{err:?}");
    assert!(err.to_string().contains("create a new Gpu"), "{err}");
    assert!(a.to_array().is_err());
    assert!(Tensor::full(&gpu, &[2], 0.0).is_err());
    assert!(matches!(gpu.synchronize(), Err(Error::DeviceLost { .. })));
    // A new context works.
    let fresh = common::new_gpu();
    let b = Tensor::from_array(&fresh, &random(&[3, 3], 2)).unwrap();
    let y = Matmul::default().forward(&b, &b, None).unwrap();
    assert_eq!(y.to_array().unwrap().shape(), [3, 3]);
}

#[test]
fn tensors_from_two_contexts_do_not_mix() {
    let Some(shared) = gpu() else { return };
    let other = common::new_gpu();
    let a = Tensor::from_array(shared, &random(&[2, 2], 1)).unwrap();
    let b = Tensor::from_array(&other, &random(&[2, 2], 2)).unwrap();
    let err = Matmul::default().forward(&a, &b, None).unwrap_err();
    assert!(err.to_string().contains("different Gpu contexts"), "{err}");
}

#[test]
fn an_op_on_values_of_two_devices_is_an_error_naming_the_fix() {
    let Some(gpu) = gpu() else { return };
    let on_gpu = |shape: &[usize], seed| {
        wgcnn::Value::from(Tensor::from_array(gpu, &random(shape, seed)).unwrap())
    };
    let on_cpu = |shape: &[usize], seed| wgcnn::Value::from(random(shape, seed));
    let spec = wgcnn::ops::Conv2d::default();
    let bn = wgcnn::ops::BatchNorm2d::default();
    let outcomes = [
        ("add", on_gpu(&[2, 3], 1).add(&on_cpu(&[2, 3], 2)).err()),
        (
            "add (cpu first)",
            on_cpu(&[2, 3], 1).add(&on_gpu(&[2, 3], 2)).err(),
        ),
        (
            "linear",
            on_cpu(&[2, 3], 3)
                .linear(&on_gpu(&[4, 3], 4), None, wgcnn::Activation::None)
                .err(),
        ),
        (
            "conv2d",
            on_gpu(&[1, 1, 5, 5], 5)
                .conv2d(&spec, &on_cpu(&[2, 1, 3, 3], 6), None)
                .err(),
        ),
        (
            "batch_norm_eval",
            on_gpu(&[2, 3, 4, 4], 7)
                .batch_norm_eval(
                    &bn,
                    [&on_gpu(&[3], 8), &on_cpu(&[3], 9)],
                    &on_gpu(&[3], 10),
                    &on_gpu(&[3], 11),
                )
                .err(),
        ),
    ];
    for (op, err) in outcomes {
        let err = err.unwrap_or_else(|| panic!("{op} ran on values of two devices"));
        let message = err.to_string();
        assert!(
            message.contains("upload every input with the model's Device"),
            "{op}: {message}"
        );
    }
}

#[test]
fn shape_mismatches_carry_their_shapes() {
    let spec = wgcnn::ops::Conv2d::default();
    let (x, w) = (random(&[1, 3, 8, 8], 1), random(&[4, 2, 3, 3], 2));
    let err = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), None).unwrap_err();
    let Error::ShapeMismatch { op, shapes, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*op, "conv2d");
    assert_eq!(shapes, &[vec![1, 3, 8, 8], vec![4, 2, 3, 3]]);

    // A layer's error names the node and keeps the shapes.
    let mut model = wgcnn::nn::Sequential::new()
        .add("fc", wgcnn::nn::Linear::new(6, 2))
        .build(wgcnn::Device::Cpu, 1)
        .unwrap();
    let err = model
        .forward(wgcnn::Value::from(random(&[2, 5], 3)), wgcnn::Mode::Eval)
        .unwrap_err();
    let Error::ShapeMismatch { shapes, detail, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(detail.contains("\"fc\""), "{detail}");
    assert_eq!(shapes, &[vec![2, 5], vec![2, 6]]);
}

/// Each of these used to be reported by its symptom (two matrix shapes in `fc1`, thirty
/// unexpected names, "dimension 0 of shape [0]"); each message now names the fix.
#[test]
fn messages_name_the_fix() {
    use wgcnn::nn::{LeNetOptions, lenet5};
    use wgcnn::train::{Checkpoint, train_step};
    use wgcnn::{Device, Mode, Optimizer, Value};
    let lenet = || {
        lenet5(LeNetOptions::default())
            .unwrap()
            .build(Device::Cpu, 1)
            .unwrap()
    };

    // An image of another size than the model was written for.
    let mut model = lenet();
    let err = model
        .forward(Value::from(random(&[2, 1, 32, 32], 1)), Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the model expects input [N, 1, 28, 28]"),
        "{err}"
    );
    assert!(err.contains("[2, 1, 32, 32]"), "{err}");

    // An empty batch.
    let err = model
        .forward(Value::from(random(&[0, 1, 28, 28], 1)), Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(err.contains("an empty batch"), "{err}");

    // A weight saved as integers.
    let mut checkpoint = model.checkpoint().unwrap();
    let weight = checkpoint.tensors.remove(0);
    let integers = vec![(weight.0.clone(), weight.1.mapv(|v| v as i64))];
    let as_integers = Checkpoint::with_integers(checkpoint.tensors.clone(), integers).unwrap();
    let err = model.load_checkpoint(&as_integers).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{:?} is an integer tensor", weight.0)) && err.contains("float32"),
        "{err}"
    );
    assert!(!err.contains("unexpected"), "{err}");

    // A training checkpoint where the weights alone are expected.
    let x = random(&[4, 1, 28, 28], 2);
    let mut adam = model.optimizer(Optimizer::adam(1e-3)).unwrap();
    train_step(
        &mut model,
        &mut adam,
        |d| d.upload(x.clone()),
        &[0, 1, 2, 3],
    )
    .unwrap();
    let training = model.training_checkpoint(&adam).unwrap();
    let err = lenet().load_checkpoint(&training).unwrap_err().to_string();
    assert!(
        err.contains("training checkpoint") && err.contains("load_training"),
        "{err}"
    );

    // Resuming with another rule than the run's.
    let mut fresh = lenet();
    let mut sgd = fresh.optimizer(Optimizer::sgd(0.1).momentum(0.9)).unwrap();
    let err = fresh
        .load_training_checkpoint(&mut sgd, &training)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the state of Adam or AdamW") && err.contains("(SGD with momentum)"),
        "{err}"
    );
}

/// An activation too large for the device names the layer that would have made it.
#[test]
fn an_output_too_large_for_the_device_names_its_layer() {
    let Some(gpu) = gpu() else { return };
    let mut model = wgcnn::nn::Sequential::new()
        .add(
            "wide",
            wgcnn::nn::Conv2d::new(1, 1, (1, 1))
                .padding(wgcnn::Padding::Explicit(1 << 14, 1 << 14)),
        )
        .build(wgcnn::Device::Gpu(gpu.clone()), 1)
        .unwrap();
    let x = wgcnn::Value::from(Tensor::from_array(gpu, &random(&[1, 1, 8, 8], 1)).unwrap());
    let err = model.forward(x, wgcnn::Mode::Eval).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("in node \"wide\""), "{err}");
}
