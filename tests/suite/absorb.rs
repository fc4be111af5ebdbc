//! Activation layers absorbed by the layer before them (`Layer::absorbs_activation`): the
//! graph that runs them in the producers' kernels against the same graph with absorption off
//! (finite checks on check every node's output, so they absorb nothing), on both devices,
//! forward and backward, in training and evaluation; and the passes it saves.

use crate::common;

use common::{assert_steps_agree, devices, gpu, graph_step, random};
use ndarray::ArrayD;
use wgcnn::nn::{
    Add, BatchNorm2d, Conv2d, Flatten, LayerNorm, Linear, leaky_relu, max_pool2d, relu, relu6,
    sigmoid, tanh,
};
use wgcnn::{Device, Graph, GraphBuilder, Mode, Padding};

/// Every layer that absorbs, each before another activation: a convolution without its own
/// activation, batch norm, a residual sum, batch norm whose activation the max pooling after
/// it takes the gradient through, layer norm and a linear layer.
fn model(device: Device) -> Graph {
    let b = GraphBuilder::new(&[2, 3, 8, 8]).unwrap();
    let conv = |c, o| Conv2d::new(c, o, (3, 3)).padding(Padding::Explicit(1, 1));
    let y = b.apply("conv1", conv(3, 4), b.input()).unwrap();
    let y = b.apply("relu1", relu(), y).unwrap();
    let y = b.apply("conv2", conv(4, 4).no_bias(), y).unwrap();
    let y = b.apply("bn2", BatchNorm2d::new(4), y).unwrap();
    let shortcut = b.apply("leaky2", leaky_relu(0.1), y).unwrap();
    let y = b.apply("conv3", conv(4, 4), shortcut).unwrap();
    let y = b.apply("bn3", BatchNorm2d::new(4), y).unwrap();
    let y = b.add("add", Add, &[y, shortcut]).unwrap();
    let y = b.apply("relu6", relu6(), y).unwrap();
    let y = b.apply("bn4", BatchNorm2d::new(4), y).unwrap();
    let y = b.apply("relu4", relu(), y).unwrap();
    let y = b.apply("pool", max_pool2d(2), y).unwrap();
    let y = b.apply("ln", LayerNorm::new(&[4, 4, 4]), y).unwrap();
    let y = b.apply("tanh", tanh(), y).unwrap();
    let y = b.apply("flatten", Flatten, y).unwrap();
    let y = b.apply("fc", Linear::new(64, 5), y).unwrap();
    let y = b.apply("sigmoid", sigmoid(), y).unwrap();
    let mut graph = b.build(y, device, 7).unwrap();
    graph.set_input_grad(true);
    graph
}

#[test]
fn absorbed_activations_match_the_graph_that_runs_them_alone() {
    for device in devices() {
        let mut absorbed = model(device.clone());
        let mut alone = model(device.clone());
        alone.set_check_finite(true);
        for (round, mode) in [Mode::Train, Mode::EvalWithGrad, Mode::Train]
            .into_iter()
            .enumerate()
        {
            let x = random(&[2, 3, 8, 8], 10 + round as u64).mapv(|v| 2.0 * v);
            let got = graph_step(&mut absorbed, &x, mode);
            let want = graph_step(&mut alone, &x, mode);
            assert_steps_agree(&got, &want, &format!("{device:?} {mode:?}"));
        }
    }
}

/// Forward and backward passes of a training step: an absorbed activation adds no kernel
/// (the graph without it runs as many), after batch norm or after a residual sum, whose
/// backward takes the gradient through it in the pass that hands it to both inputs. A
/// context of its own: the counter counts every thread's kernels.
#[test]
fn an_absorbed_activation_runs_no_pass_of_its_own() {
    if gpu().is_none() {
        return;
    }
    let gpu = &common::new_gpu();
    let kernels = |activations: bool| {
        let b = GraphBuilder::new(&[2, 3, 8, 8]).unwrap();
        let conv = |c, o| Conv2d::new(c, o, (3, 3)).padding(Padding::Explicit(1, 1));
        let maybe_relu = |name: &str, y| {
            if activations {
                b.apply(name, relu(), y).unwrap()
            } else {
                y
            }
        };
        let y = b.apply("conv1", conv(3, 4), b.input()).unwrap();
        let y = b.apply("bn1", BatchNorm2d::new(4), y).unwrap();
        let shortcut = maybe_relu("relu1", y);
        let y = b.apply("conv2", conv(4, 4), shortcut).unwrap();
        let y = b.add("add", Add, &[y, shortcut]).unwrap();
        let y = maybe_relu("relu2", y);
        let mut graph = b.build(y, Device::Gpu(gpu.clone()), 1).unwrap();
        let x = random(&[2, 3, 8, 8], 1);
        let mut run = || {
            let y = graph.forward(graph.device().upload(x.clone()).unwrap(), Mode::Train);
            let dy = ArrayD::from_elem(y.unwrap().shape(), 0.5f32);
            graph.backward(graph.device().upload(dy).unwrap()).unwrap();
            gpu.synchronize().unwrap();
        };
        run();
        let before = gpu.dispatches();
        run();
        gpu.dispatches() - before
    };
    let (without, with) = (kernels(false), kernels(true));
    assert_eq!(
        with, without,
        "{with} kernels with the ReLUs, {without} without"
    );
}
