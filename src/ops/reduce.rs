//! Sums over leading and trailing axes (`shaders/reduce.wgsl`): bias and weight gradients.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::Tensor;

/// Mirrors `Params` in shaders/reduce.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ReduceParams {
    outer: u32,
    mid: u32,
    inner: u32,
    accumulate: u32,
    scale: f32,
    _pad: [u32; 3],
}

/// `out[m] (+)= scale · Σ_a Σ_i x[a][m][i]` for `x` viewed as `[outer][mid][inner]`.
pub(crate) fn sum_axes(
    gpu: &Gpu,
    x: &Tensor,
    (outer, mid, inner): (usize, usize, usize),
    out: &Tensor,
    scale: f32,
    accumulate: bool,
) -> Result<()> {
    if outer * mid * inner != x.len() || out.len() != mid {
        return Err(Error::ShapeMismatch {
            op: "sum_axes",
            detail: format!(
                "{:?} is not [{outer}][{mid}][{inner}] or out is not [{mid}]",
                x.shape()
            ),
        });
    }
    let params = ReduceParams {
        outer: outer as u32,
        mid: mid as u32,
        inner: inner as u32,
        accumulate: u32::from(accumulate),
        scale,
        _pad: [0; 3],
    };
    let pipeline = gpu.pipeline("reduce", "main", || {
        include_str!("../../shaders/reduce.wgsl").into()
    })?;
    gpu.run_pass("sum_axes", |pass| {
        gpu.encode(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &[x.binding(), out.binding()],
            mid as u64,
        )
    })
}
