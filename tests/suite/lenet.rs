//! LeNet-5 on four MNIST images, composed from the ops by hand, forward and backward on the
//! GPU and on the CPU, against PyTorch (tests/golden/lenet_mnist_b4.json): the whole chain
//! of kernels, each gradient handed to the next.

use crate::common;

use common::golden::{assert_close, tensor};
use common::gpu;
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;
use wgcnn::ops::{Conv2d, Pool2d};
use wgcnn::{Activation, GpuOptimizer, Optimizer, Tensor};

use common::golden::{LENET_NAMES as NAMES, LENET_SHAPES as SHAPES};

const FAN_IN: [usize; 10] = [25, 25, 150, 150, 256, 256, 120, 120, 84, 84];

fn golden() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/lenet_mnist_b4.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The golden's input batch, its labels and PyTorch's loss on it.
fn batch(json: &Value) -> (ArrayD<f32>, Vec<usize>, f32) {
    let x = tensor(&json["inputs"]["x"]);
    let labels = tensor(&json["inputs"]["target"])
        .iter()
        .map(|&v| v as usize)
        .collect();
    let loss = json["outputs"]["loss"]["data"][0].as_f64().unwrap() as f32;
    (x, labels, loss)
}

/// The golden's hash initialisation, reproduced bit for bit.
fn init_params() -> Vec<ArrayD<f32>> {
    let lowbias32 = |mut x: u32| {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    };
    (0..10)
        .map(|id| {
            let bound = (1.0f64 / (FAN_IN[id] as f64).sqrt()) as f32;
            ArrayD::from_shape_fn(IxDyn(SHAPES[id]), |_| 0.0)
                .iter()
                .enumerate()
                .map(|(i, _)| {
                    let h = lowbias32(
                        (i as u32).wrapping_add(0x9E37_79B9u32.wrapping_mul(id as u32 + 1)),
                    );
                    ((h >> 8) as f32 / 8_388_608.0 - 1.0) * bound
                })
                .collect::<Vec<f32>>()
        })
        .zip(SHAPES)
        .map(|(v, s)| ArrayD::from_shape_vec(IxDyn(s), v).unwrap())
        .collect()
}

fn assert_matches(name: &str, got: &ArrayD<f32>, want: &Value) {
    if let Some(summary) = want.get("summary") {
        let first: Vec<f32> = summary["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        for (i, (g, w)) in got.iter().zip(&first).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "{name}[{i}]: {g} vs {w}"
            );
        }
        let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
        let l2 = got
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        let (want_sum, want_l2) = (
            summary["sum"].as_f64().unwrap(),
            summary["l2"].as_f64().unwrap(),
        );
        assert!(
            (sum - want_sum).abs() <= 1e-4 * want_l2 + 1e-6,
            "{name} sum {sum} vs {want_sum}"
        );
        assert!(
            (l2 - want_l2).abs() <= 1e-4 * want_l2,
            "{name} l2 {l2} vs {want_l2}"
        );
    } else {
        assert_close(name, got, &tensor(want), 1e-4, 1e-5);
    }
}

/// Forward and backward on the GPU: (loss, logits, parameter gradients).
fn gpu_pass(params: &[Tensor], x: &Tensor, labels: &[usize]) -> (f32, ArrayD<f32>, Vec<Tensor>) {
    let (conv, pool, relu) = (Conv2d::default(), Pool2d::max((2, 2)), Activation::Relu);
    let c1 = conv.forward(x, &params[0], Some(&params[1])).unwrap();
    let r1 = relu.forward(&c1).unwrap();
    let p1 = pool.forward(&r1).unwrap();
    let c2 = conv.forward(&p1.y, &params[2], Some(&params[3])).unwrap();
    let r2 = relu.forward(&c2).unwrap();
    let p2 = pool.forward(&r2).unwrap();
    let p2_shape = p2.y.shape().to_vec();
    let flat = p2.y.reshape(&[4, 256]).unwrap();
    let f1 = wgcnn::ops::linear(&flat, &params[4], Some(&params[5]), Activation::None).unwrap();
    let r3 = relu.forward(&f1).unwrap();
    let f2 = wgcnn::ops::linear(&r3, &params[6], Some(&params[7]), Activation::None).unwrap();
    let r4 = relu.forward(&f2).unwrap();
    let logits = wgcnn::ops::linear(&r4, &params[8], Some(&params[9]), Activation::None).unwrap();
    let ce = wgcnn::ops::softmax_cross_entropy(&logits, labels).unwrap();

    let g3 = wgcnn::ops::linear_backward(&r4, &params[8], &ce.grad_logits).unwrap();
    let g2 = wgcnn::ops::linear_backward(&r3, &params[6], &relu.backward(&f2, &r4, &g3.x).unwrap())
        .unwrap();
    let g1 =
        wgcnn::ops::linear_backward(&flat, &params[4], &relu.backward(&f1, &r3, &g2.x).unwrap())
            .unwrap();
    let d_p2 = g1.x.reshape(&p2_shape).unwrap();
    let d_r2 = pool
        .backward(r2.shape(), &d_p2, p2.argmax.as_ref())
        .unwrap();
    let gc2 = conv
        .backward(&p1.y, &params[2], &relu.backward(&c2, &r2, &d_r2).unwrap())
        .unwrap();
    let d_r1 = pool
        .backward(r1.shape(), &gc2.x, p1.argmax.as_ref())
        .unwrap();
    let gc1 = conv
        .backward(x, &params[0], &relu.backward(&c1, &r1, &d_r1).unwrap())
        .unwrap();
    let grads = vec![
        gc1.weight, gc1.bias, gc2.weight, gc2.bias, g1.weight, g1.bias, g2.weight, g2.bias,
        g3.weight, g3.bias,
    ];
    (
        ce.loss.to_array().unwrap()[[0]],
        logits.to_array().unwrap(),
        grads,
    )
}

/// The same on the CPU references.
fn cpu_pass(
    params: &[ArrayD<f32>],
    x: &ArrayD<f32>,
    labels: &[usize],
) -> (f32, ArrayD<f32>, Vec<ArrayD<f32>>) {
    let (conv, pool) = (Conv2d::default(), Pool2d::max((2, 2)));
    let relu = |a: &ArrayD<f32>| a.mapv(|v| v.max(0.0));
    let relu_back = |pre: &ArrayD<f32>, dy: &ArrayD<f32>| {
        ArrayD::from_shape_fn(pre.raw_dim(), |i| if pre[&i] > 0.0 { dy[&i] } else { 0.0 })
    };
    let c1 =
        wgcnn::cpu::conv2d(&conv, &x.view(), &params[0].view(), Some(&params[1].view())).unwrap();
    let r1 = relu(&c1);
    let p1 = wgcnn::cpu::pool2d(&pool, &r1.view()).unwrap();
    let c2 = wgcnn::cpu::conv2d(
        &conv,
        &p1.y.view(),
        &params[2].view(),
        Some(&params[3].view()),
    )
    .unwrap();
    let r2 = relu(&c2);
    let p2 = wgcnn::cpu::pool2d(&pool, &r2.view()).unwrap();
    let flat =
        p2.y.clone()
            .into_shape_with_order(IxDyn(&[4, 256]))
            .unwrap();
    let f1 = wgcnn::cpu::linear(
        &flat.view(),
        &params[4].view(),
        Some(&params[5].view()),
        Activation::None,
    )
    .unwrap();
    let r3 = relu(&f1);
    let f2 = wgcnn::cpu::linear(
        &r3.view(),
        &params[6].view(),
        Some(&params[7].view()),
        Activation::None,
    )
    .unwrap();
    let r4 = relu(&f2);
    let logits = wgcnn::cpu::linear(
        &r4.view(),
        &params[8].view(),
        Some(&params[9].view()),
        Activation::None,
    )
    .unwrap();
    let ce = wgcnn::cpu::softmax_cross_entropy(&logits.view(), labels).unwrap();

    let g3 =
        wgcnn::cpu::linear_backward(&r4.view(), &params[8].view(), &ce.grad_logits.view()).unwrap();
    let g2 =
        wgcnn::cpu::linear_backward(&r3.view(), &params[6].view(), &relu_back(&f2, &g3.x).view())
            .unwrap();
    let g1 = wgcnn::cpu::linear_backward(
        &flat.view(),
        &params[4].view(),
        &relu_back(&f1, &g2.x).view(),
    )
    .unwrap();
    let d_p2 = g1.x.into_shape_with_order(IxDyn(p2.y.shape())).unwrap();
    let argmax2 = p2.argmax.as_ref().map(|a| a.view());
    let d_r2 =
        wgcnn::cpu::pool2d_backward(&pool, r2.shape(), &d_p2.view(), argmax2.as_ref()).unwrap();
    let gc2 = wgcnn::cpu::conv2d_backward(
        &conv,
        &p1.y.view(),
        &params[2].view(),
        &relu_back(&c2, &d_r2).view(),
    )
    .unwrap();
    let argmax1 = p1.argmax.as_ref().map(|a| a.view());
    let d_r1 =
        wgcnn::cpu::pool2d_backward(&pool, r1.shape(), &gc2.x.view(), argmax1.as_ref()).unwrap();
    let gc1 = wgcnn::cpu::conv2d_backward(
        &conv,
        &x.view(),
        &params[0].view(),
        &relu_back(&c1, &d_r1).view(),
    )
    .unwrap();
    let grads = vec![
        gc1.weight, gc1.bias, gc2.weight, gc2.bias, g1.weight, g1.bias, g2.weight, g2.bias,
        g3.weight, g3.bias,
    ];
    (ce.loss[[0]], logits, grads)
}

#[test]
fn the_hash_init_reproduces_the_shipped_parameters() {
    let shipped = common::golden::lenet_init_values();
    let ours: Vec<f32> = init_params()
        .iter()
        .flat_map(|p| p.iter().copied())
        .collect();
    assert_eq!(ours.len(), 177_704 / 4);
    assert!(
        ours.iter()
            .zip(&shipped)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "bit-exact init"
    );
}

#[test]
fn lenet_loss_and_every_gradient_match_pytorch_on_gpu_and_cpu() {
    let json = golden();
    let (x, labels, want_loss) = batch(&json);
    let params = init_params();
    let want_logits = tensor(&json["outputs"]["logits"]);

    let (loss, logits, grads) = cpu_pass(&params, &x, &labels);
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "cpu loss {loss} vs {want_loss}"
    );
    assert_close("cpu logits", &logits, &want_logits, 1e-4, 1e-5);
    for (name, g) in NAMES.iter().zip(&grads) {
        assert_matches(
            &format!("cpu grad {name}"),
            g,
            &json["grads"]["params"][name],
        );
    }

    let Some(gpu) = gpu() else { return };
    let tparams: Vec<Tensor> = params
        .iter()
        .map(|p| Tensor::from_array(gpu, p).unwrap())
        .collect();
    let tx = Tensor::from_array(gpu, &x).unwrap();
    let (loss, logits, grads) = gpu_pass(&tparams, &tx, &labels);
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "gpu loss {loss} vs {want_loss}"
    );
    assert_close("gpu logits", &logits, &want_logits, 1e-4, 1e-5);
    for (name, g) in NAMES.iter().zip(&grads) {
        assert_matches(
            &format!("gpu grad {name}"),
            &g.to_array().unwrap(),
            &json["grads"]["params"][name],
        );
    }

    // One SGD step on the GPU, then the loss on the same batch.
    let mut sgd = GpuOptimizer::new(Optimizer::sgd(0.1)).unwrap();
    sgd.step(
        &tparams.iter().collect::<Vec<_>>(),
        &grads.iter().collect::<Vec<_>>(),
    )
    .unwrap();
    for (name, p) in NAMES.iter().zip(&tparams) {
        assert_matches(
            &format!("param after step {name}"),
            &p.to_array().unwrap(),
            &json["outputs"]["params_after_sgd_step"][name],
        );
    }
    let (after, _, _) = gpu_pass(&tparams, &tx, &labels);
    let want_after = json["outputs"]["loss_after_sgd_step"]["data"][0]
        .as_f64()
        .unwrap() as f32;
    assert!(
        (after - want_after).abs() < 1e-5,
        "loss after one step {after} vs {want_after}"
    );
}

/// The same golden through the executor: `nn::lenet5` built on each device, the golden's
/// weights loaded by name, one recorded training step.
#[test]
fn lenet5_through_the_executor_matches_pytorch_on_gpu_and_cpu() {
    use wgcnn::nn::{LeNetOptions, lenet5};
    use wgcnn::train::{cross_entropy, train_step};
    use wgcnn::{Device, Mode};

    let json = golden();
    let (x, labels, want_loss) = batch(&json);
    let want_after = json["outputs"]["loss_after_sgd_step"]["data"][0]
        .as_f64()
        .unwrap() as f32;
    let mut devices = vec![Device::Cpu];
    if let Some(gpu) = gpu() {
        devices.push(Device::Gpu(gpu.clone()));
    }
    for device in devices {
        let mut model = lenet5(LeNetOptions::default())
            .unwrap()
            .build(device.clone(), 7)
            .unwrap();
        let names: Vec<String> = model.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, NAMES, "state-dict names");
        for (name, value) in NAMES.iter().zip(init_params()) {
            model.set_state(name, value).unwrap();
        }
        let dispatches = || match &device {
            Device::Gpu(gpu) => gpu.dispatches(),
            Device::Cpu => 0,
        };
        // Forward + backward, gradients compared by name.
        let logits = model
            .forward(device.upload(x.clone()).unwrap(), Mode::Train)
            .unwrap();
        let before = dispatches();
        let ce = cross_entropy(logits, &labels).unwrap();
        let loss = ce.loss.to_array().unwrap()[[0]];
        assert!((loss - want_loss).abs() < 1e-5, "{device:?} loss {loss}");
        assert!(model.backward(ce.grad_logits).unwrap().is_none());
        let separate = dispatches() - before;
        for (name, grad) in model.grads() {
            assert_matches(
                &format!("{} grad {name}", device.name()),
                &grad.unwrap().to_array().unwrap(),
                &json["grads"]["params"][name.as_str()],
            );
        }
        // The same through the loss run with fc3's backward pass (`train_step`'s way): on
        // the GPU one dispatch instead of the loss's, fc3's two products', its bias sum and
        // fc2's ReLU backward with fc2's bias sum (the head takes fc3's dx through fc2's ReLU).
        model
            .forward(device.upload(x.clone()).unwrap(), Mode::Train)
            .unwrap();
        let before = dispatches();
        let (loss, correct) = model.backward_cross_entropy(&labels).unwrap();
        let fused = dispatches() - before;
        let loss = loss.to_array().unwrap()[[0]];
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "{device:?} fused loss {loss}"
        );
        assert_eq!(correct.to_array().unwrap(), ce.correct.to_array().unwrap());
        for (name, grad) in model.grads() {
            assert_matches(
                &format!("{} grad {name} through the fused loss", device.name()),
                &grad.unwrap().to_array().unwrap(),
                &json["grads"]["params"][name.as_str()],
            );
        }
        if matches!(device, Device::Gpu(_)) {
            assert_eq!(fused + 4, separate, "dispatches fused / separately");
        }
        // A whole recorded step with SGD, then the loss on the same batch.
        let mut model = lenet5(LeNetOptions::default())
            .unwrap()
            .build(device.clone(), 7)
            .unwrap();
        for (name, value) in NAMES.iter().zip(init_params()) {
            model.set_state(name, value).unwrap();
        }
        let mut sgd = model.optimizer(Optimizer::sgd(0.1)).unwrap();
        let out = train_step(
            &mut model,
            &mut sgd,
            |d: &Device| d.upload(x.clone()),
            &labels,
        )
        .unwrap();
        assert!((out.loss.to_array().unwrap()[[0]] - want_loss).abs() < 1e-5);
        let logits = model
            .forward(device.upload(x.clone()).unwrap(), Mode::Eval)
            .unwrap();
        let after = cross_entropy(logits, &labels).unwrap().loss;
        let after: f32 = after.to_array().unwrap()[[0]];
        assert!(
            (after - want_after).abs() < 1e-5,
            "{} loss after one step {after} vs {want_after}",
            device.name()
        );
    }
}
