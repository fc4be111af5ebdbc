//! Recorded steps: many ops, one submit, identical results, bounded memory.

use crate::common;

use common::{gpu, random};
use wgcnn::ops::{Conv2d, Pool2d};
use wgcnn::{Activation, Gpu, Tensor};

/// conv → relu → (a copy) → max pool, then the backward chain: 20-odd kernels, which a
/// recording puts into one compute pass until the copy ends it.
fn step(x: &Tensor, w: &Tensor, b: &Tensor) -> wgcnn::Result<(Tensor, Tensor)> {
    let conv = Conv2d::default();
    let pool = Pool2d::max((2, 2));
    let c = conv.forward(x, w, Some(b))?;
    let r = Activation::Relu.forward(&c)?.copy_as(c.shape())?;
    let p = pool.forward(&r)?;
    let dr = pool.backward(r.shape(), &p.y, p.argmax.as_ref())?;
    let dc = Activation::Relu.backward(&c, &r, &dr)?;
    let g = conv.backward(x, w, &dc)?;
    Ok((p.y, g.weight))
}

/// The input, weight and bias of [`step`] on `gpu`.
fn step_inputs(gpu: &Gpu) -> (Tensor, Tensor, Tensor) {
    let up = |a: &ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
    (
        up(&random(&[4, 2, 12, 12], 1)),
        up(&random(&[3, 2, 3, 3], 2)),
        up(&random(&[3], 3)),
    )
}

#[test]
fn a_recorded_step_is_one_submit_with_the_same_results() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let (x, w, b) = step_inputs(&gpu);
    let (y_plain, dw_plain) = step(&x, &w, &b).unwrap();
    let before = gpu.submissions();
    let (y, dw) = gpu.record(|| step(&x, &w, &b)).unwrap();
    assert_eq!(
        gpu.submissions(),
        before + 1,
        "the whole step is one submit"
    );
    assert_eq!(y.to_array().unwrap(), y_plain.to_array().unwrap());
    assert_eq!(dw.to_array().unwrap(), dw_plain.to_array().unwrap());
}

/// `Gpu::dispatches` counts kernels, not copies or submits: one fill is one kernel, and the
/// same step records the same kernels every time, recorded or not.
#[test]
fn dispatches_count_the_kernels_recorded() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let before = gpu.dispatches();
    let filled = Tensor::full(&gpu, &[1000], 0.5).unwrap();
    assert_eq!(gpu.dispatches(), before + 1);
    let _copy = filled.copy_as(&[10, 100]).unwrap();
    assert_eq!(gpu.dispatches(), before + 1, "a copy is no kernel");
    let (x, w, b) = step_inputs(&gpu);
    // The first step also runs the operand-read calibration's kernels (CPU adapters).
    step(&x, &w, &b).unwrap();
    let before = gpu.dispatches();
    step(&x, &w, &b).unwrap();
    let plain = gpu.dispatches() - before;
    assert!(
        plain >= 6,
        "{plain} kernels for conv, relu, pool and their backward"
    );
    let before = gpu.dispatches();
    gpu.record(|| step(&x, &w, &b)).unwrap();
    assert_eq!(gpu.dispatches() - before, plain);
}

#[test]
fn readback_inside_a_recording_sees_the_recorded_work() {
    let Some(_) = gpu() else { return };
    // Contexts of their own: a recording captures every op on its Gpu, other tests' too.
    let gpu = &common::new_gpu();
    let x = random(&[2, 3], 4);
    let values = gpu
        .record(|| {
            let y = Activation::Relu.forward(&Tensor::from_array(gpu, &x)?)?;
            y.to_array()
        })
        .unwrap();
    assert_eq!(values, x.mapv(|v| v.max(0.0)));
}

#[test]
fn memory_stays_flat_over_many_recorded_steps() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let up = |a: &ndarray::ArrayD<f32>| Tensor::from_array(&gpu, a).unwrap();
    let (x, w, b) = (
        up(&random(&[2, 2, 10, 10], 5)),
        up(&random(&[4, 2, 3, 3], 6)),
        up(&random(&[4], 7)),
    );
    let run = || gpu.record(|| step(&x, &w, &b).map(drop)).unwrap();
    run();
    run();
    let warm = gpu.pool_stats();
    for _ in 0..50 {
        run();
    }
    let after = gpu.pool_stats();
    assert_eq!(
        after.allocations, warm.allocations,
        "no new buffers after warm-up: {warm:?} → {after:?}"
    );
    assert_eq!(after.live_bytes, warm.live_bytes);
    assert!(after.reuses > warm.reuses);
}

#[test]
fn a_nested_recording_joins_the_outer_one_and_threads_record_apart() {
    let Some(_) = gpu() else { return };
    let gpu = &common::new_gpu();
    let data = random(&[4, 37], 1);
    let x = Tensor::from_array(gpu, &data).unwrap();
    let before = gpu.submissions();
    let y = gpu
        .record(|| {
            let a = Activation::Relu.forward(&x)?;
            gpu.record(|| Activation::Tanh.forward(&a))
        })
        .unwrap();
    assert_eq!(gpu.submissions() - before, 1, "one submit for both levels");
    let want = data.mapv(|v| v.max(0.0).tanh());
    assert!(common::max_abs_diff(&y.to_array().unwrap(), &want) < 1e-6);

    // Two threads recording at once on one Gpu: each its own encoder, both results right.
    std::thread::scope(|scope| {
        for seed in 0..2u64 {
            scope.spawn(move || {
                let data = random(&[3, 50], 10 + seed);
                let x = Tensor::from_array(gpu, &data).unwrap();
                for _ in 0..20 {
                    let y = gpu
                        .record(|| {
                            let a = Activation::Sigmoid.forward(&x)?;
                            Activation::Relu.forward(&a)
                        })
                        .unwrap();
                    let want = data.mapv(|v| 1.0 / (1.0 + (-v).exp()));
                    assert!(common::max_abs_diff(&y.to_array().unwrap(), &want) < 1e-6);
                }
            });
        }
    });
}

#[test]
fn every_recorded_kernel_keeps_its_own_parameters() {
    // Kernel parameters are staged per thread and written at the submit: 3,000 dispatches
    // with distinct parameters span several staging chunks, with a readback (an early
    // submit) midway, and each must see its own.
    let Some(gpu) = gpu() else { return };
    let x = Tensor::from_array(gpu, &random(&[5, 7], 4).mapv(|v| v - 0.5)).unwrap();
    let slopes: Vec<f32> = (0..3000).map(|i| i as f32 / 3000.0).collect();
    let outputs = gpu
        .record(|| {
            let mut outputs = Vec::new();
            for (i, &slope) in slopes.iter().enumerate() {
                outputs.push(Activation::LeakyRelu(slope).forward(&x)?);
                if i == 1500 {
                    outputs[0].to_array()?;
                }
            }
            Ok(outputs)
        })
        .unwrap();
    let xs = x.to_array().unwrap();
    for (i, (y, &slope)) in outputs.iter().zip(&slopes).enumerate().step_by(7) {
        let want = xs.mapv(|v| Activation::LeakyRelu(slope).apply(v));
        assert_eq!(y.to_array().unwrap(), want, "kernel {i} (slope {slope})");
    }
}

#[test]
fn calibration_inside_a_recording_leaves_its_kernels_intact() {
    // A fresh context's first matmul calibrates (and submits) inside the recording.
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let x = Tensor::from_array(&gpu, &random(&[9, 12], 5).mapv(|v| v - 0.5)).unwrap();
    let w = Tensor::from_array(&gpu, &random(&[12, 6], 6)).unwrap();
    let (a, c, b) = gpu
        .record(|| {
            let a = Activation::LeakyRelu(0.25).forward(&x)?;
            let c = wgcnn::ops::Matmul::default().forward(&x, &w, None)?;
            let b = Activation::LeakyRelu(0.5).forward(&x)?;
            Ok((a, c, b))
        })
        .unwrap();
    let xs = x.to_array().unwrap();
    for (y, slope) in [(a, 0.25), (b, 0.5)] {
        let want = xs.mapv(|v| Activation::LeakyRelu(slope).apply(v));
        assert_eq!(y.to_array().unwrap(), want, "slope {slope}");
    }
    let want = wgcnn::cpu::matmul(
        &wgcnn::ops::Matmul::default(),
        &xs.view(),
        &w.to_array().unwrap().view(),
        None,
    )
    .unwrap();
    assert!(common::max_abs_diff(&c.to_array().unwrap(), &want) < 1e-5);
}

/// Profiling submits each pass on its own and times it, in order, without changing what the
/// step computes; it ends with the closure.
#[test]
fn profiled_passes_are_timed_in_order_with_the_same_results() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let (x, w, b) = step_inputs(&gpu);
    let (y_plain, dw_plain) = gpu.record(|| step(&x, &w, &b)).unwrap();
    let before = gpu.submissions();
    let ((y, dw), passes) = gpu
        .profile_passes(|| gpu.record(|| step(&x, &w, &b)))
        .unwrap();
    let labels: Vec<&str> = passes.iter().map(|p| p.label.as_str()).collect();
    // The convolution first, its filter bank copied within its own pass.
    let kernels: Vec<&str> = labels.iter().copied().filter(|l| *l != "copy").collect();
    assert_eq!(kernels[0], "conv2d direct", "{labels:?}");
    assert!(labels.contains(&"max_forward") && labels.contains(&"conv2d weight gradient"));
    assert!(passes.iter().all(|p| p.ms > 0.0), "{passes:?}");
    assert!(
        gpu.submissions() >= before + passes.len() as u64,
        "each pass is submitted on its own"
    );
    assert_eq!(y.to_array().unwrap(), y_plain.to_array().unwrap());
    assert_eq!(dw.to_array().unwrap(), dw_plain.to_array().unwrap());
    // Profiling has ended: a later step records no times and submits once.
    let before = gpu.submissions();
    gpu.record(|| step(&x, &w, &b)).unwrap();
    assert_eq!(gpu.submissions(), before + 1);
}

/// Profiling with timestamps leaves the step one submit and its results unchanged, and times
/// the same ops, in the same order, as waited passes; it ends with the closure. Where the
/// device has no timestamps inside passes it says so instead.
#[test]
fn profiled_ops_are_timed_in_order_inside_the_steps_own_submit() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let (x, w, b) = step_inputs(&gpu);
    let (y_plain, dw_plain) = gpu.record(|| step(&x, &w, &b)).unwrap();
    if !gpu.can_profile_ops() {
        let refused = gpu.profile_ops(|| Ok(())).unwrap_err();
        assert!(refused.to_string().contains("profile_passes"), "{refused}");
        return;
    }
    let recorded = || {
        let before = gpu.submissions();
        let out = gpu.record(|| step(&x, &w, &b))?;
        assert_eq!(
            gpu.submissions(),
            before + 1,
            "the step is still one submit"
        );
        Ok(out)
    };
    let ((y, dw), ops) = gpu.profile_ops(recorded).unwrap();
    let (_, passes) = gpu
        .profile_passes(|| gpu.record(|| step(&x, &w, &b)))
        .unwrap();
    let labels: Vec<&str> = ops.iter().map(|op| op.label.as_str()).collect();
    let pass_labels: Vec<&str> = passes.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(
        labels, pass_labels,
        "the same ops as the waited passes, in order"
    );
    assert!(
        ops.iter().all(|op| op.ms >= 0.0 && op.start_ms >= 0.0),
        "{ops:?}"
    );
    assert!(
        ops.windows(2)
            .all(|pair| pair[1].start_ms >= pair[0].start_ms),
        "{ops:?}"
    );
    assert!(
        ops.iter()
            .any(|op| op.label == "conv2d direct" && op.ms > 0.0),
        "{ops:?}"
    );
    assert_eq!(y.to_array().unwrap(), y_plain.to_array().unwrap());
    assert_eq!(dw.to_array().unwrap(), dw_plain.to_array().unwrap());
    // Profiling has ended: ops after it are not stamped, and a run without ops has no times.
    gpu.record(|| step(&x, &w, &b)).unwrap();
    assert!(gpu.profile_ops(|| Ok(())).unwrap().1.is_empty());
    // A profile inside another is refused, and the outer one still times its ops.
    let (inner, outer) = gpu
        .profile_ops(|| {
            let inner = gpu.profile_ops(|| Ok(()));
            Tensor::full(&gpu, &[4], 1.0)?;
            Ok(inner)
        })
        .unwrap();
    assert!(inner.unwrap_err().to_string().contains("already"));
    assert_eq!(outer.len(), 1);
}

/// A run of more ops than one query set holds times the first 2,048 and runs every op.
#[test]
fn profiled_ops_past_the_query_set_run_untimed() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    if !gpu.can_profile_ops() {
        return; // the refusal is tested above
    }
    let (filled, ops) = gpu
        .profile_ops(|| {
            gpu.record(|| {
                (0..2_100)
                    .map(|i| Tensor::full(&gpu, &[4], i as f32))
                    .collect::<wgcnn::Result<Vec<_>>>()
            })
        })
        .unwrap();
    assert_eq!(ops.len(), 2_048);
    assert_eq!(filled[2_099].to_array().unwrap()[[3]], 2_099.0);
}

/// A recorded training step that drops more buffers than `recording_hold_bytes` submits what
/// it has between layers and reuses them: the same losses and weights, bit for bit, as
/// steps that are one submit each. A first step, which compiles pipelines, submits at the
/// layers that did either way.
#[test]
fn a_step_holding_too_many_buffers_submits_early_with_the_same_results() {
    use wgcnn::nn::{LeNetOptions, lenet5};
    use wgcnn::train::train_step;
    use wgcnn::{Device, GpuOptions, Optimizer};
    let Some(_) = gpu() else { return };
    let x = random(&[16, 1, 28, 28], 8);
    let labels: Vec<usize> = (0..16).map(|i| i % 10).collect();
    let mut runs = Vec::new();
    for hold in [0, u64::MAX] {
        // Both contexts read operands the same way: a calibration of their own could pick
        // different kernels, whose sums round differently.
        let options = GpuOptions {
            recording_hold_bytes: hold,
            operand_reads: Some(wgcnn::tuning::OperandReads::Storage),
            ..common::options()
        };
        let gpu = Gpu::with_options(options).unwrap();
        let mut model = lenet5(LeNetOptions::default())
            .unwrap()
            .build(Device::Gpu(gpu.clone()), 3)
            .unwrap();
        let mut optimizer = model.optimizer(Optimizer::momentum(0.05, 0.9)).unwrap();
        let mut submits = Vec::new();
        let mut losses = Vec::new();
        for _ in 0..3 {
            let before = gpu.submissions();
            let input = |d: &Device| d.upload(x.clone());
            let out = train_step(&mut model, &mut optimizer, input, &labels).unwrap();
            submits.push(gpu.submissions() - before);
            losses.push(out.loss);
        }
        let losses: Vec<f32> = losses.iter().map(|l| l.scalar().unwrap()).collect();
        let weights: Vec<_> = model
            .state()
            .into_iter()
            .map(|(n, v)| (n, v.to_array().unwrap()))
            .collect();
        runs.push((submits, losses, weights));
    }
    let (early, whole) = (&runs[0], &runs[1]);
    // The first step compiles its pipelines and submits at each layer that did (so that the
    // device compiles one layer's kernels while the host creates the next one's pipelines);
    // the later ones are one submit.
    assert!(
        whole.0[0] > 4,
        "{:?} submits: a first step should split",
        whole.0
    );
    assert_eq!(whole.0[1..], [1, 1], "one submit per step after the first");
    assert!(
        early.0[1..].iter().all(|&n| n > 2),
        "{:?} submits: a step should split at its layers",
        early.0
    );
    assert_eq!(early.1, whole.1, "losses");
    assert_eq!(early.2, whole.2, "weights");
}

/// A step that panics inside a recording leaves the thread able to record: the next step is
/// one submit with the same results as an unrecorded one.
#[test]
fn a_panicking_step_leaves_the_thread_able_to_record() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let (x, w, b) = step_inputs(&gpu);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gpu.record(|| {
            step(&x, &w, &b)?;
            panic!("a bug inside a training step");
            #[allow(unreachable_code)]
            Ok(())
        })
    }));
    assert!(panicked.is_err());
    let (y_plain, dw_plain) = step(&x, &w, &b).unwrap();
    let before = gpu.submissions();
    let (y, dw) = gpu.record(|| step(&x, &w, &b)).unwrap();
    assert_eq!(gpu.submissions(), before + 1, "the next step is one submit");
    assert_eq!(y.to_array().unwrap(), y_plain.to_array().unwrap());
    assert_eq!(dw.to_array().unwrap(), dw_plain.to_array().unwrap());
}

/// `reshaped` views the same buffer under another shape with as many elements (no kernel,
/// no copy, no submit), which lives on while either tensor does; another count is an error.
#[test]
fn reshaped_tensors_share_their_buffer() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let a = random(&[2, 3, 4], 5);
    let t = Tensor::from_array(&gpu, &a).unwrap();
    let before = (gpu.dispatches(), gpu.submissions());
    let r = t.reshaped(&[6, 4]).unwrap();
    assert_eq!((gpu.dispatches(), gpu.submissions()), before);
    assert_eq!(r.shape(), [6, 4]);
    assert!(t.reshaped(&[5, 5]).is_err());
    drop(t);
    let got = r.to_array().unwrap();
    assert_eq!(got.as_slice().unwrap(), a.as_slice().unwrap());
}
