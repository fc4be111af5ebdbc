//! `GraphBuilder`: nested scopes give PyTorch's names, shapes are checked as layers are
//! added, the output is explicit, and a residual model runs the same on GPU and CPU.

use crate::common;

use common::{gpu, max_abs_diff, random};
use wgcnn::nn::{
    AdaptiveAvgPool2d, Add, BatchNorm2d, Conv2d, Flatten, Linear, max_pool2d, relu, relu6,
};
use wgcnn::{Device, Error, GraphBuilder, Mode, Padding, ValueRef};

fn conv3(c_in: usize, c_out: usize) -> Conv2d {
    Conv2d::new(c_in, c_out, (3, 3)).padding(Padding::Explicit(1, 1))
}

/// A stem, a residual block with a ReLU6 and a max pool with stride and padding, a head.
fn residual_model(b: &GraphBuilder) -> wgcnn::Result<ValueRef> {
    let x = b.apply("stem", conv3(3, 6), b.input())?;
    let x = b.apply("pool", max_pool2d(3).stride(2).padding(1), x)?;
    let block = b.scope("layer1").scope(0);
    let y = block.apply("conv1", conv3(6, 6).no_bias(), x)?;
    let y = block.apply("bn1", BatchNorm2d::new(6), y)?;
    let y = block.apply("relu6", relu6(), y)?;
    let y = block.apply("conv2", conv3(6, 6), y)?;
    let sum = block.add("add", Add, &[y, x])?;
    let y = block.apply("relu", relu(), sum)?;
    let y = b.apply("avgpool", AdaptiveAvgPool2d::new(2, 1), y)?;
    let y = b.apply("flatten", Flatten, y)?;
    b.apply("fc", Linear::new(12, 5), y)
}

#[test]
fn scopes_name_state_and_shapes_are_inferred() {
    let b = GraphBuilder::new(&[2, 3, 11, 9]).unwrap();
    let out = residual_model(&b).unwrap();
    assert_eq!(b.shape(out).unwrap(), [2, 5]);
    assert_eq!(b.scope("a").scope(3).path(), "a.3");
    let model = b.build(out, Device::Cpu, 1).unwrap();
    let names: Vec<String> = model.state().into_iter().map(|(n, _)| n).collect();
    for want in [
        "stem.weight",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.running_var",
        "layer1.0.conv2.bias",
        "fc.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    // The summary knows every shape without running the model.
    let table = model.to_string();
    assert!(table.contains("[2, 6, 6, 5]"), "{table}");
    assert!(table.contains("AdaptiveAvgPool2d(2×1)"), "{table}");
    assert!(
        table.contains("MaxPool2d(3×3, stride 2×2, padding 1×1)"),
        "{table}"
    );
}

#[test]
fn mistakes_are_errors_when_the_layer_is_added() {
    let b = GraphBuilder::new(&[1, 3, 8, 8]).unwrap();
    let x = b.apply("conv", conv3(3, 4), b.input()).unwrap();
    let message = |e: Error| e.to_string();
    // A wrong channel count names the layer and both sizes.
    let e = message(b.apply("bn", BatchNorm2d::new(5), x).unwrap_err());
    assert!(
        e.contains("bn") && e.contains('5') && e.contains("[1, 4, 8, 8]"),
        "{e}"
    );
    let e = message(b.apply("conv2", conv3(3, 4), x).unwrap_err());
    assert!(e.contains("conv2") && e.contains("[1, 4, 8, 8]"), "{e}");
    // Residual sums of different shapes.
    let down = b.apply("down", conv3(4, 4).stride((2, 2)), x).unwrap();
    let e = message(b.add("add", Add, &[x, down]).unwrap_err());
    assert!(
        e.contains("[1, 4, 8, 8]") && e.contains("[1, 4, 4, 4]"),
        "{e}"
    );
    // A kernel larger than the padded input.
    let e = message(b.apply("big", Conv2d::new(4, 4, (9, 9)), x).unwrap_err());
    assert!(e.contains("big") && e.contains("pad more"), "{e}");
    // Names are unique; arity is checked; values of another model are refused.
    assert!(b.apply("conv", relu(), x).is_err());
    assert!(b.add("two", Add, &[x]).is_err());
    let other = GraphBuilder::new(&[1, 3, 8, 8]).unwrap();
    let e = message(b.apply("relu", relu(), other.input()).unwrap_err());
    assert!(e.contains("another GraphBuilder"), "{e}");
    // The output must be the last layer, and every layer must lead to it.
    let e = message(b.clone().build(x, Device::Cpu, 0).err().unwrap());
    assert!(e.contains("last layer"), "{e}");
    let dead = b.apply("dead", relu(), x).unwrap();
    let _ = dead;
    let out = b.apply("out", relu6(), down).unwrap();
    let e = message(b.build(out, Device::Cpu, 0).err().unwrap());
    assert!(e.contains("dead") && e.contains("does not lead"), "{e}");
    assert!(GraphBuilder::new(&[1, 0, 3, 3]).is_err());
}

#[test]
fn a_residual_model_trains_the_same_on_gpu_and_cpu() {
    let Some(gpu) = gpu() else { return };
    let x = random(&[2, 3, 11, 9], 5).mapv(|v| 4.0 * v);
    let dy = random(&[2, 5], 6);
    let mut results = Vec::new();
    for device in [Device::Gpu(gpu.clone()), Device::Cpu] {
        let b = GraphBuilder::new(&[2, 3, 11, 9]).unwrap();
        let out = residual_model(&b).unwrap();
        let mut model = b.build(out, device.clone(), 7).unwrap();
        model.set_input_grad(true);
        let y = model
            .forward(device.upload(x.clone()).unwrap(), Mode::Train)
            .unwrap()
            .to_array()
            .unwrap();
        let dx = model
            .backward(device.upload(dy.clone()).unwrap())
            .unwrap()
            .unwrap()
            .to_array()
            .unwrap();
        let grads: Vec<_> = model
            .grads()
            .into_iter()
            .map(|(name, g)| (name, g.map(|g| g.to_array().unwrap())))
            .collect();
        results.push((y, dx, grads));
    }
    let (gpu_run, cpu_run) = (&results[0], &results[1]);
    assert!(max_abs_diff(&gpu_run.0, &cpu_run.0) < 1e-4, "logits");
    assert!(
        max_abs_diff(&gpu_run.1, &cpu_run.1) < 1e-4,
        "input gradient"
    );
    for ((name, g), (_, c)) in gpu_run.2.iter().zip(&cpu_run.2) {
        if let (Some(g), Some(c)) = (g, c) {
            let scale = c.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(max_abs_diff(g, c) < 1e-4 * scale, "gradient of {name}");
        }
    }
}
