//! Batch and layer normalisation: PyTorch goldens, GPU against CPU, finite differences.

use crate::common;

use common::golden::{assert_close, cases, tensor};
use common::{gpu, max_abs_diff, random, read_family_gpus, upload};
use ndarray::{Array1, ArrayD, Ix1};
use wgcnn::cpu;
use wgcnn::ops::batch_norm::{NormGrads, batches_state};
use wgcnn::ops::{BatchNorm2d, LayerNorm};
use wgcnn::{Activation, Tensor, Value};

/// Gradients as arrays.
fn arrays(g: NormGrads<Value>) -> NormGrads<ArrayD<f32>> {
    let array = |v: Value| v.to_array().unwrap();
    NormGrads {
        x: array(g.x),
        gamma: array(g.gamma),
        beta: array(g.beta),
    }
}

fn one_d(x: &ArrayD<f32>) -> Array1<f32> {
    x.clone().into_dimensionality::<Ix1>().unwrap()
}

#[test]
fn batch_norm_golden_train_then_eval() {
    if gpu().is_none() {
        return;
    }
    let case = cases("batchnorm2d_").remove(0);
    let (json, spec) = (&case.json, BatchNorm2d::default());
    let input = |k: &str| tensor(&json["inputs"][k]);
    let output = |k: &str| tensor(&json["outputs"][k]);
    let (x, gamma, beta, rm, rv) = (
        input("x"),
        input("weight"),
        input("bias"),
        input("running_mean"),
        input("running_var"),
    );
    let (g1, b1, rm1, rv1) = (one_d(&gamma), one_d(&beta), one_d(&rm), one_d(&rv));

    // CPU reference.
    let (train, new_mean, new_var) = cpu::batch_norm_train(
        &spec,
        &x.view(),
        &g1.view(),
        &b1.view(),
        &rm1.view(),
        &rv1.view(),
        0,
    )
    .unwrap();
    assert_close("cpu y_train", &train.y, &output("y_train"), 1e-4, 1e-5);
    assert_close(
        "cpu batch mean",
        &train.mean,
        &output("batch_mean"),
        1e-5,
        1e-6,
    );
    assert_close(
        "cpu running mean",
        &new_mean.clone().into_dyn(),
        &output("running_mean_after"),
        1e-5,
        1e-6,
    );
    assert_close(
        "cpu running var",
        &new_var.clone().into_dyn(),
        &output("running_var_after"),
        1e-5,
        1e-6,
    );
    let dy_train = tensor(&json["grad_outputs"]["y_train"]);
    let grads = &json["grads"];
    let g = cpu::batch_norm_backward(
        &x.view(),
        &g1.view(),
        &one_d(&train.mean).view(),
        &one_d(&train.rstd).view(),
        &dy_train.view(),
        true,
    )
    .unwrap();
    for (name, got) in [("x", &g.x), ("weight", &g.gamma), ("bias", &g.beta)] {
        assert_close(
            &format!("cpu train d{name}"),
            got,
            &tensor(&grads["train"][name]),
            1e-4,
            1e-5,
        );
    }
    let eval = cpu::batch_norm_eval(
        &spec,
        &x.view(),
        &g1.view(),
        &b1.view(),
        &new_mean.view(),
        &new_var.view(),
    )
    .unwrap();
    assert_close("cpu y_eval", &eval.y, &output("y_eval"), 1e-4, 1e-5);
    let dy_eval = tensor(&json["grad_outputs"]["y_eval"]);
    let g = cpu::batch_norm_backward(
        &x.view(),
        &g1.view(),
        &one_d(&eval.mean).view(),
        &one_d(&eval.rstd).view(),
        &dy_eval.view(),
        false,
    )
    .unwrap();
    for (name, got) in [("x", &g.x), ("weight", &g.gamma), ("bias", &g.beta)] {
        assert_close(
            &format!("cpu eval d{name}"),
            got,
            &tensor(&grads["eval"][name]),
            1e-4,
            1e-5,
        );
    }

    // GPU, with the running statistics updated in place.
    let (tx, tg, tb, trm, trv) = (
        upload(&x),
        upload(&gamma),
        upload(&beta),
        upload(&rm),
        upload(&rv),
    );
    let train = spec
        .forward_train(&tx, &tg, &tb, &trm, &trv, &upload(&batches_state(0)))
        .unwrap();
    assert_close(
        "gpu y_train",
        &train.y.to_array().unwrap(),
        &output("y_train"),
        1e-4,
        1e-5,
    );
    assert_close(
        "gpu running mean",
        &trm.to_array().unwrap(),
        &output("running_mean_after"),
        1e-5,
        1e-6,
    );
    assert_close(
        "gpu running var",
        &trv.to_array().unwrap(),
        &output("running_var_after"),
        1e-5,
        1e-6,
    );
    let g = spec
        .backward(
            &tx,
            [&tg, &tb],
            [&train.mean, &train.rstd],
            &upload(&dy_train),
            true,
        )
        .unwrap();
    for (name, got) in [("x", &g.x), ("weight", &g.gamma), ("bias", &g.beta)] {
        assert_close(
            &format!("gpu train d{name}"),
            &got.to_array().unwrap(),
            &tensor(&grads["train"][name]),
            1e-4,
            1e-5,
        );
    }
    let eval = spec.forward_eval(&tx, &tg, &tb, &trm, &trv).unwrap();
    assert_close(
        "gpu y_eval",
        &eval.y.to_array().unwrap(),
        &output("y_eval"),
        1e-4,
        1e-5,
    );
    let g = spec
        .backward(
            &tx,
            [&tg, &tb],
            [&eval.mean, &eval.rstd],
            &upload(&dy_eval),
            false,
        )
        .unwrap();
    for (name, got) in [("x", &g.x), ("weight", &g.gamma), ("bias", &g.beta)] {
        assert_close(
            &format!("gpu eval d{name}"),
            &got.to_array().unwrap(),
            &tensor(&grads["eval"][name]),
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn layer_norm_golden() {
    if gpu().is_none() {
        return;
    }
    let case = cases("layernorm_").remove(0);
    let json = &case.json;
    let (x, gamma, beta) = (
        tensor(&json["inputs"]["x"]),
        tensor(&json["inputs"]["weight"]),
        tensor(&json["inputs"]["bias"]),
    );
    let dy = tensor(&json["grad_outputs"]["y"]);
    let spec = LayerNorm::default();
    let cpu = spec
        .forward_cpu(&x.view(), &gamma.view(), &beta.view())
        .unwrap();
    for (name, got) in [("y", &cpu.y), ("mean", &cpu.mean), ("rstd", &cpu.rstd)] {
        assert_close(
            &format!("cpu {name}"),
            got,
            &tensor(&json["outputs"][name]),
            1e-4,
            1e-5,
        );
    }
    let g = spec
        .backward_cpu(&x.view(), &gamma.view(), &cpu.mean, &cpu.rstd, &dy.view())
        .unwrap();
    for (name, got) in [("x", &g.x), ("weight", &g.gamma), ("bias", &g.beta)] {
        assert_close(
            &format!("cpu d{name}"),
            got,
            &tensor(&json["grads"][name]),
            1e-4,
            1e-5,
        );
    }
    let (tx, tg, tb) = (upload(&x), upload(&gamma), upload(&beta));
    let out = spec.forward(&tx, &tg, &tb).unwrap();
    for (name, got) in [("y", &out.y), ("mean", &out.mean), ("rstd", &out.rstd)] {
        assert_close(
            &format!("gpu {name}"),
            &got.to_array().unwrap(),
            &tensor(&json["outputs"][name]),
            1e-4,
            1e-5,
        );
    }
    let g = spec
        .backward(&tx, [&tg, &tb], [&out.mean, &out.rstd], &upload(&dy))
        .unwrap();
    for (name, got) in [("x", &g.x), ("weight", &g.gamma), ("bias", &g.beta)] {
        assert_close(
            &format!("gpu d{name}"),
            &got.to_array().unwrap(),
            &tensor(&json["grads"][name]),
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn random_shapes_match_the_cpu() {
    // On the default context and on one that reads the vec4 kernels' inputs through
    // textures (what the calibration picks where texel loads are cheaper).
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    for gpu in gpus {
        norms_match_the_cpu(gpu);
    }
}

fn norms_match_the_cpu(gpu: &wgcnn::Gpu) {
    // Each shape plain, and with one of the activations a norm can apply last (the graph's
    // absorbed activation layers): its CPU reference composes the norm's references with
    // the activation's, through the values' entry points.
    let activations = [
        Activation::Relu,
        Activation::Relu6,
        Activation::Sigmoid,
        Activation::Tanh,
        Activation::LeakyRelu(0.1),
    ];
    for (i, shape) in NORM_SHAPES.iter().enumerate() {
        for activation in [Activation::None, activations[i % activations.len()]] {
            norms_match_the_cpu_on(gpu, i as u64 * 10, shape, activation);
        }
    }
}

// Rows of whole vec4s (H·W, and for layer norm C·H·W, multiples of 4) take the vec4
// kernels, the others the scalar ones; outputs land in NaN-filled buffers. The last three
// are big enough that the CPU-adapter kernels' element-wise passes take runs of 8, 4 and 2
// vec4s per lane, and their reductions runs of 8, 8 and 2 (the portable kernels read one
// vec4 a step).
const NORM_SHAPES: [[usize; 4]; 11] = [
    [1, 1, 1, 2],
    [2, 3, 5, 7],
    [8, 16, 9, 9],
    [3, 2, 31, 17],
    [2, 3, 4, 6],
    [1, 2, 2, 2],
    [4, 5, 8, 8],
    [3, 5, 3, 4],
    [4, 40, 32, 32],
    [8, 12, 32, 32],
    [128, 16, 2, 12],
];

fn norms_match_the_cpu_on(gpu: &wgcnn::Gpu, seed: u64, shape: &[usize], activation: Activation) {
    let upload = |x: &ArrayD<f32>| Tensor::from_array(gpu, x).unwrap();
    let spec = BatchNorm2d {
        activation,
        ..BatchNorm2d::default()
    };
    let poison = |shape: &[usize]| {
        for _ in 0..2 {
            drop(Tensor::full(gpu, shape, f32::NAN).unwrap());
            drop(Tensor::full(gpu, &shape[1..2], f32::NAN).unwrap());
        }
    };
    {
        let x = random(shape, seed).mapv(|v| v * 3.0 + 1.0);
        let c = shape[1];
        let (gamma, beta, rm, rv) = (
            random(&[c], seed + 1),
            random(&[c], seed + 2),
            random(&[c], seed + 3),
            random(&[c], seed + 4).mapv(|v| v.abs() + 0.5),
        );
        let (g1, b1, rm1, rv1) = (one_d(&gamma), one_d(&beta), one_d(&rm), one_d(&rv));
        let dy = random(shape, seed + 5);
        let (want, want_rm, want_rv) = cpu::batch_norm_train(
            &spec,
            &x.view(),
            &g1.view(),
            &b1.view(),
            &rm1.view(),
            &rv1.view(),
            0,
        )
        .unwrap();
        let (tx, tg, trm, trv) = (upload(&x), upload(&gamma), upload(&rm), upload(&rv));
        poison(shape);
        let got = spec
            .forward_train(
                &tx,
                &tg,
                &upload(&beta),
                &trm,
                &trv,
                &upload(&batches_state(0)),
            )
            .unwrap();
        assert!(
            max_abs_diff(&got.y.to_array().unwrap(), &want.y) < 1e-4,
            "{shape:?} {activation:?} y"
        );
        assert!(max_abs_diff(&trm.to_array().unwrap(), &want_rm.into_dyn()) < 1e-5);
        assert!(max_abs_diff(&trv.to_array().unwrap(), &want_rv.into_dyn()) < 1e-4);
        let (tdy, tb) = (upload(&dy), upload(&beta));
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        // Training's dx flows through the batch's sums; evaluation's is dy through the
        // activation, γ and rstd alone.
        for training in [true, false] {
            let want_g = Value::from(x.clone())
                .batch_norm_backward(
                    &spec,
                    [&gamma.clone().into(), &beta.clone().into()],
                    [&want.mean.clone().into(), &want.rstd.clone().into()],
                    &dy.clone().into(),
                    training,
                )
                .map(arrays)
                .unwrap();
            poison(shape);
            let got_g = spec
                .backward(&tx, [&tg, &tb], [&got.mean, &got.rstd], &tdy, training)
                .unwrap();
            let at = format!("{shape:?} {activation:?} training {training}");
            assert!(
                max_abs_diff(&got_g.x.to_array().unwrap(), &want_g.x) < 1e-4,
                "{at} dx"
            );
            let bound = 1e-5 * m.sqrt() * 10.0;
            assert!(
                max_abs_diff(&got_g.gamma.to_array().unwrap(), &want_g.gamma) < bound,
                "{at} dgamma"
            );
            assert!(
                max_abs_diff(&got_g.beta.to_array().unwrap(), &want_g.beta) < bound,
                "{at} dbeta"
            );
        }

        let ln = LayerNorm {
            activation,
            ..LayerNorm::default()
        };
        let trailing = &shape[1..];
        let (lg, lb) = (random(trailing, seed + 6), random(trailing, seed + 7));
        let want = ln.forward_cpu(&x.view(), &lg.view(), &lb.view()).unwrap();
        let (tlg, tlb) = (upload(&lg), upload(&lb));
        poison(shape);
        let got = ln.forward(&tx, &tlg, &tlb).unwrap();
        assert!(
            max_abs_diff(&got.y.to_array().unwrap(), &want.y) < 1e-4,
            "{shape:?} {activation:?} layer norm y"
        );
        let want_g = Value::from(x.clone())
            .layer_norm_backward(
                &ln,
                [&lg.clone().into(), &lb.clone().into()],
                [&want.mean.clone().into(), &want.rstd.clone().into()],
                &dy.clone().into(),
            )
            .map(arrays)
            .unwrap();
        poison(shape);
        let got_g = ln
            .backward(&tx, [&tlg, &tlb], [&got.mean, &got.rstd], &tdy)
            .unwrap();
        assert!(
            max_abs_diff(&got_g.x.to_array().unwrap(), &want_g.x) < 1e-4,
            "{shape:?} {activation:?} layer norm dx"
        );
        for (name, got, want) in [
            ("dgamma", &got_g.gamma, &want_g.gamma),
            ("dbeta", &got_g.beta, &want_g.beta),
        ] {
            assert!(
                max_abs_diff(&got.to_array().unwrap(), want) < 1e-4,
                "{shape:?} {activation:?} layer norm {name}"
            );
        }
    }
}

/// A batch norm's kernels carry only the constants they read: a second norm of one shape
/// without the first's ReLU compiles just the three passes that apply it (normalize and the
/// two backward ones), where its statistics, batch count and affine gradients were twins of
/// their own before (each a kernel to compile, tens of ms on lavapipe); a norm of another
/// shape shares the batch count. Training step by step: forward, then backward.
#[test]
fn batch_norms_share_the_kernels_their_activation_does_not_reach() {
    if gpu().is_none() {
        return;
    }
    let gpu = common::new_gpu();
    let step = |shape: &[usize], activation| {
        let c = shape[1];
        let spec = BatchNorm2d {
            activation,
            ..BatchNorm2d::default()
        };
        let up = |a: &ArrayD<f32>| Tensor::from_array(&gpu, a).unwrap();
        let (x, dy) = (up(&random(shape, 1)), up(&random(shape, 2)));
        let (gamma, beta) = (up(&random(&[c], 3)), up(&random(&[c], 4)));
        let (rm, rv) = (
            Tensor::full(&gpu, &[c], 0.0).unwrap(),
            Tensor::full(&gpu, &[c], 1.0).unwrap(),
        );
        let out = spec
            .forward_train(&x, &gamma, &beta, &rm, &rv, &up(&batches_state(0)))
            .unwrap();
        let grads = spec
            .backward(&x, [&gamma, &beta], [&out.mean, &out.rstd], &dy, true)
            .unwrap();
        assert!(grads.x.to_array().unwrap().iter().all(|v| v.is_finite()));
        gpu.pipelines_compiled()
    };
    let first = step(&[4, 8, 8, 8], Activation::Relu);
    let unactivated = step(&[4, 8, 8, 8], Activation::None);
    assert_eq!(
        unactivated - first,
        3,
        "pipelines: {first} then {unactivated}"
    );
    let other_shape = step(&[2, 4, 4, 4], Activation::None);
    assert_eq!(
        other_shape - unactivated,
        5,
        "pipelines: {unactivated} then {other_shape}"
    );
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let spec = BatchNorm2d::default();
    let x = random(&[3, 2, 2, 3], 1);
    let (gamma, beta) = (
        Array1::from(vec![1.5f32, -0.7]),
        Array1::from(vec![0.2f32, 0.1]),
    );
    let stats = Array1::from(vec![0.0f32, 1.0]);
    let dy = random(&[3, 2, 2, 3], 2);
    let loss = |x: &ArrayD<f32>| -> f64 {
        let (out, _, _) = cpu::batch_norm_train(
            &spec,
            &x.view(),
            &gamma.view(),
            &beta.view(),
            &stats.view(),
            &stats.view(),
            0,
        )
        .unwrap();
        out.y
            .iter()
            .zip(&dy)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    let (out, _, _) = cpu::batch_norm_train(
        &spec,
        &x.view(),
        &gamma.view(),
        &beta.view(),
        &stats.view(),
        &stats.view(),
        0,
    )
    .unwrap();
    let g = cpu::batch_norm_backward(
        &x.view(),
        &gamma.view(),
        &one_d(&out.mean).view(),
        &one_d(&out.rstd).view(),
        &dy.view(),
        true,
    )
    .unwrap();
    for i in 0..x.len() {
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus.as_slice_mut().unwrap()[i] += 1e-2;
        minus.as_slice_mut().unwrap()[i] -= 1e-2;
        let numeric = (loss(&plus) - loss(&minus)) / 2e-2;
        let analytic = f64::from(g.x.as_slice().unwrap()[i]);
        assert!(
            (numeric - analytic).abs() < 5e-3 * (1.0 + analytic.abs()),
            "batch norm dx[{i}]: {analytic} vs {numeric}"
        );
    }

    let ln = LayerNorm::default();
    let (lg, lb) = (random(&[2, 2, 3], 3), random(&[2, 2, 3], 4));
    let ln_loss = |x: &ArrayD<f32>| -> f64 {
        let out = ln.forward_cpu(&x.view(), &lg.view(), &lb.view()).unwrap();
        out.y
            .iter()
            .zip(&dy)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    let out = ln.forward_cpu(&x.view(), &lg.view(), &lb.view()).unwrap();
    let g = ln
        .backward_cpu(&x.view(), &lg.view(), &out.mean, &out.rstd, &dy.view())
        .unwrap();
    for i in 0..x.len() {
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus.as_slice_mut().unwrap()[i] += 1e-2;
        minus.as_slice_mut().unwrap()[i] -= 1e-2;
        let numeric = (ln_loss(&plus) - ln_loss(&minus)) / 2e-2;
        let analytic = f64::from(g.x.as_slice().unwrap()[i]);
        assert!(
            (numeric - analytic).abs() < 5e-3 * (1.0 + analytic.abs()),
            "layer norm dx[{i}]: {analytic} vs {numeric}"
        );
    }
}

#[test]
fn mismatched_parameters_are_errors() {
    let x = random(&[2, 3, 4, 4], 1);
    let c2 = Array1::from(vec![1.0f32, 1.0]);
    let err = cpu::batch_norm_train(
        &BatchNorm2d::default(),
        &x.view(),
        &c2.view(),
        &c2.view(),
        &c2.view(),
        &c2.view(),
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("must be [3], got [2]"), "{err}");
    let wrong = random(&[4, 4, 3], 2);
    let err = LayerNorm::default()
        .forward_cpu(&x.view(), &wrong.view(), &wrong.view())
        .unwrap_err();
    assert!(err.to_string().contains("trailing dimensions"), "{err}");
}

#[test]
fn running_statistics_match_pytorch_with_momentum_or_cumulative() {
    use wgcnn::ops::batch_norm::batches_tracked;
    let goldens = cases("bn_running_");
    assert_eq!(goldens.len(), 2);
    for case in goldens {
        let (j, name) = (&case.json, &case.name);
        let spec = BatchNorm2d {
            eps: j["params"]["eps"].as_f64().unwrap() as f32,
            momentum: j["params"]["momentum"].as_f64().map(|m| m as f32),
            ..BatchNorm2d::default()
        };
        let list = |v: &serde_json::Value| -> Vec<ArrayD<f32>> {
            v.as_array().unwrap().iter().map(tensor).collect()
        };
        let xs = list(&j["inputs"]["x_batches"]);
        let (means, vars) = (
            list(&j["outputs"]["running_mean_after"]),
            list(&j["outputs"]["running_var_after"]),
        );
        let (gamma, beta) = (tensor(&j["inputs"]["weight"]), tensor(&j["inputs"]["bias"]));
        let tracked = j["outputs"]["num_batches_tracked"]["data"][0]
            .as_u64()
            .unwrap() as u32;
        assert_eq!(tracked, xs.len() as u32);

        // CPU reference.
        let (mut rm, mut rv) = (Array1::zeros(3), Array1::ones(3));
        let mut last_var = None;
        for (t, x) in xs.iter().enumerate() {
            let (out, m, v) = cpu::batch_norm_train(
                &spec,
                &x.view(),
                &one_d(&gamma).view(),
                &one_d(&beta).view(),
                &rm.view(),
                &rv.view(),
                t as u32,
            )
            .unwrap();
            (rm, rv, last_var) = (m, v, out.var);
            assert_close(
                &format!("{name} cpu mean {t}"),
                &rm.clone().into_dyn(),
                &means[t],
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("{name} cpu var {t}"),
                &rv.clone().into_dyn(),
                &vars[t],
                1e-5,
                1e-6,
            );
        }
        let want_var = tensor(&j["outputs"]["batch_var"]);
        assert_close(
            &format!("{name} cpu batch var"),
            &last_var.unwrap(),
            &want_var,
            1e-5,
            1e-6,
        );

        if gpu().is_none() {
            continue;
        }
        let (trm, trv) = (
            upload(&ArrayD::zeros(ndarray::IxDyn(&[3]))),
            upload(&ArrayD::ones(ndarray::IxDyn(&[3]))),
        );
        let count = upload(&batches_state(0));
        let (tg, tb) = (upload(&gamma), upload(&beta));
        let mut last_var = None;
        for (t, x) in xs.iter().enumerate() {
            let out = spec
                .forward_train(&upload(x), &tg, &tb, &trm, &trv, &count)
                .unwrap();
            last_var = out.var;
            assert_close(
                &format!("{name} gpu mean {t}"),
                &trm.to_array().unwrap(),
                &means[t],
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("{name} gpu var {t}"),
                &trv.to_array().unwrap(),
                &vars[t],
                1e-5,
                1e-6,
            );
        }
        assert_eq!(
            batches_tracked(&count.to_array().unwrap()),
            tracked,
            "{name} gpu count"
        );
        let var = last_var.unwrap().to_array().unwrap();
        assert_close(
            &format!("{name} gpu batch var"),
            &var,
            &want_var,
            1e-5,
            1e-6,
        );
        let eval = spec
            .forward_eval(
                &upload(&tensor(&j["inputs"]["x_eval"])),
                &tg,
                &tb,
                &trm,
                &trv,
            )
            .unwrap();
        let y = eval.y.to_array().unwrap();
        assert_close(
            &format!("{name} gpu y_eval"),
            &y,
            &tensor(&j["outputs"]["y_eval"]),
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn one_value_per_channel_cannot_train() {
    let spec = BatchNorm2d::default();
    let x = random(&[1, 3, 1, 1], 1);
    let (ones, zeros) = (Array1::<f32>::ones(3), Array1::<f32>::zeros(3));
    let err = cpu::batch_norm_train(
        &spec,
        &x.view(),
        &ones.view(),
        &zeros.view(),
        &zeros.view(),
        &ones.view(),
        0,
    )
    .unwrap_err()
    .to_string();
    let expected =
        "expected more than 1 value per channel when training, got input size [1, 3, 1, 1]";
    assert!(err.contains(expected), "{err}");
    assert!(
        cpu::batch_norm_eval(
            &spec,
            &x.view(),
            &ones.view(),
            &zeros.view(),
            &zeros.view(),
            &ones.view()
        )
        .is_ok()
    );
    let bad = BatchNorm2d {
        momentum: Some(1.5),
        ..spec
    };
    assert!(
        cpu::batch_norm_train(
            &bad,
            &random(&[2, 3, 2, 2], 2).view(),
            &ones.view(),
            &zeros.view(),
            &zeros.view(),
            &ones.view(),
            0
        )
        .is_err()
    );
    let Some(_) = gpu() else { return };
    let (o, z) = (
        upload(&ones.clone().into_dyn()),
        upload(&zeros.clone().into_dyn()),
    );
    let (rm, rv, count) = (
        upload(&zeros.into_dyn()),
        upload(&ones.into_dyn()),
        upload(&batches_state(0)),
    );
    let err = spec
        .forward_train(&upload(&x), &o, &z, &rm, &rv, &count)
        .unwrap_err()
        .to_string();
    assert!(err.contains(expected), "{err}");
    // Nothing was updated.
    assert_eq!(
        rm.to_array().unwrap(),
        ArrayD::<f32>::zeros(ndarray::IxDyn(&[3]))
    );
    assert_eq!(count.to_array().unwrap()[[]].to_bits(), 0);
}

/// A channel of four million values: the workgroups' lanes each walk their share within
/// the loop bound, the statistics as the CPU's. A channel of nine million values around
/// 1000 (once an error: one workgroup's lanes would have walked past the bound) splits over
/// more workgroups, and the one-pass statistics keep their precision: against float64.
#[test]
fn batch_norm_over_millions_of_values_per_channel() {
    let Some(gpu) = gpu() else { return };
    let spec = BatchNorm2d::default();
    let x = random(&[4, 1, 1000, 1000], 31).mapv(|v| 3.0 * v + 1.0);
    let ones = ndarray::arr1(&[1.0f32]);
    let (zero, one) = (ndarray::arr1(&[0.0f32]), ndarray::arr1(&[1.0f32]));
    let (want, _, _) = cpu::batch_norm_train(
        &spec,
        &x.view(),
        &ones.view(),
        &zero.view(),
        &zero.view(),
        &one.view(),
        0,
    )
    .unwrap();
    let state = |a: &Array1<f32>| Tensor::from_array(gpu, a).unwrap();
    let (g, b, m, v) = (state(&ones), state(&zero), state(&zero), state(&one));
    let count = Tensor::from_array(gpu, &batches_state(0)).unwrap();
    let got = spec
        .forward_train(&upload(&x), &g, &b, &m, &v, &count)
        .unwrap();
    let mean = got.mean.to_array().unwrap();
    assert!(
        (mean[[0]] - want.mean[[0]]).abs() < 1e-4,
        "{mean} vs {}",
        want.mean
    );
    assert!(max_abs_diff(&got.rstd.to_array().unwrap(), &want.rstd) < 1e-4);
    assert!(max_abs_diff(&got.y.to_array().unwrap(), &want.y) < 1e-3);

    let far = random(&[9, 1, 1000, 1000], 32).mapv(|v| 3.0 * v + 1000.0);
    let n = far.len() as f64;
    let mean64 = far.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var64 = far
        .iter()
        .map(|&v| (f64::from(v) - mean64).powi(2))
        .sum::<f64>()
        / n;
    let got = spec
        .forward_train(&upload(&far), &g, &b, &m, &v, &count)
        .unwrap();
    let mean = f64::from(got.mean.to_array().unwrap()[[0]]);
    let rstd = f64::from(got.rstd.to_array().unwrap()[[0]]);
    let rstd64 = 1.0 / (var64 + f64::from(spec.eps)).sqrt();
    assert!((mean - mean64).abs() < 1e-3, "mean {mean} vs {mean64}");
    assert!(
        (rstd / rstd64 - 1.0).abs() < 1e-4,
        "rstd {rstd} vs {rstd64}"
    );
}

/// Layer norm over a batch of 70,000 samples: dγ and dβ sum over the batch, one invocation
/// per affine element, which walked all 70,000 samples (past lavapipe's 65,535-iteration
/// cap); now one per affine element and run of samples, the runs' sums added up. Rows of whole
/// vec4s (8) and not (5), against the CPU.
#[test]
fn layer_norm_affine_gradients_over_a_long_batch() {
    if gpu().is_none() {
        return;
    }
    let spec = LayerNorm::default();
    for (features, seed) in [(8, 71), (5, 72)] {
        let x = random(&[70_000, features], seed);
        let gamma = random(&[features], seed + 1);
        let beta = random(&[features], seed + 2);
        let dy = random(&[70_000, features], seed + 3);
        let cpu = spec
            .forward_cpu(&x.view(), &gamma.view(), &beta.view())
            .unwrap();
        let want = spec
            .backward_cpu(&x.view(), &gamma.view(), &cpu.mean, &cpu.rstd, &dy.view())
            .unwrap();
        let (tx, tg, tb) = (upload(&x), upload(&gamma), upload(&beta));
        let out = spec.forward(&tx, &tg, &tb).unwrap();
        let got = spec
            .backward(&tx, [&tg, &tb], [&out.mean, &out.rstd], &upload(&dy))
            .unwrap();
        for (name, got, want) in [
            ("dγ", &got.gamma, &want.gamma),
            ("dβ", &got.beta, &want.beta),
            ("dx", &got.x, &want.x),
        ] {
            let got = got.to_array().unwrap();
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got, want);
            assert!(
                diff < 1e-4 * scale,
                "{features} features {name}: off by {diff} (scale {scale})"
            );
        }
    }
}
