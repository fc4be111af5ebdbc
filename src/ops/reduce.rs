//! Sums over leading and trailing axes (`shaders/reduce.wgsl`): bias and weight gradients,
//! optionally fused with the activation backward pass whose result they sum.

use bytemuck::{Pod, Zeroable};

use super::Activation;
use crate::error::{Error, Result};
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, WORKGROUP_SMALL, small_workgroups, terms_per_pass};
use crate::gpu::{Generated, Gpu};
use crate::tensor::{Tensor, gpu_word};

/// Mirrors `Params` in shaders/reduce.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ReduceParams {
    outer: u32,
    accumulate: u32,
    scale: f32,
    slope: f32,
    first_outer: u32,
    /// The outputs (set by [`launch`]).
    mid: u32,
    _pad: [u32; 2],
}

/// Terms per output up to which one invocation sums them alone.
const PER_OUTPUT_TERMS: usize = 64;

/// Outputs (with one term per slice) from which one invocation sums four neighbouring ones
/// over the slices (`columns4`) instead of a workgroup summing each: a ResNet-20 step's
/// per-image weight gradients (36,864 outputs × 128 images) took 12 ms a sum on lavapipe
/// with a workgroup per output, whose lanes read a slice apart.
const COLUMN_OUTPUTS: usize = 4 * WORKGROUP_SMALL as usize;

/// The terms a lane of `main` adds one after the other (`RUN` in shaders/reduce.wgsl): on
/// CPU adapters, whose lanes are SIMD lanes (a read spread across them is a gather), the
/// longest run of 32, 16, 8, 4 or 2 that divides a slice's row; 1 on GPUs, whose lanes
/// coalesce neighbouring reads. On lavapipe a bias gradient's sum took 0.45–0.69× the time
/// of one term per lane (N8 64×56² 2.47 → 1.33 ms, N128 16×32² 3.06–3.21 → 1.70–1.73, 32×16²
/// 1.55 → 0.72–0.80, 64×8² (runs of 16) 0.76–0.87 → 0.38–0.41); runs of 8 took 0.9–1.5× the
/// longest ones' time.
fn lane_run(gpu: &Gpu, inner_elems: usize) -> usize {
    let runs: &[usize] = if gpu.cpu_kernels() {
        &[32, 16, 8, 4, 2]
    } else {
        &[]
    };
    runs.iter()
        .copied()
        .find(|run| inner_elems.is_multiple_of(*run))
        .unwrap_or(1)
}

/// The neighbouring vec4s of outputs a lane of `columns4` sums (`COLUMN_RUN`): on CPU
/// adapters 4 or 2, whichever divides the `vec4s` outputs first, 1 on GPUs. On lavapipe
/// ResNet-20's sum of 128 per-image weight gradients of its 32→64 convolution took 1.05–1.31
/// ms in runs of 4 against 2.21–2.76 with one vec4 a lane (runs of 8: 1.04–1.51).
fn column_run(gpu: &Gpu, vec4s: usize) -> usize {
    let runs: &[usize] = if gpu.cpu_kernels() { &[4, 2] } else { &[] };
    runs.iter()
        .copied()
        .find(|run| vec4s.is_multiple_of(*run))
        .unwrap_or(1)
}

/// `out[m] (+)= scale · Σ_a Σ_i x[a][m][i]` for `x` viewed as `[outer][mid][inner]`.
pub(crate) fn sum_axes(
    gpu: &Gpu,
    x: &Tensor,
    dims: (usize, usize, usize),
    out: &Tensor,
    scale: f32,
    accumulate: bool,
) -> Result<()> {
    check_dims(x, dims, out)?;
    let params = ReduceParams {
        outer: dims.0 as u32,
        accumulate: u32::from(accumulate),
        scale,
        slope: 0.0,
        first_outer: 0,
        mid: 0,
        _pad: [0; 2],
    };
    launch(gpu, dims, params, None, &[(1, x), (2, out)])
}

/// `out[m] (+)= Σ_i x[slice][m][i]` for `x` viewed as `[slices][mid][inner]`: the sums of one
/// slice (the bias gradient from one point of Winograd's transformed `dy`).
pub(crate) fn sum_slice(
    gpu: &Gpu,
    x: &Tensor,
    (slices, mid, inner): (usize, usize, usize),
    slice: usize,
    out: &Tensor,
    accumulate: bool,
) -> Result<()> {
    check_dims(x, (slices, mid, inner), out)?;
    if slice >= slices {
        return Err(Error::InvalidArgument {
            op: "sum_axes",
            detail: format!("slice {slice} is past the last of {slices} slices: pick 0..{slices}"),
        });
    }
    let params = ReduceParams {
        outer: 1,
        accumulate: u32::from(accumulate),
        scale: 1.0,
        slope: 0.0,
        first_outer: gpu_word("sum_axes", slice)?,
        mid: 0,
        _pad: [0; 2],
    };
    launch(gpu, (1, mid, inner), params, None, &[(1, x), (2, out)])
}

/// Whether [`sum_slice`] sums a slice of `inner` terms per output (its passes split the
/// slices, not a slice's terms).
pub(crate) fn slice_fits(gpu: &Gpu, inner: usize) -> bool {
    let inner_elems = if inner.is_multiple_of(4) {
        inner / 4
    } else {
        inner
    };
    inner_elems <= slice_budget(lane_run(gpu, inner_elems))
}

/// The terms of one slice `main` sums per output within the loop bound, its lanes adding
/// runs of `run` (an iteration per run and one per term).
fn slice_budget(run: usize) -> usize {
    terms_per_pass(WORKGROUP_SMALL) * run / (run + 1)
}

/// An activation's backward pass fused with the sum that follows it (a layer's bias
/// gradient): `dz = dy · act'(y)` elementwise, and `Σ_a Σ_i dz[a][m][i]` per `m`, in one
/// kernel that reads `dy` and `y` once. Returns `(dz, sum)`.
pub(crate) fn activation_backward_and_sum(
    activation: Activation,
    y: &Tensor,
    dy: &Tensor,
    dims: (usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    let gpu = dy.gpu();
    y.check_same_gpu("activation backward", gpu)?;
    if y.shape() != dy.shape() {
        return Err(Error::ShapeMismatch {
            op: "activation backward",
            shapes: vec![y.shape().to_vec(), dy.shape().to_vec()],
            detail: format!("y is {:?}, dy is {:?}", y.shape(), dy.shape()),
        });
    }
    let dz = Tensor::uninit(gpu, dy.shape())?;
    let sum = Tensor::uninit(gpu, &[dims.1])?;
    check_dims(dy, dims, &sum)?;
    let params = ReduceParams {
        outer: dims.0 as u32,
        accumulate: 0,
        scale: 1.0,
        slope: activation.slope(),
        first_outer: 0,
        mid: 0,
        _pad: [0; 2],
    };
    launch(
        gpu,
        dims,
        params,
        Some(activation),
        &[(1, dy), (2, &sum), (3, y), (4, &dz)],
    )?;
    Ok((dz, sum))
}

fn check_dims(x: &Tensor, (outer, mid, inner): (usize, usize, usize), out: &Tensor) -> Result<()> {
    if outer * mid * inner != x.len() || out.len() != mid {
        return Err(Error::ShapeMismatch {
            op: "sum_axes",
            shapes: vec![x.shape().to_vec(), vec![outer, mid, inner]],
            detail: format!(
                "{:?} is not [{outer}][{mid}][{inner}] or out is not [{mid}]",
                x.shape()
            ),
        });
    }
    Ok(())
}

/// One generated reduction kernel: everything its source depends on.
#[derive(Debug)]
struct ReduceKernel {
    /// Rows of whole vec4s, summed as vec4s.
    vec4: bool,
    /// The activation's backward pass fused before the sum (`gated` written too).
    gated: bool,
    /// The neighbouring vec4s of outputs a lane of `columns4` sums.
    column_run: usize,
}

impl Generated for ReduceKernel {
    fn source(&self) -> String {
        let term = if self.gated {
            "    let d = x[index] * derivative(gate[index]);\n    gated[index] = d;\n    return d;"
        } else {
            "    return x[index];"
        };
        // `columns4` runs gated only with vec4 `Elem`s.
        let column_term = if self.gated && self.vec4 {
            "    let d = x4[index] * derivative(gate[index]);\n    gated[index] = d;\n    return d;"
        } else {
            "    return x4[index];"
        };
        let total = if self.vec4 {
            "    return dot(v, vec4<f32>(1.0));"
        } else {
            "    return v;"
        };
        include_str!("../../shaders/reduce.wgsl")
            .replace("{{ELEM}}", if self.vec4 { "vec4<f32>" } else { "f32" })
            .replace("{{TERM}}", term)
            .replace("{{COLUMN_TERM}}", column_term)
            .replace("{{TOTAL}}", total)
            .replace("{{COLUMN_RUN}}", &self.column_run.to_string())
    }
}

/// Runs the reduction variant for `dims` and `gate` (see shaders/reduce.wgsl) over the
/// numbered tensors, the outer slices from `params.first_outer` on; binding 2 is the sum,
/// the others are read or written in vec4s where inner allows.
fn launch(
    gpu: &Gpu,
    (outer, mid, inner): (usize, usize, usize),
    params: ReduceParams,
    gate: Option<Activation>,
    tensors: &[(u32, &Tensor)],
) -> Result<()> {
    // Gated, a linear layer's `dz` and bias gradient (inner 1) go in vec4s whatever their
    // width: on lavapipe LeNet's fc1 and fc2 passes took 0.19–0.20 ms a step against
    // 0.24 with a lane per output.
    let columns = inner == 1 && mid % 4 == 0 && (gate.is_some() || mid >= COLUMN_OUTPUTS);
    // The gated `columns4` reads y and writes dz as vec4s through `Elem`.
    let vec4 = inner % 4 == 0 || (columns && gate.is_some());
    let inner_elems = if inner.is_multiple_of(4) {
        inner / 4
    } else {
        inner
    };
    // `main`'s lanes each loop over a share of an output's terms in runs (an iteration per
    // run and one per term), then up a tree: sums too long for that run as passes over
    // slices of `outer`, each adding to the last.
    let run = if columns {
        1
    } else {
        lane_run(gpu, inner_elems)
    };
    let column_run = if columns { column_run(gpu, mid / 4) } else { 1 };
    let per_lane_budget = slice_budget(run);
    if inner_elems > per_lane_budget {
        return Err(Error::InvalidArgument {
            op: "sum_axes",
            detail: format!(
                "{inner} terms per output in one slice loop past the kernels' bound of \
                 {MAX_LOOP_ITERATIONS} per invocation"
            ),
        });
    }
    // `columns4` lanes each loop over the slices themselves (an iteration per slice and one
    // per vec4 of their run).
    let slices = if columns {
        (MAX_LOOP_ITERATIONS / (column_run + 1)).min(outer)
    } else {
        (per_lane_budget / inner_elems).min(outer)
    };
    // A workgroup per output pays barriers for its tree; many short sums go one per lane.
    let (entry, groups) = if columns {
        ("columns4", small_workgroups((mid / 4 / column_run) as u64))
    } else if outer * inner_elems <= PER_OUTPUT_TERMS {
        ("per_output", small_workgroups(mid as u64))
    } else {
        ("main", mid as u64)
    };
    let kernel = ReduceKernel {
        vec4,
        gated: gate.is_some(),
        column_run,
    };
    // The outputs come as a parameter: one pipeline sums every width of one inner size
    // (each width a kernel of its own to compile before, 20–60 ms on lavapipe: LeNet's step
    // summed six, ResNet-20's seven).
    let params = ReduceParams {
        mid: gpu_word("sum_axes", mid)?,
        ..params
    };
    let pipeline = gpu.generated(
        &kernel,
        entry,
        &[
            ("INNER", inner_elems as u32),
            ("ACT", gate.map_or(0, Activation::code)),
            ("RUN", run as u32),
        ],
    )?;
    let bindings: Vec<_> = tensors
        .iter()
        .map(|&(number, t)| {
            if columns {
                // x and the sum as vec4s, at 5 and 6 (y and dz at 3 and 4).
                (
                    if number <= 2 { number + 4 } else { number },
                    t.binding_vec4(),
                )
            } else if number == 2 || !vec4 {
                (number, t.binding())
            } else {
                (number, t.binding_vec4())
            }
        })
        .collect();
    for first in (0..outer).step_by(slices) {
        let pass_params = ReduceParams {
            outer: (slices.min(outer - first)) as u32,
            first_outer: params.first_outer + first as u32,
            accumulate: params.accumulate | u32::from(first > 0),
            ..params
        };
        gpu.run_pass("sum_axes", |pass| {
            gpu.encode_at(
                pass,
                &pipeline,
                bytemuck::bytes_of(&pass_params),
                &bindings,
                groups,
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ndarray::Axis;

    use super::*;
    use crate::gpu::GpuOptions;
    use crate::test_support::{max_abs_diff, random};

    /// One slice's sums against the CPU: vec4 and f32 terms, the first, a middle and the last
    /// slice, added to what `out` holds or stored over its poison; a slice past the last is
    /// an error.
    #[test]
    fn sum_slice_sums_one_slice() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        for (i, (slices, mid, inner)) in [(5, 7, 9), (36, 6, 392), (3, 4, 100)]
            .into_iter()
            .enumerate()
        {
            let x = random(&[slices, mid, inner], 40 + i as u64);
            let tx = Tensor::from_array(&gpu, &x).unwrap();
            for slice in [0, slices / 2, slices - 1] {
                let want = x
                    .index_axis(Axis(0), slice)
                    .mapv(f64::from)
                    .sum_axis(Axis(1));
                let out = Tensor::full(&gpu, &[mid], f32::NAN).unwrap();
                sum_slice(&gpu, &tx, (slices, mid, inner), slice, &out, false).unwrap();
                sum_slice(&gpu, &tx, (slices, mid, inner), slice, &out, true).unwrap();
                let got = out.to_array().unwrap();
                for (m, (&got, &want)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(got) - 2.0 * want).abs() <= 1e-5 * inner as f64,
                        "{slices}×{mid}×{inner} slice {slice}: sum[{m}] = {got}, want 2 × {want}"
                    );
                }
            }
            let out = Tensor::uninit(&gpu, &[mid]).unwrap();
            assert!(sum_slice(&gpu, &tx, (slices, mid, inner), slices, &out, false).is_err());
        }
        // `slice_fits` says where one slice's terms outgrow a pass: odd counts go one term a
        // run, (16,384 − 6) · 64 / 2 = 524,096 of them.
        for (inner, fits) in [(524_095, true), (524_097, false)] {
            assert_eq!(slice_fits(&gpu, inner), fits, "{inner}");
            let x = Tensor::full(&gpu, &[1, 1, inner], 0.5).unwrap();
            let out = Tensor::uninit(&gpu, &[1]).unwrap();
            let summed = sum_slice(&gpu, &x, (1, 1, inner), 0, &out, false);
            assert_eq!(summed.is_ok(), fits, "{inner}");
            if fits {
                let got = f64::from(out.to_array().unwrap()[0]);
                assert!((got - 0.5 * inner as f64).abs() < 1.0, "{inner}: {got}");
            }
        }
    }

    /// The fused activation backward and sum against the CPU reference, for every
    /// activation, on each variant: vec4 or f32 terms, a workgroup or a lane per output.
    #[test]
    fn activation_backward_and_sum_match_the_cpu() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let activations = [
            Activation::None,
            Activation::Relu,
            Activation::LeakyRelu(0.1),
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Relu6,
        ];
        // (outer, mid, inner): vec4 + workgroup (on CPU adapters in runs of 16), f32 +
        // lane, f32 + workgroup, vec4 + lane, vec4 + workgroup on sizes that fill no vec4
        // group of lanes, the same in runs of 2; and past one pass's loop bound (two passes,
        // the second accumulating): 1,050,300 f32 terms per output, and 1,040,000 vec4s in
        // runs of 32. Then `columns4` (a linear layer's bias gradient: one term per slice,
        // outputs in vec4s): 30 vec4s (on CPU adapters two a lane), 3, and past the loop
        // bound.
        let cases = [
            (64, 6, 576),
            (3, 5, 7),
            (100, 10, 1),
            (2, 3, 8),
            (70, 2, 12),
            (90, 3, 40),
            (300, 2, 3501),
            (1300, 1, 3200),
            (64, 120, 1),
            (7, 12, 1),
            (MAX_LOOP_ITERATIONS + 3, 8, 1),
        ];
        for (i, (outer, mid, inner)) in cases.into_iter().enumerate() {
            let shape = [outer, mid, inner];
            let x = random(&shape, i as u64).mapv(|v| 8.0 * v);
            let dy = random(&shape, 100 + i as u64);
            for activation in activations {
                let y = x.mapv(|v| activation.apply(v));
                let want_dz = ndarray::Zip::from(&dy)
                    .and(&y)
                    .map_collect(|&d, &y| d * activation.derivative(y, y));
                let want_sum = want_dz.mapv(f64::from).sum_axis(Axis(2)).sum_axis(Axis(0));

                let ty = Tensor::from_array(&gpu, &y).unwrap();
                let tdy = Tensor::from_array(&gpu, &dy).unwrap();
                // NaN-filled buffers of the outputs' sizes go back to the pool first, so the
                // kernel writes into them: anything it leaves unwritten shows as NaN.
                drop(Tensor::full(&gpu, &shape, f32::NAN).unwrap());
                drop(Tensor::full(&gpu, &[mid], f32::NAN).unwrap());
                let (dz, sum) =
                    activation_backward_and_sum(activation, &ty, &tdy, (outer, mid, inner))
                        .unwrap();
                let dz = dz.to_array().unwrap();
                let sum = sum.to_array().unwrap();
                let dz_diff = max_abs_diff(&dz, &want_dz);
                assert!(
                    dz_diff <= 1e-6,
                    "{activation:?} {shape:?}: dz off by {dz_diff}"
                );
                for (m, (&got, &want)) in sum.iter().zip(&want_sum).enumerate() {
                    let tolerance = 1e-5 * (outer * inner) as f64;
                    assert!(
                        (f64::from(got) - want).abs() <= tolerance,
                        "{activation:?} {shape:?}: sum[{m}] = {got}, want {want}"
                    );
                }
            }
        }
    }

    /// The number of outputs is a parameter, not a kernel constant: sums of one inner size
    /// share a pipeline, however many outputs they have (short sums one per lane, long ones
    /// a workgroup each; widths a vec4 run apart for `columns4`), and match the CPU.
    #[test]
    fn sums_of_any_width_share_a_pipeline() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        drop(Tensor::full(&gpu, &[1], f32::NAN).unwrap());
        // (outer, mid): two per_output widths, two main ones, two columns4 ones.
        let widths = [
            [(5, 7), (3, 13)],
            [(100, 9), (90, 5)],
            [(6, 1024), (4, 2080)],
        ];
        for (i, pair) in widths.into_iter().enumerate() {
            let mut compiled = Vec::new();
            for (j, (outer, mid)) in pair.into_iter().enumerate() {
                let x = random(&[outer, mid, 1], 500 + 10 * i as u64 + j as u64);
                let want = x.mapv(f64::from).sum_axis(Axis(2)).sum_axis(Axis(0));
                drop(Tensor::full(&gpu, &[mid], f32::NAN).unwrap());
                let out = Tensor::uninit(&gpu, &[mid]).unwrap();
                let tx = Tensor::from_array(&gpu, &x).unwrap();
                sum_axes(&gpu, &tx, (outer, mid, 1), &out, 1.0, false).unwrap();
                for (got, want) in out.to_array().unwrap().iter().zip(&want) {
                    assert!((f64::from(*got) - want).abs() <= 1e-5 * outer as f64);
                }
                compiled.push(gpu.pipelines_compiled());
            }
            assert_eq!(
                compiled[0], compiled[1],
                "{pair:?}: a second width compiled"
            );
        }
    }

    /// Many outputs with one term per slice take `columns4` (several vec4 lanes, a
    /// workgroup that is not full, past the loop bound in two passes), added to what the
    /// sum held or not.
    #[test]
    fn sums_over_many_columns_match_the_cpu() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        // On CPU adapters: runs of 4 vec4s a lane, of 1 (65 vec4s), of 4 past the loop
        // bound, and of 2 (66 vec4s).
        let cases = [
            (128, 2304, false),
            (5, 260, true),
            (MAX_LOOP_ITERATIONS + 5, 256, true),
            (7, 264, false),
        ];
        for (i, (outer, mid, accumulate)) in cases.into_iter().enumerate() {
            let x = random(&[outer, mid, 1], 200 + i as u64);
            let before = random(&[mid], 300 + i as u64);
            let mut want = x.mapv(f64::from).sum_axis(Axis(2)).sum_axis(Axis(0)) * 0.5;
            if accumulate {
                want += &before.mapv(f64::from);
            }
            let out = if accumulate {
                Tensor::from_array(&gpu, &before).unwrap()
            } else {
                drop(Tensor::full(&gpu, &[mid], f32::NAN).unwrap());
                Tensor::uninit(&gpu, &[mid]).unwrap()
            };
            let tx = Tensor::from_array(&gpu, &x).unwrap();
            sum_axes(&gpu, &tx, (outer, mid, 1), &out, 0.5, accumulate).unwrap();
            let got = out.to_array().unwrap();
            for (m, (&got, &want)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * outer as f64,
                    "{outer}x{mid}: sum[{m}] = {got}, want {want}"
                );
            }
        }
    }
}
