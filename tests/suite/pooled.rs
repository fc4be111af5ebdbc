//! Max pooling run in the epilogue of the convolution before it (`Layer::forward_pooled`):
//! the graph that fuses them against the same graph running them apart (finite checks on
//! check every node's output, so nothing is fused), on both devices and both operand-read
//! families, forward and backward, in training and evaluation; and the pass it saves.

use crate::common;

use common::{
    assert_steps_agree, devices, graph_step, random, read_family_gpus, storage_gpu, texture_gpu,
};
use ndarray::ArrayD;
use wgcnn::nn::{Add, Conv2d, Flatten, Linear, max_pool2d};
use wgcnn::tuning::KernelFamily;
use wgcnn::{Activation, Device, Gpu, Graph, GraphBuilder, Mode, Padding};

/// LeNet's two stages (5×5 convolutions with ReLU, each read by a 2×2 max pooling alone),
/// then a padded 3×3 one with a sigmoid and a 1×1 one with no activation, each pooled too
/// (their rows too narrow for the fused kernel: the two ops).
fn model(device: Device) -> Graph {
    let b = GraphBuilder::new(&[3, 1, 28, 28]).unwrap();
    let conv = |c, o, k| Conv2d::new(c, o, (k, k));
    let relu = Activation::Relu;
    let y = b
        .apply("conv1", conv(1, 6, 5).activation(relu), b.input())
        .unwrap();
    let y = b.apply("pool1", max_pool2d(2), y).unwrap();
    let y = b
        .apply("conv2", conv(6, 16, 5).activation(relu), y)
        .unwrap();
    let y = b.apply("pool2", max_pool2d(2), y).unwrap();
    let padded = conv(16, 8, 3).padding(Padding::Explicit(1, 1));
    let y = b
        .apply("conv3", padded.activation(Activation::Sigmoid), y)
        .unwrap();
    let y = b.apply("pool3", max_pool2d(2), y).unwrap();
    let y = b.apply("conv4", conv(8, 4, 1), y).unwrap();
    let y = b.apply("pool4", max_pool2d(2), y).unwrap();
    let y = b.apply("flatten", Flatten, y).unwrap();
    let y = b.apply("fc", Linear::new(4, 5), y).unwrap();
    let mut graph = b.build(y, device, 3).unwrap();
    graph.set_input_grad(true);
    graph
}

/// The devices to compare on: the CPU, and the GPU forced to each operand-read family (the
/// fused kernel reads its input from storage or from a texture).
fn contexts() -> Vec<Device> {
    let mut contexts: Vec<Device> = [storage_gpu(), texture_gpu()]
        .into_iter()
        .flatten()
        .map(|gpu| Device::Gpu(gpu.clone()))
        .collect();
    contexts.extend(devices().into_iter().filter(|d| matches!(d, Device::Cpu)));
    contexts
}

#[test]
fn pooled_convolutions_match_the_graph_that_runs_them_apart() {
    for device in contexts() {
        let mut fused = model(device.clone());
        let mut apart = model(device.clone());
        apart.set_check_finite(true);
        let modes = [Mode::Train, Mode::EvalWithGrad, Mode::Eval, Mode::Train];
        for (round, mode) in modes.into_iter().enumerate() {
            // Scaled so that ReLU zeroes a good part of each window (ties among zeros).
            let x = random(&[3, 1, 28, 28], 20 + round as u64).mapv(|v| 3.0 * v - 0.5);
            let got = graph_step(&mut fused, &x, mode);
            let want = graph_step(&mut apart, &x, mode);
            assert_steps_agree(&got, &want, &format!("{device:?} {mode:?}"));
        }
    }
}

/// Two convolutions with ReLU each read by a 2×2 max pooling alone, the poolings after both
/// convolutions in node order (so that both poolings' backward passes wait for their
/// convolutions at once), summed: every gradient arrives, and the GPU's (whose direct weight
/// gradients read the poolings' gradients) match the CPU's (which runs the poolings' backward
/// passes first).
#[test]
fn parallel_pooled_branches_each_get_their_pooling_gradient() {
    let model = |device: Device| {
        let b = GraphBuilder::new(&[2, 1, 12, 12]).unwrap();
        let conv = || {
            Conv2d::new(1, 4, (3, 3))
                .padding(Padding::Explicit(1, 1))
                .activation(Activation::Relu)
        };
        let a = b.apply("conv_a", conv(), b.input()).unwrap();
        let c = b.apply("conv_b", conv(), b.input()).unwrap();
        let a = b.apply("pool_a", max_pool2d(2), a).unwrap();
        let c = b.apply("pool_b", max_pool2d(2), c).unwrap();
        let y = b.add("add", Add, &[a, c]).unwrap();
        let y = b.apply("flatten", Flatten, y).unwrap();
        let y = b.apply("fc", Linear::new(144, 3), y).unwrap();
        let mut graph = b.build(y, device, 5).unwrap();
        graph.set_input_grad(true);
        graph
    };
    let x = random(&[2, 1, 12, 12], 9).mapv(|v| 2.0 * v - 0.5);
    let want = graph_step(&mut model(Device::Cpu), &x, Mode::Train);
    for device in contexts() {
        let got = graph_step(&mut model(device.clone()), &x, Mode::Train);
        assert_steps_agree(&got, &want, &format!("{device:?}"));
    }
}

/// The labels of the ops one training step of `graph` runs on `gpu`.
fn step_ops(gpu: &Gpu, graph: &mut Graph) -> Vec<String> {
    let x = random(&[3, 1, 28, 28], 1);
    let mut run = || {
        let y = graph.forward(graph.device().upload(x.clone())?, Mode::Train)?;
        let dy = ArrayD::from_elem(y.shape(), 0.5f32);
        graph.backward(graph.device().upload(dy)?).map(drop)
    };
    run().unwrap();
    if gpu.can_profile_ops() {
        let ops = gpu.profile_ops(run).unwrap().1;
        ops.into_iter().map(|op| op.label).collect()
    } else {
        let passes = gpu.profile_passes(run).unwrap().1;
        passes.into_iter().map(|p| p.label).collect()
    }
}

/// Where the fused kernel runs (CPU-adapter kernels with subgroups, either operand-read
/// family) LeNet's stages run no max pooling forward pass: the convolutions store the pooled
/// outputs. Elsewhere each pooling runs its own pass. Backward, on every family, a pooling
/// whose convolution's direct weight gradient reads its gradient in place of dz
/// (`Layer::takes_pooled_gradient`; outputs in rows of whole vec4s) runs no pass of its own:
/// all but pool4 (2-wide rows).
#[test]
fn a_pooled_convolution_runs_no_pooling_pass_of_its_own() {
    let Some(gpus) = read_family_gpus() else {
        return;
    };
    for gpu in gpus {
        pooling_passes_on(gpu);
    }
}

fn pooling_passes_on(gpu: &Gpu) {
    let mut graph = model(Device::Gpu(gpu.clone()));
    let labels = step_ops(gpu, &mut graph);
    let count = |prefix: &str| labels.iter().filter(|l| l.starts_with(prefix)).count();
    let fuses = gpu.kernel_family() == KernelFamily::CpuAdapter
        && gpu
            .fixed_subgroup_size()
            .is_some_and(|s| (4..=32).contains(&s));
    // LeNet's two stages fuse; conv3's and conv4's rows (4 and 2 wide) are narrower than
    // the direct kernel's block, and their poolings run apart.
    let pooling_passes = if fuses { 2 } else { 4 };
    assert_eq!(count("max_forward"), pooling_passes, "{labels:?}");
    assert_eq!(count("max_backward"), 1, "{labels:?}");
}
