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
    accumulate: u32,
    scale: f32,
    _pad: u32,
}

/// Terms per output up to which one invocation sums them alone.
const PER_OUTPUT_TERMS: usize = 64;

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
        accumulate: u32::from(accumulate),
        scale,
        _pad: 0,
    };
    // A workgroup per output pays barriers for its tree; many short sums go one per lane.
    let (entry, groups) = if outer * inner <= PER_OUTPUT_TERMS {
        ("per_output", (mid as u64).div_ceil(64))
    } else {
        ("main", mid as u64)
    };
    let pipeline = gpu.specialized(
        "reduce",
        entry,
        || include_str!("../../shaders/reduce.wgsl").into(),
        &[("MID", mid as u32), ("INNER", inner as u32)],
    )?;
    gpu.run_pass("sum_axes", |pass| {
        gpu.encode(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &[x.binding(), out.binding()],
            groups,
        )
    })
}
