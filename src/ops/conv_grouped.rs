//! Grouped and depthwise convolution on the GPU (`shaders/conv_grouped.wgsl`) where each
//! group's sums are short (`C/G·KH·KW` taps; 9 for a depthwise 3×3: nothing for an im2col
//! matmul to reuse): the forward pass, the input gradient and the weight gradient of a
//! `Conv2d` with `groups > 1`, each a direct kernel (one output, one input pixel, one weight
//! per invocation or workgroup). Depthwise layers (one filter per channel) take row blocks
//! instead: several outputs along a row per invocation, read as aligned vec4s where rows
//! are whole vec4s, and a weight gradient that reads `dy` once for all taps. Groups with
//! long sums take im2col + a batched matmul in `conv2d.rs`, with `bias_activation` here as
//! their epilogue. The CPU reference is `conv2d_cpu`, whose formula covers groups.

use bytemuck::{Pod, Zeroable};

use super::conv2d::{Conv2d, Conv2dShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::dispatch::Binding;
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, WORKGROUP_SMALL, small_workgroups, terms_per_pass};
use crate::tensor::{Tensor, gpu_word};

/// Mirrors `Params` in shaders/conv_grouped.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GroupedParams {
    n: u32,
    total: u32,
    slope: f32,
    first_image: u32,
}

/// Taps of the largest filter `depthwise_weight_grad` sums at once (its per-lane array).
const DEPTHWISE_MAX_TAPS: usize = 49;

/// One filter per channel (`groups = C = O`): the row-block kernels apply.
fn depthwise(shape: &Conv2dShape) -> bool {
    shape.groups == shape.c && shape.o == shape.c
}

/// Whether a depthwise layer's weight gradient fits the row kernels' per-lane taps (filters
/// up to 7×7): its backward pass then defaults to them whatever the filter's size.
pub(crate) fn depthwise_rows_fit(shape: &Conv2dShape) -> bool {
    depthwise(shape) && shape.taps() <= DEPTHWISE_MAX_TAPS
}

/// The kernel's `override` constants: the layer's shape, stride, padding, dilation and
/// epilogue, whether `depthwise_rows` reads the taps rotated, and the depthwise weight
/// gradients' lanes per channel.
fn constants(
    spec: &Conv2d,
    shape: &Conv2dShape,
    (bias, flip, lanes): (bool, bool, usize),
) -> Result<[(&'static str, u32); 22]> {
    Ok([
        ("C", gpu_word("conv2d", shape.c)?),
        ("H", gpu_word("conv2d", shape.h)?),
        ("W", gpu_word("conv2d", shape.w)?),
        ("O", gpu_word("conv2d", shape.o)?),
        ("KH", gpu_word("conv2d", shape.kh)?),
        ("KW", gpu_word("conv2d", shape.kw)?),
        ("OH", gpu_word("conv2d", shape.oh)?),
        ("OW", gpu_word("conv2d", shape.ow)?),
        ("SH", gpu_word("conv2d", spec.stride.0)?),
        ("SW", gpu_word("conv2d", spec.stride.1)?),
        ("PAD_TOP", gpu_word("conv2d", shape.pad_top)?),
        ("PAD_LEFT", gpu_word("conv2d", shape.pad_left)?),
        ("DH", gpu_word("conv2d", spec.dilation.0)?),
        ("DW", gpu_word("conv2d", spec.dilation.1)?),
        ("GROUPS", gpu_word("conv2d", shape.groups)?),
        ("ACT", spec.activation.code()),
        ("HAS_BIAS", u32::from(bias)),
        ("FLIP", u32::from(flip)),
        ("QUADS", gpu_word("conv2d", quads_per_block(shape))?),
        ("OUT_ROWS", gpu_word("conv2d", out_rows(spec, shape))?),
        ("CHANNEL_LANES", gpu_word("conv2d", lanes)?),
        ("FILTER_RUN", gpu_word("conv2d", filter_run(shape))?),
    ])
}

fn run(
    gpu: &Gpu,
    (spec, shape): (&Conv2d, &Conv2dShape),
    (entry, bias): (&str, bool),
    bindings: &[(u32, Binding<'_>)],
    (total, workgroups): (usize, u64),
) -> Result<()> {
    run_images(
        gpu,
        (spec, shape),
        (entry, (bias, false, LANES)),
        bindings,
        (total, workgroups),
        (0, shape.n),
    )
}

/// Output vec4s per invocation of the vec4 depthwise kernels: two where rows hold an even
/// number of them (each input vec4 then serves eight outputs), else one.
fn quads_per_block(shape: &Conv2dShape) -> usize {
    if shape.ow.is_multiple_of(8) { 2 } else { 1 }
}

/// Output rows per invocation of the depthwise row kernels: two where there are two or
/// more and the rows between them all serve one of them (no dilation, a stride no larger
/// than the filter), so that each input row is read once for both (N8 C64 56² 3×3 on
/// lavapipe: forward 3.6 → 2.9 ms, weight gradient 5.2 → 3.8; three or four rows were slower).
fn out_rows(spec: &Conv2d, shape: &Conv2dShape) -> usize {
    if shape.oh >= 2 && spec.dilation.0 == 1 && spec.stride.0 <= shape.kh {
        2
    } else {
        1
    }
}

/// A workgroup's lanes (`WORKGROUP_SMALL`).
const LANES: usize = WORKGROUP_SMALL as usize;

/// Lanes per channel in the depthwise weight gradients: on CPU adapters one subgroup (one
/// SIMD vector of lanes: 8 on lavapipe), so that a workgroup serves several channels and its
/// fixed costs (launch, zeroing, adding up every lane's sum of every tap) are shared among
/// them; lavapipe, 64 → 8 lanes: N8 C1152 7² 5×5 14.6 → 3.0 ms, N32 C144 56² 3×3 at
/// stride 2 28.4 → 19.8, N32 C64 56² 16.7–20.2 → 13.9, none slower. Elsewhere the whole
/// workgroup, which GPUs need to fill their cores.
fn channel_lanes(gpu: &Gpu) -> usize {
    let subgroup = gpu.fixed_subgroup_size().map(|size| size as usize);
    match subgroup {
        Some(size) if gpu.cpu_kernels() && size.is_power_of_two() && size <= LANES => size,
        _ => LANES,
    }
}

/// Inputs along a row per invocation of the depthwise row kernels (`DEPTHWISE_BLOCK`).
const DEPTHWISE_BLOCK: usize = 8;

/// Whether `depthwise_rows_dx` takes a depthwise layer's input gradient: a stride that
/// divides the block (so which taps meet which input is the same in every block) and the dy
/// values under a block (`DX_SEGMENT`) at most the 16 its registers hold. At stride 2 it
/// replaces `backward_data`'s gather per input pixel (N1 C96 112² 3×3: 7.2 → 1.9 ms).
fn dx_rows(spec: &Conv2d, shape: &Conv2dShape) -> bool {
    let (stride, dilation) = (spec.stride.1, spec.dilation.1);
    if !DEPTHWISE_BLOCK.is_multiple_of(stride) {
        return false;
    }
    let reach = (shape.kw - 1) * dilation;
    let shift = reach.div_ceil(stride) * stride;
    let first = (shape.pad_left + shift - reach).div_ceil(stride);
    let segment = (shape.pad_left + shift + DEPTHWISE_BLOCK - 1) / stride + 1 - first;
    segment <= 16
}

/// Whether a depthwise layer's rows are whole vec4s whose three aligned loads around a
/// block of four outputs cover every tap (`depthwise_rows4`, `depthwise_weight_grad4`).
fn quads(spec: &Conv2d, shape: &Conv2dShape) -> bool {
    spec.stride == (1, 1)
        && spec.dilation == (1, 1)
        && shape.w.is_multiple_of(4)
        && shape.ow.is_multiple_of(4)
        && shape.pad_left <= 4
        && shape.kw <= shape.pad_left + 5
}

/// Filters of one group a `grouped_rows4` invocation computes: 4, 2 or 1, whichever divides
/// the group's filters first (each input row it loads serves them all).
fn filter_run(shape: &Conv2dShape) -> usize {
    let filters = shape.o / shape.groups;
    [4, 2]
        .into_iter()
        .find(|run| filters.is_multiple_of(*run))
        .unwrap_or(1)
}

/// The most taps of a filter `grouped_rows4` holds (`GROUPED_MAX_TAPS`): 5×5.
const GROUPED_MAX_TAPS: usize = 25;

/// Whether `grouped_rows4` runs this grouped (not depthwise) convolution: depthwise_rows4's
/// shapes, and a channel loop within the loop bound (each channel: the input rows a block
/// meets, each taking every output row's taps of the filter run; counted as if none unrolled).
pub(crate) fn grouped_rows_fit(spec: &Conv2d, shape: &Conv2dShape) -> bool {
    let rows = out_rows(spec, shape);
    let per_row = 1 + rows * (1 + shape.kw * (1 + filter_run(shape)));
    let per_channel = shape.kh * shape.kw + (rows + shape.kh - 1) * per_row;
    !depthwise(shape)
        && quads(spec, shape)
        && shape.kh * shape.kw <= GROUPED_MAX_TAPS
        && shape.c / shape.groups * per_channel <= MAX_LOOP_ITERATIONS
}

/// Whether the row kernels take this grouped layer's whole backward pass: its weight
/// gradient and, if asked for, its input gradient.
pub(crate) fn grouped_rows_backward_fit(
    spec: &Conv2d,
    shape: &Conv2dShape,
    input_grad: bool,
) -> bool {
    grouped_rows_dw_fit(spec, shape) && (!input_grad || grouped_rows_dx_fit(spec, shape))
}

/// Whether `grouped_weight_grad4` takes this grouped layer's weight gradient: the forward
/// pass's row blocks, and a run's taps within a lane's sums (DEPTHWISE_MAX_TAPS).
fn grouped_rows_dw_fit(spec: &Conv2d, shape: &Conv2dShape) -> bool {
    grouped_rows_fit(spec, shape) && filter_run(shape) * shape.kh * shape.kw <= DEPTHWISE_MAX_TAPS
}

/// `grouped_weight_grad4` over the batch: `channel_lanes` lanes per unit (a filter run and
/// a channel of its group), in passes over runs of images within the loop bound (each lane
/// term: a block's dy rows, then every input row it meets, each taking every output row's
/// taps of every filter of the run).
fn grouped_weight_grad(
    spec: &Conv2d,
    shape: &Conv2dShape,
    x: &Tensor,
    dy: &Tensor,
    dweight: &Tensor,
) -> Result<()> {
    let (rows, run) = (out_rows(spec, shape), filter_run(shape));
    let lane_terms = shape.ow / (4 * quads_per_block(shape)) * shape.oh.div_ceil(rows);
    let per_term = run * rows + (rows + shape.kh - 1) * (rows * shape.kw * (1 + run) + 1) + 1;
    let lanes = channel_lanes(x.gpu());
    let (lanes, pass) = match terms_per_pass(lanes as u32) / (lane_terms * per_term) {
        0 => (
            LANES,
            terms_per_pass(LANES as u32) / (lane_terms * per_term),
        ),
        pass => (lanes, pass),
    };
    if pass == 0 {
        return Err(Error::InvalidArgument {
            op: "conv2d",
            detail: format!(
                "{} output rows of {} per image pass the grouped weight gradient's loop bound \
                 of {MAX_LOOP_ITERATIONS} per invocation",
                shape.oh, shape.ow
            ),
        });
    }
    let units = shape.o / run * (shape.c / shape.groups);
    let groups = units.div_ceil(LANES / lanes) as u64;
    for first in (0..shape.n).step_by(pass) {
        run_images(
            x.gpu(),
            (spec, shape),
            ("grouped_weight_grad4", (false, false, lanes)),
            &[
                (5, x.binding_vec4()),
                (7, dy.binding_vec4()),
                (4, dweight.binding()),
            ],
            (units, groups),
            (first, pass.min(shape.n - first)),
        )?;
    }
    Ok(())
}

/// `grouped_rows4`: `dst = act(conv(src, weight) + bias)` for a `shape` that
/// [`grouped_rows_fit`], one invocation per [`filter_run`] filters and a vec4 block of
/// outputs; `flip` runs the input gradient's rotated filters (`shape` then has the forward
/// pass's channels and filters swapped).
fn grouped_rows(
    gpu: &Gpu,
    (spec, shape): (&Conv2d, &Conv2dShape),
    (bias, flip): (Option<&Tensor>, bool),
    (src, weight, dst): (&Tensor, &Tensor, &Tensor),
) -> Result<()> {
    let vec4s = shape.o / filter_run(shape) * shape.c / shape.groups * shape.kh * shape.kw;
    let bank = Tensor::uninit(gpu, &[vec4s, 4])?;
    run_images(
        gpu,
        (spec, shape),
        ("grouped_bank", (false, flip, LANES)),
        &[(2, weight.binding()), (6, bank.binding_vec4())],
        (vec4s, small_workgroups(vec4s as u64)),
        (0, shape.n),
    )?;
    let rows = shape.oh.div_ceil(out_rows(spec, shape));
    let blocks = shape.ow / (4 * quads_per_block(shape)) * rows;
    let total = shape.n * shape.o / filter_run(shape) * blocks;
    run_images(
        gpu,
        (spec, shape),
        ("grouped_rows4", (bias.is_some(), flip, LANES)),
        &[
            (5, src.binding_vec4()),
            (8, bank.binding_vec4()),
            (3, bias.unwrap_or(&bank).binding()),
            (6, dst.binding_vec4()),
        ],
        (total, small_workgroups(total as u64)),
        (0, shape.n),
    )
}

/// `depthwise_rows`: `dst = act(conv(src, weight) + bias)` for a depthwise `shape`, one
/// invocation per eight outputs along a row; `flip` reads the taps rotated by 180°.
fn depthwise_rows(
    gpu: &Gpu,
    (spec, shape): (&Conv2d, &Conv2dShape),
    (bias, flip): (Option<&Tensor>, bool),
    (src, weight, dst): (&Tensor, &Tensor, &Tensor),
) -> Result<()> {
    let bias_slot = (3, bias.unwrap_or(weight).binding());
    let (entry, src_slot, dst_slot, blocks) = if quads(spec, shape) {
        let rows = shape.oh.div_ceil(out_rows(spec, shape));
        let blocks = shape.ow / (4 * quads_per_block(shape)) * rows;
        let slots = ((5, src.binding_vec4()), (6, dst.binding_vec4()));
        ("depthwise_rows4", slots.0, slots.1, blocks)
    } else {
        let blocks = shape.ow.div_ceil(DEPTHWISE_BLOCK) * shape.oh.div_ceil(out_rows(spec, shape));
        (
            "depthwise_rows",
            (1, src.binding()),
            (4, dst.binding()),
            blocks,
        )
    };
    let total = shape.n * shape.c * blocks;
    run_images(
        gpu,
        (spec, shape),
        (entry, (bias.is_some(), flip, LANES)),
        &[src_slot, (2, weight.binding()), bias_slot, dst_slot],
        (total, small_workgroups(total as u64)),
        (0, shape.n),
    )
}

/// [`run`] over the images `first .. first + count` only (the weight gradient's passes).
fn run_images(
    gpu: &Gpu,
    (spec, shape): (&Conv2d, &Conv2dShape),
    (entry, variant): (&str, (bool, bool, usize)),
    bindings: &[(u32, Binding<'_>)],
    (total, workgroups): (usize, u64),
    (first, count): (usize, usize),
) -> Result<()> {
    let params = GroupedParams {
        n: gpu_word("conv2d", count)?,
        total: gpu_word("conv2d", total)?,
        slope: spec.activation.slope(),
        first_image: gpu_word("conv2d", first)?,
    };
    let pipeline = gpu.specialized(
        "conv_grouped",
        entry,
        || {
            [
                include_str!("../../shaders/epilogue.wgsl"),
                include_str!("../../shaders/conv_grouped.wgsl"),
            ]
            .concat()
        },
        &constants(spec, shape, variant)?,
    )?;
    gpu.run_pass(entry, |pass| {
        gpu.encode_at(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            bindings,
            workgroups,
        )
    })
}

/// `out = act(conv(x, weight) + bias)` with groups.
pub(crate) fn forward(
    spec: &Conv2d,
    shape: &Conv2dShape,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    if depthwise(shape) {
        return depthwise_rows(x.gpu(), (spec, shape), (bias, false), (x, weight, out));
    }
    if grouped_rows_fit(spec, shape) {
        return grouped_rows(x.gpu(), (spec, shape), (bias, false), (x, weight, out));
    }
    // Without a bias the weights fill the (unread) bias slot.
    let bias_slot = bias.unwrap_or(weight);
    run(
        x.gpu(),
        (spec, shape),
        ("forward", bias.is_some()),
        &[
            (1, x.binding()),
            (2, weight.binding()),
            (3, bias_slot.binding()),
            (4, out.binding()),
        ],
        (out.len(), small_workgroups(out.len() as u64)),
    )
}

/// `out = act(out + bias)` in place, after the grouped im2col + matmul forward pass.
pub(crate) fn bias_activation(
    spec: &Conv2d,
    shape: &Conv2dShape,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    // Without a bias a one-element placeholder fills the (unread) bias slot: the output
    // itself cannot, being bound for writing.
    let placeholder;
    let bias_slot = match bias {
        Some(bias) => bias,
        None => {
            placeholder = Tensor::uninit(out.gpu(), &[1])?;
            &placeholder
        }
    };
    run(
        out.gpu(),
        (spec, shape),
        ("bias_activation", bias.is_some()),
        &[(3, bias_slot.binding()), (4, out.binding())],
        (out.len(), small_workgroups(out.len() as u64)),
    )
}

/// `dx` from `dy` with groups (`spec` without an activation).
pub(crate) fn backward_data(
    spec: &Conv2d,
    shape: &Conv2dShape,
    dy: &Tensor,
    weight: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    let rotated = rotated(spec, shape);
    if depthwise(shape) && !rotated && dx_rows(spec, shape) {
        let total = shape.n * shape.c * shape.h * shape.w.div_ceil(DEPTHWISE_BLOCK);
        return run(
            dy.gpu(),
            (spec, shape),
            ("depthwise_rows_dx", false),
            &[(1, dy.binding()), (2, weight.binding()), (4, dx.binding())],
            (total, small_workgroups(total as u64)),
        );
    }
    let (plain, transposed) = transposed(spec, shape);
    if depthwise(shape) && rotated {
        return depthwise_rows(
            dy.gpu(),
            (&plain, &transposed),
            (None, true),
            (dy, weight, dx),
        );
    }
    if rotated && grouped_rows_fit(&plain, &transposed) {
        return grouped_rows(
            dy.gpu(),
            (&plain, &transposed),
            (None, true),
            (dy, weight, dx),
        );
    }
    run(
        dy.gpu(),
        (spec, shape),
        ("backward_data", false),
        &[(1, dy.binding()), (2, weight.binding()), (4, dx.binding())],
        (dx.len(), small_workgroups(dx.len() as u64)),
    )
}

/// Whether `grouped_rows4` takes this grouped layer's input gradient (stride 1, with the
/// rotated filters).
pub(crate) fn grouped_rows_dx_fit(spec: &Conv2d, shape: &Conv2dShape) -> bool {
    let (plain, transposed) = transposed(spec, shape);
    rotated(spec, shape) && grouped_rows_fit(&plain, &transposed)
}

/// Whether dx at stride 1 is dy convolved with the rotated filters and padding k − 1 − p.
fn rotated(spec: &Conv2d, shape: &Conv2dShape) -> bool {
    spec.stride == (1, 1)
        && spec.dilation == (1, 1)
        && shape.pad_top < shape.kh
        && shape.pad_left < shape.kw
}

/// The input gradient at stride 1 as a convolution: no activation, and dy's channels as the
/// input's, dx's as the filters.
fn transposed(spec: &Conv2d, shape: &Conv2dShape) -> (Conv2d, Conv2dShape) {
    let plain = Conv2d {
        activation: crate::value::Activation::None,
        ..*spec
    };
    let transposed = Conv2dShape {
        c: shape.o,
        o: shape.c,
        h: shape.oh,
        w: shape.ow,
        oh: shape.h,
        ow: shape.w,
        pad_top: (shape.kh - 1).saturating_sub(shape.pad_top),
        pad_left: (shape.kw - 1).saturating_sub(shape.pad_left),
        ..*shape
    };
    (plain, transposed)
}

/// `dweight` from `x` and `dy` with groups: one workgroup per weight, in passes over runs
/// of images short enough that no lane walks past the loop bound (each pass adds to the
/// last).
pub(crate) fn weight_grad(
    spec: &Conv2d,
    shape: &Conv2dShape,
    x: &Tensor,
    dy: &Tensor,
    dweight: &Tensor,
) -> Result<()> {
    let positions = shape.positions();
    let budget = terms_per_pass(WORKGROUP_SMALL);
    if grouped_rows_dw_fit(spec, shape) {
        return grouped_weight_grad(spec, shape, x, dy, dweight);
    }
    // Depthwise: `channel_lanes` lanes per channel summing every tap. Each lane term's inner
    // loops: a block of DEPTHWISE_BLOCK outputs, its dy and then each kernel row's inputs and
    // taps; a vec4 block of OUT_ROWS rows, its dy rows and then every input row it meets,
    // each taking every output row's taps.
    let (entry, lane_terms, per_term, slots) = if quads(spec, shape) {
        let slots = [(5, x.binding_vec4()), (7, dy.binding_vec4())];
        let rows = out_rows(spec, shape);
        let lane_terms = shape.ow / (4 * quads_per_block(shape)) * shape.oh.div_ceil(rows);
        let per_term = rows + (rows + shape.kh - 1) * (rows * (shape.kw + 1) + 1) + 1;
        ("depthwise_weight_grad4", lane_terms, per_term, slots)
    } else {
        let slots = [(1, x.binding()), (2, dy.binding())];
        let lane_terms = shape.ow.div_ceil(DEPTHWISE_BLOCK) * shape.oh;
        let segment = (DEPTHWISE_BLOCK - 1) * spec.stride.1 + (shape.kw - 1) * spec.dilation.1 + 1;
        let per_term =
            DEPTHWISE_BLOCK + shape.kh * (1 + segment + shape.kw * (DEPTHWISE_BLOCK + 1)) + 1;
        ("depthwise_weight_grad", lane_terms, per_term, slots)
    };
    let depthwise_pass = budget / (lane_terms * per_term);
    if depthwise_rows_fit(shape) && depthwise_pass > 0 {
        // A channel's subgroup may not walk one image within the loop bound: then the workgroup.
        let (lanes, pass) = match channel_lanes(x.gpu()) {
            lanes if terms_per_pass(lanes as u32) >= lane_terms * per_term => (
                lanes,
                terms_per_pass(lanes as u32) / (lane_terms * per_term),
            ),
            _ => (LANES, depthwise_pass),
        };
        let groups = shape.c.div_ceil(LANES / lanes) as u64;
        for first in (0..shape.n).step_by(pass) {
            run_images(
                x.gpu(),
                (spec, shape),
                (entry, (false, false, lanes)),
                &[slots[0], slots[1], (4, dweight.binding())],
                (shape.c, groups),
                (first, pass.min(shape.n - first)),
            )?;
        }
        return Ok(());
    }
    if positions > budget {
        return Err(Error::InvalidArgument {
            op: "conv2d",
            detail: format!(
                "{positions} output positions per image pass the grouped weight gradient's \
                 loop bound of {MAX_LOOP_ITERATIONS} per invocation"
            ),
        });
    }
    let per_pass = budget / positions;
    for first in (0..shape.n).step_by(per_pass) {
        run_images(
            x.gpu(),
            (spec, shape),
            ("weight_grad", (false, false, LANES)),
            &[(1, x.binding()), (2, dy.binding()), (4, dweight.binding())],
            (dweight.len(), dweight.len() as u64),
            (first, per_pass.min(shape.n - first)),
        )?;
    }
    Ok(())
}
