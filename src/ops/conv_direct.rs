//! Direct convolution for small filter banks (`shaders/conv_direct.wgsl`): the forward pass
//! of LeNet-sized layers without an im2col buffer. Used by `Conv2d::forward` for stride 1,
//! no dilation, at most 32 filters whose weights fit a uniform buffer; other shapes take
//! im2col + matmul. The kernel is generated per (filters, block, kernel width) so that the
//! accumulators are plain registers, and specialised per layer shape (WGSL `override`
//! constants, not the batch size) so that its index arithmetic folds.

use std::fmt::Write;

use bytemuck::{Pod, Zeroable};

use super::conv2d::{Conv2d, Conv2dShape};
use crate::error::Result;
use crate::gpu::Commands;
use crate::gpu::dispatch::{Binding, Resource};
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, small_workgroups};
use crate::gpu::texture::{scalar_input, scalar_texture, vec4_input, vec4_texture};
use crate::gpu::{Generated, Gpu};
use crate::tensor::Tensor;

/// Mirrors `Params` in shaders/conv_direct.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DirectParams {
    total: u32,
    slope: f32,
    images: u32,
    _pad: u32,
}

/// Filters (and, for the weight gradient, channels) up to which the direct kernels take a
/// layer: 32 lets ResNet-20's second stage (32 channels at 16×16) run them, which the tuner
/// measured faster there than implicit GEMM (forward 1.07 against 1.29 ms on 8 images).
pub(super) const MAX_FILTERS: usize = 32;

/// Filters (and channels) up to which the direct kernels lead the fixed kernel order
/// (LeNet's layers); past it, up to [`MAX_FILTERS`], they are candidates after the others,
/// taken where the tuner measures them faster.
pub(super) const LEADING_FILTERS: usize = 16;
pub(super) const MAX_KERNEL_WIDTH: usize = 7;

/// Accumulators one invocation keeps (filters × block), spilling past the registers: each
/// input loaded serves more outputs. 64 let 16 filters take blocks of 4 read as vec4s
/// (LeNet's conv2 forward 1.26 -> 0.91 ms on lavapipe against 48); 128 lets them take blocks
/// of 8: ResNet-20's 16-channel layers (forward and input gradient, 13 passes a step)
/// 302–314 -> 265–287 ms on lavapipe, LeNet's unchanged; 32 took 355 ms. 256 lets them
/// take blocks of [`MAX_BLOCK`] (N128, five alternated runs each): forward 15.1–15.7 ->
/// 12.2–12.3 ms at 16 channels 32², 10.9–11.8 -> 9.1–9.2 at 32 channels 16² (blocks of 8);
/// ResNet-20's step 0.93×, LeNet's 0.92×; the MNIST example's cold first step 1.48 ->
/// 1.56 s (larger kernels to compile). 512 lets 17 to 32 filters take blocks of 16 too
/// (fewer filters are held by [`MAX_BLOCK`]): 32 channels at 16² forward 16.9–24.9 ->
/// 13.2–20.9 ms on lavapipe, at 0.8 s more to compile each such kernel cold.
const MAX_ACCUMULATORS: usize = 512;

/// The longest block along a row.
const MAX_BLOCK: usize = 16;

/// Outputs per invocation along a row: a longer block reuses each loaded input more, up to
/// the register budget, and one that divides the row wastes no lanes on the edge (measured
/// on lavapipe for LeNet's input gradient, 12 wide: blocks of 2, 4, 8 and 6 took 11, 7.4,
/// 7.7 and 6.3 ms).
/// With `vec4_rows` the block is a multiple of 4, so that every block starts on a vec4 (and
/// its input segment `skew` values into one).
fn block(shape: &Conv2dShape, vec4_rows: bool) -> usize {
    let step = if vec4_rows { 4 } else { 1 };
    let most = (MAX_ACCUMULATORS / shape.o).clamp(step, MAX_BLOCK) / step * step;
    let dividing = (step..=most)
        .rev()
        .step_by(step)
        .find(|b| shape.ow.is_multiple_of(*b))
        .unwrap_or(step);
    if 2 * dividing >= most { dividing } else { most }
}

/// The block of the pooled kernel: whole vec4s (so that each lane stores whole windows),
/// whether it reads the input as vec4s or (rows of partial vec4s) as scalars.
fn pooled_block(shape: &Conv2dShape) -> usize {
    block(shape, true)
}

/// Whether the kernel can read the input as vec4s (from storage, or rgba32float texels):
/// rows of whole vec4s and room for blocks of 4. On CPU adapters a per-lane load costs about
/// the same for four floats as for one.
fn vec4_rows(shape: &Conv2dShape) -> bool {
    shape.w.is_multiple_of(4) && MAX_ACCUMULATORS / shape.o >= 4
}

/// Whether the kernel stores its outputs as vec4s: blocks of whole vec4s in rows of whole
/// vec4s, so that every block starts on one and each of its vec4s lies wholly inside the
/// row or wholly past it. A per-lane store costs about as much for four floats as for one:
/// LeNet's first layer stores 221,184 floats a step.
fn vec4_stores(shape: &Conv2dShape, block: usize) -> bool {
    block.is_multiple_of(4) && shape.ow.is_multiple_of(4)
}

/// The bank's floats: the layer's weights as they are (OIHW), then its bias.
fn bank_floats(shape: &Conv2dShape) -> usize {
    shape.o * shape.c * shape.kh * shape.kw + shape.o
}

/// Whether the direct kernel handles this convolution.
pub(crate) fn eligible(gpu: &Gpu, spec: &Conv2d, shape: &Conv2dShape) -> bool {
    let bank_bytes = (bank_floats(shape).div_ceil(4) * 16) as u64;
    spec.stride == (1, 1)
        && spec.dilation == (1, 1)
        && shape.groups == 1
        && shape.o <= MAX_FILTERS
        && shape.kw <= MAX_KERNEL_WIDTH
        && bank_bytes <= gpu.uniform_binding_bytes()
        && (shape.n * shape.oh * shape.ow) < u32::MAX as usize
        // Each output loops over the channels and the kernel rows.
        && shape.c * shape.kh <= MAX_LOOP_ITERATIONS
}

/// The input `x4` at binding 1 as rows of whole vec4s, from storage or an rgba32float operand
/// texture, with `load_x4(i)` and `fetch4(row4, q, inside)`: vec4 number `row4 + q`, zero
/// outside the image (the padding; a texture is read at texel 0 there, never past its
/// edge). Shared with the weight gradient's broadcast kernel.
pub(super) fn vec4_rows_input(texture: bool) -> String {
    let at = if texture {
        "select(0u, row4 + u32(max(q, 0)), ok)"
    } else {
        "row4 + u32(max(q, 0))"
    };
    vec4_input("x4", 1, texture)
        + &format!(
            "fn fetch4(row4: u32, q: i32, inside: bool) -> vec4<f32> {{\n\
             \x20   let ok = inside && q >= 0 && q < i32(W / 4u);\n\
             \x20   return select(vec4<f32>(0.0), load_x4({at}), ok);\n\
             }}\n"
        )
}

/// One generated direct-convolution kernel: everything its source depends on (the layer's
/// shape is set per pipeline as `override` constants).
#[derive(Debug)]
struct DirectKernel {
    filters: usize,
    /// Outputs per invocation along a row.
    block: usize,
    kw: usize,
    /// The bank's size in vec4s.
    vec4s: usize,
    /// The bank read flipped and transposed: the input gradient (`dx` from `dy`).
    flipped: bool,
    /// The input through a texture.
    textures: bool,
    /// The input read as vec4s ([`vec4_rows`]).
    vec4_rows: bool,
    /// The output stored as vec4s ([`vec4_stores`]).
    vec4_stores: bool,
    /// Where the block's input segment starts in its first vec4 when read as vec4s: blocks
    /// start on vec4s, so the left padding alone sets it.
    skew: usize,
    /// The epilogue max-pools 2×2 windows at stride 2 (lane pairs exchange their rows with
    /// `subgroupShuffleXor`), storing their arg-max too if `Some(true)`.
    pooled: Option<bool>,
    /// Weights shared through subgroups of this size: each lane loads a few of the weights
    /// the channel and kernel row give every filter and hands them to the others with
    /// `subgroupBroadcast`. On CPU adapters
    /// a bank read at a computed index is a per-lane gather (a read at a constant one is
    /// not): this cuts those reads by the subgroup size, and the forward pass by a third.
    subgroup: Option<usize>,
}

impl DirectKernel {
    /// Where the weights of the loops' channel `c` and kernel row `ky` begin in the bank
    /// (the layer's OIHW weights), as WGSL: the input gradient reads the forward kernel
    /// flipped and transposed, w[c][o][kh-1-ky][kw-1-kx].
    fn weight_row(&self) -> String {
        let (kw, filters) = (self.kw, self.filters);
        if self.flipped {
            format!("(c * {filters}u * KH + KH - 1u - ky) * {kw}u")
        } else {
            format!("(c * KH + ky) * {kw}u")
        }
    }

    /// Where weight (filter `o`, kernel column `kx`) lies past [`Self::weight_row`], as WGSL
    /// (`o` and `kx` may be WGSL expressions).
    fn weight_offset(&self, o: &str, kx: &str) -> String {
        let kw = self.kw;
        if self.flipped {
            format!("{o} * KH * {kw}u + {}u - {kx}", kw - 1)
        } else {
            format!("{o} * C * KH * {kw}u + {kx}")
        }
    }

    /// The epilogue: for each filter `o`, its bias added to its accumulators (`m_0`…), the
    /// activation, and the stores. The pooled epilogue runs it as one loop over the filters,
    /// in which a `switch` copies filter `o`'s accumulators into `m_0`…: lavapipe compiles
    /// each per-lane store to a loop over the lanes with a branch per lane, and written out
    /// for every filter its stores (each window's maximum and arg-max) made up about two
    /// thirds of the kernel's compile time. Looped, LeNet's forward kernels compile in
    /// about half the time (`perf --profile --cold`, `MESA_SHADER_CACHE_DISABLE=true`, AVX2
    /// EPYC: 190–250 -> 100–114 ms and 343–348 -> 141–155) and run within the noise of
    /// their time (+0–3 %); a private array in the switch's place is worse (each of its
    /// writes is such a loop). Stores of whole vec4s stay written out per filter: looped,
    /// LeNet's input gradient (6 filters, 3 vec4s each) compiled slower (113–117 -> 125–170).
    fn epilogue(&self) -> String {
        let (filters, b, kw) = (self.filters, self.block, self.kw);
        let bias = format!(
            "        let bias = select(0.0, weight({filters}u * C * KH * {kw}u + o), HAS_BIAS != 0u);\n"
        );
        let mut stores = String::new();
        let Some(argmax) = self.pooled else {
            for o in 0..filters {
                let _ = write!(stores, "    {{\n        let o = {o}u;\n{bias}");
                for j in 0..b {
                    let _ = writeln!(stores, "        let m_{j} = a{o}_{j};");
                }
                self.plain_stores(&mut stores);
                stores += "    }\n";
            }
            return stores;
        };
        let _ = write!(
            stores,
            "    for (var o = 0u; o < {filters}u; o++) {{\n{bias}"
        );
        for j in 0..b {
            let _ = writeln!(stores, "        var m_{j} = 0.0;");
        }
        let _ = writeln!(stores, "        switch o {{");
        for o in 0..filters {
            let copies: Vec<String> = (0..b).map(|j| format!("m_{j} = a{o}_{j};")).collect();
            let _ = writeln!(stores, "            case {o}u: {{ {} }}", copies.join(" "));
        }
        let _ = writeln!(stores, "            default: {{}}\n        }}");
        self.pooled_stores(&mut stores, argmax);
        stores + "    }\n"
    }

    /// The stores of filter `o`'s outputs, activated: vec4s where [`vec4_stores`] allows.
    fn plain_stores(&self, stores: &mut String) {
        let b = self.block;
        if self.vec4_stores {
            for q in 0..b / 4 {
                let sums: Vec<String> = (4 * q..4 * q + 4).map(|j| format!("m_{j}")).collect();
                let _ = writeln!(
                    stores,
                    "        if live && ox0 + {}u < OW {{ y4[(base + o * plane) / 4u + {q}u] = activate_vec4(vec4<f32>({}) + bias, ACT, p.slope); }}",
                    4 * q,
                    sums.join(", ")
                );
            }
            return;
        }
        for j in 0..b {
            let _ = writeln!(
                stores,
                "        if live && ox0 + {j}u < OW {{ y[base + o * plane + {j}u] = activate(m_{j} + bias, ACT, p.slope); }}"
            );
        }
    }

    /// The pooled epilogue of the loop's filter `o`: lanes 2k (an even row) and 2k + 1 (the
    /// row under it) swap their block's activated outputs, and each takes half of the
    /// block's 2×2 windows (the even lane the left half), storing their maxima (and
    /// `argmax`: each window's first maximum, as its index in the output plane, as
    /// `ops::Pool2d` stores it).
    fn pooled_stores(&self, stores: &mut String, argmax: bool) {
        let b = self.block;
        for j in 0..b {
            let _ = writeln!(
                stores,
                "        let mine_{j} = activate(m_{j} + bias, ACT, p.slope);\n        \
                 let mate_{j} = subgroupShuffleXor(mine_{j}, 1u);\n        \
                 let up_{j} = select(mate_{j}, mine_{j}, pair == 0u);\n        \
                 let down_{j} = select(mine_{j}, mate_{j}, pair == 0u);"
            );
        }
        let per_lane = b / 4;
        for w in 0..per_lane {
            // The lane's window w: the block's window w (even lane) or per_lane + w.
            let (left, right) = (2 * w, 2 * (per_lane + w));
            let tap = |row: &str, dx: usize| {
                format!(
                    "select({row}_{}, {row}_{}, pair == 0u)",
                    right + dx,
                    left + dx
                )
            };
            let _ = writeln!(
                stores,
                "        let column_{w} = ox0 + 2u * select({}u, {w}u, pair == 0u);\n        \
                 let max_{w} = window_max({}, {}, {}, {}, (oy - pair) * OW + column_{w}, OW);\n        \
                 let at_{w} = ((n * {}u + o) * (OH / 2u) + oy / 2u) * (OW / 2u) + column_{w} / 2u;",
                per_lane + w,
                tap("up", 0),
                tap("up", 1),
                tap("down", 0),
                tap("down", 1),
                self.filters,
            );
            let keep = if argmax {
                format!(" argmax[at_{w}] = max_{w}.y;")
            } else {
                String::new()
            };
            let _ = writeln!(stores, "        if live {{ y[at_{w}] = max_{w}.x;{keep} }}");
        }
    }

    /// The input's binding and its fetch function: `fetch(row, ix, inside)` = x[row + ix]
    /// or `fetch4(row4, q, inside)` = vec4 number `row4 + q`, zero outside the image (the
    /// padding).
    fn input(&self) -> String {
        if self.vec4_rows {
            return vec4_rows_input(self.textures);
        }
        scalar_input("x", 1, self.textures)
            + "fn fetch(row: u32, ix: i32, inside: bool) -> f32 {\n\
               \x20   let ok = inside && ix >= 0 && ix < i32(W);\n\
               \x20   return select(0.0, load_x(select(0u, row + u32(max(ix, 0)), ok)), ok);\n\
               }\n"
    }
}

/// The subgroup size the weight-sharing kernel would use on `gpu`, if it suits it.
fn broadcast_subgroup(gpu: &Gpu) -> Option<usize> {
    let size = gpu.fixed_subgroup_size()? as usize;
    (gpu.cpu_kernels() && (4..=32).contains(&size) && 64 % size == 0).then_some(size)
}

/// `out = act(conv(x, weight) + bias)` (the caller checked [`eligible`]).
pub(crate) fn forward(
    spec: &Conv2d,
    shape: &Conv2dShape,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    let subgroup = broadcast_subgroup(x.gpu());
    run(
        shape,
        x,
        weight,
        bias,
        Output::Plain(out),
        spec.activation,
        false,
        subgroup,
    )
}

/// Where the direct kernel writes: the convolution's output, or its 2×2 max pools (stride 2)
/// and, for a backward pass, their arg-max (as `ops::Pool2d` stores it).
#[derive(Clone, Copy)]
pub(crate) enum Output<'a> {
    Plain(&'a Tensor),
    Pooled(&'a Tensor, Option<&'a Tensor>),
}

/// Whether [`forward_pooled`] takes this convolution: the direct kernel with weights shared
/// through subgroups (lane pairs exchange rows through them), blocks of whole vec4s that
/// divide the rows ([`pooled_block`]), and an even output, so that every 2×2 window lies in
/// one lane pair's block and each lane stores whole windows. Like the subgroup matmul and the
/// weight gradient's broadcast kernel, it takes a workgroup's subgroups to be consecutive
/// runs of its invocations, lane by lane (as lavapipe numbers them): invocations 2k and
/// 2k + 1 are lanes `l` and `l ^ 1` of one subgroup.
pub(crate) fn pools(gpu: &Gpu, spec: &Conv2d, shape: &Conv2dShape) -> bool {
    let b = pooled_block(shape);
    eligible(gpu, spec, shape)
        && broadcast_subgroup(gpu).is_some()
        && shape.ow.is_multiple_of(b)
        && shape.oh.is_multiple_of(2)
}

/// `act(conv(x, weight) + bias)` max-pooled over 2×2 windows at stride 2, into `pooled`
/// (and the windows' arg-max into `argmax`), without storing the convolution's output (the
/// caller checked [`pools`]).
pub(crate) fn forward_pooled(
    spec: &Conv2d,
    shape: &Conv2dShape,
    (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
    pooled: &Tensor,
    argmax: Option<&Tensor>,
) -> Result<()> {
    run(
        shape,
        x,
        weight,
        bias,
        Output::Pooled(pooled, argmax),
        spec.activation,
        false,
        broadcast_subgroup(x.gpu()),
    )
}

/// Whether [`backward_data`] handles this convolution's input gradient.
pub(crate) fn eligible_backward(gpu: &Gpu, spec: &Conv2d, shape: &Conv2dShape) -> bool {
    shape.groups == 1
        && eligible(gpu, spec, &transposed(shape))
        && shape.pad_top < shape.kh
        && shape.pad_left < shape.kw
}

/// The backward-data pass as a forward convolution: `dy` (O channels) with the flipped,
/// transposed kernel and padding `k - 1 - pad` gives `dx` (C channels), for stride 1.
fn transposed(shape: &Conv2dShape) -> Conv2dShape {
    Conv2dShape {
        n: shape.n,
        c: shape.o,
        groups: 1,
        h: shape.oh,
        w: shape.ow,
        o: shape.c,
        kh: shape.kh,
        kw: shape.kw,
        oh: shape.h,
        ow: shape.w,
        pad_top: (shape.kh - 1).saturating_sub(shape.pad_top),
        pad_left: (shape.kw - 1).saturating_sub(shape.pad_left),
    }
}

/// `dx` from `dy` (the caller checked [`eligible_backward`]).
pub(crate) fn backward_data(
    shape: &Conv2dShape,
    dy: &Tensor,
    weight: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    run(
        &transposed(shape),
        dy,
        weight,
        None,
        Output::Plain(dx),
        crate::ops::Activation::None,
        true,
        broadcast_subgroup(dy.gpu()),
    )
}

/// The kernel for `shape` (the transposed one if `flipped`), sharing weights through
/// subgroups of `subgroup` lanes or not.
#[allow(clippy::too_many_arguments)]
fn run(
    shape: &Conv2dShape,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: Output<'_>,
    activation: crate::ops::Activation,
    flipped: bool,
    subgroup: Option<usize>,
) -> Result<()> {
    let gpu = x.gpu();
    // Where the kernel writes, and whether it pools (storing the arg-max or not).
    let (out, argmax, pooled) = match out {
        Output::Plain(out) => (out, None, None),
        Output::Pooled(pooled, argmax) => (pooled, argmax, Some(argmax.is_some())),
    };
    // The input through a texture where the adapter fetches texels faster (see
    // `Gpu::operand_reads`): a copy of x, four floats per texel where it is read as vec4s.
    let vec4_rows = vec4_rows(shape);
    let texture = if vec4_rows {
        vec4_texture(x)?
    } else {
        scalar_texture(x)?
    };
    let b = match pooled {
        Some(_) => pooled_block(shape),
        None => block(shape, vec4_rows),
    };
    let vec4s = bank_floats(shape).div_ceil(4);
    let bank = gpu.checked("allocating a filter bank", || {
        gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("filter bank"),
            size: (vec4s * 16) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    })?;
    let bank_binding = Binding {
        buffer: &bank,
        bytes: (vec4s * 16) as u64,
    };
    let blocks = shape.ow.div_ceil(b);
    let total = shape.n * shape.oh * blocks;
    let params = DirectParams {
        total: total as u32,
        slope: activation.slope(),
        images: shape.n as u32,
        _pad: 0,
    };
    let constants = [
        ("C", shape.c as u32),
        ("H", shape.h as u32),
        ("W", shape.w as u32),
        ("OH", shape.oh as u32),
        ("OW", shape.ow as u32),
        ("KH", shape.kh as u32),
        ("PAD_TOP", shape.pad_top as u32),
        ("PAD_LEFT", shape.pad_left as u32),
        ("BLOCKS", blocks as u32),
        ("ACT", activation.code()),
        ("HAS_BIAS", u32::from(bias.is_some())),
        ("ROW_PAIR", if pooled.is_some() { 2 } else { 1 }),
    ];
    let kernel = DirectKernel {
        filters: shape.o,
        block: b,
        kw: shape.kw,
        vec4s,
        flipped,
        textures: texture.is_some(),
        vec4_rows,
        vec4_stores: pooled.is_none() && vec4_stores(shape, b),
        skew: if vec4_rows {
            (4 - shape.pad_left % 4) % 4
        } else {
            0
        },
        pooled,
        subgroup,
    };
    let pipeline = gpu.generated(&kernel, "main", &constants)?;
    let input = match &texture {
        Some(t) => Resource::Texture(&t.view),
        None if vec4_rows => Resource::Buffer(x.binding_vec4()),
        None => Resource::Buffer(x.binding()),
    };
    let output = if kernel.vec4_stores {
        out.binding_vec4()
    } else {
        out.binding()
    };
    // The bank is copied from the weights and bias in the same command stream as the pass
    // that reads it, so that it follows the optimizer's updates.
    let copy_inputs = |commands: &mut Commands<'_>| {
        let encoder = commands.encoder();
        encoder.copy_buffer_to_buffer(weight.buffer(), 0, &bank, 0, weight.bytes());
        if let Some(bias) = bias {
            encoder.copy_buffer_to_buffer(bias.buffer(), 0, &bank, weight.bytes(), bias.bytes());
        }
        if let Some(t) = &texture {
            t.copy_tensor(encoder, x);
        }
        Ok(())
    };
    let mut resources = vec![
        (1, input),
        (2, Resource::Buffer(output)),
        (3, Resource::Buffer(bank_binding)),
    ];
    resources.extend(argmax.map(|a| (4, Resource::Buffer(a.binding()))));
    gpu.run_pass_after("conv2d direct", copy_inputs, |pass| {
        gpu.encode_resources(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &resources,
            small_workgroups(total as u64),
        )
    })
}

impl Generated for DirectKernel {
    fn source(&self) -> String {
        let Self {
            filters,
            block: b,
            kw,
            ..
        } = *self;
        let (mut decls, mut body) = (String::new(), String::new());
        for o in 0..filters {
            for j in 0..b {
                let _ = writeln!(decls, "    var a{o}_{j} = 0.0;");
            }
        }
        let segment = b + kw - 1;
        if self.vec4_rows {
            let skew = self.skew;
            for q in 0..(skew + segment).div_ceil(4) {
                let _ = writeln!(
                    body,
                    "            let v{q} = fetch4(row / 4u, (left - {skew}) / 4 + {q}, inside);"
                );
            }
            for r in 0..segment {
                let _ = writeln!(
                    body,
                    "            let r{r} = v{}[{}];",
                    (skew + r) / 4,
                    (skew + r) % 4
                );
            }
        } else {
            for r in 0..segment {
                let _ = writeln!(
                    body,
                    "            let r{r} = fetch(row, left + {r}, inside);"
                );
            }
        }
        if let Some(size) = self.subgroup {
            // Weight f = o·KW + kx of the row is loaded by lane f mod size as its load
            // f / size (lanes past the row's end load its last), and broadcast from there.
            let row = filters * kw;
            for v in 0..row.div_ceil(size) {
                let _ = writeln!(
                    decls,
                    "    let f{v} = min({}u + lane, {}u);\n    let at{v} = {};",
                    v * size,
                    row - 1,
                    self.weight_offset(&format!("(f{v} / {kw}u)"), &format!("f{v} % {kw}u"))
                );
                let _ = writeln!(body, "            let wv{v} = weight(bank_row + at{v});");
            }
            for o in 0..filters {
                for kx in 0..kw {
                    let f = o * kw + kx;
                    let _ = writeln!(
                        body,
                        "            let w{o}_{kx} = subgroupBroadcast(wv{}, {}u);",
                        f / size,
                        f % size
                    );
                }
            }
        } else {
            for o in 0..filters {
                for kx in 0..kw {
                    let at = self.weight_offset(&format!("{o}u"), &format!("{kx}u"));
                    let _ = writeln!(body, "            let w{o}_{kx} = weight(bank_row + {at});");
                }
            }
        }
        // Each accumulator takes its kernel row's taps one after the other: where the
        // accumulators spill (up to MAX_ACCUMULATORS of them), each is loaded and stored
        // once per channel and kernel row instead of once per tap.
        for o in 0..filters {
            for j in 0..b {
                for kx in 0..kw {
                    let _ = writeln!(body, "            a{o}_{j} += r{} * w{o}_{kx};", j + kx);
                }
            }
        }
        let output = match (self.vec4_stores, self.pooled) {
            (true, _) => "@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;",
            (false, Some(true)) => {
                "@group(0) @binding(2) var<storage, read_write> y: array<f32>;\n\
                 @group(0) @binding(4) var<storage, read_write> argmax: array<f32>;"
            }
            (false, _) => "@group(0) @binding(2) var<storage, read_write> y: array<f32>;",
        };
        let (lane, exit, shared_rows) = match self.subgroup {
            // Whole subgroups keep running for the broadcasts.
            Some(_) => (
                ", @builtin(subgroup_invocation_id) lane: u32",
                "",
                "    ky_first = subgroupMin(ky_first);\n    ky_end = subgroupMax(ky_end);",
            ),
            None => ("", "    if !live { return; }", ""),
        };
        [
            include_str!("../../shaders/epilogue.wgsl"),
            &include_str!("../../shaders/conv_direct.wgsl")
                .replace("{{INPUT_X}}", &self.input())
                .replace("{{OUTPUT_Y}}", output)
                .replace("{{VEC4S}}", &self.vec4s.to_string())
                .replace("{{BLOCK}}", &b.to_string())
                .replace("{{WEIGHT_ROW}}", &self.weight_row())
                .replace("{{FILTERS}}", &filters.to_string())
                .replace("{{LANE}}", lane)
                .replace("{{EXIT}}", exit)
                .replace("{{SHARED_ROWS}}", shared_rows)
                .replace("{{DECLS}}", &decls)
                .replace("{{BODY}}", &body)
                .replace("{{STORES}}", &self.epilogue()),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{Padding, conv2d_backward_cpu, conv2d_cpu};
    use crate::test_support::random;
    use crate::value::Activation;

    /// Both kernels (weights shared through subgroups where the adapter has fixed-size ones,
    /// and read by every lane) against the CPU reference, forward with bias and activation
    /// and the input gradient, into NaN-poisoned outputs, reading the input from storage
    /// buffers (as vec4s where rows are whole ones) and from textures, storing vec4s where
    /// blocks are whole ones (rows 20 wide end in a partial block): LeNet's layers, and
    /// sizes whose rows, batches and banks fill no block, workgroup or subgroup.
    #[test]
    fn both_kernels_match_the_cpu() {
        crate::test_support::on_both_read_families(both_kernels_match_the_cpu_on);
    }

    fn both_kernels_match_the_cpu_on(gpu: &Gpu) {
        let mut kernels = vec![None];
        if let Some(size) = gpu.fixed_subgroup_size() {
            kernels.push(Some(size as usize));
        }
        // (n, c, h, w, o, kh, kw, padding, activation)
        let cases = [
            (
                5,
                1,
                28,
                28,
                6,
                5,
                5,
                Padding::Explicit(0, 0),
                Activation::Relu,
            ),
            (
                3,
                6,
                12,
                12,
                16,
                5,
                5,
                Padding::Explicit(0, 0),
                Activation::Relu,
            ),
            (
                2,
                3,
                9,
                13,
                7,
                3,
                4,
                Padding::Explicit(1, 2),
                Activation::Tanh,
            ),
            (1, 2, 5, 7, 1, 7, 7, Padding::Same, Activation::None),
            (
                3,
                16,
                6,
                11,
                11,
                3,
                3,
                Padding::Explicit(1, 1),
                Activation::LeakyRelu(0.1),
            ),
            // The most filters (ResNet-20's second stage: blocks of 16, 512 accumulators),
            // and counts between: blocks of 9, and of 16 over rows 20 wide (a whole block
            // and a partial one).
            (
                2,
                32,
                16,
                16,
                32,
                3,
                3,
                Padding::Explicit(1, 1),
                Activation::Relu,
            ),
            (
                2,
                5,
                7,
                9,
                23,
                3,
                3,
                Padding::Explicit(1, 1),
                Activation::None,
            ),
            (
                2,
                5,
                4,
                20,
                24,
                3,
                3,
                Padding::Explicit(1, 1),
                Activation::LeakyRelu(0.1),
            ),
            // Rows of whole vec4s whose blocks' segments start 2 and 1 values into a vec4,
            // forward and backward.
            (
                2,
                4,
                8,
                12,
                8,
                5,
                5,
                Padding::Explicit(2, 2),
                Activation::Relu,
            ),
            (1, 3, 6, 8, 5, 7, 7, Padding::Same, Activation::None),
            // Blocks of 16 outputs: ResNet-20's first stage (rows of two whole blocks), and
            // rows 20 wide (a whole block and a partial one).
            (
                2,
                16,
                5,
                32,
                16,
                3,
                3,
                Padding::Explicit(1, 1),
                Activation::Relu,
            ),
            (
                2,
                3,
                4,
                20,
                16,
                3,
                3,
                Padding::Explicit(1, 1),
                Activation::None,
            ),
            // Vec4 rows whose last block is partial: the forward pass's output 13 wide, then
            // the input gradient's.
            (
                2,
                3,
                5,
                12,
                7,
                3,
                4,
                Padding::Explicit(1, 2),
                Activation::Tanh,
            ),
            (
                2,
                3,
                5,
                13,
                7,
                3,
                4,
                Padding::Explicit(1, 1),
                Activation::None,
            ),
            // x and dy of 18,432 floats: 4,608 rgba32float texels, past one texture row.
            (
                3,
                16,
                12,
                32,
                16,
                3,
                3,
                Padding::Explicit(1, 1),
                Activation::Relu,
            ),
        ];
        for (i, &(n, c, h, w, o, kh, kw, padding, activation)) in cases.iter().enumerate() {
            let spec = Conv2d {
                padding,
                activation,
                ..Conv2d::default()
            };
            let seed = 10 * i as u64;
            let (x, weight, bias) = (
                random(&[n, c, h, w], seed),
                random(&[o, c, kh, kw], seed + 1),
                random(&[o], seed + 2),
            );
            let shape = spec.shape(x.shape(), weight.shape(), None).unwrap();
            assert!(eligible(gpu, &spec, &shape) && eligible_backward(gpu, &spec, &shape));
            let dy = random(&shape.output(), seed + 3);
            let want_y = conv2d_cpu(&spec, &x.view(), &weight.view(), Some(&bias.view())).unwrap();
            let linear = Conv2d {
                activation: Activation::None,
                ..spec
            };
            let want_dx = conv2d_backward_cpu(&linear, &x.view(), &weight.view(), &dy.view())
                .unwrap()
                .x;
            let upload = |a: &ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
            let (tx, tw, tb, tdy) = (upload(&x), upload(&weight), upload(&bias), upload(&dy));
            for &subgroup in &kernels {
                let y = upload(&want_y.mapv(|_| f32::NAN));
                run(
                    &shape,
                    &tx,
                    &tw,
                    Some(&tb),
                    Output::Plain(&y),
                    activation,
                    false,
                    subgroup,
                )
                .unwrap();
                let dx = upload(&x.mapv(|_| f32::NAN));
                run(
                    &transposed(&shape),
                    &tdy,
                    &tw,
                    None,
                    Output::Plain(&dx),
                    Activation::None,
                    true,
                    subgroup,
                )
                .unwrap();
                for (name, got, want) in [("y", &y, &want_y), ("dx", &dx, &want_dx)] {
                    let got = got.to_array().unwrap();
                    let diff = (&got - want).mapv(f32::abs).fold(0.0f32, |a, &b| {
                        if b.is_nan() { f32::INFINITY } else { a.max(b) }
                    });
                    assert!(
                        diff < 1e-4,
                        "case {i}, subgroup {subgroup:?}, {:?}, {name}: {diff}",
                        gpu.operand_reads()
                    );
                }
            }
        }
    }

    /// The pooled epilogue against the CPU's convolution then 2×2 max pooling, into outputs
    /// taken from a pool poisoned with NaN: maxima and arg-max (ReLU's zeros make ties
    /// common; the first in row-major order wins, as in PyTorch), with and without the
    /// arg-max, in a training step's plan and an evaluation's. LeNet's layers (blocks of 12
    /// and 8), an odd batch, padding, blocks of 16, rows read as scalars, every kind of
    /// activation, rows 42 wide read as scalars in blocks of 8; the shapes and poolings it
    /// leaves to the two ops; input read from storage and from textures.
    #[test]
    fn the_pooled_epilogue_matches_convolution_then_pooling() {
        crate::test_support::on_both_read_families(the_pooled_epilogue_matches_on);
    }

    fn the_pooled_epilogue_matches_on(gpu: &Gpu) {
        use crate::ops::pool2d::{Pool2d, pool2d_cpu};
        let fused = broadcast_subgroup(gpu).is_some();
        let pool = Pool2d::max((2, 2));
        // (n, c, h, w, o, kh, padding, activation); rows 14 wide read as scalars.
        let cases = [
            (
                3,
                1,
                28,
                28,
                6,
                5,
                Padding::Explicit(0, 0),
                Activation::Relu,
            ),
            (
                5,
                6,
                12,
                12,
                16,
                5,
                Padding::Explicit(0, 0),
                Activation::Relu,
            ),
            (
                2,
                3,
                16,
                16,
                8,
                3,
                Padding::Explicit(1, 1),
                Activation::None,
            ),
            (
                2,
                4,
                8,
                32,
                16,
                3,
                Padding::Explicit(1, 1),
                Activation::Sigmoid,
            ),
            (
                2,
                2,
                10,
                14,
                6,
                3,
                Padding::Explicit(0, 0),
                Activation::LeakyRelu(0.1),
            ),
            // Rows 42 wide read as scalars in blocks of 8, an odd batch.
            (3, 2, 6, 42, 6, 3, Padding::Explicit(0, 0), Activation::Relu),
        ];
        for (i, &(n, c, h, w, o, k, padding, activation)) in cases.iter().enumerate() {
            let spec = Conv2d {
                padding,
                activation,
                ..Conv2d::default()
            };
            let seed = 40 + 10 * i as u64;
            let (x, weight, bias) = (
                random(&[n, c, h, w], seed),
                random(&[o, c, k, k], seed + 1),
                random(&[o], seed + 2),
            );
            let y = conv2d_cpu(&spec, &x.view(), &weight.view(), Some(&bias.view())).unwrap();
            let want = pool2d_cpu(&pool, &y.view()).unwrap();
            let upload = |a: &ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
            let (tx, tw, tb) = (upload(&x), upload(&weight), upload(&bias));
            for (training, argmax) in [(Some(true), true), (None, false)] {
                // Freed poisoned buffers of the outputs' size, for the op to take.
                drop((
                    upload(&want.y.mapv(|_| f32::NAN)),
                    upload(&want.y.mapv(|_| f32::NAN)),
                ));
                let got = spec
                    .forward_pooled(&tx, (&tw, Some(&tb)), &pool, (training, argmax))
                    .unwrap();
                let Some(got) = got else {
                    assert!(!fused, "case {i} was left to the two ops");
                    continue;
                };
                assert!(fused, "case {i} fused on a context that cannot");
                let diff =
                    (&got.y.to_array().unwrap() - &want.y)
                        .mapv(f32::abs)
                        .fold(
                            0.0f32,
                            |a, &b| if b.is_nan() { f32::INFINITY } else { a.max(b) },
                        );
                assert!(diff < 1e-4, "case {i}, training {training:?}: {diff}");
                match (got.argmax, &want.argmax) {
                    (Some(got), Some(want)) => {
                        assert_eq!(&got.to_array().unwrap(), want, "case {i} arg-max")
                    }
                    (None, _) => assert!(!argmax, "case {i}: no arg-max"),
                    (Some(_), None) => panic!("case {i}: an arg-max not asked for"),
                }
            }
        }
        // An odd number of rows (of whole blocks), rows that end in a partial block, a
        // pooling other than 2×2 at stride 2: the two ops.
        let spec = Conv2d::default();
        for (x, k) in [([1, 1, 13, 28], 5), ([1, 1, 13, 12], 3)] {
            let (tx, tw) = (
                Tensor::from_array(gpu, &random(&x, 1)).unwrap(),
                Tensor::from_array(gpu, &random(&[2, 1, k, k], 2)).unwrap(),
            );
            let refused = spec.forward_pooled(&tx, (&tw, None), &pool, (None, false));
            assert!(refused.unwrap().is_none(), "{x:?}");
        }
        // A shape the 2×2 pooling fuses with, where a context can fuse at all.
        let (tx, tw) = (
            Tensor::from_array(gpu, &random(&[1, 1, 14, 28], 1)).unwrap(),
            Tensor::from_array(gpu, &random(&[2, 1, 5, 5], 2)).unwrap(),
        );
        let halves = spec.forward_pooled(&tx, (&tw, None), &pool, (None, false));
        assert_eq!(halves.unwrap().is_some(), fused);
        let wide = Pool2d::max((3, 3)).stride((2, 2));
        assert!(
            spec.forward_pooled(&tx, (&tw, None), &wide, (None, false))
                .unwrap()
                .is_none()
        );
        let average = Pool2d::avg((2, 2));
        assert!(
            spec.forward_pooled(&tx, (&tw, None), &average, (None, false))
                .unwrap()
                .is_none()
        );
    }
}
