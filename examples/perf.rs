//! The performance report: each op on the GPU and on the CPU reference, medians of several
//! synchronised runs after a warm-up.
//!
//! `cargo run --release --example perf -- [--quick] [--runs N] [--json] [--filter TEXT]
//! [--reads storage|texture] [--kernels portable|cpu] [--profile [--waited|--cold]] [--memory]
//! [--dispatches]`
//! (`--reads` forces how kernels read large operands instead of the adapter's calibration,
//! `--kernels` a kernel family whatever the adapter's type; `--profile` prints where
//! a LeNet training step's device time goes (ResNet-20's with `--filter resnet20`), op by op
//! from device timestamps (`--waited`: pass by pass, each waited for; `--cold`: the first step
//! alone, each op's time with its kernel's compiling), `--memory` the peak bytes of
//! ResNet steps, `--dispatches` the kernels and submits per training step, each instead of
//! the table).

use std::time::Instant;

use clap::Parser;

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use wgcnn::ops::batch_norm::batches_state;
use wgcnn::ops::{BatchNorm2d, Conv2d, KernelChoice, LayerNorm, Matmul, Pool2d};
use wgcnn::tuning::{KernelFamily, OperandReads, Tuning};
use wgcnn::{Device, Gpu, GpuOptions, Padding, Result, Tensor};

/// One benchmarked operation: GPU and CPU runs of the same work.
struct Case<'a> {
    op: &'static str,
    shape: String,
    kernel: String,
    flops: f64,
    gpu: Box<dyn FnMut() -> Result<()> + 'a>,
    cpu: Box<dyn FnMut() -> Result<()> + 'a>,
}

/// A row's label, "op shape": what `--filter` looks for.
fn row_label(op: &str, shape: &str) -> String {
    format!("{op} {shape}")
}

impl Case<'_> {
    /// A row `--filter` leaves out: its label, nothing to run.
    fn label_only(op: &'static str, shape: &str) -> Self {
        Case {
            op,
            shape: shape.to_string(),
            kernel: String::new(),
            flops: 0.0,
            gpu: Box::new(|| Ok(())),
            cpu: Box::new(|| Ok(())),
        }
    }
}

fn median_ms(runs: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn random(shape: &[usize], seed: u32) -> ArrayD<f32> {
    // A cheap xorshift fill: benchmarks need non-trivial data, not statistical quality.
    let mut state = seed.wrapping_mul(0x9E37_79B9) | 1;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 8) as f32 / 8_388_608.0 - 1.0
    })
}

fn matmul_case(
    gpu: &Gpu,
    (m, k, n): (usize, usize, usize),
    kernel: KernelChoice,
) -> Result<Case<'_>> {
    let a = random(&[m, k], 1);
    let b = random(&[k, n], 2);
    let (ta, tb) = (Tensor::from_array(gpu, &a)?, Tensor::from_array(gpu, &b)?);
    let mut out = Tensor::full(gpu, &[m, n], 0.0)?;
    let spec = Matmul {
        kernel,
        ..Matmul::default()
    };
    let kernel = spec
        .plan(gpu, &spec.shape(&[m, k], &[k, n], None)?)?
        .to_string();
    let a2: Array2<f32> = a
        .into_dimensionality()
        .map_err(|e| wgcnn::Error::Readback(e.to_string()))?;
    let b2: Array2<f32> = b
        .into_dimensionality()
        .map_err(|e| wgcnn::Error::Readback(e.to_string()))?;
    Ok(Case {
        op: "matmul",
        shape: format!("{m}x{k}x{n}"),
        kernel,
        flops: 2.0 * (m * k * n) as f64,
        gpu: Box::new(move || spec.forward_into(&ta, &tb, None, &mut out).map(drop)),
        cpu: Box::new(move || {
            std::hint::black_box(a2.dot(&b2));
            Ok(())
        }),
    })
}

/// The forward and forward + backward rows of one convolution. Rows that `filter` leaves
/// out are labels only: planning a row's layer would spend the context's tuning budget
/// on a shape that never runs (`perf --filter resnet20` with no cache file measured the
/// table's convolutions, not ResNet-20's).
fn conv_cases<'a>(
    gpu: &'a Gpu,
    [n, c, h, o, k, pad, groups, stride]: [usize; 8],
    filter: Option<&str>,
) -> Result<Vec<Case<'a>>> {
    let spec = Conv2d {
        stride: (stride, stride),
        padding: Padding::Explicit(pad, pad),
        groups,
        ..Conv2d::default()
    };
    let strided = if stride > 1 {
        format!(" s{stride}")
    } else {
        String::new()
    };
    let grouped = match groups {
        1 => String::new(),
        g if g == c => " depthwise".into(),
        g => format!(" groups{g}"),
    };
    let label = format!("N{n} {c}->{o} {h}x{h} k{k} p{pad}{strided}{grouped}");
    let ops = ["conv2d_fwd", "conv2d_fwd_bwd"];
    if filter.is_some_and(|f| ops.iter().all(|op| !row_label(op, &label).contains(f))) {
        return Ok(ops.map(|op| Case::label_only(op, &label)).into());
    }
    let x = random(&[n, c, h, h], 3);
    let w = random(&[o, c / groups, k, k], 4);
    let b = random(&[o], 5);
    let shape = spec.shape(x.shape(), w.shape(), Some(b.shape()))?;
    let dy = random(&shape.output(), 6);
    let plan = spec.plan(gpu, &shape)?;
    let (tx, tw, tb, tdy) = (
        Tensor::from_array(gpu, &x)?,
        Tensor::from_array(gpu, &w)?,
        Tensor::from_array(gpu, &b)?,
        Tensor::from_array(gpu, &dy)?,
    );
    let tensors = std::rc::Rc::new((tx, tw, tb, tdy));
    let arrays = std::rc::Rc::new((x, w, b, dy));
    let (t1, t2, a1, a2) = (tensors.clone(), tensors, arrays.clone(), arrays);
    Ok(vec![
        Case {
            op: "conv2d_fwd",
            shape: label.clone(),
            kernel: plan.forward.name().into(),
            flops: shape.flops(),
            gpu: Box::new(move || spec.forward(&t1.0, &t1.1, Some(&t1.2)).map(drop)),
            cpu: Box::new(move || {
                wgcnn::cpu::conv2d(&spec, &a1.0.view(), &a1.1.view(), Some(&a1.2.view())).map(drop)
            }),
        },
        Case {
            op: "conv2d_fwd_bwd",
            shape: label,
            kernel: plan.label(),
            flops: 3.0 * shape.flops(),
            gpu: Box::new(move || {
                let (_, saved) = spec.forward_saving(&t2.0, &t2.1, Some(&t2.2))?;
                spec.backward_saved(&t2.0, &t2.1, &t2.3, saved.as_ref())
                    .map(drop)
            }),
            cpu: Box::new(move || {
                wgcnn::cpu::conv2d(&spec, &a2.0.view(), &a2.1.view(), Some(&a2.2.view()))?;
                wgcnn::cpu::conv2d_backward(&spec, &a2.0.view(), &a2.1.view(), &a2.3.view())
                    .map(drop)
            }),
        },
    ])
}

fn pool_cases<'a>(
    gpu: &'a Gpu,
    spec: Pool2d,
    [fwd, fwd_bwd]: [&'static str; 2],
) -> Result<Vec<Case<'a>>> {
    let x = random(&[64, 6, 24, 24], 7);
    let dy = random(&[64, 6, 12, 12], 8);
    let (tx, tdy) = (Tensor::from_array(gpu, &x)?, Tensor::from_array(gpu, &dy)?);
    let shape = x.shape().to_vec();
    let label = "N64 C6 24x24 2x2".to_string();
    let flops = x.len() as f64;
    let tensors = std::rc::Rc::new((tx, tdy));
    let arrays = std::rc::Rc::new((x, dy));
    let (t1, t2, a1, a2) = (tensors.clone(), tensors, arrays.clone(), arrays);
    Ok(vec![
        Case {
            op: fwd,
            shape: label.clone(),
            kernel: "pool".into(),
            flops,
            gpu: Box::new(move || spec.forward(&t1.0).map(drop)),
            cpu: Box::new(move || wgcnn::cpu::pool2d(&spec, &a1.0.view()).map(drop)),
        },
        Case {
            op: fwd_bwd,
            shape: label,
            kernel: "pool".into(),
            flops: 2.0 * flops,
            gpu: Box::new(move || {
                let pooled = spec.forward(&t2.0)?;
                spec.backward(&shape, &t2.1, pooled.argmax.as_ref())
                    .map(drop)
            }),
            cpu: Box::new(move || {
                let pooled = wgcnn::cpu::pool2d(&spec, &a2.0.view())?;
                let argmax = pooled.argmax.as_ref().map(|a| a.view());
                wgcnn::cpu::pool2d_backward(&spec, a2.0.shape(), &a2.1.view(), argmax.as_ref())
                    .map(drop)
            }),
        },
    ])
}

fn batch_norm_cases(gpu: &Gpu) -> Result<Vec<Case<'_>>> {
    let spec = BatchNorm2d::default();
    let x = random(&[8, 64, 56, 56], 9);
    let dy = random(&[8, 64, 56, 56], 10);
    let ones = Array1::from_elem(64, 1.0f32);
    let zeros = Array1::from_elem(64, 0.0f32);
    let t = std::rc::Rc::new((
        Tensor::from_array(gpu, &x)?,
        Tensor::from_array(gpu, &ones)?,
        Tensor::from_array(gpu, &zeros)?,
        Tensor::from_array(gpu, &zeros)?,
        Tensor::from_array(gpu, &ones)?,
        Tensor::from_array(gpu, &dy)?,
        Tensor::from_array(gpu, &batches_state(0))?,
    ));
    let a = std::rc::Rc::new((x, dy, ones, zeros));
    let flops = 8.0 * a.0.len() as f64;
    let (t1, t2, a1, a2) = (t.clone(), t, a.clone(), a);
    let label = "N8 C64 56x56".to_string();
    Ok(vec![
        Case {
            op: "batch_norm2d_fwd",
            shape: label.clone(),
            kernel: "norm".into(),
            flops,
            gpu: Box::new(move || {
                spec.forward_train(&t1.0, &t1.1, &t1.2, &t1.3, &t1.4, &t1.6)
                    .map(drop)
            }),
            cpu: Box::new(move || {
                wgcnn::cpu::batch_norm_train(
                    &spec,
                    &a1.0.view(),
                    &a1.2.view(),
                    &a1.3.view(),
                    &a1.3.view(),
                    &a1.2.view(),
                    0,
                )
                .map(drop)
            }),
        },
        Case {
            op: "batch_norm2d_fwd_bwd",
            shape: label,
            kernel: "norm".into(),
            flops: 2.0 * flops,
            gpu: Box::new(move || {
                let out = spec.forward_train(&t2.0, &t2.1, &t2.2, &t2.3, &t2.4, &t2.6)?;
                spec.backward(&t2.0, [&t2.1, &t2.2], [&out.mean, &out.rstd], &t2.5, true)
                    .map(drop)
            }),
            cpu: Box::new(move || {
                let (out, _, _) = wgcnn::cpu::batch_norm_train(
                    &spec,
                    &a2.0.view(),
                    &a2.2.view(),
                    &a2.3.view(),
                    &a2.3.view(),
                    &a2.2.view(),
                    0,
                )?;
                let mean = out
                    .mean
                    .into_dimensionality()
                    .map_err(|e| wgcnn::Error::Readback(e.to_string()))?;
                let rstd = out
                    .rstd
                    .into_dimensionality()
                    .map_err(|e| wgcnn::Error::Readback(e.to_string()))?;
                let (mean, rstd): (Array1<f32>, Array1<f32>) = (mean, rstd);
                wgcnn::cpu::batch_norm_backward(
                    &a2.0.view(),
                    &a2.2.view(),
                    &mean.view(),
                    &rstd.view(),
                    &a2.1.view(),
                    true,
                )
                .map(drop)
            }),
        },
    ])
}

/// Layer norm over each sample's C×H×W values (N8 C64 28²).
fn layer_norm_cases(gpu: &Gpu) -> Result<Vec<Case<'_>>> {
    let spec = LayerNorm::default();
    let x = random(&[8, 64, 28, 28], 11);
    let dy = random(&[8, 64, 28, 28], 12);
    let gamma = random(&[64, 28, 28], 13);
    let beta = random(&[64, 28, 28], 14);
    let t = std::rc::Rc::new((
        Tensor::from_array(gpu, &x)?,
        Tensor::from_array(gpu, &gamma)?,
        Tensor::from_array(gpu, &beta)?,
        Tensor::from_array(gpu, &dy)?,
    ));
    let a = std::rc::Rc::new((x, gamma, beta, dy));
    let flops = 8.0 * a.0.len() as f64;
    let (t1, t2, a1, a2) = (t.clone(), t, a.clone(), a);
    let label = "N8 C64 28x28".to_string();
    Ok(vec![
        Case {
            op: "layer_norm_fwd",
            shape: label.clone(),
            kernel: "norm".into(),
            flops,
            gpu: Box::new(move || spec.forward(&t1.0, &t1.1, &t1.2).map(drop)),
            cpu: Box::new(move || {
                spec.forward_cpu(&a1.0.view(), &a1.1.view(), &a1.2.view())
                    .map(drop)
            }),
        },
        Case {
            op: "layer_norm_fwd_bwd",
            shape: label,
            kernel: "norm".into(),
            flops: 2.0 * flops,
            gpu: Box::new(move || {
                let out = spec.forward(&t2.0, &t2.1, &t2.2)?;
                spec.backward(&t2.0, [&t2.1, &t2.2], [&out.mean, &out.rstd], &t2.3)
                    .map(drop)
            }),
            cpu: Box::new(move || {
                let out = spec.forward_cpu(&a2.0.view(), &a2.1.view(), &a2.2.view())?;
                spec.backward_cpu(
                    &a2.0.view(),
                    &a2.1.view(),
                    &out.mean,
                    &out.rstd,
                    &a2.3.view(),
                )
                .map(drop)
            }),
        },
    ])
}

/// Softmax cross-entropy: one fused kernel gives the loss, its gradient and the correct
/// count, so forward and backward are one row.
fn cross_entropy_case(gpu: &Gpu, (rows, classes): (usize, usize)) -> Result<Case<'_>> {
    let logits = random(&[rows, classes], 15);
    let labels: Vec<usize> = (0..rows).map(|i| (i * 7) % classes).collect();
    let t = Tensor::from_array(gpu, &logits)?;
    let cpu_labels = labels.clone();
    Ok(Case {
        op: "softmax_cross_entropy_fwd_bwd",
        shape: format!("N{rows} K{classes}"),
        kernel: "fused".into(),
        flops: 5.0 * (rows * classes) as f64,
        gpu: Box::new(move || wgcnn::ops::softmax_cross_entropy(&t, &labels).map(drop)),
        cpu: Box::new(move || {
            wgcnn::cpu::softmax_cross_entropy(&logits.view(), &cpu_labels).map(drop)
        }),
    })
}

/// A whole LeNet-5 training step at batch 64 (forward, cross-entropy, backward, SGD update):
/// one recorded submission on the GPU, the CPU reference path on the other side.
fn train_step_case(gpu: &Gpu) -> Result<Case<'_>> {
    Ok(Case {
        op: "train_step_lenet_b64",
        shape: "N64 1x28x28".into(),
        kernel: "graph, 1 submit".into(),
        flops: 64.0 * 1.7e6,
        gpu: lenet_step(Device::Gpu(gpu.clone()))?,
        cpu: lenet_step(Device::Cpu)?,
    })
}

/// `x` on `device`, on a GPU written from the borrowed array as a data loader's fresh batch
/// is (cloning it first put a 200 KB copy, fresh pages and all, into LeNet's step; PyTorch's
/// peer reuses its input tensor).
fn upload(device: &Device, x: &ArrayD<f32>) -> Result<wgcnn::Value> {
    Ok(match device {
        Device::Gpu(gpu) => wgcnn::Value::Gpu(Tensor::from_array(gpu, x)?),
        Device::Cpu => wgcnn::Value::Cpu(x.clone()),
    })
}

/// LeNet-5 at batch 64 with SGD on `device`: a closure running one training step.
fn lenet_step(device: Device) -> Result<Box<dyn FnMut() -> Result<()>>> {
    use wgcnn::Optimizer;
    use wgcnn::nn::{LeNetOptions, lenet5};
    let x = random(&[64, 1, 28, 28], 7);
    let labels: Vec<usize> = (0..64).map(|i| i % 10).collect();
    let mut model = lenet5(LeNetOptions::default())?.build(device, 1)?;
    let mut opt = model.optimizer(Optimizer::sgd(0.01))?;
    Ok(Box::new(move || {
        wgcnn::train::train_step(&mut model, &mut opt, |d| upload(d, &x), &labels).map(drop)
    }))
}

/// Inference with a model of `wgcnn::models` at `[n, 3, 224, 224]` (eval mode, the output
/// left on the device), `flops` per image counted by forward hooks on PyTorch's model.
fn inference_case<'a>(gpu: &Gpu, model: &'static str, n: usize, flops: f64) -> Case<'a> {
    let op = match model {
        "resnet18" => "resnet18_inference",
        "resnext50_32x4d" => "resnext50_32x4d_inference",
        _ => "efficientnet_lite0_inference",
    };
    Case {
        op,
        shape: format!("N{n} 3x224x224"),
        kernel: "graph".into(),
        flops: n as f64 * flops,
        gpu: model_step(Device::Gpu(gpu.clone()), model, n, false),
        cpu: model_step(Device::Cpu, model, n, false),
    }
}

/// CIFAR-10's input batch (128 images of 3×32×32 bytes, cropped from their 4-pixel padded
/// selves and flipped half the time, then normalised): gathered and augmented on the host
/// and uploaded, or gathered with each image's window drawn and cut by the normalisation
/// kernel (`LoaderOptions::augment_on_device`). Everything the loader thread and the upload
/// do per batch; the CPU column is the same on the CPU reference device.
fn input_batch_case(gpu: &Gpu, on_device: bool) -> Result<Case<'_>> {
    use wgcnn::data::{Augmentation, Dataset, Pixels};
    let count = 1024 * 3 * 32 * 32;
    let pixels = (0..count).map(|v| (v * 37 % 251) as u8).collect();
    let data = Dataset::new([1024, 3, 32, 32], Pixels::U8(pixels), vec![0; 1024], None)?;
    let augment = Augmentation::new()
        .random_crop((32, 32), 4)?
        .horizontal_flip(0.5)?;
    let normalize = wgcnn::Normalize::new(&[0.49, 0.48, 0.45], &[0.25, 0.24, 0.26])?;
    let indices: Vec<usize> = (0..128).map(|i| i * 7 % 1024).collect();
    let batch = move |device: Device| -> Box<dyn FnMut() -> Result<()>> {
        let (data, augment, normalize, indices) = (
            data.clone(),
            augment.clone(),
            normalize.clone(),
            indices.clone(),
        );
        Box::new(move || {
            let how = (&augment, 1, 0);
            let batch = if on_device {
                data.crop_flip_batch(&indices, how)?
            } else {
                data.host_batch(&indices, Some(how))?
            };
            batch.upload(&device, &normalize).map(drop)
        })
    };
    Ok(Case {
        op: "input_batch_crop_flip",
        shape: "N128 3x32x32 pad 4".into(),
        kernel: if on_device {
            "on the device"
        } else {
            "on the host"
        }
        .into(),
        flops: 128.0 * 3.0 * 32.0 * 32.0,
        gpu: batch(Device::Gpu(gpu.clone())),
        cpu: batch(Device::Cpu),
    })
}

/// A model's training step with SGD and momentum, `op` at batch `n` of `shape` images; a
/// step costs about three forward passes of `flops` per image (counted on PyTorch's models):
/// ResNet-20 (CIFAR) at 128, and EfficientNet-Lite0 at 8, whose depthwise layers' backward
/// passes inference never runs.
fn model_train_case<'a>(
    gpu: &'a Gpu,
    (op, model): (&'static str, &'static str),
    (n, shape): (usize, &str),
    flops: f64,
) -> Case<'a> {
    Case {
        op,
        shape: format!("N{n} {shape}"),
        kernel: "graph, 1 submit".into(),
        flops: n as f64 * 3.0 * flops,
        gpu: model_step(Device::Gpu(gpu.clone()), model, n, true),
        cpu: model_step(Device::Cpu, model, n, true),
    }
}

/// A closure running the model called `name` on `device` for a batch of `n`: one eval
/// forward, or one training step. The model is built on the first call (the warm-up), so
/// rows left out by `--filter` build nothing.
fn model_step(
    device: Device,
    name: &'static str,
    n: usize,
    train: bool,
) -> Box<dyn FnMut() -> Result<()>> {
    use wgcnn::{Graph, Mode, Optimizer, graph::GraphOptimizer};
    let mut state: Option<(Graph, GraphOptimizer, ArrayD<f32>)> = None;
    let labels: Vec<usize> = (0..n).map(|i| i % 10).collect();
    Box::new(move || {
        if state.is_none() {
            let classes = if matches!(name, "resnet20" | "resnet56") {
                10
            } else {
                1000
            };
            let model = wgcnn::models::by_name(name, classes)?;
            let mut shape = model.input_shape();
            shape[0] = n;
            let graph = model.build(device.clone(), 1)?;
            let optimizer = graph.optimizer(Optimizer::momentum(0.05, 0.9))?;
            state = Some((graph, optimizer, random(&shape, 9)));
        }
        let Some((graph, optimizer, x)) = state.as_mut() else {
            return Ok(());
        };
        if train {
            let input = |d: &Device| d.upload(x.clone());
            wgcnn::train::train_step(graph, optimizer, input, &labels).map(drop)
        } else {
            let input = graph.device().upload(x.clone())?;
            graph.forward(input, Mode::Eval).map(drop)
        }
    })
}

/// `--dispatches`: kernels and submits of one training step per model, counted on the
/// context after a first step (which builds the model and compiles its pipelines).
fn dispatch_report(gpu: &Gpu, json: bool) -> Result<()> {
    let device = || Device::Gpu(gpu.clone());
    let steps = [
        ("train_step_lenet_b64", lenet_step(device())?),
        (
            "train_step_resnet20_b128",
            model_step(device(), "resnet20", 128, true),
        ),
        (
            "train_step_resnet18_b1",
            model_step(device(), "resnet18", 1, true),
        ),
    ];
    for (op, mut step) in steps {
        step()?;
        let (dispatches, submits) = (gpu.dispatches(), gpu.submissions());
        step()?;
        let (dispatches, submits) = (gpu.dispatches() - dispatches, gpu.submissions() - submits);
        if json {
            println!(r#"{{"op":"{op}","dispatches":{dispatches},"submits":{submits}}}"#);
        } else {
            println!("{op:<28} {dispatches:>5} dispatches {submits:>3} submits");
        }
    }
    Ok(())
}

/// `v` as JSON: `null` for the NaN of a skipped measurement.
fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "null".into()
    }
}

/// `--tuning`: per model, on fresh contexts without a cache file, the first training step
/// or inference pass under the fixed order and under the tuner (which measures during it),
/// the median of the next three, and the tuner's seconds and choices.
fn tuning_report(options: &GpuOptions, json: bool, filter: Option<&str>) -> Result<()> {
    let models: [(&str, Option<&'static str>, usize, bool); 5] = [
        ("lenet5 train N64", None, 64, true),
        ("resnet20 train N128", Some("resnet20"), 128, true),
        ("resnet18 eval N1", Some("resnet18"), 1, false),
        ("resnet18 eval N8", Some("resnet18"), 8, false),
        (
            "efficientnet_lite0 eval N8",
            Some("efficientnet_lite0"),
            8,
            false,
        ),
    ];
    let labels = models.map(|(label, ..)| label.to_string());
    check_filter("perf --tuning --filter", filter, &labels)?;
    for (label, name, n, train) in models {
        if filter.is_some_and(|f| !label.contains(f)) {
            continue;
        }
        for tuning in [Tuning::Fixed, Tuning::Measure] {
            let gpu = Gpu::with_options(GpuOptions {
                tuning,
                tuning_cache: None,
                ..options.clone()
            })?;
            let device = Device::Gpu(gpu.clone());
            let mut step = match name {
                Some(name) => model_step(device, name, n, train),
                None => lenet_step(device)?,
            };
            let mut timed = || -> Result<()> {
                step()?;
                gpu.synchronize()
            };
            let start = Instant::now();
            timed()?;
            let first = start.elapsed().as_secs_f64();
            let next_ms = median_ms(3, &mut timed)?;
            let report = gpu.tuning_report();
            let mode = format!("{tuning:?}").to_lowercase();
            if json {
                println!(
                    r#"{{"model":"{label}","tuning":"{mode}","first_step_s":{first:.3},"step_ms":{next_ms:.2},"tuning_s":{:.3},"choices":{}}}"#,
                    report.seconds,
                    report.choices.len()
                );
                continue;
            }
            println!(
                "{label:<28} {mode:<8} first {first:>6.2} s  then {next_ms:>9.2} ms  measuring {:.2} s, {} choices",
                report.seconds,
                report.choices.len()
            );
            for choice in report.choices.iter().filter(|c| c.candidates.len() > 1) {
                let times: Vec<String> = choice
                    .candidates
                    .iter()
                    .map(|(name, s)| match s {
                        Some(s) => format!("{name} {:.2} ms", s * 1e3),
                        None => format!("{name} -"),
                    })
                    .collect();
                let batch = choice.timed_batch.map_or(String::new(), |n| match n {
                    1 => " on 1 image".into(),
                    n => format!(" on {n} images"),
                });
                println!(
                    "    {} -> {} ({:?}{batch}: {})",
                    choice.key,
                    choice.chosen,
                    choice.source,
                    times.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// `--memory`: the peak bytes the buffer pool holds during one ResNet inference pass or
/// training step at 224×224 (weights, optimizer state and the input included), and its
/// time, after a first step that compiles the pipelines.
fn memory_report(gpu: &Gpu, filter: Option<&str>) -> Result<()> {
    let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
    let limit = gpu.limits().max_storage_buffer_binding_size;
    let steps = ["resnet18", "resnet50"].into_iter().flat_map(|name| {
        [false, true]
            .into_iter()
            .flat_map(move |train| [1, 8, 32].map(|n| (name, train, n)))
    });
    let label = |(name, train, n): (&str, bool, usize)| {
        format!("{name} {} N{n}", if train { "train" } else { "eval" })
    };
    let labels: Vec<String> = steps.clone().map(label).collect();
    check_filter("perf --memory --filter", filter, &labels)?;
    println!("binding limit {:.0} MiB", mib(limit));
    for (name, train, n) in steps {
        let label = label((name, train, n));
        if filter.is_some_and(|f| !label.contains(f)) {
            continue;
        }
        let mut step = model_step(Device::Gpu(gpu.clone()), name, n, train);
        step()?;
        gpu.synchronize()?;
        gpu.reset_peak_bytes();
        let start = Instant::now();
        step()?;
        gpu.synchronize()?;
        let seconds = start.elapsed().as_secs_f64();
        let stats = gpu.pool_stats();
        println!(
            "{label:<22} peak {:>8.1} MiB  {seconds:>7.2} s",
            mib(stats.peak_live_bytes)
        );
    }
    Ok(())
}

/// An error where `filter` is given and no label contains it: a filter matching nothing
/// would otherwise print nothing, silently.
fn check_filter(flag: &'static str, filter: Option<&str>, labels: &[String]) -> Result<()> {
    match filter {
        Some(f) if !labels.iter().any(|label| label.contains(f)) => {
            let mut rows = labels.to_vec();
            rows.dedup();
            Err(wgcnn::Error::InvalidArgument {
                op: flag,
                detail: format!("no row contains {f:?}; the rows: {}", rows.join(", ")),
            })
        }
        _ => Ok(()),
    }
}

/// `--profile`: the passes of a LeNet training step (or, with `--filter`, of ResNet-20's at
/// batch 128, or of ResNet-18's, ResNeXt-50's or EfficientNet-Lite0's inference at batch 1,
/// or ResNet-18's at batch 8 with `resnet18_inference_b8`; a filter matching none of them is
/// an error, not LeNet's step): its ops timed by device timestamps inside the step's own
/// submits (`Gpu::profile_ops`), or, where the adapter has none or `waited`, its passes each
/// submitted and waited for on its own (`Gpu::profile_passes`); medians of `runs` steps: op
/// by op for up to 60 (every one with `--json`), then the time per kernel. `cold`: the first
/// step alone, with no warm-up, so that each op's time includes the compiling of its kernel
/// that lavapipe does at its first dispatch (where the cold start goes).
fn profile_step(
    gpu: &Gpu,
    filter: Option<&str>,
    runs: usize,
    (json, waited, cold): (bool, bool, bool),
) -> Result<()> {
    let steps = [
        "train_step_lenet_b64",
        "train_step_resnet20_b128",
        "resnet18_inference",
        "resnet18_inference_b8",
        "resnext50_32x4d_inference",
        "efficientnet_lite0_inference",
        "train_step_efficientnet_lite0_b8",
    ];
    check_filter("perf --profile --filter", filter, &steps.map(String::from))?;
    let device = Device::Gpu(gpu.clone());
    let mut step = match filter {
        Some(f) if "train_step_resnet20_b128".contains(f) => {
            model_step(device, "resnet20", 128, true)
        }
        Some(f) if "resnet18_inference_b8".contains(f) && f.ends_with("b8") => {
            model_step(device, "resnet18", 8, false)
        }
        Some(f) if "resnet18_inference".contains(f) => model_step(device, "resnet18", 1, false),
        Some(f) if "resnext50_32x4d_inference".contains(f) => {
            model_step(device, "resnext50_32x4d", 1, false)
        }
        Some(f) if "efficientnet_lite0_inference".contains(f) => {
            model_step(device, "efficientnet_lite0", 1, false)
        }
        Some(f) if "train_step_efficientnet_lite0_b8".contains(f) => {
            model_step(device, "efficientnet_lite0", 8, true)
        }
        _ => lenet_step(device)?,
    };
    let runs = if cold {
        1
    } else {
        step()?; // warm-up: compiles pipelines
        // Its work finishes here, not inside the first profiled pass's wait.
        gpu.synchronize()?;
        runs
    };
    // Per step, each pass's or op's label and time, and the time between ops (timestamps
    // only: the dispatch overhead the waited passes hide in their submits).
    let stamped = gpu.can_profile_ops() && !waited;
    let mut steps: Vec<Vec<(String, f64)>> = Vec::with_capacity(runs);
    let mut gaps = Vec::with_capacity(runs);
    for _ in 0..runs {
        if stamped {
            let ops = gpu.profile_ops(&mut step)?.1;
            if ops.len() == 2_048 {
                eprintln!("perf --profile: the step has more ops than one query set times (2,048)");
            }
            let busy: f64 = ops.iter().map(|op| op.ms).sum();
            let span = ops.last().map_or(0.0, |op| op.start_ms + op.ms);
            gaps.push(span - busy);
            steps.push(ops.into_iter().map(|op| (op.label, op.ms)).collect());
        } else {
            let passes = gpu.profile_passes(&mut step)?.1;
            steps.push(passes.into_iter().map(|p| (p.label, p.ms)).collect());
        }
    }
    let passes = steps.iter().map(Vec::len).min().unwrap_or(0);
    let mut total = 0.0;
    let mut by_kernel: Vec<(String, f64, usize)> = Vec::new();
    for pass in 0..passes {
        let mut times: Vec<f64> = steps.iter().map(|s| s[pass].1).collect();
        times.sort_by(f64::total_cmp);
        let (label, ms) = (&steps[0][pass].0, times[times.len() / 2]);
        total += ms;
        match by_kernel.iter_mut().find(|(l, ..)| l == label) {
            Some((_, sum, count)) => (*sum, *count) = (*sum + ms, *count + 1),
            None => by_kernel.push((label.clone(), ms, 1)),
        }
        if passes > 60 && !json {
            continue;
        }
        if json {
            println!("{{\"pass\":{pass},\"label\":{label:?},\"ms\":{ms:.4}}}");
        } else {
            println!("{pass:>3} {label:<28} {ms:>8.3} ms");
        }
    }
    by_kernel.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (label, ms, count) in &by_kernel {
        if json {
            println!("{{\"kernel\":{label:?},\"passes\":{count},\"ms\":{ms:.4}}}");
        } else {
            println!("    {label:<28} {count:>4} passes {ms:>9.3} ms");
        }
    }
    gaps.sort_by(f64::total_cmp);
    let between = gaps.get(gaps.len() / 2).copied();
    match (json, between) {
        (true, Some(gap)) => {
            println!("{{\"passes\":{passes},\"total_ms\":{total:.4},\"between_ms\":{gap:.4}}}")
        }
        (true, None) => println!("{{\"passes\":{passes},\"total_ms\":{total:.4}}}"),
        (false, Some(gap)) => println!(
            "{passes} ops, {total:.2} ms in them and {gap:.2} ms between them \
             (device timestamps inside the step's own submits)"
        ),
        (false, None) => {
            println!("{passes} passes, {total:.2} ms in all (each with its own submit and wait)")
        }
    }
    Ok(())
}

/// The performance report: each op on the GPU and on the CPU reference, medians of
/// synchronised runs after a warm-up.
#[derive(Parser, Debug)]
struct Args {
    /// Three runs per row instead of nine.
    #[arg(long)]
    quick: bool,
    /// Runs per row (the median is reported).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    runs: Option<u64>,
    /// One JSON object per row.
    #[arg(long)]
    json: bool,
    /// Only the rows whose "op shape" contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Skip the CPU reference (its columns read NaN): model rows take seconds per run there.
    #[arg(long)]
    no_cpu: bool,
    /// Force how kernels read large operands (default: the adapter's calibration).
    #[arg(long, value_enum)]
    reads: Option<Reads>,
    /// Force a kernel family on any adapter (default: by the adapter's type, as
    /// `WGCNN_KERNELS` says): `portable` runs the GPU designs, `cpu` the CPU-adapter ones.
    #[arg(long, value_enum)]
    kernels: Option<Family>,
    /// Instead of the table: where a LeNet training step's device time goes, op by op (device
    /// timestamps around each op inside the step's own submits, where the adapter has them;
    /// else each pass submitted and waited for on its own; medians of --runs steps); with
    /// --filter resnet20, resnet18, resnext50 or efficientnet, that model's step or inference
    /// (train_step_efficientnet: EfficientNet-Lite0's training step at batch 8).
    #[arg(long)]
    profile: bool,
    /// With --profile: each pass submitted and waited for on its own even where the adapter
    /// has timestamps.
    #[arg(long)]
    waited: bool,
    /// With --profile: time the first step alone, with no warm-up, so that each op's time
    /// includes compiling its kernel (lavapipe compiles at a kernel's first dispatch; run with
    /// MESA_SHADER_CACHE_DISABLE=true to see a fresh machine's cold start).
    #[arg(long)]
    cold: bool,
    /// Instead of the table: the peak device bytes (buffer pool) and time of ResNet-18/50
    /// inference and training steps at 224×224, batches 1, 8 and 32.
    #[arg(long)]
    memory: bool,
    /// Instead of the table: the kernels dispatched and the submits of one training step of
    /// LeNet-5 (batch 64), ResNet-20 (batch 128) and ResNet-18 (batch 1, 224×224).
    #[arg(long)]
    dispatches: bool,
    /// Instead of the table: per model (LeNet-5, ResNet-20, ResNet-18, EfficientNet-Lite0),
    /// the first step and the next ones under the fixed kernel order and under the tuner,
    /// its seconds spent measuring and its choices (fresh contexts, no cache file).
    #[arg(long)]
    tuning: bool,
}

/// `--reads` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Reads {
    /// Storage buffers.
    Storage,
    /// Textures.
    Texture,
}

/// `--kernels` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// The GPU designs (packed-vec4 matmul, storage reads, no subgroup broadcasts).
    Portable,
    /// The CPU-adapter designs (subgroup broadcasts, calibrated operand reads).
    Cpu,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (json, filter) = (args.json, args.filter.clone());
    let runs = args
        .runs
        .map_or(if args.quick { 3 } else { 9 }, |r| r as usize);
    let operand_reads = args.reads.map(|reads| match reads {
        Reads::Storage => OperandReads::Storage,
        Reads::Texture => OperandReads::Texture,
    });
    let env = GpuOptions::from_env()?;
    let options = GpuOptions {
        operand_reads,
        kernel_family: match args.kernels {
            Some(Family::Portable) => KernelFamily::Portable,
            Some(Family::Cpu) => KernelFamily::CpuAdapter,
            None => env.kernel_family,
        },
        ..env
    };
    if args.tuning {
        return tuning_report(&options, json, filter.as_deref());
    }
    let gpu = Gpu::with_options(options)?;
    let adapter = gpu.adapter_info().name.clone();
    if args.profile {
        return profile_step(
            &gpu,
            filter.as_deref(),
            runs,
            (json, args.waited, args.cold),
        );
    }
    if args.memory {
        return memory_report(&gpu, filter.as_deref());
    }
    if args.dispatches {
        return dispatch_report(&gpu, json);
    }
    if !json {
        println!(
            "adapter: {adapter} ({:?}, {:?}), {:?} kernels",
            gpu.adapter_info().backend,
            gpu.adapter_info().device_type,
            gpu.kernel_family()
        );
        println!(
            "{:<30} {:<26} {:<20} {:>10} {:>9} {:>10} {:>9} {:>9} {:>7}",
            "op",
            "shape",
            "kernel",
            "gpu_ms",
            "host_ms",
            "cpu_ms",
            "gpu_GF/s",
            "cpu_GF/s",
            "cpu/gpu"
        );
    }
    // Kernels that can read operands through textures follow this choice (CPU adapters).
    let calibration = gpu.operand_calibration()?;
    if let Some(c) = calibration {
        let choice = format!("{:?}", c.choice).to_lowercase();
        if json {
            println!(
                "{{\"calibration\":{{\"storage_ns\":{:.3},\"texture_ns\":{:.3},\"choice\":\"{choice}\",\"ms\":{:.1}}},\"adapter\":\"{adapter}\"}}",
                c.storage_ns,
                c.texture_ns,
                c.seconds * 1e3
            );
        } else {
            println!(
                "operand reads: {choice} (per-lane load {:.2} ns from storage, {:.2} ns from a texture; calibrated in {:.0} ms)",
                c.storage_ns,
                c.texture_ns,
                c.seconds * 1e3
            );
        }
    }
    // On CPU adapters both operand families of the subgroup kernel get rows.
    let matmul_kernels = match calibration {
        Some(_) => vec![KernelChoice::Subgroup, KernelChoice::SubgroupTexture],
        None => vec![KernelChoice::Auto],
    };
    let mut cases = Vec::new();
    for shape in [
        (256, 256, 256),
        (1024, 1024, 1024),
        (2048, 2048, 2048),
        (4096, 150, 16),
        (25088, 576, 64),
    ] {
        for &kernel in &matmul_kernels {
            cases.push(matmul_case(&gpu, shape, kernel)?);
        }
    }
    // [N, C, H, O, K, padding, groups, stride]: LeNet's two layers, a ResNet 3×3, MobileNet's
    // depthwise 3×3, a two-group 3×3 (AlexNet style), ResNeXt's 32 groups of 4 channels,
    // MobileNet's pointwise 1×1, ResNet's 7×7 stem and its first strided 3×3, and the 16-filter
    // 3×3 of ResNet-20's first stage at its batch of 128.
    for conv in [
        [64, 1, 28, 6, 5, 0, 1, 1],
        [64, 6, 12, 16, 5, 0, 1, 1],
        [8, 64, 56, 64, 3, 1, 1, 1],
        [8, 64, 56, 64, 3, 1, 64, 1],
        [8, 64, 56, 64, 3, 1, 2, 1],
        [8, 128, 28, 128, 3, 1, 32, 1],
        [8, 64, 56, 64, 1, 0, 1, 1],
        [8, 3, 224, 64, 7, 3, 1, 2],
        [8, 64, 56, 128, 3, 1, 1, 2],
        [128, 16, 32, 16, 3, 1, 1, 1],
    ] {
        cases.extend(conv_cases(&gpu, conv, filter.as_deref())?);
    }
    cases.extend(pool_cases(
        &gpu,
        Pool2d::max((2, 2)),
        ["max_pool2d_fwd", "max_pool2d_fwd_bwd"],
    )?);
    cases.extend(pool_cases(
        &gpu,
        Pool2d::avg((2, 2)),
        ["avg_pool2d_fwd", "avg_pool2d_fwd_bwd"],
    )?);
    cases.extend(batch_norm_cases(&gpu)?);
    cases.extend(layer_norm_cases(&gpu)?);
    for shape in [(64, 10), (64, 1000), (1024, 1000)] {
        cases.push(cross_entropy_case(&gpu, shape)?);
    }
    cases.push(train_step_case(&gpu)?);
    for n in [1, 8] {
        cases.push(inference_case(&gpu, "resnet18", n, 3.628e9));
        cases.push(inference_case(&gpu, "efficientnet_lite0", n, 7.70e8));
    }
    // ResNeXt's grouped 3×3 layers (32 groups of 4 to 32 channels), at batch 1.
    cases.push(inference_case(&gpu, "resnext50_32x4d", 1, 8.461e9));
    cases.push(model_train_case(
        &gpu,
        ("train_step_resnet20_b128", "resnet20"),
        (128, "3x32x32"),
        8.16e7,
    ));
    cases.push(model_train_case(
        &gpu,
        ("train_step_efficientnet_lite0_b8", "efficientnet_lite0"),
        (8, "3x224x224"),
        7.70e8,
    ));
    for on_device in [false, true] {
        cases.push(input_batch_case(&gpu, on_device)?);
    }

    let labels: Vec<String> = cases
        .iter()
        .map(|case| row_label(case.op, &case.shape))
        .collect();
    check_filter("perf --filter", filter.as_deref(), &labels)?;
    for (mut case, label) in cases.into_iter().zip(labels) {
        if filter.as_ref().is_some_and(|f| !label.contains(f.as_str())) {
            continue;
        }
        let mut gpu_run = || -> Result<()> {
            (case.gpu)()?;
            gpu.synchronize()
        };
        gpu_run()?; // warm-up: compiles pipelines, lets the driver JIT the kernels
        let gpu_ms = median_ms(runs, &mut gpu_run)?;
        // Host time: recording and submitting the work, without waiting for it.
        let mut host_times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            (case.gpu)()?;
            host_times.push(start.elapsed().as_secs_f64() * 1e3);
            gpu.synchronize()?;
        }
        host_times.sort_by(f64::total_cmp);
        let host_ms = host_times[runs / 2];
        let cpu_ms = if args.no_cpu {
            f64::NAN
        } else {
            (case.cpu)()?;
            median_ms(runs, &mut case.cpu)?
        };
        let (gpu_gflops, cpu_gflops) = (case.flops / gpu_ms / 1e6, case.flops / cpu_ms / 1e6);
        if json {
            println!(
                "{{\"op\":\"{}\",\"shape\":\"{}\",\"kernel\":\"{}\",\"gpu_ms\":{gpu_ms:.4},\"cpu_ms\":{},\"gpu_gflops\":{gpu_gflops:.3},\"cpu_gflops\":{},\"host_ms\":{host_ms:.4},\"adapter\":\"{adapter}\"}}",
                case.op,
                case.shape,
                case.kernel,
                json_number(cpu_ms),
                json_number(cpu_gflops)
            );
        } else {
            println!(
                "{:<30} {:<26} {:<20} {gpu_ms:>10.3} {host_ms:>9.3} {cpu_ms:>10.3} {gpu_gflops:>9.2} {cpu_gflops:>9.2} {:>7.2}",
                case.op,
                case.shape,
                case.kernel,
                cpu_ms / gpu_ms
            );
        }
    }
    if !json {
        let report = gpu.tuning_report();
        println!(
            "kernels tuned: {} choices, {:.2} s measuring ({:?})",
            report.choices.len(),
            report.seconds,
            gpu.tuning()
        );
    }
    Ok(())
}
