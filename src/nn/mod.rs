//! Layers built from the ops, each a [`Layer`] for the executor, and
//! [`Sequential`] to stack them. State is named as in a PyTorch `state_dict`
//! (`conv1.weight`, `bn1.running_var`, …).

mod activation;
mod conv;
pub mod init;
mod linear;
mod norm;
mod pool;
mod shape;

pub use activation::{Activate, leaky_relu, relu, relu6, sigmoid, tanh};
pub use conv::Conv2d;
pub use init::Init;
pub use linear::Linear;
pub use norm::{BatchNorm2d, LayerNorm};
pub use pool::{AdaptiveAvgPool2d, GlobalAvgPool, Pool, avg_pool2d, max_pool2d};
pub use shape::{Add, Dropout, Flatten};

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::graph::{Device, Graph, Layer, Mode};
use crate::value::Activation;

/// Layers applied one after another.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<(String, Box<dyn Layer>)>,
    /// One input's shape (no batch axis), where the stack was written for one.
    input: Option<Vec<usize>>,
}

impl Sequential {
    /// An empty stack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `layer` under `name` (its state becomes `name.weight`, …).
    pub fn add(mut self, name: &str, layer: impl Layer + 'static) -> Self {
        self.layers.push((name.to_string(), Box::new(layer)));
        self
    }

    /// Appends `layer` named by its position, as PyTorch's `nn.Sequential` does (`"3"`).
    pub fn push(self, layer: impl Layer + 'static) -> Self {
        let name = self.layers.len().to_string();
        self.add(&name, layer)
    }

    /// The model on `device`, its weights drawn from `seed`. Every layer must know its
    /// sizes: with `Linear::lazy`, use [`Sequential::build_for`].
    pub fn build(self, device: Device, seed: u64) -> Result<Graph> {
        if let Some((name, _)) = self.layers.iter().find(|(_, l)| l.needs_input_shape()) {
            return Err(Error::InvalidArgument {
                op: "Sequential",
                detail: format!(
                    "{name:?} takes its input size from the model: build with \
                     Sequential::build_for(input shape, …)"
                ),
            });
        }
        let mut graph = Graph::new(device, seed);
        if let Some(input) = &self.input {
            graph.expect_input(input);
        }
        let mut last = Graph::INPUT;
        for (name, layer) in self.layers {
            last = graph.add_boxed(&name, layer, &[last])?;
        }
        Ok(graph)
    }

    /// Written for inputs of `shape` per image (`[C, H, W]`, no batch axis): an input of
    /// another shape that fails in a layer is an error that names this one first.
    pub fn expects_input(mut self, shape: &[usize]) -> Self {
        self.input = Some(shape.to_vec());
        self
    }

    /// The model for inputs of `input` shape (batch first; the batch size is free): each
    /// layer is checked against the shape it will receive, and sizes left open
    /// (`Linear::lazy`) are taken from it, by running the layers added so far on zeros.
    /// A mismatch is an error naming the layer before anything runs on real data.
    pub fn build_for(self, input: &[usize], device: Device, seed: u64) -> Result<Graph> {
        if input.len() < 2 || input.contains(&0) {
            return Err(Error::InvalidArgument {
                op: "Sequential",
                detail: format!("input shape {input:?}: give [N, …] with every size at least 1"),
            });
        }
        let mut one = input.to_vec();
        one[0] = 1;
        let mut graph = Graph::new(device, seed);
        graph.expect_input(&input[1..]);
        let mut last = Graph::INPUT;
        let mut shape = one.clone();
        for (name, mut layer) in self.layers {
            layer
                .fit_input(&shape)
                .map_err(|e| crate::graph::in_node(&name, e))?;
            last = graph.add_boxed(&name, layer, &[last])?;
            let x = graph.device().upload(ArrayD::zeros(IxDyn(&one)))?;
            shape = graph.forward(x, Mode::Eval)?.shape().to_vec();
        }
        Ok(graph)
    }
}

/// Options of [`lenet5`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LeNetOptions {
    /// Batch normalisation after each convolution (`bn1`, `bn2`).
    pub batch_norm: bool,
    /// Dropout rate after `fc1` and `fc2` (0 for none).
    pub dropout: f32,
    /// Initialisation of the conv and linear weights.
    pub init: Init,
}

/// LeNet-5 for 28×28 grey images: conv 5×5 (6) → ReLU → max-pool 2 → conv 5×5 (16) → ReLU →
/// max-pool 2 → 120 → 84 → 10, state named `conv1`, `conv2`, `fc1`, `fc2`, `fc3` as in the
/// PyTorch golden. Without batch norm the ReLUs are fused into the convolutions; with it the
/// convolutions have no bias (batch norm would cancel it).
pub fn lenet5(options: LeNetOptions) -> Result<Sequential> {
    let relu_act = Activation::Relu;
    let mut model = Sequential::new().expects_input(&[1, 28, 28]);
    for (i, (c_in, c_out)) in [(1, 6), (6, 16)].into_iter().enumerate() {
        let conv = Conv2d::new(c_in, c_out, (5, 5)).init(options.init);
        model = if options.batch_norm {
            model
                .add(&format!("conv{}", i + 1), conv.no_bias())
                .add(&format!("bn{}", i + 1), BatchNorm2d::new(c_out))
                .add(&format!("relu{}", i + 1), relu())
        } else {
            model.add(&format!("conv{}", i + 1), conv.activation(relu_act))
        };
        model = model.add(&format!("pool{}", i + 1), max_pool2d(2));
    }
    model = model.add("flatten", Flatten).add(
        "fc1",
        Linear::new(256, 120)
            .activation(relu_act)
            .init(options.init),
    );
    let dropout = |model: Sequential, name: &str, seed: u32| -> Result<Sequential> {
        Ok(if options.dropout > 0.0 {
            model.add(name, Dropout::new(options.dropout, seed)?)
        } else {
            model
        })
    };
    let fc2 = Linear::new(120, 84).activation(relu_act).init(options.init);
    model = dropout(model, "drop1", 1)?.add("fc2", fc2);
    model = dropout(model, "drop2", 2)?.add("fc3", Linear::new(84, 10).init(options.init));
    Ok(model)
}
