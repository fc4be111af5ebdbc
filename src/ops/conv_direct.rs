//! Direct convolution for small filter banks (`shaders/conv_direct.wgsl`): the forward pass
//! of LeNet-sized layers without an im2col buffer. Used by `Conv2d::forward` for stride 1,
//! no dilation, at most 16 filters whose weights fit a uniform buffer; other shapes take
//! im2col + matmul. The kernel is generated per (filters, block, kernel width) so that the
//! accumulators are plain registers, and specialised per layer shape (WGSL `override`
//! constants, not the batch size) so that its index arithmetic folds.

use std::fmt::Write;

use bytemuck::{Pod, Zeroable};

use super::conv2d::{Conv2d, Conv2dShape};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::gpu::dispatch::{Binding, Resource};
use crate::gpu::texture::{scalar_input, scalar_texture};
use crate::tensor::Tensor;

/// Mirrors `Params` in shaders/conv_direct.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DirectParams {
    total: u32,
    slope: f32,
    _pad: [u32; 2],
}

pub(super) const MAX_FILTERS: usize = 16;
pub(super) const MAX_KERNEL_WIDTH: usize = 7;

/// Accumulators one invocation keeps (filters × block) before registers spill.
const MAX_ACCUMULATORS: usize = 48;

/// Outputs per invocation along a row: a longer block reuses each loaded input more, up to
/// the register budget, and one that divides the row wastes no lanes on the edge (measured
/// on lavapipe for LeNet's input gradient, 12 wide: blocks of 2, 4, 8 and 6 took 11, 7.4,
/// 7.7 and 6.3 ms).
fn block(shape: &Conv2dShape) -> usize {
    let most = (MAX_ACCUMULATORS / shape.o).clamp(1, 8);
    let dividing = (1..=most)
        .rev()
        .find(|b| shape.ow.is_multiple_of(*b))
        .unwrap_or(1);
    if 2 * dividing >= most { dividing } else { most }
}

fn bank_floats(shape: &Conv2dShape) -> usize {
    shape.o * shape.taps() + shape.o
}

/// Whether the direct kernel handles this convolution.
pub(crate) fn eligible(gpu: &Gpu, spec: &Conv2d, shape: &Conv2dShape) -> bool {
    let bank_bytes = (bank_floats(shape).div_ceil(4) * 16) as u64;
    let uniform_limit = gpu.limits().max_uniform_buffer_binding_size.min(65_536);
    spec.stride == (1, 1)
        && spec.dilation == (1, 1)
        && shape.groups == 1
        && shape.o <= MAX_FILTERS
        && shape.kw <= MAX_KERNEL_WIDTH
        && bank_bytes <= uniform_limit
        && (shape.n * shape.oh * shape.ow.div_ceil(block(shape))) < u32::MAX as usize
}

/// The kernel's source for `filters` filters of width `kw`, `b` outputs per invocation.
/// `transposed` reads the bank as the flipped, transposed kernel of the backward pass
/// (`dx` from `dy`).
/// The kernel for `filters` filters, blocks of `b` outputs, kernel width `kw`, a bank of
/// `vec4s` vec4s, flipped (`transposed`) for the input gradient, reading the input from
/// storage or a texture.
fn source(
    filters: usize,
    b: usize,
    kw: usize,
    vec4s: usize,
    transposed: bool,
    textures: bool,
) -> String {
    let (mut decls, mut body, mut stores) = (String::new(), String::new(), String::new());
    for o in 0..filters {
        for j in 0..b {
            let _ = writeln!(decls, "    var a{o}_{j} = 0.0;");
        }
    }
    for r in 0..b + kw - 1 {
        let _ = writeln!(
            body,
            "            let r{r} = fetch(row, left + {r}, inside);"
        );
    }
    for kx in 0..kw {
        for o in 0..filters {
            let index = if transposed {
                // w[c_in = loop c][c_out = o][kh-1-ky][kw-1-kx] of the forward OIHW bank.
                format!(
                    "(c * {filters}u + {o}u) * KH * {kw}u + (KH - 1u - ky) * {kw}u + {}u",
                    kw - 1 - kx
                )
            } else {
                format!("{o}u * TAPS + tap + {kx}u")
            };
            let _ = writeln!(body, "            let w{o}_{kx} = weight({index});");
            for j in 0..b {
                let _ = writeln!(body, "            a{o}_{j} += r{} * w{o}_{kx};", j + kx);
            }
        }
    }
    for o in 0..filters {
        let _ = writeln!(
            stores,
            "    let bias{o} = select(0.0, weight({filters}u * TAPS + {o}u), HAS_BIAS != 0u);"
        );
        for j in 0..b {
            let _ = writeln!(
                stores,
                "    if ox0 + {j}u < OW {{ y[base + {o}u * plane + {j}u] = activate(a{o}_{j} + bias{o}, ACT, p.slope); }}"
            );
        }
    }
    [
        include_str!("../../shaders/epilogue.wgsl"),
        &include_str!("../../shaders/conv_direct.wgsl")
            .replace("{{INPUT_X}}", &scalar_input("x", 1, textures))
            .replace("{{VEC4S}}", &vec4s.to_string())
            .replace("{{BLOCK}}", &b.to_string())
            .replace("{{KW}}", &kw.to_string())
            .replace("{{FILTERS}}", &filters.to_string())
            .replace("{{DECLS}}", &decls)
            .replace("{{BODY}}", &body)
            .replace("{{STORES}}", &stores),
    ]
    .concat()
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
    run(shape, x, weight, bias, out, spec.activation, false)
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
        dx,
        crate::ops::Activation::None,
        true,
    )
}

fn run(
    shape: &Conv2dShape,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    activation: crate::ops::Activation,
    flipped: bool,
) -> Result<()> {
    let gpu = x.gpu();
    let b = block(shape);
    let vec4s = bank_floats(shape).div_ceil(4);
    // The bank: this step's weights and bias, copied into a uniform buffer in the same
    // command stream (so it follows the optimizer's updates).
    let bank = gpu.checked("allocating a filter bank", || {
        gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("filter bank"),
            size: (vec4s * 16) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    })?;
    gpu.copy((weight.buffer(), 0), (&bank, 0), weight.bytes())?;
    if let Some(bias) = bias {
        gpu.copy((bias.buffer(), 0), (&bank, weight.bytes()), bias.bytes())?;
    }
    let blocks = shape.ow.div_ceil(b);
    let total = shape.n * shape.oh * blocks;
    let params = DirectParams {
        total: total as u32,
        slope: activation.slope(),
        _pad: [0; 2],
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
        ("TAPS", shape.taps() as u32),
        ("ACT", activation.code()),
        ("HAS_BIAS", u32::from(bias.is_some())),
    ];
    // The input through a texture where the adapter fetches texels faster (see
    // `Gpu::operand_reads`): a copy of x, one float per texel.
    let texture = scalar_texture(x)?;
    let key = format!(
        "conv_direct_o{}_b{b}_kw{}_v{vec4s}_{}{}",
        shape.o,
        shape.kw,
        if flipped { "t" } else { "f" },
        if texture.is_some() { "_tex" } else { "" }
    );
    let pipeline = gpu.specialized(
        &key,
        "main",
        || source(shape.o, b, shape.kw, vec4s, flipped, texture.is_some()),
        &constants,
    )?;
    let bank = Binding {
        buffer: &bank,
        bytes: (vec4s * 16) as u64,
    };
    let input = match &texture {
        Some(t) => Resource::Texture(&t.view),
        None => Resource::Buffer(x.binding()),
    };
    let copy_input = |encoder: &mut wgpu::CommandEncoder| {
        if let Some(t) = &texture {
            t.copy_from(encoder, x.binding(), x.len() as u64);
        }
        Ok(())
    };
    gpu.run_pass_after("conv2d direct", copy_input, |pass| {
        gpu.encode_resources(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &[
                (1, input),
                (2, Resource::Buffer(out.binding())),
                (3, Resource::Buffer(bank)),
            ],
            (total as u64).div_ceil(64),
        )
    })
}
