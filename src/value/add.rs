//! Elementwise addition (`shaders/add.wgsl`): residual sums (with the activation after them
//! applied in the same pass), their gradient, and the gradient of a value that feeds several
//! nodes (the executor accumulates their contributions in place).

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, Zip};

use crate::error::{Error, Result};
use crate::gpu::dispatch::Resource;
use crate::gpu::shared::elementwise_workgroups;
use crate::gpu::texture::{Texel, TextureInputs, vec4_input};
use crate::gpu::{Commands, Generated};
use crate::tensor::{Tensor, gpu_word};
use crate::value::{Activation, Value};

const OP: &str = "add";

/// Mirrors `Params` in shaders/add.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AddParams {
    total: u32,
    slope: f32,
    _pad: [u32; 2],
}

fn same_shape(a: &[usize], b: &[usize]) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![a.to_vec(), b.to_vec()],
            detail: format!("cannot add {a:?} and {b:?}: the shapes must be equal"),
        })
    }
}

/// The elementwise-sum kernels' inputs by binding: a, b and more (`load_a` and its kin).
const INPUTS: [(u32, &str); 3] = [(1, "a"), (3, "b"), (4, "more")];

/// The generated elementwise-sum kernels: everything their source depends on.
#[derive(Debug)]
struct AddKernel {
    /// The inputs read through textures.
    textures: bool,
}

impl Generated for AddKernel {
    fn source(&self) -> String {
        let inputs: String = INPUTS
            .iter()
            .map(|&(binding, name)| vec4_input(name, binding, self.textures))
            .collect();
        [
            include_str!("../../shaders/epilogue.wgsl"),
            &inputs,
            include_str!("../../shaders/add.wgsl"),
        ]
        .concat()
    }
}

/// What an entry reads, by binding number: its first input, the others, and the inputs it
/// declares but does not read under its constants (bound to the first).
struct Inputs<'a, 's> {
    first: (u32, &'a Tensor),
    rest: &'s [(u32, &'a Tensor)],
    unread: &'s [u32],
}

/// Records `entry` with its override constants: it reads `inputs` and writes `out`
/// (binding 2) and `out2` (5).
fn launch<'a>(
    entry: &'static str,
    constants: &[(&str, u32)],
    activation: Activation,
    Inputs {
        first,
        rest,
        unread,
    }: Inputs<'a, '_>,
    (out, out2): (&'a Tensor, Option<&'a Tensor>),
) -> Result<()> {
    let gpu = out.gpu();
    let inputs: Vec<_> = std::iter::once(first).chain(rest.iter().copied()).collect();
    let outputs: Vec<_> = std::iter::once((2, out))
        .chain(out2.map(|t| (5, t)))
        .collect();
    for (_, t) in inputs.iter().chain(&outputs) {
        t.check_same_gpu(OP, gpu)?;
    }
    let vec4s = out.len().div_ceil(4);
    let params = AddParams {
        total: gpu_word(OP, vec4s)?,
        slope: activation.slope(),
        _pad: [0; 2],
    };
    let read = TextureInputs::new(inputs.iter().copied(), Texel::Vec4)?;
    let kernel = AddKernel {
        textures: read.textures(),
    };
    let pipeline = gpu.generated(&kernel, entry, constants)?;
    let input = |binding: u32, t: &'a Tensor| match read.view(binding) {
        Some(view) => Resource::Texture(view),
        None => Resource::Buffer(t.binding_vec4()),
    };
    let first = input(first.0, first.1);
    let resources: Vec<_> = inputs
        .iter()
        .map(|&(binding, t)| (binding, input(binding, t)))
        .chain(unread.iter().map(|&binding| (binding, first)))
        .chain(
            outputs
                .iter()
                .map(|&(binding, t)| (binding, Resource::Buffer(t.binding_vec4()))),
        )
        .collect();
    let copies = |commands: &mut Commands<'_>| {
        read.copy(commands);
        Ok(())
    };
    gpu.run_pass_after(entry, copies, |pass| {
        let params = bytemuck::bytes_of(&params);
        let groups = elementwise_workgroups(vec4s as u64);
        gpu.encode_resources(pass, &pipeline, params, &resources, groups)
    })
}

/// `a + b` on the GPU.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_activated(a, b, Activation::None)
}

/// `act(a + b)` on the GPU, in one pass.
pub fn add_activated(a: &Tensor, b: &Tensor, activation: Activation) -> Result<Tensor> {
    same_shape(a.shape(), b.shape())?;
    let out = Tensor::uninit(a.gpu(), a.shape())?;
    let constants = [("ACT", activation.code())];
    let inputs = Inputs {
        first: (1, a),
        rest: &[(3, b)],
        unread: &[],
    };
    launch("add", &constants, activation, inputs, (&out, None))?;
    Ok(out)
}

/// `dst += src` on the GPU, in place.
pub fn accumulate(dst: &Tensor, src: &Tensor) -> Result<()> {
    same_shape(dst.shape(), src.shape())?;
    let inputs = Inputs {
        first: (1, src),
        rest: &[],
        unread: &[],
    };
    launch("accumulate", &[], Activation::None, inputs, (dst, None))
}

/// The gradients of `act(a + b)` for `a` and for `b` on the GPU, in one pass: each is
/// `act'(y)·(dy + more)`, read from the forward output `y`; `more` is a second part of
/// `∂L/∂y` not yet added to `dy` (see `Layer::sums_output_gradients`).
pub fn add_backward(
    y: &Tensor,
    dy: &Tensor,
    more: Option<&Tensor>,
    activation: Activation,
) -> Result<[Tensor; 2]> {
    for t in [Some(dy), more].into_iter().flatten() {
        same_shape(y.shape(), t.shape())?;
    }
    let grads = [
        Tensor::uninit(y.gpu(), y.shape())?,
        Tensor::uninit(y.gpu(), y.shape())?,
    ];
    // dy is read, y only through an activation, `more` only where given.
    let mut rest = vec![];
    let mut unread = vec![];
    match activation {
        Activation::None => unread.push(1),
        _ => rest.push((1, y)),
    }
    match more {
        Some(more) => rest.push((4, more)),
        None => unread.push(4),
    }
    let constants = [
        ("ACT", activation.code()),
        ("PARTS", 1 + u32::from(more.is_some())),
    ];
    let inputs = Inputs {
        first: (3, dy),
        rest: &rest,
        unread: &unread,
    };
    let outputs = (&grads[0], Some(&grads[1]));
    launch("backward", &constants, activation, inputs, outputs)?;
    Ok(grads)
}

/// CPU reference of [`add_backward`] (the gradient both inputs get).
pub fn add_backward_cpu(
    y: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
    more: Option<&ArrayViewD<'_, f32>>,
    activation: Activation,
) -> Result<ArrayD<f32>> {
    same_shape(y.shape(), dy.shape())?;
    let mut dz = match more {
        Some(more) => add_cpu(dy, more)?,
        None => dy.to_owned(),
    };
    // Every activation's derivative read from its output, as the GPU kernel does.
    Zip::from(&mut dz)
        .and(y)
        .for_each(|d, &y| *d *= activation.derivative(y, y));
    Ok(dz)
}

/// CPU reference of [`add`].
pub fn add_cpu(a: &ArrayViewD<'_, f32>, b: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
    same_shape(a.shape(), b.shape())?;
    Ok(a + b)
}

impl Value {
    /// `self + other`, on this value's device.
    pub fn add(&self, other: &Value) -> Result<Value> {
        self.add_activated(other, Activation::None)
    }

    /// `act(self + other)`, on this value's device.
    pub fn add_activated(&self, other: &Value, activation: Activation) -> Result<Value> {
        self.map(
            |a| add_activated(a, other.gpu()?, activation),
            |a| Ok(add_cpu(&a.view(), &other.cpu()?.view())?.mapv(|v| activation.apply(v))),
        )
    }

    /// [`add_backward`] on this value's device, `self` being the forward output.
    pub(crate) fn add_backward(
        &self,
        dy: &Value,
        more: Option<&Value>,
        activation: Activation,
    ) -> Result<[Value; 2]> {
        Ok(match self {
            Value::Gpu(y) => {
                let more = more.map(Value::gpu).transpose()?;
                add_backward(y, dy.gpu()?, more, activation)?.map(Value::Gpu)
            }
            Value::Cpu(y) => {
                let more = more.map(|m| Ok::<_, Error>(m.cpu()?.view())).transpose()?;
                let dz = add_backward_cpu(&y.view(), &dy.cpu()?.view(), more.as_ref(), activation)?;
                [Value::Cpu(dz.clone()), Value::Cpu(dz)]
            }
        })
    }

    /// `self += other`, in place on this value's device: the executor sums the gradients
    /// of a value that feeds several nodes with it.
    pub fn accumulate(&mut self, other: &Value) -> Result<()> {
        match self {
            Value::Gpu(t) => accumulate(t, other.gpu()?),
            Value::Cpu(a) => {
                *a = add_cpu(&a.view(), &other.cpu()?.view())?;
                Ok(())
            }
        }
    }
}
