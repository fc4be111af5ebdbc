//! [`GraphBuilder`]: any DAG of layers (residual blocks, branches) written as easily as a
//! `Sequential`, with PyTorch's module paths as nested name scopes, typed value handles, an
//! explicit output, and every shape inferred and checked while the model is written, before
//! any state exists.

use std::cell::RefCell;
use std::fmt::Display;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::graph::{Device, Graph, Layer, in_node};

/// A value of the model a [`GraphBuilder`] is writing: its input or a layer's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueRef {
    builder: usize,
    index: usize,
}

struct PlannedNode {
    name: String,
    layer: Box<dyn Layer>,
    inputs: Vec<usize>,
}

/// What every scope of one builder writes to.
struct Plan {
    id: usize,
    /// Per value (0 = the input): its inferred shape.
    shapes: Vec<Vec<usize>>,
    nodes: Vec<PlannedNode>,
}

/// Writes a model as a DAG: `b.scope("layer1").scope(0)` names state as PyTorch's module
/// paths do (`layer1.0.conv1.weight`), each [`ValueRef`] carries its inferred shape, and a
/// layer that does not fit its inputs is an error naming it when it is added.
/// Scopes are cheap handles on one model: clone them freely.
///
/// ```
/// use wgcnn::nn::{Add, BatchNorm2d, Conv2d, relu};
/// use wgcnn::{Device, GraphBuilder, Padding, ValueRef};
///
/// /// torchvision's BasicBlock without downsampling: relu(x + bn2(conv2(relu(bn1(conv1(x)))))).
/// fn basic_block(b: &GraphBuilder, x: ValueRef, channels: usize) -> wgcnn::Result<ValueRef> {
///     let conv = || Conv2d::new(channels, channels, (3, 3)).padding(Padding::Explicit(1, 1)).no_bias();
///     let y = b.apply("conv1", conv(), x)?;
///     let y = b.apply("bn1", BatchNorm2d::new(channels), y)?;
///     let y = b.apply("relu1", relu(), y)?;
///     let y = b.apply("conv2", conv(), y)?;
///     let y = b.apply("bn2", BatchNorm2d::new(channels), y)?;
///     let sum = b.add("add", Add, &[y, x])?;
///     b.apply("relu2", relu(), sum)
/// }
///
/// # fn main() -> wgcnn::Result<()> {
/// let b = GraphBuilder::new(&[1, 8, 16, 16])?;
/// let out = basic_block(&b.scope("layer1").scope(0), b.input(), 8)?;
/// assert_eq!(b.shape(out)?, [1, 8, 16, 16]);
/// let model = b.build(out, Device::Cpu, 0)?;
/// assert!(model.state().iter().any(|(name, _)| name == "layer1.0.bn2.running_var"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct GraphBuilder {
    plan: Rc<RefCell<Plan>>,
    prefix: String,
}

fn invalid(detail: String) -> Error {
    Error::InvalidArgument {
        op: "GraphBuilder",
        detail,
    }
}

impl GraphBuilder {
    /// A model for inputs of `input` shape, batch first (any batch size runs later; the one
    /// given only shows in shapes and summaries).
    pub fn new(input: &[usize]) -> Result<Self> {
        if input.len() < 2 || input.contains(&0) {
            return Err(invalid(format!(
                "input shape {input:?}: give [N, …] with every size at least 1, e.g. [1, 3, 224, 224]"
            )));
        }
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Ok(Self {
            plan: Rc::new(RefCell::new(Plan {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                shapes: vec![input.to_vec()],
                nodes: Vec::new(),
            })),
            prefix: String::new(),
        })
    }

    /// The model's input.
    pub fn input(&self) -> ValueRef {
        ValueRef {
            builder: self.plan.borrow().id,
            index: 0,
        }
    }

    /// A builder for the same model whose names start with `name.` (nested: `scope("a")
    /// .scope(0)` names `a.0.…`), as a PyTorch submodule's parameters are named.
    pub fn scope(&self, name: impl Display) -> GraphBuilder {
        Self {
            plan: Rc::clone(&self.plan),
            prefix: self.full_name(&name.to_string()),
        }
    }

    /// This scope's path (`"layer1.0"`), empty at the top.
    pub fn path(&self) -> &str {
        &self.prefix
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn index(&self, plan: &Plan, value: ValueRef) -> Result<usize> {
        if value.builder != plan.id || value.index >= plan.shapes.len() {
            return Err(invalid(format!(
                "{value:?} belongs to another GraphBuilder: use values of this model only"
            )));
        }
        Ok(value.index)
    }

    /// The inferred shape of `value`.
    pub fn shape(&self, value: ValueRef) -> Result<Vec<usize>> {
        let plan = self.plan.borrow();
        Ok(plan.shapes[self.index(&plan, value)?].clone())
    }

    /// Adds `layer` under `name` in this scope, reading `inputs`, and returns its output.
    /// The layer is checked against its inputs' shapes now (sizes it was built without,
    /// such as `Linear::lazy`'s, are taken from them).
    pub fn add(
        &self,
        name: &str,
        mut layer: impl Layer + 'static,
        inputs: &[ValueRef],
    ) -> Result<ValueRef> {
        let full = self.full_name(name);
        let mut plan = self.plan.borrow_mut();
        if name.is_empty() || plan.nodes.iter().any(|n| n.name == full) {
            return Err(invalid(format!(
                "the name {full:?} is empty or already taken: every node needs its own name"
            )));
        }
        if inputs.len() != layer.arity() {
            return Err(invalid(format!(
                "{full} ({}) takes {} inputs, got {}",
                layer.describe(),
                layer.arity(),
                inputs.len()
            )));
        }
        let indices = inputs
            .iter()
            .map(|&v| self.index(&plan, v))
            .collect::<Result<Vec<_>>>()?;
        let shapes: Vec<&[usize]> = indices.iter().map(|&i| &plan.shapes[i][..]).collect();
        if let Some(first) = shapes.first() {
            layer.fit_input(first).map_err(|e| in_node(&full, e))?;
        }
        let output = layer.output_shape(&shapes).map_err(|e| in_node(&full, e))?;
        plan.shapes.push(output);
        plan.nodes.push(PlannedNode {
            name: full,
            layer: Box::new(layer),
            inputs: indices,
        });
        Ok(ValueRef {
            builder: plan.id,
            index: plan.shapes.len() - 1,
        })
    }

    /// [`GraphBuilder::add`] for a layer with one input.
    pub fn apply(&self, name: &str, layer: impl Layer + 'static, x: ValueRef) -> Result<ValueRef> {
        self.add(name, layer, &[x])
    }

    /// The model computing `output`, its state on `device` and drawn from `seed`. Every
    /// layer added must lead to `output`, which must be the last one added: a layer that
    /// would run for nothing is an error naming it.
    pub fn build(self, output: ValueRef, device: Device, seed: u64) -> Result<Graph> {
        let mut plan = self.plan.borrow_mut();
        let last = self.index(&plan, output)?;
        if last == 0 || last != plan.nodes.len() {
            return Err(invalid(format!(
                "the output must be the last layer added ({} layers, output is value {last}): \
                 a model computes one output",
                plan.nodes.len()
            )));
        }
        let mut reaches = vec![false; plan.shapes.len()];
        reaches[last] = true;
        for (i, node) in plan.nodes.iter().enumerate().rev() {
            if !reaches[i + 1] {
                return Err(invalid(format!(
                    "{} does not lead to the output: remove it or wire its value onward",
                    node.name
                )));
            }
            node.inputs.iter().for_each(|&v| reaches[v] = true);
        }
        // Scopes still held elsewhere see an empty model from here on.
        let nodes = std::mem::take(&mut plan.nodes);
        let shapes = std::mem::take(&mut plan.shapes);
        plan.id = usize::MAX;
        let mut graph = Graph::new(device, seed);
        if let Some(per_image) = shapes.first().and_then(|input| input.get(1..)) {
            graph.expect_input(per_image);
        }
        for (node, shape) in nodes.into_iter().zip(shapes.into_iter().skip(1)) {
            let value = graph.add_boxed(&node.name, node.layer, &node.inputs)?;
            graph.set_planned_shape(value, shape);
        }
        Ok(graph)
    }
}
