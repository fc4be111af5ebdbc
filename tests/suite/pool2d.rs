//! Pooling: PyTorch goldens (ties included), GPU against CPU, gradient routing, errors.

use crate::common;

use common::golden::{assert_close, cases, pair, tensor};
use common::{gpu, max_abs_diff, random, read_family_gpus, upload};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use wgcnn::ops::{Pool2d, PoolKind};
use wgcnn::{Activation, Tensor};

#[test]
fn pytorch_goldens_on_gpu_and_cpu() {
    if gpu().is_none() {
        return;
    }
    for prefix in ["maxpool2d_", "avgpool2d_"] {
        for case in cases(prefix) {
            let (json, name) = (&case.json, &case.name);
            let params = &json["params"];
            let kind = if prefix.starts_with("max") {
                PoolKind::Max
            } else {
                PoolKind::Avg {
                    count_include_pad: params["count_include_pad"].as_bool().unwrap(),
                }
            };
            let spec = Pool2d {
                kind,
                kernel: pair(&params["kernel"]),
                stride: pair(&params["stride"]),
                padding: pair(&params["padding"]),
                dilation: if params["dilation"].is_null() {
                    (1, 1)
                } else {
                    pair(&params["dilation"])
                },
                ceil_mode: params["ceil_mode"].as_bool().unwrap_or(false),
            };
            let x = tensor(&json["inputs"]["x"]);
            let dy = tensor(&json["grad_outputs"]["y"]);
            let (y, dx) = (tensor(&json["outputs"]["y"]), tensor(&json["grads"]["x"]));

            let cpu = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
            assert_close(&format!("{name} cpu y"), &cpu.y, &y, 1e-6, 1e-7);
            let cpu_dx = wgcnn::cpu::pool2d_backward(
                &spec,
                x.shape(),
                &dy.view(),
                cpu.argmax.as_ref().map(|a| a.view()).as_ref(),
            )
            .unwrap();
            assert_close(&format!("{name} cpu dx"), &cpu_dx, &dx, 1e-5, 1e-6);

            let pooled = spec.forward(&upload(&x)).unwrap();
            assert_close(
                &format!("{name} gpu y"),
                &pooled.y.to_array().unwrap(),
                &y,
                1e-6,
                1e-7,
            );
            if kind == PoolKind::Max {
                let indices = integers(&json["outputs"]["indices"]);
                assert_eq!(
                    pooled.indices().unwrap().unwrap(),
                    indices,
                    "{name} gpu indices"
                );
                assert_eq!(cpu.indices().unwrap(), indices, "{name} cpu indices");
            }
            let gpu_dx = spec
                .backward(x.shape(), &upload(&dy), pooled.argmax.as_ref())
                .unwrap();
            assert_close(
                &format!("{name} gpu dx"),
                &gpu_dx.to_array().unwrap(),
                &dx,
                1e-5,
                1e-6,
            );
        }
    }
}

/// A golden tensor of int64 values (PyTorch's indices).
fn integers(json: &serde_json::Value) -> ArrayD<i64> {
    assert_eq!(json["dtype"], "int64");
    let shape: Vec<usize> = json["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap()
}

fn kind_strategy() -> impl Strategy<Value = PoolKind> {
    prop_oneof![
        Just(PoolKind::Max),
        any::<bool>().prop_map(|count_include_pad| PoolKind::Avg { count_include_pad })
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_cpu(
        n in 1usize..3, c in 1usize..4, h in 1usize..14, w in 1usize..14,
        kh in 1usize..5, kw in 1usize..5, sh in 1usize..4, sw in 1usize..4, ph in 0usize..3, pw in 0usize..3,
        kind in kind_strategy(), seed in 0u64..1000, coarse: bool, ceil_mode: bool, dilation in 1usize..4,
    ) {
        // Dilation is for max pooling only (the shape rule refuses it for average pooling).
        let dilation = if kind == PoolKind::Max { (dilation, 1 + dilation % 2) } else { (1, 1) };
        let spec = Pool2d { kind, kernel: (kh, kw), stride: (sh, sw), padding: (ph, pw), dilation, ceil_mode };
        // Coarse values make ties common, which exercises the first-maximum rule.
        let mut x = random(&[n, c, h, w], seed);
        if coarse { x.mapv_inplace(|v| (v * 2.0).round()); }
        let Ok(shape) = spec.shape(x.shape()) else {
            prop_assert!(wgcnn::cpu::pool2d(&spec, &x.view()).is_err());
            return Ok(());
        };
        if gpu().is_none() { return Ok(()); }
        let cpu = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
        let poison = |shape: &[usize]| drop(Tensor::full(gpu().unwrap(), shape, f32::NAN).unwrap());
        poison(&shape.output());
        let pooled = spec.forward(&upload(&x)).unwrap();
        prop_assert!(max_abs_diff(&pooled.y.to_array().unwrap(), &cpu.y) <= 1e-6);
        if let (Some(g), Some(c)) = (&pooled.argmax, &cpu.argmax) {
            prop_assert_eq!(&g.to_array().unwrap(), c);
        }
        // Inference's pass (no arg-max stored) gives the same values.
        poison(&shape.output());
        let values = spec.forward_inference(&upload(&x)).unwrap().to_array().unwrap();
        prop_assert_eq!(&values, &pooled.y.to_array().unwrap());
        let dy = random(&shape.output(), seed + 1);
        let want = wgcnn::cpu::pool2d_backward(&spec, x.shape(), &dy.view(), cpu.argmax.as_ref().map(|a| a.view()).as_ref()).unwrap();
        let tdy = upload(&dy);
        poison(x.shape());
        let got = spec.backward(x.shape(), &tdy, pooled.argmax.as_ref()).unwrap().to_array().unwrap();
        prop_assert!(max_abs_diff(&got, &want) <= 1e-5, "{spec:?}: {}", max_abs_diff(&got, &want));
    }
}

#[test]
fn backward_over_windows_that_tile_the_input() {
    // Stride = kernel, no padding, no remainder: the one-invocation-per-window kernels, and
    // for max pooling of 2×2 windows over rows of whole vec4s of outputs, the quad ones
    // (their inputs read from storage, and through textures).
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    for gpu in gpus {
        tiled_windows_match_the_cpu(gpu);
    }
}

fn tiled_windows_match_the_cpu(gpu: &wgcnn::Gpu) {
    let upload = |x: &ArrayD<f32>| Tensor::from_array(gpu, x).unwrap();
    for (i, (n, c, h, w, kernel)) in [
        (2, 3, 8, 8, (2, 2)),
        (3, 2, 6, 24, (2, 2)),
        (1, 2, 9, 12, (3, 3)),
        (3, 1, 6, 9, (2, 3)),
        (1, 1, 5, 7, (1, 1)),
        (64, 6, 24, 24, (2, 2)),
    ]
    .into_iter()
    .enumerate()
    {
        for kind in [
            PoolKind::Max,
            PoolKind::Avg {
                count_include_pad: true,
            },
        ] {
            let spec = Pool2d {
                kind,
                ..Pool2d::max(kernel)
            };
            // Coarse values: ties within windows.
            let x = random(&[n, c, h, w], i as u64).mapv(|v| (v * 2.0).round());
            let cpu = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
            let dy = random(cpu.y.shape(), i as u64 + 10);
            let argmax = cpu.argmax.as_ref().map(|a| a.view());
            let want =
                wgcnn::cpu::pool2d_backward(&spec, x.shape(), &dy.view(), argmax.as_ref()).unwrap();
            // Outputs (and arg-maxes) land in NaN-filled buffers: unwritten ones show.
            for _ in 0..2 {
                drop(wgcnn::Tensor::full(gpu, cpu.y.shape(), f32::NAN).unwrap());
            }
            let pooled = spec.forward(&upload(&x)).unwrap();
            let y = pooled.y.to_array().unwrap();
            assert!(
                max_abs_diff(&y, &cpu.y) <= 1e-6,
                "{spec:?} on {:?}",
                x.shape()
            );
            assert_eq!(pooled.indices().unwrap(), cpu.indices(), "{spec:?}");
            // A NaN-filled buffer of dx's size goes back to the pool first, so dx reuses it:
            // any gradient the kernel fails to write shows as NaN.
            drop(wgcnn::Tensor::full(gpu, x.shape(), f32::NAN).unwrap());
            let got = spec
                .backward(x.shape(), &upload(&dy), pooled.argmax.as_ref())
                .unwrap()
                .to_array()
                .unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= 1e-6, "{spec:?} on {:?}: {diff}", x.shape());
        }
    }
}

#[test]
fn max_sends_the_gradient_to_the_maximum_and_avg_spreads_it() {
    // One 2×2 window: max at (1, 0).
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 2]), vec![1.0, 2.0, 5.0, 3.0]).unwrap();
    let dy = ArrayD::from_elem(IxDyn(&[1, 1, 1, 1]), 8.0f32);
    let max = Pool2d::max((2, 2));
    let pooled = wgcnn::cpu::pool2d(&max, &x.view()).unwrap();
    assert_eq!(pooled.y[[0, 0, 0, 0]], 5.0);
    let dx = wgcnn::cpu::pool2d_backward(
        &max,
        x.shape(),
        &dy.view(),
        pooled.argmax.as_ref().map(|a| a.view()).as_ref(),
    )
    .unwrap();
    assert_eq!(dx.as_slice().unwrap(), &[0.0, 0.0, 8.0, 0.0]);
    let avg = Pool2d::avg((2, 2));
    let dx = wgcnn::cpu::pool2d_backward(&avg, x.shape(), &dy.view(), None).unwrap();
    assert_eq!(dx.as_slice().unwrap(), &[2.0, 2.0, 2.0, 2.0]);
    if gpu().is_none() {
        return;
    }
    let gpu_pooled = max.forward(&upload(&x)).unwrap();
    let gpu_dx = max
        .backward(x.shape(), &upload(&dy), gpu_pooled.argmax.as_ref())
        .unwrap();
    assert_eq!(
        gpu_dx.to_array().unwrap().as_slice().unwrap(),
        &[0.0, 0.0, 8.0, 0.0]
    );
}

#[test]
fn global_average_pooling() {
    let Some(gpu) = gpu() else { return };
    let x = random(&[2, 3, 5, 7], 4);
    let y = wgcnn::ops::global_avg_pool(&Tensor::from_array(gpu, &x).unwrap())
        .unwrap()
        .to_array()
        .unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    for n in 0..2 {
        for c in 0..3 {
            let mean = (0..5)
                .flat_map(|i| (0..7).map(move |j| (i, j)))
                .map(|(i, j)| x[[n, c, i, j]])
                .sum::<f32>()
                / 35.0;
            assert!((y[[n, c]] - mean).abs() < 1e-6);
        }
    }
    let dy = random(&[2, 3], 5);
    let dx =
        wgcnn::ops::global_avg_pool_backward(x.shape(), &Tensor::from_array(gpu, &dy).unwrap())
            .unwrap()
            .to_array()
            .unwrap();
    assert!((dx[[1, 2, 4, 6]] - dy[[1, 2]] / 35.0).abs() < 1e-7);
    let err = wgcnn::ops::global_avg_pool_backward(
        x.shape(),
        &Tensor::from_array(gpu, &random(&[3, 2], 1)).unwrap(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("expected [2, 3]"), "{err}");
}

#[test]
fn bad_windows_are_errors() {
    let x = [1, 1, 4, 4];
    let m = |spec: Pool2d| spec.shape(&x).unwrap_err().to_string();
    assert!(m(Pool2d::max((0, 2))).contains("window (0, 2) must be at least 1×1"));
    assert!(
        m(Pool2d {
            stride: (0, 1),
            ..Pool2d::max((2, 2))
        })
        .contains("stride (0, 1) must be at least 1")
    );
    assert!(
        m(Pool2d {
            padding: (2, 0),
            ..Pool2d::max((2, 2))
        })
        .contains("at most half the window")
    );
    // Padding whose double overflows: still "at most half the window", not a wrap.
    assert!(
        m(Pool2d {
            padding: (1 << 63, 0),
            ..Pool2d::max((2, 2))
        })
        .contains("at most half the window")
    );
    assert!(m(Pool2d::max((5, 1))).contains(
        "window (5, 1) with dilation (1, 1) does not fit the input 4×4 padded by (0, 0)"
    ));
    assert!(m(Pool2d::max((2, 2)).dilation((4, 1))).contains("does not fit"));
    assert!(m(Pool2d::max((2, 2)).dilation((0, 1))).contains("dilation (0, 1) must be at least 1"));
    assert!(m(Pool2d::avg((2, 2)).dilation((2, 2))).contains("max pooling only"));
    assert!(
        Pool2d::max((1, 1))
            .shape(&[1, 1, 8192, 4096])
            .unwrap_err()
            .to_string()
            .contains("arg-max indices are exact")
    );
    assert!(
        Pool2d::max((2, 2))
            .shape(&[4, 4])
            .unwrap_err()
            .to_string()
            .contains("[N, C, H, W]")
    );
    let dy = random(&[1, 1, 2, 2], 1);
    let err = wgcnn::cpu::pool2d_backward(&Pool2d::max((2, 2)), &x, &dy.view(), None).unwrap_err();
    assert!(err.to_string().contains("needs the arg-max"), "{err}");
    let wrong = random(&[1, 1, 3, 2], 1);
    let err =
        wgcnn::cpu::pool2d_backward(&Pool2d::avg((2, 2)), &x, &wrong.view(), None).unwrap_err();
    assert!(
        err.to_string()
            .contains("dy is [1, 1, 3, 2], the output is [1, 1, 2, 2]"),
        "{err}"
    );
}

#[test]
fn cpu_backward_matches_finite_differences() {
    // Distinct values (no ties within eps), overlapping windows and padding.
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 2, 6, 6]), |d| {
        ((d[0] * 131 + d[1] * 71 + d[2] * 17 + d[3] * 7) % 97) as f32 / 10.0
    });
    for kind in [
        PoolKind::Max,
        PoolKind::Avg {
            count_include_pad: true,
        },
        PoolKind::Avg {
            count_include_pad: false,
        },
    ] {
        // ceil_mode: the last row of windows overhangs the padded input.
        let spec = Pool2d {
            kind,
            kernel: (3, 2),
            stride: (2, 1),
            padding: (1, 1),
            dilation: (1, 1),
            ceil_mode: true,
        };
        let pooled = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
        let dy = random(pooled.y.shape(), 3);
        let loss = |x: &ArrayD<f32>| -> f64 {
            let y = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap().y;
            y.iter()
                .zip(&dy)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        let argmax = pooled.argmax.as_ref().map(|a| a.view());
        let dx =
            wgcnn::cpu::pool2d_backward(&spec, x.shape(), &dy.view(), argmax.as_ref()).unwrap();
        for i in 0..x.len() {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus.as_slice_mut().unwrap()[i] += 1e-3;
            minus.as_slice_mut().unwrap()[i] -= 1e-3;
            let numeric = (loss(&plus) - loss(&minus)) / 2e-3;
            let analytic = f64::from(dx.as_slice().unwrap()[i]);
            assert!(
                (numeric - analytic).abs() < 1e-2,
                "{kind:?} dx[{i}]: {analytic} vs {numeric}"
            );
        }
    }
}

#[test]
fn adaptive_average_pooling_matches_pytorch_and_the_cpu() {
    use wgcnn::ops::AdaptiveAvgPool2d;
    let goldens = cases("adaptive_avgpool2d_");
    assert!(goldens.len() >= 4);
    for case in goldens {
        let j = &case.json;
        let (oh, ow) = pair(&j["params"]["output"]);
        let spec = AdaptiveAvgPool2d::new(oh, ow);
        let (x, want_y) = (tensor(&j["inputs"]["x"]), tensor(&j["outputs"]["y"]));
        let (dy, want_dx) = (tensor(&j["grad_outputs"]["y"]), tensor(&j["grads"]["x"]));
        assert_close(
            &case.name,
            &spec.forward_cpu(&x.view()).unwrap(),
            &want_y,
            1e-5,
            1e-6,
        );
        let dx = spec.backward_cpu(x.shape(), &dy.view()).unwrap();
        assert_close(&case.name, &dx, &want_dx, 1e-5, 1e-6);
        if gpu().is_some() {
            let y = spec.forward(&upload(&x)).unwrap().to_array().unwrap();
            assert_close(&case.name, &y, &want_y, 1e-5, 1e-6);
            let dx = spec
                .backward(x.shape(), &upload(&dy))
                .unwrap()
                .to_array()
                .unwrap();
            assert_close(&case.name, &dx, &want_dx, 1e-5, 1e-6);
        }
    }
    // GPU against CPU on other sizes (poisoned outputs), finite differences, errors.
    let Some(gpu) = gpu() else { return };
    for (i, (shape, output)) in [
        ([2, 3, 13, 11], (5, 3)),
        ([1, 2, 4, 3], (9, 8)),
        ([3, 1, 32, 30], (7, 7)),
        ([1, 4, 5, 5], (5, 5)),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = AdaptiveAvgPool2d::new(output.0, output.1);
        let x = random(&shape, 60 + i as u64);
        let want = spec.forward_cpu(&x.view()).unwrap();
        drop(Tensor::full(gpu, want.shape(), f32::NAN).unwrap());
        let got = spec.forward(&upload(&x)).unwrap().to_array().unwrap();
        assert!(
            max_abs_diff(&got, &want) < 1e-5,
            "forward {shape:?} → {output:?}"
        );
        let dy = random(want.shape(), 70 + i as u64);
        let want_dx = spec.backward_cpu(&shape, &dy.view()).unwrap();
        drop(Tensor::full(gpu, &shape, f32::NAN).unwrap());
        let dx = spec
            .backward(&shape, &upload(&dy))
            .unwrap()
            .to_array()
            .unwrap();
        assert!(
            max_abs_diff(&dx, &want_dx) < 1e-5,
            "backward {shape:?} → {output:?}"
        );
        // The backward is the adjoint of the (linear) forward: <dy, f(x)> = <f*(dy), x>.
        let lhs: f64 = dy
            .iter()
            .zip(&want)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let rhs: f64 = want_dx
            .iter()
            .zip(&x)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "adjoint {shape:?}: {lhs} vs {rhs}"
        );
    }
    let spec = AdaptiveAvgPool2d::new(0, 2);
    assert!(spec.forward(&upload(&random(&[1, 1, 4, 4], 1))).is_err());
    let spec = AdaptiveAvgPool2d::new(2, 2);
    assert!(spec.forward(&upload(&random(&[1, 4, 4], 1))).is_err());
    assert!(
        spec.backward(&[1, 1, 4, 4], &upload(&random(&[1, 1, 3, 2], 1)))
            .is_err()
    );
}

/// NaN wins a max-pooling window, as in PyTorch (a window that dropped it would hide a
/// poisoned batch), and its gradient goes to the NaN's position.
/// Max pooling's forward over rows of whole vec4s takes four neighbouring windows of a row
/// per invocation, their inputs loaded as the vec4s holding them, for any window: ResNet's
/// 3×3 at stride 2 with padding 1, stride 1, a 2×2 window whose rows do not tile the
/// input, dilation, a 7×7 window padded by 3, ceil mode (windows past the input's edge),
/// from storage and from textures; values (with ties and a NaN) and arg-maxes against the
/// CPU, outputs poisoned, and the backward pass through those arg-maxes; inference's pass,
/// which stores no arg-max, gives the same values bit for bit.
#[test]
fn max_pooling_in_rows_of_four_windows_matches_the_cpu() {
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    // (x, kernel, stride, padding, dilation, ceil mode)
    let cases = [
        ([2, 3, 11, 16], (3, 3), (2, 2), (1, 1), (1, 1), false),
        ([1, 2, 5, 12], (3, 3), (1, 1), (1, 1), (1, 1), false),
        ([2, 2, 7, 8], (2, 2), (2, 2), (0, 0), (1, 1), false),
        ([1, 2, 6, 8], (2, 2), (1, 1), (1, 1), (2, 2), false),
        ([1, 1, 9, 16], (7, 7), (2, 2), (3, 3), (1, 1), false),
        ([1, 2, 9, 16], (3, 3), (2, 2), (0, 0), (1, 1), true),
    ];
    for gpu in gpus {
        for (i, (shape, kernel, stride, padding, dilation, ceil)) in cases.into_iter().enumerate() {
            let spec = Pool2d::max(kernel)
                .stride(stride)
                .padding(padding)
                .dilation(dilation)
                .ceil_mode(ceil);
            // Coarse values: ties within windows; and a NaN, which wins its windows.
            let mut x = random(&shape, 40 + i as u64).mapv(|v| (v * 3.0).round());
            x[[0, 0, 1, 2]] = f32::NAN;
            let cpu = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
            assert_eq!(cpu.y.shape()[3] % 4, 0, "case {i}");
            for _ in 0..2 {
                drop(Tensor::full(gpu, cpu.y.shape(), f32::NAN).unwrap());
            }
            let pooled = spec.forward(&Tensor::from_array(gpu, &x).unwrap()).unwrap();
            let y = pooled.y.to_array().unwrap();
            let same = y
                .iter()
                .zip(&cpu.y)
                .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()));
            assert!(same, "case {i}: {y} against {}", cpu.y);
            assert_eq!(pooled.indices().unwrap(), cpu.indices(), "case {i}");
            // Inference's pass stores no arg-max and gives the same values.
            drop(Tensor::full(gpu, cpu.y.shape(), f32::NAN).unwrap());
            let values = spec
                .forward_inference(&Tensor::from_array(gpu, &x).unwrap())
                .unwrap()
                .to_array()
                .unwrap();
            let same = values
                .iter()
                .zip(&y)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "case {i} inference: {values} against {y}");
            let dy = random(cpu.y.shape(), 50 + i as u64);
            let argmax = cpu.argmax.as_ref().map(|a| a.view());
            let want =
                wgcnn::cpu::pool2d_backward(&spec, x.shape(), &dy.view(), argmax.as_ref()).unwrap();
            let got = spec
                .backward(
                    x.shape(),
                    &Tensor::from_array(gpu, &dy).unwrap(),
                    pooled.argmax.as_ref(),
                )
                .unwrap()
                .to_array()
                .unwrap();
            assert!(max_abs_diff(&got, &want) <= 1e-6, "case {i} backward");
        }
    }
}

#[test]
fn nan_wins_max_pooling_as_in_pytorch() {
    // 8 wide: the quad kernel (four windows per invocation) takes it.
    for width in [4, 8] {
        let mut x = random(&[1, 2, 4, width], 9);
        x[[0, 0, 1, 0]] = f32::NAN;
        x[[0, 1, 3, 3]] = f32::NAN;
        let spec = Pool2d::max((2, 2));
        let cpu = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
        assert!(cpu.y[[0, 0, 0, 0]].is_nan() && cpu.y[[0, 1, 1, 1]].is_nan());
        let Some(_) = gpu() else { return };
        let pooled = spec.forward(&upload(&x)).unwrap();
        let y = pooled.y.to_array().unwrap();
        assert!(y[[0, 0, 0, 0]].is_nan() && y[[0, 1, 1, 1]].is_nan(), "{y}");
        assert_eq!(pooled.indices().unwrap().unwrap(), cpu.indices().unwrap());
    }
}

/// Dilation can skip every input row of a window (rows −1 and 2 of a 2-row input): the
/// window is −inf, its index H·W names no element, and its gradient goes nowhere.
#[test]
fn a_window_of_padding_alone_is_minus_infinity_with_no_index() {
    let spec = Pool2d::max((2, 1))
        .stride((1, 1))
        .padding((1, 0))
        .dilation((3, 1));
    let x = random(&[1, 1, 2, 3], 4);
    let cpu = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
    assert_eq!(cpu.y.shape(), &[1, 1, 1, 3]);
    assert!(cpu.y.iter().all(|&v| v == f32::NEG_INFINITY));
    assert!(cpu.indices().unwrap().iter().all(|&i| i == 6));
    let dy = random(&[1, 1, 1, 3], 5);
    let argmax = cpu.argmax.as_ref().map(|a| a.view());
    let dx = wgcnn::cpu::pool2d_backward(&spec, x.shape(), &dy.view(), argmax.as_ref()).unwrap();
    assert!(dx.iter().all(|&v| v == 0.0));
    let Some(_) = gpu() else { return };
    let pooled = spec.forward(&upload(&x)).unwrap();
    assert_eq!(pooled.y.to_array().unwrap(), cpu.y);
    assert_eq!(pooled.indices().unwrap().unwrap(), cpu.indices().unwrap());
    let got = spec
        .backward(x.shape(), &upload(&dy), pooled.argmax.as_ref())
        .unwrap();
    assert!(got.to_array().unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn max_backward_through_the_activation_before_it_matches_the_cpu() {
    // x = act(z): max pooling's backward taken on through act must equal the CPU's
    // dy · act'(y) routed to the arg-max, on the quads (inputs from storage and from
    // textures), tiled and gathering kernels.
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    for gpu in gpus {
        gated_backward_matches_the_cpu(gpu);
    }
    // Average pooling cannot: it would need the activation's output at every input.
    let avg = Pool2d::avg((2, 2));
    let x = upload(&random(&[1, 1, 4, 4], 3));
    let y = avg.forward(&x).unwrap().y;
    let err = avg
        .backward_through(&[1, 1, 4, 4], &y, &y, (Activation::Relu, &y))
        .unwrap_err();
    assert!(err.to_string().contains("only max pooling"), "{err}");
}

fn gated_backward_matches_the_cpu(gpu: &wgcnn::Gpu) {
    let upload = |x: &ArrayD<f32>| Tensor::from_array(gpu, x).unwrap();
    let overlapping = Pool2d::max((3, 3)).stride((2, 2)).padding((1, 1));
    let dilated = Pool2d::max((2, 2)).dilation((2, 1));
    for (i, (spec, shape)) in [
        (Pool2d::max((2, 2)), [2, 3, 8, 8]),
        (Pool2d::max((2, 2)), [64, 6, 24, 24]),
        (Pool2d::max((3, 3)), [1, 2, 9, 12]),
        (overlapping, [2, 2, 9, 11]),
        (dilated, [1, 3, 7, 6]),
    ]
    .into_iter()
    .enumerate()
    {
        for act in [
            Activation::Relu,
            Activation::LeakyRelu(0.1),
            Activation::Sigmoid,
            Activation::Tanh,
        ] {
            // Coarse pre-activations: ties, and ReLU zeros at window maxima.
            let z = random(&shape, i as u64).mapv(|v| (v * 2.0).round() / 2.0);
            let x = z.mapv(|v| act.apply(v));
            let cpu = wgcnn::cpu::pool2d(&spec, &x.view()).unwrap();
            let dy = random(cpu.y.shape(), i as u64 + 20);
            let gated = &dy * &cpu.y.mapv(|y| act.derivative(y, y));
            let argmax = cpu.argmax.as_ref().map(|a| a.view());
            let want =
                wgcnn::cpu::pool2d_backward(&spec, &shape, &gated.view(), argmax.as_ref()).unwrap();
            let pooled = spec.forward(&upload(&x)).unwrap();
            let argmax = pooled.argmax.as_ref().unwrap();
            drop(Tensor::full(gpu, &shape, f32::NAN).unwrap());
            let got = spec
                .backward_through(&shape, &upload(&dy), argmax, (act, &pooled.y))
                .unwrap()
                .to_array()
                .unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff <= 1e-6,
                "{spec:?} through {act:?} on {shape:?}: {diff}"
            );
        }
    }
}

/// Planes past one invocation's loop bound (lavapipe ended a 256×256 window's loop early):
/// global average pooling, and adaptive pooling to one output, sum each plane across a
/// workgroup's lanes; their backward passes against the CPU. A window no kernel keeps
/// within the bound is an error that points to them.
#[test]
fn whole_plane_means_of_large_planes_match_the_cpu() {
    let Some(_) = gpu() else { return };
    let x = random(&[2, 3, 300, 300], 21);
    let want = wgcnn::cpu::global_avg_pool(&x.view()).unwrap();
    let got = wgcnn::ops::global_avg_pool(&upload(&x))
        .unwrap()
        .to_array()
        .unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-6,
        "{}",
        max_abs_diff(&got, &want)
    );
    let dy = random(&[2, 3], 22);
    let want_dx = wgcnn::cpu::global_avg_pool_backward(x.shape(), &dy.view()).unwrap();
    let dx = wgcnn::ops::global_avg_pool_backward(x.shape(), &upload(&dy))
        .unwrap()
        .to_array()
        .unwrap();
    assert!(max_abs_diff(&dx, &want_dx) < 1e-9);

    let one = wgcnn::ops::AdaptiveAvgPool2d::new(1, 1);
    let got = one.forward(&upload(&x)).unwrap().to_array().unwrap();
    let want = wgcnn::cpu::adaptive_avg_pool2d(&one, &x.view()).unwrap();
    assert_eq!(got.shape(), [2, 3, 1, 1]);
    assert!(
        max_abs_diff(&got, &want) < 1e-6,
        "{}",
        max_abs_diff(&got, &want)
    );

    let err = Pool2d::avg((300, 300))
        .forward(&upload(&x))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("loop bound") && err.contains("GlobalAvgPool"),
        "{err}"
    );
    let err = wgcnn::ops::AdaptiveAvgPool2d::new(2, 2)
        .forward(&upload(&x))
        .unwrap_err()
        .to_string();
    assert!(err.contains("loop bound"), "{err}");
}
