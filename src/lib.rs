//! wgcnn: convolutional neural networks trained and run on any GPU through wgpu and WGSL.
//!
//! Start with [`Gpu::new`], upload arrays with [`Tensor::from_array`], run ops such as
//! [`ops::Matmul`], and read results back with [`Tensor::to_array`]. Models are built from
//! the layers in [`nn`]; [`prelude`] has the common imports. Every op also has a CPU
//! reference on ndarray in [`cpu`], used by the tests to check the GPU.
//!
//! ```
//! use ndarray::array;
//! use wgcnn::ops::{BiasAxis, Matmul};
//! use wgcnn::{Activation, Gpu, Tensor};
//!
//! # fn main() -> wgcnn::Result<()> {
//! let gpu = Gpu::new()?; // WGPU_BACKEND / WGPU_ADAPTER_NAME / WGPU_POWER_PREF pick the adapter
//! let x = Tensor::from_array(&gpu, &array![[1.0f32, 2.0], [3.0, 4.0]])?;
//! let w = Tensor::from_array(&gpu, &array![[5.0f32, 6.0], [7.0, 8.0]])?;
//! let b = Tensor::from_array(&gpu, &array![-20.0f32, 0.5])?;
//! // relu(x · w + b), the bias added per column, all in one kernel.
//! let spec = Matmul { bias: BiasAxis::PerColumn, activation: Activation::Relu, ..Matmul::default() };
//! let y = spec.forward(&x, &w, Some(&b))?.to_array()?;
//! assert_eq!(y.as_slice(), Some(&[0.0, 22.5, 23.0, 50.5][..]));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod atomic;
mod builder;
pub mod cpu;
pub mod data;
pub mod error;
pub mod gpu;
pub mod graph;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
mod summary;
pub mod tensor;
#[cfg(test)]
mod test_support;
pub mod train;
pub mod value;

pub use builder::{GraphBuilder, ValueRef};
pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions, PoolStats};
pub use graph::{Graph, Layer, Mode};
/// The ndarray version wgcnn takes and returns arrays of: build inputs and read outputs
/// with it, no separate dependency needed.
pub use ndarray;
// Shared by ops and layers; the op settings themselves are in `ops`, the layers in `nn`.
pub use ops::{Activation, Normalize, Padding};
pub use optim::{CpuOptimizer, GpuOptimizer, Optimizer, OptimizerState, ParamGroup};
pub use summary::Summary;
pub use tensor::Tensor;
pub use value::{Device, Value};
/// The wgpu version wgcnn is built on, for `GpuOptions::backends` and adapter info.
pub use wgpu;

/// The common imports for building, training and running a model: the layers (the op
/// settings of the same names stay in [`ops`]), the training and inference entry points,
/// data and device types, and ndarray.
///
/// ```
/// use wgcnn::prelude::*;
///
/// # fn main() -> wgcnn::Result<()> {
/// let model = Sequential::new()
///     .add("conv", Conv2d::new(1, 4, (3, 3)).activation(Activation::Relu))
///     .add("pool", max_pool2d(2))
///     .add("flatten", Flatten)
///     .add("fc", Linear::new(4 * 3 * 3, 10));
/// let mut model = model.build(Device::Cpu, 7)?; // or Device::Gpu(Gpu::new()?)
/// let images = Array4::<f32>::zeros((2, 1, 8, 8)).into_dyn();
/// let predictions = model.predict(&images)?;
/// assert_eq!(predictions.classes.len(), 2);
/// # Ok(())
/// # }
/// ```
pub mod prelude {
    pub use crate::data::{
        Augmentation, Batch, Cifar10, Dataset, Images, Loader, LoaderOptions, Mnist, Pixels,
        shuffled_indices,
    };
    pub use crate::ndarray::{self, Array1, Array2, Array4, ArrayD, IxDyn};
    pub use crate::nn::{
        AdaptiveAvgPool2d, Add, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool, Init,
        LayerNorm, LeNetOptions, Linear, Sequential, avg_pool2d, leaky_relu, lenet5, max_pool2d,
        relu, relu6, sigmoid, tanh,
    };
    pub use crate::train::{
        Checkpoint, Predictions, StepOutput, evaluate, evaluate_on, image_batch, label_batch,
        train_epoch, train_epoch_on, train_step,
    };
    pub use crate::{
        Activation, Device, Error, Gpu, GpuOptions, Graph, GraphBuilder, Mode, Normalize,
        Optimizer, Padding, ParamGroup, Result, Tensor, Value, ValueRef,
    };
}

/// How kernels are chosen, for benchmarks and for tests that force one variant: the way
/// operands are read (storage buffers or textures) and the calibration that picks it per
/// adapter, and the plans a matmul or a convolution follows (`Matmul::plan`,
/// `Conv2d::plan`). An application needs none of it; `GpuOptions::operand_reads` takes an
/// [`tuning::OperandReads`] to force a family.
pub mod tuning {
    pub use crate::gpu::{
        ChoiceSource, KernelFamily, OperandCalibration, OperandReads, TEXTURE_ADVANTAGE,
        TunedChoice, Tuning, TuningReport,
    };
    pub use crate::ops::conv_plan::{ConvKernel, ConvPlan};
    pub use crate::ops::matmul::MatmulPlan;
}
