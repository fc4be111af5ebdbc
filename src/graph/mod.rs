//! The thin graph executor: nodes (layers) over values (tensors), run forward in order and
//! backward in reverse, on the GPU or on the CPU reference path.
//!
//! The executor knows no layer by name. A [`Layer`] says what state it owns, how to compute
//! its output, and how to turn the output's gradient into its inputs' and state's gradients.
//! The executor wires values between nodes, sums the gradients of a value that feeds several
//! nodes, frees every intermediate value at its last use (a schedule computed once, when the
//! node is added) and hands the trainable state to the optimizer. On the GPU no method here
//! reads back: wrap a step in [`Gpu::record`](crate::Gpu::record) and it is one command encoder, one submit.

use ndarray::{ArrayD, IxDyn};

mod finite;
mod init_rng;

pub use crate::optim::GraphOptimizer;
pub use crate::value::{Device, Value};
pub use init_rng::InitRng;

use crate::error::{Error, Result};
use crate::optim::Optimizer;
use crate::value::Activation;
use finite::FiniteChecks;

/// What a layer's forward and backward see of the run.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// Training mode (dropout active, batch statistics) or eval mode.
    pub training: bool,
    /// The training step, from 0: varies dropout masks from step to step.
    pub step: u32,
    /// In a training forward pass, whether a training step's backward pass (trainable state
    /// wanting gradients, the model's input not) will want this node's input gradient: a
    /// layer may plan its backward pass from it (a convolution keeping what its weight
    /// gradient reuses). False elsewhere.
    pub input_gradient: bool,
    /// Whether a backward pass may follow (training, and evaluation with gradients): only
    /// then does a layer keep what its backward pass alone reads (max pooling's arg-max).
    pub backward: bool,
}

/// A piece of state a layer owns, with its initial value.
pub struct StateInit {
    /// Local name, e.g. `"weight"`; the model prefixes the node's name.
    pub name: &'static str,
    /// Initial value.
    pub value: ArrayD<f32>,
    /// Trained by the optimizer (weights) or not (running statistics).
    pub trainable: bool,
    /// A count (batch norm's `num_batches_tracked`): one element holding the bits of a
    /// `u32`, never trained, saved in checkpoints as int64.
    pub counter: bool,
}

/// A layer's forward result: its output and what its backward needs besides inputs/output.
pub struct Forward {
    /// The output.
    pub y: Value,
    /// Extra values for backward (e.g. max-pool arg-max, batch statistics).
    pub saved: Vec<Value>,
}

/// What [`Layer::forward_pooled`] returns: the producing layer's forward pass, its output a
/// stand-in, and the pooling's.
pub struct PooledForward {
    /// The producing layer's output (a stand-in: its shape only) and what it saved.
    pub producer: Forward,
    /// The pooled output and what the pooling saved (its arg-max, for a backward pass).
    pub pooled: Forward,
}

/// What a layer's backward must produce.
#[derive(Clone, Copy, Debug)]
pub struct Needs {
    /// Gradients with respect to the inputs.
    pub inputs: bool,
    /// Gradients with respect to the trainable state.
    pub state: bool,
}

/// A layer's backward result.
pub struct Backward {
    /// One entry per input: `Some` when `Needs::inputs`.
    pub inputs: Vec<Option<Value>>,
    /// One entry per state tensor: `Some` for trainable state when `Needs::state`.
    pub state: Vec<Option<Value>>,
}

/// Everything a layer's backward can read.
pub struct BackwardArgs<'a> {
    /// The run's mode and step.
    pub ctx: Ctx,
    /// The forward inputs.
    pub inputs: &'a [&'a Value],
    /// The layer's state.
    pub state: &'a [Value],
    /// The forward output.
    pub y: &'a Value,
    /// What forward saved.
    pub saved: &'a [Value],
    /// `∂L/∂y`.
    pub dy: &'a Value,
    /// A second part of `∂L/∂y` not yet added to `dy`: only for a layer that
    /// [`Layer::sums_output_gradients`], where its output fed two nodes; `None` otherwise.
    pub dy_more: Option<&'a Value>,
    /// Which gradients are wanted.
    pub needs: Needs,
    /// The activation this backward takes its input gradient on through: the one the layer
    /// producing its input applies last, where [`Layer::takes_input_activation`] accepted it.
    /// `Activation::None` otherwise.
    pub input_activation: Activation,
    /// `dy` is already the gradient before this layer's [`Layer::output_activation`] (or
    /// the `absorbed` one): the layer reading the output took it through (see
    /// `input_activation`).
    pub dy_through_activation: bool,
    /// The activation [`Layer::forward_activated`] applied last, where the graph ran the
    /// activation node after this layer so ([`Layer::absorbs_activation`]): `y` is its
    /// output, and `dy` the gradient there unless `dy_through_activation`.
    /// `Activation::None` where the graph ran [`Layer::forward`].
    pub absorbed: Activation,
    /// `Σ` over the batch of `dy` (given through the activation), where the node reading the
    /// output computed it with its own backward pass (a fused loss head): the bias gradient
    /// of a layer that [`Layer::takes_bias_gradient`]. `None` otherwise.
    pub dy_sum: Option<&'a Value>,
    /// Where a max pooling alone read the output and this layer
    /// [`Layer::takes_pooled_gradient`]: the pooling, whose backward pass was left to this
    /// one; `dy` is then the gradient at the pooling's output. `None` otherwise.
    pub dy_pooled: Option<PooledGradient<'a>>,
}

/// A max pooling's backward pass handed to the layer producing its input (see
/// [`BackwardArgs::dy_pooled`]).
#[derive(Clone, Copy, Debug)]
pub struct PooledGradient<'a> {
    /// The pooling.
    pub pool: MaxPool,
    /// Its output.
    pub y: &'a Value,
    /// Its windows' arg-max, saved by its forward pass.
    pub argmax: &'a Value,
    /// The activation it takes the gradient back through (the layer's own, `dy_through_activation`
    /// then set), or none.
    pub activation: Activation,
}

impl BackwardArgs<'_> {
    /// The activation `dy` still has to be taken back through by a layer whose own output
    /// activation is `own`: the absorbed one if any, else `own`; none where the layer reading
    /// the output took it (`dy_through_activation`).
    pub fn activation_to_take(&self, own: Activation) -> Activation {
        match (self.dy_through_activation, self.absorbed) {
            (true, _) => Activation::None,
            (false, Activation::None) => own,
            (false, absorbed) => absorbed,
        }
    }
}

/// A max pooling's windows ([`Layer::max_pool`]), for the layer before it to run in its
/// epilogue: the options of PyTorch's max pooling module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool {
    /// The window `(rows, columns)`.
    pub kernel: (usize, usize),
    /// The step between windows.
    pub stride: (usize, usize),
    /// Padding on each side.
    pub padding: (usize, usize),
    /// The spacing of a window's taps.
    pub dilation: (usize, usize),
    /// Whether the output size rounds up.
    pub ceil_mode: bool,
}

/// Batch norm in evaluation mode, per channel: `y = (x − mean) · γ / sqrt(var + eps) + β`
/// ([`Layer::eval_channel_norm`]), for the layer before it to fold in.
pub struct ChannelNorm<'a> {
    /// γ.
    pub gamma: &'a Value,
    /// β.
    pub beta: &'a Value,
    /// The running mean.
    pub mean: &'a Value,
    /// The running variance.
    pub var: &'a Value,
    /// Added to the variance.
    pub eps: f32,
}

/// In an evaluation forward pass, a norm folded into the node before it: the norm's node,
/// the residual sum after it (its node and the value it adds, made before the producer
/// runs), and the activation node after those whose activation runs in the producer's
/// epilogue.
#[derive(Clone, Copy, Debug)]
struct Fold {
    norm: usize,
    residual: Option<(usize, ValueId)>,
    activation: Option<(usize, Activation)>,
}

impl Fold {
    /// The folded nodes after the producer.
    fn nodes(&self) -> impl Iterator<Item = usize> {
        let residual = self.residual.map(|(node, _)| node);
        let activation = self.activation.map(|(node, _)| node);
        [Some(self.norm), residual, activation]
            .into_iter()
            .flatten()
    }
}

/// An activation node whose work the node before it does in its own kernels
/// ([`Layer::absorbs_activation`]): the node, and its activation.
#[derive(Clone, Copy, Debug)]
struct Absorbed {
    node: usize,
    activation: Activation,
}

/// A node's computation: forward on the GPU or the CPU, and its backward.
pub trait Layer: Send {
    /// A short description for errors, e.g. `"Conv2d(1→6, 5×5)"`.
    fn describe(&self) -> String;

    /// How many inputs the layer takes.
    fn arity(&self) -> usize {
        1
    }

    /// Checks the layer against the shape of its input (batch first) and takes any size it
    /// was built without from it (`nn::Linear::lazy`); `Sequential::build_for` calls it
    /// before the layer's state is made. A mismatch is an error that names both sizes.
    fn fit_input(&mut self, _input: &[usize]) -> Result<()> {
        Ok(())
    }

    /// Whether the layer still needs [`Layer::fit_input`] to know its sizes.
    fn needs_input_shape(&self) -> bool {
        false
    }

    /// The output shape for inputs of these shapes (batch first), or an error naming what
    /// does not fit: [`GraphBuilder`](crate::GraphBuilder) checks a model with it before
    /// any state exists. The default runs the layer once on zeros on the CPU path, so a
    /// layer of your own works as it is; the built-in layers answer from their shape rules.
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        dry_run_shape(self, inputs)
    }

    /// The state the layer owns, initialised from `rng` (seeded per tensor by the model;
    /// it also refuses tensors too large for the device or the host).
    fn init_state(&self, _rng: &mut dyn FnMut(&'static str) -> InitRng) -> Result<Vec<StateInit>> {
        Ok(Vec::new())
    }

    /// Computes the output; may update non-trainable state (running statistics).
    fn forward(&self, ctx: Ctx, inputs: &[&Value], state: &mut [Value]) -> Result<Forward>;

    /// Gradients from `∂L/∂y`.
    fn backward(&self, args: BackwardArgs<'_>) -> Result<Backward>;

    /// The activation this layer applies last, whose derivative its backward reads from its
    /// output `y` and skips when told `BackwardArgs::dy_through_activation` (a convolution
    /// with a fused activation).
    fn output_activation(&self) -> Activation {
        Activation::None
    }

    /// Whether this layer's backward can take its input gradient on through `activation`,
    /// applied last by the layer producing its input, from its own output (max pooling: a
    /// window's maximum is that activation's output at the arg-max). The graph hands it over
    /// (`BackwardArgs::input_activation`) where that input feeds nothing else, and the
    /// producer's backward then skips its activation: one pass fewer over its output.
    fn takes_input_activation(&self, _activation: Activation) -> bool {
        false
    }

    /// Whether this layer's backward adds `BackwardArgs::dy_more` to `dy` itself, in the
    /// pass that takes `dy` through its activation (a residual sum): where its output feeds
    /// two nodes, the graph then leaves their gradients unsummed for it, one pass fewer
    /// over the output.
    fn sums_output_gradients(&self) -> bool {
        false
    }

    /// Whether this layer can apply `activation` last in its own kernels
    /// ([`Layer::forward_activated`]) and take the gradient back through it
    /// (`BackwardArgs::absorbed`): where its output feeds an activation layer alone, the
    /// graph then runs that activation so, and skips its node (one pass fewer each way).
    fn absorbs_activation(&self, _activation: Activation) -> bool {
        false
    }

    /// The forward pass with `activation` applied last, for an activation
    /// [`Layer::absorbs_activation`] accepted.
    fn forward_activated(
        &self,
        _ctx: Ctx,
        _inputs: &[&Value],
        _state: &mut [Value],
        activation: Activation,
    ) -> Result<Forward> {
        Err(Error::InvalidArgument {
            op: "graph",
            detail: format!("{} applies no {activation:?} of its own", self.describe()),
        })
    }

    /// The per-channel map this layer is in evaluation mode (batch norm with its running
    /// statistics): an evaluation forward pass folds it into the layer before it
    /// ([`Layer::fold_channel_norm`]) where that layer's output feeds nothing else.
    fn eval_channel_norm<'a>(&self, _state: &'a [Value]) -> Option<ChannelNorm<'a>> {
        None
    }

    /// The activation this layer is, if it is nothing else: after a folded norm it runs in
    /// the epilogue of the layer the norm was folded into.
    fn activation_only(&self) -> Option<Activation> {
        None
    }

    /// The max pooling this layer is, if it is one and nothing else: the layer producing its
    /// input may run it in its own epilogue ([`Layer::forward_pooled`]).
    fn max_pool(&self) -> Option<MaxPool> {
        None
    }

    /// The forward pass with `pool`, the max pooling that alone reads this layer's output,
    /// run in the same kernel, or `None` where the layer cannot (the graph then runs both).
    /// Its `producer.y` stands in for the output, which is never stored: its shape is the
    /// output's, its contents are not. The pooling's backward reads only its shape, and a
    /// layer returning one must not read its `y` in its own backward pass: the pooling
    /// takes the gradient through the layer's activation (`Layer::output_activation`,
    /// handed over as for any max pooling). `pooled` is what the pooling's own forward pass
    /// would have returned.
    fn forward_pooled(
        &self,
        _ctx: Ctx,
        _inputs: &[&Value],
        _state: &mut [Value],
        _pool: &MaxPool,
    ) -> Result<Option<PooledForward>> {
        Ok(None)
    }

    /// Whether this layer is `x·Wᵀ + b` with state `[W, b]` and no activation, and nothing
    /// else: ending a model, its backward pass may run fused with a softmax cross-entropy's
    /// ([`Graph::backward_cross_entropy`]).
    fn is_plain_linear(&self) -> bool {
        false
    }

    /// Whether this layer's backward runs the backward pass of a max pooling that alone reads
    /// its output ([`BackwardArgs::dy_pooled`]): a convolution reads the pooled gradient in
    /// place of its own `dz`, one pass fewer.
    fn takes_pooled_gradient(&self) -> bool {
        false
    }

    /// Whether this layer's backward takes its bias gradient, `Σ` of `dy` over the batch,
    /// from [`BackwardArgs::dy_sum`] when given: a fused loss head that takes the gradient
    /// back through this layer's output activation computes it (one pass fewer).
    fn takes_bias_gradient(&self) -> bool {
        false
    }

    /// Whether this layer is the sum of its two inputs and nothing else (a residual
    /// connection): after a folded norm it is added in the epilogue of the layer the norm
    /// was folded into.
    fn sums_inputs(&self) -> bool {
        false
    }

    /// This layer's state with `norm`, applied to its output, folded in (a convolution:
    /// each filter scaled, the bias shifted), for [`Layer::forward_folded`]; `None` where it
    /// cannot fold it. The graph keeps the result until the model's state changes.
    fn fold_channel_norm(
        &self,
        _state: &[Value],
        _norm: &ChannelNorm<'_>,
    ) -> Result<Option<Vec<Value>>> {
        Ok(None)
    }

    /// The evaluation forward pass with the state [`Layer::fold_channel_norm`] made,
    /// `residual` added (a residual sum after the norm) and `activation` applied last. The
    /// layer may keep more in `folded` after that state, for the next passes: what it
    /// derives from the folded state alone (a convolution's transformed filters); the graph
    /// drops it with the fold.
    fn forward_folded(
        &self,
        _inputs: &[&Value],
        _folded: &mut Vec<Value>,
        _residual: Option<&Value>,
        _activation: Activation,
    ) -> Result<Value> {
        Err(Error::InvalidArgument {
            op: "graph",
            detail: format!("{} folds no norm into its state", self.describe()),
        })
    }
}

/// Between two layers: a recorded step that holds too many dropped buffers back from
/// reuse, or whose last layer compiled a pipeline, submits what it has
/// (`Gpu::submit_between_layers`).
fn submit_between_layers(device: &Device) {
    if let Device::Gpu(gpu) = device {
        gpu.submit_between_layers();
    }
}

/// [`Layer::output_shape`] by running `layer` on zeros on the CPU path, its state freshly
/// initialised.
fn dry_run_shape<L: Layer + ?Sized>(layer: &L, inputs: &[&[usize]]) -> Result<Vec<usize>> {
    let mut rng = |local: &'static str| InitRng::for_tensor(0, local);
    let mut state: Vec<Value> = layer
        .init_state(&mut rng)?
        .into_iter()
        .map(|init| Value::from(init.value))
        .collect();
    let zeros: Vec<Value> = inputs
        .iter()
        .map(|shape| Value::from(ArrayD::zeros(IxDyn(shape))))
        .collect();
    let refs: Vec<&Value> = zeros.iter().collect();
    let ctx = Ctx {
        training: false,
        step: 0,
        input_gradient: false,
        backward: false,
    };
    Ok(layer.forward(ctx, &refs, &mut state)?.y.shape().to_vec())
}

/// One line of a model summary (see `crate::summary`).
#[derive(Debug)]
pub(crate) struct LayerRow {
    pub name: String,
    pub layer: String,
    pub output: Option<Vec<usize>>,
    pub trainable: usize,
    pub other: usize,
}

/// A value in a graph: the input (0) or a node's output.
pub type ValueId = usize;

struct Node {
    name: String,
    layer: Box<dyn Layer>,
    inputs: Vec<ValueId>,
    /// The layer's state tensors, and per tensor its local name, whether it is trained,
    /// and its gradient from the last backward.
    state: Vec<Value>,
    state_names: Vec<&'static str>,
    trainable: Vec<bool>,
    counter: Vec<bool>,
    grads: Vec<Option<Value>>,
    frozen: bool,
    /// The output shape a [`GraphBuilder`](crate::GraphBuilder) inferred, for summaries.
    planned_shape: Option<Vec<usize>>,
}

impl Node {
    fn full_names(&self) -> impl Iterator<Item = String> + '_ {
        self.state_names
            .iter()
            .map(move |local| format!("{}.{local}", self.name))
    }

    fn trains(&self) -> bool {
        !self.frozen && self.trainable.iter().any(|&t| t)
    }
}

/// How a forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Training mode, keeping what backward needs.
    Train,
    /// Eval mode, freeing each value at its last use.
    Eval,
    /// Eval mode, keeping what backward needs (gradients of a fixed model, e.g. for attacks).
    EvalWithGrad,
}

/// A model: layers wired over values, with their state on one device.
pub struct Graph {
    device: Device,
    seed: u64,
    nodes: Vec<Node>,
    /// Values of the last forward pass (index = ValueId); intermediates are freed early.
    values: Vec<Option<Value>>,
    saved: Vec<Vec<Value>>,
    mode: Option<Mode>,
    step: u32,
    input_grad: bool,
    check_finite: bool,
    /// The checks of the current step, while `check_finite` is on.
    finite: Option<FiniteChecks>,
    /// Per node: the values whose last forward use it is.
    last_forward_use: Vec<Vec<ValueId>>,
    /// Per node: the values whose last backward use it is.
    last_backward_use: Vec<Vec<ValueId>>,
    /// Parameters of layers replaced since the last update: new parameters under old names,
    /// whose optimizer state (if any) the next update drops, as PyTorch's optimizer never
    /// saw them.
    replaced: Vec<String>,
    /// One input's shape (no batch axis) the model was built for, where its builder knew
    /// it: named when an input of another shape fails in a layer.
    expected_input: Option<Vec<usize>>,
    /// Per node, the state with the batch norm after it folded in (`Some(empty)`: the
    /// layer cannot fold it), made by the first evaluation pass after the state last changed.
    folded: Vec<Option<Vec<Value>>>,
    /// Per node, the activation node it absorbed in the last forward pass.
    absorbed: Vec<Option<Absorbed>>,
    /// The gradients' global norm before the last update clipped them, where it did.
    grad_norm: Option<Value>,
}

impl Graph {
    /// An empty model on `device`; `seed` fixes every initial weight.
    pub fn new(device: Device, seed: u64) -> Self {
        Self {
            device,
            seed,
            nodes: Vec::new(),
            values: Vec::new(),
            saved: Vec::new(),
            mode: None,
            step: 0,
            input_grad: false,
            check_finite: false,
            finite: None,
            last_forward_use: Vec::new(),
            last_backward_use: Vec::new(),
            replaced: Vec::new(),
            expected_input: None,
            folded: Vec::new(),
            absorbed: Vec::new(),
            grad_norm: None,
        }
    }

    /// Records the shape of one input (no batch axis) the model was built for.
    pub(crate) fn expect_input(&mut self, shape: &[usize]) {
        self.expected_input = Some(shape.to_vec());
    }

    /// The model's input.
    pub const INPUT: ValueId = 0;

    /// Adds a node named `name` (its state is named `name.weight`, …) reading `inputs`, and
    /// returns its output. The last node added is the model's output.
    pub fn add(
        &mut self,
        name: &str,
        layer: impl Layer + 'static,
        inputs: &[ValueId],
    ) -> Result<ValueId> {
        self.add_boxed(name, Box::new(layer), inputs)
    }

    /// [`Graph::add`] for a boxed layer.
    pub fn add_boxed(
        &mut self,
        name: &str,
        layer: Box<dyn Layer>,
        inputs: &[ValueId],
    ) -> Result<ValueId> {
        let invalid = |detail: String| Error::InvalidArgument {
            op: "graph",
            detail,
        };
        if inputs.len() != layer.arity() {
            return Err(invalid(format!(
                "{name} ({}) takes {} inputs, got {}",
                layer.describe(),
                layer.arity(),
                inputs.len()
            )));
        }
        if let Some(&bad) = inputs.iter().find(|&&v| v > self.nodes.len()) {
            return Err(invalid(format!(
                "{name} reads value {bad}, which is not defined yet (0 is the input, node k's output is k+1)"
            )));
        }
        let node = self.fresh_node(name, layer, inputs.to_vec())?;
        if !node.state.is_empty() && self.nodes.iter().any(|n| n.name == name) {
            return Err(invalid(format!(
                "two nodes are named {name:?}; state names must be unique"
            )));
        }
        self.nodes.push(node);
        self.plan_liveness();
        // The last forward pass's values no longer match the model.
        self.mode = None;
        self.folded.clear();
        Ok(self.nodes.len())
    }

    /// Records the output shape a builder inferred for the node whose output is `value`.
    pub(crate) fn set_planned_shape(&mut self, value: ValueId, shape: Vec<usize>) {
        if let Some(node) = value.checked_sub(1).and_then(|i| self.nodes.get_mut(i)) {
            node.planned_shape = Some(shape);
        }
    }

    /// Replaces the layer of the node named `name` (e.g. a new classifier head for transfer
    /// learning); the new layer's state is freshly initialised (and not frozen), its inputs
    /// are kept.
    pub fn replace(&mut self, name: &str, layer: impl Layer + 'static) -> Result<()> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| Error::InvalidArgument {
                op: "graph",
                detail: format!("no node is named {name:?}"),
            })?;
        if layer.arity() != self.nodes[index].inputs.len() {
            return Err(Error::InvalidArgument {
                op: "graph",
                detail: format!(
                    "{name} reads {} values, the new layer {} takes {}",
                    self.nodes[index].inputs.len(),
                    layer.describe(),
                    layer.arity()
                ),
            });
        }
        let inputs = self.nodes[index].inputs.clone();
        self.nodes[index] = self.fresh_node(name, Box::new(layer), inputs)?;
        self.replaced.extend(self.nodes[index].full_names());
        self.mode = None;
        self.folded.clear();
        Ok(())
    }

    /// A node for `layer` with its state initialised from the model seed and uploaded.
    fn fresh_node(&self, name: &str, layer: Box<dyn Layer>, inputs: Vec<ValueId>) -> Result<Node> {
        let seed = self.seed;
        let gpu = self.device.gpu();
        let mut rng = |local: &'static str| {
            InitRng::for_tensor(seed, &format!("{name}.{local}")).for_gpu(gpu)
        };
        let inits = layer.init_state(&mut rng).map_err(|e| in_node(name, e))?;
        Ok(Node {
            name: name.to_string(),
            inputs,
            state_names: inits.iter().map(|i| i.name).collect(),
            trainable: inits.iter().map(|i| i.trainable).collect(),
            counter: inits.iter().map(|i| i.counter).collect(),
            grads: inits.iter().map(|_| None).collect(),
            state: inits
                .into_iter()
                .map(|init| self.device.upload(init.value))
                .collect::<Result<Vec<_>>>()?,
            layer,
            frozen: false,
            planned_shape: None,
        })
    }

    /// Recomputes, per node, which values die after its forward and after its backward.
    fn plan_liveness(&mut self) {
        let count = self.nodes.len();
        let output = count;
        let mut last_forward = vec![None; count + 1];
        let mut first_backward: Vec<usize> = (0..=count).map(|v| v.saturating_sub(1)).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            for &v in &node.inputs {
                last_forward[v] = Some(i);
                first_backward[v] = first_backward[v].min(i);
            }
        }
        self.last_forward_use = vec![Vec::new(); count];
        self.last_backward_use = vec![Vec::new(); count];
        for v in 0..=count {
            if let Some(i) = last_forward[v].filter(|_| v != output) {
                self.last_forward_use[i].push(v);
            }
            // Backward runs in reverse, so a value's last use there is its earliest reader
            // (its producer reads it as `y`).
            if count > 0 {
                self.last_backward_use[first_backward[v]].push(v);
            }
        }
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Asks backward for `∂L/∂input` too (e.g. for adversarial examples).
    pub fn set_input_grad(&mut self, wanted: bool) {
        self.input_grad = wanted;
    }

    /// Checks every layer's output, the loss, every gradient and every parameter after its
    /// update for NaN and infinity (off by default: one extra kernel per tensor, and two
    /// readbacks per step). A non-finite output, loss or gradient stops the step before the
    /// optimizer runs, as PyTorch's `GradScaler` skips such a step: [`Graph::update`] returns
    /// [`Error::NonFinite`] naming the first one and leaves the weights and the optimizer
    /// state as they were (batch norm's running statistics, updated by the forward pass,
    /// are not restored). A parameter that overflows in the update is reported after it by
    /// `train_step`; elsewhere call [`Graph::check_finite`] after the step.
    pub fn set_check_finite(&mut self, on: bool) {
        self.check_finite = on;
        self.finite = None;
    }

    /// With [`Graph::set_check_finite`] on: an error naming the first output, gradient or
    /// parameter of the last forward / backward / update that held a NaN or an infinity.
    pub fn check_finite(&self) -> Result<()> {
        let Some(checks) = &self.finite else {
            return Ok(());
        };
        match checks.first_failure()? {
            Some(what) => Err(Error::NonFinite {
                what: what.to_string(),
                step: self.step,
                update_skipped: false,
            }),
            None => Ok(()),
        }
    }

    /// Training steps taken (forward passes in [`Mode::Train`]).
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// Freezes (or unfreezes) the state of the node named `name`: backward computes no
    /// gradients for it and the optimizer skips it.
    pub fn freeze(&mut self, name: &str, frozen: bool) -> Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::InvalidArgument {
                op: "graph",
                detail: format!("no node is named {name:?}"),
            })?;
        node.frozen = frozen;
        Ok(())
    }

    /// Freezes (or unfreezes) every node: with [`Graph::freeze`] after it, a pretrained
    /// backbone frozen around a new head. The optimizer keeps each parameter's state
    /// through both.
    pub fn freeze_all(&mut self, frozen: bool) {
        for node in &mut self.nodes {
            node.frozen = frozen;
        }
    }

    /// Runs the model on `input` and returns its output (kept until the next forward).
    pub fn forward(&mut self, input: Value, mode: Mode) -> Result<&Value> {
        if self.nodes.is_empty() {
            return Err(Error::InvalidArgument {
                op: "graph",
                detail: "the model has no layers; add some with Graph::add".into(),
            });
        }
        let ctx = Ctx {
            training: mode == Mode::Train,
            step: self.step,
            input_gradient: false,
            backward: mode != Mode::Eval,
        };
        let step_wants = self.wanted_gradients(false, true);
        let keep = mode != Mode::Eval;
        let given = input.shape().to_vec();
        self.values = (0..=self.nodes.len()).map(|_| None).collect();
        self.values[0] = Some(input);
        self.saved = (0..self.nodes.len()).map(|_| Vec::new()).collect();
        self.mode = None;
        self.finite = if self.check_finite {
            // An output per node, the loss; a gradient and an updated value per state tensor.
            let states: usize = self.nodes.iter().map(|n| n.state.len()).sum();
            Some(FiniteChecks::new(
                &self.device,
                self.nodes.len() + 1 + 2 * states,
            )?)
        } else {
            None
        };
        if mode == Mode::Train {
            // Running statistics change.
            self.folded.clear();
        }
        let folds = match (mode, &self.finite) {
            (Mode::Eval, None) => self.eval_folds(),
            _ => vec![None; self.nodes.len()],
        };
        self.folded.resize_with(self.nodes.len(), || None);
        self.absorbed = self.absorptions(&folds);
        let pooling = self.poolings();
        let mut skipped = vec![false; self.nodes.len()];
        for i in 0..self.nodes.len() {
            if !skipped[i] {
                let folded = match folds[i] {
                    Some(fold) => self.forward_folded(i, fold, &given)?,
                    None => None,
                };
                match (folded, folds[i]) {
                    (Some((value, y)), Some(fold)) => {
                        self.values[value] = Some(y);
                        for k in fold.nodes() {
                            skipped[k] = true;
                        }
                    }
                    _ => {
                        let wanted = self.nodes[i].inputs.iter().any(|&v| step_wants[v]);
                        let ctx = Ctx {
                            input_gradient: ctx.training && wanted,
                            ..ctx
                        };
                        let pooled = match pooling[i] {
                            Some((j, pool)) => self
                                .forward_pooled_node(i, (j, &pool), ctx, keep, &given)?
                                .then_some(j),
                            None => None,
                        };
                        match pooled {
                            Some(j) => skipped[j] = true,
                            None => self.forward_node(i, ctx, keep, &given)?,
                        }
                    }
                }
                if let Some(absorbed) = self.absorbed[i] {
                    skipped[absorbed.node] = true;
                }
            }
            if !keep {
                for &v in &self.last_forward_use[i] {
                    self.values[v] = None;
                }
            }
            submit_between_layers(&self.device);
        }
        if mode == Mode::Train {
            self.step += 1;
        }
        self.mode = keep.then_some(mode);
        self.values[self.nodes.len()]
            .as_ref()
            .ok_or_else(|| freed(self.nodes.len()))
    }

    /// Which values a backward pass needs a gradient of: the input if `input_grad`, and
    /// anything downstream of trainable state that is not frozen (with `state_grads`).
    fn wanted_gradients(&self, input_grad: bool, state_grads: bool) -> Vec<bool> {
        let mut wants = vec![false; self.nodes.len() + 1];
        wants[0] = input_grad;
        for (i, node) in self.nodes.iter().enumerate() {
            wants[i + 1] = (state_grads && node.trains()) || node.inputs.iter().any(|&v| wants[v]);
        }
        wants
    }

    /// Node `i`'s forward pass: its output (the absorbed activation node's, where it
    /// absorbed one), and what its backward needs if `keep`.
    fn forward_node(&mut self, i: usize, ctx: Ctx, keep: bool, given: &[usize]) -> Result<()> {
        let node = &mut self.nodes[i];
        let inputs = node
            .inputs
            .iter()
            .map(|&v| self.values[v].as_ref().ok_or_else(|| freed(v)))
            .collect::<Result<Vec<_>>>()?;
        let absorbed = self.absorbed[i];
        let out = match absorbed {
            Some(a) => node
                .layer
                .forward_activated(ctx, &inputs, &mut node.state, a.activation),
            None => node.layer.forward(ctx, &inputs, &mut node.state),
        }
        .map_err(|e| node_error(&node.name, e, self.expected_input.as_deref(), given))?;
        if let Some(checks) = &mut self.finite {
            checks.check(|| format!("the output of node {:?}", node.name), &out.y)?;
        }
        self.values[output_of(i, absorbed)] = Some(out.y);
        if keep {
            self.saved[i] = out.saved;
        }
        Ok(())
    }

    /// Node `i`'s forward pass with the max pooling `pool` of node `j` in its epilogue, if
    /// its layer runs it ([`Layer::forward_pooled`]): both nodes' outputs (node `i`'s a
    /// stand-in), and what their backward passes need if `keep`. False where it does not.
    fn forward_pooled_node(
        &mut self,
        i: usize,
        (j, pool): (usize, &MaxPool),
        ctx: Ctx,
        keep: bool,
        given: &[usize],
    ) -> Result<bool> {
        let node = &mut self.nodes[i];
        let inputs = node
            .inputs
            .iter()
            .map(|&v| self.values[v].as_ref().ok_or_else(|| freed(v)))
            .collect::<Result<Vec<_>>>()?;
        let out = node
            .layer
            .forward_pooled(ctx, &inputs, &mut node.state, pool)
            .map_err(|e| node_error(&node.name, e, self.expected_input.as_deref(), given))?;
        let Some(out) = out else {
            return Ok(false);
        };
        self.values[i + 1] = Some(out.producer.y);
        self.values[j + 1] = Some(out.pooled.y);
        if keep {
            self.saved[i] = out.producer.saved;
            self.saved[j] = out.pooled.saved;
        }
        Ok(true)
    }

    /// Per node, the max pooling node that alone reads its output, and the pooling, where
    /// the node may run it in its epilogue: no finite checks run (they would read the
    /// output the fused kernel never stores). A node read by a pooling alone folds no norm
    /// and absorbs no activation (both need that reader); a norm folded into the pooling
    /// is not (it cannot fold one) and runs after it as a node.
    fn poolings(&self) -> Vec<Option<(usize, MaxPool)>> {
        let sole_readers = self.sole_readers();
        (0..self.nodes.len())
            .map(|i| {
                let j = sole_readers[i + 1].filter(|_| self.finite.is_none())?;
                Some((j, self.nodes[j].layer.max_pool()?))
            })
            .collect()
    }

    /// Per node, for an evaluation forward pass: the batch norm folded into it (its output's
    /// only reader), the residual sum after the norm (the norm's only reader, adding a
    /// value made before the node runs) and the activation after those (their only
    /// reader), if any.
    fn eval_folds(&self) -> Vec<Option<Fold>> {
        let sole_readers = self.sole_readers();
        let mut readers = vec![Vec::new(); self.nodes.len() + 1];
        for (k, node) in self.nodes.iter().enumerate() {
            for &v in &node.inputs {
                readers[v].push(k);
            }
        }
        (0..self.nodes.len())
            .map(|i| {
                let norm = sole_readers[i + 1]?;
                let norm_node = &self.nodes[norm];
                norm_node.layer.eval_channel_norm(&norm_node.state)?;
                let residual = match readers[norm + 1][..] {
                    [sum] if self.nodes[sum].layer.sums_inputs() => {
                        match self.nodes[sum].inputs[..] {
                            [a, b] if a != b && a.max(b) == norm + 1 && a.min(b) <= i => {
                                Some((sum, a.min(b)))
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                let last = residual.map_or(norm, |(sum, _)| sum);
                let activation = sole_readers[last + 1]
                    .and_then(|k| Some((k, self.nodes[k].layer.activation_only()?)));
                Some(Fold {
                    norm,
                    residual,
                    activation,
                })
            })
            .collect()
    }

    /// Per node, the activation node after it that it runs in its own kernels: where its
    /// output's only reader is an activation alone that its layer absorbs, and neither is
    /// part of an evaluation fold (nothing is absorbed while finite checks are on, which
    /// check every node's output).
    fn absorptions(&self, folds: &[Option<Fold>]) -> Vec<Option<Absorbed>> {
        let count = self.nodes.len();
        if self.finite.is_some() {
            return vec![None; count];
        }
        let sole_readers = self.sole_readers();
        let folded: Vec<usize> = folds.iter().flatten().flat_map(Fold::nodes).collect();
        (0..count)
            .map(|i| {
                if folds[i].is_some() || folded.contains(&i) {
                    return None;
                }
                let node = sole_readers[i + 1]?;
                let activation = self.nodes[node].layer.activation_only()?;
                let layer = &self.nodes[i].layer;
                layer
                    .absorbs_activation(activation)
                    .then_some(Absorbed { node, activation })
            })
            .collect()
    }

    /// Node `i`'s evaluation forward pass with `fold`'s norm (and activation) folded in:
    /// the value it stands for (the last folded node's output) and its content, or `None`
    /// where the layer cannot fold the norm.
    fn forward_folded(
        &mut self,
        i: usize,
        fold: Fold,
        given: &[usize],
    ) -> Result<Option<(ValueId, Value)>> {
        let node = &self.nodes[i];
        if self.folded[i].is_none() {
            let norm_node = &self.nodes[fold.norm];
            let folded = match norm_node.layer.eval_channel_norm(&norm_node.state) {
                Some(norm) => node
                    .layer
                    .fold_channel_norm(&node.state, &norm)
                    .map_err(|e| in_node(&node.name, e))?,
                None => None,
            };
            self.folded[i] = Some(folded.unwrap_or_default());
        }
        let Some(folded) = self.folded[i].as_mut().filter(|f| !f.is_empty()) else {
            return Ok(None);
        };
        let inputs = node
            .inputs
            .iter()
            .map(|&v| self.values[v].as_ref().ok_or_else(|| freed(v)))
            .collect::<Result<Vec<_>>>()?;
        let residual = match fold.residual {
            Some((_, v)) => Some(self.values[v].as_ref().ok_or_else(|| freed(v))?),
            None => None,
        };
        let last = fold.nodes().last().unwrap_or(fold.norm);
        let activation = fold.activation.map_or(Activation::None, |(_, a)| a);
        let y = node
            .layer
            .forward_folded(&inputs, folded, residual, activation)
            .map_err(|e| node_error(&node.name, e, self.expected_input.as_deref(), given))?;
        Ok(Some((last + 1, y)))
    }

    /// Back-propagates `dy = ∂L/∂output` through the last forward pass (which must have
    /// kept its values): stores each trainable tensor's gradient, and returns `∂L/∂input`
    /// when [`Graph::set_input_grad`] asked for it.
    pub fn backward(&mut self, dy: Value) -> Result<Option<Value>> {
        let input_grad = self.input_grad;
        self.backward_with(Start::Dy(dy), input_grad, true)
    }

    /// Softmax cross-entropy (mean over the batch) of the last forward pass's output against
    /// `labels`, then the backward pass from its gradient: the loss and the correct count
    /// (`[1]` each, not read back), checked as [`Graph::check_finite_value`] does. Where
    /// the model ends in a plain `Linear` on the GPU and the head is small (LeNet's), the
    /// loss and that layer's backward pass are one dispatch
    /// (`ops::linear_cross_entropy`); otherwise it is `softmax_cross_entropy` followed by
    /// [`Graph::backward`].
    pub fn backward_cross_entropy(&mut self, labels: &[usize]) -> Result<(Value, Value)> {
        let output = self.values[self.nodes.len()]
            .as_ref()
            .filter(|_| self.mode.is_some())
            .ok_or_else(no_forward_pass)?;
        if let Some((loss, correct, head)) = self.fused_head(output, labels)? {
            self.check_finite_value("the loss", &loss)?;
            let input_grad = self.input_grad;
            self.backward_with(Start::Head(head), input_grad, true)?;
            return Ok((loss, correct));
        }
        let ce = output.softmax_cross_entropy(labels)?;
        self.check_finite_value("the loss", &ce.loss)?;
        self.backward(ce.grad_logits)?;
        Ok((ce.loss, ce.correct))
    }

    /// The loss, the correct count and the last node's gradients in one dispatch, where the
    /// last node is a plain, trained `Linear` on the GPU that reads one value and the head
    /// fits one workgroup; where that value is the output activation of a layer that
    /// [`Layer::takes_bias_gradient`] and read by no other node, the head takes the gradient
    /// back through the activation and computes that layer's bias gradient too.
    fn fused_head(&self, output: &Value, labels: &[usize]) -> Result<Option<(Value, Value, Head)>> {
        let Some(last) = self.nodes.len().checked_sub(1) else {
            return Ok(None);
        };
        let node = &self.nodes[last];
        let plain = node.layer.is_plain_linear()
            && self.absorbed.get(last).is_some_and(Option::is_none)
            && self.absorbed_by()[last].is_none()
            && node.trains()
            && node.trainable.iter().all(|&t| t)
            && node.inputs.len() == 1;
        let x = node.inputs.first().and_then(|&v| self.values[v].as_ref());
        let Some(x) = x.filter(|_| plain) else {
            return Ok(None);
        };
        let gated = self.head_input_producer(last);
        let activation = gated.map_or(Activation::None, |(_, activation)| activation);
        let fused = output.linear_cross_entropy(labels, x, &node.state[0], activation)?;
        Ok(fused.map(|f| {
            let backward = Backward {
                inputs: vec![Some(f.grads.x)],
                state: vec![Some(f.grads.weight), Some(f.grads.bias)],
            };
            let producer = gated.zip(f.input_bias).map(|((node, _), sum)| (node, sum));
            (f.loss, f.correct, Head { backward, producer })
        }))
    }

    /// The node producing the last node's single input and the output activation it ends
    /// with, where that node [`Layer::takes_bias_gradient`] and the last node is the input's
    /// only reader.
    fn head_input_producer(&self, last: usize) -> Option<(usize, Activation)> {
        let &[v] = &self.nodes[last].inputs[..] else {
            return None;
        };
        if v == 0 || self.sole_readers()[v] != Some(last) {
            return None;
        }
        let (producer, activation) = self.output_producer(v, &self.absorbed_by());
        (activation != Activation::None && self.nodes[producer].layer.takes_bias_gradient())
            .then_some((producer, activation))
    }

    /// `∂L/∂input` from `dy = ∂L/∂output`, computing no parameter gradients (the stored
    /// ones stay as they were): for adversarial examples, or a model that another model's
    /// loss flows through.
    pub fn input_gradient(&mut self, dy: Value) -> Result<Value> {
        self.backward_with(Start::Dy(dy), true, false)?
            .ok_or_else(|| Error::InvalidArgument {
                op: "graph",
                detail: "the input gradient was not produced".into(),
            })
    }

    fn backward_with(
        &mut self,
        start: Start,
        input_grad: bool,
        state_grads: bool,
    ) -> Result<Option<Value>> {
        let mode = self.mode.take().ok_or_else(no_forward_pass)?;
        let count = self.nodes.len();
        let (dy, mut head, producer) = match start {
            Start::Dy(dy) => (Some(dy), None, None),
            Start::Head(Head { backward, producer }) => (None, Some(backward), producer),
        };
        if let Some(dy) = dy
            .as_ref()
            .filter(|dy| dy.shape() != self.values[count].as_ref().map_or(&[][..], |v| v.shape()))
        {
            return Err(Error::ShapeMismatch {
                op: "graph backward",
                shapes: vec![
                    dy.shape().to_vec(),
                    self.values[count]
                        .as_ref()
                        .map_or(Vec::new(), |v| v.shape().to_vec()),
                ],
                detail: format!(
                    "dy is {:?}, the output is {:?}",
                    dy.shape(),
                    self.values[count].as_ref().map(|v| v.shape().to_vec())
                ),
            });
        }
        let ctx = Ctx {
            training: mode == Mode::Train,
            step: self.step.wrapping_sub(u32::from(mode == Mode::Train)),
            input_gradient: false,
            backward: true,
        };
        let wants = self.wanted_gradients(input_grad, state_grads);
        let (taken, mut through) = self.activation_handoffs();
        // The fused head took the gradient through this node's activation (and summed it).
        if let Some((node, _)) = &producer {
            through[*node] = true;
        }
        let absorbed_by = self.absorbed_by();
        let pool_handoffs = self.pool_handoffs();
        // Per node, the gradient of a pooling left to it, waiting for its turn: (the pooling's
        // node, its dy).
        let mut pooled_left: Vec<Option<(usize, Value)>> = (0..count).map(|_| None).collect();
        let mut grads: Vec<Option<Value>> = (0..=count).map(|_| None).collect();
        grads[count] = dy;
        // Per value, a second gradient part left unsummed for the node that takes it, where
        // that node sums the parts itself (`Layer::sums_output_gradients`).
        let mut more: Vec<Option<Value>> = (0..=count).map(|_| None).collect();
        let sums_parts: Vec<bool> = (0..=count)
            .map(|v| {
                let taker = v.checked_sub(1).map(|n| absorbed_by[n].unwrap_or(n));
                taker.is_some_and(|n| self.nodes[n].layer.sums_output_gradients())
            })
            .collect();
        for i in (0..count).rev() {
            if let Some(producer) = absorbed_by[i] {
                // The producer ran this activation: the gradient at its output is the
                // producer's, and the output lives until the producer's backward reads it.
                grads[producer + 1] = grads[i + 1].take();
                more[producer + 1] = more[i + 1].take();
                continue;
            }
            // A max pooling whose backward pass its input's producer runs: its gradient and
            // what it saved wait for that node (its values are freed after that node's turn).
            if let Some(producer) = pool_handoffs[i].filter(|_| !self.saved[i].is_empty())
                && let Some(dy) = grads[i + 1].take()
            {
                pooled_left[producer] = Some((i, dy));
                continue;
            }
            let pooled = pooled_left[i]
                .take()
                .and_then(|(j, dy)| Some((j, dy, self.nodes[j].layer.max_pool()?)));
            let absorbed = self.absorbed[i];
            let node = &mut self.nodes[i];
            let needs = Needs {
                inputs: node.inputs.iter().any(|&v| wants[v]),
                state: state_grads && node.trains(),
            };
            let (dy, pooled) = match pooled {
                Some((j, dy, pool)) => (Some(dy), Some((j, pool))),
                None => (grads[i + 1].take(), None),
            };
            let dy_more = more[i + 1].take();
            // The last node's gradients came with the loss (`Start::Head`).
            let back = match (head.take().filter(|_| i + 1 == count), dy) {
                (Some(back), _) => Some(back),
                (None, Some(dy)) if needs.inputs || needs.state => {
                    let inputs = node
                        .inputs
                        .iter()
                        .map(|&v| self.values[v].as_ref().ok_or_else(|| freed(v)))
                        .collect::<Result<Vec<_>>>()?;
                    let output = output_of(i, absorbed);
                    let y = self.values[output].as_ref().ok_or_else(|| freed(output))?;
                    let back = node
                        .layer
                        .backward(BackwardArgs {
                            ctx,
                            inputs: &inputs,
                            state: &node.state,
                            y,
                            saved: &self.saved[i],
                            dy: &dy,
                            dy_more: dy_more.as_ref(),
                            needs,
                            input_activation: taken[i],
                            dy_through_activation: through[i],
                            absorbed: output_activation(absorbed),
                            dy_sum: producer
                                .as_ref()
                                .filter(|(node, _)| *node == i)
                                .map(|(_, sum)| sum),
                            dy_pooled: match pooled {
                                Some((j, pool)) => Some(PooledGradient {
                                    pool,
                                    y: self.values[j + 1].as_ref().ok_or_else(|| freed(j + 1))?,
                                    argmax: self.saved[j].first().ok_or_else(|| freed(j + 1))?,
                                    activation: taken[j],
                                }),
                                None => None,
                            },
                        })
                        .map_err(|e| in_node(&node.name, e))?;
                    Some(back)
                }
                _ => None,
            };
            if let Some(back) = back {
                if needs.state {
                    for ((slot, grad), &trainable) in
                        node.grads.iter_mut().zip(back.state).zip(&node.trainable)
                    {
                        *slot = grad.filter(|_| trainable);
                    }
                    if let Some(checks) = &mut self.finite {
                        for (name, grad) in node.full_names().zip(&node.grads) {
                            if let Some(grad) = grad {
                                checks.check(|| format!("the gradient of {name}"), grad)?;
                            }
                        }
                    }
                }
                for (&v, grad) in node.inputs.iter().zip(back.inputs) {
                    let Some(grad) = grad.filter(|_| wants[v]) else {
                        continue;
                    };
                    match (&mut grads[v], &mut more[v]) {
                        (empty @ None, _) => *empty = Some(grad),
                        (Some(_), left @ None) if sums_parts[v] => *left = Some(grad),
                        (Some(sum), _) => sum.accumulate(&grad)?,
                    }
                }
            }
            self.saved[i].clear();
            let absorbed_uses = absorbed.map(|a| &self.last_backward_use[a.node]);
            let pooled = pooled.map(|(j, _)| j);
            let pooling_uses = pooled.map(|j| &self.last_backward_use[j]);
            for &v in self.last_backward_use[i]
                .iter()
                .chain(absorbed_uses.into_iter().flatten())
                .chain(pooling_uses.into_iter().flatten())
            {
                self.values[v] = None;
            }
            if let Some(j) = pooled {
                self.saved[j].clear();
            }
            submit_between_layers(&self.device);
        }
        Ok(grads[0].take().filter(|_| input_grad))
    }

    /// Per node, where it is a max pooling whose input's producer runs its backward pass
    /// ([`Layer::takes_pooled_gradient`]): that node. The pooling must read that node's own
    /// output (no activation node absorbed between them) and be its only reader.
    fn pool_handoffs(&self) -> Vec<Option<usize>> {
        let sole_readers = self.sole_readers();
        let absorbed_by = self.absorbed_by();
        (0..self.nodes.len())
            .map(|j| {
                self.nodes[j].layer.max_pool()?;
                let &[v] = &self.nodes[j].inputs[..] else {
                    return None;
                };
                let producer = v.checked_sub(1).filter(|_| sole_readers[v] == Some(j))?;
                (absorbed_by[producer].is_none()
                    && self.absorbed[producer].is_none()
                    && self.nodes[producer].layer.takes_pooled_gradient())
                .then_some(producer)
            })
            .collect()
    }

    /// Per node, the node that absorbed it in the last forward pass, if any.
    fn absorbed_by(&self) -> Vec<Option<usize>> {
        let mut by = vec![None; self.nodes.len()];
        for (i, absorbed) in self.absorbed.iter().enumerate() {
            if let Some(a) = absorbed {
                by[a.node] = Some(i);
            }
        }
        by
    }

    /// Per value, the node that reads it if that node alone reads it, and reads nothing else
    /// (where a layer may take over the producer's activation, or fold into it).
    fn sole_readers(&self) -> Vec<Option<usize>> {
        let mut readers = vec![(0usize, 0usize); self.nodes.len() + 1];
        for (i, node) in self.nodes.iter().enumerate() {
            for &v in &node.inputs {
                readers[v] = (readers[v].0 + 1, i);
            }
        }
        readers
            .into_iter()
            .map(|(count, i)| (count == 1 && self.nodes[i].inputs.len() == 1).then_some(i))
            .collect()
    }

    /// The node whose output (or absorbed activation's output) value `v` (> 0) is, and the
    /// activation it applies last.
    fn output_producer(&self, v: ValueId, absorbed_by: &[Option<usize>]) -> (usize, Activation) {
        match absorbed_by[v - 1] {
            Some(producer) => (producer, output_activation(self.absorbed[producer])),
            None => (v - 1, self.nodes[v - 1].layer.output_activation()),
        }
    }

    /// Per node, the activation its backward takes on for the layer producing its input (see
    /// [`Layer::takes_input_activation`]: only for a single input that is a node's output
    /// read by no other node), and whether its own output activation (or the one it
    /// absorbed) is taken so by its reader.
    fn activation_handoffs(&self) -> (Vec<Activation>, Vec<bool>) {
        let count = self.nodes.len();
        let sole_readers = self.sole_readers();
        let absorbed_by = self.absorbed_by();
        let mut taken = vec![Activation::None; count];
        let mut through = vec![false; count];
        for (i, node) in self.nodes.iter().enumerate() {
            if let [v] = node.inputs[..]
                && v > 0
                && sole_readers[v] == Some(i)
            {
                let (producer, activation) = self.output_producer(v, &absorbed_by);
                if activation != Activation::None && node.layer.takes_input_activation(activation) {
                    taken[i] = activation;
                    through[producer] = true;
                }
            }
        }
        (taken, through)
    }

    /// Every float state tensor with its full name (`conv1.weight`, `bn1.running_mean`, …),
    /// in node order: the model's `state_dict` less its counts, which are integers
    /// ([`Graph::counts`]).
    pub fn state(&self) -> Vec<(String, &Value)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.full_names()
                    .zip(n.state.iter().zip(&n.counter))
                    .filter(|(_, (_, counter))| !**counter)
                    .map(|(name, (value, _))| (name, value))
            })
            .collect()
    }

    /// Every state tensor, counts included (held as the bits of a `u32` in an f32).
    pub(crate) fn all_state(&self) -> Vec<(String, &Value)> {
        self.nodes
            .iter()
            .flat_map(|n| n.full_names().zip(&n.state))
            .collect()
    }

    /// The counts (batch norm's `num_batches_tracked`) by full name, as integers.
    pub fn counts(&self) -> Result<Vec<(String, u32)>> {
        self.all_state()
            .into_iter()
            .filter(|(name, _)| self.is_counter(name))
            .map(|(name, value)| {
                let bits = value.to_array()?.iter().next().map_or(0, |v| v.to_bits());
                Ok((name, bits))
            })
            .collect()
    }

    /// Sets the count called `name` (e.g. `bn1.num_batches_tracked`).
    pub fn set_count(&mut self, name: &str, count: u32) -> Result<()> {
        if !self.is_counter(name) {
            return Err(Error::InvalidArgument {
                op: "graph",
                detail: format!("the model has no count named {name:?}"),
            });
        }
        let shape = self.state_slot(name)?.shape().to_vec();
        let bits = ArrayD::from_elem(IxDyn(&shape), f32::from_bits(count));
        self.set_state_raw(name, bits)
    }

    /// Whether the state tensor `name` is a count (see [`StateInit::counter`]).
    pub(crate) fn is_counter(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| {
            n.full_names()
                .zip(&n.counter)
                .any(|(full, &counter)| counter && full == name)
        })
    }

    /// The full names and shapes of every trainable tensor, frozen or not.
    pub(crate) fn trainable(&self) -> Vec<(String, Vec<usize>)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.full_names()
                    .zip(n.state.iter().zip(&n.trainable))
                    .filter(|(_, (_, trainable))| **trainable)
                    .map(|(name, (value, _))| (name, value.shape().to_vec()))
            })
            .collect()
    }

    /// Sets the training-step count (resuming a run: it seeds the dropout masks).
    pub(crate) fn set_steps(&mut self, step: u32) {
        self.step = step;
    }

    /// The gradient of each trainable tensor from the last backward, by full name.
    pub fn grads(&self) -> Vec<(String, Option<&Value>)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.full_names()
                    .zip(n.grads.iter().zip(&n.trainable))
                    .filter(|(_, (_, t))| **t)
                    .map(|(name, (g, _))| (name, g.as_ref()))
            })
            .collect()
    }

    /// Replaces the state tensor named `name` (same shape) with `value` from the host.
    pub fn set_state(&mut self, name: &str, value: ArrayD<f32>) -> Result<()> {
        if self.is_counter(name) {
            return Err(Error::InvalidArgument {
                op: "graph",
                detail: format!(
                    "{name:?} is a count, not a float tensor: set it with Graph::set_count"
                ),
            });
        }
        self.set_state_raw(name, value)
    }

    /// The state tensor called `name`.
    fn state_slot(&self, name: &str) -> Result<&Value> {
        self.all_state()
            .into_iter()
            .find(|(full, _)| full == name)
            .map(|(_, value)| value)
            .ok_or_else(|| Error::InvalidArgument {
                op: "graph",
                detail: format!("the model has no state tensor named {name:?}"),
            })
    }

    /// [`Graph::set_state`] for any state tensor, a count's bits included.
    pub(crate) fn set_state_raw(&mut self, name: &str, value: ArrayD<f32>) -> Result<()> {
        let (node, index) = self
            .nodes
            .iter()
            .enumerate()
            .find_map(|(i, n)| n.full_names().position(|full| full == name).map(|k| (i, k)))
            .ok_or_else(|| Error::InvalidArgument {
                op: "graph",
                detail: format!("the model has no state tensor named {name:?}"),
            })?;
        let slot = &mut self.nodes[node].state[index];
        if slot.shape() != value.shape() {
            return Err(Error::ShapeMismatch {
                op: "graph",
                shapes: vec![slot.shape().to_vec(), value.shape().to_vec()],
                detail: format!(
                    "{name:?} is {:?} in the model, the new value is {:?}",
                    slot.shape(),
                    value.shape()
                ),
            });
        }
        *slot = self.device.upload(value)?;
        self.folded.clear();
        Ok(())
    }

    /// Per node, in order: its name, its layer's description, its output shape in the last
    /// forward pass (if that value is still held), and its trainable and other state sizes.
    pub(crate) fn layer_rows(&self) -> Vec<LayerRow> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                // Counts (num_batches_tracked) are not parameters: left out.
                let sizes = node
                    .state
                    .iter()
                    .zip(&node.trainable)
                    .zip(&node.counter)
                    .filter(|(_, counter)| !**counter)
                    .map(|(pair, _)| pair);
                // Frozen parameters count as other state, like running statistics.
                let count = |trained: bool| -> usize {
                    sizes
                        .clone()
                        .filter(|(_, t)| (**t && !node.frozen) == trained)
                        .map(|(s, _)| s.shape().iter().product::<usize>())
                        .sum()
                };
                LayerRow {
                    name: node.name.clone(),
                    layer: node.layer.describe(),
                    output: self
                        .values
                        .get(i + 1)
                        .and_then(Option::as_ref)
                        .map(|v| v.shape().to_vec())
                        .or_else(|| node.planned_shape.clone()),
                    trainable: count(true),
                    other: count(false),
                }
            })
            .collect()
    }

    /// Total number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.nodes
            .iter()
            .flat_map(|n| n.state.iter().zip(&n.trainable))
            .filter(|(_, t)| **t)
            .map(|(s, _)| s.shape().iter().product::<usize>())
            .sum()
    }

    /// An optimizer for this model's device.
    pub fn optimizer(&self, rule: impl Into<Optimizer>) -> Result<GraphOptimizer> {
        GraphOptimizer::new(&self.device, rule)
    }

    /// With [`Graph::set_check_finite`] on, checks `value` (e.g. the loss) with the
    /// step's outputs and gradients, before the update.
    pub fn check_finite_value(&mut self, label: &str, value: &Value) -> Result<()> {
        match &mut self.finite {
            Some(checks) => checks.check(|| label.to_string(), value),
            None => Ok(()),
        }
    }

    /// Clips the gradients of the last backward pass (of every trainable, unfrozen tensor)
    /// in place to a global norm of at most `max_norm`, as PyTorch's `clip_grad_norm_`, and
    /// returns their norm before clipping (`[1]`, on the model's device, not read back).
    pub fn clip_grad_norm(&mut self, max_norm: f32) -> Result<Value> {
        let mut grads: Vec<&mut Value> = self
            .nodes
            .iter_mut()
            .filter(|n| !n.frozen)
            .flat_map(|n| n.grads.iter_mut().zip(&n.trainable))
            .filter_map(|(grad, &trainable)| grad.as_mut().filter(|_| trainable))
            .collect();
        if grads.is_empty() {
            return Err(Error::InvalidArgument {
                op: "clip_grad_norm",
                detail: "no gradients: run forward(Mode::Train) and backward first".into(),
            });
        }
        Value::clip_grad_norm(&mut grads, max_norm)
    }

    /// The gradients' global norm before the last update clipped them (with
    /// [`GraphOptimizer::set_max_grad_norm`]), on the model's device.
    pub fn last_grad_norm(&self) -> Option<&Value> {
        self.grad_norm.as_ref()
    }

    /// Applies one optimizer step to every trainable, unfrozen tensor from its gradient,
    /// first clipping the gradients where the optimizer says so
    /// ([`GraphOptimizer::set_max_grad_norm`]). With [`Graph::set_check_finite`] on, a
    /// non-finite output, loss or gradient of this step is an [`Error::NonFinite`] and
    /// nothing is updated.
    pub fn update(&mut self, optimizer: &mut GraphOptimizer) -> Result<()> {
        if let Some(checks) = &self.finite
            && let Some(what) = checks.first_failure()?
        {
            return Err(Error::NonFinite {
                what: what.to_string(),
                step: self.step,
                update_skipped: true,
            });
        }
        self.grad_norm = match optimizer.max_grad_norm() {
            Some(max_norm) => Some(self.clip_grad_norm(max_norm)?),
            None => None,
        };
        self.folded.clear();
        let mut params = Vec::new();
        let mut grads = Vec::new();
        let mut param_names = Vec::new();
        for node in self.nodes.iter_mut().filter(|n| !n.frozen) {
            let names = node.full_names().collect::<Vec<_>>();
            for (((value, grad), &trainable), name) in node
                .state
                .iter_mut()
                .zip(&node.grads)
                .zip(&node.trainable)
                .zip(names)
            {
                if !trainable {
                    continue;
                }
                let grad = grad.as_ref().ok_or_else(|| Error::InvalidArgument {
                    op: "graph update",
                    detail: format!(
                        "{name} has no gradient: run forward(Mode::Train) and backward first"
                    ),
                })?;
                params.push(value);
                grads.push(grad);
                param_names.push(name);
            }
        }
        // The optimizer keys its state by these names: freezing, unfreezing or replacing a
        // layer keeps every other parameter's state with it.
        optimizer.forget(&std::mem::take(&mut self.replaced));
        let names: Vec<&str> = param_names.iter().map(String::as_str).collect();
        optimizer.step_values(&names, &mut params, &grads)?;
        if let Some(checks) = &mut self.finite {
            for (name, value) in trained_values(&self.nodes) {
                checks.check(|| format!("{name} after the optimizer step"), value)?;
            }
        }
        Ok(())
    }
}

/// The tensors an update trains, by full name, in its order: the trainable state of the
/// nodes that are not frozen.
fn trained_values(nodes: &[Node]) -> impl Iterator<Item = (String, &Value)> + '_ {
    nodes.iter().filter(|n| !n.frozen).flat_map(|n| {
        n.full_names()
            .zip(n.state.iter().zip(&n.trainable))
            .filter(|(_, (_, trainable))| **trainable)
            .map(|(name, (value, _))| (name, value))
    })
}

/// The activation a node applied last in place of the activation node it absorbed, if any.
fn output_activation(absorbed: Option<Absorbed>) -> Activation {
    absorbed.map_or(Activation::None, |a| a.activation)
}

/// The value node `i`'s output is: its own, or that of the activation node it absorbed.
fn output_of(i: usize, absorbed: Option<Absorbed>) -> ValueId {
    absorbed.map_or(i + 1, |a| a.node + 1)
}

fn no_forward_pass() -> Error {
    Error::InvalidArgument {
        op: "graph",
        detail: "backward needs a forward pass in Mode::Train or Mode::EvalWithGrad first".into(),
    }
}

/// Where a backward pass starts: the gradient at the output, or the last node's gradients
/// already computed with the loss ([`Graph::backward_cross_entropy`]).
enum Start {
    Dy(Value),
    Head(Head),
}

/// What a fused loss head gives the backward pass: the last node's gradients and, where it
/// took the gradient through its input's producer's activation, that node and its bias
/// gradient.
struct Head {
    backward: Backward,
    producer: Option<(usize, Value)>,
}

fn freed(v: ValueId) -> Error {
    Error::InvalidArgument {
        op: "graph",
        detail: format!("value {v} is not available (freed, or no forward pass yet)"),
    }
}

/// A layer's shape error for an input of another shape than the model was built for: the
/// message starts with the input the model expects.
fn not_the_input_built_for(error: Error, expected: &[usize], given: &[usize]) -> Error {
    match error {
        Error::ShapeMismatch {
            op,
            mut shapes,
            detail,
        } => {
            let mut batch = vec![given.first().copied().unwrap_or(1)];
            batch.extend_from_slice(expected);
            shapes.insert(0, given.to_vec());
            shapes.insert(1, batch);
            Error::ShapeMismatch {
                op,
                shapes,
                detail: format!(
                    "the model expects input [N, {}], this input is {given:?} (resize or \
                     crop to that size); {detail}",
                    expected
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        other => other,
    }
}

/// A layer's forward error in node `name`, naming the input the model was built for when
/// the given one differs.
fn node_error(name: &str, error: Error, expected: Option<&[usize]>, given: &[usize]) -> Error {
    let error = in_node(name, error);
    match expected {
        Some(expected) if given.get(1..) != Some(expected) => {
            not_the_input_built_for(error, expected, given)
        }
        _ => error,
    }
}

pub(crate) fn in_node(name: &str, error: Error) -> Error {
    match error {
        Error::ShapeMismatch { op, shapes, detail } => Error::ShapeMismatch {
            op,
            shapes,
            detail: format!("in node {name:?}: {detail}"),
        },
        Error::InvalidArgument { op, detail } => Error::InvalidArgument {
            op,
            detail: format!("in node {name:?}: {detail}"),
        },
        Error::TooLarge {
            what,
            bytes,
            limit_name,
            limit,
            adapter,
        } => Error::TooLarge {
            what: format!("{what} in node {name:?}"),
            bytes,
            limit_name,
            limit,
            adapter,
        },
        other => other,
    }
}
