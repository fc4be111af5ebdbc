//! torchvision's MobileNetV2 (Sandler et al. 2018): inverted residual blocks (1×1 expand,
//! 3×3 depthwise, 1×1 linear projection) with ReLU6, named as torchvision names them
//! (`features.3.conv.1.0.weight`, `classifier.1.bias`).

use super::{Model, classes, conv_bn, image_builder};
use crate::builder::{GraphBuilder, ValueRef};
use crate::data::Preprocess;
use crate::error::Result;
use crate::nn::{AdaptiveAvgPool2d, Add, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, relu6};
use crate::ops::Padding;

/// torchvision's `Conv2dNormActivation`: conv (no bias, padding `(k − 1) / 2`), batch norm,
/// ReLU6, as `0`, `1`, `2` of scope `b`.
fn conv_bn_relu6(
    b: &GraphBuilder,
    x: ValueRef,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    groups: usize,
) -> Result<ValueRef> {
    let conv = Conv2d::new(c_in, c_out, (k, k))
        .stride((stride, stride))
        .padding(Padding::Explicit((k - 1) / 2, (k - 1) / 2))
        .groups(groups)
        .no_bias();
    conv_bn(
        b,
        ["0", "1", "2"],
        conv,
        BatchNorm2d::new(c_out),
        Some(relu6()),
        x,
    )
}

/// An inverted residual block in scope `b` (`features.N`): its layers are `conv.0…`, and
/// it adds its input back where stride and channels allow.
fn inverted_residual(
    b: &GraphBuilder,
    x: ValueRef,
    c_in: usize,
    c_out: usize,
    stride: usize,
    expand: usize,
) -> Result<ValueRef> {
    let conv = b.scope("conv");
    let hidden = c_in * expand;
    let mut y = x;
    let mut index = 0;
    if expand != 1 {
        y = conv_bn_relu6(&conv.scope(index), y, c_in, hidden, 1, 1, 1)?;
        index += 1;
    }
    y = conv_bn_relu6(&conv.scope(index), y, hidden, hidden, 3, stride, hidden)?;
    let project = Conv2d::new(hidden, c_out, (1, 1)).no_bias();
    y = conv.apply(&(index + 1).to_string(), project, y)?;
    y = conv.apply(&(index + 2).to_string(), BatchNorm2d::new(c_out), y)?;
    if stride == 1 && c_in == c_out {
        b.add("add", Add, &[x, y])
    } else {
        Ok(y)
    }
}

/// torchvision's `mobilenet_v2` (width 1.0; 3,504,872 parameters at 1000 classes), with
/// dropout 0.2 before the classifier as there.
pub fn mobilenet_v2(num_classes: usize) -> Result<Model> {
    let num_classes = classes(num_classes)?;
    // (expansion t, channels c, repeats n, first stride s), from the paper's table 2.
    let settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let b = image_builder(3, 224)?;
    let features = b.scope("features");
    let mut x = conv_bn_relu6(&features.scope(0), b.input(), 3, 32, 3, 2, 1)?;
    let (mut channels, mut index) = (32, 1);
    for (t, c, n, s) in settings {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            x = inverted_residual(&features.scope(index), x, channels, c, stride, t)?;
            channels = c;
            index += 1;
        }
    }
    let x = conv_bn_relu6(&features.scope(index), x, channels, 1280, 1, 1, 1)?;
    let x = b.apply("avgpool", AdaptiveAvgPool2d::new(1, 1), x)?;
    let x = b.apply("flatten", Flatten, x)?;
    let classifier = b.scope("classifier");
    let x = classifier.apply("0", Dropout::new(0.2, 0)?, x)?;
    let output = classifier.apply("1", Linear::new(1280, num_classes), x)?;
    Ok(Model {
        name: "mobilenet_v2",
        builder: b,
        output,
        preprocess: Preprocess::imagenet(),
    })
}
