//! wgcnn: convolutional neural networks trained and run on any GPU through wgpu and WGSL.
//!
//! Start with [`Gpu::new`], upload arrays with [`Tensor::from_array`], run ops such as
//! [`Matmul`], and read results back with [`Tensor::to_array`]. Every op also has a CPU
//! reference on ndarray in [`cpu`], used by the tests to check the GPU.

pub mod error;
pub mod gpu;
pub mod ops;
pub mod tensor;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions, PoolStats};
pub use ops::Activation;
pub use ops::matmul::{BiasAxis, KernelChoice, Matmul, MatmulPlan, MatmulShape};
pub use tensor::Tensor;
/// The wgpu version wgcnn is built on, for `GpuOptions::backends` and adapter info.
pub use wgpu;

/// CPU references of every op, on ndarray: readable and formula-faithful.
pub mod cpu {
    pub use crate::ops::matmul::matmul_cpu as matmul;
}
