//! Fully connected layer `y = act(x·Wᵀ + b)` in PyTorch's layout (`W` is `[out, in]`), as
//! the matmul with its fused epilogue; backward `dx = dy·W`, `dW = dyᵀ·x`, `db = Σ_n dy`.

use ndarray::{ArrayD, ArrayViewD, Axis};

use super::Activation;
use super::activation::through_activation_cpu;
use super::matmul::{BiasAxis, Matmul, matmul_cpu};
use super::reduce::{activation_backward_and_sum, sum_axes};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::value::Value;

const OP: &str = "linear";

/// The gradients of a linear layer.
#[derive(Debug)]
pub struct LinearGrads<T> {
    /// `∂L/∂x`, `[N, in]`.
    pub x: T,
    /// `∂L/∂W`, `[out, in]`.
    pub weight: T,
    /// `∂L/∂b`, `[out]`.
    pub bias: T,
}

fn check(x: &[usize], weight: &[usize]) -> Result<(usize, usize, usize)> {
    match (x, weight) {
        (&[n, i], &[o, i_w]) if i == i_w => Ok((n, i, o)),
        _ => Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![x.to_vec(), weight.to_vec()],
            detail: format!("x must be [N, in] and weight [out, in]; got {x:?} and {weight:?}"),
        }),
    }
}

fn forward_spec(bias: bool, activation: Activation) -> Matmul {
    Matmul {
        trans_b: true,
        bias: if bias {
            BiasAxis::PerColumn
        } else {
            BiasAxis::None
        },
        activation,
        ..Matmul::default()
    }
}

/// `act(x·Wᵀ + b)` on the GPU.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
) -> Result<Tensor> {
    check(x.shape(), weight.shape())?;
    forward_spec(bias.is_some(), activation).forward(x, weight, bias)
}

/// Gradients of `L` from `dy = ∂L/∂y` (taken before any activation).
pub fn linear_backward(x: &Tensor, weight: &Tensor, dy: &Tensor) -> Result<LinearGrads<Tensor>> {
    linear_gradients(x, weight, dy, None)
}

/// [`linear_backward`] with `dbias` given when the caller has it already (fused with the
/// activation's backward, see `nn::Linear`).
pub(crate) fn linear_gradients(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    dbias: Option<Tensor>,
) -> Result<LinearGrads<Tensor>> {
    let (n, _, o) = check(x.shape(), weight.shape())?;
    if dy.shape() != [n, o] || dbias.as_ref().is_some_and(|b| b.shape() != [o]) {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![dy.shape().to_vec(), vec![n, o]],
            detail: format!(
                "dy is {:?} and dbias {:?}; the output is [{n}, {o}]",
                dy.shape(),
                dbias.as_ref().map(Tensor::shape)
            ),
        });
    }
    let dx = Matmul::default().forward(dy, weight, None)?;
    let dweight = Matmul {
        trans_a: true,
        ..Matmul::default()
    }
    .forward(dy, x, None)?;
    let dbias = match dbias {
        Some(dbias) => dbias,
        None => {
            let dbias = Tensor::uninit(x.gpu(), &[o])?;
            sum_axes(x.gpu(), dy, (n, o, 1), &dbias, 1.0, false)?;
            dbias
        }
    };
    Ok(LinearGrads {
        x: dx,
        weight: dweight,
        bias: dbias,
    })
}

impl Value {
    /// `act(x·Wᵀ + b)` of this `[N, in]` input, on its device.
    pub fn linear(
        &self,
        weight: &Value,
        bias: Option<&Value>,
        activation: Activation,
    ) -> Result<Value> {
        self.map(
            |x| {
                linear(
                    x,
                    weight.gpu()?,
                    bias.map(Value::gpu).transpose()?,
                    activation,
                )
            },
            |x| {
                let bias = bias.map(|b| b.cpu().map(|b| b.view())).transpose()?;
                linear_cpu(&x.view(), &weight.cpu()?.view(), bias.as_ref(), activation)
            },
        )
    }

    /// The gradients of `y = act(x·Wᵀ + b)` (this value is `x`) from `dy = ∂L/∂y` and the
    /// output `y`: the gradient goes through the activation first. On the GPU the
    /// activation's derivative and the bias gradient are one kernel.
    pub fn linear_backward(
        &self,
        weight: &Value,
        y: &Value,
        dy: &Value,
        activation: Activation,
    ) -> Result<LinearGrads<Value>> {
        let grads = match self {
            Value::Gpu(x) => {
                let (weight, dy) = (weight.gpu()?, dy.gpu()?);
                let g = match dy.shape() {
                    &[n, o] if activation != Activation::None => {
                        let (dz, dbias) =
                            activation_backward_and_sum(activation, y.gpu()?, dy, (n, o, 1))?;
                        linear_gradients(x, weight, &dz, Some(dbias))?
                    }
                    _ => linear_gradients(x, weight, dy, None)?,
                };
                LinearGrads {
                    x: g.x.into(),
                    weight: g.weight.into(),
                    bias: g.bias.into(),
                }
            }
            Value::Cpu(x) => {
                let dz = through_activation_cpu(activation, &y.cpu()?.view(), &dy.cpu()?.view())?;
                let g = linear_backward_cpu(&x.view(), &weight.cpu()?.view(), &dz.view())?;
                LinearGrads {
                    x: g.x.into(),
                    weight: g.weight.into(),
                    bias: g.bias.into(),
                }
            }
        };
        Ok(grads)
    }

    /// [`Value::linear_backward`] of a `dy` already through the activation, its bias
    /// gradient `dbias` (`Σ` of `dy` over the batch) computed with it: a fused loss head's.
    pub(crate) fn linear_backward_summed(
        &self,
        weight: &Value,
        dy: &Value,
        dbias: &Value,
    ) -> Result<LinearGrads<Value>> {
        let Value::Gpu(x) = self else {
            return self.linear_backward(weight, dy, dy, Activation::None);
        };
        let dbias = dbias.gpu()?;
        let g = linear_gradients(
            x,
            weight.gpu()?,
            dy.gpu()?,
            Some(dbias.reshaped(dbias.shape())?),
        )?;
        Ok(LinearGrads {
            x: g.x.into(),
            weight: g.weight.into(),
            bias: g.bias.into(),
        })
    }
}

/// CPU reference of [`linear`].
pub fn linear_cpu(
    x: &ArrayViewD<'_, f32>,
    weight: &ArrayViewD<'_, f32>,
    bias: Option<&ArrayViewD<'_, f32>>,
    activation: Activation,
) -> Result<ArrayD<f32>> {
    check(x.shape(), weight.shape())?;
    matmul_cpu(&forward_spec(bias.is_some(), activation), x, weight, bias)
}

/// CPU reference of [`linear_backward`].
pub fn linear_backward_cpu(
    x: &ArrayViewD<'_, f32>,
    weight: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
) -> Result<LinearGrads<ArrayD<f32>>> {
    let (n, _, o) = check(x.shape(), weight.shape())?;
    if dy.shape() != [n, o] {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![dy.shape().to_vec(), vec![n, o]],
            detail: format!("dy is {:?}, the output is [{n}, {o}]", dy.shape()),
        });
    }
    Ok(LinearGrads {
        x: matmul_cpu(&Matmul::default(), dy, weight, None)?,
        weight: matmul_cpu(
            &Matmul {
                trans_a: true,
                ..Matmul::default()
            },
            dy,
            x,
            None,
        )?,
        bias: dy.sum_axis(Axis(0)),
    })
}
