//! CNN ops, forward and forward+backward, GPU against the CPU reference, at the shapes of
//! the perf report (`examples/perf.rs`). GPU runs end with a synchronisation.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ndarray::{Array1, ArrayD, IxDyn};
use wgcnn::ops::batch_norm::batches_state;
use wgcnn::ops::{BatchNorm2d, Conv2d, Pool2d};
use wgcnn::{Gpu, Padding, Tensor};

fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
    let mut i = seed;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        ((i >> 8) % 1000) as f32 / 500.0 - 1.0
    })
}

fn conv(c: &mut Criterion, gpu: &Gpu) {
    let mut group = c.benchmark_group("conv2d");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300));
    for [n, ci, h, o, k, pad] in [
        [64, 1, 28, 6, 5, 0],
        [64, 6, 12, 16, 5, 0],
        [8, 64, 56, 64, 3, 1],
    ] {
        let spec = Conv2d {
            padding: Padding::Explicit(pad, pad),
            ..Conv2d::default()
        };
        let (x, w, b) = (
            filled(&[n, ci, h, h], 1),
            filled(&[o, ci, k, k], 2),
            filled(&[o], 3),
        );
        let dy = filled(
            &spec
                .shape(x.shape(), w.shape(), None)
                .expect("shape")
                .output(),
            4,
        );
        let up = |a: &ArrayD<f32>| Tensor::from_array(gpu, a).expect("upload");
        let (tx, tw, tb, tdy) = (up(&x), up(&w), up(&b), up(&dy));
        let label = format!("N{n}_{ci}to{o}_{h}x{h}_k{k}");
        group.bench_function(BenchmarkId::new("gpu_fwd", &label), |bench| {
            bench.iter(|| {
                spec.forward(&tx, &tw, Some(&tb)).expect("conv");
                gpu.synchronize().expect("sync");
            })
        });
        group.bench_function(BenchmarkId::new("gpu_fwd_bwd", &label), |bench| {
            bench.iter(|| {
                let (_, saved) = spec.forward_saving(&tx, &tw, Some(&tb)).expect("conv");
                spec.backward_saved(&tx, &tw, &tdy, saved.as_ref())
                    .expect("conv backward");
                gpu.synchronize().expect("sync");
            })
        });
        group.bench_function(BenchmarkId::new("cpu_fwd", &label), |bench| {
            bench.iter(|| {
                wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), Some(&b.view())).expect("conv")
            })
        });
        group.bench_function(BenchmarkId::new("cpu_fwd_bwd", &label), |bench| {
            bench.iter(|| {
                wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), Some(&b.view())).expect("conv");
                wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view())
                    .expect("conv backward")
            })
        });
    }
    group.finish();
}

fn pool_and_norm(c: &mut Criterion, gpu: &Gpu) {
    let mut group = c.benchmark_group("pool_norm");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300));
    let pool = Pool2d::max((2, 2));
    let x = filled(&[64, 6, 24, 24], 5);
    let dy = filled(&[64, 6, 12, 12], 6);
    let (tx, tdy) = (
        Tensor::from_array(gpu, &x).expect("upload"),
        Tensor::from_array(gpu, &dy).expect("upload"),
    );
    group.bench_function("max_pool2d/gpu_fwd_bwd", |bench| {
        bench.iter(|| {
            let pooled = pool.forward(&tx).expect("pool");
            pool.backward(x.shape(), &tdy, pooled.argmax.as_ref())
                .expect("pool backward");
            gpu.synchronize().expect("sync");
        })
    });
    group.bench_function("max_pool2d/cpu_fwd_bwd", |bench| {
        bench.iter(|| {
            let pooled = wgcnn::cpu::pool2d(&pool, &x.view()).expect("pool");
            let argmax = pooled.argmax.as_ref().map(|a| a.view());
            wgcnn::cpu::pool2d_backward(&pool, x.shape(), &dy.view(), argmax.as_ref())
                .expect("pool backward")
        })
    });

    let bn = BatchNorm2d::default();
    let x = filled(&[8, 64, 56, 56], 7);
    let (ones, zeros) = (Array1::from_elem(64, 1.0f32), Array1::from_elem(64, 0.0f32));
    let up = |a: &Array1<f32>| Tensor::from_array(gpu, a).expect("upload");
    let (tx, gamma, beta, mean, var) = (
        Tensor::from_array(gpu, &x).expect("upload"),
        up(&ones),
        up(&zeros),
        up(&zeros),
        up(&ones),
    );
    let batches = Tensor::from_array(gpu, &batches_state(0)).expect("upload");
    group.bench_function("batch_norm2d/gpu_fwd", |bench| {
        bench.iter(|| {
            bn.forward_train(&tx, &gamma, &beta, &mean, &var, &batches)
                .expect("batch norm");
            gpu.synchronize().expect("sync");
        })
    });
    let tdy = Tensor::from_array(gpu, &filled(&[8, 64, 56, 56], 8)).expect("upload");
    group.bench_function("batch_norm2d/gpu_fwd_bwd", |bench| {
        bench.iter(|| {
            let out = bn
                .forward_train(&tx, &gamma, &beta, &mean, &var, &batches)
                .expect("batch norm");
            bn.backward(&tx, [&gamma, &beta], [&out.mean, &out.rstd], &tdy, true)
                .expect("batch norm backward");
            gpu.synchronize().expect("sync");
        })
    });
    group.bench_function("batch_norm2d/cpu_fwd", |bench| {
        bench.iter(|| {
            wgcnn::cpu::batch_norm_train(
                &bn,
                &x.view(),
                &ones.view(),
                &zeros.view(),
                &zeros.view(),
                &ones.view(),
                0,
            )
            .expect("batch norm")
        })
    });
    group.finish();
}

/// A whole LeNet-5 training step at batch 64 (`train_step_lenet_b64` in the perf report).
fn train_step(c: &mut Criterion, gpu: &Gpu) {
    use wgcnn::nn::{LeNetOptions, lenet5};
    use wgcnn::{Device, Optimizer};
    let mut group = c.benchmark_group("train_step_lenet_b64");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500));
    let x = filled(&[64, 1, 28, 28], 9);
    let labels: Vec<usize> = (0..64).map(|i| i % 10).collect();
    for (name, device) in [("gpu", Device::Gpu(gpu.clone())), ("cpu", Device::Cpu)] {
        let mut model = lenet5(LeNetOptions::default())
            .expect("lenet")
            .build(device, 1)
            .expect("build");
        let mut opt = model.optimizer(Optimizer::sgd(0.01)).expect("sgd");
        group.bench_function(name, |bench| {
            bench.iter(|| {
                wgcnn::train::train_step(&mut model, &mut opt, |d| d.upload(x.clone()), &labels)
                    .expect("step");
                gpu.synchronize().expect("sync");
            })
        });
    }
    group.finish();
}

fn ops(c: &mut Criterion) {
    let gpu = Gpu::new().expect("the benchmarks need a GPU adapter (lavapipe will do)");
    conv(c, &gpu);
    pool_and_norm(c, &gpu);
    train_step(c, &gpu);
}

criterion_group!(benches, ops);
criterion_main!(benches);
