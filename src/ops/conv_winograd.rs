//! 3×3 convolutions at stride 1 as Winograd F(m×m, 3×3), m = 2 or 4
//! (`shaders/conv_winograd.wgsl`): the weights and each (m+2)×(m+2) input tile transformed,
//! (m+2)² batched matmuls over the channels (`ops/matmul.rs`), then each m×m block of outputs
//! transformed back with bias and activation. F(2×2, 3×3) does 2.25× fewer multiplies than
//! direct summation and keeps 16·C values per 2×2 outputs (im2col: 9·C per output);
//! F(4×4, 3×3) 4× fewer and 36·C per 4×4 outputs, at the price of transforms with entries
//! from 1/24 to 8, whose rounding the tests bound (tests/suite/conv2d.rs). The input gradient is the
//! same algorithm over `dy` with the filters rotated and transposed; the weight gradient
//! transforms the tiles of `x` and `dy` and sums their products over the tiles as one
//! batched matmul, then transforms the sums back to 3×3. F(4×4, 3×3)'s weight gradient sums
//! products up to |A|²·|B|² larger than the gradient they cancel down to: its error scales
//! with the largest gradient (measured, N8 64→64 56² against the CPU: 2.4e-5 of max |dW|,
//! F(2×2)'s 7.8e-6, im2col's 6.6e-6; on PyTorch's goldens 5.3e-7 of it past rtol 1e-4, up to
//! 1.7× their atol of 1e-5 where F(2×2) stays within 56 %), the tests bound it so
//! (tests/suite/conv2d.rs), and it comes after F(2×2)'s in the fixed order: the tuner takes it
//! where it is faster (N8 64→64 56² on lavapipe: dW 19.6 → 14.5 ms). The CPU reference is
//! `conv2d_cpu`: Winograd computes the same sums in another order.

use bytemuck::{Pod, Zeroable};

use super::Activation;
use super::conv2d::{Conv2d, Conv2dShape, chunk_limit, image_chunks};
use super::matmul::Matmul;
use super::reduce::{slice_fits, sum_axes, sum_slice};
use crate::error::{Error, Result};
use crate::gpu::dispatch::{Binding, Resource};
use crate::gpu::shared::workgroups;
use crate::gpu::texture::{OperandTexture, Texel, binding_texture, scalar_input, vec4_input};
use crate::gpu::{Commands, Generated, Gpu};
use crate::tensor::{Tensor, gpu_word};
use crate::value::add::accumulate;

/// Mirrors `Params` in shaders/conv_winograd.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct WinogradParams {
    images: u32,
    first_image: u32,
    total: u32,
    slope: f32,
    has_bias: u32,
    has_residual: u32,
    relu: u32,
    _pad: u32,
}

/// What a problem's kernels are specialised on (`override` constants), and the output
/// transforms' bias and residual, which are uniforms: one pipeline serves a shape with or
/// without them.
struct Constants {
    overrides: [(&'static str, u32); 13],
    bias: bool,
    residual: bool,
}

/// The convolution the kernels run: the layer's forward pass, or its input gradient as a
/// convolution of `dy` (channels and filters swapped, the kernel rotated).
#[derive(Clone, Copy, Debug)]
struct Problem {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    oh: usize,
    ow: usize,
    pad_top: usize,
    pad_left: usize,
    /// The input gradient's filters: `w[c][o]` rotated by 180°.
    flip: bool,
    /// Outputs per block side, m: 2 or 4.
    tile: usize,
    /// Channel groups: the point products are one per (point, group).
    groups: usize,
}

impl Problem {
    fn forward(shape: &Conv2dShape, tile: usize) -> Self {
        Self {
            c: shape.c,
            h: shape.h,
            w: shape.w,
            o: shape.o,
            oh: shape.oh,
            ow: shape.ow,
            pad_top: shape.pad_top,
            pad_left: shape.pad_left,
            flip: false,
            tile,
            groups: shape.groups,
        }
    }

    /// `dx[ih] = Σ_k dy[ih + pad − 2 + k] · w[2 − k]`: a convolution of `dy` padded by
    /// `2 − pad`, possible while the layer pads by at most 2.
    fn input_gradient(shape: &Conv2dShape, tile: usize) -> Option<Self> {
        Some(Self {
            c: shape.o,
            h: shape.oh,
            w: shape.ow,
            o: shape.c,
            oh: shape.h,
            ow: shape.w,
            pad_top: 2usize.checked_sub(shape.pad_top)?,
            pad_left: 2usize.checked_sub(shape.pad_left)?,
            flip: true,
            tile,
            groups: shape.groups,
        })
    }

    /// Whether the tiles are numbered in 2×2 blocks (both tile counts even): `input4`'s four
    /// tiles then share their overlapping input.
    fn blocks(&self) -> bool {
        let (rows, columns) = self.tile_counts();
        rows.is_multiple_of(2) && columns.is_multiple_of(2)
    }

    /// Whether a 2×2 block of tiles may read its rows of `width` values as whole vec4s (the
    /// `…_rows4` entries). On lavapipe, N8 64→64 56²: F(4×4)'s input transforms 4.85–5.1 →
    /// 4.3–4.7 ms, F(2×2)'s dy transform 3.4–3.5 → 2.9–3.0 (its input's unchanged, 4.2);
    /// ResNet-20's step: the input transforms 25.4 → 21.4 ms, the dy ones 7.7 → 6.9.
    fn rows4(&self, width: usize) -> bool {
        self.blocks() && width.is_multiple_of(4)
    }

    /// Tiles down and across an image.
    fn tile_counts(&self) -> (usize, usize) {
        (self.oh.div_ceil(self.tile), self.ow.div_ceil(self.tile))
    }

    fn tiles(&self) -> usize {
        let (rows, columns) = self.tile_counts();
        rows * columns
    }

    /// Points of the transformed tile: the matmuls per convolution.
    fn points(&self) -> usize {
        (self.tile + 2) * (self.tile + 2)
    }

    /// A filter's channels.
    fn group_c(&self) -> usize {
        self.c / self.groups
    }

    /// The transformed filters `[points, O, C/G]` as the point products' batched operand:
    /// `[points·G, O/G, C/G]`.
    fn filters_batch(&self) -> [usize; 3] {
        let g = self.groups;
        [self.points() * g, self.o / g, self.group_c()]
    }

    /// `[points, planes, columns]` (V over the channels, M over the filters) as the point
    /// products' batched operand: `[points·G, planes/G, columns]`.
    fn planes_batch(&self, planes: usize, columns: usize) -> [usize; 3] {
        let g = self.groups;
        [self.points() * g, planes / g, columns]
    }

    /// Bytes of one image's transformed tiles (V) or transformed outputs (M).
    fn image_bytes(&self) -> u64 {
        (self.points() * self.c.max(self.o) * self.tiles()) as u64 * 4
    }

    fn constants(&self, spec: &Conv2d, (bias, residual): (bool, bool)) -> Result<Constants> {
        let word = |v: usize| gpu_word("conv2d", v);
        let (activation, _) = spec.activation.relu_as_uniform();
        let overrides = [
            ("C", word(self.c)?),
            ("H", word(self.h)?),
            ("W", word(self.w)?),
            ("O", word(self.o)?),
            ("OH", word(self.oh)?),
            ("OW", word(self.ow)?),
            ("PAD_TOP", word(self.pad_top)?),
            ("PAD_LEFT", word(self.pad_left)?),
            ("ACT", activation.code()),
            ("FLIP", u32::from(self.flip)),
            ("TILE", word(self.tile)?),
            ("BLOCKS", u32::from(self.blocks())),
            ("GROUPS", word(self.groups)?),
        ];
        Ok(Constants {
            overrides,
            bias,
            residual,
        })
    }
}

/// Channels and filters a group from which a grouped layer may take Winograd: its point
/// products are one matmul per (point, group), too small to pay below this.
const MIN_GROUP_WIDTH: usize = 8;

/// Whether Winograd takes the layer: 3×3, stride 1, no dilation, one group or groups of at
/// least [`MIN_GROUP_WIDTH`] channels and filters, and one image's transformed tiles within
/// the chunk the im2col path uses.
fn fits(gpu: &Gpu, spec: &Conv2d, shape: &Conv2dShape, problem: Option<Problem>) -> bool {
    let g = shape.groups;
    (shape.kh, shape.kw) == (3, 3)
        && spec.stride == (1, 1)
        && spec.dilation == (1, 1)
        && (g == 1 || shape.c / g >= MIN_GROUP_WIDTH && shape.o / g >= MIN_GROUP_WIDTH)
        && problem.is_some_and(|p| p.image_bytes() <= chunk_limit(gpu))
}

/// Whether the forward pass runs as Winograd with blocks of `tile`².
pub(crate) fn eligible(gpu: &Gpu, spec: &Conv2d, shape: &Conv2dShape, tile: usize) -> bool {
    fits(gpu, spec, shape, Some(Problem::forward(shape, tile)))
}

/// Whether the input gradient runs as Winograd (the layer pads by at most 2).
pub(crate) fn eligible_backward(
    gpu: &Gpu,
    spec: &Conv2d,
    shape: &Conv2dShape,
    tile: usize,
) -> bool {
    fits(gpu, spec, shape, Problem::input_gradient(shape, tile))
}

/// `dweight` from `x` and the pre-activation `dy`: per chunk of images the input tiles V
/// and `dM = A dy Aᵀ` per m×m block of `dy`, `dU[ξ] = Σ_t dM[ξ]·V[ξ]ᵀ` as one batched matmul
/// over the tiles (chunks added up), then `dW = Gᵀ dU G`. With `dbias`, the bias gradient
/// too: A's row 1 is all ones for both tiles, so dM's point (1, 1) holds each block's sum
/// of `dy`, and dbias sums that point over the tiles, m² times fewer terms than `dy` (N8
/// 64→64 56² on lavapipe: the sum 1.2–1.4 → 0.18–0.19 ms, but the dy transform, now the
/// first to read dy, 3.5–4.1 → 4.1–4.2: about 0.5 ms in all). Where a chunk's tiles would
/// outgrow one pass of [`sum_slice`], dbias sums `dy` itself.
/// With `saved`, the forward pass's own V of the whole batch (see [`saved_tiles`]), the
/// input transform is skipped: one pass over the batch with dM alone.
pub(crate) fn weight_grad(
    spec: &Conv2d,
    shape: &Conv2dShape,
    (x, dy): (&Tensor, &Tensor),
    (dweight, dbias): (&Tensor, Option<&Tensor>),
    (tile, saved): (usize, Option<&Tensor>),
) -> Result<()> {
    let gpu = x.gpu();
    let problem = Problem::forward(shape, tile);
    let passes = Passes::unactivated(gpu, spec, &problem, shape.n)?;
    let (c, o, tiles, points) = (problem.c, problem.o, problem.tiles(), problem.points());
    let nt = Matmul {
        trans_b: true,
        ..Matmul::default()
    };
    let mut sum: Option<Tensor> = None;
    // dM's point (1, 1), the blocks' sums of dy: 1·(m + 2) + 1.
    let sums_point = problem.tile + 3;
    let dy_rows4 = problem.rows4(problem.ow);
    // V and dM live together: each chunk holds half of what the forward pass's may. A
    // saved V is the whole batch's, kept where it fitted one chunk of the forward pass.
    let saved = saved.filter(|v| saved_tiles(shape, v) == Some(tile));
    let chunks = match saved {
        Some(_) => vec![(0, shape.n)],
        None => image_chunks(shape.n, 2 * problem.image_bytes(), chunk_limit(gpu)),
    };
    let dbias = match dbias {
        Some(dbias) if chunks.iter().any(|&(_, n)| !slice_fits(gpu, n * tiles)) => {
            let dims = (shape.n, o, shape.oh * shape.ow);
            sum_axes(gpu, dy, dims, dbias, 1.0, false)?;
            None
        }
        dbias => dbias,
    };
    for (first, count) in chunks {
        let images = (first, count);
        let made;
        let v = match saved {
            Some(v) => v,
            None => {
                made = input_chunk(spec, &problem, x, images)?;
                &made
            }
        };
        let dm = Tensor::uninit(gpu, &[points, o, count * tiles])?;
        by_tiles(
            &passes,
            ("output_grad", dy, dy_rows4),
            &dm,
            (o, tiles),
            images,
        )?;
        let columns = count * tiles;
        if let Some(dbias) = dbias {
            let dims = (points, o, columns);
            sum_slice(gpu, &dm, dims, sums_point, dbias, first > 0)?;
        }
        let du = Tensor::uninit(gpu, &[points, o, problem.group_c()])?;
        nt.run(
            gpu,
            dm.operand_as(&problem.planes_batch(o, columns)),
            v.operand_as(&problem.planes_batch(c, columns)),
            None,
            du.operand_as(&problem.filters_batch()),
        )?;
        match &sum {
            Some(sum) => accumulate(sum, &du)?,
            None => sum = Some(du),
        }
    }
    let du = sum.ok_or_else(|| Error::EmptyDimension {
        op: "conv2d",
        shape: x.shape().to_vec(),
        axis: 0,
    })?;
    let weights = [(1, du.binding()), (2, dweight.binding())];
    passes.encode("weights_grad", &weights, o * problem.group_c(), (0, 0))
}

/// `out = act(conv(x, weight) + bias)`.
pub(crate) fn forward(
    spec: &Conv2d,
    shape: &Conv2dShape,
    (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
    out: &Tensor,
    tile: usize,
) -> Result<()> {
    run(spec, Problem::forward(shape, tile), (x, weight, bias), out)
}

/// The forward pass's transformed filters `U = G·g·Gᵀ`, `[points, O, C]`: what
/// [`forward_transformed`] takes, for a layer whose weights stay fixed over many passes.
pub(crate) fn forward_filters(
    spec: &Conv2d,
    shape: &Conv2dShape,
    weight: &Tensor,
    tile: usize,
) -> Result<Tensor> {
    transform_filters(spec, &Problem::forward(shape, tile), weight)
}

/// Whether `filters` are [`forward_filters`] of this shape and tile (by their shape).
pub(crate) fn fits_filters(shape: &Conv2dShape, tile: usize, filters: &Tensor) -> bool {
    let problem = Problem::forward(shape, tile);
    filters.shape() == [problem.points(), problem.o, problem.group_c()]
}

/// [`forward`] with the filters [`forward_filters`] transformed, and `residual` (the
/// output's shape) added before the activation. With `keep`, the transformed input tiles V
/// where the whole batch ran as one chunk: what [`weight_grad`] would transform again.
pub(crate) fn forward_transformed(
    spec: &Conv2d,
    shape: &Conv2dShape,
    operands: (&Tensor, &Tensor, Option<&Tensor>, Option<&Tensor>),
    out: &Tensor,
    (tile, keep): (usize, bool),
) -> Result<Option<Tensor>> {
    run_transformed(spec, Problem::forward(shape, tile), operands, out, keep)
}

/// Whether the forward pass of `shape` with blocks of `tile`² runs the whole batch as one
/// chunk: only then can it keep the input tiles V for the weight gradient.
pub(crate) fn keeps_tiles(gpu: &Gpu, shape: &Conv2dShape, tile: usize) -> bool {
    whole_batch(gpu, &Problem::forward(shape, tile), shape.n)
}

/// Whether `n` images of `problem` run as one chunk of transformed tiles.
fn whole_batch(gpu: &Gpu, problem: &Problem, n: usize) -> bool {
    image_chunks(n, problem.image_bytes(), chunk_limit(gpu)).len() == 1
}

/// The transformed input tiles V of the whole batch in one pass, as the weight gradient
/// transforms them: what the tuner times for the candidates that keep no V
/// (`Conv2d::training_forward_kernel`).
pub(crate) fn input_tiles(
    spec: &Conv2d,
    shape: &Conv2dShape,
    x: &Tensor,
    tile: usize,
) -> Result<Tensor> {
    input_chunk(spec, &Problem::forward(shape, tile), x, (0, shape.n))
}

/// The weight gradient's V for images `(first, count)` of `x`: `[points, C, count·tiles]`.
fn input_chunk(
    spec: &Conv2d,
    problem: &Problem,
    x: &Tensor,
    images: (usize, usize),
) -> Result<Tensor> {
    let gpu = x.gpu();
    let passes = Passes::unactivated(gpu, spec, problem, x.shape()[0])?;
    let (c, tiles) = (problem.c, problem.tiles());
    let v = Tensor::uninit(gpu, &[problem.points(), c, images.1 * tiles])?;
    let source = ("input", x, problem.rows4(problem.w));
    by_tiles(&passes, source, &v, (c, tiles), images)?;
    Ok(v)
}

/// The tile (2 or 4) whose transformed input tiles of the whole batch `v` is, by its shape
/// `[points, C, N·tiles]`; `None` for a tensor that is neither's.
pub(crate) fn saved_tiles(shape: &Conv2dShape, v: &Tensor) -> Option<usize> {
    [2, 4].into_iter().find(|&tile| {
        let problem = Problem::forward(shape, tile);
        v.shape() == [problem.points(), problem.c, shape.n * problem.tiles()]
    })
}

/// `dx` from `dy` (`spec` without an activation).
pub(crate) fn backward_data(
    spec: &Conv2d,
    shape: &Conv2dShape,
    (dy, weight): (&Tensor, &Tensor),
    dx: &Tensor,
    tile: usize,
) -> Result<()> {
    let problem = Problem::input_gradient(shape, tile).ok_or_else(|| Error::InvalidArgument {
        op: "conv2d",
        detail: format!("Winograd's input gradient needs padding ≤ 2, got {shape:?}"),
    })?;
    let plain = Conv2d {
        activation: Activation::None,
        ..*spec
    };
    run(&plain, problem, (dy, weight, None), dx)
}

fn run(
    spec: &Conv2d,
    problem: Problem,
    (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
    out: &Tensor,
) -> Result<()> {
    let u = transform_filters(spec, &problem, weight)?;
    run_transformed(spec, problem, (x, &u, bias, None), out, false).map(drop)
}

/// The filters of `problem` transformed: `[points, O, C]`.
fn transform_filters(spec: &Conv2d, problem: &Problem, weight: &Tensor) -> Result<Tensor> {
    let gpu = weight.gpu();
    // One pipeline per shape, whatever the layer's activation and bias; it reads no images.
    let passes = Passes::unactivated(gpu, spec, problem, 0)?;
    let (c, o) = (problem.group_c(), problem.o);
    let u = Tensor::uninit(gpu, &[problem.points(), o, c])?;
    let bindings = [(1, weight.binding()), (2, u.binding())];
    passes.encode("weights", &bindings, o * c, (0, 0))?;
    Ok(u)
}

/// `problem` with its filters transformed (`u`): the input transform, the batched
/// products and the output transform (adding the residual, if any), in chunks of images.
/// With `keep` and one chunk, returns the input tiles V.
fn run_transformed(
    spec: &Conv2d,
    problem: Problem,
    (x, u, bias, residual): (&Tensor, &Tensor, Option<&Tensor>, Option<&Tensor>),
    out: &Tensor,
    keep: bool,
) -> Result<Option<Tensor>> {
    let gpu = x.gpu();
    let n = x.shape()[0];
    let passes = Passes {
        gpu,
        spec: *spec,
        constants: problem.constants(spec, (bias.is_some(), residual.is_some()))?,
        batch: n,
    };
    let (c, o, tiles, points) = (problem.c, problem.o, problem.tiles(), problem.points());
    // Without a bias the filters fill the (unread) bias slot.
    let bias_slot = bias.unwrap_or(u);
    let x_rows4 = problem.rows4(problem.w);
    let keep = keep && whole_batch(gpu, &problem, n);
    let chunks = image_chunks(n, problem.image_bytes(), chunk_limit(gpu));
    let mut kept = None;
    for (first, count) in chunks {
        let images = (first, count);
        let v = Tensor::uninit(gpu, &[points, c, count * tiles])?;
        by_tiles(&passes, ("input", x, x_rows4), &v, (c, tiles), images)?;
        let m = Tensor::uninit(gpu, &[points, o, count * tiles])?;
        let columns = count * tiles;
        Matmul::default().run(
            gpu,
            u.operand_as(&problem.filters_batch()),
            v.operand_as(&problem.planes_batch(c, columns)),
            None,
            m.operand_as(&problem.planes_batch(o, columns)),
        )?;
        // Without a residual the products fill its (unread) slot.
        let residual = residual.unwrap_or(&m);
        // F(4×4)'s blocks over rows of whole vec4s: a vec4 store per row of a block, where
        // the stores bound the transform (N8 64→64 56²: 2.95 ms against 3.8).
        // F(2×2)'s 2×2 blocks of tiles likewise, their points read as vec4s: N128 64→64 8²
        // 1.7–1.8 → 0.96 ms, unchanged where M outgrows the caches (16→16 32²: 6.4 → 6.2–6.3).
        let rows4 = problem.ow.is_multiple_of(4) && (problem.tile == 4 || problem.blocks());
        let (y, residual) = if rows4 {
            ((6, out.binding_vec4()), (7, residual.binding_vec4()))
        } else {
            ((2, out.binding()), (4, residual.binding()))
        };
        let (entry, m, per_invocation) = match (rows4, problem.tile) {
            (true, 4) => ("output_rows4", (1, m.binding()), 1),
            (true, _) => ("output_blocks4", (5, m.binding_vec4()), 4),
            (false, _) => ("output", (1, m.binding()), 1),
        };
        let output = [m, y, (3, bias_slot.binding()), residual];
        passes.encode(entry, &output, count * o * tiles / per_invocation, images)?;
        if keep {
            kept = Some(v);
        }
    }
    Ok(kept)
}

/// Runs the tile transform `entry` (`input` or `output_grad`) over `planes` (channels or
/// filters) × `tiles` per image of `images` (first, count), writing the tile points (V or dM)
/// to `points`: as the `…4` twin, 4 tiles an invocation and the points stored as vec4s, where
/// an image's tiles come in fours; else one tile an invocation. On lavapipe ResNet-20's input
/// transforms took 19-20 ms a step instead of 42-44; the output transform read so, and quads
/// across images, were slower (benches/README.md). With `rows4` (see `Problem::rows4`) the
/// `…_rows4` twin reads the source's rows as vec4s.
fn by_tiles(
    passes: &Passes<'_>,
    (entry, source, rows4): (&str, &Tensor, bool),
    points: &Tensor,
    (planes, tiles): (usize, usize),
    images: (usize, usize),
) -> Result<()> {
    let total = images.1 * planes * tiles;
    if rows4 {
        let bindings = [(5, source.binding_vec4()), (6, points.binding_vec4())];
        passes.encode(&format!("{entry}_rows4"), &bindings, total / 4, images)
    } else if tiles.is_multiple_of(4) {
        let bindings = [(1, source.binding()), (6, points.binding_vec4())];
        passes.encode(&format!("{entry}4"), &bindings, total / 4, images)
    } else {
        let bindings = [(1, source.binding()), (2, points.binding())];
        passes.encode(entry, &bindings, total, images)
    }
}

/// `constants` as `entry` reads them, those it never reads fixed, so that passes differing
/// only there share its pipeline: the epilogue's (ACT) belongs to the output transforms,
/// FLIP to the filter transform, and the input transforms read the
/// input's shape and the tiling alone (O set to C, one group). Each set of constants is a
/// kernel of its own to compile: ResNet-18's first step compiled nine twins of its input
/// transforms on lavapipe (60–140 ms each), ResNet-20's the output transforms of dx beside
/// the forward's.
fn read_constants(entry: &str, constants: &[(&'static str, u32)]) -> Vec<(&'static str, u32)> {
    let input = entry.starts_with("input");
    let output = matches!(entry, "output" | "output_rows4" | "output_blocks4");
    let channels = constants
        .iter()
        .find(|(name, _)| *name == "C")
        .map_or(0, |&(_, c)| c);
    constants
        .iter()
        .map(|&(name, value)| match name {
            "ACT" if !output => (name, 0),
            "FLIP" if entry != "weights" => (name, 0),
            "O" if input => (name, channels),
            "GROUPS" if input => (name, 1),
            _ => (name, value),
        })
        .collect()
}

/// One convolution's passes: what each of its kernels shares, and the batch whose images
/// they count (0 for the filter transform, which reads none).
struct Passes<'a> {
    gpu: &'a Gpu,
    spec: Conv2d,
    constants: Constants,
    batch: usize,
}

impl<'a> Passes<'a> {
    /// `spec` without its activation and its constants for `problem`, without bias or
    /// residual: the filter transform's and the weight gradient's passes, which apply none.
    fn unactivated(gpu: &'a Gpu, spec: &Conv2d, problem: &Problem, batch: usize) -> Result<Self> {
        let spec = Conv2d {
            activation: Activation::None,
            ..*spec
        };
        let constants = problem.constants(&spec, (false, false))?;
        Ok(Self {
            gpu,
            spec,
            constants,
            batch,
        })
    }

    /// Records `entry` over `total` invocations for images `(first, images)` of the batch.
    fn encode(
        &self,
        entry: &str,
        bindings: &[(u32, Binding<'_>)],
        total: usize,
        (first, images): (usize, usize),
    ) -> Result<()> {
        let (gpu, spec, constants, batch) = (self.gpu, &self.spec, &self.constants, self.batch);
        let params = WinogradParams {
            images: gpu_word("conv2d", images)?,
            first_image: gpu_word("conv2d", first)?,
            total: gpu_word("conv2d", total)?,
            slope: spec.activation.slope(),
            has_bias: u32::from(constants.bias),
            has_residual: u32::from(constants.residual),
            relu: u32::from(spec.activation.relu_as_uniform().1),
            _pad: 0,
        };
        let constants = read_constants(entry, &constants.overrides);
        // src (bound at 1, read as floats) and src4 (at 5, as vec4s) through operand textures
        // where the adapter fetches texels faster: a copy of what is bound there per pass, so
        // only where the pass covers the whole batch (chunks of a larger one read storage
        // rather than copy the whole batch for each chunk).
        let whole = first == 0 && images == batch;
        let texture = |number: u32, texel: Texel| -> Result<Option<OperandTexture>> {
            match bindings.iter().find(|(n, _)| *n == number) {
                Some(&(_, binding)) if whole => binding_texture(gpu, binding, texel),
                _ => Ok(None),
            }
        };
        let textures = [
            (1, texture(1, Texel::Scalar)?),
            (5, texture(5, Texel::Vec4)?),
        ];
        let kernel = WinogradKernel {
            src_texture: textures[0].1.is_some(),
            src4_texture: textures[1].1.is_some(),
        };
        let pipeline = gpu.generated(&kernel, entry, &constants)?;
        let resources: Vec<_> = bindings
            .iter()
            .map(|&(number, binding)| {
                let texture = textures.iter().find(|(n, _)| *n == number);
                match texture.and_then(|(_, t)| t.as_ref()) {
                    Some(t) => (number, Resource::Texture(&t.view)),
                    None => (number, Resource::Buffer(binding)),
                }
            })
            .collect();
        let copies = |commands: &mut Commands<'_>| {
            for (number, texture) in &textures {
                let bound = bindings.iter().find(|(n, _)| n == number);
                if let (Some(t), Some(&(_, binding))) = (texture, bound) {
                    t.copy_from(
                        commands.encoder(),
                        binding,
                        binding.bytes.div_ceil(t.texel_bytes()),
                    );
                }
            }
            Ok(())
        };
        gpu.run_pass_after(entry, copies, |pass| {
            let params = bytemuck::bytes_of(&params);
            gpu.encode_resources(
                pass,
                &pipeline,
                params,
                &resources,
                workgroups(total as u64),
            )
        })
    }
}

/// The generated Winograd kernels (shaders/conv_winograd.wgsl): everything their source
/// depends on.
#[derive(Debug)]
struct WinogradKernel {
    /// src read through an r32float texture.
    src_texture: bool,
    /// src4 read through an rgba32float texture.
    src4_texture: bool,
}

impl Generated for WinogradKernel {
    fn source(&self) -> String {
        [
            include_str!("../../shaders/epilogue.wgsl"),
            &scalar_input("src", 1, self.src_texture),
            &vec4_input("src4", 5, self.src4_texture),
            include_str!("../../shaders/conv_winograd.wgsl"),
        ]
        .concat()
    }
}
