//! The performance report: each op on the GPU and on the CPU reference, medians of several
//! synchronised runs after a warm-up.
//!
//! `cargo run --release --example perf -- [--quick] [--json] [--filter TEXT]`

use std::time::Instant;

use ndarray::{Array2, ArrayD, IxDyn};
use wgcnn::{Gpu, Matmul, Tensor};

struct Options {
    quick: bool,
    json: bool,
    filter: Option<String>,
}

struct Row {
    op: String,
    shape: String,
    kernel: String,
    gpu_ms: f64,
    cpu_ms: f64,
    flops: f64,
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn random(shape: &[usize], seed: u32) -> ArrayD<f32> {
    // A cheap hash fill: benchmarks need non-trivial data, not statistical quality.
    let mut state = seed.wrapping_mul(0x9E37_79B9) | 1;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 8) as f32 / 8_388_608.0 - 1.0
    })
}

/// One matmul shape: M×K times K×N.
fn matmul_row(
    gpu: &Gpu,
    options: &Options,
    (m, k, n): (usize, usize, usize),
) -> wgcnn::Result<Row> {
    let runs = if options.quick { 3 } else { 9 };
    let a = random(&[m, k], 1);
    let b = random(&[k, n], 2);
    let spec = Matmul::default();
    let ta = Tensor::from_array(gpu, &a)?;
    let tb = Tensor::from_array(gpu, &b)?;
    let mut out = Tensor::full(gpu, &[m, n], 0.0)?;
    // Warm-up: compiles the pipeline and lets the driver JIT the kernel.
    let plan = spec.forward_into(&ta, &tb, None, &mut out)?;
    gpu.synchronize()?;
    let mut failure = None;
    let gpu_ms = median_ms(runs, || {
        let result = spec
            .forward_into(&ta, &tb, None, &mut out)
            .and_then(|_| gpu.synchronize());
        if let Err(e) = result {
            failure = Some(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let a2: Array2<f32> = a
        .into_dimensionality()
        .map_err(|e| wgcnn::Error::Readback(e.to_string()))?;
    let b2: Array2<f32> = b
        .into_dimensionality()
        .map_err(|e| wgcnn::Error::Readback(e.to_string()))?;
    let cpu_ms = median_ms(runs, || {
        std::hint::black_box(a2.dot(&b2));
    });
    Ok(Row {
        op: "matmul".into(),
        shape: format!("{m}x{k}x{n}"),
        kernel: plan.to_string(),
        gpu_ms,
        cpu_ms,
        flops: 2.0 * (m * k * n) as f64,
    })
}

fn main() -> wgcnn::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = Options {
        quick: args.iter().any(|a| a == "--quick"),
        json: args.iter().any(|a| a == "--json"),
        filter: args
            .iter()
            .position(|a| a == "--filter")
            .and_then(|i| args.get(i + 1).cloned()),
    };
    let gpu = Gpu::new()?;
    let info = gpu.adapter_info();
    if !options.json {
        println!(
            "adapter: {} ({:?}, {:?})",
            info.name, info.backend, info.device_type
        );
        println!(
            "{:<10} {:<16} {:<18} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "op", "shape", "kernel", "gpu_ms", "cpu_ms", "gpu_GF/s", "cpu_GF/s", "gpu/cpu"
        );
    }
    let shapes = [
        (256, 256, 256),
        (1024, 1024, 1024),
        (2048, 2048, 2048),
        (4096, 150, 16),
        (25088, 576, 64),
    ];
    for shape in shapes {
        let label = format!("matmul {}x{}x{}", shape.0, shape.1, shape.2);
        if options
            .filter
            .as_ref()
            .is_some_and(|f| !label.contains(f.as_str()))
        {
            continue;
        }
        let row = matmul_row(&gpu, &options, shape)?;
        print_row(&options, &row, &info.name);
    }
    Ok(())
}

fn print_row(options: &Options, row: &Row, adapter: &str) {
    let gpu_gflops = row.flops / row.gpu_ms / 1e6;
    let cpu_gflops = row.flops / row.cpu_ms / 1e6;
    if options.json {
        println!(
            "{{\"op\":\"{}\",\"shape\":\"{}\",\"kernel\":\"{}\",\"gpu_ms\":{:.4},\"cpu_ms\":{:.4},\"gpu_gflops\":{:.2},\"cpu_gflops\":{:.2},\"adapter\":\"{}\"}}",
            row.op, row.shape, row.kernel, row.gpu_ms, row.cpu_ms, gpu_gflops, cpu_gflops, adapter
        );
    } else {
        println!(
            "{:<10} {:<16} {:<18} {:>10.3} {:>10.3} {:>10.2} {:>10.2} {:>8.2}",
            row.op,
            row.shape,
            row.kernel,
            row.gpu_ms,
            row.cpu_ms,
            gpu_gflops,
            cpu_gflops,
            row.cpu_ms / row.gpu_ms
        );
    }
}
