//! The weight and bias gradients of small stride-1 convolutions, directly over the whole
//! batch with no im2col buffer (`shaders/conv_weight_grad_common.wgsl` followed by
//! `conv_weight_grad.wgsl`, or by `conv_weight_grad_subgroup.wgsl` on CPU adapters with
//! fixed-size subgroups), optionally through the layer's activation so that it needs no
//! backward pass of its own. Used by `Conv2d::gradients` for the filter banks the direct
//! forward kernel takes; both kernels are generated per kernel size and variant and
//! specialised per layer shape.

use std::fmt::Write;

use bytemuck::{Pod, Zeroable};

use super::conv_direct::{MAX_FILTERS, MAX_KERNEL_WIDTH, vec4_rows_input};
use super::conv2d::{Conv2d, Conv2dShape};
use super::reduce::sum_axes;
use crate::error::Result;
use crate::gpu::Commands;
use crate::gpu::dispatch::Resource;
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, WORKGROUP_SMALL};
use crate::gpu::texture::{Texel, TextureInputs, scalar_input, vec4_input};
use crate::gpu::{Generated, Gpu};
use crate::tensor::{Tensor, gpu_word};
use crate::value::Activation;

const OP: &str = "conv2d weight gradient";

/// Mirrors `Params` in both weight-gradient shaders.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct WeightGradParams {
    work: u32,
    splits: u32,
    slope: f32,
    _pad: u32,
}

/// The activation fused into the layer, which the gradient flows back through: the kernel
/// reads `dz = dy · act'(y)` from the layer's output `y`, and stores `dz` where asked (for
/// the input gradient).
pub(crate) struct Gate<'a> {
    pub activation: Activation,
    pub y: &'a Tensor,
    pub dz: Option<&'a Tensor>,
    /// Where `dy` and `y` are max pooling's gradient and output over the layer's output (the
    /// pooling took the activation; [`pooled_fits`]): the windows' arg-max.
    pub argmax: Option<&'a Tensor>,
}

/// Whether the kernels take `dz` from max pooling's backward pass over this output: 2×2
/// windows at stride 2 that tile it, rows of whole vec4s (so each vec4 of dz spans two
/// windows).
pub(crate) fn pooled_fits(shape: &Conv2dShape) -> bool {
    shape.oh.is_multiple_of(2) && shape.ow.is_multiple_of(4)
}

/// What the kernel writes: the weight and bias gradients.
pub(crate) struct WeightAndBias<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
}

/// Outputs per invocation along a row in the portable kernel.
const GRAD_BLOCK: usize = 8;

/// The blocks a subgroup of the broadcast kernel may walk a row in, longest first: each
/// input segment and dz value loaded serves more products. On lavapipe (ResNet-20, 7 passes
/// a step) blocks of 16 took 160–162 ms against 8's 173–182, and 32 154–155 against 16's
/// 160–170 (24, which its 32-wide rows do not divide, 213).
const BROADCAST_BLOCKS: [usize; 3] = [32, 16, GRAD_BLOCK];
const _: () = assert!(GRAD_BLOCK.is_multiple_of(4));

/// The block for `shape`: in the broadcast kernel the longest that divides the output's
/// rows (else the shortest) with no more dz values per lane than one filter's longest block
/// (`filters` per lane share it), `GRAD_BLOCK` in the portable one. Every block is a
/// multiple of 4, so blocks start on vec4s.
fn grad_block(shape: &Conv2dShape, subgroup: Option<usize>, filters: usize) -> usize {
    match subgroup {
        Some(_) => BROADCAST_BLOCKS
            .into_iter()
            .filter(|b| b * filters <= BROADCAST_BLOCKS[0])
            .find(|b| shape.ow.is_multiple_of(*b))
            .unwrap_or(GRAD_BLOCK),
        None => GRAD_BLOCK,
    }
}

/// Filters a lane of the broadcast kernel sums for where a subgroup's lanes have more than
/// one each: every input value broadcast then serves that many more products. On lavapipe
/// (ResNet-20's 16-channel layers, N128 32², blocks of 16 against one filter's 32) a pass
/// took 0.77–0.94× the time, the 3→16 stem 0.78–0.87×; blocks of 32 with two filters were
/// slower than one filter's.
const LANE_FILTERS: usize = 2;

/// The filters per lane for `shape` in the broadcast kernel of `size` lanes: one where the
/// lanes have a filter each, else [`LANE_FILTERS`].
fn lane_filters(shape: &Conv2dShape, size: usize) -> usize {
    if shape.o > size { LANE_FILTERS } else { 1 }
}

/// Channels a lane of the broadcast kernel sums for at most: each dz value it loads serves
/// them all. On lavapipe (ResNet-20's first stage, N128 16→16 32²) two took the backward
/// pass from 62–70 to 55–66 ms; three, four and seven were no faster than two.
const RUN_CHANNELS: usize = 2;

/// Tap sums a lane of the broadcast kernel keeps at most (filters × channels × taps), past
/// which a second channel is left out: LeNet's 6→16 5×5 layer, two filters and two channels
/// a lane (100 sums), compiled in 310–440 ms of lavapipe's JIT and one channel in 160–190,
/// its weight gradient as fast (1.38–1.47 against 1.48–1.84 ms a pass). ResNet-20's 3×3
/// layers keep two (36).
const MOST_LANE_SUMS: usize = 64;

/// Workgroups the broadcast kernel aims for: on a CPU adapter two per thread of the host
/// (such an adapter runs a workgroup per thread at a time; the second evens out their
/// finishing times), elsewhere the adapter's target. More splits than that cost a pass adding
/// up their sums and no speed: at a fixed 16 on the 2-core Xeon host, LeNet's 6→16 layer
/// split in three, its gradient and that sum took 0.80–0.83 ms a step (`perf --profile`)
/// against 0.64–0.72 in one split of six workgroups, and ResNet-20's seven passes 145–159
/// against 140–147 ms.
fn target_groups(gpu: &Gpu) -> usize {
    if gpu.adapter_info().device_type == wgpu::DeviceType::Cpu {
        2 * std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        gpu.target_workgroups()
    }
}

/// Whether [`weight_and_bias_grad`] handles this convolution's weight gradient.
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
    (gpu.cpu_kernels() && (4..=32).contains(&size)).then_some(size)
}

/// The lines accumulating one kernel row's taps of the run's channel `k` over a block of
/// `b` outputs, for each of `filters` filters f: `g_fk[ky·kw + kx] += Σ_j d_fj · r_{j+kx}`.
fn tap_sums(body: &mut String, (k, ky, kw): (usize, usize, usize), b: usize, filters: usize) {
    for f in 0..filters {
        for kx in 0..kw {
            let terms: Vec<String> = (0..b).map(|j| format!("d{f}_{j} * r{}", j + kx)).collect();
            let _ = writeln!(
                body,
                "            g{f}_{k}_{} += {};",
                ky * kw + kx,
                terms.join(" + ")
            );
        }
    }
}

/// What a generated kernel reads and writes besides x and the sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    /// dz = dy · act'(y) instead of dy.
    gated: bool,
    /// dz stored (gated only).
    store_dz: bool,
    /// dy, y and dz read and written as vec4s (rows of whole vec4s, from storage buffers or
    /// rgba32float textures): a quarter of the per-lane loads, the cost that bounds this
    /// kernel on CPU adapters.
    vec4: bool,
    /// dz is max pooling's backward pass over 2×2 windows at stride 2 that tile the output
    /// (vec4 rows): dy and y are the pooled gradient and output, read from storage as vec2s,
    /// and the windows' arg-max comes at binding 7; each vec4 of dz takes two windows'
    /// gradients at their maxima, zeros elsewhere. The pooling then needs no pass of its own.
    pooled: bool,
}

impl Variant {
    /// The declarations of dy, y and dz, and `load_dz` or `load_dz4`; dy and y from
    /// storage or, with `textures`, textures.
    fn declarations(self, textures: bool) -> String {
        let mut out = String::new();
        let gate = "activation_derivative({Y}, ACT, p.slope)";
        if self.pooled {
            out.push_str(POOLED_DZ);
        } else if self.vec4 {
            out.push_str(&vec4_input("dy", 2, textures));
            let value = if self.gated {
                out.push_str(&vec4_input("y", 4, textures));
                let derivatives: Vec<String> = ["x", "y", "z", "w"]
                    .iter()
                    .map(|c| gate.replace("{Y}", &format!("y4.{c}")))
                    .collect();
                format!(
                    "let y4 = load_y(i);\n    return load_dy(i) * vec4<f32>({});",
                    derivatives.join(", ")
                )
            } else {
                "return load_dy(i);".into()
            };
            let _ = writeln!(out, "fn load_dz4(i: u32) -> vec4<f32> {{\n    {value}\n}}");
        } else {
            out.push_str(&scalar_input("dy", 2, textures));
            let value = if self.gated {
                out.push_str(&scalar_input("y", 4, textures));
                format!("load_dy(i) * {}", gate.replace("{Y}", "load_y(i)"))
            } else {
                "load_dy(i)".into()
            };
            let _ = writeln!(out, "fn load_dz(i: u32) -> f32 {{ return {value}; }}");
        }
        if self.store_dz {
            let element = if self.vec4 { "vec4<f32>" } else { "f32" };
            let _ = writeln!(
                out,
                "@group(0) @binding(5) var<storage, read_write> dz: array<{element}>;"
            );
        }
        out
    }

    /// The lines loading filter `f`'s dz values `d{f}_0`, `d{f}_1`, … of a block of `b` (zero
    /// past the row's end) from `dy_row{f}`, storing them where `owns_dz{f}` asks, and adding
    /// them to its bias sum.
    fn block_loads(self, body: &mut String, b: usize, f: usize) {
        if self.vec4 {
            for q in 0..b / 4 {
                let inside = format!("ox0 + {}u < OW", 4 * q);
                let _ = writeln!(
                    body,
                    "        let q{f}_{q} = select(vec4<f32>(0.0), load_dz4(select(0u, dy_row{f} / 4u + {q}u, {inside})), {inside});"
                );
                if self.store_dz {
                    let _ = writeln!(
                        body,
                        "        if owns_dz{f} && {inside} {{ dz[dy_row{f} / 4u + {q}u] = q{f}_{q}; }}"
                    );
                }
                for (k, c) in ["x", "y", "z", "w"].iter().enumerate() {
                    let _ = writeln!(body, "        let d{f}_{} = q{f}_{q}.{c};", 4 * q + k);
                }
            }
            let quads: Vec<String> = (0..b / 4).map(|q| format!("q{f}_{q}")).collect();
            let _ = writeln!(
                body,
                "        bias_sum{f} += dot({}, vec4<f32>(1.0));",
                quads.join(" + ")
            );
            return;
        }
        for j in 0..b {
            let inside = format!("ox0 + {j}u < OW");
            let _ = writeln!(
                body,
                "        let d{f}_{j} = select(0.0, load_dz(select(0u, dy_row{f} + {j}u, {inside})), {inside});"
            );
            if self.store_dz {
                let _ = writeln!(
                    body,
                    "        if owns_dz{f} && {inside} {{ dz[dy_row{f} + {j}u] = d{f}_{j}; }}"
                );
            }
        }
        let terms: Vec<String> = (0..b).map(|j| format!("d{f}_{j}")).collect();
        let _ = writeln!(body, "        bias_sum{f} += {};", terms.join(" + "));
    }
}

/// The pooled variant's inputs and `load_dz4` (every pooled variant is gated: without an
/// activation, `ACT` is none and the derivative 1).
const POOLED_DZ: &str = "@group(0) @binding(2) var<storage, read> dy2: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> y2: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read> argmax2: array<vec2<f32>>;
// Vec4 number i of dz (row (n·O + o)·OH + oy, its vec4 q): the gradients of the pooled row
// oy / 2's windows 2q and 2q + 1 (vec2 number q of that row), each at its window's arg-max
// (an index in the plane).
fn load_dz4(i: u32) -> vec4<f32> {
    let row = i / (OW / 4u);
    let q = i % (OW / 4u);
    let oy = row % OH;
    let at = ((row / OH) * (OH / 2u) + oy / 2u) * (OW / 4u) + q;
    let y = y2[at];
    let g = dy2[at] * vec2<f32>(activation_derivative(y.x, ACT, p.slope),
                                activation_derivative(y.y, ACT, p.slope));
    let best = vec2<u32>(argmax2[at]);
    let first = oy * OW + 4u * q;
    return vec4<f32>(select(0.0, g.x, best.x == first), select(0.0, g.x, best.x == first + 1u),
                     select(0.0, g.y, best.y == first + 2u), select(0.0, g.y, best.y == first + 3u));
}
";

/// One generated weight-gradient kernel: everything its source depends on.
#[derive(Debug)]
struct WeightGradKernel {
    kh: usize,
    kw: usize,
    /// Outputs per work item along a row ([`grad_block`]).
    block: usize,
    /// The broadcast variant of this subgroup width, or the portable one.
    subgroup: Option<usize>,
    /// Channels each invocation sums for (1 in the portable kernel).
    channels: usize,
    /// Filters each invocation sums for, a subgroup apart (1 in the portable kernel).
    filters: usize,
    /// x read through a texture (rgba32float where `x_skew` reads vec4s, else r32float).
    x_texture: bool,
    /// dy and y read through textures: rgba32float where the variant reads vec4s, else
    /// r32float.
    dz_textures: bool,
    /// x read as rows of whole vec4s by the broadcast kernel, the block's input segment
    /// starting this many values into its first vec4 (where the left padding leaves it; blocks
    /// start on vec4s). Only as many lanes load as the segment spans: on lavapipe each lane's
    /// load costs the same for a vec4 as for a float, and these loads bound the kernel.
    x_skew: Option<usize>,
    variant: Variant,
}

impl Generated for WeightGradKernel {
    fn source(&self) -> String {
        source(self)
    }
}

/// The source of either kernel (see [`WeightGradKernel`]).
fn source(kernel: &WeightGradKernel) -> String {
    let &WeightGradKernel {
        kh,
        kw,
        block: b,
        subgroup,
        channels,
        filters,
        x_texture,
        dz_textures,
        x_skew,
        variant,
    } = kernel;
    let taps = kh * kw;
    let (mut decls, mut body, mut store) = (String::new(), String::new(), String::new());
    for k in 0..channels {
        // Channels past the last read the last one; their sums are never stored.
        let _ = writeln!(decls, "    let c{k} = min(c_first + {k}u, C - 1u);");
    }
    for f in 0..filters {
        if subgroup.is_some() {
            let o = format!("o_first + {f}u * SUBGROUP");
            let _ = writeln!(decls, "    let o{f} = min({o}, O - 1u);");
            let _ = writeln!(decls, "    let owns_dz{f} = c_first == 0u && {o} < O;");
        }
        for k in 0..channels {
            for tap in 0..taps {
                let _ = writeln!(decls, "    var g{f}_{k}_{tap} = 0.0;");
                let _ = writeln!(
                    store,
                    "    partial[lindex * SLOTS + {f}u * PER_FILTER + {}u] = g{f}_{k}_{tap};",
                    k * taps + tap
                );
            }
        }
        let _ = writeln!(decls, "    var bias_sum{f} = 0.0;");
        let _ = writeln!(
            store,
            "    partial[lindex * SLOTS + {f}u * PER_FILTER + TAPS * CHANNELS] = bias_sum{f};"
        );
        let _ = writeln!(
            body,
            "        let dy_row{f} = ((n * O + o{f}) * OH + oy) * OW + ox0;"
        );
        variant.block_loads(&mut body, b, f);
    }
    if let Some(skew) = x_skew {
        let _ = writeln!(body, "        let x_q0 = (left - {skew}) / 4;");
    }
    for ky in 0..kh {
        let _ = writeln!(
            body,
            "        {{\n            let iy = i32(oy + {ky}u) - i32(PAD_TOP);\n            let inside = iy >= 0 && iy < i32(H);"
        );
        for k in 0..channels {
            row_taps(&mut body, (k, ky, kw), (b, filters), (subgroup, x_skew));
        }
        let _ = writeln!(body, "        }}");
    }
    let kernel = match subgroup {
        None => include_str!("../../shaders/conv_weight_grad.wgsl"),
        Some(_) => include_str!("../../shaders/conv_weight_grad_subgroup.wgsl"),
    };
    [
        include_str!("../../shaders/epilogue.wgsl"),
        include_str!("../../shaders/conv_weight_grad_common.wgsl"),
        kernel,
    ]
    .concat()
    .replace("{{INPUT_X}}", &x_input(x_texture, x_skew.is_some()))
    .replace("{{DZ}}", &variant.declarations(dz_textures))
    .replace("{{TAPS}}", &taps.to_string())
    .replace("{{CHANNELS}}", &channels.to_string())
    .replace(
        "{{PARTIALS}}",
        &(WORKGROUP_SMALL as usize * (taps * channels + 1) * filters).to_string(),
    )
    .replace("{{FILTERS}}", &filters.to_string())
    .replace("{{SUBGROUP}}", &subgroup.unwrap_or(0).to_string())
    .replace("{{BLOCK}}", &b.to_string())
    .replace("{{DECLS}}", &decls)
    .replace("{{BODY}}", &body)
    .replace("{{STORE}}", &store)
}

/// x's binding with `load_x(i)` (which conv_weight_grad_common.wgsl's `fetch` reads), and
/// where it is read as vec4 rows `fetch4` too.
fn x_input(textures: bool, vec4_rows: bool) -> String {
    if vec4_rows {
        return format!(
            "{}fn load_x(i: u32) -> f32 {{ return load_x4(i >> 2u)[i & 3u]; }}\n",
            vec4_rows_input(textures)
        );
    }
    scalar_input("x", 1, textures)
}

/// The lines of kernel row `ky` for the run's channel `k`, in a block of their own: the input
/// segment the block of outputs sees (loaded per lane, or once per subgroup and broadcast;
/// as vec4s by the lanes it spans where `x_skew` says where it starts) and its tap sums.
fn row_taps(
    body: &mut String,
    (k, ky, kw): (usize, usize, usize),
    (b, filters): (usize, usize),
    (subgroup, x_skew): (Option<usize>, Option<usize>),
) {
    let _ = writeln!(
        body,
        "            {{\n            let row = ((n * C + c{k}) * H + u32(max(iy, 0))) * W;"
    );
    let inputs = b + kw - 1;
    match (subgroup, x_skew) {
        (Some(size), Some(skew)) => {
            let vec4s = (skew + inputs).div_ceil(4);
            for v in 0..vec4s.div_ceil(size) {
                let first = v * size;
                let _ = writeln!(
                    body,
                    "            var v{v} = vec4<f32>(0.0);\n            \
                     if lane + {first}u < {vec4s}u {{ v{v} = fetch4(row / 4u, x_q0 + i32(lane + {first}u), inside); }}"
                );
            }
            for m in 0..inputs {
                let at = (skew + m) / 4;
                let _ = writeln!(
                    body,
                    "            let r{m} = subgroupBroadcast(v{}[{}], {}u);",
                    at / size,
                    (skew + m) % 4,
                    at % size
                );
            }
        }
        (None, _) => {
            for m in 0..inputs {
                let _ = writeln!(
                    body,
                    "            let r{m} = fetch(row, left + {m}, inside);"
                );
            }
        }
        (Some(size), None) => {
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
    tap_sums(body, (k, ky, kw), b, filters);
    let _ = writeln!(body, "            }}");
}

/// Channels each lane of the broadcast kernel sums for with `filters` filters: up to
/// RUN_CHANNELS, as many as the workgroup's partial sums and MOST_LANE_SUMS leave room for.
fn run_channels(gpu: &Gpu, shape: &Conv2dShape, filters: usize) -> usize {
    let taps = shape.kh * shape.kw;
    let floats = gpu.limits().max_compute_workgroup_storage_size as usize / 4;
    let per_filter = floats / WORKGROUP_SMALL as usize / filters;
    let fit = per_filter.saturating_sub(1) / taps;
    let kept = MOST_LANE_SUMS / (filters * taps);
    RUN_CHANNELS.min(fit).min(kept).min(shape.c).max(1)
}

/// The weight and bias gradients from `x` and `dy` over the whole batch, through `gate`'s
/// activation where given (the caller checked [`eligible`]).
pub(crate) fn weight_and_bias_grad(
    shape: &Conv2dShape,
    x: &Tensor,
    dy: &Tensor,
    gate: Option<Gate<'_>>,
    out: WeightAndBias<'_>,
) -> Result<()> {
    let subgroup = broadcast_subgroup(x.gpu());
    let filters = subgroup.map_or(1, |size| lane_filters(shape, size));
    run(shape, x, dy, gate, out, (subgroup, filters))
}

/// [`weight_and_bias_grad`] with the kernel chosen: the broadcast one for subgroups of
/// `subgroup` lanes with `filters` filters per lane, or the portable one (one filter).
fn run(
    shape: &Conv2dShape,
    x: &Tensor,
    dy: &Tensor,
    gate: Option<Gate<'_>>,
    out: WeightAndBias<'_>,
    (subgroup, filters): (Option<usize>, usize),
) -> Result<()> {
    let gpu = x.gpu();
    let filters = if subgroup.is_some() { filters } else { 1 };
    let block = grad_block(shape, subgroup, filters);
    let blocks = shape.ow.div_ceil(block);
    let work = shape.n * shape.oh * blocks;
    let filter_groups = subgroup.map_or(1, |size| shape.o.div_ceil(size * filters));
    let channels = subgroup.map_or(1, |_| run_channels(gpu, shape, filters));
    let channel_runs = shape.c.div_ceil(channels);
    // A lane walks work items, then its workgroup adds up WORKGROUP_SMALL partial sums: at
    // least enough splits that no lane walks past the loop bound.
    let walkers = subgroup.map_or(WORKGROUP_SMALL as usize, |size| {
        WORKGROUP_SMALL as usize / size
    });
    let bounded = work.div_ceil(walkers * (MAX_LOOP_ITERATIONS - WORKGROUP_SMALL as usize));
    // No split walks fewer than one work item per lane.
    let most = work.div_ceil(walkers).max(1);
    let (groups, splits) = match subgroup {
        // One workgroup per (filter, channel) pair and split, the batch split until there
        // are enough workgroups to fill a GPU.
        None => {
            let pairs = shape.o * shape.c;
            let splits = gpu
                .target_workgroups()
                .div_ceil(pairs)
                .min(most)
                .max(bounded);
            (pairs * splits, splits)
        }
        // One per (run of channels, filter group, split); enough splits to keep the
        // threads busy, but no more than there are blocks for every subgroup.
        Some(_) => {
            let per_split = channel_runs * filter_groups;
            let splits = target_groups(gpu)
                .div_ceil(per_split)
                .min(most)
                .max(bounded);
            (per_split * splits, splits)
        }
    };
    let activation = gate.as_ref().map_or(Activation::None, |g| g.activation);
    let params = WeightGradParams {
        work: gpu_word(OP, work)?,
        splits: splits as u32,
        slope: activation.slope(),
        _pad: 0,
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
        ("ACT", activation.code() as usize),
    ];
    if subgroup.is_some() {
        constants.push(("FILTER_GROUPS", filter_groups));
    }
    // Split, the kernel stores each split's bias sums after its weight sums, so that one pass
    // adds up both (a pass costs 50–90 µs on lavapipe even when tiny; the two copies out of
    // its sum do not run on its threads).
    constants.push(("BIAS_IN_DW", usize::from(splits > 1)));
    let constants: Vec<(&str, u32)> = constants
        .into_iter()
        .map(|(name, value)| (name, value as u32))
        .collect();
    // Blocks start on vec4s (each is a multiple of 4), so in the broadcast kernel, where rows
    // of x are whole vec4s, every block's segment starts as far into its vec4 as the left
    // padding puts the first one's, and is read as vec4s.
    let x_skew =
        (subgroup.is_some() && shape.w.is_multiple_of(4)).then_some((4 - shape.pad_left % 4) % 4);
    // x (bound at 1) and dy and y (2 and 4) through textures where the adapter fetches
    // texels faster, as vec4s where their rows are whole vec4s (rows of dy then start at
    // vec4 boundaries, as blocks do), else as floats. Each group all or none.
    let texel = |vec4: bool| if vec4 { Texel::Vec4 } else { Texel::Scalar };
    let x_input = TextureInputs::new([(1, x)], texel(x_skew.is_some()))?;
    let vec4 = shape.ow.is_multiple_of(4);
    let argmax = gate.as_ref().and_then(|g| g.argmax);
    let dz_tensors: Vec<(u32, &Tensor)> = [(2, dy)]
        .into_iter()
        .chain(gate.as_ref().map(|g| (4, g.y)))
        .collect();
    // The pooled variant reads its (quarter-size) inputs from storage.
    let texture_inputs = dz_tensors.iter().copied().filter(|_| argmax.is_none());
    let dz_inputs = TextureInputs::new(texture_inputs, texel(vec4))?;
    let variant = Variant {
        gated: gate.is_some(),
        store_dz: gate.as_ref().is_some_and(|g| g.dz.is_some()),
        vec4,
        pooled: argmax.is_some(),
    };
    let kernel = WeightGradKernel {
        kh: shape.kh,
        kw: shape.kw,
        block,
        subgroup,
        channels,
        filters,
        x_texture: x_input.textures(),
        dz_textures: dz_inputs.textures(),
        x_skew,
        variant,
    };
    let pipeline = gpu.generated(&kernel, "main", &constants)?;
    // [split][O·C·TAPS + O]: each split's sums of dW and db, summed after the pass; a single
    // split's are the gradients, stored in place (db is bound either way).
    let (weights, filters) = (out.weight.len(), out.bias.len());
    let sums = (splits > 1)
        .then(|| Tensor::uninit(gpu, &[splits, weights + filters]))
        .transpose()?;
    let dw = sums.as_ref().unwrap_or(out.weight);
    let db = out.bias;
    let x_resource = match x_input.view(1) {
        Some(view) => Resource::Texture(view),
        None if x_skew.is_some() => Resource::Buffer(x.binding_vec4()),
        None => Resource::Buffer(x.binding()),
    };
    let mut resources = vec![(1, x_resource)];
    resources.extend(
        dz_tensors
            .iter()
            .map(|&(number, t)| match dz_inputs.view(number) {
                Some(view) => (number, Resource::Texture(view)),
                None if variant.vec4 => (number, Resource::Buffer(t.binding_vec4())),
                None => (number, Resource::Buffer(t.binding())),
            }),
    );
    resources.extend(argmax.map(|a| (7, Resource::Buffer(a.binding_vec4()))));
    resources.push((3, Resource::Buffer(dw.binding())));
    resources.push((6, Resource::Buffer(db.binding())));
    if let Some(dz) = gate.as_ref().and_then(|g| g.dz) {
        let dz = if variant.vec4 {
            dz.binding_vec4()
        } else {
            dz.binding()
        };
        resources.push((5, Resource::Buffer(dz)));
    }
    let copies = |commands: &mut Commands<'_>| {
        x_input.copy(commands);
        dz_inputs.copy(commands);
        Ok(())
    };
    gpu.run_pass_after("conv2d weight gradient", copies, |pass| {
        gpu.encode_resources(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &resources,
            groups as u64,
        )
    })?;
    if let Some(sums) = &sums {
        let total = Tensor::uninit(gpu, &[weights + filters])?;
        sum_axes(
            gpu,
            sums,
            (splits, weights + filters, 1),
            &total,
            1.0,
            false,
        )?;
        let weight_bytes = out.weight.bytes();
        gpu.copy((total.buffer(), 0), (out.weight.buffer(), 0), weight_bytes)?;
        gpu.copy(
            (total.buffer(), weight_bytes),
            (out.bias.buffer(), 0),
            out.bias.bytes(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;
    use crate::ops::conv2d::{Padding, conv2d_backward_cpu};
    use crate::test_support::random;

    /// Both kernels (the broadcast one where the adapter has fixed-size subgroups) against
    /// the CPU reference, on LeNet's layers and on sizes that fill no block or subgroup,
    /// reading their inputs from storage buffers and from textures (dy and y as vec4 texels
    /// where rows are whole vec4s): weight and bias gradients of dy itself and through an
    /// activation, with dz stored or not, into NaN-poisoned outputs. Each shape runs dy
    /// alone and one activation's gate, the gates taken in turn among the shapes whose dy
    /// rows are whole vec4s and among those whose are not: every gate meets both layouts,
    /// and on several shapes. (Every gate on every shape compiled 540 kernels, 143 s of
    /// lavapipe's JIT in each CI pass; a gate is one expression on y, whatever the shape.)
    #[test]
    fn both_kernels_match_the_cpu() {
        crate::test_support::on_both_read_families(both_kernels_match_the_cpu_on);
    }

    /// The broadcast kernel's lanes sum two channels where there are two and their tap sums
    /// stay within MOST_LANE_SUMS (the channel runs the test below checks), and its partial
    /// sums fit the workgroup's storage with one filter per lane and with two.
    #[test]
    fn lanes_sum_two_channels_within_the_workgroup_storage() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let storage = gpu.limits().max_compute_workgroup_storage_size as usize;
        let spec = Conv2d::default();
        // (channels, kernel size, the channels a lane sums with one filter and with two)
        for (c, k, want) in [
            (16, 3, Some([2, 2])),
            (3, 3, Some([2, 2])),
            (1, 3, Some([1, 1])),
            // LeNet's conv2: 50 tap sums a lane for two channels of one filter, 100 of two.
            (6, 5, Some([2, 1])),
            (8, 7, None),
        ] {
            let shape = spec.shape(&[2, c, 9, 9], &[4, c, k, k], None).unwrap();
            for (i, filters) in [1, LANE_FILTERS].into_iter().enumerate() {
                let channels = run_channels(&gpu, &shape, filters);
                if let Some(want) = want {
                    assert_eq!(
                        channels, want[i],
                        "{c} channels, {k}×{k}, {filters} filters"
                    );
                }
                let partials = WORKGROUP_SMALL as usize * (k * k * channels + 1) * filters * 4;
                assert!(
                    partials <= storage,
                    "{c} channels, {k}×{k}, {filters} filters: {partials} bytes"
                );
            }
        }
    }

    fn both_kernels_match_the_cpu_on(gpu: &Gpu) {
        // (subgroup, filters per lane): the portable kernel, and the broadcast one with
        // one filter per lane and with two.
        let mut kernels = vec![(None, 1)];
        if let Some(size) = gpu.fixed_subgroup_size() {
            kernels.push((Some(size as usize), 1));
            kernels.push((Some(size as usize), LANE_FILTERS));
        }
        // (n, c, h, w, o, kh, kw, padding)
        let cases = [
            (4, 1, 28, 28, 6, 5, 5, Padding::Explicit(0, 0)),
            (3, 6, 12, 12, 16, 5, 5, Padding::Explicit(0, 0)),
            (2, 3, 9, 13, 11, 3, 4, Padding::Explicit(1, 2)),
            (5, 2, 7, 6, 9, 7, 7, Padding::Same),
            (1, 16, 5, 19, 1, 1, 3, Padding::Explicit(0, 1)),
            // Rows of whole vec4s that end half-way through a block.
            (2, 2, 14, 16, 5, 3, 5, Padding::Explicit(0, 0)),
            // The most filters and channels (ResNet-20's second stage), and counts between.
            (2, 32, 16, 16, 32, 3, 3, Padding::Explicit(1, 1)),
            (3, 19, 7, 9, 23, 3, 3, Padding::Explicit(1, 1)),
            // Rows of whole vec4s whose blocks' segments start 2 and 1 values into a vec4.
            (2, 3, 6, 12, 5, 5, 5, Padding::Explicit(2, 2)),
            (2, 2, 7, 8, 3, 7, 7, Padding::Same),
            // x in rows of whole vec4s, dy's rows (13 wide) not.
            (2, 3, 5, 12, 7, 3, 4, Padding::Explicit(1, 2)),
            // Rows the broadcast kernel walks in blocks of 32 (one and two a row) and of 16
            // (x's 18-wide rows read as floats, more than two per lane).
            (2, 2, 5, 32, 3, 3, 3, Padding::Explicit(1, 1)),
            (1, 3, 6, 64, 2, 5, 5, Padding::Explicit(0, 2)),
            (2, 2, 6, 18, 3, 3, 3, Padding::Explicit(1, 0)),
            // x and dy of 18,432 floats: 4,608 rgba32float texels, past one texture row.
            (3, 16, 12, 32, 16, 3, 3, Padding::Explicit(1, 1)),
        ];
        // The next gate for shapes with dy in rows of whole vec4s, and for the others.
        let mut next_gate = [0, 0];
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
            // y as the layer's output would be: ReLU's zeros, negatives for leaky ReLU, and
            // values in (0, 1) and (-1, 1) for sigmoid and tanh, as `random` gives.
            let y = random(&shape.output(), seed + 3);
            let gates = [
                (Activation::Relu, y.mapv(|v| v.max(0.0)), true),
                (Activation::LeakyRelu(0.1), y.clone(), false),
                (Activation::Tanh, y.clone(), true),
                (Activation::Sigmoid, y.mapv(f32::abs), false),
                // ReLU6's outputs: 0, 6 and values between (both bends block the gradient).
                (
                    Activation::Relu6,
                    y.mapv(|v| Activation::Relu6.apply(8.0 * v)),
                    true,
                ),
            ];
            let (tx, tdy) = (
                Tensor::from_array(gpu, &x).unwrap(),
                Tensor::from_array(gpu, &dy).unwrap(),
            );
            let turn = &mut next_gate[usize::from(shape.ow.is_multiple_of(4))];
            let gate = *turn % gates.len();
            *turn += 1;
            let gate = gates.into_iter().nth(gate);
            for (activation, y, store_dz) in [None, gate].into_iter().map(|g| match g {
                Some((a, y, store)) => (a, Some(y), store),
                None => (Activation::None, None, false),
            }) {
                let dz = match &y {
                    Some(y) => ndarray::Zip::from(&dy)
                        .and(y)
                        .map_collect(|&d, &y| d * activation.derivative(y, y)),
                    None => dy.clone(),
                };
                let want =
                    conv2d_backward_cpu(&spec, &x.view(), &weight.view(), &dz.view()).unwrap();
                let ty = y.as_ref().map(|y| Tensor::from_array(gpu, y).unwrap());
                let poisoned = |shape: &[usize]| {
                    Tensor::from_array(gpu, &ndarray::ArrayD::from_elem(shape, f32::NAN)).unwrap()
                };
                for &subgroup in &kernels {
                    let dweight = poisoned(weight.shape());
                    let dbias = poisoned(&[o]);
                    let tdz = poisoned(dy.shape());
                    let gate = ty.as_ref().map(|y| Gate {
                        activation,
                        y,
                        dz: store_dz.then_some(&tdz),
                        argmax: None,
                    });
                    let out = WeightAndBias {
                        weight: &dweight,
                        bias: &dbias,
                    };
                    run(&shape, &tx, &tdy, gate, out, subgroup).unwrap();
                    let terms = (n * shape.oh * shape.ow) as f32;
                    let what = format!(
                        "case {i}, (subgroup, filters) {subgroup:?}, {activation:?}, {:?}",
                        gpu.operand_reads()
                    );
                    assert_close(&dweight.to_array().unwrap(), &want.weight, terms, &what);
                    assert_close(&dbias.to_array().unwrap(), &want.bias, terms, &what);
                    if store_dz {
                        assert_close(&tdz.to_array().unwrap(), &dz.clone().into_dyn(), 1.0, &what);
                    }
                }
            }
        }
        // Every gate met both layouts.
        assert!(next_gate.iter().all(|&turns| turns >= 5), "{next_gate:?}");
    }

    /// Both kernels reading `dz` from a 2×2 max pooling's backward pass (its gradient, output
    /// and arg-max, through the activation before it) against the CPU's pooling backward and
    /// convolution backward, into NaN-poisoned outputs, `dz` stored or not: LeNet's layers
    /// and a padded 3×3 one whose rows span three vec4s, each kernel on both read families.
    #[test]
    fn pooled_gradients_match_the_cpu() {
        crate::test_support::on_both_read_families(pooled_gradients_match_the_cpu_on);
    }

    fn pooled_gradients_match_the_cpu_on(gpu: &Gpu) {
        use crate::ops::pool2d::{Pool2d, pool2d_backward_cpu, pool2d_cpu};
        let mut kernels = vec![(None, 1)];
        if let Some(size) = gpu.fixed_subgroup_size() {
            kernels.push((Some(size as usize), LANE_FILTERS));
        }
        // (n, c, h, w, o, k, padding, the activation the pooling takes, dz stored)
        let cases = [
            (4, 1, 28, 28, 6, 5, 0, Activation::Relu, false),
            (3, 6, 12, 12, 16, 5, 0, Activation::Relu, true),
            (2, 3, 8, 12, 5, 3, 1, Activation::LeakyRelu(0.1), true),
            (2, 2, 6, 8, 3, 3, 1, Activation::None, false),
        ];
        let pool = Pool2d::max((2, 2)).stride((2, 2));
        for (i, &(n, c, h, w, o, k, pad, activation, store_dz)) in cases.iter().enumerate() {
            let spec = Conv2d {
                padding: Padding::Explicit(pad, pad),
                ..Conv2d::default()
            };
            let seed = 100 + 10 * i as u64;
            let (x, weight) = (random(&[n, c, h, w], seed), random(&[o, c, k, k], seed + 1));
            let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
            assert!(eligible(&spec, &shape) && pooled_fits(&shape));
            // The layer's output as its activation leaves it, pooled.
            let y = random(&shape.output(), seed + 2).mapv(|v| activation.apply(v));
            let pooled = pool2d_cpu(&pool, &y.view()).unwrap();
            let argmax = pooled.argmax.unwrap();
            let dy = random(pooled.y.shape(), seed + 3);
            let gated = ndarray::Zip::from(&dy)
                .and(&pooled.y)
                .map_collect(|&d, &y| d * activation.derivative(y, y));
            let dz =
                pool2d_backward_cpu(&pool, y.shape(), &gated.view(), Some(&argmax.view())).unwrap();
            let want = conv2d_backward_cpu(&spec, &x.view(), &weight.view(), &dz.view()).unwrap();
            let upload = |a: &ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
            let (tx, tdy, ty, targmax) =
                (upload(&x), upload(&dy), upload(&pooled.y), upload(&argmax));
            let poisoned = |shape: &[usize]| {
                Tensor::from_array(gpu, &ndarray::ArrayD::from_elem(shape, f32::NAN)).unwrap()
            };
            for &subgroup in &kernels {
                let (dweight, dbias, tdz) = (
                    poisoned(weight.shape()),
                    poisoned(&[o]),
                    poisoned(y.shape()),
                );
                let gate = Gate {
                    activation,
                    y: &ty,
                    dz: store_dz.then_some(&tdz),
                    argmax: Some(&targmax),
                };
                let out = WeightAndBias {
                    weight: &dweight,
                    bias: &dbias,
                };
                run(&shape, &tx, &tdy, Some(gate), out, subgroup).unwrap();
                let terms = (n * shape.oh * shape.ow) as f32;
                let what = format!("case {i}, {subgroup:?}");
                assert_close(&dweight.to_array().unwrap(), &want.weight, terms, &what);
                assert_close(&dbias.to_array().unwrap(), &want.bias, terms, &what);
                if store_dz {
                    assert_close(&tdz.to_array().unwrap(), &dz, 1.0, &format!("{what} dz"));
                }
            }
        }
    }

    /// A batch whose work items would take a lane past the loop bound: the portable kernel
    /// splits it (into at least two splits, more toward the adapter's target of workgroups)
    /// and still sums every term, and stores dz once per term.
    #[test]
    fn long_batches_split_within_the_loop_bound() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let gpu = &gpu;
        let (n, o) = (600, 2);
        let spec = Conv2d::default();
        let (x, weight) = (random(&[n, 1, 66, 258], 1), random(&[o, 1, 3, 3], 2));
        let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
        let work = n * shape.oh * shape.ow.div_ceil(GRAD_BLOCK);
        assert!(work > WORKGROUP_SMALL as usize * MAX_LOOP_ITERATIONS);
        let dy = random(&shape.output(), 3);
        let y = random(&shape.output(), 4).mapv(|v| v.max(0.0));
        let dz = ndarray::Zip::from(&dy)
            .and(&y)
            .map_collect(|&d, &y| d * Activation::Relu.derivative(y, y));
        let want = conv2d_backward_cpu(&spec, &x.view(), &weight.view(), &dz.view()).unwrap();
        let poisoned = |shape: &[usize]| {
            Tensor::from_array(gpu, &ndarray::ArrayD::from_elem(shape, f32::NAN)).unwrap()
        };
        let (tx, tdy, ty) = (
            Tensor::from_array(gpu, &x).unwrap(),
            Tensor::from_array(gpu, &dy).unwrap(),
            Tensor::from_array(gpu, &y).unwrap(),
        );
        let (dweight, dbias, tdz) = (
            poisoned(&[o, 1, 3, 3]),
            poisoned(&[o]),
            poisoned(dy.shape()),
        );
        let gate = Gate {
            activation: Activation::Relu,
            y: &ty,
            dz: Some(&tdz),
            argmax: None,
        };
        let out = WeightAndBias {
            weight: &dweight,
            bias: &dbias,
        };
        run(&shape, &tx, &tdy, Some(gate), out, (None, 1)).unwrap();
        let terms = (n * shape.oh * shape.ow) as f32;
        assert_close(
            &dweight.to_array().unwrap(),
            &want.weight,
            terms,
            "split dW",
        );
        assert_close(&dbias.to_array().unwrap(), &want.bias, terms, "split db");
        assert_close(&tdz.to_array().unwrap(), &dz.into_dyn(), 1.0, "split dz");
    }

    /// Every value written (no NaN left of the poison) and within float rounding of a sum
    /// of `terms` products.
    fn assert_close(
        got: &ndarray::ArrayD<f32>,
        want: &ndarray::ArrayD<f32>,
        terms: f32,
        what: &str,
    ) {
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{what}: unwritten outputs"
        );
        assert_eq!(got.shape(), want.shape(), "{what}");
        let diff = (got - want).mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
        assert!(diff <= 1e-5 * terms.sqrt() * 4.0, "{what}: {diff}");
    }
}
