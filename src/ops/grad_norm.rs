//! Gradient clipping by global norm, PyTorch's `clip_grad_norm_` with `norm_type=2`
//! (`shaders/grad_norm.wgsl`): the norm of all the gradients taken together, and every
//! gradient scaled by `min(1, max_norm / (norm + 1e-6))` in place. On the GPU nothing is
//! read back: the norm stays on the device, and the scaling reads it there.

use bytemuck::{Pod, Zeroable};
use ndarray::ArrayD;

use crate::error::{Error, Result};
use crate::gpu::shared::{WORKGROUP, terms_per_pass, workgroups};
use crate::tensor::{Tensor, gpu_word};
use crate::value::Value;

const OP: &str = "clip_grad_norm";

/// Elements each lane of `squares` adds (`PER_LANE` in the shader).
const PER_LANE: u64 = 64;

/// Mirrors `Params` in shaders/grad_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct NormParams {
    len: u32,
    first: u32,
    max_norm: f32,
    pad: u32,
}

fn check_max_norm(max_norm: f32) -> Result<()> {
    if max_norm.is_finite() && max_norm > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op: OP,
            detail: format!("max norm {max_norm}: give a finite value above zero"),
        })
    }
}

impl Value {
    /// Clips `grads` in place to a global norm of at most `max_norm` and returns their norm
    /// before clipping as a `[1]` value on their device (see the module's doc). No
    /// gradients give a norm of 0.
    pub fn clip_grad_norm(grads: &mut [&mut Value], max_norm: f32) -> Result<Value> {
        check_max_norm(max_norm)?;
        match grads.first().map(|g| matches!(g, Value::Gpu(_))) {
            Some(true) => {
                let tensors = grads.iter().map(|g| g.gpu()).collect::<Result<Vec<_>>>()?;
                Ok(clip_grad_norm(&tensors, max_norm)?.into())
            }
            _ => {
                let mut arrays = grads
                    .iter_mut()
                    .map(|g| g.cpu_mut())
                    .collect::<Result<Vec<_>>>()?;
                let norm = clip_grad_norm_cpu(&mut arrays, max_norm)?;
                Ok(ArrayD::from_elem(ndarray::IxDyn(&[1]), norm).into())
            }
        }
    }
}

/// [`Value::clip_grad_norm`] on GPU tensors (at least one): the norm as a `[1]` tensor.
pub fn clip_grad_norm(grads: &[&Tensor], max_norm: f32) -> Result<Tensor> {
    check_max_norm(max_norm)?;
    let Some(first) = grads.first() else {
        return Err(Error::InvalidArgument {
            op: OP,
            detail: "no gradients to clip".into(),
        });
    };
    let gpu = first.gpu();
    let per_group = u64::from(WORKGROUP) * PER_LANE;
    let groups: Vec<u64> = grads
        .iter()
        .map(|g| {
            g.check_same_gpu(OP, gpu)?;
            Ok((g.len() as u64).div_ceil(per_group))
        })
        .collect::<Result<_>>()?;
    let partial_count: u64 = groups.iter().sum();
    if partial_count as usize > terms_per_pass(WORKGROUP) {
        return Err(Error::InvalidArgument {
            op: OP,
            detail: format!(
                "{partial_count} partial sums are more than one pass adds up; clip the \
                 parameters in several groups"
            ),
        });
    }
    let partials = Tensor::uninit(gpu, &[partial_count.max(1) as usize])?;
    let norm = Tensor::uninit(gpu, &[1])?;
    let source = || {
        [
            include_str!("../../shaders/rows.wgsl"),
            include_str!("../../shaders/grad_norm.wgsl"),
        ]
        .concat()
    };
    let squares = gpu.pipeline("grad_norm", "squares", source)?;
    let finish = gpu.pipeline("grad_norm", "finish", source)?;
    let scale = gpu.pipeline("grad_norm", "scale", source)?;
    gpu.run_pass(OP, |pass| {
        // Each entry binds what it reads: `squares` the gradient and the partials, `finish`
        // the partials and the norm, `scale` the gradient and the norm.
        let mut encode = |pipeline, params: NormParams, bindings: &[(u32, _)], groups| {
            gpu.encode_at(
                pass,
                pipeline,
                bytemuck::bytes_of(&params),
                bindings,
                groups,
            )
        };
        let mut offset = 0;
        for (grad, &count) in grads.iter().zip(&groups).filter(|(_, c)| **c > 0) {
            let params = NormParams {
                len: gpu_word(OP, grad.len())?,
                first: gpu_word(OP, offset)?,
                ..NormParams::default()
            };
            let bindings = [(1, grad.binding()), (2, partials.binding())];
            encode(&squares, params, &bindings, count)?;
            offset += count as usize;
        }
        let params = NormParams {
            len: gpu_word(OP, partial_count as usize)?,
            ..NormParams::default()
        };
        encode(
            &finish,
            params,
            &[(2, partials.binding()), (3, norm.binding())],
            1,
        )?;
        for grad in grads.iter().filter(|g| !g.is_empty()) {
            let params = NormParams {
                len: gpu_word(OP, grad.len())?,
                max_norm,
                ..NormParams::default()
            };
            let bindings = [(1, grad.binding()), (3, norm.binding())];
            encode(&scale, params, &bindings, workgroups(grad.len() as u64))?;
        }
        Ok(())
    })?;
    Ok(norm)
}

/// CPU reference of [`clip_grad_norm`]: the norm in f64, then each gradient scaled.
pub fn clip_grad_norm_cpu(grads: &mut [&mut ArrayD<f32>], max_norm: f32) -> Result<f32> {
    check_max_norm(max_norm)?;
    let squares: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    let norm = squares.sqrt() as f32;
    let factor = (max_norm / (norm + 1e-6)).min(1.0);
    for grad in grads.iter_mut() {
        grad.mapv_inplace(|v| v * factor);
    }
    Ok(norm)
}
