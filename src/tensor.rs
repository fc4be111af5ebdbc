//! `Tensor`: an f32 N-dimensional array in a pooled GPU buffer.

use std::sync::Arc;

use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};

use crate::error::{Error, Result};
use crate::gpu::dispatch::Binding;
use crate::gpu::shared::workgroups;
use crate::gpu::{Gpu, lock, size_class};

/// A GPU buffer on loan from the pool; dropping it hands it back.
struct PooledBuffer {
    gpu: Gpu,
    buffer: wgpu::Buffer,
    class: u64,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        // wgpu buffers are reference-counted handles: the pool keeps this one alive.
        self.gpu.release_buffer(self.buffer.clone(), self.class);
    }
}

/// Mirrors `Params` in shaders/fill.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct FillParams {
    total: u32,
    value: f32,
    _pad: [u32; 2],
}

/// An f32 tensor in row-major (C) order on the GPU. Activations are NCHW.
pub struct Tensor {
    shape: Vec<usize>,
    /// Shared by the tensors [`Tensor::reshaped`] makes of it; back to the pool with the last.
    storage: Arc<PooledBuffer>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .finish()
    }
}

/// A tensor's buffer seen under a shape with the same element count (no copy).
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub binding: Binding<'a>,
    pub shape: &'a [usize],
}

/// Checks a shape for use as a tensor and returns its element count.
pub(crate) fn element_count(op: &'static str, shape: &[usize]) -> Result<usize> {
    if let Some(axis) = shape.iter().position(|&d| d == 0) {
        return Err(Error::EmptyDimension {
            op,
            shape: shape.to_vec(),
            axis,
        });
    }
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::InvalidArgument {
            op,
            detail: format!("shape {shape:?} has more elements than fit in memory"),
        })
}

/// A size as the 32-bit word the GPU kernels index and count with: larger is an error, not
/// a truncation.
pub(crate) fn gpu_word(op: &'static str, value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::InvalidArgument {
        op,
        detail: format!("{value} is over the 32-bit range the GPU kernels index with"),
    })
}

/// Room on the host for the f32 elements of `what`, a tensor of `shape`, reserved only if
/// the host grants it: an error instead of an aborted process. `check` sees the bytes first
/// (a device's limit). Returns the empty vector and the element count.
pub(crate) fn host_vec(
    op: &'static str,
    what: &str,
    shape: &[usize],
    check: impl FnOnce(u64) -> Result<()>,
) -> Result<(Vec<f32>, usize)> {
    let too_large = || Error::InvalidArgument {
        op,
        detail: format!("{what} {shape:?} has more elements than fit in memory"),
    };
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(too_large)?;
    let bytes = count.checked_mul(4).ok_or_else(too_large)? as u64;
    check(bytes)?;
    let mut values = Vec::new();
    values
        .try_reserve_exact(count)
        .map_err(|_| Error::InvalidArgument {
            op,
            detail: format!(
                "{what} {shape:?} needs {bytes} bytes, more than the host can allocate"
            ),
        })?;
    Ok((values, count))
}

impl Tensor {
    /// A tensor whose contents are unspecified (a recycled buffer): for kernel outputs.
    pub(crate) fn uninit(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let len = element_count("Tensor", shape)?;
        let bytes = (len as u64) * 4;
        gpu.check_buffer_size(&format!("a tensor of shape {shape:?}"), bytes)?;
        let class = size_class(bytes);
        let reused = lock(&gpu.inner.pool).take(class);
        let buffer = match reused {
            Some(buffer) => buffer,
            None => {
                let buffer = gpu.checked("allocating a tensor", || {
                    gpu.device().create_buffer(&wgpu::BufferDescriptor {
                        label: Some("tensor"),
                        size: class,
                        // UNIFORM: a small kernel's uniform copies of its operands are pooled
                        // tensors too (ops/matmul_small.rs).
                        usage: wgpu::BufferUsages::STORAGE
                            | wgpu::BufferUsages::UNIFORM
                            | wgpu::BufferUsages::COPY_SRC
                            | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                })?;
                lock(&gpu.inner.pool).record_allocation(class);
                buffer
            }
        };
        Ok(Self {
            shape: shape.to_vec(),
            storage: Arc::new(PooledBuffer {
                gpu: gpu.clone(),
                buffer,
                class,
            }),
        })
    }

    /// Uploads any ndarray array, contiguous or not (strided views are gathered first).
    pub fn from_array<S, D>(gpu: &Gpu, array: &ArrayBase<S, D>) -> Result<Self>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let tensor = Self::uninit(gpu, array.shape())?;
        let gathered;
        let data: &[f32] = match array.as_slice() {
            Some(slice) => slice,
            None => {
                gathered = array.iter().copied().collect::<Vec<f32>>();
                &gathered
            }
        };
        gpu.checked("uploading a tensor", || {
            gpu.queue()
                .write_buffer(tensor.buffer(), 0, bytemuck::cast_slice(data));
        })?;
        Ok(tensor)
    }

    /// A 1-D tensor holding raw 32-bit words (e.g. packed bytes for a kernel that reads u32).
    pub(crate) fn from_words(gpu: &Gpu, words: &[u32]) -> Result<Self> {
        let tensor = Self::uninit(gpu, &[words.len()])?;
        gpu.checked("uploading words", || {
            gpu.queue()
                .write_buffer(tensor.buffer(), 0, bytemuck::cast_slice(words));
        })?;
        Ok(tensor)
    }

    /// A tensor with every element equal to `value` (e.g. NaN to poison an output), filled
    /// by a kernel (`shaders/fill.wgsl`): no host copy, and no staging buffer whose failed
    /// allocation would lose the device.
    pub fn full(gpu: &Gpu, shape: &[usize], value: f32) -> Result<Self> {
        let tensor = Self::uninit(gpu, shape)?;
        let params = FillParams {
            total: gpu_word("Tensor::full", tensor.len())?,
            value,
            _pad: [0; 2],
        };
        let pipeline = gpu.pipeline("fill", "main", || {
            include_str!("../shaders/fill.wgsl").into()
        })?;
        gpu.run_pass("filling a tensor", |pass| {
            gpu.encode(
                pass,
                &pipeline,
                bytemuck::bytes_of(&params),
                &[tensor.binding()],
                workgroups(tensor.len() as u64),
            )
        })?;
        Ok(tensor)
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Always false: tensors have no zero-sized dimension.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Size of the data in bytes.
    pub fn bytes(&self) -> u64 {
        self.len() as u64 * 4
    }

    /// The context this tensor lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.storage.gpu
    }

    /// The same data under another shape with as many elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if element_count("Tensor::reshape", shape)? != self.len() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::reshape",
                shapes: vec![self.shape.clone(), shape.to_vec()],
                detail: format!("cannot view {:?} as {shape:?}", self.shape),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The same data under `shape` (as many elements): no copy, the two share one buffer,
    /// so it is for tensors nothing writes in place (activations and their gradients as the
    /// executor hands them on; not parameters, which the optimizer updates).
    pub fn reshaped(&self, shape: &[usize]) -> Result<Self> {
        self.check_reshape("Tensor::reshaped", shape)?;
        Ok(Self {
            shape: shape.to_vec(),
            storage: Arc::clone(&self.storage),
        })
    }

    /// An error unless `shape` holds as many elements as this tensor; `op` names the caller.
    fn check_reshape(&self, op: &'static str, shape: &[usize]) -> Result<()> {
        if element_count(op, shape)? != self.len() {
            return Err(Error::ShapeMismatch {
                op,
                shapes: vec![self.shape.clone(), shape.to_vec()],
                detail: format!("cannot view {:?} as {shape:?}", self.shape),
            });
        }
        Ok(())
    }

    /// A copy of the data under `shape` (as many elements), on the GPU.
    pub fn copy_as(&self, shape: &[usize]) -> Result<Self> {
        self.check_reshape("Tensor::copy_as", shape)?;
        let copy = Self::uninit(self.gpu(), shape)?;
        self.gpu()
            .copy((self.buffer(), 0), (copy.buffer(), 0), self.bytes())?;
        Ok(copy)
    }

    /// `a` and `b` stacked along the first axis (their other dimensions must agree).
    pub fn concat(a: &Tensor, b: &Tensor) -> Result<Self> {
        if a.shape.get(1..) != b.shape.get(1..) || a.shape.is_empty() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::concat",
                shapes: vec![a.shape.clone(), b.shape.clone()],
                detail: format!("cannot stack {:?} and {:?}", a.shape, b.shape),
            });
        }
        b.check_same_gpu("Tensor::concat", a.gpu())?;
        let mut shape = a.shape.clone();
        shape[0] += b.shape[0];
        let out = Self::uninit(a.gpu(), &shape)?;
        let gpu = a.gpu();
        gpu.copy((a.buffer(), 0), (out.buffer(), 0), a.bytes())?;
        gpu.copy((b.buffer(), 0), (out.buffer(), a.bytes()), b.bytes())?;
        Ok(out)
    }

    /// Reads the tensor back to the host, blocking.
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        pollster::block_on(self.to_array_async())
    }

    /// Reads back the value of a one-element tensor (a loss, a count), blocking.
    pub fn scalar(&self) -> Result<f32> {
        scalar_of(&self.to_array()?)
    }

    /// Reads the tensor back to the host.
    pub async fn to_array_async(&self) -> Result<ArrayD<f32>> {
        let bytes = self.gpu().read_bytes(self.buffer(), self.bytes()).await?;
        let data: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        ArrayD::from_shape_vec(IxDyn(&self.shape), data).map_err(|e| Error::Readback(e.to_string()))
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.storage.buffer
    }

    pub(crate) fn binding(&self) -> Binding<'_> {
        Binding {
            buffer: self.buffer(),
            bytes: self.bytes(),
        }
    }

    /// The buffer bound in whole vec4s, for kernels that read and write four elements at a
    /// time: the bytes rounded up to 16, which stays inside the buffer because size classes
    /// are multiples of 16. What such a kernel writes past the last element is never read.
    pub(crate) fn binding_vec4(&self) -> Binding<'_> {
        Binding {
            buffer: self.buffer(),
            bytes: self.bytes().div_ceil(16) * 16,
        }
    }

    /// This tensor as a kernel operand.
    pub(crate) fn operand(&self) -> Operand<'_> {
        Operand {
            binding: self.binding(),
            shape: &self.shape,
        }
    }

    /// This tensor under another shape of as many elements (e.g. OIHW weights as [O, C·H·W]).
    pub(crate) fn operand_as<'a>(&'a self, shape: &'a [usize]) -> Operand<'a> {
        debug_assert_eq!(shape.iter().product::<usize>(), self.len());
        Operand {
            binding: self.binding(),
            shape,
        }
    }

    /// Fails unless `self` lives on `gpu`.
    pub(crate) fn check_same_gpu(&self, op: &'static str, gpu: &Gpu) -> Result<()> {
        if std::sync::Arc::ptr_eq(&self.gpu().inner, &gpu.inner) {
            Ok(())
        } else {
            Err(Error::InvalidArgument {
                op,
                detail: "tensors live on different Gpu contexts; upload them to the same one"
                    .into(),
            })
        }
    }
}

/// The only element of `array`, or an error naming its shape.
pub(crate) fn scalar_of(array: &ArrayD<f32>) -> Result<f32> {
    match array.as_slice() {
        Some(&[value]) => Ok(value),
        _ => Err(Error::ShapeMismatch {
            op: "scalar",
            shapes: vec![array.shape().to_vec()],
            detail: format!(
                "a scalar read needs one element, the value is {:?}; use to_array",
                array.shape()
            ),
        }),
    }
}
