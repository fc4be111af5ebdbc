//! The values the executor passes between layers, and the device they live on: the layer
//! below every op. An op's entry point on values (`Value::linear`, `Value::conv2d`, …, each
//! defined in the op's own file) runs its GPU kernel or its CPU reference for the values'
//! device, so layers and the executor never match on the device themselves.
//!
//! Also here, because the executor needs them and may not import an op: [`Activation`] (the
//! activation a layer applies last, handed on between layers) and the elementwise sum that
//! accumulates a value's gradients (`add.rs`).

mod activation;
pub mod add;

use ndarray::{ArrayD, Axis, concatenate};

pub use activation::Activation;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::Tensor;

/// A tensor on one of the two execution paths.
#[derive(Debug)]
pub enum Value {
    /// On the GPU.
    Gpu(Tensor),
    /// On the host, for the CPU reference path.
    Cpu(ArrayD<f32>),
}

impl From<Tensor> for Value {
    fn from(tensor: Tensor) -> Self {
        Value::Gpu(tensor)
    }
}

impl From<ArrayD<f32>> for Value {
    fn from(array: ArrayD<f32>) -> Self {
        Value::Cpu(array)
    }
}

impl Value {
    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Gpu(t) => t.shape(),
            Value::Cpu(a) => a.shape(),
        }
    }

    /// The data on the host (a readback for GPU values).
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        match self {
            Value::Gpu(t) => t.to_array(),
            Value::Cpu(a) => Ok(a.clone()),
        }
    }

    /// The value of a one-element value (a loss, a count), read back from the GPU if needed.
    pub fn scalar(&self) -> Result<f32> {
        match self {
            Value::Gpu(t) => t.scalar(),
            Value::Cpu(a) => crate::tensor::scalar_of(a),
        }
    }

    /// The GPU tensor; an error if this value lives on the CPU path.
    pub fn gpu(&self) -> Result<&Tensor> {
        match self {
            Value::Gpu(t) => Ok(t),
            Value::Cpu(_) => Err(mixed_devices()),
        }
    }

    /// The host array; an error if this value lives on the GPU.
    pub fn cpu(&self) -> Result<&ArrayD<f32>> {
        match self {
            Value::Cpu(a) => Ok(a),
            Value::Gpu(_) => Err(mixed_devices()),
        }
    }

    /// The host array, mutable; an error if this value lives on the GPU.
    pub(crate) fn cpu_mut(&mut self) -> Result<&mut ArrayD<f32>> {
        match self {
            Value::Cpu(a) => Ok(a),
            Value::Gpu(_) => Err(mixed_devices()),
        }
    }

    /// Runs `gpu` on the tensor or `cpu` on the array, whichever this value holds: the
    /// device dispatch of a one-input op.
    pub(crate) fn map(
        &self,
        gpu: impl FnOnce(&Tensor) -> Result<Tensor>,
        cpu: impl FnOnce(&ArrayD<f32>) -> Result<ArrayD<f32>>,
    ) -> Result<Value> {
        Ok(match self {
            Value::Gpu(t) => Value::Gpu(gpu(t)?),
            Value::Cpu(a) => Value::Cpu(cpu(a)?),
        })
    }

    /// A copy on the same device.
    pub fn duplicate(&self) -> Result<Value> {
        self.map(|t| t.copy_as(t.shape()), |a| Ok(a.clone()))
    }

    /// The same elements under `shape` (on the GPU the same buffer, see
    /// [`Tensor::reshaped`]); `op` names the caller in errors.
    pub fn reshaped(&self, op: &'static str, shape: &[usize]) -> Result<Value> {
        self.map(
            |t| t.reshaped(shape),
            |a| {
                Ok(a.to_shape(shape)
                    .map_err(|e| Error::ShapeMismatch {
                        op,
                        shapes: vec![a.shape().to_vec(), shape.to_vec()],
                        detail: format!("{:?} as {shape:?}: {e}", a.shape()),
                    })?
                    .into_owned())
            },
        )
    }

    /// `self` and `other` stacked along the first axis (two batches as one).
    pub fn concat(&self, other: &Value) -> Result<Value> {
        self.map(
            |t| Tensor::concat(t, other.gpu()?),
            |a| {
                concatenate(Axis(0), &[a.view(), other.cpu()?.view()]).map_err(|e| {
                    Error::ShapeMismatch {
                        op: "concat",
                        shapes: vec![a.shape().to_vec(), other.shape().to_vec()],
                        detail: format!("{:?} and {:?}: {e}", a.shape(), other.shape()),
                    }
                })
            },
        )
    }
}

/// The error for a GPU value meeting a CPU value in one op.
pub(crate) fn mixed_devices() -> Error {
    Error::InvalidArgument {
        op: "graph",
        detail: "a GPU value met a CPU value: upload every input with the model's Device".into(),
    }
}

/// Where a model's values live.
#[derive(Clone, Debug)]
pub enum Device {
    /// A GPU context: every op is a WGSL kernel.
    Gpu(Gpu),
    /// The CPU reference path (ndarray), for comparison and tests.
    Cpu,
}

impl Device {
    /// Puts a host array on this device.
    pub fn upload(&self, array: ArrayD<f32>) -> Result<Value> {
        match self {
            Device::Gpu(gpu) => Ok(Value::Gpu(Tensor::from_array(gpu, &array)?)),
            Device::Cpu => Ok(Value::Cpu(array)),
        }
    }

    /// The GPU context, or `None` on the CPU path.
    pub fn gpu(&self) -> Option<&Gpu> {
        match self {
            Device::Gpu(gpu) => Some(gpu),
            Device::Cpu => None,
        }
    }

    /// The adapter's name, or `"cpu reference"`.
    pub fn name(&self) -> String {
        match self {
            Device::Gpu(gpu) => gpu.adapter_info().name.clone(),
            Device::Cpu => "cpu reference".into(),
        }
    }

    /// Runs `step` as one recorded submission on a GPU, or plainly on the CPU.
    pub fn record<T>(&self, step: impl FnOnce() -> Result<T>) -> Result<T> {
        match self {
            Device::Gpu(gpu) => gpu.record(step),
            Device::Cpu => step(),
        }
    }
}
