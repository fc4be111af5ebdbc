//! Activations: relu, leaky relu, sigmoid, tanh, relu6 (elementwise) and softmax (over the last
//! axis), forward and backward (`shaders/activation.wgsl`), with CPU references.

use bytemuck::{Pod, Zeroable};
use ndarray::{ArrayD, ArrayViewD, Axis, Zip};

use super::rows::{RowKernel, row_kernel};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::dispatch::Binding;
use crate::gpu::shared::{elementwise_workgroups, workgroups};
use crate::tensor::Tensor;
use crate::value::{Activation, Value};

/// Mirrors `Params` in shaders/activation.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ActivationParams {
    total: u32,
    _pad: u32,
    slope: f32,
    row: u32,
}

fn same_shapes(op: &'static str, tensors: &[&Tensor]) -> Result<()> {
    let gpu = tensors[0].gpu();
    for t in tensors {
        t.check_same_gpu(op, gpu)?;
        if t.shape() != tensors[0].shape() {
            return Err(Error::ShapeMismatch {
                op,
                shapes: vec![tensors[0].shape().to_vec(), t.shape().to_vec()],
                detail: format!(
                    "{:?} and {:?} must have the same shape",
                    tensors[0].shape(),
                    t.shape()
                ),
            });
        }
    }
    Ok(())
}

/// An elementwise kernel (`forward`, `backward`) of `activation` over whole vec4s:
/// `params.total` counts elements and the tensors are bound from binding `first` on.
fn launch_elementwise(
    activation: Activation,
    entry: &str,
    mut params: ActivationParams,
    first: u32,
    tensors: &[&Tensor],
) -> Result<()> {
    let gpu = tensors[0].gpu();
    params.total = params.total.div_ceil(4);
    let bindings: Vec<_> = (first..)
        .zip(tensors.iter().map(|t| t.binding_vec4()))
        .collect();
    let groups = elementwise_workgroups(u64::from(params.total));
    let constants = [("ACT", activation.code())];
    launch(gpu, entry, params, &bindings, groups, &constants)
}

/// A softmax kernel reading each row `passes` times: one invocation per row
/// (`params.total` rows), or its `_wide` twin (one workgroup per row) where that would pass
/// the loop bound.
fn launch_rows(
    gpu: &Gpu,
    (entry, passes): (&'static str, usize),
    params: ActivationParams,
    first: u32,
    tensors: &[&Tensor],
) -> Result<()> {
    let bindings: Vec<_> = (first..).zip(tensors.iter().map(|t| t.binding())).collect();
    let rows = u64::from(params.total);
    match row_kernel(entry, params.row as usize, passes)? {
        RowKernel::PerInvocation => launch(gpu, entry, params, &bindings, workgroups(rows), &[]),
        RowKernel::PerWorkgroup => {
            launch(gpu, &format!("{entry}_wide"), params, &bindings, rows, &[])
        }
    }
}

fn launch(
    gpu: &Gpu,
    entry: &str,
    params: ActivationParams,
    bindings: &[(u32, Binding<'_>)],
    groups: u64,
    constants: &[(&str, u32)],
) -> Result<()> {
    let source = || {
        [
            include_str!("../../shaders/epilogue.wgsl"),
            include_str!("../../shaders/rows.wgsl"),
            include_str!("../../shaders/activation.wgsl"),
        ]
        .concat()
    };
    let pipeline = gpu.specialized("activation", entry, source, constants)?;
    gpu.run_pass(entry, |pass| {
        gpu.encode_at(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            bindings,
            groups,
        )
    })
}

impl Activation {
    fn params(self, total: usize, row: usize) -> ActivationParams {
        ActivationParams {
            total: total as u32,
            _pad: 0,
            slope: self.slope(),
            row: row as u32,
        }
    }

    /// `act(x)` elementwise on the GPU.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        let y = Tensor::uninit(x.gpu(), x.shape())?;
        launch_elementwise(self, "forward", self.params(x.len(), 1), 7, &[x, &y])?;
        Ok(y)
    }

    /// `dx = dy · act'(x)`, given the forward input `x` and output `y`.
    pub fn backward(self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        same_shapes("activation backward", &[x, y, dy])?;
        let dx = Tensor::uninit(x.gpu(), x.shape())?;
        launch_elementwise(
            self,
            "backward",
            self.params(x.len(), 1),
            9,
            &[x, y, dy, &dx],
        )?;
        Ok(dx)
    }
}

fn rows(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.split_last() {
        Some((&row, rest)) if row > 0 => Ok((rest.iter().product(), row)),
        _ => Err(Error::ShapeMismatch {
            op,
            shapes: vec![shape.to_vec()],
            detail: format!("softmax needs at least one axis, got {shape:?}"),
        }),
    }
}

impl Value {
    /// `act(x)` elementwise, on this value's device.
    pub fn activate(&self, activation: Activation) -> Result<Value> {
        self.map(
            |x| activation.forward(x),
            |x| Ok(x.mapv(|v| activation.apply(v))),
        )
    }

    /// `dx = dy · act'(x)` from this forward input `x` and the forward output `y`.
    pub fn activation_backward(
        &self,
        activation: Activation,
        y: &Value,
        dy: &Value,
    ) -> Result<Value> {
        self.map(
            |x| activation.backward(x, y.gpu()?, dy.gpu()?),
            |x| activation_backward_cpu(activation, &x.view(), &y.cpu()?.view(), &dy.cpu()?.view()),
        )
    }

    /// Softmax over the last axis, on this value's device.
    pub fn softmax(&self) -> Result<Value> {
        self.map(softmax, |x| softmax_cpu(&x.view()))
    }
}

/// CPU reference of [`Activation::backward`]: `dy · act'(x)` elementwise.
pub fn activation_backward_cpu(
    activation: Activation,
    x: &ArrayViewD<'_, f32>,
    y: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    if x.shape() != y.shape() || x.shape() != dy.shape() {
        return Err(Error::ShapeMismatch {
            op: "activation backward",
            shapes: vec![x.shape().to_vec(), y.shape().to_vec(), dy.shape().to_vec()],
            detail: format!(
                "x {:?}, y {:?} and dy {:?} must have the same shape",
                x.shape(),
                y.shape(),
                dy.shape()
            ),
        });
    }
    let mut dx = dy.to_owned();
    Zip::from(&mut dx)
        .and(x)
        .and(y)
        .for_each(|d, &x, &y| *d *= activation.derivative(x, y));
    Ok(dx)
}

/// `∂L/∂(pre-activation)` from an activation's output `y` and `dy = ∂L/∂y`, on the CPU:
/// every supported activation's derivative can be read from its output (ReLU and leaky
/// ReLU with a slope ≥ 0 are positive exactly where their input is), which is how layers
/// with a fused activation take its gradient without keeping the input.
pub(crate) fn through_activation_cpu(
    activation: Activation,
    y: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    activation_backward_cpu(activation, y, y, dy)
}

/// Softmax over the last axis on the GPU, stable (the row maximum is subtracted first).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let (count, row) = rows("softmax", x.shape())?;
    let y = Tensor::uninit(x.gpu(), x.shape())?;
    launch_rows(
        x.gpu(),
        ("softmax", 3),
        Activation::None.params(count, row),
        1,
        &[x, &y],
    )?;
    Ok(y)
}

/// Backward of [`softmax`] from its output: `dx = y ⊙ (dy − Σ dy ⊙ y)` per row.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    same_shapes("softmax backward", &[y, dy])?;
    let (count, row) = rows("softmax", y.shape())?;
    let dx = Tensor::uninit(y.gpu(), y.shape())?;
    launch_rows(
        y.gpu(),
        ("softmax_backward", 2),
        Activation::None.params(count, row),
        4,
        &[y, dy, &dx],
    )?;
    Ok(dx)
}

/// CPU reference of [`softmax`].
pub fn softmax_cpu(x: &ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
    rows("softmax", x.shape())?;
    let mut y = x.to_owned();
    for mut row in y.lanes_mut(Axis(x.ndim() - 1)) {
        let top = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - top).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    Ok(y)
}

/// CPU reference of [`softmax_backward`].
pub fn softmax_backward_cpu(
    y: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    rows("softmax", y.shape())?;
    if y.shape() != dy.shape() {
        return Err(Error::ShapeMismatch {
            op: "softmax backward",
            shapes: vec![y.shape().to_vec(), dy.shape().to_vec()],
            detail: format!("{:?} and {:?} differ", y.shape(), dy.shape()),
        });
    }
    let axis = Axis(y.ndim() - 1);
    let mut dx = ArrayD::zeros(y.raw_dim());
    for ((mut out, y), dy) in dx
        .lanes_mut(axis)
        .into_iter()
        .zip(y.lanes(axis))
        .zip(dy.lanes(axis))
    {
        let dot: f32 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        for ((o, &yv), &g) in out.iter_mut().zip(&y).zip(&dy) {
            *o = yv * (g - dot);
        }
    }
    Ok(dx)
}
