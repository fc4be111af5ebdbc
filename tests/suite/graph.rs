//! The graph executor and the nn layers: GPU against the CPU path, gradients against finite
//! differences, seeded initialisation, memory over many steps, checkpoints, bad use.

use crate::common;

use common::{Scratch, gpu, max_abs_diff, random};
use ndarray::ArrayD;
use wgcnn::graph::GraphOptimizer;
use wgcnn::nn::{self, Conv2d, LeNetOptions, Linear, lenet5};
use wgcnn::ops::Pool2d;
use wgcnn::train::{cross_entropy, train_step};
use wgcnn::{Activation, Device, Error, Graph, Mode, Optimizer, Padding};

/// x → conv(same, tanh) → add(·, x) → tanh → t; t → conv → add(·, t) → s; s + s → batch
/// norm → flatten → linear. The input, t (a residual sum's output, its tanh run by the sum)
/// and s (read twice by one node) each feed two inputs, so their gradients are sums; the
/// sums' own backward adds the parts for t and s (`Layer::sums_output_gradients`).
fn residual_model(device: Device) -> Graph {
    let mut g = Graph::new(device, 5);
    let conv = |act| {
        Conv2d::new(3, 3, (3, 3))
            .padding(Padding::Same)
            .activation(act)
    };
    let y = g
        .add("conv", conv(Activation::Tanh), &[Graph::INPUT])
        .unwrap();
    let sum = g.add("sum", nn::Add, &[y, Graph::INPUT]).unwrap();
    let t = g
        .add("tanh", nn::Activate(Activation::Tanh), &[sum])
        .unwrap();
    let y = g.add("conv2", conv(Activation::None), &[t]).unwrap();
    let s = g.add("sum2", nn::Add, &[y, t]).unwrap();
    let twice = g.add("twice", nn::Add, &[s, s]).unwrap();
    let bn = g.add("bn", nn::BatchNorm2d::new(3), &[twice]).unwrap();
    let flat = g.add("flatten", nn::Flatten, &[bn]).unwrap();
    g.add("fc", Linear::new(3 * 5 * 4, 4), &[flat]).unwrap();
    g
}

fn loss_and_input_grad(g: &mut Graph, x: &ArrayD<f32>, labels: &[usize]) -> (f32, ArrayD<f32>) {
    let device = g.device().clone();
    let logits = g
        .forward(device.upload(x.clone()).unwrap(), Mode::Train)
        .unwrap();
    let ce = cross_entropy(logits, labels).unwrap();
    let loss = ce.loss.to_array().unwrap()[[0]];
    let dx = g.backward(ce.grad_logits).unwrap().expect("input gradient");
    (loss, dx.to_array().unwrap())
}

#[test]
fn a_value_feeding_two_nodes_gets_the_sum_of_their_gradients() {
    let x = random(&[2, 3, 5, 4], 11);
    let labels = [1, 3];
    let mut cpu = residual_model(Device::Cpu);
    cpu.set_input_grad(true);
    let (_, dx) = loss_and_input_grad(&mut cpu, &x, &labels);

    // Finite differences of the CPU loss (in f64 via central differences of f32 runs).
    let h = 1e-2f32;
    for index in [0usize, 7, 31, 64, 119] {
        let mut plus = x.clone();
        plus.as_slice_mut().unwrap()[index] += h;
        let mut minus = x.clone();
        minus.as_slice_mut().unwrap()[index] -= h;
        let (lp, _) = loss_and_input_grad(&mut cpu, &plus, &labels);
        let (lm, _) = loss_and_input_grad(&mut cpu, &minus, &labels);
        let numeric = (lp - lm) / (2.0 * h);
        let analytic = dx.as_slice().unwrap()[index];
        assert!(
            (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
            "dx[{index}]: finite difference {numeric}, backward {analytic}"
        );
    }

    let Some(gpu) = gpu() else { return };
    let mut on_gpu = residual_model(Device::Gpu(gpu.clone()));
    on_gpu.set_input_grad(true);
    let (_, gpu_dx) = loss_and_input_grad(&mut on_gpu, &x, &labels);
    let (_, cpu_dx) = loss_and_input_grad(&mut cpu, &x, &labels);
    assert!(max_abs_diff(&gpu_dx, &cpu_dx) < 1e-5, "input gradient");
    for ((name, g), (_, c)) in on_gpu.grads().into_iter().zip(cpu.grads()) {
        let (g, c) = (
            g.unwrap().to_array().unwrap(),
            c.unwrap().to_array().unwrap(),
        );
        assert!(max_abs_diff(&g, &c) < 1e-4, "{name}");
    }
}

#[test]
fn identical_seeds_give_identical_weights_and_he_bounds_hold() {
    let build = |seed| {
        lenet5(LeNetOptions::default())
            .unwrap()
            .build(Device::Cpu, seed)
            .unwrap()
            .checkpoint()
            .unwrap()
    };
    let (a, b, c) = (build(3), build(3), build(4));
    assert_eq!(a, b);
    assert_ne!(a.get("conv1.weight"), c.get("conv1.weight"));
    let w = a.get("conv1.weight").unwrap();
    let bound = (6.0f32 / 25.0).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    assert!(w.iter().map(|v| v.abs()).fold(0.0, f32::max) > 0.8 * bound);
    assert!(a.get("conv1.bias").unwrap().iter().all(|&v| v == 0.0));
    let names: Vec<&str> = a.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"fc3.weight") && names.len() == 10);
    let bn = lenet5(LeNetOptions {
        batch_norm: true,
        dropout: 0.5,
        ..LeNetOptions::default()
    })
    .unwrap()
    .build(Device::Cpu, 3)
    .unwrap();
    let names: Vec<String> = bn.state().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"bn2.running_var".to_string()));
    // Adding layers does not change the others' initial weights.
    assert_eq!(
        bn.checkpoint().unwrap().get("fc1.weight"),
        a.get("fc1.weight")
    );
}

fn mnist() -> wgcnn::data::Mnist {
    wgcnn::data::Mnist::load(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist")).unwrap()
}

/// Trains `steps` mini-batches of `batch` (in order) and returns each step's loss.
fn train(
    model: &mut Graph,
    opt: &mut GraphOptimizer,
    data: &wgcnn::data::Mnist,
    batch: usize,
    steps: usize,
) -> Vec<f32> {
    let normalize = wgcnn::Normalize::mnist();
    let order = wgcnn::data::shuffled_indices(data.train_images.count, 9, 0);
    order[..batch * steps]
        .chunks(batch)
        .map(|indices| {
            let labels = wgcnn::train::label_batch(&data.train_labels, indices).unwrap();
            let out = train_step(
                model,
                opt,
                |d: &Device| wgcnn::train::image_batch(d, &data.train_images, indices, &normalize),
                &labels,
            )
            .unwrap();
            out.loss.to_array().unwrap()[[0]]
        })
        .collect()
}

#[test]
fn batch_norm_and_dropout_lenet_steps_agree_on_gpu_and_cpu() {
    let Some(gpu) = gpu() else { return };
    let data = mnist();
    let options = LeNetOptions {
        batch_norm: true,
        dropout: 0.3,
        ..LeNetOptions::default()
    };
    let run = |device: Device| {
        let mut model = lenet5(options).unwrap().build(device, 21).unwrap();
        let mut opt = model.optimizer(Optimizer::adam(1e-3)).unwrap();
        let losses = train(&mut model, &mut opt, &data, 16, 4);
        (losses, model.checkpoint().unwrap())
    };
    let (cpu_losses, cpu_state) = run(Device::Cpu);
    let (gpu_losses, gpu_state) = run(Device::Gpu(gpu.clone()));
    for (c, g) in cpu_losses.iter().zip(&gpu_losses) {
        assert!((c - g).abs() < 1e-4 * c.abs().max(1.0), "loss {c} vs {g}");
    }
    for ((name, c), (_, g)) in cpu_state.tensors.iter().zip(&gpu_state.tensors) {
        assert!(max_abs_diff(c, g) < 1e-4, "{name} after 4 steps");
    }
}

#[test]
fn a_short_mnist_run_learns_and_gpu_follows_the_cpu_trajectory() {
    let Some(gpu) = gpu() else { return };
    let data = mnist();
    let device = Device::Gpu(gpu.clone());
    let mut model = lenet5(LeNetOptions::default())
        .unwrap()
        .build(device.clone(), 1)
        .unwrap();
    let mut opt = model.optimizer(Optimizer::adam(2e-3)).unwrap();
    let losses = train(&mut model, &mut opt, &data, 32, 120);

    // The CPU path from the same seed takes the same first steps.
    let mut cpu_model = lenet5(LeNetOptions::default())
        .unwrap()
        .build(Device::Cpu, 1)
        .unwrap();
    let mut cpu_opt = cpu_model.optimizer(Optimizer::adam(2e-3)).unwrap();
    let cpu_losses = train(&mut cpu_model, &mut cpu_opt, &data, 32, 5);
    for (step, (c, g)) in cpu_losses.iter().zip(&losses).enumerate() {
        assert!((c - g).abs() < 1e-3, "step {step}: cpu {c}, gpu {g}");
    }

    let first: f32 = losses[..20].iter().sum::<f32>() / 20.0;
    let last: f32 = losses[100..].iter().sum::<f32>() / 20.0;
    assert!(last < 0.5 * first, "loss {first} → {last}");
    let test = data.test_images.first(1000);
    let eval = wgcnn::train::evaluate(
        &mut model,
        &test,
        &data.test_labels[..1000],
        &wgcnn::Normalize::mnist(),
        500,
    )
    .unwrap();
    assert!(
        eval.accuracy > 0.85,
        "test accuracy after 120 steps of 32: {}",
        eval.accuracy
    );
}

#[test]
fn pool_memory_is_flat_over_500_steps() {
    let Some(_) = gpu() else { return };
    // A context of its own: the other tests' buffers must not count.
    let gpu = &common::new_gpu();
    let data = mnist();
    let options = LeNetOptions {
        batch_norm: true,
        dropout: 0.2,
        ..LeNetOptions::default()
    };
    let mut model = lenet5(options)
        .unwrap()
        .build(Device::Gpu(gpu.clone()), 2)
        .unwrap();
    let mut opt = model.optimizer(Optimizer::momentum(0.01, 0.9)).unwrap();
    let normalize = wgcnn::Normalize::mnist();
    let mut step = |i: usize| {
        let indices: Vec<usize> = (i * 4..i * 4 + 4).collect();
        let labels = wgcnn::train::label_batch(&data.train_labels, &indices).unwrap();
        train_step(
            &mut model,
            &mut opt,
            |d: &Device| wgcnn::train::image_batch(d, &data.train_images, &indices, &normalize),
            &labels,
        )
        .unwrap()
    };
    for i in 0..10 {
        step(i);
    }
    gpu.synchronize().unwrap();
    let warm = gpu.pool_stats();
    for i in 10..510 {
        let out = step(i);
        if i % 100 == 0 {
            assert!(out.loss.to_array().unwrap()[[0]].is_finite());
        }
    }
    gpu.synchronize().unwrap();
    let after = gpu.pool_stats();
    assert_eq!(
        after.allocations, warm.allocations,
        "no new buffers after warm-up: {warm:?} → {after:?}"
    );
    assert!(after.live_bytes + after.cached_bytes <= warm.live_bytes + warm.cached_bytes);
}

#[test]
fn a_checkpoint_round_trip_gives_identical_predictions() {
    let Some(gpu) = gpu() else { return };
    let device = Device::Gpu(gpu.clone());
    let data = mnist();
    let mut model = lenet5(LeNetOptions::default())
        .unwrap()
        .build(device.clone(), 8)
        .unwrap();
    let mut opt = model.optimizer(Optimizer::sgd(0.05)).unwrap();
    train(&mut model, &mut opt, &data, 8, 3);
    let dir = Scratch::new("graph");
    let path = dir.join("lenet.safetensors");
    model.save(&path).unwrap();

    let x = random(&[3, 1, 28, 28], 4);
    let predict = |m: &mut Graph| {
        m.forward(device.upload(x.clone()).unwrap(), Mode::Eval)
            .unwrap()
            .to_array()
            .unwrap()
    };
    let want = predict(&mut model);
    let mut other = lenet5(LeNetOptions::default())
        .unwrap()
        .build(device.clone(), 99)
        .unwrap();
    assert_ne!(predict(&mut other), want);
    other.load(&path).unwrap();
    assert_eq!(predict(&mut other), want, "bit-identical after loading");

    // A model with batch norm cannot take this checkpoint, and says why.
    let mut bn = lenet5(LeNetOptions {
        batch_norm: true,
        dropout: 0.0,
        ..LeNetOptions::default()
    })
    .unwrap()
    .build(Device::Cpu, 1)
    .unwrap();
    let before = bn.checkpoint().unwrap();
    let e = bn.load(&path).unwrap_err().to_string();
    assert!(e.contains("missing \"bn1.weight\""), "{e}");
    assert_eq!(
        bn.checkpoint().unwrap(),
        before,
        "a failed load changes nothing"
    );
    // A corrupt file is an error, not a panic.
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    assert!(other.load(&corrupt).is_err());
    assert!(other.load(dir.join("absent.safetensors")).is_err());
}

#[test]
fn misuse_is_an_error_that_says_what_to_do() {
    let mut g = Graph::new(Device::Cpu, 1);
    let e = g
        .forward(Device::Cpu.upload(random(&[1, 2], 1)).unwrap(), Mode::Eval)
        .unwrap_err();
    assert!(e.to_string().contains("no layers"), "{e}");
    let e = g.add("bad", nn::Add, &[0]).unwrap_err();
    assert!(e.to_string().contains("takes 2 inputs"), "{e}");
    let e = g.add("bad", nn::relu(), &[3]).unwrap_err();
    assert!(e.to_string().contains("not defined yet"), "{e}");
    g.add("fc", Linear::new(4, 2), &[0]).unwrap();
    let e = g.add("fc", Linear::new(2, 2), &[1]).unwrap_err();
    assert!(e.to_string().contains("unique"), "{e}");
    // A fused leaky ReLU with a negative slope would get its gradient wrong (it is read from
    // the output): refused, with the way out.
    let leaky = Activation::LeakyRelu(-0.5);
    let e = g
        .add("leaky", Linear::new(2, 2).activation(leaky), &[1])
        .unwrap_err();
    assert!(e.to_string().contains("nn::leaky_relu(-0.5)"), "{e}");
    let conv = Conv2d::new(1, 1, (1, 1)).activation(leaky);
    let e = g.add("leaky", conv, &[0]).unwrap_err();
    assert!(e.to_string().contains("slope of at least 0"), "{e}");

    // Backward with no kept forward pass.
    let e = g
        .backward(Device::Cpu.upload(random(&[1, 2], 1)).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("forward pass"), "{e}");
    g.forward(Device::Cpu.upload(random(&[1, 4], 1)).unwrap(), Mode::Eval)
        .unwrap();
    assert!(
        g.backward(Device::Cpu.upload(random(&[1, 2], 1)).unwrap())
            .is_err()
    );
    // A wrong input width names the node.
    let e = g
        .forward(Device::Cpu.upload(random(&[1, 5], 1)).unwrap(), Mode::Eval)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("\"fc\""), "{e}");
    // Loading a tensor of the wrong shape.
    let e = g
        .set_state("fc.weight", random(&[3, 4], 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 4]"), "{e}");
    assert!(g.freeze("nope", true).is_err());

    // A GPU value into a CPU model.
    if let Some(gpu) = gpu() {
        let x = Device::Gpu(gpu.clone()).upload(random(&[1, 4], 1)).unwrap();
        let e = g.forward(x, Mode::Eval).unwrap_err();
        assert!(e.to_string().contains("Device"), "{e}");
    }
}

#[test]
fn online_mini_batch_and_full_batch_learning_all_lower_the_loss() {
    // The batch size picks the mode: 1 (online), a few (mini-batch), all (full batch).
    let data = mnist();
    let images = data.train_images.first(32);
    let labels = &data.train_labels[..32];
    let normalize = wgcnn::Normalize::mnist();
    for (batch, lr) in [(1, 0.01), (8, 0.05), (32, 0.1)] {
        let mut model = nn::Sequential::new()
            .add("flatten", nn::Flatten)
            .add("fc", Linear::new(784, 10))
            .build(Device::Cpu, 4)
            .unwrap();
        let mut opt = model.optimizer(Optimizer::sgd(lr)).unwrap();
        let epoch = |model: &mut Graph, opt: &mut GraphOptimizer, e| {
            wgcnn::train::train_epoch(model, opt, &images, labels, &normalize, batch, 1, e).unwrap()
        };
        let first = epoch(&mut model, &mut opt, 0);
        let mut last = first;
        for e in 1..5 {
            last = epoch(&mut model, &mut opt, e);
        }
        assert_eq!(model.steps(), 5 * 32u32.div_ceil(batch as u32));
        assert!(
            last.loss < first.loss,
            "batch {batch}: {} → {}",
            first.loss,
            last.loss
        );
    }
}

/// x → conv 3×3 (act) → each pooling (their outputs added) → flatten → linear, with the
/// activation fused into the convolution, or (`separate`) as a layer of its own, which no
/// pooling takes over.
fn conv_then_pools(device: Device, act: Activation, pools: &[Pool2d], separate: bool) -> Graph {
    let mut g = Graph::new(device, 9);
    let conv = Conv2d::new(2, 4, (3, 3)).padding(Padding::Same);
    let mut y = if separate {
        let z = g.add("conv", conv, &[Graph::INPUT]).unwrap();
        g.add("act", nn::Activate(act), &[z]).unwrap()
    } else {
        g.add("conv", conv.activation(act), &[Graph::INPUT])
            .unwrap()
    };
    let pooled: Vec<_> = pools
        .iter()
        .enumerate()
        .map(|(i, &p)| g.add(&format!("pool{i}"), nn::Pool(p), &[y]).unwrap())
        .collect();
    y = pooled[0];
    for &other in &pooled[1..] {
        y = g.add("sum", nn::Add, &[y, other]).unwrap();
    }
    let [_, _, oh, ow] = pools[0].shape(&[1, 4, 16, 16]).unwrap().output();
    let flat = g.add("flatten", nn::Flatten, &[y]).unwrap();
    g.add("fc", Linear::new(4 * oh * ow, 3), &[flat]).unwrap();
    g.set_input_grad(true);
    g
}

#[test]
fn a_max_pool_takes_the_gradient_through_the_activation_before_it() {
    // The fused model's max pooling takes the convolution's activation over (where the
    // convolution's output feeds it alone); every gradient must equal the model that applies
    // the activation as a layer of its own, on both devices.
    let x = random(&[2, 2, 16, 16], 21);
    let labels = [2, 0];
    let max = Pool2d::max((2, 2));
    let layouts: [&[Pool2d]; 4] = [
        &[max],                                                // 2×2 over vec4 rows: the quads kernel
        &[Pool2d::max((4, 4))],                                // windows tiling the input
        &[Pool2d::max((3, 3)).stride((2, 2)).padding((1, 1))], // overlapping windows
        &[max, Pool2d::avg((2, 2))],                           // the convolution feeds two nodes
    ];
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu().map(|gpu| Device::Gpu(gpu.clone())));
    for act in [
        Activation::Relu,
        Activation::LeakyRelu(0.2),
        Activation::Sigmoid,
        Activation::Tanh,
    ] {
        for pools in layouts {
            for device in &devices {
                let what = format!("{act:?}, {pools:?} on {}", device.name());
                let mut fused = conv_then_pools(device.clone(), act, pools, false);
                let mut separate = conv_then_pools(device.clone(), act, pools, true);
                let (loss, dx) = loss_and_input_grad(&mut fused, &x, &labels);
                let (want_loss, want_dx) = loss_and_input_grad(&mut separate, &x, &labels);
                assert!((loss - want_loss).abs() < 1e-6, "loss, {what}");
                assert!(max_abs_diff(&dx, &want_dx) < 1e-6, "input gradient, {what}");
                let want: Vec<_> = separate.grads().into_iter().collect();
                for (name, grad) in fused.grads() {
                    let (_, expected) = want.iter().find(|(n, _)| *n == name).unwrap();
                    let (got, expected) = (
                        grad.unwrap().to_array().unwrap(),
                        expected.unwrap().to_array().unwrap(),
                    );
                    let diff = max_abs_diff(&got, &expected);
                    assert!(diff < 1e-5, "{name}, {what}: {diff}");
                }
            }
        }
    }
}

/// Counts are integers in the API: `counts` reads batch norm's `num_batches_tracked` as a
/// number, `set_count` sets one (checkpoints hold it as int64, training counts on from it),
/// `state` lists only float tensors, and `set_state` on a count is an error that says what
/// to call (it used to store a float's bits: 5.0 became the count 1084227584).
#[test]
fn counts_are_integers() {
    for device in common::devices() {
        let options = LeNetOptions {
            batch_norm: true,
            ..LeNetOptions::default()
        };
        let mut model = lenet5(options).unwrap().build(device.clone(), 3).unwrap();
        let mut sgd = model.optimizer(wgcnn::Optimizer::sgd(0.01)).unwrap();
        let x = random(&[4, 1, 28, 28], 9);
        let labels = [1, 2, 3, 4];
        let mut step = |model: &mut wgcnn::Graph| {
            train_step(model, &mut sgd, |d| d.upload(x.clone()), &labels).unwrap();
        };
        step(&mut model);
        step(&mut model);
        let names = ["bn1.num_batches_tracked", "bn2.num_batches_tracked"];
        let want: Vec<(String, u32)> = names.iter().map(|n| (n.to_string(), 2)).collect();
        assert_eq!(model.counts().unwrap(), want);
        assert!(
            model
                .state()
                .iter()
                .all(|(n, _)| !n.ends_with("num_batches_tracked"))
        );
        let e = model
            .set_state(
                names[0],
                ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), 5.0),
            )
            .unwrap_err();
        assert!(e.to_string().contains("set_count"), "{e}");
        model.set_count(names[0], 5).unwrap();
        step(&mut model);
        let counts = model.counts().unwrap();
        assert_eq!((counts[0].1, counts[1].1), (6, 3), "{}", device.name());
        let saved = model.checkpoint().unwrap();
        assert_eq!(saved.get_integer(names[0]).unwrap().iter().next(), Some(&6));
        assert!(model.set_count("bn1.running_var", 1).is_err());
    }
}
