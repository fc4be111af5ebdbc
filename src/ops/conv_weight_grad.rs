//! The weight gradient of small stride-1 convolutions, directly over the whole batch with no
//! im2col buffer (`shaders/conv_weight_grad_common.wgsl` followed by `conv_weight_grad.wgsl`,
//! or by `conv_weight_grad_subgroup.wgsl` on CPU adapters with fixed-size subgroups). Used by `Conv2d::backward` for the filter banks
//! the direct forward kernel takes; both kernels are generated per kernel size and
//! specialised per layer shape.

use std::fmt::Write;

use bytemuck::{Pod, Zeroable};

use super::conv_direct::{MAX_FILTERS, MAX_KERNEL_WIDTH};
use super::conv2d::{Conv2d, Conv2dShape};
use super::reduce::sum_axes;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::gpu::dispatch::Resource;
use crate::gpu::texture::{scalar_input, scalar_texture};
use crate::tensor::Tensor;

/// Mirrors `Params` in both weight-gradient shaders.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct WeightGradParams {
    work: u32,
    splits: u32,
    _pad: [u32; 2],
}

/// Outputs per invocation along a row.
const GRAD_BLOCK: usize = 8;

/// Workgroups the subgroup kernel aims for: fewer leave a CPU adapter's threads idle.
const TARGET_GROUPS: usize = 16;

/// Whether [`weight_grad`] handles this convolution's weight gradient.
pub(crate) fn eligible(spec: &Conv2d, shape: &Conv2dShape) -> bool {
    // Each (filter, channel) pair re-reads its inputs: worth it for small banks only.
    spec.stride == (1, 1)
        && spec.dilation == (1, 1)
        && shape.groups == 1
        && shape.o <= MAX_FILTERS
        && shape.c <= MAX_FILTERS
        && shape.kh <= MAX_KERNEL_WIDTH
        && shape.kw <= MAX_KERNEL_WIDTH
        && (shape.n * shape.oh * shape.ow.div_ceil(GRAD_BLOCK)) < u32::MAX as usize
}

/// The subgroup width the broadcast kernel would use on `gpu`, if it suits it.
fn broadcast_subgroup(gpu: &Gpu) -> Option<usize> {
    let size = gpu.fixed_subgroup_size()? as usize;
    // The block's input segment is spread over at most two loads per lane.
    (gpu.is_cpu_adapter()
        && (4..=32).contains(&size)
        && GRAD_BLOCK + MAX_KERNEL_WIDTH - 1 <= 2 * size)
        .then_some(size)
}

/// The lines accumulating one kernel row's taps: `g[ky·kw + kx] += Σ_j d_j · r_{j+kx}`.
fn tap_sums(body: &mut String, ky: usize, kw: usize) {
    for kx in 0..kw {
        let terms: Vec<String> = (0..GRAD_BLOCK)
            .map(|j| format!("d{j} * r{}", j + kx))
            .collect();
        let _ = writeln!(
            body,
            "            g{} += {};",
            ky * kw + kx,
            terms.join(" + ")
        );
    }
}

/// The source of either kernel; `subgroup` picks the broadcast variant of that width,
/// `textures` reads x and dy through textures.
fn source(kh: usize, kw: usize, subgroup: Option<usize>, textures: bool) -> String {
    let b = GRAD_BLOCK;
    let (mut decls, mut body, mut store) = (String::new(), String::new(), String::new());
    for k in 0..kh * kw {
        let _ = writeln!(decls, "    var g{k} = 0.0;");
        let _ = writeln!(store, "    partial[lindex * TAPS + {k}u] = g{k};");
    }
    for j in 0..b {
        let _ = writeln!(
            body,
            "        let d{j} = select(0.0, load_dy(dy_row + {j}u), ox0 + {j}u < OW);"
        );
    }
    for ky in 0..kh {
        let _ = writeln!(
            body,
            "        {{\n            let iy = i32(oy + {ky}u) - i32(PAD_TOP);\n            let inside = iy >= 0 && iy < i32(H);\n            let row = ((n * C + c) * H + u32(max(iy, 0))) * W;"
        );
        let inputs = b + kw - 1;
        match subgroup {
            None => {
                for m in 0..inputs {
                    let _ = writeln!(
                        body,
                        "            let r{m} = fetch(row, left + {m}, inside);"
                    );
                }
            }
            Some(size) => {
                for v in 0..inputs.div_ceil(size) {
                    let _ = writeln!(
                        body,
                        "            let v{v} = fetch(row, left + i32(lane + {}u), inside);",
                        v * size
                    );
                }
                for m in 0..inputs {
                    let _ = writeln!(
                        body,
                        "            let r{m} = subgroupBroadcast(v{}, {}u);",
                        m / size,
                        m % size
                    );
                }
            }
        }
        tap_sums(&mut body, ky, kw);
        let _ = writeln!(body, "        }}");
    }
    let kernel = match subgroup {
        None => include_str!("../../shaders/conv_weight_grad.wgsl"),
        Some(_) => include_str!("../../shaders/conv_weight_grad_subgroup.wgsl"),
    };
    [
        include_str!("../../shaders/conv_weight_grad_common.wgsl"),
        kernel,
    ]
    .concat()
    .replace("{{INPUT_X}}", &scalar_input("x", 1, textures))
    .replace("{{INPUT_DY}}", &scalar_input("dy", 2, textures))
    .replace("{{TAPS}}", &(kh * kw).to_string())
    .replace("{{PARTIALS}}", &(64 * kh * kw).to_string())
    .replace("{{SUBGROUP}}", &subgroup.unwrap_or(0).to_string())
    .replace("{{BLOCK}}", &b.to_string())
    .replace("{{DECLS}}", &decls)
    .replace("{{BODY}}", &body)
    .replace("{{STORE}}", &store)
}

/// `dweight` from `x` and `dy` over the whole batch (the caller checked [`eligible`]).
pub(crate) fn weight_grad(
    shape: &Conv2dShape,
    x: &Tensor,
    dy: &Tensor,
    dweight: &Tensor,
) -> Result<()> {
    run(shape, x, dy, dweight, broadcast_subgroup(x.gpu()))
}

/// [`weight_grad`] with the kernel chosen: the broadcast one for subgroups of `subgroup`
/// lanes, or the portable one.
fn run(
    shape: &Conv2dShape,
    x: &Tensor,
    dy: &Tensor,
    dweight: &Tensor,
    subgroup: Option<usize>,
) -> Result<()> {
    let gpu = x.gpu();
    let blocks = shape.ow.div_ceil(GRAD_BLOCK);
    let work = shape.n * shape.oh * blocks;
    let filter_groups = subgroup.map_or(1, |size| shape.o.div_ceil(size));
    let (groups, splits) = match subgroup {
        // One workgroup per (filter, channel) pair.
        None => (shape.o * shape.c, 1),
        // One per (channel, filter group, split); enough splits to keep the threads busy,
        // but no more than there are blocks for every subgroup.
        Some(size) => {
            let per_split = shape.c * filter_groups;
            let most = work.div_ceil(64 / size).max(1);
            let splits = TARGET_GROUPS.div_ceil(per_split).min(most);
            (per_split * splits, splits)
        }
    };
    let params = WeightGradParams {
        work: work as u32,
        splits: splits as u32,
        _pad: [0; 2],
    };
    let mut constants = vec![
        ("C", shape.c),
        ("H", shape.h),
        ("W", shape.w),
        ("O", shape.o),
        ("OH", shape.oh),
        ("OW", shape.ow),
        ("PAD_TOP", shape.pad_top),
        ("PAD_LEFT", shape.pad_left),
        ("BLOCKS", blocks),
    ];
    if subgroup.is_some() {
        constants.push(("FILTER_GROUPS", filter_groups));
    }
    let constants: Vec<(&str, u32)> = constants
        .into_iter()
        .map(|(name, value)| (name, value as u32))
        .collect();
    // x and dy through textures where the adapter fetches texels faster.
    let textures = match (scalar_texture(x)?, scalar_texture(dy)?) {
        (Some(x_tex), Some(dy_tex)) => Some((x_tex, dy_tex)),
        _ => None,
    };
    let key = format!(
        "conv_weight_grad_{}x{}_s{}{}",
        shape.kh,
        shape.kw,
        subgroup.unwrap_or(0),
        if textures.is_some() { "_tex" } else { "" }
    );
    let pipeline = gpu.specialized(
        &key,
        "main",
        || source(shape.kh, shape.kw, subgroup, textures.is_some()),
        &constants,
    )?;
    // With several splits the kernel writes [split][O][C][taps] partial sums, added below.
    let partials = if splits > 1 {
        Some(Tensor::uninit(gpu, &[splits, dweight.len()])?)
    } else {
        None
    };
    let out = partials.as_ref().unwrap_or(dweight);
    let (x_in, dy_in) = match &textures {
        Some((x_tex, dy_tex)) => (
            Resource::Texture(&x_tex.view),
            Resource::Texture(&dy_tex.view),
        ),
        None => (
            Resource::Buffer(x.binding()),
            Resource::Buffer(dy.binding()),
        ),
    };
    let copies = |encoder: &mut wgpu::CommandEncoder| {
        if let Some((x_tex, dy_tex)) = &textures {
            x_tex.copy_from(encoder, x.binding(), x.len() as u64);
            dy_tex.copy_from(encoder, dy.binding(), dy.len() as u64);
        }
        Ok(())
    };
    gpu.run_pass_after("conv2d weight gradient", copies, |pass| {
        gpu.encode_resources(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &[(1, x_in), (2, dy_in), (3, Resource::Buffer(out.binding()))],
            groups as u64,
        )
    })?;
    if let Some(partials) = &partials {
        sum_axes(
            gpu,
            partials,
            (splits, dweight.len(), 1),
            dweight,
            1.0,
            false,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuOptions, OperandReads};
    use crate::ops::conv2d::{Padding, conv2d_backward_cpu};
    use crate::test_support::random;

    /// Both kernels (the broadcast one where the adapter has fixed-size subgroups) against
    /// the CPU reference, on LeNet's layers and on sizes that fill no block or subgroup,
    /// reading their inputs from storage buffers and from textures.
    #[test]
    fn both_kernels_match_the_cpu() {
        for reads in [OperandReads::Storage, OperandReads::Texture] {
            let options = GpuOptions {
                operand_reads: Some(reads),
                ..GpuOptions::from_env().unwrap()
            };
            let Some(gpu) = crate::test_support::gpu(options) else {
                return;
            };
            both_kernels_match_the_cpu_on(&gpu);
        }
    }

    fn both_kernels_match_the_cpu_on(gpu: &Gpu) {
        let mut kernels = vec![None];
        if let Some(size) = gpu.fixed_subgroup_size() {
            kernels.push(Some(size as usize));
        }
        // (n, c, h, w, o, kh, kw, padding)
        let cases = [
            (4, 1, 28, 28, 6, 5, 5, Padding::Explicit(0, 0)),
            (3, 6, 12, 12, 16, 5, 5, Padding::Explicit(0, 0)),
            (2, 3, 9, 13, 11, 3, 4, Padding::Explicit(1, 2)),
            (5, 2, 7, 6, 9, 7, 7, Padding::Same),
            (1, 16, 5, 19, 1, 1, 3, Padding::Explicit(0, 1)),
        ];
        for (i, &(n, c, h, w, o, kh, kw, padding)) in cases.iter().enumerate() {
            let spec = Conv2d {
                padding,
                ..Conv2d::default()
            };
            let seed = 10 * i as u64;
            let (x, weight) = (
                random(&[n, c, h, w], seed),
                random(&[o, c, kh, kw], seed + 1),
            );
            let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
            assert!(eligible(&spec, &shape));
            let dy = random(&shape.output(), seed + 2);
            let want = conv2d_backward_cpu(&spec, &x.view(), &weight.view(), &dy.view())
                .unwrap()
                .weight;
            let (tx, tdy) = (
                Tensor::from_array(gpu, &x).unwrap(),
                Tensor::from_array(gpu, &dy).unwrap(),
            );
            for &subgroup in &kernels {
                let dweight = Tensor::from_array(gpu, &weight.mapv(|_| f32::NAN)).unwrap();
                run(&shape, &tx, &tdy, &dweight, subgroup).unwrap();
                let got = dweight.to_array().unwrap();
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "case {i}: unwritten outputs"
                );
                let diff = (&got - &want).mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
                let terms = (n * shape.oh * shape.ow) as f32;
                assert!(
                    diff <= 1e-5 * terms.sqrt() * 4.0,
                    "case {i}, subgroup {subgroup:?}, {:?}: {diff}",
                    gpu.operand_reads()
                );
            }
        }
    }
}
