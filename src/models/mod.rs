//! Real networks from PyTorch, written with [`GraphBuilder`] and named as their PyTorch
//! sources name their state, so a `state_dict` saved there loads here with no renaming
//! ([`Graph::load`] reads `.pth` and `.safetensors`):
//!
//! - torchvision's [`resnet18`], [`resnet34`], [`resnet50`], [`resnext50_32x4d`] and
//!   [`mobilenet_v2`];
//! - the CIFAR ResNets of He et al. ([`resnet20`], [`resnet56`]);
//! - [`efficientnet_lite0`] as the `efficientnet-lite-pytorch` package defines it, whose
//!   pretrained ImageNet weights load as they are.
//!
//! Each function returns a [`Model`]: build it on a device, then train, fine-tune or run it
//! like any other [`Graph`]. Its preprocessing is [`Model::preprocess`].

mod efficientnet;
mod mobilenet;
mod resnet;

pub use efficientnet::efficientnet_lite0;
pub use mobilenet::mobilenet_v2;
pub use resnet::{resnet18, resnet20, resnet34, resnet50, resnet56, resnext50_32x4d};

use crate::builder::{GraphBuilder, ValueRef};
use crate::data::Preprocess;
use crate::error::{Error, Result};
use crate::graph::{Device, Graph};
use crate::nn::{Activate, BatchNorm2d, Conv2d};

/// A network written out and ready to build: its layers, their names and shapes.
pub struct Model {
    name: &'static str,
    builder: GraphBuilder,
    output: ValueRef,
    preprocess: Preprocess,
}

impl Model {
    /// The model's name, as [`by_name`] takes it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How its inputs are prepared from images: the recipe its weights were trained with
    /// (torchvision's ImageNet models: shorter side 256, central 224, ImageNet mean/std;
    /// EfficientNet-Lite: shorter side 224, central 224, `(x − 127) / 128`; CIFAR ResNets:
    /// CIFAR-10's mean/std at 32×32).
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// The shape the model was written for, `[1, 3, H, W]` (other sizes run too).
    pub fn input_shape(&self) -> Vec<usize> {
        self.builder.shape(self.builder.input()).unwrap_or_default()
    }

    /// The model on `device`, its weights drawn from `seed` (load pretrained ones with
    /// [`Graph::load`]).
    pub fn build(self, device: Device, seed: u64) -> Result<Graph> {
        self.builder.build(self.output, device, seed)
    }
}

/// The names [`by_name`] knows.
pub const NAMES: [&str; 8] = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "resnet20",
    "resnet56",
    "mobilenet_v2",
    "efficientnet_lite0",
];

/// The model called `name` (one of [`NAMES`]) with `num_classes` outputs.
pub fn by_name(name: &str, num_classes: usize) -> Result<Model> {
    match name {
        "resnet18" => resnet18(num_classes),
        "resnet34" => resnet34(num_classes),
        "resnet50" => resnet50(num_classes),
        "resnext50_32x4d" => resnext50_32x4d(num_classes),
        "resnet20" => resnet20(num_classes),
        "resnet56" => resnet56(num_classes),
        "mobilenet_v2" => mobilenet_v2(num_classes),
        "efficientnet_lite0" => efficientnet_lite0(num_classes),
        _ => Err(Error::InvalidArgument {
            op: "models",
            detail: format!("no model is called {name:?}; known: {}", NAMES.join(", ")),
        }),
    }
}

/// `activation(bn(conv(x)))` under the given names (the activation's only if it has one).
fn conv_bn(
    b: &GraphBuilder,
    names: [&str; 3],
    conv: Conv2d,
    bn: BatchNorm2d,
    activation: Option<Activate>,
    x: ValueRef,
) -> Result<ValueRef> {
    let y = b.apply(names[0], conv, x)?;
    let y = b.apply(names[1], bn, y)?;
    match activation {
        Some(activation) => b.apply(names[2], activation, y),
        None => Ok(y),
    }
}

/// A fresh builder for `[1, channels, size, size]` inputs.
fn image_builder(channels: usize, size: usize) -> Result<GraphBuilder> {
    GraphBuilder::new(&[1, channels, size, size])
}

/// Checks `num_classes` before any layer is written.
fn classes(num_classes: usize) -> Result<usize> {
    if num_classes == 0 {
        return Err(Error::InvalidArgument {
            op: "models",
            detail: "num_classes must be at least 1 (1000 for ImageNet weights)".into(),
        });
    }
    Ok(num_classes)
}
