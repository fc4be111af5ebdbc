//! Elementwise addition (`shaders/add.wgsl`): residual sums (with the activation after them
//! applied in the same pass), their gradient, and the gradient of a value that feeds several
//! nodes (the executor accumulates their contributions in place).

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, Zip};

use crate::error::{Error, Result};
use crate::gpu::shared::elementwise_workgroups;
use crate::tensor::Tensor;
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

fn launch(entry: &'static str, activation: Activation, tensors: &[(u32, &Tensor)]) -> Result<()> {
    launch_with(entry, &[("ACT", activation.code())], activation, tensors)
}

/// [`launch`] with the entry's override constants.
fn launch_with(
    entry: &'static str,
    constants: &[(&str, u32)],
    activation: Activation,
    tensors: &[(u32, &Tensor)],
) -> Result<()> {
    let gpu = tensors[0].1.gpu();
    for (_, t) in tensors {
        t.check_same_gpu(OP, gpu)?;
    }
    let vec4s = tensors[0].1.len().div_ceil(4);
    let params = AddParams {
        total: vec4s as u32,
        slope: activation.slope(),
        _pad: [0; 2],
    };
    let source = || {
        [
            include_str!("../../shaders/epilogue.wgsl"),
            include_str!("../../shaders/add.wgsl"),
        ]
        .concat()
    };
    let pipeline = gpu.specialized("add", entry, source, constants)?;
    let bindings: Vec<_> = tensors
        .iter()
        .map(|(n, t)| (*n, t.binding_vec4()))
        .collect();
    gpu.run_pass(entry, |pass| {
        gpu.encode_at(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &bindings,
            elementwise_workgroups(vec4s as u64),
        )
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
    launch("add", activation, &[(1, a), (2, &out), (3, b)])?;
    Ok(out)
}

/// `dst += src` on the GPU, in place.
pub fn accumulate(dst: &Tensor, src: &Tensor) -> Result<()> {
    same_shape(dst.shape(), src.shape())?;
    launch("accumulate", Activation::None, &[(1, src), (2, dst)])
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
    let parts = if more.is_some() { 2 } else { 1 };
    launch_with(
        "backward",
        &[("ACT", activation.code()), ("PARTS", parts)],
        activation,
        &[
            (1, y),
            (2, &grads[0]),
            (3, dy),
            (4, more.unwrap_or(dy)),
            (5, &grads[1]),
        ],
    )?;
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
