//! Batch norm folded into the convolution before it in evaluation mode: the fold op on the
//! GPU against its CPU reference and against the unfolded formula, and the executor's folded
//! evaluation pass against the unfolded one (`Mode::EvalWithGrad` folds nothing), on both
//! devices, before and after training changes the state, with fewer kernels.

use crate::common;

use common::{devices, gpu, max_abs_diff, random};
use ndarray::ArrayD;
use wgcnn::graph::Layer;
use wgcnn::nn::{Add, BatchNorm2d, Conv2d, GlobalAvgPool, leaky_relu, relu, relu6};
use wgcnn::ops::BatchNorm2d as BatchNormSpec;
use wgcnn::tuning::ConvKernel;
use wgcnn::{Activation, Device, GraphBuilder, Mode, Optimizer, Padding, Tensor, Value};

/// Positive variances, γ around 1.
fn statistics(c: usize, seed: u64) -> [ArrayD<f32>; 4] {
    [
        random(&[c], seed).mapv(|v| 1.0 + 0.5 * v),
        random(&[c], seed + 1),
        random(&[c], seed + 2),
        random(&[c], seed + 3).mapv(|v| 0.3 + v * v),
    ]
}

#[test]
fn the_fold_matches_its_reference_and_the_unfolded_formula() {
    let Some(gpu) = gpu() else {
        return;
    };
    // Filters of odd sizes, grouped and pointwise, with and without a bias.
    for (i, (weight, bias)) in [
        ([7usize, 3, 3, 3], true),
        ([5, 1, 3, 3], false),
        ([300, 17, 1, 1], true),
        ([1, 2, 5, 4], false),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 10 * i as u64;
        let o = weight[0];
        let w = random(&weight, seed);
        let b = random(&[o], seed + 1);
        let norm = statistics(o, seed + 2);
        let eps = 1e-3;
        let views = norm.each_ref().map(|a| a.view());
        let [g, be, m, v] = &views;
        let bias_view = b.view();
        let (want_w, want_b) =
            wgcnn::cpu::fold_batch_norm(&w.view(), bias.then_some(&bias_view), [g, be, m, v], eps)
                .unwrap();
        let up = |a: &ArrayD<f32>| Value::from(Tensor::from_array(gpu, a).unwrap());
        let norm_values = norm.each_ref().map(up);
        let [g, be, m, v] = &norm_values;
        let bias_value = up(&b);
        let (got_w, got_b) = up(&w)
            .fold_batch_norm(bias.then_some(&bias_value), [g, be, m, v], eps)
            .unwrap();
        let (got_w, got_b) = (got_w.to_array().unwrap(), got_b.to_array().unwrap());
        assert!(max_abs_diff(&got_w, &want_w) <= 1e-6, "case {i} weight");
        assert!(max_abs_diff(&got_b, &want_b) <= 1e-6, "case {i} bias");

        // conv(x, w', b') = bn_eval(conv(x, w, b)) on the CPU formulas (depthwise too).
        let groups = if weight[1] == 1 { o } else { 1 };
        let spec = wgcnn::ops::Conv2d {
            groups,
            padding: Padding::Explicit(1, 1),
            ..Default::default()
        };
        let x = random(&[2, weight[1] * groups, 6, 5], seed + 9);
        let conv =
            wgcnn::cpu::conv2d(&spec, &x.view(), &w.view(), bias.then_some(&b.view())).unwrap();
        let bn = BatchNormSpec {
            eps,
            ..BatchNormSpec::default()
        };
        let one_d = norm
            .each_ref()
            .map(|a| a.view().into_dimensionality::<ndarray::Ix1>().unwrap());
        let [g, be, m, v] = &one_d;
        let unfolded = wgcnn::cpu::batch_norm_eval(&bn, &conv.view(), g, be, m, v).unwrap();
        let folded =
            wgcnn::cpu::conv2d(&spec, &x.view(), &want_w.view(), Some(&want_b.view())).unwrap();
        let diff = max_abs_diff(&folded, &unfolded.y);
        assert!(diff <= 1e-5, "case {i}: folded conv off by {diff}");
    }
    // Mismatched statistics are an error.
    let up = |a: &ArrayD<f32>| Value::from(Tensor::from_array(gpu, a).unwrap());
    let (w, short) = (up(&random(&[4, 2, 3, 3], 1)), up(&random(&[3], 2)));
    let err = w.fold_batch_norm(None, [&short, &short, &short, &short], 1e-5);
    assert!(err.unwrap_err().to_string().contains("[O]"));
}

/// A model with every kind of neighbour a norm can have: conv → bn → relu (folded with its
/// activation), a bias-free conv → bn into a residual add (folded, no activation), a conv
/// with its own activation → bn (not foldable), a bn whose input feeds two readers (not
/// folded), and conv → bn → relu6 → pool at the end.
fn model(device: Device) -> wgcnn::Graph {
    let b = GraphBuilder::new(&[1, 3, 9, 7]).unwrap();
    let conv = |c, o| Conv2d::new(c, o, (3, 3)).padding(Padding::Explicit(1, 1));
    let y = b.apply("conv1", conv(3, 6), b.input()).unwrap();
    let y = b.apply("bn1", BatchNorm2d::new(6), y).unwrap();
    let y1 = b.apply("relu1", relu(), y).unwrap();
    let y = b.apply("conv2", conv(6, 6).no_bias(), y1).unwrap();
    let y = b.apply("bn2", BatchNorm2d::new(6).eps(1e-3), y).unwrap();
    let y = b.add("add", Add, &[y, y1]).unwrap();
    let y = b
        .apply("conv3", conv(6, 5).activation(Activation::Relu), y)
        .unwrap();
    let y = b.apply("bn3", BatchNorm2d::new(5), y).unwrap();
    let shared = b.apply("conv4", conv(5, 4), y).unwrap();
    let y = b.apply("bn4", BatchNorm2d::new(4), shared).unwrap();
    let y = b.add("add2", Add, &[y, shared]).unwrap();
    let y = b.apply("conv5", conv(4, 4), y).unwrap();
    let y = b.apply("bn5", BatchNorm2d::new(4), y).unwrap();
    let y = b.apply("relu6", relu6(), y).unwrap();
    let y = b.apply("pool", GlobalAvgPool, y).unwrap();
    b.build(y, device, 3).unwrap()
}

/// Folded evaluation (`Mode::Eval`) against unfolded (`Mode::EvalWithGrad`) on `graph`.
fn folded_matches(graph: &mut wgcnn::Graph, x: &ArrayD<f32>, label: &str) {
    let unfolded = graph
        .forward(graph_input(graph.device(), x), Mode::EvalWithGrad)
        .unwrap()
        .to_array()
        .unwrap();
    let input = graph_input(graph.device(), x);
    let folded = graph
        .forward(input, Mode::Eval)
        .unwrap()
        .to_array()
        .unwrap();
    let scale = unfolded.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&folded, &unfolded);
    assert!(diff <= 1e-5 * scale, "{label}: folded off by {diff}");
}

/// The kernels a forward pass of `graph` on `x` runs on `gpu`.
fn kernels_of(gpu: &wgcnn::Gpu, graph: &mut wgcnn::Graph, x: &ArrayD<f32>, mode: Mode) -> u64 {
    gpu.synchronize().unwrap();
    let before = gpu.dispatches();
    graph.forward(graph_input(graph.device(), x), mode).unwrap();
    gpu.synchronize().unwrap();
    gpu.dispatches() - before
}

/// A training step on a random batch of `input`'s shape (seeded): the weights and running
/// statistics move.
fn train_step(
    graph: &mut wgcnn::Graph,
    sgd: &mut wgcnn::graph::GraphOptimizer,
    (input, seed): ([usize; 4], u64),
) {
    let xs = graph_input(graph.device(), &random(&input, seed));
    let shape = graph.forward(xs, Mode::Train).unwrap().shape().to_vec();
    let dy = graph
        .device()
        .upload(ArrayD::from_elem(shape, 0.5))
        .unwrap();
    graph.backward(dy).unwrap();
    graph.update(sgd).unwrap();
}

fn graph_input(device: &Device, x: &ArrayD<f32>) -> Value {
    device.upload(x.clone()).unwrap()
}

#[test]
fn folded_evaluation_matches_the_unfolded_one_as_the_model_trains() {
    for device in devices() {
        let label = format!("{device:?}");
        let mut graph = model(device);
        let x = random(&[2, 3, 9, 7], 40);
        // Training moves the running statistics and the weights; each evaluation after it
        // must fold the new state, not the one it folded before.
        let mut sgd = graph.optimizer(Optimizer::sgd(0.1)).unwrap();
        for step in 0..3 {
            folded_matches(&mut graph, &x, &format!("{label} step {step}"));
            train_step(&mut graph, &mut sgd, ([2, 3, 9, 7], 50 + step));
        }
        // A loaded value is folded too.
        graph
            .set_state("bn1.running_var", random(&[6], 60).mapv(|v| 2.0 + v))
            .unwrap();
        folded_matches(&mut graph, &x, &format!("{label} after set_state"));
    }
}

/// Folding takes kernels away: the three foldable norms' two passes each (statistics, then
/// the map; the activations after two of them cost no pass unfolded either, absorbed by the
/// norm); each fold's own kernel runs the first time only. A context of its own: the counter
/// counts every thread's kernels.
#[test]
fn a_folded_evaluation_runs_fewer_kernels() {
    if gpu().is_none() {
        return;
    }
    let gpu = &common::new_gpu();
    let mut graph = model(Device::Gpu(gpu.clone()));
    let x = random(&[2, 3, 9, 7], 41);
    let mut count = |mode| {
        kernels_of(gpu, &mut graph, &x, mode);
        kernels_of(gpu, &mut graph, &x, mode)
    };
    let (unfolded, folded) = (count(Mode::EvalWithGrad), count(Mode::Eval));
    assert_eq!(
        unfolded - folded,
        6,
        "{unfolded} kernels unfolded, {folded} folded"
    );
}

/// The layers tell the executor what they are: batch norm its statistics, an activation
/// layer its kind; a convolution with its own activation folds nothing.
#[test]
fn layers_say_what_folds() {
    let state: Vec<Value> = statistics(3, 1)
        .into_iter()
        .chain([ArrayD::zeros(ndarray::IxDyn(&[1]))])
        .map(Value::from)
        .collect();
    let norm = BatchNorm2d::new(3).eps(0.25);
    assert_eq!(norm.eval_channel_norm(&state).map(|n| n.eps), Some(0.25));
    assert!(norm.eval_channel_norm(&state[..2]).is_none());
    assert_eq!(
        leaky_relu(0.1).activation_only(),
        Some(Activation::LeakyRelu(0.1))
    );
    assert_eq!(relu().activation_only(), Some(Activation::Relu));
    let conv = Conv2d::new(3, 3, (1, 1)).activation(Activation::Relu);
    let weights = [Value::from(random(&[3, 3, 1, 1], 2))];
    let folded = conv
        .fold_channel_norm(&weights, &norm.eval_channel_norm(&state).unwrap())
        .unwrap();
    assert!(folded.is_none());
}

/// Folded convolutions that run Winograd keep their transformed filters with the fold, and
/// add a residual sum after their norm in their output transform, a pointwise one in its
/// matmul: a second evaluation pass transforms no filters (two kernels fewer than the first
/// per Winograd layer: the fold's own and the transform; one for the pointwise layer), and
/// runs 10 fewer than the unfolded pass (the two transforms, two passes per norm, the two
/// sums, the ReLUs being absorbed there); every pass matches the unfolded one, and training
/// drops the filters with the fold. The residual goes through F(4×4)'s one-tile output
/// transform (9×7), then F(2×2)'s 2×2 blocks stored as rows of vec4s (7×8). A context of its
/// own: the counter counts every thread's kernels.
#[test]
fn folded_layers_keep_their_filters_and_add_the_residual() {
    if gpu().is_none() {
        return;
    }
    let gpu = &common::new_gpu();
    for (size, residual_kernel) in [
        ([9, 7], ConvKernel::Winograd4),
        ([7, 8], ConvKernel::Winograd),
    ] {
        folds_with_the_residual(gpu, size, residual_kernel);
    }
}

/// A grouped 3×3 layer run as Winograd (two groups of 8 channels: one point product per
/// point and group) folds its batch norm and the residual sum after it into its transformed
/// filters and output transform, and matches the unfolded evaluation, as the model trains.
#[test]
fn a_grouped_winograd_layer_folds_with_the_residual() {
    if gpu().is_none() {
        return;
    }
    let gpu = &common::new_gpu();
    let b = GraphBuilder::new(&[2, 16, 8, 8]).unwrap();
    let mut conv = Conv2d::new(16, 16, (3, 3))
        .padding(Padding::Explicit(1, 1))
        .groups(2);
    conv.spec.kernel = Some(ConvKernel::Winograd4);
    let y = b.apply("conv", conv, b.input()).unwrap();
    let y = b.apply("bn", BatchNorm2d::new(16), y).unwrap();
    let y = b.add("add", Add, &[y, b.input()]).unwrap();
    let y = b.apply("relu", relu(), y).unwrap();
    let mut graph = b.build(y, Device::Gpu(gpu.clone()), 6).unwrap();
    let x = random(&[2, 16, 8, 8], 90);
    let mut sgd = graph.optimizer(Optimizer::sgd(0.1)).unwrap();
    for step in 0..2 {
        folded_matches(&mut graph, &x, &format!("step {step}"));
        train_step(&mut graph, &mut sgd, ([2, 16, 8, 8], 95 + step));
    }
}

/// The residual test on h×w images, the residual sum folded into a convolution run by
/// `residual_kernel`.
fn folds_with_the_residual(gpu: &wgcnn::Gpu, [h, w]: [usize; 2], residual_kernel: ConvKernel) {
    let b = GraphBuilder::new(&[2, 3, h, w]).unwrap();
    let conv = |c, kernel| {
        let mut conv = Conv2d::new(c, 8, (3, 3)).padding(Padding::Explicit(1, 1));
        conv.spec.kernel = Some(kernel);
        conv
    };
    let y = b.apply("conv0", conv(3, ConvKernel::Winograd), b.input());
    let y = b.apply("bn0", BatchNorm2d::new(8), y.unwrap()).unwrap();
    let shortcut = b.apply("relu0", relu(), y).unwrap();
    let y = b.apply("conv1", conv(8, residual_kernel), shortcut);
    let y = b.apply("bn1", BatchNorm2d::new(8), y.unwrap()).unwrap();
    let y = b.add("add", Add, &[y, shortcut]).unwrap();
    let shortcut = b.apply("relu1", relu(), y).unwrap();
    let mut pointwise = Conv2d::new(8, 8, (1, 1));
    pointwise.spec.kernel = Some(ConvKernel::Pointwise);
    let y = b.apply("conv2", pointwise, shortcut).unwrap();
    let y = b.apply("bn2", BatchNorm2d::new(8), y).unwrap();
    let y = b.add("add2", Add, &[shortcut, y]).unwrap();
    let mut graph = b.build(y, Device::Gpu(gpu.clone()), 5).unwrap();
    let x = random(&[2, 3, h, w], 70);
    let mut sgd = graph.optimizer(Optimizer::sgd(0.1)).unwrap();
    let kernels = |graph: &mut wgcnn::Graph, mode| kernels_of(gpu, graph, &x, mode);
    // The context's first kernels calibrate its operand reads.
    kernels(&mut graph, Mode::EvalWithGrad);
    for step in 0..2 {
        let unfolded = kernels(&mut graph, Mode::EvalWithGrad);
        let (first, second) = (
            kernels(&mut graph, Mode::Eval),
            kernels(&mut graph, Mode::Eval),
        );
        let counts =
            format!("{h}×{w}, step {step}: {unfolded} unfolded, {first} folded, then {second}");
        assert_eq!((first - second, unfolded - second), (5, 10), "{counts}");
        folded_matches(&mut graph, &x, &format!("{h}×{w}, step {step}"));
        train_step(&mut graph, &mut sgd, ([2, 3, 9, 7], 80 + step));
    }
}
