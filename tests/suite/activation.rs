//! Activations and softmax: GPU against CPU, derivatives against finite differences.

use crate::common;

use common::{gpu, max_abs_diff, random, read_family_gpus};
use ndarray::ArrayD;
use wgcnn::{Activation, Tensor};

const ALL: [Activation; 6] = [
    Activation::None,
    Activation::Relu,
    Activation::LeakyRelu(0.01),
    Activation::Sigmoid,
    Activation::Tanh,
    Activation::Relu6,
];

#[test]
fn elementwise_forward_and_backward_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for (i, shape) in [
        vec![1],
        vec![7, 13],
        vec![3, 4, 5, 6],
        vec![1000],
        vec![3, 5001],
    ]
    .iter()
    .enumerate()
    {
        // ±8 reaches both of ReLU6's bends.
        let x = random(shape, i as u64).mapv(|v| v * 8.0);
        let dy = random(shape, 100 + i as u64);
        let tx = Tensor::from_array(gpu, &x).unwrap();
        // A NaN-filled buffer of the output's size goes back to the pool before each kernel,
        // which then writes into it: any element a kernel leaves unwritten shows as NaN.
        let poison = || drop(Tensor::full(gpu, shape, f32::NAN).unwrap());
        for act in ALL {
            poison();
            let y = act.forward(&tx).unwrap();
            let want_y = x.mapv(|v| act.apply(v));
            assert!(
                max_abs_diff(&y.to_array().unwrap(), &want_y) < 1e-6,
                "{act:?} forward"
            );
            let tdy = Tensor::from_array(gpu, &dy).unwrap();
            poison();
            let dx = act.backward(&tx, &y, &tdy).unwrap();
            let want_dx =
                ArrayD::from_shape_fn(x.raw_dim(), |d| dy[&d] * act.derivative(x[&d], want_y[&d]));
            assert!(
                max_abs_diff(&dx.to_array().unwrap(), &want_dx) < 1e-6,
                "{act:?} backward"
            );
        }
    }
}

/// The residual sums' cases: each shape (with its index) on a context forced to each
/// operand-read family; none where there is no GPU.
fn sum_cases() -> Vec<(&'static wgcnn::Gpu, usize, Vec<usize>)> {
    let shapes = [vec![1], vec![3, 5], vec![2, 4, 6], vec![3, 70001]];
    let gpus = read_family_gpus().into_iter().flatten();
    gpus.flat_map(|gpu| {
        shapes
            .iter()
            .cloned()
            .enumerate()
            .map(move |(i, s)| (gpu, i, s))
    })
    .collect()
}

/// Residual sums with each activation after them, and the executor's in-place gradient
/// sums, over whole and partial vec4s and more elements than one pass of the grid covers
/// (and than one row of an operand texture), reading the inputs from storage and from
/// textures.
#[test]
fn sums_and_accumulation_match_the_cpu() {
    use wgcnn::value::add::{accumulate, add_activated, add_cpu};
    for (gpu, i, shape) in sum_cases() {
        let shape = &shape;
        let seed = 10 * i as u64;
        let (a, b) = (
            random(shape, seed).mapv(|v| v * 8.0),
            random(shape, seed + 1),
        );
        let (ta, tb) = (
            Tensor::from_array(gpu, &a).unwrap(),
            Tensor::from_array(gpu, &b).unwrap(),
        );
        let sum = add_cpu(&a.view(), &b.view()).unwrap();
        for act in ALL {
            drop(Tensor::full(gpu, shape, f32::NAN).unwrap());
            let got = add_activated(&ta, &tb, act).unwrap().to_array().unwrap();
            let want = sum.mapv(|v| act.apply(v));
            assert!(max_abs_diff(&got, &want) < 1e-6, "{shape:?} {act:?} add");
        }
        accumulate(&ta, &tb).unwrap();
        assert_eq!(ta.to_array().unwrap(), sum, "{shape:?} accumulate");
    }
}

/// A residual sum's gradient for both inputs, `act'(y)·(dy + more)` in one pass, with and
/// without a second part `more`, both outputs poisoned, over whole and partial vec4s and
/// more elements than one pass of the grid covers, reading the inputs from storage and from
/// textures.
#[test]
fn residual_gradients_match_the_cpu() {
    use wgcnn::value::add::{add_backward, add_backward_cpu};
    for (gpu, i, shape) in sum_cases() {
        let shape = &shape;
        let seed = 20 * i as u64;
        // ±8 reaches both of ReLU6's bends.
        let x = random(shape, seed).mapv(|v| v * 8.0);
        let (dy, more) = (random(shape, seed + 1), random(shape, seed + 2));
        let (tdy, tmore) = (
            Tensor::from_array(gpu, &dy).unwrap(),
            Tensor::from_array(gpu, &more).unwrap(),
        );
        for act in ALL {
            let y = x.mapv(|v| act.apply(v));
            let ty = Tensor::from_array(gpu, &y).unwrap();
            for parts in [None, Some((&tmore, &more))] {
                let total = match parts {
                    Some((_, more)) => &dy + more,
                    None => dy.clone(),
                };
                let want = ArrayD::from_shape_fn(x.raw_dim(), |d| {
                    total[&d] * act.derivative(x[&d], y[&d])
                });
                let what = format!("{shape:?} {act:?}, second part: {}", parts.is_some());
                let cpu = add_backward_cpu(
                    &y.view(),
                    &dy.view(),
                    parts.map(|p| p.1.view()).as_ref(),
                    act,
                )
                .unwrap();
                assert!(max_abs_diff(&cpu, &want) < 1e-6, "{what}: CPU");
                drop([0, 1].map(|_| Tensor::full(gpu, shape, f32::NAN).unwrap()));
                let grads = add_backward(&ty, &tdy, parts.map(|p| p.0), act).unwrap();
                for grad in grads {
                    assert!(
                        max_abs_diff(&grad.to_array().unwrap(), &want) < 1e-6,
                        "{what}: GPU"
                    );
                }
            }
        }
    }
}

#[test]
fn derivatives_match_finite_differences() {
    for act in ALL {
        for x in [-2.5f32, -0.7, -0.1, 0.2, 0.9, 3.0, 5.9, 6.2, 9.0] {
            let eps = 1e-3f64;
            let f = |v: f64| f64::from(act.apply(v as f32));
            let numeric = (f(f64::from(x) + eps) - f(f64::from(x) - eps)) / (2.0 * eps);
            let analytic = f64::from(act.derivative(x, act.apply(x)));
            assert!(
                (numeric - analytic).abs() < 2e-3,
                "{act:?} at {x}: {analytic} vs {numeric}"
            );
        }
    }
}

#[test]
fn softmax_is_stable_and_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut x = random(&[5, 10], 3);
    x[[0, 0]] = 1000.0; // would overflow exp() without subtracting the row maximum
    x[[1, 3]] = -1000.0;
    let y = wgcnn::ops::softmax(&Tensor::from_array(gpu, &x).unwrap())
        .unwrap()
        .to_array()
        .unwrap();
    let want = wgcnn::cpu::softmax(&x.view()).unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
    assert!(max_abs_diff(&y, &want) < 1e-6);
    for row in y.axis_iter(ndarray::Axis(0)) {
        assert!((row.sum() - 1.0).abs() < 1e-5);
    }
    assert!((y[[0, 0]] - 1.0).abs() < 1e-6);

    let dy = random(&[5, 10], 4);
    let dx = wgcnn::ops::softmax_backward(
        &Tensor::from_array(gpu, &want).unwrap(),
        &Tensor::from_array(gpu, &dy).unwrap(),
    )
    .unwrap();
    let want_dx = wgcnn::cpu::softmax_backward(&want.view(), &dy.view()).unwrap();
    assert!(max_abs_diff(&dx.to_array().unwrap(), &want_dx) < 1e-6);
}

#[test]
fn softmax_backward_matches_finite_differences() {
    let x = random(&[3, 6], 5);
    let dy = random(&[3, 6], 6);
    let loss = |x: &ArrayD<f32>| -> f64 {
        let y = wgcnn::cpu::softmax(&x.view()).unwrap();
        y.iter()
            .zip(&dy)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    let y = wgcnn::cpu::softmax(&x.view()).unwrap();
    let dx = wgcnn::cpu::softmax_backward(&y.view(), &dy.view()).unwrap();
    for i in 0..x.len() {
        let mut plus = x.clone();
        plus.as_slice_mut().unwrap()[i] += 1e-2;
        let mut minus = x.clone();
        minus.as_slice_mut().unwrap()[i] -= 1e-2;
        let numeric = (loss(&plus) - loss(&minus)) / 2e-2;
        let analytic = f64::from(dx.as_slice().unwrap()[i]);
        assert!(
            (numeric - analytic).abs() < 1e-3,
            "[{i}] {analytic} vs {numeric}"
        );
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let Some(gpu) = gpu() else { return };
    let a = Tensor::from_array(gpu, &random(&[2, 3], 1)).unwrap();
    let b = Tensor::from_array(gpu, &random(&[3, 2], 2)).unwrap();
    let err = Activation::Relu.backward(&a, &a, &b).unwrap_err();
    assert!(
        err.to_string().contains("must have the same shape"),
        "{err}"
    );
}

/// NaN in, NaN out, as in PyTorch: a ReLU that turned NaN into 0 hid a poisoned batch
/// (the weights went NaN while the loss still read 2.30).
#[test]
fn nan_propagates_through_every_activation_as_in_pytorch() {
    use wgcnn::ops::{Conv2d, Matmul};
    let values = [
        f32::NAN,
        1.5,
        -2.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.0,
        -0.5,
    ];
    let x = ArrayD::from_shape_vec(ndarray::IxDyn(&[8]), values.to_vec()).unwrap();
    for act in ALL {
        assert!(act.apply(f32::NAN).is_nan(), "{act:?} on the CPU");
    }
    // PyTorch's ReLU backward passes the gradient where the output is NaN (only y ≤ 0 blocks it).
    assert_eq!(Activation::Relu.derivative(f32::NAN, f32::NAN), 1.0);
    let Some(gpu) = gpu() else { return };
    let tx = Tensor::from_array(gpu, &x).unwrap();
    for act in ALL {
        let y = act.forward(&tx).unwrap().to_array().unwrap();
        assert!(y[[0]].is_nan(), "{act:?} on the GPU: {y}");
        let want = x.mapv(|v| act.apply(v));
        for (got, want) in y.iter().zip(&want) {
            let same = (got - want).abs() <= 1e-6 || got == want || (got.is_nan() && want.is_nan());
            assert!(same, "{act:?}: {y} vs {want}");
        }
        let ones = Tensor::full(gpu, &[8], 1.0).unwrap();
        let dx = act
            .backward(&tx, &act.forward(&tx).unwrap(), &ones)
            .unwrap()
            .to_array()
            .unwrap();
        let want_dx = x.mapv(|v| act.derivative(v, act.apply(v)));
        for (got, want) in dx.iter().zip(&want_dx) {
            let same = (got - want).abs() <= 1e-6 || got == want || (got.is_nan() && want.is_nan());
            assert!(same, "{act:?} backward: {dx} vs {want_dx}");
        }
    }
    // The fused epilogues: a matmul, a direct convolution and an im2col convolution with ReLU.
    let a = Tensor::from_array(
        gpu,
        &x.clone()
            .into_shape_with_order(ndarray::IxDyn(&[2, 4]))
            .unwrap(),
    )
    .unwrap();
    let b = Tensor::full(gpu, &[4, 3], 1.0).unwrap();
    let relu = Matmul {
        activation: Activation::Relu,
        ..Matmul::default()
    };
    let y = relu.forward(&a, &b, None).unwrap().to_array().unwrap();
    assert!(y.iter().take(3).all(|v| v.is_nan()), "matmul epilogue: {y}");
    let image = x
        .clone()
        .into_shape_with_order(ndarray::IxDyn(&[1, 2, 2, 2]))
        .unwrap();
    let timage = Tensor::from_array(gpu, &image).unwrap();
    for filters in [2, 20] {
        let conv = Conv2d {
            activation: Activation::Relu,
            ..Conv2d::default()
        };
        let w = Tensor::full(gpu, &[filters, 2, 1, 1], 1.0).unwrap();
        let y = conv.forward(&timage, &w, None).unwrap().to_array().unwrap();
        assert!(
            y[[0, 0, 0, 0]].is_nan(),
            "conv ({filters} filters) epilogue: {y}"
        );
    }
}

/// Rows too long for one invocation's loop bound (lavapipe ended softmax's loops early at
/// 70,000) run one workgroup per row: forward and backward against the CPU.
#[test]
fn softmax_over_long_rows_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let x = random(&[3, 70_000], 7).mapv(|v| 5.0 * v);
    let want = wgcnn::cpu::softmax(&x.view()).unwrap();
    let y = wgcnn::ops::softmax(&Tensor::from_array(gpu, &x).unwrap()).unwrap();
    let got = y.to_array().unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-7,
        "{}",
        max_abs_diff(&got, &want)
    );
    let sums: Vec<f32> = got.rows().into_iter().map(|r| r.sum()).collect();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-3), "{sums:?}");
    let dy = random(&[3, 70_000], 8);
    let want_dx = wgcnn::cpu::softmax_backward(&want.view(), &dy.view()).unwrap();
    let dx = wgcnn::ops::softmax_backward(&y, &Tensor::from_array(gpu, &dy).unwrap())
        .unwrap()
        .to_array()
        .unwrap();
    assert!(
        max_abs_diff(&dx, &want_dx) < 1e-6,
        "{}",
        max_abs_diff(&dx, &want_dx)
    );
}
