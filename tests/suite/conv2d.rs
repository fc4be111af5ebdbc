//! conv2d: the course's filters, PyTorch goldens, GPU against CPU, finite differences, errors.

use crate::common;

use common::golden::{assert_close, cases, pair, tensor};
use common::{
    capped_gpu, checked_read_family_gpus, gpu, max_abs_diff, random, read_family_gpus, upload,
};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use serde_json::Value;
use wgcnn::ops::Conv2d;
use wgcnn::tuning::ConvKernel;
use wgcnn::{Activation, Error, Padding, Tensor};

fn spec_of(params: &Value) -> Conv2d {
    let padding = if params["padding"] == "same" {
        Padding::Same
    } else {
        let (ph, pw) = pair(&params["padding"]);
        Padding::Explicit(ph, pw)
    };
    Conv2d {
        stride: pair(&params["stride"]),
        padding,
        dilation: pair(&params["dilation"]),
        groups: params["groups"].as_u64().map_or(1, |g| g as usize),
        ..Conv2d::default()
    }
}

/// The 6×6 step image of the course: three columns of ones, three of zeros.
fn step_image() -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[1, 1, 6, 6]), |d| if d[3] < 3 { 1.0 } else { 0.0 })
}

#[test]
fn the_course_filters_on_the_step_image() {
    let mean = ArrayD::from_elem(IxDyn(&[1, 1, 3, 3]), 1.0f32 / 9.0);
    let sobel = ArrayD::from_shape_vec(
        IxDyn(&[1, 1, 3, 3]),
        vec![1.0, 0.0, -1.0, 2.0, 0.0, -2.0, 1.0, 0.0, -1.0],
    )
    .unwrap();
    let spec = Conv2d::default();
    for (kernel, row) in [
        (&mean, [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]),
        (&sobel, [0.0, 4.0, 4.0, 0.0]),
    ] {
        let cpu = wgcnn::cpu::conv2d(&spec, &step_image().view(), &kernel.view(), None).unwrap();
        assert_eq!(cpu.shape(), &[1, 1, 4, 4]);
        if gpu().is_none() {
            return;
        }
        let y = spec
            .forward(&upload(&step_image()), &upload(kernel), None)
            .unwrap()
            .to_array()
            .unwrap();
        for out in [&cpu, &y] {
            for i in 0..4 {
                for (j, expected) in row.iter().enumerate() {
                    assert!(
                        (out[[0, 0, i, j]] - expected).abs() < 1e-6,
                        "row {i}: {:?}",
                        out
                    );
                }
            }
        }
    }
}

/// PyTorch's convolutions (strides, dilations, paddings, groups, rectangular kernels) on
/// the CPU and on the GPU: the fixed order's kernels, and every family forced where it runs
/// (both Winograds, implicit GEMM, im2col, direct, pointwise, grouped direct), all within
/// rtol 1e-4 and atol 1e-5 but F(4×4, 3×3)'s weight gradient: its sums of `dU` run up to
/// |A|²·|B|² larger than the gradient they cancel down to, so its rounding, as Winograd's
/// error bounds say, scales with the gradient's largest element rather than with each one
/// (measured here: up to 5.3e-7 of it past rtol); it gets atol 1e-5 + 1e-6 · max |dW|.
#[test]
fn pytorch_goldens_forward_and_backward_on_gpu_and_cpu() {
    if gpu().is_none() {
        return;
    }
    let goldens = cases("conv2d_");
    let grouped = goldens
        .iter()
        .filter(|case| spec_of(&case.json["params"]).groups > 1)
        .count();
    assert!(grouped >= 4, "{grouped} grouped cases");
    for case in goldens {
        let json = &case.json;
        let spec = spec_of(&json["params"]);
        let (x, w, b) = (
            tensor(&json["inputs"]["x"]),
            tensor(&json["inputs"]["weight"]),
            tensor(&json["inputs"]["bias"]),
        );
        let dy = tensor(&json["grad_outputs"]["y"]);
        let expected_y = tensor(&json["outputs"]["y"]);
        let grads = &json["grads"];
        let (gx, gw, gb) = (
            tensor(&grads["x"]),
            tensor(&grads["weight"]),
            tensor(&grads["bias"]),
        );
        let name = &case.name;

        let cpu_y = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), Some(&b.view())).unwrap();
        assert_close(&format!("{name} cpu y"), &cpu_y, &expected_y, 1e-4, 1e-5);
        let cpu = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        assert_close(&format!("{name} cpu dx"), &cpu.x, &gx, 1e-4, 1e-5);
        assert_close(&format!("{name} cpu dw"), &cpu.weight, &gw, 1e-4, 1e-5);
        assert_close(&format!("{name} cpu db"), &cpu.bias, &gb, 1e-4, 1e-5);

        let (tx, tw, tb, tdy) = (upload(&x), upload(&w), upload(&b), upload(&dy));
        let gpu = tx.gpu().clone();
        // The fixed order's kernels, then every family forced on the passes it can run.
        for kernel in std::iter::once(None).chain(ConvKernel::ALL.map(Some)) {
            let spec = Conv2d { kernel, ..spec };
            let plan = spec.plan(&gpu, &spec.shape(x.shape(), w.shape(), None).unwrap());
            let plan = plan.unwrap();
            let passes = [plan.forward, plan.input_grad, plan.weight_grad];
            if kernel.is_some_and(|k| !passes.contains(&k)) {
                continue;
            }
            let name = format!("{name} gpu {}", plan.label());
            let y = spec.forward(&tx, &tw, Some(&tb)).unwrap();
            assert_close(
                &format!("{name} y"),
                &y.to_array().unwrap(),
                &expected_y,
                1e-4,
                1e-5,
            );
            let g = spec.backward(&tx, &tw, &tdy).unwrap();
            for (what, got, want) in [
                ("dx", &g.x, &gx),
                ("dw", &g.weight, &gw),
                ("db", &g.bias, &gb),
            ] {
                let atol = if what == "dw" && plan.weight_grad == ConvKernel::Winograd4 {
                    1e-5 + 1e-6 * want.iter().fold(0f32, |m, v| m.max(v.abs()))
                } else {
                    1e-5
                };
                assert_close(
                    &format!("{name} {what}"),
                    &got.to_array().unwrap(),
                    want,
                    1e-4,
                    atol,
                );
            }
        }
    }
}

fn padding_strategy() -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::Same),
        (0usize..3, 0usize..3).prop_map(|(a, b)| Padding::Explicit(a, b))
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_cpu_forward_and_backward(
        n in 1usize..4, per_group in 1usize..5, filters in 1usize..6, h in 1usize..12, w in 1usize..12,
        kh in 1usize..6, kw in 1usize..6, sh in 1usize..4, sw in 1usize..4, dh in 1usize..3, dw in 1usize..3,
        groups in prop_oneof![2 => Just(1usize), 1 => 2usize..5], padding in padding_strategy(),
        relu: bool, seed in 0u64..1000,
    ) {
        // Channels and filters per group; one channel per group is a depthwise convolution.
        let (c, o) = (per_group * groups, filters * groups);
        let stride = if padding == Padding::Same { (1, 1) } else { (sh, sw) };
        let spec = Conv2d { stride, padding, dilation: (dh, dw), activation: Activation::None, groups, kernel: None };
        let (x, weight, bias) = (random(&[n, c, h, w], seed), random(&[o, per_group, kh, kw], seed + 1), random(&[o], seed + 2));
        let Ok(shape) = spec.shape(x.shape(), weight.shape(), None) else {
            // The kernel does not fit the padded input: both paths must say so.
            prop_assert!(wgcnn::cpu::conv2d(&spec, &x.view(), &weight.view(), None).is_err());
            return Ok(());
        };
        if gpu().is_none() { return Ok(()); }
        let tolerance = 1e-5 * (shape.taps() as f32).sqrt() * 4.0 + 1e-5;
        let forward = Conv2d { activation: if relu { Activation::Relu } else { Activation::None }, ..spec };
        let expected = wgcnn::cpu::conv2d(&forward, &x.view(), &weight.view(), Some(&bias.view())).unwrap();
        let (tx, tw, tb) = (upload(&x), upload(&weight), upload(&bias));
        let poison = |shape: &[usize]| drop(Tensor::full(gpu().unwrap(), shape, f32::NAN).unwrap());
        poison(&shape.output());
        let y = forward.forward(&tx, &tw, Some(&tb)).unwrap().to_array().unwrap();
        prop_assert!(max_abs_diff(&y, &expected) <= tolerance, "forward {spec:?}: {}", max_abs_diff(&y, &expected));

        let dy = random(&shape.output(), seed + 3);
        let cpu = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &weight.view(), &dy.view()).unwrap();
        let tdy = upload(&dy);
        poison(x.shape());
        poison(weight.shape());
        let g = spec.backward(&tx, &tw, &tdy).unwrap();
        let positions = (n * shape.positions()) as f32;
        for (what, got, want, scale) in [
            ("dx", g.x.to_array().unwrap(), cpu.x, (filters * kh * kw) as f32),
            ("dw", g.weight.to_array().unwrap(), cpu.weight, positions),
            ("db", g.bias.to_array().unwrap(), cpu.bias, positions),
        ] {
            let diff = max_abs_diff(&got, &want);
            prop_assert!(diff <= 1e-5 * scale.sqrt() * 4.0 + 1e-5, "{what} {spec:?} {shape:?}: {diff}");
        }
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let spec = Conv2d {
        stride: (2, 1),
        padding: Padding::Explicit(1, 2),
        dilation: (1, 2),
        ..Conv2d::default()
    };
    check_finite_differences(spec, &[2, 2, 5, 6], &[3, 2, 3, 2]);
}

#[test]
fn grouped_and_depthwise_cpu_backward_match_finite_differences() {
    // Two groups of two channels and three filters each, strided and padded.
    let grouped = Conv2d {
        stride: (2, 1),
        padding: Padding::Explicit(1, 0),
        groups: 2,
        ..Conv2d::default()
    };
    check_finite_differences(grouped, &[2, 4, 5, 6], &[6, 2, 3, 2]);
    // Depthwise with a channel multiplier of 2, dilated.
    let depthwise = Conv2d {
        padding: Padding::Same,
        dilation: (2, 1),
        groups: 3,
        ..Conv2d::default()
    };
    check_finite_differences(depthwise, &[1, 3, 6, 5], &[6, 1, 3, 3]);
}

fn check_finite_differences(spec: Conv2d, x_shape: &[usize], w_shape: &[usize]) {
    let (x, w, b) = (
        random(x_shape, 1),
        random(w_shape, 2),
        random(&w_shape[..1], 3),
    );
    let y = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), Some(&b.view())).unwrap();
    let dy = random(y.shape(), 4);
    // L = Σ y ⊙ dy, accumulated in f64.
    let loss = |x: &ArrayD<f32>, w: &ArrayD<f32>, b: &ArrayD<f32>| -> f64 {
        let y = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), Some(&b.view())).unwrap();
        y.iter()
            .zip(&dy)
            .map(|(a, g)| f64::from(*a) * f64::from(*g))
            .sum()
    };
    let grads = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
    let eps = 1e-2f32;
    let check = |name: &str, analytic: &ArrayD<f32>, perturb: &dyn Fn(usize, f32) -> f64| {
        for i in (0..analytic.len()).step_by(3) {
            let numeric = (perturb(i, eps) - perturb(i, -eps)) / (2.0 * f64::from(eps));
            let a = f64::from(analytic.iter().nth(i).unwrap().to_owned());
            assert!(
                (numeric - a).abs() <= 2e-3 * (1.0 + a.abs()),
                "{name}[{i}]: analytic {a}, numeric {numeric}"
            );
        }
    };
    check("dx", &grads.x, &|i, e| {
        let mut x2 = x.clone();
        x2.as_slice_mut().unwrap()[i] += e;
        loss(&x2, &w, &b)
    });
    check("dw", &grads.weight, &|i, e| {
        let mut w2 = w.clone();
        w2.as_slice_mut().unwrap()[i] += e;
        loss(&x, &w2, &b)
    });
    check("db", &grads.bias, &|i, e| {
        let mut b2 = b.clone();
        b2.as_slice_mut().unwrap()[i] += e;
        loss(&x, &w, &b2)
    });
}

#[test]
fn large_batches_run_in_chunks() {
    // Buffers capped at 8 MiB (`GpuOptions::buffer_limit`), which one chunk then is, as at
    // the adapter's own limit. 24 images of 3×64×64 with 20 filters of 3×3 ("same"):
    // Winograd, whose transformed tiles (24·16·20·32·32·4 B ≈ 31 MB) take several chunks
    // (the weight gradient's per-chunk products then add up), and, forced, im2col
    // (24·27·64·64·4 B ≈ 10.6 MB): the batch is split and later chunks start past the first
    // image. At 63×63 (3,969 positions, not a multiple of 4; two chunks, the second from
    // image 19) im2col lays each chunk's images side by side: one product forward
    // (columns_to_images writing it back as images), dy side by side too
    // (images_to_columns) for dW, the second chunk adding to the first's sums, and for
    // dcol = Wᵀ·dy, which col2im reads side by side.
    let Some(gpu) = capped_gpu(8 << 20) else {
        return;
    };
    let gpu = &gpu;
    let b = random(&[20], 7);
    let w = random(&[20, 3, 3, 3], 6);
    // The CPU's results once per side, for each kernel there.
    let cases = [
        (64, &[ConvKernel::Winograd, ConvKernel::Im2colMatmul][..]),
        (63, &[ConvKernel::Im2colMatmul][..]),
    ];
    for (side, kernels) in cases {
        let x = random(&[24, 3, side, side], 5);
        let col_bytes = 24 * 27 * side * side * 4;
        assert!(col_bytes as u64 > gpu.limits().max_storage_buffer_binding_size);
        let same = Conv2d {
            padding: Padding::Same,
            ..Conv2d::default()
        };
        let expected = wgcnn::cpu::conv2d(&same, &x.view(), &w.view(), Some(&b.view())).unwrap();
        let dy = random(expected.shape(), 8);
        let cpu = wgcnn::cpu::conv2d_backward(&same, &x.view(), &w.view(), &dy.view()).unwrap();
        let upload = |a: &wgcnn::ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
        let (tx, tw, tb, tdy) = (upload(&x), upload(&w), upload(&b), upload(&dy));
        for &kernel in kernels {
            let spec = Conv2d {
                kernel: Some(kernel),
                ..same
            };
            let shape = spec.shape(x.shape(), w.shape(), None).unwrap();
            // dx may run as a direct convolution of dy; the forward pass and dW take the
            // chunks (and at 63×63 dx too, through col2im).
            let plan = spec.plan(gpu, &shape).unwrap();
            assert_eq!(plan.forward, kernel, "{}", plan.label());
            assert_eq!(plan.weight_grad, kernel, "{}", plan.label());
            assert!(side == 64 || plan.input_grad == kernel, "{}", plan.label());
            let y = spec.forward(&tx, &tw, Some(&tb)).unwrap();
            assert!(max_abs_diff(&y.to_array().unwrap(), &expected) < 1e-4);
            let g = spec.backward(&tx, &tw, &tdy).unwrap();
            assert!(max_abs_diff(&g.x.to_array().unwrap(), &cpu.x) < 1e-4);
            let dw_scale = cpu.weight.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&g.weight.to_array().unwrap(), &cpu.weight);
            assert!(
                diff < 1e-4 * dw_scale,
                "{kernel:?} at {side}²: dW off by {diff} (scale {dw_scale})"
            );
            // Winograd's bias gradient adds up each chunk's sums of its transformed dy.
            let diff = max_abs_diff(&g.bias.to_array().unwrap(), &cpu.bias);
            let db_scale = cpu.bias.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(
                diff < 1e-4 * db_scale,
                "{kernel:?} at {side}²: db off by {diff} (scale {db_scale})"
            );
        }
    }
}

#[test]
fn wide_weight_gradients_are_summed_in_chunks() {
    let Some(gpu) = gpu() else { return };
    // (batch, in, out, kernel, padding, family): 16·512·4608·4 B = 151 MB of 3×3 products;
    // 40·2048·512·4 B = 168 MB of 1×1 products. The 3×3 layer's families are forced (its
    // weight gradient would otherwise run as Winograd, whose partial sums do not grow with
    // the batch).
    for (n, c, o, k, p, kernel) in [
        (16, 512, 512, 3, 1, Some(ConvKernel::Im2colMatmul)),
        (16, 512, 512, 3, 1, Some(ConvKernel::ImplicitGemm)),
        (40, 512, 2048, 1, 0, None),
    ] {
        let spec = Conv2d {
            padding: Padding::Explicit(p, p),
            kernel,
            ..Conv2d::default()
        };
        let (x, w) = (random(&[n, c, 2, 1], 11), random(&[o, c, k, k], 12));
        let shape = spec.shape(x.shape(), w.shape(), None).unwrap();
        let partials = (n * o * shape.taps()) as u64 * 4;
        assert!(partials > gpu.limits().max_storage_buffer_binding_size.min(128 << 20));
        let dy = random(&shape.output(), 13);
        let cpu = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        let g = spec
            .backward(&upload(&x), &upload(&w), &upload(&dy))
            .unwrap();
        let scale = |a: &ArrayD<f32>| a.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let dw = g.weight.to_array().unwrap();
        assert!(
            max_abs_diff(&dw, &cpu.weight) < 1e-4 * scale(&cpu.weight),
            "{k}×{k} dW"
        );
        assert!(max_abs_diff(&g.x.to_array().unwrap(), &cpu.x) < 1e-4 * scale(&cpu.x));
        assert!(max_abs_diff(&g.bias.to_array().unwrap(), &cpu.bias) < 1e-4 * scale(&cpu.bias));
    }
}

#[test]
fn bad_hyper_parameters_and_shapes_are_errors() {
    let x = [1, 3, 8, 8];
    let w = [4, 3, 3, 3];
    let message = |spec: Conv2d, x: &[usize], w: &[usize], b: Option<&[usize]>| {
        spec.shape(x, w, b).unwrap_err().to_string()
    };
    let m = message(
        Conv2d {
            stride: (0, 1),
            ..Conv2d::default()
        },
        &x,
        &w,
        None,
    );
    assert!(m.contains("stride (0, 1) must be at least 1"), "{m}");
    let m = message(
        Conv2d {
            dilation: (1, 0),
            ..Conv2d::default()
        },
        &x,
        &w,
        None,
    );
    assert!(m.contains("dilation (1, 0) must be at least 1"), "{m}");
    let m = message(Conv2d::default(), &[1, 3, 2, 8], &w, None);
    assert!(
        m.contains("the kernel spans 3 rows") && m.contains("padded input has only 2"),
        "{m}"
    );
    let dilated = Conv2d {
        dilation: (3, 1),
        padding: Padding::Explicit(1, 0),
        ..Conv2d::default()
    };
    let m = message(dilated, &[1, 3, 4, 8], &w, None);
    assert!(
        m.contains("spans 7 rows (size 3, dilation 3) but the padded input has only 6"),
        "{m}"
    );
    let m = message(Conv2d::default(), &[1, 2, 8, 8], &w, None);
    assert!(
        m.contains("input has 2 channels but the weight expects 3"),
        "{m}"
    );
    let m = message(Conv2d::default(), &x, &w, Some(&[5]));
    assert!(m.contains("bias must be [4]"), "{m}");
    for groups in [0, 2, 3] {
        // 0 groups; 2 does not divide 3 channels; 3 does not divide 4 filters.
        let spec = Conv2d {
            groups,
            ..Conv2d::default()
        };
        let m = message(spec, &x, &[4, 1, 3, 3], None);
        assert!(
            m.contains(&format!(
                "groups {groups} must be at least 1 and divide both the 3 input channels and the 4 filters"
            )),
            "{m}"
        );
    }
    let depthwise = Conv2d {
        groups: 3,
        ..Conv2d::default()
    };
    let m = message(depthwise, &x, &[6, 3, 3, 3], None);
    assert!(
        m.contains(
            "input has 1 channels per group (3 channels / 3 groups) but the weight expects 3"
        ),
        "{m}"
    );
    let m = message(
        Conv2d {
            stride: (2, 2),
            padding: Padding::Same,
            ..Conv2d::default()
        },
        &x,
        &w,
        None,
    );
    assert!(m.contains("padding Same needs stride (1, 1)"), "{m}");
    let m = message(Conv2d::default(), &[8, 8], &w, None);
    assert!(m.contains("must be [N, C, H, W]"), "{m}");
    assert!(matches!(
        Conv2d::default().shape(&[0, 3, 8, 8], &w, None),
        Err(Error::EmptyDimension { .. })
    ));
    // A kernel larger than the padded input on the column axis only.
    let m = message(Conv2d::default(), &[1, 3, 8, 2], &w, None);
    assert!(m.contains("columns"), "{m}");
    // Backward with a fused activation is refused, not silently wrong.
    let spec = Conv2d {
        activation: Activation::Relu,
        ..Conv2d::default()
    };
    let (xs, ws) = (random(&x, 1), random(&w, 2));
    let dy = random(&[1, 4, 6, 6], 3);
    let err = wgcnn::cpu::conv2d_backward(&spec, &xs.view(), &ws.view(), &dy.view()).unwrap_err();
    assert!(err.to_string().contains("Activation::None"), "{err}");
    let wrong_dy = random(&[1, 4, 5, 6], 3);
    let err =
        wgcnn::cpu::conv2d_backward(&Conv2d::default(), &xs.view(), &ws.view(), &wrong_dy.view())
            .unwrap_err();
    assert!(
        err.to_string()
            .contains("dy is [1, 4, 5, 6], the output is [1, 4, 6, 6]"),
        "{err}"
    );
}

#[test]
fn both_read_families_match_the_cpu() {
    // Contexts forced to read operands from storage and through textures, whatever this
    // host's calibration picks.
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    let reads = gpus.map(|gpu| gpu.operand_reads().unwrap());
    assert_eq!(
        reads,
        [
            wgcnn::tuning::OperandReads::Storage,
            wgcnn::tuning::OperandReads::Texture
        ]
    );
    for gpu in gpus {
        forced_reads_match_the_cpu(gpu);
    }
}

/// The direct convolution (forward and input gradient) and the im2col path's matmuls on a
/// context whose operand reads are forced, against the CPU reference.
fn forced_reads_match_the_cpu(gpu: &wgcnn::Gpu) {
    // (n, c, h, w, o, k, padding, stride): LeNet's layers, shapes that fill no block, a
    // large input spanning several texture rows, and a strided one (im2col + matmul).
    let cases = [
        (3, 1, 28, 28, 6, 5, Padding::Explicit(0, 0), (1, 1)),
        (2, 6, 12, 12, 16, 5, Padding::Explicit(0, 0), (1, 1)),
        (2, 3, 9, 13, 7, 3, Padding::Same, (1, 1)),
        (4, 5, 40, 37, 3, 3, Padding::Explicit(1, 2), (1, 1)),
        (2, 3, 11, 10, 4, 3, Padding::Explicit(1, 1), (2, 2)),
    ];
    for (i, (n, c, h, w, o, k, padding, stride)) in cases.into_iter().enumerate() {
        let spec = Conv2d {
            padding,
            stride,
            activation: Activation::Relu,
            ..Conv2d::default()
        };
        let seed = 40 + 3 * i as u64;
        let (x, weight, bias) = (
            random(&[n, c, h, w], seed),
            random(&[o, c, k, k], seed + 1),
            random(&[o], seed + 2),
        );
        let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
        let label = format!("{} {shape:?}", spec.plan(gpu, &shape).unwrap().label());
        matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &label);
    }
}

/// Random x, weight and bias for a layer of these input and weight shapes.
fn layer_tensors(
    x: [usize; 4],
    weight: [usize; 4],
    seed: u64,
) -> (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) {
    let bias = random(&weight[..1], seed + 2);
    (random(&x, seed), random(&weight, seed + 1), bias)
}

/// `spec`'s forward pass (output poisoned first) and its backward pass without the
/// activation (dx, dW; inputs poisoned first) on `gpu` against the CPU, within the
/// tolerances of the same sums in another order; `label` names the case in failures.
fn matches_the_cpu(
    gpu: &wgcnn::Gpu,
    spec: Conv2d,
    (x, weight, bias): (&ArrayD<f32>, &ArrayD<f32>, &ArrayD<f32>),
    seed: u64,
    label: &str,
) {
    let up = |a: &ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
    let poison = |shape: &[usize]| drop(Tensor::full(gpu, shape, f32::NAN).unwrap());
    let (tx, tw, tb) = (up(x), up(weight), up(bias));
    let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
    let want = wgcnn::cpu::conv2d(&spec, &x.view(), &weight.view(), Some(&bias.view())).unwrap();
    poison(&shape.output());
    let got = spec
        .forward(&tx, &tw, Some(&tb))
        .unwrap()
        .to_array()
        .unwrap();
    let tolerance = 1e-5 * (shape.taps() as f32).sqrt() * 4.0 + 1e-5;
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= tolerance, "{label} forward: {diff}");

    let linear = Conv2d {
        activation: Activation::None,
        ..spec
    };
    let dy = random(&shape.output(), seed + 3);
    let cpu = wgcnn::cpu::conv2d_backward(&linear, &x.view(), &weight.view(), &dy.view()).unwrap();
    poison(x.shape());
    let g = linear.backward(&tx, &tw, &up(&dy)).unwrap();
    let diff = max_abs_diff(&g.x.to_array().unwrap(), &cpu.x);
    let tolerance = 1e-5 * ((shape.o * shape.kh * shape.kw) as f32).sqrt() * 4.0 + 1e-5;
    assert!(diff <= tolerance, "{label} dx: {diff}");
    let diff = max_abs_diff(&g.weight.to_array().unwrap(), &cpu.weight);
    let tolerance = 1e-5 * ((shape.n * shape.positions()) as f32).sqrt() * 4.0 + 1e-5;
    assert!(diff <= tolerance, "{label} dw: {diff}");
    let diff = max_abs_diff(&g.bias.to_array().unwrap(), &cpu.bias);
    assert!(diff <= tolerance, "{label} db: {diff}");
}

#[test]
fn asymmetric_padding_matches_pytorch_pad_then_conv() {
    let goldens = cases("asympad_conv2d_");
    assert!(goldens.len() >= 3);
    for case in goldens {
        let j = &case.json;
        let p = &j["params"];
        let side = |name: &str| p[name].as_u64().unwrap() as usize;
        let spec = Conv2d {
            stride: pair(&p["stride"]),
            padding: Padding::Asymmetric {
                top: side("top"),
                bottom: side("bottom"),
                left: side("left"),
                right: side("right"),
            },
            ..Conv2d::default()
        };
        let (x, w, b) = (
            tensor(&j["inputs"]["x"]),
            tensor(&j["inputs"]["weight"]),
            tensor(&j["inputs"]["bias"]),
        );
        let (want_y, dy) = (tensor(&j["outputs"]["y"]), tensor(&j["grad_outputs"]["y"]));
        let grads = &j["grads"];
        let y = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), Some(&b.view())).unwrap();
        assert_close(&format!("{} cpu y", case.name), &y, &want_y, 1e-4, 1e-5);
        let g = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        for (what, got) in [("x", &g.x), ("weight", &g.weight), ("bias", &g.bias)] {
            assert_close(
                &format!("{} cpu d{what}", case.name),
                got,
                &tensor(&grads[what]),
                1e-4,
                1e-5,
            );
        }
        if gpu().is_none() {
            continue;
        }
        let (tx, tw) = (upload(&x), upload(&w));
        let y = spec
            .forward(&tx, &tw, Some(&upload(&b)))
            .unwrap()
            .to_array()
            .unwrap();
        assert_close(&format!("{} gpu y", case.name), &y, &want_y, 1e-4, 1e-5);
        let g = spec.backward(&tx, &tw, &upload(&dy)).unwrap();
        for (what, got) in [("x", g.x), ("weight", g.weight), ("bias", g.bias)] {
            let got = got.to_array().unwrap();
            assert_close(
                &format!("{} gpu d{what}", case.name),
                &got,
                &tensor(&grads[what]),
                1e-4,
                1e-5,
            );
        }
    }
    // Sizes that overflow are errors, not wraps.
    let x = random(&[1, 1, 5, 5], 1);
    let w = random(&[1, 1, 3, 3], 2);
    for padding in [
        Padding::Explicit(1 << 63, 0),
        Padding::Asymmetric {
            top: 1,
            bottom: usize::MAX,
            left: 0,
            right: 0,
        },
        Padding::Asymmetric {
            top: 0,
            bottom: 0,
            left: usize::MAX,
            right: 1,
        },
    ] {
        let spec = Conv2d {
            padding,
            ..Conv2d::default()
        };
        let err = spec.shape(x.shape(), w.shape(), None).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{padding:?}: {err}"
        );
    }
}

/// MobileNet's depthwise-separable block (depthwise 3×3, batch norm, ReLU, pointwise 1×1,
/// batch norm, ReLU) under a classifier head, trained on a task it can only solve by
/// looking at space: which quadrant of the image is bright.
#[test]
fn a_mobilenet_depthwise_separable_block_trains_on_gpu_and_cpu() {
    use wgcnn::nn::{
        BatchNorm2d, Conv2d as Layer, Flatten, GlobalAvgPool, Linear, Sequential, relu,
    };
    use wgcnn::train::train_step;
    use wgcnn::{Device, Optimizer};

    let n = 16;
    let labels: Vec<usize> = (0..n).map(|i| i % 4).collect();
    let mut x = random(&[n, 3, 8, 8], 40).mapv(|v| 0.1 * v);
    for (i, &label) in labels.iter().enumerate() {
        let (top, left) = (4 * (label / 2), 4 * (label % 2));
        for c in 0..3 {
            for r in top..top + 4 {
                for col in left..left + 4 {
                    x[[i, c, r, col]] += 1.0;
                }
            }
        }
    }
    // A layer whose groups do not divide its channels is refused when the model is built.
    let err = Sequential::new()
        .add("bad", Layer::new(6, 4, (3, 3)).groups(4))
        .build_for(&[1, 6, 8, 8], Device::Cpu, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(
            "groups 4 must be at least 1 and divide both in_channels 6 and out_channels 4"
        ),
        "{err}"
    );
    let mut devices = vec![Device::Cpu];
    if let Some(gpu) = gpu() {
        devices.push(Device::Gpu(gpu.clone()));
    }
    let mut curves = Vec::new();
    for device in devices {
        let mut model = Sequential::new()
            .add("stem", Layer::new(3, 8, (3, 3)).padding(Padding::Same))
            .add("stem_relu", relu())
            .add(
                "depthwise",
                Layer::new(8, 8, (3, 3))
                    .groups(8)
                    .padding(Padding::Same)
                    .no_bias(),
            )
            .add("bn1", BatchNorm2d::new(8))
            .add("relu1", relu())
            .add("pointwise", Layer::new(8, 16, (1, 1)).no_bias())
            .add("bn2", BatchNorm2d::new(16))
            .add("relu2", relu())
            .add("pool", GlobalAvgPool)
            .add("flatten", Flatten)
            .add("fc", Linear::new(16, 4))
            .build(device.clone(), 3)
            .unwrap();
        let checkpoint = model.checkpoint().unwrap();
        let depthwise = checkpoint
            .tensors
            .iter()
            .find(|(name, _)| name == "depthwise.weight");
        assert_eq!(depthwise.unwrap().1.shape(), &[8, 1, 3, 3]);
        let mut opt = model.optimizer(Optimizer::adam(2e-2)).unwrap();
        let losses: Vec<f32> = (0..40)
            .map(|_| {
                let out = train_step(&mut model, &mut opt, |d| d.upload(x.clone()), &labels);
                out.unwrap().loss.to_array().unwrap()[[0]]
            })
            .collect();
        assert!(
            losses[39] < 0.25 * losses[0],
            "{}: {losses:?}",
            device.name()
        );
        curves.push(losses);
    }
    if let [cpu, gpu] = &curves[..] {
        for (step, (a, b)) in cpu.iter().zip(gpu).take(10).enumerate() {
            assert!(
                (a - b).abs() < 1e-3 * (1.0 + a.abs()),
                "step {step}: {a} vs {b}"
            );
        }
    }
}

/// Groups with long sums (≥ 64 taps each) take im2col and one matmul product per image and
/// group (middling ones, for their backward pass only); against the CPU, with bias and ReLU, strides, padding, dilation, a channel
/// multiplier, and a batch large enough to run in two chunks.
#[test]
fn grouped_convolutions_with_long_sums_run_as_matmuls() {
    let Some(gpu) = gpu() else { return };
    let cases = [
        // (x, weight, groups, stride, padding, dilation)
        ([2, 16, 9, 11], [12, 8, 3, 3], 2, (1, 1), (1, 1), (1, 1)),
        // 36 taps per group (ResNeXt): direct forward, matmul backward.
        ([2, 16, 7, 9], [32, 4, 3, 3], 4, (1, 1), (1, 1), (1, 1)),
        ([3, 12, 10, 7], [8, 3, 5, 5], 4, (2, 1), (2, 0), (1, 1)),
        ([1, 32, 8, 8], [64, 16, 2, 3], 2, (1, 2), (0, 1), (2, 1)),
        ([40, 16, 64, 64], [4, 8, 3, 3], 2, (1, 1), (0, 0), (1, 1)),
    ];
    for (i, (xs, ws, groups, stride, (ph, pw), dilation)) in cases.into_iter().enumerate() {
        let spec = Conv2d {
            stride,
            padding: Padding::Explicit(ph, pw),
            dilation,
            groups,
            activation: Activation::None,
            kernel: None,
        };
        let seed = 100 + 10 * i as u64;
        let (x, w, b) = (
            random(&xs, seed),
            random(&ws, seed + 1),
            random(&ws[..1], seed + 2),
        );
        let shape = spec.shape(&xs, &ws, None).unwrap();
        let expected = if shape.taps() >= 64 {
            "grouped im2col+matmul"
        } else {
            "grouped direct, im2col+matmul backward"
        };
        assert_eq!(spec.plan(gpu, &shape).unwrap().label(), expected);
        let relu = Conv2d {
            activation: Activation::Relu,
            ..spec
        };
        let want = wgcnn::cpu::conv2d(&relu, &x.view(), &w.view(), Some(&b.view())).unwrap();
        let (tx, tw) = (upload(&x), upload(&w));
        drop(Tensor::full(gpu, want.shape(), f32::NAN).unwrap());
        let got = relu
            .forward(&tx, &tw, Some(&upload(&b)))
            .unwrap()
            .to_array()
            .unwrap();
        let tolerance = 1e-5 * (shape.taps() as f32).sqrt() * 4.0;
        assert!(
            max_abs_diff(&got, &want) <= tolerance,
            "case {i} forward: {}",
            max_abs_diff(&got, &want)
        );
        let unbiased = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), None).unwrap();
        let got = spec.forward(&tx, &tw, None).unwrap().to_array().unwrap();
        assert!(
            max_abs_diff(&got, &unbiased) <= tolerance,
            "case {i} forward without bias"
        );

        let dy = random(&shape.output(), seed + 3);
        let cpu = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        let tdy = upload(&dy);
        drop(Tensor::full(gpu, &xs, f32::NAN).unwrap());
        drop(Tensor::full(gpu, &ws, f32::NAN).unwrap());
        let g = spec.backward(&tx, &tw, &tdy).unwrap();
        let sums = (shape.n * shape.positions()) as f32;
        for (what, got, want, terms) in [
            (
                "dx",
                g.x.to_array().unwrap(),
                cpu.x,
                (ws[0] / groups * ws[2] * ws[3]) as f32,
            ),
            ("dw", g.weight.to_array().unwrap(), cpu.weight, sums),
            ("db", g.bias.to_array().unwrap(), cpu.bias, sums),
        ] {
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff <= 1e-5 * terms.sqrt() * 4.0 + 1e-5,
                "case {i} {what}: {diff}"
            );
        }
    }
}

/// A 1×1 convolution at stride 1 without padding reads the input as its im2col buffer and
/// writes dx straight from the matmul; against the CPU with bias and ReLU, forward and
/// backward (filter banks too large for the direct kernels, dilation ignored by a 1×1).
#[test]
fn pointwise_convolutions_skip_im2col() {
    let Some(gpu) = gpu() else { return };
    for (i, (xs, o, dilation)) in [
        ([2, 24, 7, 9], 32, (1, 1)),
        ([3, 5, 4, 4], 40, (2, 3)),
        ([1, 64, 13, 1], 17, (1, 1)),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = Conv2d {
            dilation,
            ..Conv2d::default()
        };
        let ws = [o, xs[1], 1, 1];
        let seed = 300 + 10 * i as u64;
        let (x, w, b) = (
            random(&xs, seed),
            random(&ws, seed + 1),
            random(&[o], seed + 2),
        );
        let shape = spec.shape(&xs, &ws, None).unwrap();
        assert_eq!(spec.plan(gpu, &shape).unwrap().label(), "pointwise matmul");
        let relu = Conv2d {
            activation: Activation::Relu,
            ..spec
        };
        let want = wgcnn::cpu::conv2d(&relu, &x.view(), &w.view(), Some(&b.view())).unwrap();
        let (tx, tw) = (upload(&x), upload(&w));
        drop(Tensor::full(gpu, want.shape(), f32::NAN).unwrap());
        let got = relu
            .forward(&tx, &tw, Some(&upload(&b)))
            .unwrap()
            .to_array()
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4, "case {i} forward");
        let dy = random(want.shape(), seed + 3);
        let cpu = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        let tdy = upload(&dy);
        drop(Tensor::full(gpu, &xs, f32::NAN).unwrap());
        drop(Tensor::full(gpu, &ws, f32::NAN).unwrap());
        let g = spec.backward(&tx, &tw, &tdy).unwrap();
        for (what, got, want) in [
            ("dx", g.x.to_array().unwrap(), cpu.x),
            ("dw", g.weight.to_array().unwrap(), cpu.weight),
            ("db", g.bias.to_array().unwrap(), cpu.bias),
        ] {
            assert!(
                max_abs_diff(&got, &want) < 1e-4,
                "case {i} {what}: {}",
                max_abs_diff(&got, &want)
            );
        }
    }
}

/// A depthwise weight gradient over more products than one pass's lanes may walk (300
/// images of 64×64: 1.2 million per weight; of 30×30, rows that are not whole vec4s, for the
/// scalar kernel) runs in passes over runs of images, each adding to the last, and matches
/// the CPU.
#[test]
fn grouped_weight_gradients_of_long_batches_run_in_passes() {
    let Some(gpu) = gpu() else { return };
    let spec = Conv2d {
        padding: Padding::Explicit(1, 1),
        groups: 2,
        ..Conv2d::default()
    };
    for (i, side) in [64, 30].into_iter().enumerate() {
        let seed = 41 + 10 * i as u64;
        let (x, w) = (
            random(&[300, 2, side, side], seed),
            random(&[2, 1, 3, 3], seed + 1),
        );
        let shape = spec.shape(x.shape(), w.shape(), None).unwrap();
        assert_eq!(
            spec.plan(gpu, &shape).unwrap().weight_grad,
            ConvKernel::GroupedDirect
        );
        let dy = random(&shape.output(), seed + 2);
        let cpu = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        let g = spec
            .backward(&upload(&x), &upload(&w), &upload(&dy))
            .unwrap();
        let scale = cpu.weight.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&g.weight.to_array().unwrap(), &cpu.weight);
        assert!(
            diff < 1e-4 * scale,
            "{side}²: dW off by {diff} (scale {scale})"
        );
    }
}

/// Convolutions whose kernels would loop past the loop bound: a 2×69,998 kernel (its forward
/// matmul sums K = 279,992 in passes; col2im walked 70,000 taps per input pixel, past
/// lavapipe's 65,535-iteration cap, and now only the windows that hold the pixel) and a
/// grouped convolution with 65,600 filters per group (gathered per pixel by the grouped
/// kernel, which the im2col path now takes). Forward and every gradient match the CPU.
#[test]
fn input_gradients_past_the_loop_bound_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cases = [
        (Conv2d::default(), [1, 2, 2, 70_000], [3, 2, 2, 69_998]),
        (
            Conv2d {
                padding: Padding::Explicit(1, 1),
                groups: 2,
                ..Conv2d::default()
            },
            [1, 2, 6, 5],
            [131_200, 1, 3, 3],
        ),
    ];
    for (i, (spec, x_shape, w_shape)) in cases.into_iter().enumerate() {
        let (x, w) = (random(&x_shape, 51), random(&w_shape, 52));
        let shape = spec.shape(x.shape(), w.shape(), None).unwrap();
        assert_eq!(
            spec.plan(gpu, &shape).unwrap().input_grad,
            ConvKernel::Im2colMatmul,
            "case {i}"
        );
        let dy = random(&shape.output(), 53);
        let y = wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), None).unwrap();
        let cpu = wgcnn::cpu::conv2d_backward(&spec, &x.view(), &w.view(), &dy.view()).unwrap();
        let (tx, tw) = (upload(&x), upload(&w));
        let got_y = spec.forward(&tx, &tw, None).unwrap().to_array().unwrap();
        let g = spec.backward(&tx, &tw, &upload(&dy)).unwrap();
        for (what, got, want) in [
            ("y", got_y, y),
            ("dx", g.x.to_array().unwrap(), cpu.x),
            ("dw", g.weight.to_array().unwrap(), cpu.weight),
        ] {
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff < 1e-4 * scale,
                "case {i} {what}: off by {diff} (scale {scale})"
            );
        }
    }
}

/// 3×3 convolutions at stride 1 with more than the direct kernels' 16 filters run as Winograd
/// F(2×2, 3×3), forward and input gradient, on contexts forced to each operand-read family:
/// outputs of odd sizes (tiles past the edge), 2×2 blocks of tiles stored as rows of vec4s
/// (8×8, and 7×12 with a half block past the last row), paddings 0–2, "same", per-axis, and 3 (dx then
/// takes im2col), a fused bias and activation, poisoned outputs; against the CPU within the
/// direct kernels' tolerance (Winograd's transforms multiply by ±1 and ½ only).
#[test]
fn winograd_convolutions_match_the_cpu() {
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    // (n, c, h, w, o, padding, activation, dx's kernel: direct for up to 16 channels)
    let (winograd, direct, im2col) = (
        ConvKernel::Winograd,
        ConvKernel::Direct,
        ConvKernel::Im2colMatmul,
    );
    let cases = [
        (
            2,
            17,
            9,
            7,
            17,
            Padding::Explicit(0, 0),
            Activation::None,
            winograd,
        ),
        (
            3,
            20,
            11,
            13,
            24,
            Padding::Explicit(1, 1),
            Activation::Relu,
            winograd,
        ),
        (
            1,
            3,
            8,
            8,
            33,
            Padding::Same,
            Activation::LeakyRelu(0.1),
            direct,
        ),
        (
            2,
            18,
            6,
            5,
            19,
            Padding::Explicit(2, 1),
            Activation::None,
            winograd,
        ),
        (
            1,
            17,
            7,
            9,
            20,
            Padding::Explicit(3, 3),
            Activation::Tanh,
            im2col,
        ),
        // 9 tiles an image: the transforms take one tile an invocation.
        (
            4,
            17,
            6,
            6,
            18,
            Padding::Explicit(1, 1),
            Activation::Relu,
            winograd,
        ),
        // 4×6 tiles in 2×2 blocks over rows of whole vec4s, the last row of blocks half past
        // the output (7 rows): forward and dx store rows of vec4s, the input and dy
        // transforms read them (`…_rows4`), the input's a vec4 past each side.
        (
            2,
            17,
            7,
            12,
            20,
            Padding::Explicit(1, 1),
            Activation::Relu,
            winograd,
        ),
        // Padded by 3: the blocks' inputs begin 1 past a vec4's start (by 1: 3 past).
        (
            1,
            17,
            8,
            8,
            20,
            Padding::Explicit(3, 3),
            Activation::None,
            im2col,
        ),
    ];
    for gpu in gpus {
        for (i, (n, c, h, w, o, padding, activation, dx_kernel)) in cases.into_iter().enumerate() {
            let spec = Conv2d {
                padding,
                activation,
                ..Conv2d::default()
            };
            let seed = 70 + 4 * i as u64;
            let (x, weight, bias) = layer_tensors([n, c, h, w], [o, c, 3, 3], seed);
            let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
            let plan = spec.plan(gpu, &shape).unwrap();
            assert_eq!(plan.forward, ConvKernel::Winograd, "case {i}");
            assert_eq!(plan.input_grad, dx_kernel, "case {i}");
            matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &format!("case {i}"));
        }
    }
}

/// Winograd layers of one shape that differ in their epilogue share every pipeline: the input
/// transform reads only the input's shape, and the output transform takes the bias and ReLU
/// as uniforms (as `override` constants each set was a kernel of its own to compile, 50–140 ms
/// apiece on lavapipe). With a bias or without, ReLU or the identity, the first layer alone
/// compiles, every forward matching the CPU with its output poisoned. Fresh contexts forced to
/// each operand-read family, so that the count is theirs alone.
#[test]
fn winograd_layers_differing_in_their_epilogue_share_every_pipeline() {
    use wgcnn::tuning::OperandReads;
    let Some(_) = gpu() else { return };
    let (x, weight, bias) = layer_tensors([2, 20, 9, 11], [24, 20, 3, 3], 91);
    for reads in [OperandReads::Storage, OperandReads::Texture] {
        let gpu = wgcnn::Gpu::with_options(wgcnn::GpuOptions {
            operand_reads: Some(reads),
            ..common::options()
        })
        .unwrap();
        let (tx, tw, tb) = (
            Tensor::from_array(&gpu, &x).unwrap(),
            Tensor::from_array(&gpu, &weight).unwrap(),
            Tensor::from_array(&gpu, &bias).unwrap(),
        );
        let mut compiled = None;
        for (with_bias, activation) in [
            (true, Activation::Relu),
            (false, Activation::None),
            (true, Activation::None),
            (false, Activation::Relu),
        ] {
            let spec = Conv2d {
                padding: Padding::Explicit(1, 1),
                activation,
                ..Conv2d::default()
            };
            let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
            let plan = spec.plan(&gpu, &shape).unwrap();
            assert_eq!(plan.forward, ConvKernel::Winograd);
            let cpu_bias = with_bias.then(|| bias.view());
            let want =
                wgcnn::cpu::conv2d(&spec, &x.view(), &weight.view(), cpu_bias.as_ref()).unwrap();
            drop(Tensor::full(&gpu, &shape.output(), f32::NAN).unwrap());
            let got = spec.forward(&tx, &tw, with_bias.then_some(&tb)).unwrap();
            let diff = max_abs_diff(&got.to_array().unwrap(), &want);
            let tolerance = 1e-5 * (shape.taps() as f32).sqrt() * 4.0 + 1e-5;
            let case = format!("{reads:?} bias {with_bias} {activation:?}");
            assert!(diff <= tolerance, "{case}: {diff}");
            let count = gpu.pipelines_compiled();
            assert_eq!(
                *compiled.get_or_insert(count),
                count,
                "{case}: a pipeline of its own"
            );
        }
    }
}

/// Winograd F(4×4, 3×3), forced, on contexts forced to each operand-read family: forward, dx
/// and dW against the CPU with poisoned outputs, on outputs of sizes that leave partial 4×4
/// blocks (1 to 3 rows or columns past the last whole one), paddings 0–2 and 3 (dx then
/// takes another family), a fused bias and activation, up to 64 channels. Its transforms
/// (entries from 1/24 to 8) round about ten times more than F(2×2, 3×3)'s and still meet the
/// direct kernels' tolerance: measured, the worst error was 16 % of it forward and 11 % for
/// dW (64 channels), F(2×2, 3×3)'s 1.6 %; against PyTorch's goldens
/// (`pytorch_goldens_forward_and_backward_on_gpu_and_cpu`) forward 24 % and dx 59 % of
/// their tolerance, dW within its own (see there).
#[test]
fn winograd_4x4_convolutions_match_the_cpu() {
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    // (n, c, h, w, o, padding, activation)
    let cases = [
        (2, 5, 9, 7, 6, Padding::Explicit(0, 0), Activation::None),
        (2, 20, 11, 13, 24, Padding::Explicit(1, 1), Activation::Relu),
        (1, 64, 14, 14, 64, Padding::Explicit(1, 1), Activation::None),
        (
            2,
            18,
            6,
            5,
            19,
            Padding::Explicit(2, 1),
            Activation::LeakyRelu(0.1),
        ),
        (1, 7, 10, 9, 3, Padding::Explicit(3, 3), Activation::Tanh),
        // 9 tiles an image: one tile an invocation.
        (4, 9, 10, 10, 5, Padding::Explicit(1, 1), Activation::Relu),
        // Rows of whole vec4s (`output_rows4`), the last block row cut at 10 rows.
        (2, 6, 10, 12, 5, Padding::Explicit(1, 1), Activation::Relu),
        // 4×2 tiles: numbered in 2×2 blocks, the input and dy transforms reading rows of
        // whole vec4s (`…_rows4`), the inputs' blocks beginning 3 past a vec4's start.
        (3, 8, 16, 8, 7, Padding::Explicit(1, 1), Activation::None),
        // Blocks of tiles at paddings 0 and 2 (and dx of a layer padded by 0, by 2): rows of
        // vec4s read from their start and 2 past it.
        (2, 6, 16, 16, 5, Padding::Explicit(0, 0), Activation::Relu),
        (1, 5, 12, 12, 6, Padding::Explicit(2, 2), Activation::None),
        (1, 4, 14, 14, 3, Padding::Explicit(0, 0), Activation::None),
        // Padded by 3: rows of vec4s read from 1 past their start.
        (2, 4, 12, 12, 5, Padding::Explicit(3, 3), Activation::None),
    ];
    for gpu in gpus {
        for (i, (n, c, h, w, o, padding, activation)) in cases.into_iter().enumerate() {
            let spec = Conv2d {
                padding,
                activation,
                kernel: Some(ConvKernel::Winograd4),
                ..Conv2d::default()
            };
            let seed = 130 + 4 * i as u64;
            let (x, weight, bias) = layer_tensors([n, c, h, w], [o, c, 3, 3], seed);
            let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
            let plan = spec.plan(gpu, &shape).unwrap();
            assert_eq!(plan.forward, ConvKernel::Winograd4, "case {i}");
            assert_eq!(plan.weight_grad, ConvKernel::Winograd4, "case {i}");
            // Padded by 3, dx is no Winograd's.
            let padded_by_3 = padding == Padding::Explicit(3, 3);
            assert_eq!(
                plan.input_grad == ConvKernel::Winograd4,
                !padded_by_3,
                "case {i}"
            );
            matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &format!("case {i}"));
        }
    }
}

/// Both Winograd families, forced, compiled with wgpu's runtime checks on (CI runs the rest
/// of this file without them: they make lavapipe's JIT ~5.4× slower): forward, dx and dW
/// against the CPU with poisoned outputs, on one shape each that reaches one kind of
/// transform (2×2 blocks of tiles over rows of whole vec4s; odd sizes with partial blocks),
/// each on a context forced to one operand-read family, as each checked case costs ~13 s
/// of JIT on lavapipe. A transform that indexed past one of its private arrays, or whose
/// results hung on reads past a buffer's end, would differ here.
#[test]
fn winograd_kernels_match_the_cpu_under_runtime_checks() {
    let Some(gpus) = checked_read_family_gpus() else {
        return;
    };
    // (kernel, x's shape, filters, padding, activation)
    let cases = [
        // 2×2 blocks of tiles over rows of whole vec4s, the last block row half past the
        // output: the `…_rows4` and `output_blocks4` transforms.
        (
            ConvKernel::Winograd,
            [2, 17, 7, 12],
            20,
            1,
            Activation::Relu,
        ),
        // Outputs of odd sizes, unpadded: partial 4×4 blocks, the plain transforms.
        (ConvKernel::Winograd4, [2, 5, 9, 7], 6, 0, Activation::None),
    ];
    // Each case on one family (F(2×2) storage, F(4×4) textures), to halve the JIT.
    for (i, (gpu, (kernel, x, o, padding, activation))) in gpus.iter().zip(cases).enumerate() {
        let spec = Conv2d {
            padding: Padding::Explicit(padding, padding),
            activation,
            kernel: Some(kernel),
            ..Conv2d::default()
        };
        let seed = 190 + 4 * i as u64;
        let (x, weight, bias) = layer_tensors(x, [o, x[1], 3, 3], seed);
        let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
        let plan = spec.plan(gpu, &shape).unwrap();
        let passes = [plan.forward, plan.input_grad, plan.weight_grad];
        assert_eq!(passes, [kernel; 3], "case {i}");
        matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &format!("case {i}"));
    }
}

/// A training step's Winograd layer keeps its input tiles V for the weight gradient
/// (`forward_saving`, `backward_saved`), F(2×2) and F(4×4), one group and two, with a fused
/// activation, on contexts forced to each operand-read family: the tiles are
/// `[points, C, N·tiles]`; the gradients with them equal those without, bit for bit, and
/// the CPU's (poisoned outputs); the weight gradient reads them (another input's tiles give
/// that input's dW, dx and db unchanged); a tensor of another shape is an error; a layer
/// that runs no Winograd forward keeps nothing.
#[test]
fn winograd_weight_gradients_take_the_forward_passes_tiles() {
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    // (n, c, o, groups, h, w)
    let cases = [
        (2, 6, 5, 1, 9, 11),
        (3, 8, 7, 1, 8, 8),
        (2, 16, 16, 2, 10, 12),
    ];
    for gpu in &gpus {
        let up = |a: &ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
        let poison = |shape: &[usize]| drop(Tensor::full(gpu, shape, f32::NAN).unwrap());
        for (kernel, tile) in [(ConvKernel::Winograd, 2), (ConvKernel::Winograd4, 4)] {
            for (i, (n, c, o, groups, h, w)) in cases.into_iter().enumerate() {
                let label = format!("{kernel:?} case {i}");
                let spec = Conv2d {
                    padding: Padding::Explicit(1, 1),
                    groups,
                    activation: Activation::Relu,
                    kernel: Some(kernel),
                    ..Conv2d::default()
                };
                let seed = 1700 + 8 * i as u64;
                let (x, weight, bias) = layer_tensors([n, c, h, w], [o, c / groups, 3, 3], seed);
                let other_x = random(&[n, c, h, w], seed + 5);
                let (tx, tw, tb) = (up(&x), up(&weight), up(&bias));
                let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
                poison(&shape.output());
                let (y, saved) = spec.forward_saving(&tx, &tw, Some(&tb)).unwrap();
                let want = wgcnn::cpu::conv2d(&spec, &x.view(), &weight.view(), Some(&bias.view()))
                    .unwrap();
                let diff = max_abs_diff(&y.to_array().unwrap(), &want);
                assert!(diff <= 1e-4, "{label} forward: {diff}");
                let saved = saved.unwrap_or_else(|| panic!("{label}: no tiles kept"));
                let tiles = h.div_ceil(tile) * w.div_ceil(tile);
                let points = (tile + 2) * (tile + 2);
                assert_eq!(saved.shape(), [points, c, n * tiles], "{label}");

                let dy = random(&shape.output(), seed + 3);
                let tdy = up(&dy);
                let linear = Conv2d {
                    activation: Activation::None,
                    ..spec
                };
                poison(x.shape());
                let with = linear.backward_saved(&tx, &tw, &tdy, Some(&saved)).unwrap();
                let without = linear.backward(&tx, &tw, &tdy).unwrap();
                let arrays = |g: &wgcnn::ops::Conv2dGrads<Tensor>| {
                    [&g.x, &g.weight, &g.bias].map(|t| t.to_array().unwrap())
                };
                let (with, without) = (arrays(&with), arrays(&without));
                assert_eq!(with, without, "{label}: the kept tiles changed a gradient");
                let cpu =
                    wgcnn::cpu::conv2d_backward(&linear, &x.view(), &weight.view(), &dy.view())
                        .unwrap();
                for (got, want, name) in [(&with[0], &cpu.x, "dx"), (&with[1], &cpu.weight, "dW")] {
                    let diff = max_abs_diff(got, want);
                    assert!(diff <= 1e-4, "{label} {name}: {diff}");
                }

                // Another input's tiles: that input's weight gradient, dx and db as before.
                let (_, other_saved) = spec.forward_saving(&up(&other_x), &tw, Some(&tb)).unwrap();
                let other_saved = other_saved.unwrap();
                let mixed = linear
                    .backward_saved(&tx, &tw, &tdy, Some(&other_saved))
                    .unwrap();
                let other = linear.backward(&up(&other_x), &tw, &tdy).unwrap();
                let mixed = arrays(&mixed);
                assert_eq!(
                    mixed[1],
                    arrays(&other)[1],
                    "{label}: dW ignored the kept tiles"
                );
                assert_eq!([&mixed[0], &mixed[2]], [&with[0], &with[2]], "{label}");

                let wrong = Tensor::full(gpu, &[points, c, n * tiles + 1], 0.0).unwrap();
                let err = linear
                    .backward_saved(&tx, &tw, &tdy, Some(&wrong))
                    .unwrap_err();
                assert!(matches!(err, Error::ShapeMismatch { .. }), "{label}: {err}");
            }
        }
        // A forward pass through another family keeps nothing.
        let spec = Conv2d {
            padding: Padding::Explicit(1, 1),
            kernel: Some(ConvKernel::ImplicitGemm),
            ..Conv2d::default()
        };
        let (x, weight, bias) = layer_tensors([2, 8, 8, 8], [8, 8, 3, 3], 1790);
        let (_, saved) = spec
            .forward_saving(&up(&x), &up(&weight), Some(&up(&bias)))
            .unwrap();
        assert!(saved.is_none());
    }
}

/// Grouped 3×3 layers with at least 8 channels and filters a group run Winograd, forced,
/// F(2×2) and F(4×4), with one point product per (point, group): forward, dx (the rotated
/// filters read across the groups) and dW against the CPU with poisoned outputs, on
/// contexts forced to each operand-read family; groups of unequal channels and filters, three
/// groups, odd sizes, paddings 0–2, a fused bias and activation. Groups of fewer channels
/// take no Winograd.
#[test]
fn grouped_winograd_matches_the_cpu() {
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    // (n, c, o, groups, h, w, padding)
    let cases = [
        (2, 16, 16, 2, 9, 12, Padding::Explicit(1, 1)),
        (1, 24, 16, 2, 7, 10, Padding::Explicit(0, 0)),
        (2, 24, 27, 3, 8, 8, Padding::Explicit(2, 2)),
        (1, 16, 32, 2, 14, 14, Padding::Explicit(1, 1)),
        // Tiles in 2×2 blocks over rows of whole vec4s: x and dy read as vec4 rows.
        (2, 16, 24, 2, 8, 8, Padding::Explicit(1, 1)),
    ];
    for gpu in &gpus {
        for kernel in [ConvKernel::Winograd, ConvKernel::Winograd4] {
            for (i, (n, c, o, groups, h, w, padding)) in cases.into_iter().enumerate() {
                let spec = Conv2d {
                    padding,
                    groups,
                    activation: Activation::Relu,
                    kernel: Some(kernel),
                    ..Conv2d::default()
                };
                let seed = 1500 + 4 * i as u64;
                let (x, weight, bias) = layer_tensors([n, c, h, w], [o, c / groups, 3, 3], seed);
                let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
                let plan = spec.plan(gpu, &shape).unwrap();
                let label = format!("{kernel:?} case {i}");
                assert_eq!(plan.forward, kernel, "{label}");
                assert_eq!(plan.input_grad, kernel, "{label}");
                assert_eq!(plan.weight_grad, kernel, "{label}");
                matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &label);
            }
        }
    }
    // Four channels a group: no Winograd, whatever is forced.
    let spec = Conv2d {
        padding: Padding::Explicit(1, 1),
        groups: 4,
        kernel: Some(ConvKernel::Winograd),
        ..Conv2d::default()
    };
    let shape = spec.shape(&[1, 16, 8, 8], &[16, 4, 3, 3], None).unwrap();
    assert_ne!(
        spec.plan(gpus[0], &shape).unwrap().forward,
        ConvKernel::Winograd
    );
}

/// Implicit GEMM, forced, on contexts forced to each operand-read family: forward, dx and
/// dW through the public entry points against the CPU with poisoned outputs, on shapes that
/// fill no tile: a stem-like 7×7 at stride 2, a strided 3×3 with more filters than a tile,
/// a strided 1×1, dilation with asymmetric padding, a fused bias and activation. (The
/// matmul families one by one: `conv_implicit`'s unit test.)
#[test]
fn implicit_gemm_convolutions_match_the_cpu() {
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    // (x, w, stride, dilation, padding, activation)
    let cases = [
        (
            [2, 3, 19, 17],
            [10, 3, 7, 7],
            2,
            1,
            Padding::Explicit(3, 3),
            Activation::Relu,
        ),
        (
            [2, 9, 13, 11],
            [70, 9, 3, 3],
            2,
            1,
            Padding::Explicit(1, 1),
            Activation::None,
        ),
        (
            [3, 12, 9, 10],
            [20, 12, 1, 1],
            2,
            1,
            Padding::Explicit(0, 0),
            Activation::None,
        ),
        (
            [1, 5, 12, 13],
            [7, 5, 3, 3],
            1,
            2,
            Padding::Asymmetric {
                top: 2,
                bottom: 0,
                left: 0,
                right: 3,
            },
            Activation::LeakyRelu(0.1),
        ),
    ];
    for gpu in gpus {
        for (i, (x, w, stride, dilation, padding, activation)) in cases.into_iter().enumerate() {
            let spec = Conv2d {
                stride: (stride, stride),
                dilation: (dilation, dilation),
                padding,
                activation,
                kernel: Some(ConvKernel::ImplicitGemm),
                ..Conv2d::default()
            };
            let seed = 90 + 4 * i as u64;
            let (x, weight, bias) = layer_tensors(x, w, seed);
            let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
            let plan = spec.plan(gpu, &shape).unwrap();
            assert_eq!(plan.label(), "implicit gemm", "case {i}");
            matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &format!("case {i}"));
        }
    }
}

/// Depthwise layers run row blocks: four or eight outputs along each of two rows per
/// invocation (one row where dilated, or strided past the filter), read as aligned vec4s
/// (stride 1, rows of whole vec4s, filters up to 5 wide) or as scalars (any other shape), dx
/// at stride 1 through the same kernels with the taps rotated, dW a subgroup per channel on
/// CPU adapters, a workgroup elsewhere (in passes over the batch). Every variant against
/// the CPU with poisoned outputs: widths that are and are not multiples of 4, odd and even
/// output heights, strides 1 to 4, dilation, 3×3 to 7×7, asymmetric and no padding, a fused
/// activation, an image too large for the weight gradient's lanes per channel.
#[test]
fn depthwise_row_kernels_match_the_cpu() {
    let Some(gpu) = gpu() else {
        return;
    };
    // (n, c, h, w, k, stride, dilation, padding)
    let cases = [
        (2, 5, 8, 12, 3, 1, 1, Padding::Explicit(1, 1)),
        (2, 5, 9, 16, 5, 1, 1, Padding::Explicit(2, 2)),
        (1, 3, 7, 8, 5, 1, 1, Padding::Explicit(1, 4)),
        (2, 4, 6, 12, 3, 1, 1, Padding::Explicit(0, 0)),
        (2, 6, 9, 13, 3, 1, 1, Padding::Same),
        (2, 5, 11, 12, 3, 2, 1, Padding::Explicit(1, 1)),
        (1, 4, 10, 12, 3, 1, 2, Padding::Explicit(2, 2)),
        (1, 3, 12, 16, 7, 1, 1, Padding::Explicit(3, 3)),
        (
            2,
            4,
            8,
            8,
            3,
            1,
            1,
            Padding::Asymmetric {
                top: 0,
                bottom: 2,
                left: 2,
                right: 0,
            },
        ),
        // 64 images of 64×64: the weight gradient runs in passes.
        (64, 2, 64, 64, 3, 1, 1, Padding::Explicit(1, 1)),
        // A kernel row meeting more inputs than the registers hold for a block (5 taps 8
        // apart, and strided): each tap loads its own.
        (1, 3, 40, 45, 5, 1, 8, Padding::Explicit(16, 16)),
        (1, 2, 21, 37, 5, 3, 3, Padding::Explicit(2, 2)),
        // Two rows a block at stride 2 with an odd output height; one at a stride past the
        // filter.
        (2, 3, 13, 15, 5, 2, 1, Padding::Explicit(2, 2)),
        (1, 2, 17, 20, 3, 4, 1, Padding::Explicit(1, 1)),
        // An image more than a subgroup's lanes may walk in one weight-gradient pass.
        (1, 2, 130, 130, 3, 1, 1, Padding::Explicit(1, 1)),
    ];
    for (i, (n, c, h, w, k, stride, dilation, padding)) in cases.into_iter().enumerate() {
        let spec = Conv2d {
            stride: (stride, stride),
            dilation: (dilation, dilation),
            padding,
            groups: c,
            activation: Activation::Relu,
            ..Conv2d::default()
        };
        let seed = 900 + 10 * i as u64;
        let (x, weight, bias) = (
            random(&[n, c, h, w], seed),
            random(&[c, 1, k, k], seed + 1),
            random(&[c], seed + 2),
        );
        matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &format!("case {i}"));
    }
}

/// Grouped layers with several channels and filters a group (ResNeXt's) run row blocks at
/// stride 1 on rows of whole vec4s: runs of 4, 2 or 1 filters of a group per invocation, one
/// or two vec4s along each of two rows, dx through the same kernel with the filters rotated
/// and channels and filters swapped, dW lanes per (filter run, channel) over the same blocks
/// (in passes over the batch). Each against the CPU with poisoned outputs, a bias and a
/// fused activation: odd output heights, 3×3 and 5×5, no, symmetric and asymmetric padding;
/// a shape whose output rows are not whole vec4s takes the per-output kernels.
#[test]
fn grouped_row_kernels_match_the_cpu() {
    let Some(gpu) = gpu() else {
        return;
    };
    let explicit = |p| Padding::Explicit(p, p);
    // (n, c, o, groups, h, w, k, padding)
    let cases = [
        (2, 8, 8, 2, 8, 12, 3, explicit(1)),
        (2, 6, 12, 3, 9, 16, 3, explicit(1)),
        (1, 12, 6, 3, 7, 8, 5, explicit(2)),
        (2, 4, 6, 2, 6, 14, 3, explicit(0)),
        (2, 16, 16, 4, 8, 8, 3, explicit(1)),
        (1, 6, 9, 3, 5, 13, 3, explicit(1)),
        // Four images of 64×64: the weight gradient runs in passes over them.
        (4, 8, 8, 2, 64, 64, 3, explicit(1)),
        (
            2,
            4,
            8,
            2,
            8,
            8,
            3,
            Padding::Asymmetric {
                top: 0,
                bottom: 2,
                left: 2,
                right: 0,
            },
        ),
    ];
    for (i, (n, c, o, groups, h, w, k, padding)) in cases.into_iter().enumerate() {
        let spec = Conv2d {
            padding,
            groups,
            activation: Activation::Relu,
            kernel: Some(ConvKernel::GroupedDirect),
            ..Conv2d::default()
        };
        let seed = 1300 + 10 * i as u64;
        let (x, weight, bias) = (
            random(&[n, c, h, w], seed),
            random(&[o, c / groups, k, k], seed + 1),
            random(&[o], seed + 2),
        );
        matches_the_cpu(gpu, spec, (&x, &weight, &bias), seed, &format!("case {i}"));
    }
}

/// A layer without a bias gets no bias gradient, and the same weight and input gradients as
/// with one, whichever family runs its backward pass, with and without an activation to go
/// through (the direct weight gradient sums the bias in the same pass; the others skip the sum
/// over `dy`); on the GPU and on the CPU path, against each other.
#[test]
fn backward_without_a_bias_has_no_bias_gradient() {
    use wgcnn::value::Value as V;
    if gpu().is_none() {
        return;
    }
    let (xs, ws) = ([2, 5, 9, 7], [6, 5, 3, 3]);
    let (x, w, b, dy) = (
        random(&xs, 61),
        random(&ws, 62),
        random(&ws[..1], 63),
        random(&[2, 6, 9, 7], 64),
    );
    let families = [
        ConvKernel::Direct,
        ConvKernel::Winograd,
        ConvKernel::Im2colMatmul,
        ConvKernel::ImplicitGemm,
    ];
    for kernel in families {
        for activation in [Activation::None, Activation::Relu] {
            let spec = Conv2d {
                padding: Padding::Explicit(1, 1),
                activation,
                kernel: Some(kernel),
                ..Conv2d::default()
            };
            let what = format!("{kernel:?} through {activation:?}");
            let (gx, gw) = (V::Gpu(upload(&x)), V::Gpu(upload(&w)));
            let y = gx.conv2d(&spec, &gw, Some(&V::Gpu(upload(&b)))).unwrap();
            let y = y.to_array().unwrap();
            let (gy, gdy) = (V::Gpu(upload(&y)), V::Gpu(upload(&dy)));
            let (cx, cw, cy, cdy) = (
                V::Cpu(x.clone()),
                V::Cpu(w.clone()),
                V::Cpu(y.clone()),
                V::Cpu(dy.clone()),
            );
            let cpu = cx
                .conv2d_backward(&spec, &cw, &cy, &cdy, true, true)
                .unwrap();
            let expected_bias = cpu
                .2
                .expect("a bias gradient was asked for")
                .to_array()
                .unwrap();
            let (expected_x, expected_w) = (
                cpu.0.unwrap().to_array().unwrap(),
                cpu.1.to_array().unwrap(),
            );
            let cpu_without = cx
                .conv2d_backward(&spec, &cw, &cy, &cdy, true, false)
                .unwrap();
            assert!(cpu_without.2.is_none(), "CPU {what}");
            for bias_grad in [true, false] {
                let (dx, dw, db) = gx
                    .conv2d_backward(&spec, &gw, &gy, &gdy, true, bias_grad)
                    .unwrap();
                let tolerance =
                    2e-4 * (1.0 + expected_w.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                let (dx, dw) = (dx.unwrap().to_array().unwrap(), dw.to_array().unwrap());
                assert!(
                    max_abs_diff(&dw, &expected_w) < tolerance,
                    "{what} dW, bias {bias_grad}"
                );
                assert!(
                    max_abs_diff(&dx, &expected_x) < tolerance,
                    "{what} dx, bias {bias_grad}"
                );
                match db {
                    Some(db) => {
                        assert!(bias_grad, "{what}: a bias gradient nobody asked for");
                        let db = db.to_array().unwrap();
                        assert!(max_abs_diff(&db, &expected_bias) < tolerance, "{what} db");
                    }
                    None => assert!(!bias_grad, "{what}: no bias gradient"),
                }
            }
        }
    }
}
