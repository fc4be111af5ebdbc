//! Batch norm in evaluation mode folded into the convolution before it
//! (`shaders/fold_norm.wgsl`): with `scale = γ / sqrt(var + eps)` per filter,
//! `w' = w · scale` and `b' = (b − mean) · scale + β` give `bn(conv(x, w, b)) = conv(x, w', b')`,
//! one pass over the activations fewer, and room for the activation after the norm in the
//! convolution's epilogue.

use bytemuck::{Pod, Zeroable};
use ndarray::{Array1, ArrayD, ArrayViewD, Axis};

use crate::error::{Error, Result};
use crate::gpu::shared::workgroups;
use crate::tensor::{Tensor, gpu_word};
use crate::value::Value;

const OP: &str = "fold_batch_norm";

/// Mirrors `Params` in shaders/fold_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FoldParams {
    filters: u32,
    per_filter: u32,
    eps: f32,
    has_bias: u32,
}

/// A weight `[O, …]`, its optional bias `[O]` and the norm's `[γ, β, mean, var]`, each `[O]`.
fn check(weight: &[usize], bias: Option<&[usize]>, norm: [&[usize]; 4], eps: f32) -> Result<usize> {
    let filters = weight.first().copied().unwrap_or(0);
    let per_channel = bias.into_iter().chain(norm);
    if filters == 0 || per_channel.into_iter().any(|s| s != [filters]) {
        return Err(Error::ShapeMismatch {
            op: OP,
            shapes: std::iter::once(weight)
                .chain(bias)
                .chain(norm)
                .map(<[usize]>::to_vec)
                .collect(),
            detail: format!(
                "the weight must be [O, …] with O ≥ 1 and the bias, γ, β, mean and variance [O]; got weight {weight:?}"
            ),
        });
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidArgument {
            op: OP,
            detail: format!("eps {eps} must be finite and non-negative"),
        });
    }
    Ok(filters)
}

/// The folded `(weight, bias)` on the GPU.
fn fold_gpu(
    weight: &Tensor,
    bias: Option<&Tensor>,
    [gamma, beta, mean, var]: [&Tensor; 4],
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let shapes = [gamma, beta, mean, var].map(Tensor::shape);
    let filters = check(weight.shape(), bias.map(Tensor::shape), shapes, eps)?;
    let gpu = weight.gpu();
    for t in bias.into_iter().chain([gamma, beta, mean, var]) {
        t.check_same_gpu(OP, gpu)?;
    }
    let (folded_weight, folded_bias) = (
        Tensor::uninit(gpu, weight.shape())?,
        Tensor::uninit(gpu, &[filters])?,
    );
    let params = FoldParams {
        filters: gpu_word(OP, filters)?,
        per_filter: gpu_word(OP, weight.len() / filters)?,
        eps,
        has_bias: u32::from(bias.is_some()),
    };
    let pipeline = gpu.pipeline("fold_norm", "main", || {
        include_str!("../../shaders/fold_norm.wgsl").into()
    })?;
    // Without a bias the kernel never reads its binding: β stands in.
    let bias = bias.unwrap_or(beta);
    gpu.run_pass(OP, |pass| {
        gpu.encode(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &[
                weight.binding(),
                bias.binding(),
                gamma.binding(),
                beta.binding(),
                mean.binding(),
                var.binding(),
                folded_weight.binding(),
                folded_bias.binding(),
            ],
            workgroups(weight.len() as u64),
        )
    })?;
    Ok((folded_weight, folded_bias))
}

/// CPU reference of the fold: `(w · scale, (b − mean) · scale + β)`.
pub fn fold_batch_norm_cpu(
    weight: &ArrayViewD<'_, f32>,
    bias: Option<&ArrayViewD<'_, f32>>,
    [gamma, beta, mean, var]: [&ArrayViewD<'_, f32>; 4],
    eps: f32,
) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
    let norm = [gamma, beta, mean, var].map(|a| a.shape());
    let filters = check(weight.shape(), bias.map(|b| b.shape()), norm, eps)?;
    let scale: Array1<f32> = (0..filters)
        .map(|o| gamma[o] / (var[o] + eps).sqrt())
        .collect();
    let mut folded_weight = weight.to_owned();
    for (o, mut filter) in folded_weight.axis_iter_mut(Axis(0)).enumerate() {
        filter.mapv_inplace(|w| w * scale[o]);
    }
    let folded_bias = (0..filters)
        .map(|o| (bias.map_or(0.0, |b| b[o]) - mean[o]) * scale[o] + beta[o])
        .collect::<Array1<f32>>()
        .into_dyn();
    Ok((folded_weight, folded_bias))
}

impl Value {
    /// This convolution weight and `bias` with batch norm's evaluation-mode map
    /// (`[γ, β, running mean, running variance]`, `eps`) folded in, on their device.
    pub fn fold_batch_norm(
        &self,
        bias: Option<&Value>,
        norm: [&Value; 4],
        eps: f32,
    ) -> Result<(Value, Value)> {
        match self {
            Value::Gpu(weight) => {
                let bias = bias.map(Value::gpu).transpose()?;
                let norm = [
                    norm[0].gpu()?,
                    norm[1].gpu()?,
                    norm[2].gpu()?,
                    norm[3].gpu()?,
                ];
                let (w, b) = fold_gpu(weight, bias, norm, eps)?;
                Ok((Value::Gpu(w), Value::Gpu(b)))
            }
            Value::Cpu(weight) => {
                let bias = bias.map(Value::cpu).transpose()?.map(|a| a.view());
                let views = [
                    norm[0].cpu()?,
                    norm[1].cpu()?,
                    norm[2].cpu()?,
                    norm[3].cpu()?,
                ]
                .map(|a| a.view());
                let [g, b, m, v] = &views;
                let (w, b) = fold_batch_norm_cpu(&weight.view(), bias.as_ref(), [g, b, m, v], eps)?;
                Ok((Value::Cpu(w), Value::Cpu(b)))
            }
        }
    }
}
