//! Matmul, GPU against CPU (`ndarray::dot`, one thread), at the shapes of the perf report.
//!
//! GPU timing is kernel time: operands stay on the GPU, iterations are queued back to
//! back, and the clock stops after one synchronisation at the end of each batch.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::Array2;
use wgcnn::ops::Matmul;
use wgcnn::{Gpu, Tensor};

const SHAPES: [(usize, usize, usize); 5] = [
    (256, 256, 256),
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (4096, 150, 16),
    (25088, 576, 64),
];

fn filled(rows: usize, cols: usize, seed: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        ((i * 31 + j * 17 + seed) % 97) as f32 / 97.0 - 0.5
    })
}

fn matmul(c: &mut Criterion) {
    let gpu = Gpu::new().expect("the benchmarks need a GPU adapter (lavapipe will do)");
    let mut group = c.benchmark_group("matmul");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500));
    for (m, k, n) in SHAPES {
        let label = format!("{m}x{k}x{n}");
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let a = filled(m, k, 1);
        let b = filled(k, n, 2);

        let ta = Tensor::from_array(&gpu, &a).expect("upload");
        let tb = Tensor::from_array(&gpu, &b).expect("upload");
        let mut out = Tensor::full(&gpu, &[m, n], f32::NAN).expect("output");
        let spec = Matmul::default();
        group.bench_function(BenchmarkId::new("gpu", &label), |bench| {
            bench.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    spec.forward_into(&ta, &tb, None, &mut out).expect("matmul");
                }
                gpu.synchronize().expect("synchronize");
                start.elapsed()
            })
        });
        let result = out.to_array().expect("readback");
        assert!(
            result.iter().all(|x| x.is_finite()),
            "the GPU result has NaNs"
        );

        group.bench_function(BenchmarkId::new("cpu", &label), |bench| {
            bench.iter(|| a.dot(&b))
        });
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
