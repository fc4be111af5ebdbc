//! ResNets: torchvision's `resnet18/34/50` and `resnext50_32x4d` (ImageNet stem, BasicBlock
//! or Bottleneck stages; ResNeXt's bottlenecks wider, their 3×3 in 32 groups) and the CIFAR
//! ResNets of He et al. 2016 (`resnet20/56`: a 3×3 stem, three stages of
//! 16/32/64 channels). State names follow torchvision (`layer1.0.conv1.weight`,
//! `layer2.0.downsample.0.weight`, `fc.bias`).

use super::{Model, classes, conv_bn, image_builder};
use crate::builder::{GraphBuilder, ValueRef};
use crate::data::Preprocess;
use crate::error::Result;
use crate::nn::{AdaptiveAvgPool2d, Add, BatchNorm2d, Conv2d, Flatten, Linear, max_pool2d, relu};
use crate::ops::Padding;

/// CIFAR-10's per-channel mean and std of `x / 255` over the training set (the usual recipe).
const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

/// A `k × k` convolution without bias (batch norm follows), padding `k / 2`.
fn conv(c_in: usize, c_out: usize, k: usize, stride: usize) -> Conv2d {
    Conv2d::new(c_in, c_out, (k, k))
        .stride((stride, stride))
        .padding(Padding::Explicit(k / 2, k / 2))
        .no_bias()
}

/// The two kinds of residual block.
#[derive(Clone, Copy)]
enum Block {
    /// Two 3×3 convolutions (expansion 1).
    Basic,
    /// 1×1 reduce, 3×3 (carrying the stride, as torchvision's v1.5, in `groups` groups),
    /// 1×1 expand to 4 × planes; the inner width is `planes · width_per_group / 64 · groups`
    /// (torchvision's `Bottleneck`: ResNet-50 is 1 group of 64, ResNeXt-50 32×4d 32 of 4).
    Bottleneck {
        groups: usize,
        width_per_group: usize,
    },
}

impl Block {
    /// ResNet-50's bottleneck.
    const BOTTLENECK: Block = Block::Bottleneck {
        groups: 1,
        width_per_group: 64,
    };

    fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck { .. } => 4,
        }
    }
}

/// One residual block in scope `b` (e.g. `layer2.0`): `relu(branch(x) + shortcut(x))`, the
/// shortcut a strided 1×1 convolution and batch norm (`downsample.0/1`) where the shape
/// changes.
fn block(
    b: &GraphBuilder,
    kind: Block,
    x: ValueRef,
    c_in: usize,
    planes: usize,
    stride: usize,
) -> Result<ValueRef> {
    let c_out = planes * kind.expansion();
    let bn = BatchNorm2d::new;
    let mut y = x;
    let convs = match kind {
        Block::Basic => vec![conv(c_in, planes, 3, stride), conv(planes, planes, 3, 1)],
        Block::Bottleneck {
            groups,
            width_per_group,
        } => {
            let width = planes * width_per_group / 64 * groups;
            vec![
                conv(c_in, width, 1, 1),
                conv(width, width, 3, stride).groups(groups),
                conv(width, c_out, 1, 1),
            ]
        }
    };
    let last = convs.len();
    for (i, layer) in convs.into_iter().enumerate() {
        let n = i + 1;
        let channels = layer.out_channels;
        let activation = (n < last).then(relu);
        let names = [format!("conv{n}"), format!("bn{n}"), format!("relu{n}")];
        let names = [names[0].as_str(), names[1].as_str(), names[2].as_str()];
        y = conv_bn(b, names, layer, bn(channels), activation, y)?;
    }
    let shortcut = if stride != 1 || c_in != c_out {
        let d = b.scope("downsample");
        conv_bn(
            &d,
            ["0", "1", ""],
            conv(c_in, c_out, 1, stride),
            bn(c_out),
            None,
            x,
        )?
    } else {
        x
    };
    let sum = b.add("add", Add, &[y, shortcut])?;
    b.apply("relu", relu(), sum)
}

/// Stages `layer1…` of `blocks[i]` blocks each, `planes[i]` wide, the first block of every
/// stage but the first halving the resolution. Returns the output and its channels.
fn stages(
    b: &GraphBuilder,
    kind: Block,
    mut x: ValueRef,
    mut channels: usize,
    blocks: &[usize],
    planes: &[usize],
) -> Result<(ValueRef, usize)> {
    for (stage, (&count, &width)) in blocks.iter().zip(planes).enumerate() {
        let layer = b.scope(format!("layer{}", stage + 1));
        for i in 0..count {
            let stride = if i == 0 && stage > 0 { 2 } else { 1 };
            x = block(&layer.scope(i), kind, x, channels, width, stride)?;
            channels = width * kind.expansion();
        }
    }
    Ok((x, channels))
}

/// The stem on the model's input: `relu(bn1(conv1(x)))`.
fn stem(b: &GraphBuilder, conv1: Conv2d) -> Result<ValueRef> {
    let channels = conv1.out_channels;
    let names = ["conv1", "bn1", "relu"];
    conv_bn(
        b,
        names,
        conv1,
        BatchNorm2d::new(channels),
        Some(relu()),
        b.input(),
    )
}

/// Global average pooling, flatten and the classifier `fc`.
fn head(b: &GraphBuilder, x: ValueRef, channels: usize, num_classes: usize) -> Result<ValueRef> {
    let x = b.apply("avgpool", AdaptiveAvgPool2d::new(1, 1), x)?;
    let x = b.apply("flatten", Flatten, x)?;
    b.apply("fc", Linear::new(channels, num_classes), x)
}

/// torchvision's ImageNet ResNet: 7×7/2 stem, 3×3/2 max pool, four stages of 64…512 planes.
fn imagenet_resnet(
    name: &'static str,
    kind: Block,
    blocks: [usize; 4],
    num_classes: usize,
) -> Result<Model> {
    let num_classes = classes(num_classes)?;
    let b = image_builder(3, 224)?;
    let x = stem(&b, conv(3, 64, 7, 2))?;
    let x = b.apply("maxpool", max_pool2d(3).stride(2).padding(1), x)?;
    let (x, channels) = stages(&b, kind, x, 64, &blocks, &[64, 128, 256, 512])?;
    let output = head(&b, x, channels, num_classes)?;
    Ok(Model {
        name,
        builder: b,
        output,
        preprocess: Preprocess::imagenet(),
    })
}

/// torchvision's `resnet18` (BasicBlocks 2-2-2-2; 11,689,512 parameters at 1000 classes).
pub fn resnet18(num_classes: usize) -> Result<Model> {
    imagenet_resnet("resnet18", Block::Basic, [2, 2, 2, 2], num_classes)
}

/// torchvision's `resnet34` (BasicBlocks 3-4-6-3; 21,797,672 parameters at 1000 classes).
pub fn resnet34(num_classes: usize) -> Result<Model> {
    imagenet_resnet("resnet34", Block::Basic, [3, 4, 6, 3], num_classes)
}

/// torchvision's `resnet50` (Bottlenecks 3-4-6-3, stride on the 3×3 as in v1.5;
/// 25,557,032 parameters at 1000 classes).
pub fn resnet50(num_classes: usize) -> Result<Model> {
    imagenet_resnet("resnet50", Block::BOTTLENECK, [3, 4, 6, 3], num_classes)
}

/// torchvision's `resnext50_32x4d` (ResNet-50's stages with bottlenecks twice as wide, their
/// 3×3 convolutions in 32 groups of 4, 8, 16 and 32 channels; 25,028,904 parameters at 1000
/// classes).
pub fn resnext50_32x4d(num_classes: usize) -> Result<Model> {
    let block = Block::Bottleneck {
        groups: 32,
        width_per_group: 4,
    };
    imagenet_resnet("resnext50_32x4d", block, [3, 4, 6, 3], num_classes)
}

/// A CIFAR ResNet of depth `6n + 2` for 32×32 images: 3×3 stem of 16 channels, three
/// stages of `n` BasicBlocks (16, 32, 64 channels). The shortcut where the shape changes is
/// He et al.'s option B (a strided 1×1 convolution and batch norm, `downsample.0/1`), so
/// the names are torchvision's.
fn cifar_resnet(name: &'static str, n: usize, num_classes: usize) -> Result<Model> {
    let num_classes = classes(num_classes)?;
    let b = image_builder(3, 32)?;
    let x = stem(&b, conv(3, 16, 3, 1))?;
    let (x, channels) = stages(&b, Block::Basic, x, 16, &[n; 3], &[16, 32, 64])?;
    let output = head(&b, x, channels, num_classes)?;
    Ok(Model {
        name,
        builder: b,
        output,
        preprocess: Preprocess::new().normalize(CIFAR10_MEAN, CIFAR10_STD)?,
    })
}

/// ResNet-20 for CIFAR (n = 3; 272,474 parameters at 10 classes with option-B shortcuts).
pub fn resnet20(num_classes: usize) -> Result<Model> {
    cifar_resnet("resnet20", 3, num_classes)
}

/// ResNet-56 for CIFAR (n = 9).
pub fn resnet56(num_classes: usize) -> Result<Model> {
    cifar_resnet("resnet56", 9, num_classes)
}
